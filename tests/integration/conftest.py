"""Shared, session-scoped real daemons and references (a vLLM engine start is ~25-40 s: start
each once, and start the references in the background while daemons load)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from molinkd import runtime
from molinkd.model import prepare_embedded
from tests.helpers import Daemon
from tests.integration.pipeline_helpers import DRIVER, BackgroundJob

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]
# float32 references: these plus two more, for batches (float32 greedy is batch-invariant on CPU)
F32_PROMPTS = PROMPTS + ["List three prime numbers:", "Water boils at"]
MAX_TOKENS = 24
# seeded sampled requests (temperature 0.7, 20 tokens, ignore_eos): in float32 each gives the same
# text however it is batched and whichever peers compute it; the first two have prompts long
# enough that a pipeline head prefills them in chunks (the last stage rewinds their generators)
SEEDED = [{"prompt": f"Story number {i}:" + (" the river and the city" * 60 if i < 2 else ""), "seed": i}
          for i in range(4)]
SEEDED_TOKENS = 20
CHAT = [[{"role": "user", "content": "What is the capital of France?"}]]
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
def plain_vllm_job(model_dir, tmp_path_factory):
    """Plain vLLM (bf16, LLM.generate / LLM.chat, one request at a time), started in the background."""
    spec = {"prompts": PROMPTS, "max_tokens": MAX_TOKENS, "chat": CHAT, "chat_max_tokens": 16}
    job = BackgroundJob([sys.executable, str(Path(__file__).with_name("plain_vllm.py")), model_dir,
                         json.dumps(spec)], tmp_path_factory.mktemp("plain_vllm"), "plain_vllm")
    yield job
    job.stop()


@pytest.fixture(scope="session")
def plain_vllm(plain_vllm_job) -> dict:
    """{"texts": greedy continuations of PROMPTS (24 tokens), "chat": greedy answers to CHAT (16)}."""
    return plain_vllm_job.result()


@pytest.fixture(scope="session")
def plain_vllm_outputs(plain_vllm) -> list[str]:
    return plain_vllm["texts"]


@pytest.fixture(scope="session")
def f32_reference_job(model_dir, tmp_path_factory):
    """Single-node vLLM in float32 through the pipeline driver: F32_PROMPTS one at a time ("one"),
    all at once with ignore_eos ("batch", "batch_tokens"), logprobs of the first prompt, SEEDED
    sampled all at once ("seeded")."""
    spec = {"model": model_dir, "dtype": "float32", "route": None, "prompts": F32_PROMPTS,
            "max_tokens": MAX_TOKENS, "batch": True, "logprobs": 3,
            "seeded": SEEDED, "seeded_tokens": SEEDED_TOKENS}
    job = BackgroundJob([sys.executable, str(DRIVER), json.dumps(spec)], tmp_path_factory.mktemp("f32_ref"),
                        "f32_reference")
    yield job
    job.stop()


@pytest.fixture(scope="session")
def f32_reference(f32_reference_job) -> dict:
    return f32_reference_job.result()


@pytest.fixture(scope="session")
def single_node(tmp_path_factory, model_dir, plain_vllm_job):
    """One full-model daemon with an API key, shared by every single-node test (its plain vLLM
    reference computes meanwhile)."""
    tmp = tmp_path_factory.mktemp("single")
    d = Daemon(["--kv-cache-gib", "0.25"], tmp, name="single", api_key=API_KEY)
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()
