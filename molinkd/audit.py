"""PURE: spot checks of a head's remote stages ("audits"): which step to check, how to judge it,
and when disagreements add up to a ban. No I/O; the engine side is :mod:`molinkd.engine.audit`.

How an audit works. At ``--audit-rate`` (a fraction of the new requests whose sampling allows a
check, see :func:`auditable`), the head keeps, for a request whose whole prompt is scheduled from
position 0 in one chunk, the rows of the hidden states its own layers computed for it (trusted
input), its prompt and block ids, and then the token the route sampled for it (its first output
token). Off the hot path it asks its daemon for a *verifier route*: other peers serving the remote
layers, none of the route's remote peers, none serving another head. It opens an ordinary session on
it (same wire, same admission), sends one step (that request alone, greedy, asking the logprob of the
route's token) and closes the session. A verifier may guess that a one-step session asking one
token's logprob is an audit; that does not help the stage being audited, which never sees the audit
and cannot know which of its requests will be checked.
:func:`judge` compares; a disagreement blames the route's remote stages the verifier route replaced.

What an audit catches: a stage that returns wrong values (corrupt hidden states, or a last stage
that samples a token the model would not give) on more than a sliver of the requests, including a
stage that lies only sometimes (each audit is an independent draw; the rate sets how fast it is
seen). What it does not catch:

- a liar that only errs within the tolerance (e.g. always picking the second-best token when it is
  close to the best): bf16 kernels differ between CPUs, so an honest stage elsewhere must pass;
- lies on requests that cannot be audited: a prompt that hits the prefix cache or is prefilled in
  several chunks (the verifier would need KV it does not have), sampling changed by a logits
  processor (repetition penalty, logit bias, bad words, allowed tokens, min_tokens, structured
  output), and decode steps (only the first token of a request is checked: a liar that computes
  prefills honestly and corrupts later tokens is not seen);
- sampled requests are checked loosely: the route's token is refused only if an honest sampler
  would draw a token that unlikely less than once in a million audits, which with a 49152-token
  vocabulary at T=1 means about 25 nats below the best (stage outputs corrupted by negating their
  input came out 11 nats below: caught on greedy requests, not on sampled ones);
- nothing at all when no other peer serves the route's remote layers (the two-machine case), or
  while every such peer serves another head (an audit never disturbs another head's stages);
- collusion: a verifier that lies the same way as the stage it checks.

Cost: on the head's step path, a check per new request and, for the one kept, a copy of its rows
(about 10 us per prefill step of 16 requests); the rest runs in a thread. On the verifier, one prefill
of one prompt. An audited request's prompt is also seen by the verifier peers, as by any stage of a
route. A verifier serves the audit's session for a moment: another head that tries to open a session
on it just then is refused as by any busy stage, and routes around it.

Blame: with one remote stage on the route, a disagreement names it exactly; with several, the
verifier route replaced all of them and the blame is the set: no ban, the head moves away from
all of them (``avoid``) and later audits of other routes narrow it down. One lying verifier could
frame an honest stage: a ban needs ``quorum`` disagreements from distinct verifier routes
(``--audit-quorum``, default 2).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

DEFAULT_RATE = 0.05  # of the auditable new requests
DEFAULT_TOLERANCE = 2.0  # nats: an honest stage on another CPU (other bf16 kernels) must pass
DEFAULT_QUORUM = 2  # distinct verifier routes that disagree before a ban
RARE = 13.8  # nats: ln(1e6): sampled audits disagree wrongly less than once in a million
GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: temperatures below it are greedy


def auditable(new_req: Any, num_scheduled: int) -> bool:
    """Whether a request new in this step can be audited: its whole prompt scheduled from position
    0 in one chunk (so this step samples its first token, and its rows depend only on it), token
    ids (no embeddings, no multimodal input, no LoRA), and sampling whose first token the raw
    logprobs judge (no logits processor reshapes them)."""
    prompt = new_req.prompt_token_ids
    if (new_req.num_computed_tokens != 0 or not prompt or num_scheduled != len(prompt)
            or getattr(new_req, "prompt_embeds", None) is not None or new_req.mm_features
            or new_req.lora_request is not None):
        return False
    sp = new_req.sampling_params
    if sp is None:
        return False
    return not (sp.repetition_penalty != 1.0 or sp.logit_bias or sp.allowed_token_ids or sp.bad_words
                or getattr(sp, "_bad_words_token_ids", None) or sp.min_tokens
                or getattr(sp, "structured_outputs", None) is not None)


def rows_of(order: Sequence[str], num_scheduled: Mapping[str, int], req_id: str) -> tuple[int, int]:
    """The rows ``[start, end)`` of ``req_id`` in a step's hidden states: vLLM lays each scheduled
    request's tokens out in the model runner's batch order (``order``, after the step)."""
    pos = 0
    for rid in order:
        n = num_scheduled.get(rid, 0)
        if rid == req_id:
            return pos, pos + n
        pos += n
    raise KeyError(f"request {req_id!r} is not in the batch")


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    agree: bool
    gap: float  # nats: the verifier's best logprob minus that of the route's token
    allowed: float  # nats: the largest gap that agrees
    detail: str


def judge(route_token: int, verifier_token: int, verifier_max: float, route_token_logprob: float, *,
          temperature: float, tolerance: float = DEFAULT_TOLERANCE, candidates: int = 1) -> Verdict:
    """Compare the route's first token with the verifier's computation of the same step.

    ``verifier_token``/``verifier_max``: the verifier's greedy token and its (raw) logprob, the
    best; ``route_token_logprob``: the verifier's raw logprob of the route's token. Greedy requests
    (``temperature`` below :data:`GREEDY_EPS`) agree when the route's token is within ``tolerance``
    nats of the best. A sampled request's token ``t`` had probability at most ``exp(-gap(t) / T)``
    (top-k, top-p and min-p only keep likelier tokens, which cannot lower that bound); among
    ``candidates`` tokens (the vocabulary, or top-k), those with ``(gap - tolerance) / T`` above
    ``ln(candidates) + RARE`` carry at most ``exp(-RARE)`` of the mass together: such a token
    disagrees, and an honest sampler produces one less than once in ``exp(RARE)`` audits."""
    if not math.isfinite(verifier_max) or math.isnan(route_token_logprob):
        raise ValueError(f"the verifier's logprobs are not numbers ({verifier_max}, {route_token_logprob})")
    gap = 0.0 if route_token == verifier_token else max(0.0, verifier_max - route_token_logprob)
    greedy = temperature < GREEDY_EPS
    allowed = tolerance if greedy else tolerance + temperature * (math.log(max(candidates, 1)) + RARE)
    agree = gap <= allowed
    mode = "greedy" if greedy else f"sampled at T={temperature:g}"
    detail = (f"route token {route_token}, verifier's best {verifier_token}: {gap:.2f} nats apart "
              f"({mode}, at most {allowed:.2f} agrees)")
    return Verdict(agree, gap, allowed, detail)


@dataclasses.dataclass
class _Suspect:
    witnesses: dict[tuple[str, ...], float]  # verifier route -> when it disagreed


class AuditLedger:
    """The daemon's memory of disagreements: who was blamed, by which verifier routes.

    ``record_disagreement(blamed, verifiers)`` returns what to do now: ``("ban", peer)`` once an
    exact blame (one peer) has ``quorum`` distinct verifier routes against it, ``("avoid", peers)``
    once an inexact blame (the set of stages one verifier route replaced) has, else ``None``.
    Witnesses older than ``window`` seconds are forgotten; at most ``max_suspects`` are kept."""

    def __init__(self, quorum: int = DEFAULT_QUORUM, window: float = 3600.0, max_suspects: int = 256) -> None:
        if quorum < 1:
            raise ValueError("the audit quorum must be at least 1")
        self.quorum = quorum
        self.window = window
        self.max_suspects = max_suspects
        self._suspects: dict[tuple[str, ...], _Suspect] = {}

    def record_disagreement(self, blamed: Sequence[str], verifiers: Sequence[str],
                            now: float | None = None) -> tuple[str, tuple[str, ...]] | None:
        if not blamed or not verifiers:
            raise ValueError("a disagreement needs the blamed stages and the verifier route")
        if set(blamed) & set(verifiers):
            raise ValueError("a verifier route cannot contain a peer it checks")
        now = time.monotonic() if now is None else now
        key = tuple(sorted(set(blamed)))
        s = self._suspects.get(key)
        if s is None:
            if len(self._suspects) >= self.max_suspects:
                oldest = min(self._suspects, key=lambda k: max(self._suspects[k].witnesses.values(), default=0.0))
                del self._suspects[oldest]
            s = self._suspects[key] = _Suspect({})
        s.witnesses = {w: t for w, t in s.witnesses.items() if now - t < self.window}
        s.witnesses[tuple(verifiers)] = now
        if len(s.witnesses) < self.quorum:
            return None
        del self._suspects[key]
        return ("ban", key) if len(key) == 1 else ("avoid", key)

    def witnesses(self, blamed: Sequence[str]) -> set[str]:
        """Peers of the verifier routes that already disagreed about ``blamed`` (the next audit of
        it should ask others: the same witness twice counts once)."""
        s = self._suspects.get(tuple(sorted(set(blamed))))
        return {p for w in (s.witnesses if s else ()) for p in w}

    def pending(self) -> dict[str, int]:
        """Suspects short of the quorum: ``{"peer[,peer...]": distinct verifier routes}``."""
        return {",".join(k): len(s.witnesses) for k, s in self._suspects.items()}
