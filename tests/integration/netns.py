"""Network-namespace lab: a public segment and NATed LANs, built and torn down per run.

Topology (all addresses live only inside namespaces this module creates; nothing
is attached to the caller's namespace, so no test traffic can leave the lab)::

    {tag}-pub   bridge "{tag}b" 10.99.0.1/24   <- public peers (bootstrap/relay)
       |-- {tag}-r1  wan 10.99.0.11  | lan 10.99.1.1  --  {tag}-h1  10.99.1.2 (default via .1)
       |-- {tag}-r2  wan 10.99.0.12  | lan 10.99.2.1  --  {tag}-h2  10.99.2.2 (default via .1)

Each router forwards and MASQUERADEs LAN traffic leaving its WAN side:

* ``"cone"``: plain MASQUERADE. Linux keeps the source port when it can and
  conntrack only admits replies from the exact remote endpoint, i.e. a
  port-preserving, port-restricted cone NAT: TCP hole punching works.
* ``"symmetric"``: MASQUERADE ``--random-fully``: every new flow gets a random
  external port, so the port a peer observed through a relay is useless and
  hole punching fails; only a relay can carry traffic.

Routers have no default route: packets to another LAN's private address die at
the first router (as private addresses do on the internet).

Names carry a random per-run tag (``ml`` + 5 hex digits) so parallel runs do not
collide. :func:`open_nat_lab` deletes every namespace it created (and with them
every veth, bridge, iptables rule and process-visible socket) in ``finally``,
also when building the lab fails half-way, and kills processes it started.

Needs root, iproute2 (``ip``) and iptables (Debian package ``iptables``; the
nf_tables backend works).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

NatKind = Literal["cone", "symmetric"]

PUBLIC_NET = "10.99.0"
PUBLIC_IP = f"{PUBLIC_NET}.1"


class LabUnavailable(RuntimeError):
    """The machine cannot build namespaces (not root, or tools missing)."""


def lab_unavailable_reason() -> str | None:
    """Return why the lab cannot be built here, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (run the netns tests as root)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            pkg = "iproute2" if tool == "ip" else "iptables"
            return f"`{tool}` not found (apt-get install {pkg})"
    tag = "mlprobe" + secrets.token_hex(3)
    try:
        _run(["ip", "netns", "add", tag])
    except subprocess.CalledProcessError as exc:
        return f"`ip netns add` failed: {exc.stderr.strip()}"
    try:
        _run(["ip", "netns", "exec", tag, "iptables", "-t", "nat", "-L", "-n"])
    except subprocess.CalledProcessError as exc:
        return f"iptables NAT table unusable in a namespace: {exc.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", tag], capture_output=True)
    return None


def _run(argv: Sequence[str]) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, argv, proc.stdout, proc.stderr)
    return proc.stdout


@dataclass
class Namespace:
    name: str
    ip: str  # the address peers in this namespace listen on

    def argv(self, argv: Sequence[str]) -> list[str]:
        """Wrap ``argv`` so it runs inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str) -> str:
        return _run(self.argv(argv))


@dataclass
class NatLab:
    tag: str
    public: Namespace
    hosts: list[Namespace]  # private hosts, one behind each router
    routers: list[Namespace]
    nat_kinds: list[NatKind]
    _procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def popen(self, ns: Namespace, argv: Sequence[str], **kw: object) -> subprocess.Popen[str]:
        """Start ``argv`` inside ``ns``; the lab kills it on teardown if still running."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        proc = subprocess.Popen(ns.argv(argv), start_new_session=True, **kw)  # type: ignore[call-overload]
        self._procs.append(proc)
        return proc

    def router_wan_ip(self, i: int) -> str:
        return f"{PUBLIC_NET}.{11 + i}"


def _create(lab_names: list[str], name: str) -> Namespace:
    _run(["ip", "netns", "add", name])
    lab_names.append(name)
    ns = Namespace(name, "")
    ns.run("ip", "link", "set", "lo", "up")
    return ns


def _veth(a: Namespace, a_if: str, b: Namespace, b_if: str) -> None:
    # Both ends are created directly inside their namespaces: nothing ever
    # appears in the caller's namespace, so nothing can leak there.
    _run(["ip", "link", "add", a_if, "netns", a.name, "type", "veth",
          "peer", "name", b_if, "netns", b.name])
    a.run("ip", "link", "set", a_if, "up")
    b.run("ip", "link", "set", b_if, "up")


def _build(tag: str, nat_kinds: Sequence[NatKind], names: list[str]) -> NatLab:
    pub = _create(names, f"{tag}-pub")
    pub.ip = PUBLIC_IP
    bridge = f"{tag}b"
    pub.run("ip", "link", "add", bridge, "type", "bridge")
    pub.run("ip", "addr", "add", f"{PUBLIC_IP}/24", "dev", bridge)
    pub.run("ip", "link", "set", bridge, "up")
    routers: list[Namespace] = []
    hosts: list[Namespace] = []
    for i, kind in enumerate(nat_kinds, start=1):
        r = _create(names, f"{tag}-r{i}")
        h = _create(names, f"{tag}-h{i}")
        wan_ip = f"{PUBLIC_NET}.{10 + i}"
        lan = f"10.99.{i}"
        r.ip, h.ip = wan_ip, f"{lan}.2"
        # WAN side: router <-> public bridge
        _veth(r, "wan", pub, f"{tag}p{i}")
        pub.run("ip", "link", "set", f"{tag}p{i}", "master", bridge)
        r.run("ip", "addr", "add", f"{wan_ip}/24", "dev", "wan")
        # LAN side: router <-> private host
        _veth(r, "lan", h, "eth0")
        r.run("ip", "addr", "add", f"{lan}.1/24", "dev", "lan")
        h.run("ip", "addr", "add", f"{lan}.2/24", "dev", "eth0")
        h.run("ip", "route", "add", "default", "via", f"{lan}.1")
        r.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        masq = ["iptables", "-t", "nat", "-A", "POSTROUTING", "-s", f"{lan}.0/24",
                "-o", "wan", "-j", "MASQUERADE"]
        if kind == "symmetric":
            masq.append("--random-fully")
        elif kind != "cone":
            raise ValueError(f"unknown NAT kind {kind!r} (use 'cone' or 'symmetric')")
        r.run(*masq)
        # Only replies (and hole-punched flows, which conntrack sees as
        # replies) may enter the LAN: no port forwarding, as a home router.
        r.run("iptables", "-A", "FORWARD", "-i", "wan", "-o", "lan", "-m", "conntrack",
              "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
        r.run("iptables", "-A", "FORWARD", "-i", "wan", "-o", "lan", "-j", "DROP")
        # Unsolicited packets to the router itself are dropped silently, as
        # home routers do. Without this the kernel answers the first
        # hole-punch SYN with a RST, which aborts the simultaneous open.
        r.run("iptables", "-A", "INPUT", "-i", "wan", "-m", "conntrack",
              "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
        r.run("iptables", "-A", "INPUT", "-i", "wan", "-j", "DROP")
        routers.append(r)
        hosts.append(h)
    return NatLab(tag, pub, hosts, routers, list(nat_kinds))


def _kill_namespace_pids(name: str) -> None:
    try:
        pids = _run(["ip", "netns", "pids", name]).split()
    except Exception:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
            os.kill(int(pid), signal.SIGKILL)


@contextlib.contextmanager
def open_nat_lab(nat_kinds: Sequence[NatKind] = ("cone", "cone"),
                 tag: str | None = None) -> Iterator[NatLab]:
    """Build the lab, yield it, and delete every namespace it made (even on error).

    Raises:
        LabUnavailable: not root or ``ip``/``iptables`` missing.
        subprocess.CalledProcessError: a set-up command failed (partial lab is removed).
    """
    reason = lab_unavailable_reason()
    if reason:
        raise LabUnavailable(reason)
    tag = tag or "ml" + secrets.token_hex(3)[:5]
    names: list[str] = []
    lab: NatLab | None = None
    try:
        lab = _build(tag, nat_kinds, names)
        yield lab
    finally:
        if lab is not None:
            for proc in lab._procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(Exception):
                    proc.communicate(timeout=5)
        for name in reversed(names):
            # processes still inside are ours (started in a namespace we made)
            _kill_namespace_pids(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


# --- self-check: `python tests/integration/netns.py` (root) ----------------------

_ECHO_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(); s.settimeout(10)
print("ready", flush=True)
for _ in range(int(sys.argv[3])):
    c, peer = s.accept(); c.sendall(f"{peer[0]}:{peer[1]}".encode()); c.close()
"""

_CLIENT = r"""
import socket, sys
for port in sys.argv[3:]:
    c = socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    c.bind(("0.0.0.0", int(port))); c.settimeout(3)
    c.connect((sys.argv[1], int(sys.argv[2]))); print(port, c.recv(100).decode(), flush=True)
"""


def self_check() -> None:
    """Show what each NAT kind does to a LAN host's source port."""
    with open_nat_lab(("cone", "symmetric")) as lab:
        print("namespaces:", [n for n in _run(["ip", "netns", "list"]).split() if lab.tag in n])
        srv = lab.popen(lab.public, [sys.executable, "-c", _ECHO_SERVER, PUBLIC_IP, "7000", "4"])
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        for h, kind in zip(lab.hosts, lab.nat_kinds):
            out = h.run(sys.executable, "-c", _CLIENT, PUBLIC_IP, "7000", "40001", "40002")
            print(f"{kind:9} {h.ip}: local port -> seen by public peer as", out.split())
        # a private host cannot reach the other LAN directly (no route)
        try:
            lab.hosts[0].run(sys.executable, "-c", _CLIENT, lab.hosts[1].ip, "7000", "40003")
            print("UNEXPECTED: LAN-to-LAN reachable")
        except subprocess.CalledProcessError as exc:
            print("LAN-to-LAN blocked:", exc.stderr.strip().splitlines()[-1])
        srv.wait(timeout=5)
    left = [n for n in _run(["ip", "netns", "list"]).split() if lab.tag in n]
    print("left after teardown:", left)


if __name__ == "__main__":
    self_check()
