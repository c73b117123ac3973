"""The head's spot checks of its remote stages, on the engine side (what to check: :mod:`molinkd.audit`).

:class:`Auditor` belongs to a :class:`~molinkd.engine.head.PipelineExecutor` built with an audit
rate above 0. Its hot-path part is two calls: :meth:`Auditor.consider` (engine thread, after the
head's own layers ran a step: may keep one request's rows of the hidden states) and
:meth:`Auditor.on_result` (reader thread, after that step's result was committed: notes the token
the route sampled). Everything else runs in one background thread, one audit at a time:

1. ask the daemon for a verifier route (``p2p.verifiers {"exclude": the route's remote peers}``
   on the dial socket: the daemon plans and probes as for a real route, never through those peers
   nor through a stage serving another head, and does not take it as the route in use);
2. open an ordinary session on it (:func:`molinkd.engine.failover.open_session`), send one step
   with that request alone (its prompt, block ids and the kept rows; greedy, asking the logprob of
   the route's token), wait for the result, close the session;
3. judge (:func:`molinkd.audit.judge`) and report to the daemon (``p2p.audit``): it counts the
   outcome, keeps the disagreements (:class:`molinkd.audit.AuditLedger`) and answers whom to ban
   (an exact blame at the quorum) or avoid (a set of stages); the executor then fails over away.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import random
import threading
import time
from typing import Any

from molinkd.audit import auditable, judge, rows_of
from molinkd.engine.link import P2P_AUDIT, P2P_AUDIT_OK, P2P_VERIFIERS, recv_within

log = logging.getLogger("molinkd.engine.audit")

RESULT_TIMEOUT = 60.0  # one prefill of one prompt on the verifier route (a loaded CPU: generous)
DIAL_TIMEOUT = 10.0
ROUTE_TIMEOUT = 30.0
STALE_STEPS = 1024  # a kept request whose step got no result this many steps later is dropped


@dataclasses.dataclass
class Capture:
    """What the head kept of one request's first step (its own layers' output is trusted input)."""

    step: int
    req_id: str
    prompt: list[int]
    block_ids: tuple[list[int], ...]
    temperature: float
    top_k: int  # 0: the whole vocabulary
    eos: int | None
    rows: dict[str, Any]  # name -> tensor (prompt tokens, hidden size)


@dataclasses.dataclass
class Job:
    capture: Capture
    token: int  # what the route sampled
    route: list[dict]  # the route that computed it


class Auditor:
    def __init__(self, ex: Any, *, rate: float, tolerance: float, rng: random.Random | None = None) -> None:
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"audit rate {rate}: expected a fraction in (0, 1]")
        self.ex = ex
        self.rate = rate
        self.tolerance = tolerance
        self._rng = rng or random.Random()
        self._pending: Capture | None = None
        self._busy = threading.Event()  # an audit is running: no new capture meanwhile
        self._jobs: queue.Queue[Job] = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None
        self.counts = {"agree": 0, "disagree": 0, "skipped": 0}

    # --- hot path -------------------------------------------------------------------------

    def consider(self, step: int, so: Any, order: list[str], hidden: dict[str, Any] | None) -> None:
        """Engine thread, after the head's worker ran ``so`` (``order``: its batch after it)."""
        if self._pending is not None and step - self._pending.step > STALE_STEPS:
            self._pending = None  # its result never came (the pipeline was rebuilt without it)
        if self._pending is not None or self._busy.is_set() or hidden is None or not so.scheduled_new_reqs:
            return
        nst = so.num_scheduled_tokens
        for nr in so.scheduled_new_reqs:
            if not auditable(nr, nst.get(nr.req_id, 0)) or self._rng.random() >= self.rate:
                continue
            try:
                a, b = rows_of(order, nst, nr.req_id)
            except KeyError:
                return
            sp = nr.sampling_params
            self._pending = Capture(step=step, req_id=nr.req_id, prompt=list(nr.prompt_token_ids),
                                    block_ids=tuple(list(g) for g in nr.block_ids), temperature=float(sp.temperature),
                                    top_k=int(sp.top_k or 0) if (sp.top_k or 0) > 0 else 0,
                                    eos=getattr(sp, "_eos_token_id", None),
                                    rows={k: v[a:b].clone() for k, v in hidden.items()})
            return

    def on_result(self, step: int, out: Any) -> None:
        """Reader thread, once the result of ``step`` was checked and committed."""
        cap = self._pending
        if cap is None or cap.step != step:
            return
        self._pending = None
        idx = out.req_id_to_index.get(cap.req_id)
        toks = out.sampled_token_ids[idx] if idx is not None else []
        if not len(toks):
            return
        self._busy.set()
        try:
            self._jobs.put_nowait(Job(cap, int(toks[0]), [dict(h) for h in self.ex.route]))
        except queue.Full:
            self._busy.clear()
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="molink-audit", daemon=True)
            self._thread.start()

    # --- the audit thread -----------------------------------------------------------------

    def _loop(self) -> None:
        while not self.ex._stop.is_set():
            try:
                job = self._jobs.get(timeout=1.0)
            except queue.Empty:
                continue
            try:
                self._audit(job)
            except Exception as e:  # noqa: BLE001 - an audit must never take the pipeline down
                log.warning("audit failed: %s: %s", type(e).__name__, e)
            finally:
                self._busy.clear()

    def _audit(self, job: Job) -> None:
        from molinkd.engine.failover import RouteUnavailable, SessionFailed, open_session

        remote = [h["peer"] for h in job.route[1:]]
        t0 = time.monotonic()
        try:
            vroute = ask_verifiers(self.ex, remote)
        except (RouteUnavailable, OSError) as e:
            self._report("skipped", remote, [], f"no verifier route: {e}")
            return
        verifiers = [h["peer"] for h in vroute[1:]]
        try:
            link, session, _ = open_session(self.ex, vroute)
        except SessionFailed as e:
            self._report("skipped", remote, verifiers, f"the verifier route refused a session: {e}")
            return
        try:
            lp = self._recompute(link, job)
        except Exception as e:  # noqa: BLE001 - the verifier failed: no verdict on the route
            self._report("skipped", remote, verifiers, f"the verifier route failed: {type(e).__name__}: {e}")
            return
        finally:
            from molinkd.engine import wire

            with contextlib.suppress(Exception):
                link.send(wire.CLOSE, {"session": session}, timeout=5.0)
            link.close()
        v_token, v_max, r_lp = lp
        vocab = int(self.ex.limits.vocab_size)
        top_k = job.capture.top_k
        verdict = judge(job.token, v_token, v_max, r_lp, temperature=job.capture.temperature,
                        tolerance=self.tolerance, candidates=min(top_k, vocab) if top_k > 0 else vocab)
        outcome = "agree" if verdict.agree else "disagree"
        detail = f"{verdict.detail}; {len(job.capture.prompt)}-token prompt, {time.monotonic() - t0:.2f}s"
        answer = self._report(outcome, remote, verifiers, detail)
        if outcome == "disagree":
            self._act(answer, detail)

    def _recompute(self, link: Any, job: Job) -> tuple[int, float, float]:
        """One step on the verifier route: (its greedy token, that token's logprob, the logprob of
        the route's token)."""
        from vllm.sampling_params import SamplingParams
        from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

        from molinkd.engine import schedwire, wire
        from p2p.tensors import to_wire

        cap = job.capture
        sp = SamplingParams(temperature=0.0, max_tokens=1, logprob_token_ids=[job.token])
        sp._eos_token_id = cap.eos
        n = len(cap.prompt)
        so = SchedulerOutput(
            scheduled_new_reqs=[NewRequestData(req_id=cap.req_id, prompt_token_ids=list(cap.prompt), mm_features=[],
                                               sampling_params=sp, pooling_params=None, block_ids=cap.block_ids,
                                               num_computed_tokens=0, lora_request=None)],
            scheduled_cached_reqs=CachedRequestData.make_empty(), num_scheduled_tokens={cap.req_id: n},
            total_num_scheduled_tokens=n, scheduled_spec_decode_tokens={}, scheduled_encoder_inputs={},
            finished_req_ids=set(), free_encoder_mm_hashes=[])
        step = next(self.ex._step_ids)
        link.send(wire.STEP, {"step": step, "sched": schedwire.encode_scheduler_output(so), "grammar": None,
                              "hidden": {k: to_wire(v) for k, v in cap.rows.items()}, "sample": True},
                  timeout=RESULT_TIMEOUT)
        f = recv_within(link, RESULT_TIMEOUT, lambda f: f.type == wire.RESULT and f.get("step") == step,
                        error_type=wire.ERROR)
        if f.type == wire.ERROR:
            raise RuntimeError(f"stage {f.get('stage')}: {str(f.get('message'))[:300]}")
        out = schedwire.decode_model_runner_output(f.get("output"))
        schedwire.check_model_runner_output(out, so, self.ex.limits)
        lp = out.logprobs
        if lp is None or lp.logprob_token_ids.shape[0] < 1 or lp.logprob_token_ids.shape[1] < 2:
            raise ValueError("the result carries no logprob of the route's token")
        ids, vals = lp.logprob_token_ids[0], lp.logprobs[0]
        if int(ids[1]) != job.token or int(ids[0]) != int(out.sampled_token_ids[0][0]):
            raise ValueError("the result's logprobs are for other tokens than asked")
        return int(ids[0]), float(vals[0]), float(vals[1])

    def _report(self, outcome: str, blamed: list[str], verifiers: list[str], detail: str) -> dict:
        self.counts[outcome] += 1
        (log.warning if outcome == "disagree" else log.info)("audit %s: %s", outcome, detail)
        try:
            return report(outcome, blamed, verifiers, detail)
        except Exception as e:  # noqa: BLE001 - no daemon (a local harness): nothing to ban with
            log.info("could not report the audit to the daemon: %s", e)
            return {}

    def _act(self, answer: dict, detail: str) -> None:
        """Leave the liar (``ban``: exact) or the suspects (``avoid``) behind: in-engine failover."""
        ex = self.ex
        on_route = {h["peer"] for h in ex.route[1:]}
        ban = [p for p in answer.get("ban") or () if p in on_route]
        avoid = [p for p in answer.get("avoid") or () if p in on_route]
        if ban:
            ex._lost(f"audit: stage {ban[0][:16]} returned wrong values ({detail})", ban[0])
        elif avoid:
            ex._lost(f"audit: one of {[p[:12] for p in avoid]} returned wrong values ({detail})", avoid=avoid)


# --- the daemon's dial socket ---------------------------------------------------------------


def _ask_daemon(t: str, body: dict, timeout: float) -> Any:
    from molinkd.engine.link import ask_daemon

    return ask_daemon(t, body, timeout, connect_timeout=DIAL_TIMEOUT)


def ask_verifiers(ex: Any, exclude: list[str]) -> list[dict]:
    """A verifier route from the daemon (head first, through none of ``exclude``)."""
    from molinkd.engine.failover import RouteUnavailable, check_route
    from molinkd.engine.link import P2P_ROUTE_OK

    reply = _ask_daemon(P2P_VERIFIERS, {"exclude": sorted(exclude)}, ROUTE_TIMEOUT)
    body = reply.body if isinstance(reply.body, dict) else {}
    if reply.type != P2P_ROUTE_OK:
        raise RouteUnavailable(str(body.get("message") or reply.type)[:500])
    route = body.get("route")
    check_route(route, ex.route[0], ex.num_layers)
    if {h["peer"] for h in route[1:]} & set(exclude):
        raise RouteUnavailable("the daemon's verifier route goes through a stage it should check")
    return route


def report(outcome: str, blamed: list[str], verifiers: list[str], detail: str) -> dict:
    """Tell the daemon an audit's outcome; its answer says whom to ban or avoid."""
    reply = _ask_daemon(P2P_AUDIT, {"outcome": outcome, "blamed": blamed, "verifiers": verifiers,
                                    "detail": detail[:500]}, DIAL_TIMEOUT)
    if reply.type != P2P_AUDIT_OK or not isinstance(reply.body, dict):
        raise OSError(f"the daemon answered {reply.type!r}")
    return reply.body
