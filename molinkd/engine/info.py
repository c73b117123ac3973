"""Facts an engine process reports to its daemon through a small JSON file ($MOLINK_ENGINE_INFO):
its resident memory right after loading its layers, before the KV cache exists (the point of
serving a span is holding only its layers). Counting parameters does not work on CPU: vLLM repacks
linear weights for oneDNN outside ``parameters()``."""

from __future__ import annotations

import json
import os


def rss_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def report_loaded() -> None:
    """Call right after the model's layers are loaded (before the KV cache is allocated)."""
    try:
        report(loaded_rss_bytes=rss_bytes(), pid=os.getpid())
    except OSError:
        pass


def report(**fields: object) -> None:
    path = os.environ.get("MOLINK_ENGINE_INFO")
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as fh:
            json.dump(fields, fh)
        os.replace(tmp, path)
    except OSError:
        pass
