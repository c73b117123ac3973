"""Engine processes belong to their daemon: they exit when it dies, even by SIGKILL, and they hear
no signal meant for it.

- vLLM's EngineCore does not watch its parent, and PR_SET_PDEATHSIG is tied to the *thread* that
  forked (trio forks from worker threads that come and go), so a small thread polls the parent pid:
  when the daemon dies the process is re-parented and exits within a second.
- A signal sent to the daemon's process group (Ctrl-C in a terminal, ``kill -TERM -PGID``) would
  stop the engine processes at once, in the middle of the requests the daemon is draining: each
  engine process leaves that group for one of its own, and the daemon stops it after the drain.
  (Under systemd, ``KillMode=mixed`` does the same for the unit's control group: docs/molinkd.service.)
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

_started = False


def bind_to_daemon(interval: float = 1.0) -> None:
    """Call first thing in an engine process the daemon started (EngineCore, a stage process)."""
    global _started
    if _started:
        return
    _started = True
    with contextlib.suppress(OSError):  # already a group leader (started with a group of its own)
        os.setpgid(0, 0)
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="molink-parent-watch", daemon=True).start()
