"""Tensors on the wire as raw bytes + dtype + shape (no pickle, no torch.save).

``to_wire(t)`` gives ``{"dtype": str, "shape": [int], "data": bytes}``; ``from_wire(d)`` rebuilds a
tensor from it, checking the dtype against an allow-list and the byte count against the shape.
"""

from __future__ import annotations

import math
from typing import Any

from p2p.framing import FrameError

_DTYPES = {
    "bfloat16": 2,
    "float16": 2,
    "float32": 4,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
    "int32": 4,
    "int64": 8,
    "bool": 1,
}
MAX_DIMS = 8
MAX_DIM = 1 << 40  # a larger dimension cannot be backed by a frame anyway


def to_wire(t: Any) -> dict:
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    name = str(t.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype {t.dtype} cannot be sent")
    # bf16 has no numpy dtype: view the storage as bytes
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return {"dtype": name, "shape": list(t.shape), "data": data}


def from_wire(d: Any) -> Any:
    import torch

    if not isinstance(d, dict):
        raise FrameError("tensor must be a map")
    name, shape, data = d.get("dtype"), d.get("shape"), d.get("data")
    if not isinstance(name, str) or name not in _DTYPES:
        raise FrameError(f"tensor dtype {str(name)[:32]!r} not allowed")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_DIM for s in shape)
    ):
        raise FrameError(f"bad tensor shape {str(shape)[:80]}")
    if not isinstance(data, (bytes, bytearray)):
        raise FrameError("tensor data must be bytes")
    expected = math.prod(shape) * _DTYPES[name]
    if len(data) != expected:
        raise FrameError(f"tensor of shape {shape} and dtype {name} needs {expected} bytes, got {len(data)}")
    dtype = getattr(torch, name)
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return buf.view(dtype).reshape(shape)
