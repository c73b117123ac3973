"""Shared, session-scoped real daemons (vLLM engine start is ~25-40 s: start each once)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from molinkd import runtime
from molinkd.model import prepare_embedded
from tests.helpers import Daemon

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]
API_KEY = "test-key-123"


@pytest.fixture(scope="session", autouse=True)
def sweep_killed_daemons():
    """Tests kill daemons on purpose; a killed daemon's runtime directory is swept by the next
    daemon to start, and after the last test by this (the product's own sweep)."""
    yield
    runtime.sweep(runtime.runtime_root())


@pytest.fixture(scope="session")
def model_dir() -> str:
    return str(prepare_embedded(verbose=False))


@pytest.fixture(scope="session")
def single_node(tmp_path_factory, model_dir):
    """One full-model daemon with an API key, shared by every single-node test."""
    tmp = tmp_path_factory.mktemp("single")
    d = Daemon([], tmp, name="single", api_key=API_KEY)
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="session")
def plain_vllm_outputs(model_dir):
    """Greedy outputs of plain vLLM LLM.generate for PROMPTS (24 tokens each)."""
    script = Path(__file__).with_name("plain_vllm.py")
    r = subprocess.run([sys.executable, str(script), model_dir, json.dumps(PROMPTS), "24"],
                       capture_output=True, text=True, timeout=600)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"plain vLLM failed ({r.returncode}):\n{r.stderr[-3000:]}")
