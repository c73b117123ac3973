"""Per-daemon runtime directory: sockets, stage logs, engine stats and vLLM's scratch files.

Layout: ``<root>/<pid>-<process start time>/`` (mode 0700), where the root is
``$MOLINK_RUNTIME_ROOT/molinkd-<uid>``, else ``$XDG_RUNTIME_DIR/molinkd`` (a per-user directory
the system made), else ``<tmp>/molinkd-<uid>``. In a shared ``/tmp`` another user can create that
name first (a directory of theirs, or a symlink to one) and read or replace our sockets: the root
is refused unless it is a real directory owned by us and closed to group/other
(:func:`check_private_dir`), with the fix in the message. A daemon removes its
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
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


class RuntimeDirError(PermissionError):
    """The runtime directory is not private to this user (the message says how to fix it)."""


def runtime_root() -> Path:
    if os.environ.get("MOLINK_RUNTIME_ROOT"):
        return Path(os.environ["MOLINK_RUNTIME_ROOT"]) / f"molinkd-{os.getuid()}"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "molinkd"
    return Path(tempfile.gettempdir()) / f"molinkd-{os.getuid()}"


def check_private_dir(path: Path) -> None:
    """Raise RuntimeDirError unless ``path`` is a directory (not a symlink) owned by this user and
    not writable by group/other (one only readable by them is closed to mode 0700). Checked with ``lstat``: a symlink planted by someone else is refused,
    not followed."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise RuntimeDirError(f"runtime directory {path} is a symlink (to {os.readlink(path)}); someone could "
                              f"redirect this daemon's sockets. Remove it (rm {path}) or set MOLINK_RUNTIME_ROOT "
                              "to a private directory")
    if not stat.S_ISDIR(st.st_mode):
        raise RuntimeDirError(f"runtime directory {path} is not a directory; remove it or set MOLINK_RUNTIME_ROOT")
    if st.st_uid != os.getuid():
        raise RuntimeDirError(f"runtime directory {path} belongs to uid {st.st_uid}, not to this user "
                              f"({os.getuid()}): another user may have created it to read this daemon's "
                              "sockets. Set MOLINK_RUNTIME_ROOT (or XDG_RUNTIME_DIR) to a directory of your own")
    if st.st_mode & 0o022:
        raise RuntimeDirError(f"runtime directory {path} is writable by other users (mode "
                              f"{stat.S_IMODE(st.st_mode):o}): they could plant files in it. Check its contents, "
                              f"then fix it with: chmod 700 {path}")
    if st.st_mode & 0o077:  # ours, only readable by others: close it (through the fd, no symlink race)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)


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
    """Whether the runtime directory called ``name`` belongs to a daemon that no longer runs.

    The start time is compared within 2 s: psutil derives it from the boot time, which Linux
    recomputes from the clock, so two processes can see the same start one second apart (a live
    daemon's directory was swept that way by a daemon starting next to it)."""
    pid, _, started = name.partition("-")
    if not pid.isdigit():
        return False  # not ours
    tag = _tag(int(pid))
    if tag is None:
        return True
    if not started.isdigit():
        return tag != name
    return abs(int(tag.partition("-")[2]) - int(started)) > 2


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
    """Create this process's runtime directory (after sweeping dead ones); remove it on exit.
    Raises RuntimeDirError if the root is not private to this user."""
    root = runtime_root()
    root.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o700)
    check_private_dir(root)
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
