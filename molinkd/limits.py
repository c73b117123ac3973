"""PURE: every bound on what a peer may send, in one place (no I/O, no vLLM import).

Two kinds of bounds:

- :class:`MsgLimits`: how big and how deep one msgpack frame may be, per protocol. They are
  checked by :func:`p2p.framing.decode_payload` on the raw bytes *before* anything is built, so a
  frame can neither name a huge length nor expand by orders of magnitude when decoded (every
  decoded value's Python size is estimated and must stay within ``max_expansion`` times the
  frame's size, plus ``EXPANSION_SLACK``).
- :class:`SessionLimits`: what an engine session agreed to at open (KV blocks, batch sizes,
  model shape). :mod:`molinkd.engine.schedwire` checks every scheduler output, hidden-state map
  and model-runner output against it before it reaches vLLM.
"""

from __future__ import annotations

import dataclasses
from typing import Any

KiB = 1 << 10
MiB = 1 << 20

# Decoded Python objects may take this many bytes on top of max_expansion * frame size.
EXPANSION_SLACK = 64 * KiB


@dataclasses.dataclass(frozen=True, slots=True)
class MsgLimits:
    """msgpack decoding bounds for one protocol (one frame = one top-level value).

    ``max_elements`` counts every value (containers, map keys, scalars); ``max_depth`` counts
    nested containers (the frame envelope ``{v, t, b}`` is depth 1); ``max_expansion`` bounds
    the estimated size of the decoded objects relative to the frame's bytes.
    """

    name: str
    max_frame: int
    max_bin_len: int
    max_str_len: int
    max_array_len: int
    max_map_len: int
    max_depth: int
    max_elements: int
    max_expansion: float = 16.0

    def __post_init__(self) -> None:
        for f in ("max_frame", "max_bin_len", "max_str_len", "max_array_len", "max_map_len",
                  "max_depth", "max_elements"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MsgLimits.{f} must be a positive int, got {v!r}")
        if not self.max_expansion >= 1:
            raise ValueError("MsgLimits.max_expansion must be >= 1")

    def replace(self, **changes: Any) -> MsgLimits:
        return dataclasses.replace(self, **changes)


# Stage session frames (``/molink/stage/1`` and the engine links): hidden states of a whole
# micro-batch in one bin (tens of MiB), full prompts of the requests a step admits.
STAGE_MSG = MsgLimits(
    name="stage",
    max_frame=64 * MiB,
    max_bin_len=64 * MiB,
    max_str_len=1 * MiB,
    max_array_len=1 << 20,
    max_map_len=1 << 16,
    max_depth=16,
    max_elements=4 << 20,
)

# ``/molink/generate/1``: a forwarded generation request (the HTTP limits: 4 MiB) and the events
# that stream back (a delta: text, token ids, logprobs rows).
GENERATE_MSG = MsgLimits(
    name="generate",
    max_frame=4 * MiB,
    max_bin_len=1,  # nothing in this protocol is raw bytes
    max_str_len=4 * MiB,
    max_array_len=1 << 18,
    max_map_len=1024,
    max_depth=10,
    max_elements=1 << 19,
)

# The events a head streams back on ``/molink/generate/1`` (read by the asker). A client that does
# not stream gets its whole completion in one delta: up to max_model_len tokens, each with up to
# 21 logprob entries [id, logprob, rank, text]. Heads should split such deltas (e.g. 1024 tokens per
# event) so that GENERATE_MSG fits both directions; until then the asker reads with this profile.
GENERATE_REPLY_MSG = GENERATE_MSG.replace(
    name="generate-reply",
    max_frame=32 * MiB,
    max_str_len=16 * MiB,
    max_elements=4 << 20,
)

# Small control exchanges: probes, the daemon's dial socket, dial-back, errors.
CONTROL_MSG = MsgLimits(
    name="control",
    max_frame=64 * KiB,
    max_bin_len=16 * KiB,
    max_str_len=16 * KiB,
    max_array_len=1024,
    max_map_len=256,
    max_depth=8,
    max_elements=8192,
)

# Gossipsub peer records (p2p.records): 64 KiB, a map with a bounded ``extras`` map.
RECORD_MSG = MsgLimits(
    name="record",
    max_frame=64 * KiB,
    max_bin_len=1,  # records carry no raw bytes
    max_str_len=4 * KiB,
    max_array_len=1024,
    max_map_len=1024,
    max_depth=6,
    max_elements=8192,
)

PROFILES = {p.name: p for p in (STAGE_MSG, GENERATE_MSG, GENERATE_REPLY_MSG, CONTROL_MSG, RECORD_MSG)}

# Records: what a peer may put in ``extras`` (no bytes, no ext: str/int/float/bool/None/lists/maps)
RECORD_EXTRAS_MAX_BYTES = 16 * KiB
RECORD_EXTRAS_MAX_DEPTH = 4
# A record's signed ``time`` (sender's wall clock) must be within [now - max_age, now + max_skew]
# on the receiver's wall clock; max_age defaults to 2 * the table's ttl.
RECORD_MAX_FUTURE_SKEW = 60.0
RECORD_MAX_AGE_TTLS = 2.0
# At most this many peers per IP address (taken from the record's addrs) in one table.
RECORD_MAX_PEERS_PER_IP = 64

# Per-step timings list: one [peer, ms] pair per stage of the route.
MAX_ROUTE_LEN = 64


@dataclasses.dataclass(frozen=True, slots=True)
class SessionLimits:
    """The bounds of one engine session (agreed at ``eng.open``); every check runs against it.

    ``kv_groups``: number of KV-cache groups (one block-id list per group per request: 1 for
    Llama-like models). ``hidden_names``: the intermediate tensors a stage receives (LlamaModel's
    ``IntermediateTensors``). ``max_row_padding``: rows a sender may add to a hidden-state tensor
    beyond the scheduled token count (0 on CPU: no CUDA-graph padding). ``max_spec_tokens``:
    speculative tokens per request per step (0: no speculative decoding).
    """

    num_blocks: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    vocab_size: int
    hidden_size: int
    dtype: str
    max_logprobs: int = 20
    kv_groups: int = 1
    hidden_names: tuple[str, ...] = ("hidden_states", "residual")
    max_row_padding: int = 0
    max_spec_tokens: int = 0

    def __post_init__(self) -> None:
        for f in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                  "vocab_size", "hidden_size", "kv_groups"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SessionLimits.{f} must be a positive int, got {v!r}")
        for f in ("max_logprobs", "max_row_padding", "max_spec_tokens"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"SessionLimits.{f} must be a non-negative int, got {v!r}")
        if not isinstance(self.hidden_names, tuple):
            object.__setattr__(self, "hidden_names", tuple(self.hidden_names))

    @property
    def max_blocks_per_req(self) -> int:
        """Blocks one request can hold in one KV-cache group (its whole context)."""
        return -(-self.max_model_len // self.block_size)

    def replace(self, **changes: Any) -> SessionLimits:
        return dataclasses.replace(self, **changes)


_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}


def session_limits(vllm_config: Any, num_blocks: int, **overrides: Any) -> SessionLimits:
    """SessionLimits of an engine built from ``vllm_config`` with ``num_blocks`` KV blocks (read by
    attribute, so this module imports no vLLM)."""
    mc, sc, cc = vllm_config.model_config, vllm_config.scheduler_config, vllm_config.cache_config
    kw: dict[str, Any] = dict(
        num_blocks=num_blocks,
        block_size=cc.block_size,
        max_num_seqs=sc.max_num_seqs,
        max_num_batched_tokens=sc.max_num_batched_tokens,
        max_model_len=mc.max_model_len,
        vocab_size=mc.get_vocab_size(),
        hidden_size=mc.get_hidden_size(),
        dtype=str(mc.dtype).removeprefix("torch."),
        max_logprobs=max(int(getattr(mc, "max_logprobs", 20) or 0), 0),
    )
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is not None:
        kw["max_spec_tokens"] = int(getattr(spec, "num_speculative_tokens", 0) or 0)
    kw.update(overrides)
    return SessionLimits(**kw)


def stage_msg_limits(s: SessionLimits) -> MsgLimits:
    """STAGE_MSG tightened to one session: one bin holds at most one hidden-state tensor of a full
    micro-batch (or a prompt's embeddings, or the grammar bitmask); a frame at most every hidden
    tensor plus a scheduler output carrying every request's whole context."""
    row = s.hidden_size * _DTYPE_BYTES.get(s.dtype, 4)
    tokens = s.max_num_batched_tokens + s.max_row_padding
    bitmask = s.max_num_seqs * (-(-s.vocab_size // 32)) * 4
    max_bin = max(row * max(tokens, s.max_model_len), bitmask, 1 * MiB)
    # a step may carry every request's full prompt and all its tokens (resumed requests)
    ctx_ints = 2 * s.max_num_seqs * s.max_model_len
    frame = row * tokens * max(len(s.hidden_names), 1) + max_bin + 9 * ctx_ints + 4 * MiB
    return STAGE_MSG.replace(
        max_frame=min(frame, STAGE_MSG.max_frame),
        max_bin_len=min(max_bin, STAGE_MSG.max_bin_len),
        max_array_len=min(max(s.max_model_len, s.max_num_seqs, s.max_blocks_per_req, 1024) + 16,
                          STAGE_MSG.max_array_len),
        max_elements=min(ctx_ints + 64 * s.max_num_seqs * (s.max_logprobs + 2) + 65536, STAGE_MSG.max_elements),
    )


__all__ = [
    "CONTROL_MSG",
    "EXPANSION_SLACK",
    "GENERATE_MSG",
    "GENERATE_REPLY_MSG",
    "MAX_ROUTE_LEN",
    "MsgLimits",
    "PROFILES",
    "RECORD_EXTRAS_MAX_BYTES",
    "RECORD_EXTRAS_MAX_DEPTH",
    "RECORD_MAX_AGE_TTLS",
    "RECORD_MAX_FUTURE_SKEW",
    "RECORD_MAX_PEERS_PER_IP",
    "RECORD_MSG",
    "STAGE_MSG",
    "SessionLimits",
    "session_limits",
    "stage_msg_limits",
]
