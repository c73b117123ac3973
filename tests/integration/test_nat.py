"""NAT traversal through real NATs built from network namespaces (netns.py).

A public bootstrap peer (it finds out it is public by dial-back and then serves circuit
relay v2) and two peers, each behind its own NAT router. The two NATed peers learn each
other from announcements, open a stream to each other over the relay, and DCUtR upgrades
the connection to a direct one where the NATs allow hole punching:

* port-preserving ("cone") NATs on both sides: relayed first, then direct;
* symmetric NATs (random external port per flow): the relay keeps carrying the traffic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration.netns import lab_unavailable_reason, open_nat_lab

pytestmark = [pytest.mark.slow, pytest.mark.netns]

PEER = str(Path(__file__).with_name("nat_peer.py"))
PORT = 4001

_reason = lab_unavailable_reason()
if _reason:
    pytestmark.append(pytest.mark.skip(reason=f"NAT lab unavailable: {_reason}"))


class Peer:
    """A nat_peer.py process; its JSON lines are collected by a reader thread."""

    def __init__(self, name: str, proc: subprocess.Popen[str], log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log
        self.events: list[dict] = []
        self._cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            with self._cv:
                self.events.append(ev)
                self._cv.notify_all()

    def wait_for(self, ev: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for e in self.events:
                    if e["ev"] == ev:
                        return e
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None and not any(e["ev"] == ev for e in self.events):
                    raise AssertionError(f"{self.name}: no {ev!r} event within {timeout}s; "
                                         f"events={self.events[-10:]} stderr={self.stderr_tail()}")
                self._cv.wait(min(left, 0.5))

    def all(self, ev: str) -> list[dict]:
        with self._cv:
            return [e for e in self.events if e["ev"] == ev]

    def stderr_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"(no log: {e})"


def _run_swarm(kinds: tuple[str, str], logs: Path, settle: float) -> tuple[Peer, Peer, Peer]:
    """Boot a public peer and two NATed peers; each logs (INFO) to a file under ``logs``
    (a file, not a pipe: nobody reads stderr while they run, and a full pipe would block them)."""

    def start(name: str, ns: object, argv: list[str]) -> Peer:
        log = logs / f"{name}.log"
        with open(log, "w") as f:
            proc = lab.popen(ns, [sys.executable, PEER, "--log", "INFO", *argv], stderr=f,  # type: ignore[arg-type]
                             env={**os.environ, "MOLINK_LIBP2P_LOG": "INFO"})
        return Peer(name, proc, log)

    with open_nat_lab(kinds) as lab:  # type: ignore[arg-type]
        boot = start("boot", lab.public, ["--listen", f"/ip4/{lab.public.ip}/tcp/{PORT}", "--lifetime", "120"])
        boot_id = boot.wait_for("up", 30)["id"]
        boot_addr = f"/ip4/{lab.public.ip}/tcp/{PORT}/p2p/{boot_id}"
        nated = [
            start(f"nat{i + 1}", h, ["--listen", f"/ip4/0.0.0.0/tcp/{PORT}", "--bootstrap", boot_addr,
                                     "--expect", "1", "--settle", str(settle), "--lifetime", "100"])
            for i, h in enumerate(lab.hosts)
        ]
        for p in nated:
            p.wait_for("done", 130)
            p.proc.wait(timeout=15)
        return boot, nated[0], nated[1]


def _check_common(boot: Peer, a: Peer, b: Peer) -> tuple[str, str]:
    a_id, b_id, boot_id = a.wait_for("up", 0)["id"], b.wait_for("up", 0)["id"], boot.wait_for("up", 0)["id"]
    # the bootstrap found itself public by dial-back; the NATed peers found themselves private
    assert any(e["value"] == "public" for e in boot.all("reachability")), boot.events[-10:]
    for p in (a, b):
        done = p.wait_for("done", 0)
        assert done["status"]["reachability"] == "private", done
        # a reservation on the bootstrap relay, advertised as a circuit address
        assert any(f"/p2p/{boot_id}/p2p-circuit/p2p/" in x for x in done["status"]["advertised_addrs"]), done
    # each NATed peer is in the other's peer table and answered a stream
    assert b_id in a.wait_for("done", 0)["table"]
    assert a_id in b.wait_for("done", 0)["table"]
    for p, other in ((a, b_id), (b, a_id)):
        streams = [e for e in p.all("stream") if e["peer"] == other]
        assert streams, f"{p.name} never completed a stream to {other}: {p.events[-15:]}"
        # the first stream went over the relay (the NATs block unsolicited direct dials)
        assert streams[0]["kind"] == "relayed", streams
        # a stream still works at the end
        assert p.wait_for("done", 0)["final"][other] in ("direct", "relayed"), p.wait_for("done", 0)
    return a_id, b_id


def test_cone_nats_relay_then_hole_punch(tmp_path: Path) -> None:
    # a peer stops waiting as soon as it is direct; the settle time only bounds a failure
    boot, a, b = _run_swarm(("cone", "cone"), tmp_path, settle=45)
    a_id, b_id = _check_common(boot, a, b)
    for p, other in ((a, b_id), (b, a_id)):
        kinds = [e["kind"] for e in p.all("kind") if e["peer"] == other]
        assert "relayed" in kinds and kinds[-1] == "direct", f"{p.name}: {kinds}\n{p.stderr_tail()}"
        assert p.wait_for("done", 0)["final"][other] == "direct"


def test_symmetric_nats_stay_relayed(tmp_path: Path) -> None:
    boot, a, b = _run_swarm(("symmetric", "symmetric"), tmp_path, settle=12)
    a_id, b_id = _check_common(boot, a, b)
    for p, other in ((a, b_id), (b, a_id)):
        kinds = [e["kind"] for e in p.all("kind") if e["peer"] == other]
        assert "direct" not in kinds, f"{p.name}: hole punching through symmetric NATs? {kinds}"
        assert p.wait_for("done", 0)["final"][other] == "relayed"


def _daemon_status(ns: object, port: int) -> dict:
    """A daemon's /status, asked from inside its namespace (its HTTP API is on that loopback)."""
    code = f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/status', timeout=5).read().decode())"
    r = subprocess.run(ns.argv([sys.executable, "-c", code]), capture_output=True, text=True, timeout=30)  # type: ignore[attr-defined]
    if r.returncode != 0:
        raise OSError(r.stderr[-300:])
    return json.loads(r.stdout)


def test_daemons_behind_cone_nats_reach_each_other(tmp_path: Path) -> None:
    """Real molinkd daemons (gateways: no engine) in the lab: the NATed ones find themselves
    private, hold a reservation on the public bootstrap's relay and advertise its circuit address,
    learn of each other, and measure a round-trip time to each other (over the relay or a
    hole-punched connection)."""
    from tests.helpers import REPO, wait_for

    http = 8000
    with open_nat_lab(("cone", "cone")) as lab:
        def start(name: str, ns: object, args: list[str]) -> subprocess.Popen:
            with open(tmp_path / f"{name}.log", "w") as log:
                return lab.popen(ns, [sys.executable, "-m", "cli.molinkd", "join", "--layers", "none",  # type: ignore[arg-type]
                                      "--http", f"127.0.0.1:{http}", "--identity", str(tmp_path / f"{name}.key"),
                                      *args], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

        def logs() -> str:
            return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-2000:] for p in tmp_path.glob("*.log"))

        start("boot", lab.public, ["--listen", f"/ip4/{lab.public.ip}/tcp/{PORT}"])
        boot_id = wait_for(lambda: _daemon_status(lab.public, http)["peer_id"], 60, "the bootstrap daemon")
        boot = f"/ip4/{lab.public.ip}/tcp/{PORT}/p2p/{boot_id}"
        for i, h in enumerate(lab.hosts):
            start(f"nat{i + 1}", h, ["--listen", f"/ip4/0.0.0.0/tcp/{PORT}", "--bootstrap", boot])
        ids = [wait_for(lambda h=h: _daemon_status(h, http)["peer_id"], 60, "a NATed daemon") for h in lab.hosts]
        try:
            for h, me, other in ((lab.hosts[0], ids[0], ids[1]), (lab.hosts[1], ids[1], ids[0])):
                st = wait_for(lambda h=h: (s := _daemon_status(h, http))["nat"]
                              and s["nat"]["reachability"] == "private"
                              and any(f"/p2p/{boot_id}/p2p-circuit/p2p/{me}" in a for a in s["nat"]["advertised_addrs"])
                              and s, 120, "a private reachability and a relay reservation")
                assert st["bootstrap"][0]["connected"] is True
                rec = wait_for(lambda h=h, other=other: next(
                    (p for p in _daemon_status(h, http)["peers"] if p["peer_id"] == other and p["rtt_ms"] is not None),
                    None), 120, "the other NATed daemon, with a measured round trip")
                assert rec["rtt_ms"] > 0
        except AssertionError as e:
            raise AssertionError(f"{e}\n{logs()}") from None
