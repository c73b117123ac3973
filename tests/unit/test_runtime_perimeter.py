"""The runtime root is refused unless private to this user (symlink, other owner, open mode)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from molinkd import runtime


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MOLINK_RUNTIME_ROOT", str(tmp_path))
    return runtime.runtime_root()


def test_symlinked_root_is_refused(root: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "attacker"
    elsewhere.mkdir(mode=0o700)
    root.symlink_to(elsewhere)
    with pytest.raises(runtime.RuntimeDirError, match=rf"is a symlink .*rm {root}"):
        with runtime.runtime_dir():
            pass
    assert list(elsewhere.iterdir()) == []  # nothing was created through the link


def test_writable_root_is_refused_with_the_fix(root: Path) -> None:
    root.mkdir(mode=0o700)
    root.chmod(0o777)
    with pytest.raises(runtime.RuntimeDirError, match=f"chmod 700 {root}"):
        with runtime.runtime_dir():
            pass
    root.chmod(0o755)  # ours and only readable by others: closed, not refused
    with runtime.runtime_dir() as d:
        assert d.is_dir()
    assert root.stat().st_mode & 0o777 == 0o700


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to create a directory owned by another user")
def test_root_owned_by_another_user_is_refused(root: Path) -> None:
    root.mkdir(mode=0o700)
    os.chown(root, 4242, 4242)
    with pytest.raises(runtime.RuntimeDirError, match="belongs to uid 4242.*MOLINK_RUNTIME_ROOT"):
        with runtime.runtime_dir():
            pass


def test_xdg_runtime_dir_is_preferred(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOLINK_RUNTIME_ROOT", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert runtime.runtime_root() == tmp_path / "molinkd"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))
    assert runtime.runtime_root().name == f"molinkd-{os.getuid()}"
