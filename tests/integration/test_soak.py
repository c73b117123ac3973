"""The churn soak (benchmarks/soak.py), short: real daemons under a steady streamed load while the
stages are killed, hung and stopped and restarted. Nothing may be lost: every request completes with
exactly its tokens and (float32) exactly the text of an undisturbed run, and no departed peer stays
listed. The 30-minute run is the same command with its defaults (figures in the issue notes).

It starts its own daemons (a gateway, one head, two stages): it is not in the shared-engines
group, so it runs beside the engine tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow

DURATION = float(os.environ.get("MOLINK_SOAK_SECONDS", "20"))


@pytest.mark.timeout(1200)
def test_short_churn_loses_nothing(capsys):
    cmd = [sys.executable, str(REPO / "benchmarks/soak.py"), "--duration", str(DURATION), "--fault-every", "6", "--min-faults", "2",
           "--stop-seconds", "6", "--heads", "1", "--stages", "2", "--clients", "3", "--max-tokens", "24",
           "--announce-period", "1", "--kv-cache-gib", "0.25", "--seed", "3", "--json"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1100)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    with capsys.disabled():
        print("\n[soak] " + " ".join(p.stdout.strip().splitlines()[:2]))
    assert len(r["faults"]) >= 2, r["faults"]
    assert r["requests"] >= 6, r
    assert r["silent_failures"] == 0 and r["token_count_mismatch"] == 0 and r["text_mismatch"] == 0, r
    assert r["ok"] == r["requests"], r["errors"]
    assert r["ghost_peers"] == 0, r["faults"]
