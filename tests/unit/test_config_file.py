"""--config TOML files, --print-config, --host/--port: precedence and errors."""

import subprocess
import sys

import pytest

from cli.molinkd import effective_toml, parse_config, parse_join
from tests.helpers import REPO

BOOT = "/ip4/10.0.0.1/tcp/8468/p2p/12D3KooWAbc"


def _write(tmp_path, text: str):
    p = tmp_path / "molinkd.toml"
    p.write_text(text)
    return str(p)


def test_file_values_used_and_flags_override(tmp_path):
    f = _write(tmp_path, 'max-model-len = 1024\nmax_num_seqs = 8\nlayers = "0:15"\nlog-json = true\n'
                         f'bootstrap = ["{BOOT}"]\nkv-cache-gib = 2\nport = 9000\n')
    c = parse_config(["join", "--config", f])
    assert (c.max_model_len, c.max_num_seqs, c.layers, c.log_json, c.kv_cache_gib) == (1024, 8, "0:15", True, 2.0)
    assert c.bootstrap == (BOOT,) and c.http == "127.0.0.1:9000"
    other = "/ip4/10.0.0.2/tcp/1/p2p/12D3KooWXyz"
    c = parse_config(["join", "--config", f, "--max-model-len", "256", "--bootstrap", other,
                      "--serving-layers", "15,29", "--http", "0.0.0.0:8001"])
    # scalars and lists given as flags replace the file's; aliases of a setting count as that setting
    assert c.max_model_len == 256 and c.bootstrap == (other,) and c.layers == "15:30" and c.http == "0.0.0.0:8001"
    assert c.max_num_seqs == 8  # untouched by flags: from the file
    assert c.engine_metrics is True
    assert parse_config(["join", "--config", _write(tmp_path, "engine-metrics = false\n")]).engine_metrics is False
    assert parse_config(["join", "--config", _write(tmp_path, "engine-metrics = false\n"),
                         "--engine-metrics"]).engine_metrics is True


def test_print_config_round_trips(tmp_path):
    cfg, args = parse_join(["join", "--port", "8080", "--host", "0.0.0.0", "--max_model_len", "512",
                            "--bootstrap", BOOT, "--log-json", "--api-key", "secret", "--dtype", "half",
                            "--no-engine-metrics"])
    assert args.print_config is False
    text = effective_toml(cfg)
    assert "secret" not in text and "api-key" in text
    again = parse_config(["join", "--config", _write(tmp_path, text), "--api-key", "secret"])
    assert again == cfg


@pytest.mark.parametrize("text,needle", [
    ("bogus = 1\n", "unknown key 'bogus'"),
    ("[join]\nlayers = 'all'\n", "unknown key 'join'"),
    ("config = 'x.toml'\n", "unknown key 'config'"),
    ("max-model-len = -3\n", "max-model-len: '-3': must be at least 1"),
    ("max-model-len = 'lots'\n", "is not an integer"),
    ("dtype = 'int3'\n", "dtype: 'int3' is not one of"),
    ("log-json = 'yes'\n", "log-json: expected true or false"),
    ("engine-metrics = 'no'\n", "engine-metrics: expected true or false"),
    ("no-engine-metrics = true\n", "unknown key 'no-engine-metrics'"),
    ("max-model-len = 1\nmax_model_len = 2\n", "sets the same thing"),
    ("layers = [1, 2]\n", "expected a single value"),
    ("bootstrap = ['/ip4/1.2.3.4/tcp/1']\n", "peer id"),
    ("layers = \n", "not valid TOML"),
])
def test_bad_config_files_exit_2_naming_the_key(tmp_path, text, needle):
    f = _write(tmp_path, text)
    r = subprocess.run([sys.executable, "-m", "cli.molinkd", "join", "--config", f], capture_output=True,
                       text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and f in r.stderr


def test_missing_config_file(tmp_path):
    with pytest.raises(SystemExit) as e:
        parse_config(["join", "--config", str(tmp_path / "nope.toml")])
    assert e.value.code == 2


def test_host_and_port():
    assert parse_config(["join", "--port", "8080"]).http == "127.0.0.1:8080"
    assert parse_config(["join", "--host", "0.0.0.0"]).http == "0.0.0.0:8000"
    assert parse_config(["join", "--host", "0.0.0.0", "--port", "80"]).http == "0.0.0.0:80"
    assert parse_config(["join", "--http", "0.0.0.0:80", "--port", "80"]).http == "0.0.0.0:80"  # agree: fine
    assert parse_config(["join"]).http == "127.0.0.1:8000"


@pytest.mark.parametrize("args,needle", [
    (["--http", "0.0.0.0:80", "--port", "81"], "disagrees with --host/--port"),
    (["--http", "127.0.0.1:80", "--host", "0.0.0.0"], "disagrees with --host/--port"),
    (["--port", "99999"], "TCP port"),
])
def test_conflicting_http_flags_are_an_error(args, needle):
    r = subprocess.run([sys.executable, "-m", "cli.molinkd", "join", *args], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert r.returncode == 2 and needle in r.stderr


def test_print_config_command_prints_and_exits(tmp_path):
    f = _write(tmp_path, "max-num-seqs = 4\n")
    r = subprocess.run([sys.executable, "-m", "cli.molinkd", "join", "--config", f, "--print-config",
                        "--seed", "7"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "max-num-seqs = 4" in r.stdout and "seed = 7" in r.stdout
