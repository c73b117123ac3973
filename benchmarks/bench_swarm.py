"""End-to-end throughput through real daemons: a 2-stage swarm (0:15 + 15:30, hidden states over
libp2p on loopback) against a single-node daemon measured in the same run.

usage: python benchmarks/bench_swarm.py [--tokens 128] [--batches 1,16] [--stages 2]
Prints one line per (setup, batch) and the ratios; writes JSON to --out if given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import Daemon, boot_addr  # noqa: E402


def measure(url: str, batch: int, tokens: int) -> float:
    """Output tokens/s for ``batch`` concurrent requests of ``tokens`` new tokens each."""
    done = [0] * batch

    def one(i: int) -> None:
        r = httpx.post(url + "/v1/completions", json={"prompt": f"Write a long story about item {i}.",
                                                      "max_tokens": tokens, "ignore_eos": True,
                                                      "temperature": 0}, timeout=1200)
        r.raise_for_status()
        done[i] = r.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(batch)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    assert all(n == tokens for n in done), done
    return sum(done) / dt


def bench(daemons_args: list[list[str]], name: str, batches: list[int], tokens: int, tmp: Path,
          envs: list[dict]) -> dict:
    """Both setups get the whole machine: one engine with every core, or one core per stage."""
    daemons: list[Daemon] = []
    try:
        first = Daemon(daemons_args[0], tmp, name=f"{name}0", env=envs[0])
        daemons.append(first)
        if len(daemons_args) > 1:
            boot = boot_addr(first, timeout=60)
            for i, args in enumerate(daemons_args[1:], 1):
                daemons.append(Daemon(args + ["--bootstrap", boot], tmp, name=f"{name}{i}", env=envs[i]))
        for d in daemons:
            d.wait_ready(timeout=600)
        head = next(d for d in daemons if d.status()["layers"][0] == 0)
        measure(head.url, 1, 8)  # warm-up
        out = {}
        for b in batches:
            out[b] = measure(head.url, b, tokens)
            print(f"{name:12s} batch {b:3d}: {out[b]:7.1f} tok/s", flush=True)
        return out
    finally:
        for d in reversed(daemons):
            d.stop()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--batches", default="1,16")
    p.add_argument("--out", default=None)
    p.add_argument("--stage-threads", choices=["split", "shared"], default="split",
                   help="split: each stage pinned to its own cores; shared: all stages may use all cores")
    a = p.parse_args()
    batches = [int(x) for x in a.batches.split(",")]
    # daemon logs and keys live here while the benchmark runs (a failing daemon's log tail is
    # printed by the helper); nothing is left behind
    with tempfile.TemporaryDirectory(prefix="molink-bench-") as tmpdir:
        tmp = Path(tmpdir)
        cores = os.cpu_count() or 2
        single = bench([["--layers", "all"]], "single-node", batches, a.tokens, tmp,
                       [{"OMP_NUM_THREADS": str(cores), "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}"}])
        if a.stage_threads == "split":  # each stage its own half of the cores (they overlap at batch > 1)
            half = max(1, cores // 2)
            envs = [{"OMP_NUM_THREADS": str(half), "VLLM_CPU_OMP_THREADS_BIND": f"{half}-{cores - 1}"},
                    {"OMP_NUM_THREADS": str(half), "VLLM_CPU_OMP_THREADS_BIND": f"0-{half - 1}"}]
        else:  # "shared": every stage may use every core (they alternate at batch 1)
            envs = [{"OMP_NUM_THREADS": str(cores), "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}"}] * 2
        two = bench([["--layers", "15:30"], ["--layers", "0:15"]], "2-stage", batches, a.tokens, tmp, envs)
    result = {"tokens": a.tokens, "single": single, "two_stage": two,
              "ratio": {b: round(two[b] / single[b], 3) for b in batches}}
    for b in batches:
        print(f"2-stage / single-node at batch {b}: {result['ratio'][b]:.2f}")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
