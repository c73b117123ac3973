"""Tokens/s of a 2-stage MoLink pipeline ([0,15) head + [15,30) stage over loopback) vs
single-node vLLM, measured in the same run (the ratio is what matters on a shared box).

usage: python benchmarks/bench_pipeline.py [--new-tokens 128] [--batches 1,16] [--dtype bfloat16]
       [--transport unix|tcp] [--stages 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from molinkd.model import prepare_embedded  # noqa: E402
from molinkd.spans import even_split  # noqa: E402
from tests.integration.pipeline_helpers import Stage, route_for, run_driver  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "Water boils at"]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", default="1,16")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--transport", choices=["unix", "tcp"], default="tcp")
    a = p.parse_args()
    model = str(prepare_embedded(verbose=False))
    batches = [int(x) for x in a.batches.split(",")]
    bench = {"new_tokens": a.new_tokens, "batches": batches}
    base = {"model": model, "dtype": a.dtype, "prompts": PROMPTS, "max_tokens": 8, "one_by_one": False, "bench": bench}

    single = run_driver({**base, "route": None})["bench"]
    spans = [(s.start, s.end) for s in even_split(30, a.stages)]
    with tempfile.TemporaryDirectory() as tmp:
        extra_for = (lambda i: ["--listen", "tcp:127.0.0.1:0"]) if a.transport == "tcp" else (lambda i: [])
        stages = [
            Stage(model, f"{s}:{e}", Path(tmp), dtype=a.dtype, extra=extra_for(i)) for i, (s, e) in enumerate(spans[1:])
        ]
        try:
            for st in stages:
                st.wait_ready()
            if a.transport == "tcp":  # the bound address is in the ready file
                for st in stages:
                    st.sock_addr = st.ready.read_text().strip()
                route = route_for(spans, stages)
                for hop, st in zip(route[1:], stages):
                    hop["addr"] = st.sock_addr
            else:
                route = route_for(spans, stages)
            piped = run_driver({**base, "route": route})["bench"]
        finally:
            for st in stages:
                st.stop()
    rows = []
    for b in batches:
        s, q = single[str(b)]["tok_s"], piped[str(b)]["tok_s"]
        rows.append({"batch": b, "single_tok_s": round(s, 1), f"pipeline{a.stages}_tok_s": round(q, 1), "ratio": round(q / s, 3)})
    print(json.dumps({"dtype": a.dtype, "new_tokens": a.new_tokens, "transport": a.transport, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
