"""The operator's view of real daemons: /ready, /metrics, event log lines, `molink wait`,
`molink status --watch` in a pseudo-terminal. Gateways (--layers none) need no engine; the
request counters are checked on the shared single-node daemon."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import REPO, Daemon, boot_addr, wait_for


def scrape(d: Daemon, headers: dict | None = None) -> dict:
    """/metrics parsed with prometheus_client's parser: {(sample name, sorted labels): value}."""
    r = httpx.get(d.url + "/metrics", headers=d.headers if headers is None else headers, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def molink(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.molink", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


def log_lines(d: Daemon) -> list[str]:
    return d.log_path.read_text(errors="replace").splitlines()


def test_gateways_ready_metrics_and_event_lines(tmp_path):
    a = Daemon(["--layers", "none", "--log-level", "info"], tmp_path, name="a", api_key="k-a")
    daemons = [a]
    try:
        boot = boot_addr(a)
        a_id = a.status()["peer_id"]
        b = Daemon(["--layers", "none", "--bootstrap", boot, "--log-json"], tmp_path, name="b")
        daemons.append(b)
        b_id = wait_for(lambda: b.status()["peer_id"], 30, "b's status")
        # readiness: nobody serves a layer, so no request could be served; no API key needed
        r = httpx.get(a.url + "/ready", timeout=10)
        assert r.status_code == 503
        assert r.json() == {"ready": False, "reason": "no route: layers 0:30 uncovered"}
        assert httpx.get(a.url + "/health", timeout=10).status_code == 200
        assert httpx.get(a.url + "/metrics", timeout=10).status_code == 401  # the API key protects it
        w = molink("wait", "--api", a.url, "--timeout", "1.5")
        assert w.returncode == 1 and "no route: layers 0:30 uncovered" in w.stderr
        # peer-level metrics, as a sees b
        s = wait_for(lambda: (lambda s: s if value(s, "molink_peer_rtt_seconds", peer=b_id) > 0 else None)(scrape(a)),
                     30, "a to measure its RTT to b")
        assert value(s, "molink_peers_known") == 1 and value(s, "molink_peers_connected") >= 1
        assert value(s, "molink_peer_sent_bytes_total", peer=b_id) > 0
        assert value(s, "molink_peer_received_bytes_total", peer=b_id) > 0
        assert value(s, "molink_ready") == 0 and value(s, "molink_largest_gap_layers") == 30
        assert value(s, "molink_model_layers") == 30 and value(s, "molink_layers_covered") == 0
        assert value(s, "molink_peer_joins_total") == 1 and value(s, "molink_relayed_peers") == 0
        assert value(s, "molink_info", peer_id=a_id, role="gateway", model="SmolLM2-135M-Instruct",
                     version=a.status()["version"]) == 1
        assert ("molink_hole_punch_upgrades_total", ()) in s
        # counters only go up: more gossip, more bytes
        before = value(s, "molink_peer_received_bytes_total", peer=b_id)
        wait_for(lambda: value(scrape(a), "molink_peer_received_bytes_total", peer=b_id) > before, 20,
                 "more bytes from b")
        # b leaves: a logs it once, with both ids
        b.stop()
        wait_for(lambda: any("peer left" in line and b_id in line for line in log_lines(a)), 20, "a to log b leaving")
        a_lines = log_lines(a)
        joined = [line for line in a_lines if "molinkd.events: peer joined" in line]
        left = [line for line in a_lines if "molinkd.events: peer left" in line]
        assert len(joined) == 1 and f"peer={b_id}" in joined[0] and f"me={a_id}" in joined[0]
        assert len(left) == 1 and "reason=goodbye" in left[0]
        assert not any("p2p.discovery" in line and "joined" in line for line in a_lines)  # no second line
        s = scrape(a)
        assert value(s, "molink_peers_known") == 0 and value(s, "molink_peer_leaves_total", reason="goodbye") == 1
        # --log-json: every line b wrote is one JSON object, its event lines included
        objs = [json.loads(line) for line in log_lines(b) if line.strip()]
        ev = [o for o in objs if o.get("logger") == "molinkd.events"]
        assert [o["msg"] for o in ev] == ["peer joined"] and ev[0]["peer"] == a_id and ev[0]["me"] == b_id
    finally:
        for d in reversed(daemons):
            d.stop()


class Screen:
    """A pseudo-terminal running a command, with its screen emulated by pyte."""

    def __init__(self, argv: list[str], cols: int = 130, rows: int = 50) -> None:
        import pyte

        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.ByteStream(self.screen)
        env = dict(os.environ, TERM="xterm-256color", COLUMNS=str(cols), LINES=str(rows), PYTHONPATH=str(REPO))
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child: the pty is its controlling terminal
            # Ctrl-C must reach it whatever the test runner's worker did with SIGINT (an ignored
            # signal stays ignored across exec, and Python then installs no handler for it)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.chdir(REPO)
            os.execvpe(argv[0], argv, env)
        import fcntl
        import struct
        import termios

        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.status: int | None = None

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            r, _, _ = select.select([self.fd], [], [], max(0.0, min(0.2, end - time.monotonic())))
            if r:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:
                    return
                if not data:
                    return
                self.stream.feed(data)

    def text(self) -> str:
        return "\n".join(line.rstrip() for line in self.screen.display)

    def wait_text(self, pred, timeout: float, what: str) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.pump(0.3)
            if pred(self.text()):
                return self.text()
            if self.exited():
                break
        raise AssertionError(f"timed out waiting for {what}; screen:\n{self.text()}")

    def exited(self) -> bool:
        if self.status is None:
            pid, st = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(st)
        return self.status is not None

    def wait_exit(self, timeout: float) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end and not self.exited():
            self.pump(0.2)
        if not self.exited():
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            raise AssertionError(f"still running after {timeout}s; screen:\n{self.text()}")
        return self.status  # type: ignore[return-value]

    def close(self) -> None:
        if not self.exited():
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


def test_status_watch_in_a_pty_survives_a_dead_peer_and_quits_on_ctrl_c(tmp_path):
    pytest.importorskip("pyte")
    a = Daemon(["--layers", "none"], tmp_path, name="wa")
    scr = None
    try:
        boot = boot_addr(a)
        a_id = a.status()["peer_id"]
        b = Daemon(["--layers", "none", "--bootstrap", boot], tmp_path, name="wb")
        try:
            b_id = wait_for(lambda: b.status()["peer_id"], 30, "b's status")
            scr = Screen([sys.executable, "-m", "cli.molink", "status", "--watch", "--api", a.url])
            short_a, short_b = f"{a_id[:6]}..{a_id[-6:]}", f"{b_id[:6]}..{b_id[-6:]}"
            text = scr.wait_text(lambda t: short_b in t and "coverage" in t, 40, "both peers on the screen")
            assert f"{short_a} (me)" in text and "gaps: 0:30" in text and "no route: layers 0:30 uncovered" in text
            # refreshed in place: one header on the screen, and its clock moves
            assert text.count("molink status --watch") == 1
            stamp = next(line for line in text.splitlines() if line.startswith("╰"))
            scr.wait_text(lambda t: stamp not in t, 10, "the next refresh")
        finally:
            b.stop()
        # b leaves the table, the view follows
        scr.wait_text(lambda t: short_b not in t, 30, "b to leave the view")
        a.kill()  # the peer we watch stops answering
        text = scr.wait_text(lambda t: "not answering" in t, 20, "the view to notice the dead peer")
        assert f"{short_a} (me)" in text  # the last answer stays on screen
        scr.wait_text(lambda t: "not answering for 3s" in t or "not answering for 4s" in t, 20, "the view to keep going")
        assert not scr.exited()
        os.write(scr.fd, b"\x03")  # Ctrl-C, through the terminal
        assert scr.wait_exit(15) == 0
    finally:
        if scr is not None:
            scr.close()
        a.stop()


@pytest.mark.slow
def test_metrics_and_ready_on_a_single_node(single_node):
    d = single_node
    assert httpx.get(d.url + "/metrics", timeout=10).status_code == 401
    r = httpx.get(d.url + "/ready", timeout=10)  # no key needed
    assert r.status_code == 200 and r.json() == {"ready": True, "reason": "ready"}
    w = molink("wait", "--api", d.url, "--timeout", "30")
    assert w.returncode == 0, w.stderr
    before = scrape(d)
    body = {"model": "SmolLM2-135M-Instruct", "prompt": "The capital of France is", "max_tokens": 8,
            "temperature": 0, "ignore_eos": True}
    prompt_tokens = 0
    with httpx.Client(headers=d.headers, timeout=300) as c:
        for _ in range(2):
            j = c.post(d.url + "/v1/completions", json=body)
            assert j.status_code == 200, j.text
            prompt_tokens += j.json()["usage"]["prompt_tokens"]
        with c.stream("POST", d.url + "/v1/completions",
                      json=dict(body, stream=True, stream_options={"include_usage": True})) as s:
            assert s.status_code == 200
            chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        prompt_tokens += chunks[-1]["usage"]["prompt_tokens"]
        assert chunks[-1]["usage"]["completion_tokens"] == 8
        assert c.post(d.url + "/generate", json={"prompt": "x", "max_tokens": -1}).status_code == 400
        assert c.post(d.url + "/generate", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    after = scrape(d)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("molink_requests_total", endpoint="/v1/completions", outcome="ok") == 3
    assert delta("molink_requests_total", endpoint="/generate", outcome="rejected") == 1
    assert delta("molink_requests_total", endpoint="/generate", outcome="unauthorized") == 1
    assert delta("molink_generation_tokens_total") == 24
    assert delta("molink_prompt_tokens_total") == prompt_tokens
    assert delta("molink_time_to_first_token_seconds_count") == 1  # the streamed request
    assert delta("molink_inter_token_latency_seconds_count") == 7
    assert delta("molink_inter_token_latency_seconds_sum") > 0
    assert delta("molink_request_duration_seconds_count") == 3
    assert value(after, "molink_ready") == 1 and value(after, "molink_engine_state", state="ready") == 1
    assert value(after, "molink_kv_cache_blocks") > 0
    assert value(after, "molink_layers_covered") == 30 and value(after, "molink_largest_gap_layers") == 0
    # vLLM's own series pass through (engine metrics are on by default), KV usage among them
    def total(s: dict, name: str) -> float:
        return sum(v for (n, _), v in s.items() if n == name)

    s = wait_for(lambda: (lambda s: s if total(s, "vllm:generation_tokens_total") >= 24 else None)(scrape(d)), 20,
                 "vLLM's own counters")
    assert ("molink_kv_cache_usage_ratio", ()) in s and total(s, "vllm:time_to_first_token_seconds_count") >= 3
    st = d.status()
    assert st["readiness"] == {"ready": True, "reason": "ready"}
    assert st["counters"]["requests"]["/v1/completions"]["ok"] >= 3
