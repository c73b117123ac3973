"""Model preparation (`python -m molinkd.model prepare`, run by `make install`): the embedded model
is converted once; a second run only verifies; a corrupted cache is detected by hash and rebuilt.

Runs against a private cache (MOLINK_CACHE) seeded with a copy of the session's prepared model,
so only the rebuild converts (~20 s, no vLLM)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from molinkd.model import EMBEDDED_DIRNAME, MANIFEST
from tests.helpers import REPO

pytestmark = pytest.mark.slow


def _prepare(cache: Path) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "molinkd.model", "prepare"], capture_output=True, text=True,
                       timeout=600, cwd=REPO, env={**os.environ, "MOLINK_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    return r


def test_second_prepare_does_nothing_and_a_corrupted_cache_is_rebuilt(tmp_path, model_dir):
    cache = tmp_path / "cache"
    target = cache / "models" / EMBEDDED_DIRNAME
    shutil.copytree(model_dir, target)
    manifest = json.loads((target / MANIFEST).read_text())
    weights = target / "model.safetensors"
    before = weights.stat()

    # an intact cache: verified, not converted again, not touched
    r = _prepare(cache)
    assert r.stdout.strip() == str(target)
    assert "model prep [" not in r.stderr and "rebuilding" not in r.stderr, r.stderr
    after = weights.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    # one flipped byte in the weights: detected by hash, rebuilt from the embedded GGUF, identical again
    with open(weights, "r+b") as f:
        f.seek(before.st_size // 2)
        b = f.read(1)
        f.seek(before.st_size // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    r = _prepare(cache)
    assert "failed verification" in r.stderr and "hash mismatch for model.safetensors" in r.stderr, r.stderr
    assert "model prep [" in r.stderr  # converted
    rebuilt = json.loads((target / MANIFEST).read_text())
    assert rebuilt["model_hash"] == manifest["model_hash"] and rebuilt["files"] == manifest["files"]
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".convert-")]  # no leftovers

