"""What audits cost a head: tokens/s with ``--audit-rate 1`` against ``--audit-rate 0``, same run.

A 2-stage route (head 0:15, stage 15:30) plus a second 15:30 stage, the verifier, on this machine.
The stages start once; the head is started with rate 0, then rate 1, alternating for ``--rounds``
rounds. Each head measures ``--sequential`` requests one after the other (batch 1: every request
is audited at rate 1) and one batch of ``--batch`` concurrent requests (one audit at a time: the
others are not drawn). Greedy, ``ignore_eos``, streamed. Prints one JSON line: tok/s per rate and
round, the ratios rate 1 / rate 0, and how many audits ran.

On a 2-core box the verifier's recomputation runs on the same cores as the route (elsewhere it is
another machine's work); the head's part is a copy of one request's rows, a session on the
verifier route and one frame each way, in a thread off the step path.

usage: flock /tmp/molink-heavy.lock python benchmarks/bench_audit.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import trio  # noqa: E402

from molinkd.bench.load import run_batch  # noqa: E402
from molinkd.bench.procs import Procs, get_status, wait_status  # noqa: E402


async def _head_run(client: httpx.AsyncClient, procs: Procs, boot: str, rate: float, a: argparse.Namespace) -> dict:
    head = procs.start_daemon(f"head-r{rate:g}-{time.monotonic_ns()}", ["--layers", "0:15", "--bootstrap", boot,
                                                                       "--audit-rate", str(rate)], [0])
    try:
        await wait_status(client, head, lambda s: (s.get("engine") or {}).get("state") == "ready", "engine", 600)
        await run_batch(head.url, 1, 4, a.prompt_len)  # warm-up
        t0 = time.perf_counter()
        tokens = 0
        for _ in range(a.sequential):
            r = await run_batch(head.url, 1, a.max_tokens, a.prompt_len)
            tokens += r.tokens
        seq = tokens / (time.perf_counter() - t0)
        batch = await run_batch(head.url, a.batch, a.max_tokens, a.prompt_len)
        await trio.sleep(1.0)  # the last audit reports
        st = await get_status(client, head)
        return {"rate": rate, "sequential_tok_s": round(seq, 2), "batch_tok_s": round(batch.tok_s, 2),
                "audits": {k: v for k, v in st["audits"].items() if k not in ("pending", "last")},
                "last_audit": (st["audits"].get("last") or {}).get("detail"), "route": st["route"]}
    finally:
        procs.stop(head)


async def main_async(a: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-audit-"))
    procs = Procs(work)
    try:
        async with httpx.AsyncClient() as client:
            s = procs.start_daemon("stage", ["--layers", "15:30"], [1])
            boot_st = await wait_status(client, s, lambda st: st.get("addrs"), "addresses", 60)
            boot = next(x for x in boot_st["addrs"] if "/127.0.0.1/" in x)
            v = procs.start_daemon("verifier", ["--layers", "15:30", "--bootstrap", boot], [1])
            for d in (s, v):
                await wait_status(client, d, lambda st: st.get("ready"), "a ready stage", 600)
            runs = []
            for _ in range(a.rounds):
                for rate in (0.0, 1.0):
                    runs.append(await _head_run(client, procs, boot, rate, a))
                    print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    finally:
        procs.stop_all()

    def mean(rate: float, key: str) -> float:
        xs = [r[key] for r in runs if r["rate"] == rate]
        return sum(xs) / len(xs)

    return {"runs": runs,
            "sequential_ratio": round(mean(1.0, "sequential_tok_s") / mean(0.0, "sequential_tok_s"), 3),
            "batch_ratio": round(mean(1.0, "batch_tok_s") / mean(0.0, "batch_tok_s"), 3),
            "sequential": a.sequential, "batch": a.batch, "max_tokens": a.max_tokens, "prompt_len": a.prompt_len}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sequential", type=int, default=8, help="batch-1 requests per head (each audited at rate 1)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    a = p.parse_args()
    print(json.dumps(trio.run(main_async, a)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
