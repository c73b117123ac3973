"""In-engine failover: the head's executor replaces a lost tail of its route while vLLM keeps running.

When the pipeline link fails (stream reset, ``eng.error``, a step past its deadline), the executor
(:class:`molinkd.engine.head.PipelineExecutor`) keeps the scheduler's futures pending and this
module, in its own thread:

1. asks the daemon for a new tail (``p2p.route`` on the daemon's dial socket: the daemon plans
   around the peers to exclude or avoid, probes the stages and keeps its ``/status`` route);
2. opens a session on it (hello: every stage must hold the agreed KV block count; open);
3. rebuilds the new tail's state from the executor's :class:`~molinkd.engine.mirror.RequestMirror`
   (synthetic steps; the head's stage-0 worker computes their hidden states, then its own batch is
   put back as it was);
4. re-sends, in order, every step sent since the last answered one (the steps "in flight", kept
   verbatim with their hidden states), and lets new steps flow again.

vLLM's scheduler only sees late results. If no route comes within the executor's
``failover_wait``, or the state cannot be rebuilt, the pipeline fails as before (the daemon then
restarts the engine and requests resume elsewhere).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
import uuid
from typing import Any

from molinkd.engine.link import P2P_ROUTE, P2P_ROUTE_OK

log = logging.getLogger("molinkd.engine.failover")

CONNECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 15.0
ROUTE_TIMEOUT = 30.0


@dataclasses.dataclass
class Sent:
    """A step sent down the pipeline and not answered yet (kept to be re-sent)."""

    step: int
    body: dict
    so: Any
    order: list[str]  # the head worker's batch after it ran this step


class RouteUnavailable(RuntimeError):
    """The daemon found no route (the message names the layers nobody serves)."""


class SessionFailed(RuntimeError):
    def __init__(self, message: str, peer: str | None = None) -> None:
        super().__init__(message)
        self.peer = peer


def start_failover(ex: Any, reason: str, culprit: str | None, avoid: list[str], *, detected_at: float) -> None:
    threading.Thread(target=_run, args=(ex, reason, culprit, avoid, detected_at), name="molink-failover",
                     daemon=True).start()


def _run(ex: Any, reason: str, culprit: str | None, avoid_list: list[str], detected_at: float) -> None:
    from molinkd.engine.mirror import NotRebuildable

    t0 = time.monotonic()
    with contextlib.suppress(Exception):
        ex.link.close()
    exclude = {culprit} if culprit else set()
    avoid = set(avoid_list) - exclude
    deadline = t0 + ex.failover_wait
    last_err = reason
    attempts = 0
    while not ex._stop.is_set() and time.monotonic() < deadline:
        attempts += 1
        try:
            route = ask_route(ex, exclude, avoid)
        except RouteUnavailable as e:
            last_err = str(e)
            time.sleep(1.0)
            continue
        except Exception as e:  # the daemon's socket: nothing to route with
            last_err = f"asking the daemon for a route failed: {e}"
            time.sleep(1.0)
            continue
        tail = [h["peer"] for h in route[1:]]
        try:
            link, session, stages = open_session(ex, route)
        except SessionFailed as e:
            last_err = str(e)
            if e.peer:
                exclude.add(e.peer)
            else:
                avoid.update(tail)
            continue
        try:
            took_rebuild = rebuild_and_resend(ex, link, route, session, stages)
        except NotRebuildable as e:
            with contextlib.suppress(Exception):
                link.close()
            ex._fail(f"{reason}; the new route cannot take over the requests in flight ({e})", culprit)
            return
        except Exception as e:
            log.warning("failover onto %s failed: %s", [p[:12] for p in tail], e)
            with contextlib.suppress(Exception):
                link.close()
            last_err = f"{type(e).__name__}: {e}"
            avoid.update(tail)
            continue
        took = time.monotonic() - t0
        ex.step_stats.record_failover({"reason": reason[:300], "culprit": culprit, "route": [h["peer"] for h in route],
                                       "seconds": round(took, 3), "rebuild_s": round(took_rebuild, 3),
                                       "attempts": attempts, "detected_at": detected_at, "time": time.time()})
        log.warning("failed over to %s in %.2fs (%d attempt(s))", " -> ".join(p[:12] for p in tail), took, attempts)
        return
    ex._fail(f"{reason}; no working route within {ex.failover_wait:.0f}s: {last_err}", culprit)


# --- asking the daemon ----------------------------------------------------------------------


def ask_route(ex: Any, exclude: set[str], avoid: set[str]) -> list[dict]:
    """A new route from the daemon (head first, the same head span), avoiding ``avoid`` where it
    can and never using ``exclude``. Raises RouteUnavailable with the daemon's reason."""
    from molinkd.engine.link import ask_daemon

    if not os.environ.get("MOLINK_P2P_DIAL"):
        raise RouteUnavailable("not running under a daemon (MOLINK_P2P_DIAL unset)")
    reply = ask_daemon(P2P_ROUTE, {"exclude": sorted(exclude), "avoid": sorted(avoid)}, ROUTE_TIMEOUT,
                       connect_timeout=CONNECT_TIMEOUT)
    body = reply.body if isinstance(reply.body, dict) else {}
    if reply.type != P2P_ROUTE_OK:
        raise RouteUnavailable(str(body.get("message") or reply.type)[:500])
    route = body.get("route")
    check_route(route, ex.route[0], ex.num_layers)
    return route


def check_route(route: Any, head: dict, num_layers: int) -> None:
    """The daemon's route: a list of hops starting with our own head span, tiling the model, every
    remote hop a ``p2p:`` address of its peer."""
    if not isinstance(route, list) or len(route) < 2:
        raise RouteUnavailable(f"the daemon answered a route of {type(route).__name__} {str(route)[:100]}")
    pos = 0
    for i, h in enumerate(route):
        if not isinstance(h, dict) or not all(isinstance(h.get(k), int) for k in ("start", "end")) \
                or not all(isinstance(h.get(k), str) for k in ("peer", "addr")):
            raise RouteUnavailable(f"route hop {i} is malformed: {str(h)[:100]}")
        if h["start"] != pos or h["end"] <= pos:
            raise RouteUnavailable(f"route hop {i} spans {h['start']}:{h['end']}, expected to start at {pos}")
        if i and h["addr"] != f"p2p:{h['peer']}":
            raise RouteUnavailable(f"route hop {i} has address {h['addr'][:80]!r}")
        pos = h["end"]
    if pos != num_layers:
        raise RouteUnavailable(f"the route ends at layer {pos}, the model has {num_layers}")
    if (route[0]["peer"], route[0]["start"], route[0]["end"]) != (head["peer"], head["start"], head["end"]):
        raise RouteUnavailable("the route does not start with this head")


# --- the new session ------------------------------------------------------------------------


def open_session(ex: Any, route: list[dict]) -> tuple[Any, str, list[dict]]:
    """Connect to ``route[1]``, hello and open a new session with the agreed block count."""
    from molinkd.engine import wire
    from molinkd.engine.link import FramedLink

    first = route[1]
    try:
        link = FramedLink.connect(first["addr"], timeout=CONNECT_TIMEOUT, span=(first["start"], first["end"]))
    except Exception as e:
        raise SessionFailed(f"cannot connect to {first['peer'][:16]}: {e}", first["peer"]) from None
    session = uuid.uuid4().hex
    try:
        body = ex._session_body(0, session=session, route=route)
        link.send(wire.HELLO, body, timeout=HANDSHAKE_TIMEOUT)
        reply = _await(link, wire.HELLO_OK, route)
        try:
            stages = wire.check_hello_ok(reply, route, session=session)["stages"]
        except Exception as e:
            raise SessionFailed(f"bad hello answer on the new route: {e}", first["peer"]) from None
        for st in stages:
            if int(st["max_blocks"]) < ex.num_blocks:
                raise SessionFailed(f"stage {st['peer'][:16]} holds {st['max_blocks']} KV blocks, the engine uses "
                                    f"{ex.num_blocks}", st["peer"])
        link.send(wire.OPEN, ex._session_body(ex.num_blocks, session=session, route=route), timeout=HANDSHAKE_TIMEOUT)
        wire.check_open_ok(_await(link, wire.OPEN_OK, route), session=session, num_blocks=ex.num_blocks)
    except SessionFailed:
        link.close()
        raise
    except Exception as e:
        link.close()
        raise SessionFailed(f"opening a session on the new route failed: {type(e).__name__}: {e}") from None
    return link, session, stages


def _await(link: Any, want: str, route: list[dict]) -> dict:
    from molinkd.engine import wire
    from molinkd.engine.link import LinkTimeout, recv_within

    try:
        f = recv_within(link, HANDSHAKE_TIMEOUT, lambda f: f.type == want, error_type=wire.ERROR)
    except LinkTimeout:
        raise SessionFailed(f"no {want} from the new route within {HANDSHAKE_TIMEOUT:.0f}s") from None
    if f.type == want:
        return f.body
    idx = f.get("stage")
    peer = route[idx]["peer"] if isinstance(idx, int) and 0 < idx < len(route) else route[1]["peer"]
    raise SessionFailed(f"stage {idx} refused the new session: {str(f.get('message'))[:300]}", peer)


# --- rebuilding the tail --------------------------------------------------------------------


def rebuild_and_resend(ex: Any, link: Any, route: list[dict], session: str, stages: list[dict]) -> float:
    """Rebuild the new tail from the mirror, re-send the steps in flight, resume sending; returns
    the seconds the head spent computing the rebuild."""
    from molinkd.engine import schedwire, wire
    from molinkd.engine.mirror import NotRebuildable, rebuild_plan
    from p2p.tensors import to_wire

    sc = ex.vllm_config.scheduler_config
    t0 = time.monotonic()
    bodies: list[tuple[dict, int]] = []  # (step body, scheduled tokens)
    with ex._worker_lock:
        order, computed = ex._head_state
        runner = ex.worker.model_runner
        if getattr(runner, "reorder_batch_threshold", None) is not None:
            # the attention backend reorders the batch by how far each request got; the rebuilt
            # tail (whose requests' prompts include their sampled tokens) would order it otherwise
            raise NotRebuildable("the attention backend reorders the batch")
        head_computed: dict[str, tuple[int, int]] = {}
        for rid in order:
            c = computed[rid]
            rs = runner.requests[rid]
            toks = rs.prompt_token_ids or []
            tok = toks[c - 1] if c - 1 < len(toks) else rs.output_token_ids[c - 1 - len(toks)]
            head_computed[rid] = (c, int(tok))
        with ex._send_lock:
            gone = {rid for e in ex._log for rid in (*e.so.finished_req_ids, *(e.so.preempted_req_ids or ()))}
            plan = rebuild_plan(ex.mirror, max_tokens=sc.max_num_batched_tokens, max_seqs=sc.max_num_seqs,
                                head_order=order, head_computed=head_computed, gone=gone)
        try:
            for rs in plan:
                ex.worker.execute_model(rs.head)
                hidden = ex.worker.mailbox.take_outbox()
                if rs.tail is None:
                    continue
                total = rs.tail.total_num_scheduled_tokens
                bodies.append(({"step": next(ex._step_ids), "sched": schedwire.encode_scheduler_output(rs.tail),
                                "grammar": None, "sample": total > 0,
                                "hidden": None if total == 0 or hidden is None else
                                {k: to_wire(v) for k, v in hidden.items()}}, total))
        except Exception as e:  # the head's own worker is in an unknown state now
            raise NotRebuildable(f"the head's worker failed computing the rebuild: {type(e).__name__}: {e}") from e
    took = time.monotonic() - t0
    with ex._send_lock:
        ex._gen += 1
        gen = ex._gen
        ex._rebuild_steps.clear()
        ex.link = link
        ex.route = route
        ex.session = session
        ex.remote_stages = stages
        ex._route_peers = frozenset(h["peer"] for h in route)
        threading.Thread(target=ex._read_loop, args=(link, gen), name="molink-head-reader", daemon=True).start()
        now = time.monotonic()
        for b, tokens in bodies:
            if b["sample"]:
                ex._rebuild_steps[b["step"]] = tokens
                ex._sent_at[b["step"]] = now
            link.send(wire.STEP, b, timeout=ex.step_timeout)
        for e in list(ex._log):
            link.send(wire.STEP, e.body, timeout=ex.step_timeout)
            if e.body["sample"]:
                ex._sent_at[e.step] = now
        ex._last_result_at = now
        ex._last_send = now
        ex._up = True
        ex._failing_over = False
    log.info("rebuilt %d requests (%d of them finished or preempted by a step in flight) in %d steps "
             "(%.2fs on the head), re-sent %d steps", len(ex.mirror.requests), len(gone & ex.mirror.requests.keys()),
             len(bodies), took, len(ex._log))
    return took
