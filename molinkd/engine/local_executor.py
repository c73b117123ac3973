"""vLLM's in-process executor, plus the parent watchdog (see :mod:`molinkd.engine.watchdog`).

Passed as ``distributed_executor_backend`` for a peer serving the whole model; it runs inside
vLLM's EngineCore process, which then ends when the daemon dies.
"""

from __future__ import annotations

from vllm.v1.executor.uniproc_executor import UniProcExecutor

from molinkd.engine import info
from molinkd.engine.watchdog import exit_with_parent


class WatchedUniProcExecutor(UniProcExecutor):
    def _init_executor(self) -> None:
        exit_with_parent()
        super()._init_executor()
        info.report_loaded()
