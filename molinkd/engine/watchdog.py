"""Engine processes belong to their daemon: exit when it dies, even by SIGKILL.

vLLM's EngineCore does not watch its parent, and PR_SET_PDEATHSIG is tied to the *thread* that
forked (trio forks from worker threads that come and go), so a small thread polls the parent pid:
when the daemon dies the process is re-parented and exits within a second.
"""

from __future__ import annotations

import os
import threading
import time

_started = False


def exit_with_parent(interval: float = 1.0) -> None:
    global _started
    if _started:
        return
    _started = True
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="molink-parent-watch", daemon=True).start()
