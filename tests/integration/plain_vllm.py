"""Reference outputs from plain vLLM (run as a subprocess: vLLM needs a main guard).

usage: python plain_vllm.py MODEL_DIR SPEC_JSON
SPEC: {"prompts": [...], "max_tokens": int, "dtype": "auto", "chat": [[messages...], ...],
       "chat_max_tokens": int}
prints "RESULT {"texts": [...], "chat": [...]}": greedy continuations from ``LLM.generate`` and
``LLM.chat``, one request at a time (bf16 greedy output depends on batch composition).
The thread settings are the daemons' (OMP_NUM_THREADS=1 unless the caller set it).
"""

import json
import os
import sys


def main() -> None:
    model, spec = sys.argv[1], json.loads(sys.argv[2])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, enforce_eager=True, max_model_len=2048, dtype=spec.get("dtype", "auto"),
              max_num_seqs=32, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"])
    out = {"texts": [llm.generate([p], params, use_tqdm=False)[0].outputs[0].text for p in spec["prompts"]]}
    chat_params = SamplingParams(temperature=0.0, max_tokens=spec.get("chat_max_tokens", 16))
    out["chat"] = [llm.chat(m, chat_params, use_tqdm=False)[0].outputs[0].text for m in spec.get("chat", [])]
    sys.stdout.write("RESULT " + json.dumps(out) + "\n")
    sys.stdout.flush()
    llm.llm_engine.engine_core.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
