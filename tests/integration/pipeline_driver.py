"""Run vLLM single-node or as a MoLink pipeline head and print greedy outputs (a subprocess:
vLLM's spawned EngineCore needs a main guard).

usage: python pipeline_driver.py SPEC_JSON   -> prints "RESULT {json}"

SPEC: {"model", "dtype", "route" (null = single node), "prompts", "max_tokens",
       "one_by_one": bool, "batch": bool (all prompts at once, ignore_eos), "logprobs": int (0 = off),
       "seeded": [{"prompt", "seed"}] (sampled at temperature 0.7, "seeded_tokens" each), "bench": null | {...}}
"""

import json
import os
import sys
import time


def make_llm(spec: dict):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import LLM

    kw = dict(
        model=spec["model"],
        dtype=spec.get("dtype", "bfloat16"),
        enforce_eager=True,
        max_model_len=spec.get("max_model_len", 1024),
        max_num_seqs=spec.get("max_num_seqs", 32),
        max_num_batched_tokens=spec.get("max_num_batched_tokens", 8192),
        seed=0,
        disable_log_stats=True,
    )
    if spec.get("route"):
        from molinkd.engine.head import pipeline_engine_kwargs

        kw.update(pipeline_engine_kwargs(spec["route"]))
    return LLM(**kw)


def run(spec: dict) -> dict:
    from vllm import SamplingParams

    t0 = time.monotonic()
    llm = make_llm(spec)
    out: dict = {"startup_s": time.monotonic() - t0}
    greedy = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"])
    prompts = spec["prompts"]
    log = lambda what: print(f"[driver {time.monotonic() - t0:6.1f}s] {what}", file=sys.stderr, flush=True)  # noqa: E731
    log("engine up")
    if spec.get("one_by_one", True):
        out["one"] = [llm.generate([p], greedy, use_tqdm=False)[0].outputs[0].text for p in prompts]
        log("one by one done")
    if spec.get("batch"):
        # ignore_eos: every request runs the full max_tokens, so the token counts mean something
        res = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True),
                           use_tqdm=False)
        out["batch"] = [r.outputs[0].text for r in res]
        out["batch_tokens"] = [len(r.outputs[0].token_ids) for r in res]
        log("batch done")
    if spec.get("logprobs"):
        sp = SamplingParams(temperature=0.0, max_tokens=8, logprobs=spec["logprobs"], prompt_logprobs=2)
        r = llm.generate([prompts[0]], sp, use_tqdm=False)[0]
        out["logprobs"] = [
            {str(t): round(lp.logprob, 3) for t, lp in step.items()} for step in r.outputs[0].logprobs
        ]
        out["prompt_logprobs"] = [
            None if step is None else sorted(int(t) for t in step) for step in r.prompt_logprobs
        ]
    if spec.get("seeded"):
        params = [SamplingParams(temperature=0.7, seed=j["seed"], max_tokens=spec["seeded_tokens"], ignore_eos=True)
                  for j in spec["seeded"]]
        res = llm.generate([j["prompt"] for j in spec["seeded"]], params, use_tqdm=False)
        out["seeded"] = [r.outputs[0].text for r in res]
    bench = spec.get("bench")
    if bench:
        out["bench"] = {}
        n_new = bench["new_tokens"]
        sp = SamplingParams(temperature=0.0, max_tokens=n_new, ignore_eos=True)
        llm.generate(["warm up"], SamplingParams(max_tokens=4), use_tqdm=False)
        for b in bench["batches"]:
            ps = [f"{prompts[i % len(prompts)]} (variant {i})" for i in range(b)]
            t = time.monotonic()
            res = llm.generate(ps, sp, use_tqdm=False)
            dt = time.monotonic() - t
            n = sum(len(r.outputs[0].token_ids) for r in res)
            out["bench"][str(b)] = {"tokens": n, "seconds": dt, "tok_s": n / dt}
    return out, llm


def main() -> None:
    spec = json.loads(sys.argv[1])
    result, llm = run(spec)
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    # stop the EngineCore process explicitly (os._exit alone would orphan it), then skip
    # vLLM's slow interpreter teardown
    llm.llm_engine.engine_core.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
