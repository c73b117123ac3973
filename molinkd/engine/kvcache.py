"""The KV cache size every engine of this peer gets (the daemon's head/full engine and the stage
process alike): ``--kv-cache-gib`` as vLLM's ``kv_cache_memory_bytes``, any fraction of a GiB.
vLLM's legacy ``VLLM_CPU_KVCACHE_SPACE`` (whole GiB only) would override it: the engine processes drop it from their environment before vLLM starts."""

from __future__ import annotations

from typing import Any


def kv_cache_bytes(gib: float) -> int:
    """``--kv-cache-gib`` in bytes (0.25 is 256 MiB)."""
    return int(gib * (1 << 30))


def kv_cache_kwargs(gib: float, *, gpu_memory_utilization: float | None = None) -> dict[str, Any]:
    """vLLM engine arguments sizing the KV cache: ``gpu_memory_utilization`` when one is given
    (GPU), else the explicit byte count on CPU; nothing on other platforms (vLLM's default)."""
    if gpu_memory_utilization:
        return {"gpu_memory_utilization": gpu_memory_utilization}
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return {"kv_cache_memory_bytes": kv_cache_bytes(gib)}
    return {}
