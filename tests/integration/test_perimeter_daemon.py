"""Start-up refusals of real daemons (gateways: no engine, a few seconds each): a second daemon on the
same identity, a runtime root planted by someone else, a bad allow-list; and --allow-peers end to end
(a gateway not on a head's list cannot use it, one on the list can)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from tests.helpers import Daemon, boot_addr, wait_for

pytestmark = pytest.mark.slow


def exits_with(d: Daemon, timeout: float = 60) -> tuple[int, str]:
    d.proc.wait(timeout=timeout)
    code = d.stop()
    return code, d.log_path.read_text(errors="replace")


def test_second_daemon_on_the_same_identity_is_refused(tmp_path: Path) -> None:
    first = Daemon(["--layers", "none"], tmp_path, name="first")
    try:
        wait_for(lambda: first.status()["peer_id"], 60, "the first daemon")
        # the helper gives each daemon its own identity: point the second at the first one's
        second = Daemon(["--layers", "none", "--identity", str(tmp_path / "first.key")], tmp_path, name="second")
        code, out = exits_with(second)
        assert code == 1
        assert f"in use by another molinkd (pid {first.proc.pid})" in out and "--identity" in out, out
        assert first.proc.poll() is None  # the first one keeps running
    finally:
        first.stop()
    # once it stopped, the identity is free again
    again = Daemon(["--layers", "none", "--identity", str(tmp_path / "first.key")], tmp_path, name="again")
    try:
        wait_for(lambda: again.status()["peer_id"], 60, "a daemon on the freed identity")
    finally:
        again.stop()


def test_planted_runtime_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "rt"
    root.mkdir()
    (root / f"molinkd-{os.getuid()}").symlink_to(tmp_path)
    d = Daemon(["--layers", "none"], tmp_path, name="planted", env={"MOLINK_RUNTIME_ROOT": str(root)})
    code, out = exits_with(d)
    assert code == 1 and "is a symlink" in out and "rm " in out, out


def test_bad_allow_list_is_refused(tmp_path: Path) -> None:
    allow = tmp_path / "allow"
    allow.write_text("# ok\nnot-a-peer-id\n")
    d = Daemon(["--layers", "none", "--allow-peers", str(allow)], tmp_path, name="badlist")
    code, out = exits_with(d)
    assert code == 1 and f"{allow}:2" in out and "is not a peer id" in out, out


def test_allow_peers_keeps_strangers_off_a_head(single_node, tmp_path: Path) -> None:
    """The shared head has no allow list; here a gateway with one: only the listed head may connect
    to it, so a stranger gateway's announcements never reach it while the head's do."""
    head_id = single_node.status()["peer_id"]
    boot = boot_addr(single_node)
    allow = tmp_path / "allow"
    allow.write_text(f"{head_id}  # the head\n")
    guarded = Daemon(["--layers", "none", "--bootstrap", boot, "--allow-peers", str(allow)], tmp_path,
                     name="guarded", api_key=single_node.api_key)
    stranger = Daemon(["--layers", "none", "--bootstrap", boot_addr(single_node)], tmp_path, name="stranger",
                      api_key=single_node.api_key)
    try:
        wait_for(lambda: guarded.status()["ready"], 60, "the guarded gateway to find the head")
        stranger_id = wait_for(lambda: stranger.status()["peer_id"], 60, "the stranger's id")
        # the stranger learns of the guarded gateway through the head and dials it: refused every time
        wait_for(lambda: guarded.status()["perimeter"]["refused_connections"] > 0
                 or any(p["peer_id"] == guarded.status()["peer_id"] for p in stranger.status()["peers"]),
                 60, "the stranger to hear of the guarded gateway")
        st = guarded.status()
        assert stranger_id not in {p["peer_id"] for p in st["peers"]}
        # the guarded gateway still serves through the listed head
        r = httpx.post(guarded.url + "/generate", headers=guarded.headers, timeout=120,
                       json={"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
    finally:
        stranger.stop()
        guarded.stop()
