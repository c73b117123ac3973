"""Runtime directories: created per daemon, removed on exit, dead daemons' ones swept."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from molinkd import runtime


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MOLINK_RUNTIME_ROOT", str(tmp_path))
    return runtime.runtime_root()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_runtime_dir_is_private_and_removed(root: Path) -> None:
    with runtime.runtime_dir() as d:
        assert d.parent == root and d.name.startswith(f"{os.getpid()}-")
        assert (d / "tmp").is_dir()
        assert root.stat().st_mode & 0o777 == 0o700 and d.stat().st_mode & 0o777 == 0o700
        (d / "stage.log").write_text("x")
    assert not d.exists()


def test_sweep_removes_only_dead_daemons(root: Path) -> None:
    root.mkdir(parents=True)
    dead = root / f"{_dead_pid()}-1700000000"
    recycled = root / f"{os.getpid()}-12345"  # our pid, another start time: a dead daemon's
    foreign = root / "notes"
    for p in (dead, recycled, foreign):
        (p / "tmp").mkdir(parents=True)
    with runtime.runtime_dir() as mine:
        assert sorted(x.name for x in root.iterdir()) == sorted([mine.name, foreign.name])
        # a second daemon starting now must not sweep a running one
        assert runtime.sweep(root) == []
        assert mine.exists()


def test_an_unreaped_daemon_counts_as_dead(root: Path) -> None:
    import psutil

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        proc = psutil.Process(child.pid)
        name = f"{child.pid}-{int(proc.create_time())}"
        deadline = time.monotonic() + 10
        while proc.status() != psutil.STATUS_ZOMBIE:  # exited, not reaped (we never wait for it here)
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert runtime.is_stale(name)
    finally:
        child.wait()


def test_scratch_in_redirects_and_restores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_RPC_BASE_PATH", raising=False)
    before = tempfile.gettempdir()
    (tmp_path / "tmp").mkdir()
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    with runtime.scratch_in(tmp_path):
        assert os.environ["VLLM_RPC_BASE_PATH"] == str(tmp_path / "tmp")
        # torch's compile cache stays shared (outside the per-daemon directory)
        assert not os.environ["TORCHINDUCTOR_CACHE_DIR"].startswith(str(tmp_path))
        assert tempfile.gettempdir() == str(tmp_path / "tmp")
        out = subprocess.run([sys.executable, "-c", "import tempfile; print(tempfile.gettempdir())"],
                             capture_output=True, text=True, check=True).stdout.strip()
        assert out == str(tmp_path / "tmp")  # child processes (engines) inherit it
    assert "VLLM_RPC_BASE_PATH" not in os.environ
    assert tempfile.gettempdir() == before


def test_a_start_time_one_second_off_is_the_same_daemon() -> None:
    """psutil's start time moves with the boot time Linux derives from the clock: a live daemon
    seen one second off by another process must not be swept; a recycled pid (start far off) is."""
    import psutil

    started = int(psutil.Process(os.getpid()).create_time())
    for off in (-1, 0, 1):
        assert not runtime.is_stale(f"{os.getpid()}-{started + off}")
    assert runtime.is_stale(f"{os.getpid()}-{started - 3600}")
