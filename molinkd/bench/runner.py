"""``molink bench``: a single-node baseline and an N-stage swarm of real daemons on this machine,
measured in the same run by the same load generator, each peer pinned to cores of its own.

With ``--rtt-ms`` / ``--rate-mbit`` the link between consecutive stages goes through a
:class:`~molinkd.bench.wanlink.WanLink`: stage i+1 announces the link's address and stage i
bootstraps through it, so their libp2p connection (and every stream on it) crosses the link.
The swarm is measured first with the link at 0 ms, then with the delay asked for; before
measuring, the RTT the head sees in /status must show the delay (otherwise the peers found
another way round and the benchmark stops).

Every process started here runs in its own process group and is stopped in ``finally`` blocks,
also on Ctrl-C and SIGTERM; logs, keys and runtime directories live in a temporary directory
removed at the end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from molinkd.bench.load import BatchResult, LoadError, run_batch
from molinkd.bench.procs import BenchError, DaemonProc, Procs, get_status, plan_cores, wait_status
from molinkd.bench.wanlink import WanLink

READY_TIMEOUT = 900.0  # seconds a daemon may take to serve; $MOLINK_BENCH_READY_TIMEOUT (tests)


def ready_timeout() -> float:
    from molinkd.config import number_from_env

    return float(number_from_env("MOLINK_BENCH_READY_TIMEOUT", float, 1.0, READY_TIMEOUT,
                                 "seconds >= 1 (how long a daemon may take to serve)"))


@dataclass(frozen=True)
class BenchOptions:
    stages: int = 2
    batches: tuple[int, ...] = (1, 16)
    max_tokens: int = 128
    prompt_len: int = 16
    cores_per_peer: int = 1
    rtt_ms: float = 0.0
    rate_mbit: float | None = None
    depth: int | None = None  # pipeline depth override for the head (None: the head's default)
    model: str | None = None
    skip_baseline: bool = False
    spans: tuple[tuple[int, int], ...] | None = None  # explicit stage spans (default: an even split)
    long_prompt: int = 0  # > 0: also measure each batch with a prompt of this many tokens arriving mid-decode

    @property
    def linked(self) -> bool:
        return self.rtt_ms > 0 or self.rate_mbit is not None

    def validate(self) -> None:
        if self.stages < 2:
            raise BenchError("--stages must be at least 2 (the baseline is the single node)")
        if not self.batches or min(self.batches) < 1:
            raise BenchError("--batch needs positive sizes, e.g. 1,16,32")
        if self.max_tokens < 2:
            raise BenchError("--max-tokens must be at least 2 (time per output token needs two)")
        if self.prompt_len < 1:
            raise BenchError("--prompt-len must be at least 1")
        if self.spans is not None and len(self.spans) != self.stages:
            raise BenchError(f"--spans gives {len(self.spans)} spans for {self.stages} stages")
        if self.rtt_ms < 0 or (self.rate_mbit is not None and self.rate_mbit <= 0):
            raise BenchError("--rtt-ms must be >= 0 and --rate-mbit > 0")
        if self.long_prompt < 0 or self.long_prompt > 16384:
            raise BenchError("--long-prompt must be between 0 and 16384 tokens")


@dataclass
class Setup:
    """Results of one setup (baseline, swarm at 0 ms, swarm with delay) per batch size."""

    name: str
    rows: dict[int, dict] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def _say(msg: str) -> None:
    sys.stderr.write(f"[molink bench] {msg}\n")
    sys.stderr.flush()


def spans_for(num_layers: int, o: BenchOptions) -> list[tuple[int, int]]:
    from molinkd.spans import even_split

    if o.spans is None:
        return [(s.start, s.end) for s in even_split(num_layers, o.stages)]
    spans = list(o.spans)
    if spans[0][0] != 0 or spans[-1][1] != num_layers or any(a[1] != b[0] for a, b in zip(spans, spans[1:])) \
            or any(e <= s for s, e in spans):
        raise BenchError(f"--spans {','.join(f'{s}:{e}' for s, e in spans)} must tile layers 0:{num_layers}")
    return spans


def _common_args(o: BenchOptions) -> list[str]:
    args = ["--max-num-seqs", str(max(32, max(o.batches)))]
    if o.long_prompt:  # room for the long prompt (its token count is approximate) and its answer
        args += ["--max-model-len", str(max(2048, -(-(o.long_prompt + 128) // 256) * 256))]
    if o.model:
        args += ["--model", o.model]
    return args


async def _measure(client: httpx.AsyncClient, d: DaemonProc, o: BenchOptions, setup: Setup) -> None:
    await run_batch(d.url, 1, 4, o.prompt_len)  # warm-up (first-request costs stay out of the numbers)
    for b in o.batches:
        res: BatchResult = await run_batch(d.url, b, o.max_tokens, o.prompt_len)
        row = setup.rows[b] = res.summary()
        _say(f"{setup.name:14s} batch {b:3d}: {res.tok_s:8.1f} tok/s  ttft p50 {row['ttft_ms_p50']} ms"
             f"  tpot p50 {row['tpot_ms_p50']} ms  gap p99 {row['gap_ms_p99']} ms")
        if o.long_prompt:
            disturbed = (await run_batch(d.url, b, o.max_tokens, o.prompt_len, long_prompt=o.long_prompt)).summary()
            row.update({k: v for k, v in disturbed.items() if k.startswith("long_")})
            row["long_gap_vs_gap"] = _ratio(row.get("long_gap_ms_p99"), row["gap_ms_p99"])
            _say(f"{setup.name:14s} batch {b:3d} + a {row.get('long_prompt_tokens')}-token prompt: decode gap p99 "
                 f"{row.get('long_gap_ms_p99')} ms (max {row.get('long_gap_ms_max')}, x{row['long_gap_vs_gap']} "
                 f"undisturbed), its ttft {row.get('long_ttft_ms')} ms")


async def run_baseline(client: httpx.AsyncClient, procs: Procs, o: BenchOptions, cores: list[int]) -> Setup:
    setup = Setup("single node")
    d = procs.start_daemon("single", ["--layers", "all", *_common_args(o)], cores)
    try:
        _say(f"single node on cores {cores}: loading...")
        await wait_status(client, d, lambda st: (st.get("engine") or {}).get("state") == "ready",
                          "ready engine", ready_timeout())
        await _measure(client, d, o, setup)
    finally:
        procs.stop(d)
    return setup


async def _rtt_to(client: httpx.AsyncClient, d: DaemonProc, peer: str) -> float | None:
    st = await get_status(client, d)
    for p in st.get("peers") or []:
        if p.get("peer_id") == peer:
            return p.get("rtt_ms")
    return None


async def check_links(client: httpx.AsyncClient, peers: list[DaemonProc], o: BenchOptions, timeout: float = 40.0) -> list[float]:
    """Wait until each stage sees its successor at (at least 80% of) the asked RTT: proof that
    their connection crosses the emulated link. Returns the RTTs seen (ms)."""
    seen: list[float] = []
    for a, b in zip(peers, peers[1:]):
        want = o.rtt_ms * 0.8
        deadline = trio.current_time() + timeout
        rtt = None
        while trio.current_time() < deadline:
            rtt = await _rtt_to(client, a, b.peer_id or "")
            if rtt is not None and rtt >= want:
                break
            await trio.sleep(1.0)
        else:
            raise BenchError(f"{a.name} sees {b.name} at {rtt} ms RTT, not ~{o.rtt_ms} ms: their connection does not "
                             "cross the emulated link (a direct address was used?)")
        seen.append(rtt)
    return seen


@contextlib.asynccontextmanager
async def swarm(client: httpx.AsyncClient, procs: Procs, o: BenchOptions, cores: list[list[int]],
                num_layers: int) -> AsyncIterator[tuple[list[DaemonProc], list[WanLink]]]:
    """Start the N-stage swarm (links at 0 ms), wait until its head serves, yield (peers head
    first, links); stop every daemon and link on the way out."""
    from molinkd.bench.procs import free_port

    spans = spans_for(num_layers, o)
    links: list[WanLink] = []
    peers: list[DaemonProc] = []
    env = {"MOLINK_PIPELINE_DEPTH": str(o.depth)} if o.depth else {}
    async with trio.open_nursery() as nursery:
        try:
            # identities first, so that every peer starts at once bootstrapping to its successor
            # (through the link in front of it, if any)
            ids = [procs.make_identity(f"stage{i}") for i in range(o.stages)]
            ports = [free_port() for _ in range(o.stages)]
            via: list[str | None] = [None] * o.stages
            for i in range(1, o.stages):
                addr = f"/ip4/127.0.0.1/tcp/{ports[i]}"
                if o.linked:  # the link in front of this peer, announced as its address
                    link = WanLink(("127.0.0.1", ports[i]))
                    await nursery.start(link.run)
                    links.append(link)
                    addr = link.address
                via[i] = addr
            for i in reversed(range(o.stages)):  # the last stage first: it has nobody to wait for
                s, e = spans[i]
                args = ["--layers", f"{s}:{e}", *_common_args(o)]
                if i > 0 and o.linked:
                    args += ["--announce", via[i]]
                if i + 1 < o.stages:
                    args += ["--bootstrap", f"{via[i + 1]}/p2p/{ids[i + 1]}"]
                d = procs.start_daemon(f"stage{i}", args, cores[i], env if i == 0 else None, listen_port=ports[i])
                d.peer_id = ids[i]
                peers.insert(0, d)
                _say(f"stage {i} layers {s}:{e} on cores {cores[i]}: peer {d.peer_id[:16]}"
                     + (f" behind link :{links[i - 1].port}" if i > 0 and o.linked else ""))
            _say("loading the swarm...")
            for d in peers[1:]:
                await wait_status(client, d, lambda st: bool(st.get("ready")), "ready stage", ready_timeout())
            await wait_status(client, peers[0], lambda st: (st.get("engine") or {}).get("state") == "ready",
                              "ready pipeline engine", ready_timeout())
            yield peers, links
        finally:
            # the links keep forwarding while the daemons stop: a stage drains until it sees its
            # head leave, and it sees that only through its link (a frozen link made it wait 25 s)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(procs.stop_all)
            nursery.cancel_scope.cancel()


async def run_swarm(client: httpx.AsyncClient, procs: Procs, o: BenchOptions, cores: list[list[int]],
                    num_layers: int) -> list[Setup]:
    """Measure the swarm at 0 ms, then (with a link) with the asked delay and rate."""
    async with swarm(client, procs, o, cores, num_layers) as (peers, links):
        head = peers[0]
        plain = Setup(f"swarm {o.stages}x" + (" 0 ms" if o.linked else ""))
        await _measure(client, head, o, plain)
        plain.info = await _pipeline_info(client, head)
        plain.info["spans"] = spans_for(num_layers, o)
        out = [plain]
        if o.linked:
            bytes_before = [lk.bytes_forwarded for lk in links]
            for lk in links:
                lk.set(rtt_ms=o.rtt_ms, rate_mbit=o.rate_mbit)
            seen = await check_links(client, peers, o) if o.rtt_ms > 0 else []
            delayed = Setup(f"swarm {o.stages}x {o.rtt_ms:g} ms" + (f" {o.rate_mbit:g} Mbit" if o.rate_mbit else ""))
            await _measure(client, head, o, delayed)
            delayed.info = await _pipeline_info(client, head)
            delayed.info["link_rtt_ms_seen"] = seen
            delayed.info["link_bytes"] = [lk.bytes_forwarded - b for lk, b in zip(links, bytes_before)]
            if min(delayed.info["link_bytes"]) <= 0:
                raise BenchError("no bytes crossed an emulated link during the measurement: "
                                 "the stages talk to each other some other way")
            out.append(delayed)
        return out


async def _pipeline_info(client: httpx.AsyncClient, head: DaemonProc) -> dict:
    st = await get_status(client, head)
    pipe = st.get("pipeline") or {}
    return {"inflight_batches": pipe.get("depth"), "inflight_max": pipe.get("inflight_max"),
            "round_trip_ms": pipe.get("round_trip_ms"),
            "stage_ms": [s.get("step_ms") for s in st.get("stages") or []]}


def report(o: BenchOptions, base: Setup | None, swarm: list[Setup]) -> dict:
    """The result as one dict: per-batch rows and the last batch's figures at the top level."""
    plain = swarm[0]
    delayed = swarm[1] if len(swarm) > 1 else None
    main = delayed or plain
    rows = []
    for b in o.batches:
        r = {"batch": b,
             "baseline_tok_s": base.rows[b]["tok_s"] if base else None,
             "swarm_tok_s": main.rows[b]["tok_s"],
             "swarm_nodelay_tok_s": plain.rows[b]["tok_s"],
             "ttft_ms_p50": main.rows[b]["ttft_ms_p50"],
             "tpot_ms_p50": main.rows[b]["tpot_ms_p50"],
             "gap_ms_p99": main.rows[b]["gap_ms_p99"],
             "nodelay_ttft_ms_p50": plain.rows[b]["ttft_ms_p50"],
             "nodelay_tpot_ms_p50": plain.rows[b]["tpot_ms_p50"],
             "baseline_ttft_ms_p50": base.rows[b]["ttft_ms_p50"] if base else None,
             "baseline_tpot_ms_p50": base.rows[b]["tpot_ms_p50"] if base else None,
             "prompt_tokens": main.rows[b]["prompt_tokens"]}
        if o.long_prompt:
            for key in ("long_prompt_tokens", "long_ttft_ms", "long_gap_ms_p99", "long_gap_ms_max", "long_gap_vs_gap"):
                r[key] = main.rows[b].get(key)
                if base:
                    r["baseline_" + key] = base.rows[b].get(key)
        r["swarm_vs_baseline"] = _ratio(r["swarm_nodelay_tok_s"], r["baseline_tok_s"])
        r["delay_vs_nodelay"] = _ratio(r["swarm_tok_s"], r["swarm_nodelay_tok_s"]) if delayed else None
        rows.append(r)
    out = dict(rows[-1])
    out.update({
        "stages": o.stages, "rtt_ms": o.rtt_ms, "rate_mbit": o.rate_mbit, "cores_per_peer": o.cores_per_peer,
        "max_tokens": o.max_tokens, "prompt_len": o.prompt_len, "batches": list(o.batches), "long_prompt": o.long_prompt,
        "inflight_batches": main.info.get("inflight_batches"), "inflight_max": main.info.get("inflight_max"),
        "round_trip_ms": main.info.get("round_trip_ms"), "stage_ms": main.info.get("stage_ms"),
        "nodelay_round_trip_ms": plain.info.get("round_trip_ms"), "nodelay_stage_ms": plain.info.get("stage_ms"),
        "link_rtt_ms_seen": main.info.get("link_rtt_ms_seen"), "rows": rows,
        "spans": _spans_text(plain.info.get("spans")),
        "suggested_spans": suggested_spans(plain.info.get("spans"), plain.info.get("stage_ms")),
    })
    return out


def suggested_spans(spans: list[tuple[int, int]] | None, stage_ms: list | None) -> str | None:
    """Spans that would even out the stage step times measured without delay (at the last batch
    size), as ``--spans`` takes them; None if a stage's time is missing."""
    from molinkd.spans import SpanError, balanced_split

    if not spans or not stage_ms or len(stage_ms) != len(spans):
        return None
    try:
        return _spans_text([(x.start, x.end) for x in balanced_split(spans, [float(t or 0) for t in stage_ms])])
    except SpanError:
        return None


def _spans_text(spans: list[tuple[int, int]] | None) -> str | None:
    return ",".join(f"{s}:{e}" for s, e in spans) if spans else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def render_table(res: dict) -> str:
    delayed = res["rtt_ms"] or res["rate_mbit"]
    link = f"{res['rtt_ms']:g} ms" + (f", {res['rate_mbit']:g} Mbit/s" if res["rate_mbit"] else "")
    hdr = ["batch", "single tok/s", f"{res['stages']}-stage tok/s", "x single"]
    if delayed:
        hdr += [f"{link} tok/s", "x 0 ms"]
    hdr += ["TTFT p50 ms", "TPOT p50 ms"]
    if res.get("long_prompt"):
        hdr += [f"gap p99 ms with a {res['long_prompt']}-token prompt"]
    lines = [" | ".join(hdr)]
    for r in res["rows"]:
        cells = [str(r["batch"]), _f(r["baseline_tok_s"]), _f(r["swarm_nodelay_tok_s"]), _f(r["swarm_vs_baseline"], 2)]
        if delayed:
            cells += [_f(r["swarm_tok_s"]), _f(r["delay_vs_nodelay"], 2)]
        cells += [_f(r["ttft_ms_p50"]), _f(r["tpot_ms_p50"])]
        if res.get("long_prompt"):
            cells += [f"{_f(r.get('long_gap_ms_p99'))} (x{_f(r.get('long_gap_vs_gap'), 2)})"]
        lines.append(" | ".join(cells))
    lines.append(f"cores per peer {res['cores_per_peer']}, {res['max_tokens']} new tokens, ~{res['prompt_len']}-token "
                 f"prompts, pipeline depth {res['inflight_batches']} (max in flight seen {res['inflight_max']})"
                 + (f", link RTT seen {res['link_rtt_ms_seen']} ms" if res.get("link_rtt_ms_seen") else ""))
    if res.get("suggested_spans") and res["suggested_spans"] != res.get("spans"):
        lines.append(f"stage steps {res.get('nodelay_stage_ms')} ms with spans {res['spans']} (no delay): "
                     f"--spans {res['suggested_spans']} would even them out")
    return "\n".join(lines)


def _f(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


class Interrupted(Exception):
    pass


async def _bench(o: BenchOptions, workdir: Path) -> dict:
    from molinkd.model import load_model_info

    model = await trio.to_thread.run_sync(load_model_info, o.model)
    avail = sorted(os.sched_getaffinity(0))
    cores = plan_cores(o.stages, o.cores_per_peer, avail)
    procs = Procs(workdir)
    async with trio.open_nursery() as top:
        async def on_signals(task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as sigs:
                task_status.started()
                async for s in sigs:
                    _say(f"received {signal.Signals(s).name}; stopping every daemon")
                    raise Interrupted(signal.Signals(s).name)

        await top.start(on_signals)  # before the first daemon starts
        try:
            async with httpx.AsyncClient() as client:
                # the baseline first, alone (loading it alongside the swarm hung a run once under
                # heavy load: the swarm never became ready), then the swarm
                base = None if o.skip_baseline else await run_baseline(client, procs, o, cores[0])
                measured = await run_swarm(client, procs, o, cores, model.num_layers)
        finally:
            procs.stop_all()
        top.cancel_scope.cancel()
    return report(o, base, measured)


def run(o: BenchOptions, *, as_json: bool = False) -> int:
    """Entry point of ``molink bench``: 0 on success, 1 on a benchmark error, 130 interrupted."""
    import json

    try:
        o.validate()
        ready_timeout()
    except (BenchError, ValueError) as e:
        sys.stderr.write(f"molink bench: {e}\n")
        return 2
    with tempfile.TemporaryDirectory(prefix="molink-bench-") as tmp:
        try:
            res = trio.run(_bench, o, Path(tmp))
        except BaseException as e:  # noqa: BLE001 - top level
            inner = e
            while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
                inner = inner.exceptions[0]
            if isinstance(inner, (KeyboardInterrupt, Interrupted)):
                sys.stderr.write("molink bench: interrupted; every daemon was stopped\n")
                return 130
            if isinstance(inner, (BenchError, LoadError, OSError, httpx.HTTPError)):
                sys.stderr.write(f"molink bench: {inner}\n")
                return 1
            raise
    if as_json:
        print(json.dumps(res), flush=True)
    else:
        print(render_table(res), flush=True)
    return 0
