"""Reference outputs from plain vLLM ``LLM.generate`` (run as a subprocess: vLLM needs a main guard).

usage: python plain_vllm.py MODEL_DIR PROMPTS_JSON MAX_TOKENS [DTYPE]  -> prints a JSON list of texts
Prompts are generated one at a time (bf16 greedy output depends on batch composition).
"""

import json
import os
import sys


def main() -> None:
    model, prompts, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    dtype = sys.argv[4] if len(sys.argv) > 4 else "auto"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, enforce_eager=True, max_model_len=2048, dtype=dtype, max_num_seqs=32, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    texts = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].text for p in prompts]
    sys.stdout.write("RESULT " + json.dumps(texts) + "\n")


if __name__ == "__main__":
    main()
