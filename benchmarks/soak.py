"""Churn soak: real daemons serve a steady load while peers are killed, hung and stopped.

Layout (default): a gateway (no layers), ``--heads`` heads (0:15) and ``--stages`` stages (15:30),
more stages than heads so every span has a spare. Clients stream greedy completions with
``ignore_eos`` through the gateway and the heads (with ``--kill-heads`` through the gateway only: a
killed head's address answers nothing; a client backs off 1 s after an error). Every ``--fault-every`` seconds (jittered) a
random stage (and, with ``--kill-heads``, a head) gets one fault: SIGKILL, SIGSTOP for
``--stop-seconds``, or SIGTERM; killed and stopped daemons are restarted with the same identity.

Report (a table, and with ``--json`` one JSON line last):
- requests ok / total; every failure must be an explicit error (none silently truncated);
- tokens lost or repeated: a completed request must have exactly ``max_tokens`` tokens and, in
  float32 (the default), exactly the text an undisturbed run gave for its prompt;
- per fault: time to detect it and to fail over (from the heads' /status), requests that overlapped
  it, how many of those failed, and the longest token gap among them;
- ghost peers: a departed peer still listed online by a survivor two TTLs after it left;
- RSS and open file descriptors of every daemon (and its engine processes) at start and end;
- the longest gap between two streamed tokens a client saw (p50/p99/max over requests).

usage: python benchmarks/soak.py [--duration 1800] [--fault-every 45] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import Daemon, boot_addr, wait_for  # noqa: E402

PROMPTS = [
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "def fibonacci(n):",
    "The history of the printing press",
    "A recipe for bread:",
    "The rules of chess are",
]


def _tree_usage(pid: int) -> tuple[float, int]:
    """RSS (MiB) and open fds of a process and its children."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return 0.0, 0
    rss = fds = 0
    for q in procs:
        try:
            rss += q.memory_info().rss
            fds += q.num_fds()
        except psutil.Error:
            pass
    return rss / 2**20, fds


class Client(threading.Thread):
    """Loops streamed greedy completions against ``urls`` until ``stop`` is set."""

    def __init__(self, idx: int, urls: list[str], max_tokens: int, stop: threading.Event, results: list,
                 lock: threading.Lock) -> None:
        super().__init__(daemon=True, name=f"client{idx}")
        self.idx, self.urls, self.max_tokens, self.stop, self.results, self.lock = idx, urls, max_tokens, stop, results, lock

    def run(self) -> None:
        rng = random.Random(self.idx)
        n = 0
        while not self.stop.is_set() and n < 100_000:
            n += 1
            prompt = rng.choice(PROMPTS)
            url = rng.choice(self.urls)
            r = one_request(url, prompt, self.max_tokens)
            with self.lock:
                self.results.append(r)
            if not r["ok"]:
                self.stop.wait(1.0)  # a client backs off after an error instead of spinning on it


def one_request(url: str, prompt: str, max_tokens: int, timeout: float = 600.0) -> dict:
    """Stream one completion; returns what a client saw (never raises)."""
    out = {"url": url, "prompt": prompt, "text": "", "tokens": 0, "ok": False, "error": None,
           "max_gap": 0.0, "finish": None, "t0": time.monotonic(), "t1": None}
    body = {"model": "default", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    last = time.monotonic()
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as r:
            if r.status_code != 200:
                r.read()
                out["error"] = f"HTTP {r.status_code}: {r.text[:200]}"
                return out
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    out["ok"] = out["finish"] is not None and out["error"] is None
                    break
                ev = json.loads(data)
                if "error" in ev:
                    out["error"] = str(ev["error"])[:200]
                    continue
                if ev.get("usage") and not ev.get("choices"):
                    out["tokens"] = ev["usage"]["completion_tokens"]
                    continue
                ch = ev["choices"][0]
                now = time.monotonic()
                if ch.get("text"):
                    out["max_gap"] = max(out["max_gap"], now - last)
                    last = now
                    out["text"] += ch["text"]
                if ch.get("finish_reason"):
                    out["finish"] = ch["finish_reason"]
    except Exception as e:  # noqa: BLE001 - a client sees everything as an error
        out["error"] = f"{type(e).__name__}: {e}"[:200]
    if out["ok"] and out["error"] is None and not out["tokens"]:
        out["ok"] = False
        out["error"] = "stream ended without usage"
    out["t1"] = time.monotonic()
    return out


class Swarm:
    def __init__(self, tmp: Path, heads: int, stages: int, dtype: str, announce_period: float,
                 kv_cache_gib: float = 1.0) -> None:
        self.tmp = tmp
        self.common = ["--dtype", dtype, "--announce-period", str(announce_period), "--kv-cache-gib", str(kv_cache_gib)]
        self.specs: list[tuple[str, list[str]]] = [("gw", ["--layers", "none"])]
        self.specs += [(f"stage{i}", ["--layers", "15:30"]) for i in range(stages)]
        self.specs += [(f"head{i}", ["--layers", "0:15"]) for i in range(heads)]
        self.daemons: dict[str, Daemon] = {}
        self.boot = ""

    def start(self, name: str) -> Daemon:
        args = dict(self.specs)[name]
        extra = ["--bootstrap", self.boot] if self.boot else []
        d = Daemon(args + self.common + extra, self.tmp, name=name)
        self.daemons[name] = d
        return d

    def start_all(self) -> None:
        gw = self.start("gw")
        self.boot = boot_addr(gw, timeout=60)
        for name, _ in self.specs[1:]:
            self.start(name)
        for d in self.daemons.values():
            d.wait_ready(timeout=900)

    def stop_all(self) -> None:
        for d in self.daemons.values():
            d.signal_machine(signal.SIGCONT)
            with _suppress():
                d.stop(timeout=20)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


def peer_ids(sw: Swarm) -> dict[str, str]:
    return {n: d.status()["peer_id"] for n, d in sw.daemons.items()}


def ghosts(sw: Swarm, gone: str, survivors: list[str]) -> list[str]:
    """Survivors that still list ``gone`` as an online peer."""
    out = []
    for n in survivors:
        with _suppress():
            st = sw.daemons[n].status()
            if any(p.get("peer_id") == gone and p.get("state", "online") == "online" for p in st["peers"][1:]):
                out.append(n)
    return out


def run(a: argparse.Namespace) -> dict:
    rng = random.Random(a.seed)
    tmp = Path(tempfile.mkdtemp(prefix="molink-soak-"))
    sw = Swarm(tmp, a.heads, a.stages, a.dtype, a.announce_period, a.kv_cache_gib)
    stop = threading.Event()
    results: list = []
    lock = threading.Lock()
    faults: list[dict] = []
    failovers: dict[tuple[str, float], dict] = {}
    ghost_count = 0
    try:
        sw.start_all()
        ids = peer_ids(sw)
        head_urls = [d.url for n, d in sw.daemons.items() if n.startswith("head")]
        wait_for(lambda: all(httpx.get(u + "/status", timeout=5).json()["engine"]["state"] == "ready"
                             for u in head_urls), 300, "heads with a route")
        # references: every prompt undisturbed, on the first head
        refs = {p: one_request(head_urls[0], p, a.max_tokens) for p in PROMPTS}
        bad = {p: r["error"] for p, r in refs.items() if not r["ok"]}
        if bad:
            raise RuntimeError(f"undisturbed references failed: {bad}")
        usage0 = {n: _tree_usage(d.proc.pid) for n, d in sw.daemons.items()}
        # heads that get killed are no entry point (nothing answers at a dead head's address): then
        # clients use the gateway, whose requests resume on the other head
        urls = [sw.daemons["gw"].url] + ([] if a.kill_heads else head_urls)
        names = {d.url: n for n, d in sw.daemons.items()}
        clients = [Client(i, urls, a.max_tokens, stop, results, lock) for i in range(a.clients)]
        for c in clients:
            c.start()
        t_start = time.monotonic()
        t_end = t_start + a.duration
        ttl = 3 * a.announce_period
        while time.monotonic() < t_end or len(faults) < a.min_faults:
            time.sleep(max(0.0, min(t_end - time.monotonic(), a.fault_every * rng.uniform(0.7, 1.3)))
                       if len(faults) >= a.min_faults else a.fault_every * rng.uniform(0.7, 1.3))
            if time.monotonic() >= t_end and len(faults) >= a.min_faults:
                break
            pool = [n for n in sw.daemons if n.startswith("stage") or (a.kill_heads and n.startswith("head"))]
            name = rng.choice(pool)
            kind = rng.choice(["SIGKILL", "SIGSTOP", "SIGTERM"])
            d = sw.daemons[name]
            t0 = time.monotonic()
            fault = {"t": round(t0 - t_start, 1), "peer": name, "fault": kind, "wall": time.time()}
            print(f"[soak] {fault['t']:7.1f}s {kind} {name}", file=sys.stderr, flush=True)
            if kind == "SIGSTOP":  # the machine hangs
                d.signal_machine(signal.SIGSTOP)
                time.sleep(a.stop_seconds)
                d.signal_machine(signal.SIGCONT)
            else:  # SIGKILL: the machine crashes; SIGTERM: the operator stops the peer (it drains)
                if kind == "SIGKILL":
                    d.signal_machine(signal.SIGKILL)
                else:
                    os.killpg(d.proc.pid, signal.SIGTERM)
                with _suppress():
                    d.proc.wait(timeout=60)
                if d.proc.poll() is None:
                    d.signal_machine(signal.SIGKILL)
                    d.proc.wait(timeout=10)
                time.sleep(2 * ttl)
                survivors = [n for n in sw.daemons if n != name]
                g = ghosts(sw, ids[name], survivors)
                fault["ghosts"] = g
                ghost_count += len(g)
                d.stop()
                if time.monotonic() < t_end or len(faults) + 1 < a.min_faults:
                    sw.start(name).wait_ready(timeout=600, tolerate_failures=True)
                else:  # the last fault: no need to bring the peer back (an engine load saved)
                    del sw.daemons[name]
            fault["handled_s"] = round(time.monotonic() - t0, 1)
            faults.append(fault)
            for n, d in sw.daemons.items():  # failovers the heads made since (they keep the last 8)
                if n.startswith("head") and n != name:
                    with _suppress():
                        for f in d.status()["pipeline"].get("failovers") or []:
                            failovers.setdefault((n, f["time"]), f)
        stop.set()
        for c in clients:
            c.join(timeout=700)
        usage1 = {n: _tree_usage(d.proc.pid) for n, d in sw.daemons.items()}
    finally:
        stop.set()
        sw.stop_all()
    total = len(results)
    ok = [r for r in results if r["ok"]]
    silent = [r for r in results if not r["ok"] and not r["error"]]
    wrong_count = [r for r in ok if r["tokens"] != a.max_tokens]
    wrong_text = [r for r in ok if a.dtype == "float32" and r["text"] != refs[r["prompt"]]["text"]]
    gaps = sorted(r["max_gap"] for r in ok) or [0.0]
    for i, f in enumerate(faults):  # what each fault did: detection, failover, requests overlapping it
        end = faults[i + 1]["wall"] if i + 1 < len(faults) else math.inf
        fo = sorted((v for v in failovers.values() if f["wall"] <= v["detected_at"] < end), key=lambda v: v["time"])
        f["detect_s"] = round(fo[0]["detected_at"] - f["wall"], 2) if fo else None
        f["failover_s"] = round(fo[0]["seconds"], 2) if fo else None
        t0, t1 = f["t"] + t_start, f["t"] + t_start + f["handled_s"]
        during = [r for r in results if r["t0"] <= t1 and r["t1"] >= t0]
        f["requests"] = len(during)
        f["failed"] = sum(not r["ok"] for r in during)
        f["max_gap_s"] = round(max((r["max_gap"] for r in during if r["ok"]), default=0.0), 2)
        del f["wall"]
    by_entry: dict[str, list[int]] = {}
    for r in results:
        c = by_entry.setdefault(names.get(r["url"], r["url"]), [0, 0])
        c[0] += r["ok"]
        c[1] += 1
    report = {
        "duration_s": a.duration, "faults": faults, "requests": total, "ok": len(ok),
        "ok_by_entry": {n: f"{c[0]}/{c[1]}" for n, c in by_entry.items()},
        "ok_ratio": round(len(ok) / total, 5) if total else None,
        "errors": sorted({r["error"] for r in results if r["error"]})[:10],
        "silent_failures": len(silent), "token_count_mismatch": len(wrong_count),
        "text_mismatch": len(wrong_text), "ghost_peers": ghost_count,
        "mismatches": [_mismatch(r, refs[r["prompt"]]["text"], t_start)
                       for r in [*wrong_count, *(r for r in wrong_text if r not in wrong_count)][:10]],
        "gap_s_p50": round(statistics.median(gaps), 3), "gap_s_p99": round(gaps[int(0.99 * (len(gaps) - 1))], 3),
        "gap_s_max": round(gaps[-1], 3),
        "rss_mb_start": {n: round(v[0], 1) for n, v in usage0.items()},
        "rss_mb_end": {n: round(v[0], 1) for n, v in usage1.items()},
        "fds_start": {n: v[1] for n, v in usage0.items()}, "fds_end": {n: v[1] for n, v in usage1.items()},
    }
    return report


def _mismatch(r: dict, ref: str, t_start: float) -> dict:
    """What a wrong answer looked like: where it left the reference, when, through which entry point."""
    got = r["text"]
    at = next((i for i, (x, y) in enumerate(zip(got, ref)) if x != y), min(len(got), len(ref)))
    return {"url": r["url"], "prompt": r["prompt"], "tokens": r["tokens"], "finish": r["finish"], "diverges_at_char": at,
            "reference": ref, "got": got, "t0": round(r["t0"] - t_start, 1), "t1": round(r["t1"] - t_start, 1)}


def _n(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=1800.0, help="seconds of churn")
    p.add_argument("--fault-every", type=float, default=45.0, help="mean seconds between faults")
    p.add_argument("--min-faults", type=int, default=0, help="keep going past --duration until this many faults")
    p.add_argument("--stop-seconds", type=float, default=20.0, help="how long a SIGSTOP lasts")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--kill-heads", action="store_true", help="heads get faults too (the gateway resumes)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--dtype", default="float32", help="float32 makes greedy text comparable across resumes")
    p.add_argument("--announce-period", type=float, default=2.0)
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache of every daemon")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    r = run(a)
    print(f"requests ok {r['ok']}/{r['requests']}  silent failures {r['silent_failures']}  "
          f"token-count mismatches {r['token_count_mismatch']}  text mismatches {r['text_mismatch']}  "
          f"ghost peers {r['ghost_peers']}")
    print(f"longest token gap per request: p50 {r['gap_s_p50']} s  p99 {r['gap_s_p99']} s  max {r['gap_s_max']} s")
    print(f"ok by entry point: {r['ok_by_entry']}")
    print("  time(s)  fault    peer     detect(s) failover(s) handled(s) requests failed max-gap(s)")
    for f in r["faults"]:
        print(f"  {f['t']:7.1f}  {f['fault']:8s} {f['peer']:7s}  {_n(f['detect_s']):>8s} {_n(f['failover_s']):>11s} "
              f"{f['handled_s']:10.1f} {f['requests']:8d} {f['failed']:6d} {f['max_gap_s']:10.2f}"
              + (f"  ghosts: {f['ghosts']}" if f.get("ghosts") else ""))
    for n in r["rss_mb_start"]:
        print(f"  {n:7s} rss {r['rss_mb_start'][n]:8.1f} -> {r['rss_mb_end'].get(n, 0):8.1f} MiB   "
              f"fds {r['fds_start'][n]} -> {r['fds_end'].get(n)}")
    for m in r["mismatches"]:
        print(f"  MISMATCH {m['t0']}-{m['t1']} s via {m['url']}: {m['prompt']!r} ({m['tokens']} tokens, finish "
              f"{m['finish']}) diverges at char {m['diverges_at_char']}\n"
              f"    reference {m['reference']!r}\n    got       {m['got']!r}")
    if a.json:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
