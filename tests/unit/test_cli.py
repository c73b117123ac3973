import subprocess
import sys

import pytest

from cli.molink import _coverage_line, render
from cli.molinkd import parse_config
from tests.helpers import REPO, free_port


def test_defaults_and_both_spellings():
    c = parse_config(["join", "--max_model_len", "512", "--max-num-seqs=4", "--kv_cache_gib=2"])
    assert c.max_model_len == 512 and c.max_num_seqs == 4 and c.kv_cache_gib == 2.0
    assert c.layers == "all" and c.http == "127.0.0.1:8000" and c.bootstrap == ()


def test_hidden_timing_knobs():
    c = parse_config(["join"])
    assert (c.announce_period, c.ban_seconds) == (2.0, 30.0)
    c = parse_config(["join", "--announce-period", "0.5", "--ban-seconds", "8"])
    assert (c.announce_period, c.ban_seconds) == (0.5, 8.0)
    from cli.molinkd import build_parser

    helptext = build_parser()._subparsers._group_actions[0].choices["join"].format_help()
    assert "--ban-seconds" not in helptext and "--announce-period" not in helptext


def test_reference_aliases():
    c = parse_config(["join", "--serving-layers", "0,14", "--initial-peer", "10.0.0.1:8468/12D3KooWAbc",
                      "--pipeline-parallel-size", "2"])
    assert c.layers == "0:15" and c.bootstrap == ("/ip4/10.0.0.1/tcp/8468/p2p/12D3KooWAbc",)
    assert c.pipeline_parallel_size == 2


@pytest.mark.parametrize("args,needle", [
    (["join", "--layers", "5:3"], "empty"),
    (["join", "--layers", "x"], "S:E"),
    (["join", "--max-model-len", "-1"], "at least 1"),
    (["join", "--http", "nope"], "HOST:PORT"),
    (["join", "--bootstrap", "1.2.3.4"], "multiaddr"),
    (["join", "--bootstrap", "/ip4/1.2.3.4/tcp/8468"], "peer id"),
    (["join", "--initial-peer", "1.2.3.4:8468"], "peer's id"),
    (["join", "--model", "/nonexistent"], "config.json"),
    (["join", "--bogus"], "unrecognized"),
    (["join", "--serving-layers", "9,3"], "before the first"),
])
def test_bad_flags_exit_2_with_message(args, needle):
    r = subprocess.run([sys.executable, "-m", "cli.molinkd", *args], capture_output=True, text=True, cwd=REPO,
                       timeout=60)
    assert r.returncode == 2
    assert needle in r.stderr


def test_molink_status_unreachable_says_what_to_do():
    r = subprocess.run([sys.executable, "-m", "cli.molink", "status", "--api", f"http://127.0.0.1:{free_port()}"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 1 and "molinkd join" in r.stderr


def test_coverage_line_shows_gaps():
    assert "GAPS at layers 10-19" in _coverage_line(30, [(0, 10), (20, 30)])
    assert "complete" in _coverage_line(30, [(0, 15), (15, 30)])


def test_render_table():
    out = render({"peer_id": "QmAAAAAAAAAAAAAAAAAAA", "model": {"name": "m", "hash": "ab", "num_layers": 4},
                  "layers": [0, 2], "peers": [
                      {"peer_id": "QmAAAAAAAAAAAAAAAAAAA", "layers": [0, 2], "addrs": ["/ip4/1.2.3.4/tcp/1"]},
                      {"peer_id": "QmBBBBBBBBBBBBBBBBBBB", "layers": [2, 4], "rtt_ms": 1.5}]})
    assert "(me)" in out and "complete" in out and "2:4" in out


def test_render_shows_resumes_and_hole_punches():
    out = render({"peer_id": "QmA", "model": {"name": "m", "hash": "ab", "num_layers": 4}, "layers": [0, 4],
                  "resumed_requests": 2, "peers": [],
                  "nat": {"reachability": "private", "hole_punch": {"attempts": 3, "upgrades": 1, "retrying": {}}}})
    assert "resumed: 2" in out and "hole punches 1/3" in out
    quiet = render({"peer_id": "QmA", "model": {"name": "m"}, "layers": [0, 4], "peers": [],
                    "nat": {"reachability": "public", "hole_punch": {"attempts": 0, "upgrades": 0}}})
    assert "resumed" not in quiet and "hole punches" not in quiet
