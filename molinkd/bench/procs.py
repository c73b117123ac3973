"""Daemons the benchmark starts: pinned to their cores, each in its own process group, all
stopped (SIGTERM to the group, SIGKILL after a grace period) by :meth:`Procs.stop_all`, which the
runner calls in ``finally`` blocks, so an interrupted benchmark leaves no process behind."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

import molinkd


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message says what happened and what to do."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plan_cores(peers: int, cores_per_peer: int, available: list[int]) -> list[list[int]]:
    """Give each of ``peers`` its own ``cores_per_peer`` cores out of ``available``."""
    if peers < 1 or cores_per_peer < 1:
        raise BenchError("need at least one peer and one core per peer")
    need = peers * cores_per_peer
    if need > len(available):
        raise BenchError(f"{peers} peers x {cores_per_peer} cores need {need} cores; this process may use "
                         f"{len(available)} ({','.join(map(str, available))}): lower --stages or --cores-per-peer")
    cores = sorted(available)
    return [cores[i * cores_per_peer:(i + 1) * cores_per_peer] for i in range(peers)]


def pinning_env(cores: list[int]) -> dict[str, str]:
    """Environment that keeps vLLM's OpenMP threads on ``cores`` (taskset pins the processes)."""
    return {"OMP_NUM_THREADS": str(len(cores)), "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores))}


def code_root() -> Path:
    """The directory holding the ``molinkd`` and ``cli`` packages the daemons must run."""
    return Path(molinkd.__file__).resolve().parent.parent


@dataclass
class DaemonProc:
    name: str
    proc: subprocess.Popen
    url: str
    log_path: Path
    listen_port: int
    cores: list[int]
    peer_id: str | None = None
    _log: object = field(default=None, repr=False)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class Procs:
    """Every process the benchmark started."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.daemons: list[DaemonProc] = []

    def start_daemon(self, name: str, args: list[str], cores: list[int], env: dict[str, str] | None = None,
                     listen_port: int | None = None) -> DaemonProc:
        listen_port, http_port = listen_port or free_port(), free_port()
        root = code_root()
        cmd = ["taskset", "-c", ",".join(map(str, cores)), sys.executable, "-m", "cli.molinkd", "join",
               "--listen", f"/ip4/127.0.0.1/tcp/{listen_port}", "--http", f"127.0.0.1:{http_port}",
               "--identity", str(self.identity_path(name)), *args]
        e = dict(os.environ)
        e.update(pinning_env(cores))
        e["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [e.get("PYTHONPATH")])])
        e["MOLINK_RUNTIME_ROOT"] = str(self.workdir / "run")
        e.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        e.update(env or {})
        log_path = self.workdir / f"{name}.log"
        logf = open(log_path, "wb")
        try:
            proc = subprocess.Popen(cmd, cwd=root, stdout=logf, stderr=subprocess.STDOUT, env=e,
                                    start_new_session=True, stdin=subprocess.DEVNULL)
        except BaseException:
            logf.close()
            raise
        d = DaemonProc(name, proc, f"http://127.0.0.1:{http_port}", log_path, listen_port, cores, _log=logf)
        self.daemons.append(d)
        return d

    def identity_path(self, name: str) -> Path:
        return self.workdir / f"{name}.key"

    def make_identity(self, name: str) -> str:
        """Create the identity file the daemon ``name`` will use; its peer id."""
        from p2p.host import load_or_create_identity, peer_id_of

        return peer_id_of(load_or_create_identity(self.identity_path(name)))

    def stop(self, d: DaemonProc, grace: float = 25.0) -> None:
        self._stop_many([d], grace)

    def stop_all(self, grace: float = 25.0) -> None:
        self._stop_many(list(self.daemons), grace)

    def _stop_many(self, ds: list[DaemonProc], grace: float) -> None:
        stop_daemons([d.proc for d in ds], grace)
        for d in ds:
            if d._log is not None:
                d._log.close()  # type: ignore[attr-defined]
            if d in self.daemons:
                self.daemons.remove(d)


def stop_daemons(procs: list[subprocess.Popen], grace: float = 25.0, sig: int = signal.SIGTERM) -> None:
    """Stop daemons started in process groups of their own, and every process they started.
    Synchronous and bounded: safe in ``finally`` after a cancellation.

    ``sig`` (SIGTERM: drain) goes to each daemon's process group; what is left after ``grace``
    gets SIGKILL. A daemon's engine processes (vLLM's EngineCore, a stage process) live in groups
    of their own (:mod:`molinkd.engine.watchdog`): the daemon stops them, or they exit within a
    second of its death; any still running after that are killed here."""
    import psutil

    engines = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            engines += psutil.Process(p.pid).children(recursive=True)
    for p in procs:
        _signal_group(p.pid, sig)
    deadline = time.monotonic() + grace
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    for p in procs:
        _signal_group(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)
    _, alive = psutil.wait_procs(engines, timeout=5)
    for e in alive:
        with contextlib.suppress(psutil.Error):
            e.kill()
    psutil.wait_procs(alive, timeout=5)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def get_status(client: httpx.AsyncClient, d: DaemonProc) -> dict:
    r = await client.get(d.url + "/status", timeout=5.0)
    r.raise_for_status()
    return r.json()


async def wait_status(client: httpx.AsyncClient, d: DaemonProc, pred, what: str, timeout: float) -> dict:
    """Poll ``d``'s /status until ``pred(status)``; a daemon that exits or fails ends the wait."""
    deadline = trio.current_time() + timeout
    last: dict | None = None
    while trio.current_time() < deadline:
        if d.proc.poll() is not None:
            raise BenchError(f"daemon {d.name} exited with status {d.proc.returncode} while waiting for {what}:\n"
                             f"{d.log_tail()}")
        try:
            last = await get_status(client, d)
            if (last.get("engine") or {}).get("state") == "failed":
                raise BenchError(f"daemon {d.name}'s engine failed: {(last.get('engine') or {}).get('error')}\n"
                                 f"{d.log_tail()}")
            if pred(last):
                return last
        except (httpx.HTTPError, ValueError):
            pass
        await trio.sleep(0.5)
    raise BenchError(f"daemon {d.name}: no {what} after {timeout:.0f}s (last status: "
                     f"{ {k: (last or {}).get(k) for k in ('role', 'engine', 'ready', 'route_error')} })\n{d.log_tail()}")
