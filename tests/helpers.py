"""Test helpers: free ports, daemons as real subprocesses, bounded waits."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0, headers: dict | None = None) -> dict:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


class Daemon:
    """A real ``molinkd join`` process on loopback; logs go to a file shown on failure."""

    def __init__(self, args: list[str], tmp: Path, name: str = "d", env: dict | None = None,
                 api_key: str | None = None, module: str = "cli.molinkd") -> None:
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.name = name
        self.api_key = api_key
        self.log_path = tmp / f"{name}.log"
        full = [sys.executable, "-m", module, "join", "--http", f"127.0.0.1:{self.http_port}",
                "--identity", str(tmp / f"{name}.key")]
        if not any(a.startswith("--listen") for a in args):
            full += ["--listen", "/ip4/127.0.0.1/tcp/0"]
        if api_key:
            full += ["--api-key", api_key]
        full += args
        e = dict(os.environ)
        e.setdefault("OMP_NUM_THREADS", "1")
        e.update(env or {})
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(full, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=e,
                                     start_new_session=True)

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def status(self) -> dict:
        return get_json(self.url + "/status", headers=self.headers)

    def wait_ready(self, timeout: float = 300.0, *, tolerate_failures: bool = False) -> dict:
        """The daemon's status once it serves; a failed engine raises at once unless
        ``tolerate_failures`` (the daemon restarts it by itself: churn under heavy load)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                st = self.status()
                last = st
                engine_ready = (st.get("engine") or {}).get("state") == "ready"
                # heads and full nodes: their own engine; stages: their stage process; gateways: a head
                if engine_ready if st.get("role") in ("full", "head", None) else st.get("ready"):
                    return st
                if (st.get("engine") or {}).get("state") == "failed" and not tolerate_failures:
                    raise RuntimeError(f"daemon {self.name} engine failed:\n{self.log_tail()}")
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"daemon {self.name} not ready after {timeout}s (last status {last}):\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the daemon drains), SIGKILL after ``timeout``; its engine processes go too."""
        from molinkd.bench.procs import stop_daemons

        if self.proc.poll() is None:
            stop_daemons([self.proc], timeout)
        self._log.close()
        return self.proc.returncode

    def signal_machine(self, sig: int) -> None:
        """``sig`` to the daemon and every process it started, as if its machine crashed (SIGKILL)
        or hung (SIGSTOP, SIGCONT): its engine processes live in process groups of their own."""
        import psutil

        kids: list = []
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
            os.killpg(self.proc.pid, sig)
        except (psutil.Error, ProcessLookupError):
            pass
        for k in kids:
            try:
                k.send_signal(sig)
            except psutil.Error:
                pass

    def kill(self) -> None:
        """SIGKILL, as a crash: the daemon and its engine processes."""
        from molinkd.bench.procs import stop_daemons

        if self.proc.poll() is None:
            stop_daemons([self.proc], 0, signal.SIGKILL)


def wait_for(pred, timeout: float, what: str, step: float = 0.3):
    """Poll ``pred`` until it returns something truthy (that value is returned); bounded in time.
    Connection errors and incomplete status count as "not yet"."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
            if last:
                return last
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last})")


def boot_addr(d: Daemon, timeout: float = 30.0) -> str:
    """The loopback multiaddr (with /p2p/<id>) other daemons can bootstrap from."""
    st = wait_for(lambda: d.status(), timeout, f"{d.name}'s status")
    return next(a for a in st["addrs"] if "/127.0.0.1/" in a)
