"""``molink status --watch``: a live view of one peer and the swarm it sees (rich), refreshed in
place once a second from the peer's ``/status``.

A peer that stops answering does not end the view: it shows the last answer, greyed, under a red
line saying since when the peer is silent, and keeps asking. Ctrl-C ends it (exit status 0).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from p2p.records import runs

BAR_WIDTH = 30


def _short(pid: str | None) -> str:
    if not pid:
        return "-"
    return pid if len(pid) <= 14 else f"{pid[:6]}..{pid[-6:]}"


def _cells(total: int, width: int) -> list[tuple[int, int]]:
    """Layer ranges drawn by each cell of a bar ``width`` cells wide (one cell per layer if it fits)."""
    width = max(1, min(width, total))
    return [(i * total // width, max((i + 1) * total // width, i * total // width + 1)) for i in range(width)]


def span_bar(total: int, start: int, end: int, width: int = BAR_WIDTH, style: str = "green") -> Text:
    """The span ``[start, end)`` of ``[0, total)`` as a bar: ``█`` where served, ``·`` elsewhere."""
    t = Text()
    for s, e in _cells(total, width):
        t.append("█" if s < end and e > start else "·", style=style if s < end and e > start else "grey35")
    return t


def coverage_bar(total: int, spans: list[tuple[int, int]], width: int = BAR_WIDTH) -> tuple[Text, list[tuple[int, int]]]:
    """All spans together: green where some peer serves every layer of the cell, red ``✗`` on gaps."""
    covered = [False] * total
    for s, e in spans:
        for i in range(max(0, s), min(total, e)):
            covered[i] = True
    t = Text()
    for s, e in _cells(total, width):
        ok = all(covered[s:e])
        t.append("█" if ok else "✗", style="green" if ok else "bold red")
    return t, list(runs(covered, lambda c: not c))


def render_view(st: dict | None, *, api: str, error: str | None = None, silent_since: float | None = None,
                now: float | None = None) -> Group:
    """The whole screen for one ``/status`` answer (``st``; None before the first answer)."""
    now = time.time() if now is None else now
    parts: list[Any] = []
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    if error:
        since = f" for {now - silent_since:.0f}s" if silent_since else ""
        parts.append(Text(f"✗ {api} not answering{since}: {error} — retrying every second", style="bold red"))
    if st is None:
        parts.append(Text(f"waiting for the first answer from {api} ...  {stamp}"))
        return Group(*parts)
    dim = bool(error)
    model = st.get("model") or {}
    total = int(model.get("num_layers") or 0)
    rd = st.get("readiness") or {}
    ready = rd.get("ready", st.get("ready"))
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("peer", f"{st.get('peer_id') or '-'}  ({st.get('role')})")
    head.add_row("model", f"{model.get('name')}  {total} layers  hash {str(model.get('hash', ''))[:12]}")
    head.add_row("ready", Text("yes", style="green") if ready else Text(f"no: {rd.get('reason', '?')}", style="yellow"))
    counters = st.get("counters") or {}
    head.add_row("serving", f"engine {(st.get('engine') or {}).get('state', '-')}   "
                            f"active {st.get('active_requests', 0)}   {st.get('throughput', 0):.1f} tok/s   "
                            f"resumed {st.get('resumed_requests', 0)}   "
                            f"tokens in/out {counters.get('prompt_tokens', 0)}/{counters.get('generation_tokens', 0)}")
    nat = st.get("nat") or {}
    if nat:
        hp = nat.get("hole_punch") or {}
        relays = ", ".join(_short(r) for r in nat.get("reservations") or {}) or "none"
        head.add_row("nat", f"{nat.get('reachability')}   relays {relays}   "
                            f"hole punches {hp.get('upgrades', 0)}/{hp.get('attempts', 0)}"
                            + ("   serving as relay" if nat.get("serving_relay") else ""))
    banned = [f"{_short(p)} ({b.get('remaining_s', 0):.0f}s: {b.get('reason')})"
              for p, b in (st.get("banned") or {}).items() if b.get("active")]
    if banned:
        head.add_row("banned", Text("; ".join(banned), style="red"))
    parts.append(Panel(head, title=f"molink status --watch  {api}", subtitle=stamp, box=box.ROUNDED,
                       style="grey50" if dim else ""))

    peers = st.get("peers") or []
    spans = []
    tbl = Table(box=box.SIMPLE_HEAD, expand=False, style="grey50" if dim else "")
    for col, just in (("PEER", "left"), ("ROLE", "left"), ("SPAN", "left"), (f"LAYERS [0,{total})", "left"),
                      ("ENGINE", "left"), ("LOAD", "right"), ("TOK/S", "right"), ("RTT ms", "right"),
                      ("SEEN", "right")):
        tbl.add_column(col, justify=just, no_wrap=True)
    for p in peers:
        s, e = p.get("layers") or [p.get("span_start", 0), p.get("span_end", 0)]
        if e > s:
            spans.append((s, e))
        ex = p.get("extras") or {}
        me = p.get("peer_id") == st.get("peer_id")
        rtt = p.get("rtt_ms")
        seen = p.get("last_seen")
        tbl.add_row(_short(p.get("peer_id")) + (" (me)" if me else ""), str(ex.get("role") or p.get("role") or "-"),
                    f"{s}:{e}" if e > s else "-",
                    span_bar(total, s, e) if total and e > s else Text("(gateway)", style="grey50"),
                    str(ex.get("engine") or "-"), str(p.get("active_requests", 0)),
                    f"{float(p.get('throughput') or 0):.1f}", "-" if rtt is None else f"{rtt:.1f}",
                    f"{max(0.0, now - seen):.0f}s" if isinstance(seen, (int, float)) else "-")
    if total:
        bar, gaps = coverage_bar(total, spans)
        gap_text = Text("complete", style="green") if not gaps else Text(
            "gaps: " + ", ".join(f"{a}:{b}" for a, b in gaps), style="bold red")
        tbl.add_row(Text("coverage", style="bold"), "", "", bar, gap_text, "", "", "", "")
    parts.append(tbl)

    stages = st.get("stages") or []
    if stages:
        rt = Table(box=box.SIMPLE_HEAD, title="route", title_justify="left", style="grey50" if dim else "")
        for col in ("STAGE", "PEER", "LAYERS", "STEP ms"):
            rt.add_column(col, justify="right" if col == "STEP ms" else "left", no_wrap=True)
        for i, s in enumerate(stages):
            step = s.get("step_ms")
            rt.add_row(str(i), _short(s.get("peer")), f"{s.get('start')}:{s.get('end')}",
                       f"{step:.1f}" if isinstance(step, (int, float)) else "-")
        pipe = st.get("pipeline") or {}
        if isinstance(pipe.get("round_trip_ms"), (int, float)):
            rt.add_row("all", "", "", f"{pipe['round_trip_ms']:.1f}")
        parts.append(rt)
    elif st.get("route_error"):
        parts.append(Text(f"route: none yet: {st['route_error']}", style="yellow"))
    parts.append(Text("Ctrl-C to quit", style="grey50"))
    return Group(*parts)


def watch(fetch: Callable[[], dict], api: str, *, interval: float = 1.0, console: Console | None = None,
          max_frames: int | None = None) -> int:
    """Refresh the view every ``interval`` seconds until Ctrl-C (returns 0)."""
    st: dict | None = None
    error: str | None = None
    silent_since: float | None = None
    frames = 0
    try:
        with Live(render_view(None, api=api), console=console, auto_refresh=False, transient=False) as live:
            while max_frames is None or frames < max_frames:
                t0 = time.monotonic()
                try:
                    st = fetch()
                    error, silent_since = None, None
                except Exception as e:  # noqa: BLE001 - any failure: show it, keep the last answer
                    error = _reason(e)
                    silent_since = silent_since or time.time()
                live.update(render_view(st, api=api, error=error, silent_since=silent_since), refresh=True)
                frames += 1
                time.sleep(max(0.0, interval - (time.monotonic() - t0)))
    except KeyboardInterrupt:
        pass
    return 0


def _reason(e: BaseException) -> str:
    r = getattr(e, "reason", None)
    if r is not None:
        return str(r)
    code = getattr(e, "code", None)
    return f"HTTP {code}" if code else (str(e) or type(e).__name__)
