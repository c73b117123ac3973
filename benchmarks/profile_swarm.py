"""Where a swarm's time goes: py-spy profiles of every process of a pinned 2-stage swarm (the head's
EngineCore, the stage process, both daemons) while `molink bench`'s load generator drives it.

usage: python benchmarks/profile_swarm.py [--batch 16] [--max-tokens 128] [--rtt-ms 0] [--depth K]
       [--py-spy PATH] [--out DIR] [--top 25]

Needs py-spy (``pip install py-spy``; pass --py-spy if it is not on PATH) and ptrace rights.
Writes collapsed stacks per process to --out and prints, per process, the functions with the most
samples on the stack (inclusive) and on top of it (self), as shares of that process's samples.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import psutil
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from molinkd.bench.load import run_batch  # noqa: E402
from molinkd.bench.procs import Procs, plan_cores  # noqa: E402
from molinkd.bench.runner import BenchOptions, swarm  # noqa: E402


def summarise(collapsed: Path, top: int) -> str:
    """Inclusive and self shares per function from py-spy's collapsed ("raw") output."""
    incl: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
                  if " (" in f else f for f in stack.split(";")]
        for f in set(frames):
            incl[f] += count
        if frames:
            self_[frames[-1]] += count
    if not total:
        return "  (no samples)"
    out = [f"  {total} samples"]
    out.append("  inclusive:")
    out += [f"    {c / total:6.1%}  {f}" for f, c in incl.most_common(top)]
    out.append("  self:")
    out += [f"    {c / total:6.1%}  {f}" for f, c in self_.most_common(top)]
    return "\n".join(out)


def processes(daemon_pid: int) -> dict[str, int]:
    """The daemon and its Python children worth profiling (engine core / stage process)."""
    found = {"daemon": daemon_pid}
    for child in psutil.Process(daemon_pid).children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
            name = child.name()
        except psutil.Error:
            continue
        if "molinkd.engine.stage" in cmd:
            found["stage"] = child.pid
        elif "EngineCore" in name or "EngineCore" in cmd or "multiprocessing.spawn" in cmd:
            found.setdefault("engine", child.pid)
    return found


async def main_async(a: argparse.Namespace, workdir: Path) -> None:
    from molinkd.model import load_model_info

    o = BenchOptions(stages=2, batches=(a.batch,), max_tokens=a.max_tokens, rtt_ms=a.rtt_ms, depth=a.depth)
    model = await trio.to_thread.run_sync(load_model_info, None)
    import os

    cores = plan_cores(2, 1, sorted(os.sched_getaffinity(0)))
    procs = Procs(workdir)
    async with httpx.AsyncClient() as client, swarm(client, procs, o, cores, model.num_layers) as (peers, links):
        for lk in links:
            lk.set(rtt_ms=a.rtt_ms)
        head = peers[0]
        await run_batch(head.url, a.batch, 16, o.prompt_len)  # warm-up
        targets = {f"head-{k}": v for k, v in processes(head.proc.pid).items()}
        targets.update({f"stage1-{k}": v for k, v in processes(peers[1].proc.pid).items()})
        a.out.mkdir(parents=True, exist_ok=True)
        spies = {}
        for name, pid in targets.items():
            path = a.out / f"{name}.txt"
            spies[name] = (path, subprocess.Popen(
                [a.py_spy, "record", "--nonblocking", "--format", "raw", "--rate", "100", "--duration",
                 str(a.seconds), "--pid", str(pid), "--output", str(path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        res = await run_batch(head.url, a.batch, a.max_tokens, o.prompt_len)
        print(f"batch {a.batch}: {res.tok_s:.1f} tok/s, tpot p50 {res.summary()['tpot_ms_p50']} ms")
        for name, (path, p) in spies.items():
            await trio.to_thread.run_sync(p.wait)
            print(f"\n== {name} (pid {targets[name]})")
            print(summarise(path, a.top) if path.exists() else f"  py-spy failed: {p.stderr.read().decode()[-300:]}")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rtt-ms", type=float, default=0.0)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--seconds", type=int, default=8, help="profile this long (from the start of the load)")
    p.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    p.add_argument("--out", type=Path, default=Path("profiles"))
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="molink-bench-") as tmp:
        trio.run(main_async, a, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
