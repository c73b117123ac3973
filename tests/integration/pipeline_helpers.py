"""Start stage processes and run the pipeline driver (shared by the pipeline test and bench)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

DRIVER = Path(__file__).with_name("pipeline_driver.py")
ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env["OMP_NUM_THREADS"] = env.get("MOLINK_TEST_OMP", "1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Stage:
    """A ``python -m molinkd.engine.stage`` subprocess listening on a Unix socket."""

    def __init__(self, model: str, span: str, tmp: Path, *, dtype: str = "bfloat16", extra: list[str] | None = None):
        self.span = span
        tag = span.replace(":", "-")
        self.sock = tmp / f"stage-{tag}.sock"
        self.ready = tmp / f"stage-{tag}.ready"
        self.log = tmp / f"stage-{tag}.log"
        cmd = [
            sys.executable, "-m", "molinkd.engine.stage", "--model", model, "--layers", span,
            "--listen", f"unix:{self.sock}", "--dtype", dtype, "--ready-file", str(self.ready),
            "--max-model-len", "1024", "--max-num-seqs", "32", *(extra or []),
        ]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)

    @property
    def addr(self) -> str:
        return f"unix:{self.sock}"

    def wait_ready(self, timeout: float = 240.0) -> "Stage":
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"stage {self.span} exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"stage {self.span} not ready after {timeout}s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def route_for(spans: list[tuple[int, int]], stages: list[Stage]) -> list[dict]:
    route = [{"peer": "head", "addr": "", "start": spans[0][0], "end": spans[0][1]}]
    for (s, e), st in zip(spans[1:], stages):
        route.append({"peer": f"stage-{s}", "addr": st.addr, "start": s, "end": e})
    return route


class BackgroundJob:
    """A subprocess that prints one ``RESULT {json}`` line (the pipeline driver, plain vLLM), run in
    the background so it loads its engine while daemons load theirs; output goes to files."""

    def __init__(self, cmd: list[str], tmp: Path, name: str) -> None:
        self.name = name
        self.out, self.err = tmp / f"{name}.out", tmp / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=_env(), cwd=ROOT)
        self._result: dict | None = None

    def result(self, timeout: float = 900.0) -> dict:
        if self._result is None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.stop()
                raise TimeoutError(f"{self.name} gave no result within {timeout}s") from None
            for line in self.out.read_text(errors="replace").splitlines():
                if line.startswith("RESULT "):
                    self._result = json.loads(line[7:])
                    break
            else:
                raise RuntimeError(f"{self.name} failed ({self.proc.returncode}):\n"
                                   f"{self.err.read_text(errors='replace')[-5000:]}")
        return self._result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def run_driver(spec: dict, timeout: float = 900.0) -> dict:
    r = subprocess.run(
        [sys.executable, str(DRIVER), json.dumps(spec)],
        capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT,
    )
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"driver failed ({r.returncode}):\n{r.stderr[-5000:]}")
