"""``molink``: the operator's client. ``molink status [--api URL] [--json | --watch]`` shows the swarm;
``molink wait [--api URL] [--timeout S]`` blocks until the peer would serve a request; ``molink bench``
measures a swarm against a single node on this machine (molinkd/bench)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

from molinkd.config import DEFAULT_HTTP
from p2p.records import runs


def _fetch(api: str, path: str, api_key: str | None, timeout: float) -> dict:
    req = urllib.request.Request(api.rstrip("/") + path)
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


def _short(pid: str | None) -> str:
    if not pid:
        return "-"
    return pid if len(pid) <= 14 else f"{pid[:6]}..{pid[-6:]}"


def _coverage_line(total: int, spans: list[tuple[int, int]]) -> str:
    """``[0,30): ██████████░░░░ gaps: 20-29`` (one cell per layer, up to 60 cells)."""
    covered = [False] * total
    for s, e in spans:
        for i in range(max(0, s), min(total, e)):
            covered[i] = True
    gaps = [f"{s}-{e - 1}" if e - 1 > s else f"{s}" for s, e in runs(covered, lambda c: not c)]
    cells = "".join("#" if c else "." for c in covered) if total <= 60 else ""
    tail = "complete" if not gaps else "GAPS at layers " + ", ".join(gaps)
    return f"coverage [0,{total}): {cells} {tail}".replace("  ", " ")


def render(st: dict) -> str:
    lines = []
    model = st.get("model") or {}
    lay = st.get("layers") or [0, 0]
    lines.append(f"peer     {st.get('peer_id') or '-'}")
    lines.append(f"model    {model.get('name')} (hash {str(model.get('hash', ''))[:16]}, {model.get('num_layers')} layers)")
    lines.append(f"layers   {lay[0]}:{lay[1]}   engine: {(st.get('engine') or {}).get('state', '-')}"
                 f"   active requests: {st.get('active_requests', 0)}   throughput: {st.get('throughput', 0)} tok/s"
                 + (f"   resumed: {st['resumed_requests']}" if st.get("resumed_requests") else ""))
    rd = st.get("readiness")
    if rd:
        lines.append("ready    " + ("yes" if rd.get("ready") else f"no: {rd.get('reason')}"))
    for a in st.get("addrs") or []:
        lines.append(f"addr     {a}")
    for b in st.get("bootstrap") or []:
        state = "connected" if b.get("connected") else f"unreachable ({b.get('last_error') or 'retrying'})"
        lines.append(f"bootstrap {b.get('addr')}: {state}")
    route = st.get("route")
    if route:
        lines.append("route    " + " -> ".join(_short(p) for p in route))
        for s in st.get("stages") or []:
            step = s.get("step_ms")
            lines.append(f"  stage {_short(s.get('peer'))} layers {s.get('start')}:{s.get('end')}"
                         + (f"  step {step:.1f} ms" if isinstance(step, (int, float)) else ""))
    elif st.get("route_error"):
        lines.append(f"route    none yet: {st['route_error']}")
    nat = st.get("nat") or {}
    if nat:
        hp = nat.get("hole_punch") or {}
        lines.append(f"nat      reachability {nat.get('reachability')}"
                     + (f", relays {', '.join(_short(r) for r in nat.get('reservations') or {})}"
                        if nat.get("reservations") else "")
                     + (f", hole punches {hp.get('upgrades', 0)}/{hp.get('attempts')}" if hp.get("attempts") else ""))
    for p, b in (st.get("banned") or {}).items():
        lines.append(f"banned   {_short(p)} for {b.get('for_s')}s: {b.get('reason')}")
    peers = st.get("peers") or []
    lines.append("")
    hdr = f"{'PEER':16} {'SPAN':8} {'LOAD':>5} {'TOK/S':>7} {'RTT ms':>7} {'SEEN':>6}  ADDRS"
    lines.append(hdr)
    now = time.time()
    spans = []
    for p in peers:
        s, e = p.get("layers") or [p.get("span_start", 0), p.get("span_end", 0)]
        spans.append((s, e))
        rtt = p.get("rtt_ms")
        seen = p.get("last_seen")
        seen_s = f"{max(0, now - seen):.0f}s" if isinstance(seen, (int, float)) else "-"
        me = " (me)" if p.get("peer_id") == st.get("peer_id") else ""
        addrs = ", ".join((p.get("addrs") or [])[:2])
        lines.append(f"{_short(p.get('peer_id')) + me:16} {f'{s}:{e}':8} {p.get('active_requests', 0):>5} "
                     f"{p.get('throughput', 0):>7.1f} {('-' if rtt is None else f'{rtt:.1f}'):>7} {seen_s:>6}  {addrs}")
    total = model.get("num_layers") or 0
    if total:
        if not peers:
            spans.append(tuple(lay))
        lines.append("")
        lines.append(_coverage_line(total, spans))
    return "\n".join(lines)


def wait_ready(api: str, timeout: float, *, interval: float = 0.5, say=None) -> tuple[bool, str]:
    """Poll ``GET /ready`` until it answers 200 or ``timeout`` seconds pass: (ready, last reason).
    ``say(reason)`` hears each new reason."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            with urllib.request.urlopen(api.rstrip("/") + "/ready", timeout=min(5.0, max(0.5, timeout))) as r:
                return True, json.loads(r.read().decode()).get("reason", "ready")
        except urllib.error.HTTPError as e:
            try:
                reason = json.loads(e.read().decode()).get("reason") or f"HTTP {e.code}"
            except ValueError:
                reason = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = f"cannot reach {api}: {getattr(e, 'reason', e)}"
        if reason != last and say is not None:
            say(reason)
        last = reason
        left = deadline - time.monotonic()
        if left <= 0:
            return False, last
        time.sleep(min(interval, left))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="molink", description="MoLink-p2p client")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    api_default = os.environ.get("MOLINK_API", f"http://{DEFAULT_HTTP}")
    api_help = f"the peer's HTTP API (default http://{DEFAULT_HTTP}, or $MOLINK_API)"
    s = sub.add_parser("status", help="show this peer and the swarm it sees")
    s.add_argument("--api", default=api_default, help=api_help)
    s.add_argument("--json", action="store_true", help="print /status as JSON")
    s.add_argument("--watch", action="store_true", help="a live view, refreshed every second (Ctrl-C quits)")
    s.add_argument("--api-key", default=os.environ.get("MOLINK_API_KEY"))
    s.add_argument("--timeout", type=float, default=5.0)
    w = sub.add_parser("wait", help="wait until the peer would serve a generate request (GET /ready)")
    w.add_argument("--api", default=api_default, help=api_help)
    w.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds (default 600)")
    w.add_argument("--quiet", "-q", action="store_true", help="print nothing while waiting")
    from molinkd.bench.cli import add_parser as add_bench_parser

    add_bench_parser(sub)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "bench":
        from molinkd.bench.cli import run_from_args

        return run_from_args(args)
    if args.command == "wait":
        def say(reason: str) -> None:
            if not args.quiet:
                sys.stderr.write(f"molink: waiting for {args.api}: {reason}\n")

        ok, reason = wait_ready(args.api, args.timeout, say=say)
        if ok:
            if not args.quiet:
                sys.stderr.write(f"molink: {args.api} is ready\n")
            return 0
        sys.stderr.write(f"molink: {args.api} not ready after {args.timeout:g}s: {reason}\n")
        return 1
    if args.watch:
        from cli.watch import watch

        return watch(lambda: _fetch(args.api, "/status", args.api_key, min(args.timeout, 2.0)), args.api)
    try:
        st = _fetch(args.api, "/status", args.api_key, args.timeout)
    except urllib.error.HTTPError as e:
        sys.stderr.write(f"molink: {args.api}/status answered {e.code}: {e.read().decode(errors='replace')[:200]}\n")
        return 1
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        sys.stderr.write(f"molink: cannot reach a daemon at {args.api} ({reason}); is `molinkd join` running? "
                         "Pass --api URL to pick another peer.\n")
        return 1
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        print(render(st))
    return 0


if __name__ == "__main__":
    sys.exit(main())
