"""Per-daemon runtime directory: sockets, stage logs, engine stats and vLLM's scratch files.

Layout: ``<tmp>/molinkd-<uid>/<pid>-<process start time>/`` (mode 0700). A daemon removes its
own directory when it stops; one that was SIGKILLed cannot, so every daemon sweeps the
directories of daemons that no longer run when it starts. The process start time in the name
keeps a recycled pid from protecting a dead daemon's directory.

vLLM's own scratch files (its ZMQ IPC sockets and ``vllm_dist_*`` rendezvous files, which it
leaves behind in ``/tmp`` when killed) go to ``<runtime dir>/tmp`` through the environment
(:func:`scratch_env`), so the sweep collects them too.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


def runtime_root() -> Path:
    return Path(os.environ.get("MOLINK_RUNTIME_ROOT") or tempfile.gettempdir()) / f"molinkd-{os.getuid()}"


def _tag(pid: int) -> str | None:
    """``<pid>-<start time>`` of a running process, or None if it does not run."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:  # dead, only not reaped yet
            return None
        return f"{pid}-{int(proc.create_time())}"
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def is_stale(name: str) -> bool:
    """Whether the runtime directory called ``name`` belongs to a daemon that no longer runs."""
    pid, _, _ = name.partition("-")
    if not pid.isdigit():
        return False  # not ours
    return _tag(int(pid)) != name


def sweep(root: Path) -> list[str]:
    """Remove the runtime directories of dead daemons under ``root``; return their names."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for child in root.iterdir():
            if child.is_dir() and is_stale(child.name):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child.name)
    if removed:
        log.info("removed %d runtime directories of daemons that no longer run", len(removed))
    return removed


@contextlib.contextmanager
def runtime_dir() -> Iterator[Path]:
    """Create this process's runtime directory (after sweeping dead ones); remove it on exit."""
    root = runtime_root()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    sweep(root)
    path = root / (_tag(os.getpid()) or str(os.getpid()))
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700)
    (path / "tmp").mkdir(mode=0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def scratch_env(path: Path) -> dict[str, str]:
    """Environment that sends vLLM's scratch files (IPC sockets, rendezvous files) under ``path``.

    torch's compile cache is a cache, not scratch: it stays where it was (shared by restarts)."""
    tmp = str(path / "tmp")
    env = {"TMPDIR": tmp, "VLLM_RPC_BASE_PATH": tmp}
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        try:
            user = getpass.getuser()
        except Exception:  # noqa: BLE001 - no user name (containers): torch's own fallback
            user = str(os.getuid())
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"torchinductor_{user}")
    return env


@contextlib.contextmanager
def scratch_in(path: Path) -> Iterator[None]:
    """Apply :func:`scratch_env` to this process (engines it starts inherit it); undo on exit."""
    env = scratch_env(path)
    saved = {k: os.environ.get(k) for k in env}
    saved_tempdir = tempfile.tempdir
    os.environ.update(env)
    tempfile.tempdir = None  # gettempdir() caches its answer: make it look again
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        tempfile.tempdir = saved_tempdir
