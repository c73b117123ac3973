"""vLLM's in-process executor, bound to its daemon (see :mod:`molinkd.engine.watchdog`).

Passed as ``distributed_executor_backend`` for a peer serving the whole model; it runs inside
vLLM's EngineCore process, which then ends when the daemon dies and ignores signals sent to the
daemon's process group.
"""

from __future__ import annotations

from vllm.v1.executor.uniproc_executor import UniProcExecutor

from molinkd.engine import info
from molinkd.engine.watchdog import bind_to_daemon


class WatchedUniProcExecutor(UniProcExecutor):
    def _init_executor(self) -> None:
        bind_to_daemon()
        from molinkd.engine import vllm_patches

        vllm_patches.apply()
        super()._init_executor()
        info.report_loaded()
