"""Facts an engine process reports to its daemon through a small JSON file ($MOLINK_ENGINE_INFO):
how many bytes of weights it holds (the point of serving a span is holding only its layers)."""

from __future__ import annotations

import json
import os
from typing import Any


def weights_bytes(model: Any) -> int:
    """Bytes of parameters and buffers actually held (layers of other spans are placeholders)."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        total += t.numel() * t.element_size()
    return total


def report(**fields: Any) -> None:
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
