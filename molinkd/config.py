"""The daemon's configuration: parsed once by the CLI, frozen, passed down (no env-var globals)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

DEFAULT_P2P_PORT = 8468  # the MoLink reference's initial-peer port
DEFAULT_HTTP = "127.0.0.1:8000"


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "molink"


@dataclasses.dataclass(frozen=True)
class DaemonConfig:
    model: str | None = None  # None: the embedded default model
    served_model_name: str | None = None
    layers: str = "all"  # "S:E" | "all" | "auto" | "none"
    pipeline_parallel_size: int | None = None
    max_layers: int | None = None  # cap for --layers auto
    bootstrap: tuple[str, ...] = ()
    listen: tuple[str, ...] = (f"/ip4/0.0.0.0/tcp/{DEFAULT_P2P_PORT}",)
    announce: tuple[str, ...] = ()
    http: str = DEFAULT_HTTP
    identity: Path = dataclasses.field(default_factory=lambda: config_dir() / "identity.key")
    swarm_key: Path | None = None
    allow_peers: Path | None = None  # file of peer ids: only they may connect, open streams, announce
    api_key: str | None = None
    reachability: str = "auto"  # auto | public | private
    # engine
    dtype: str = "auto"
    max_model_len: int | None = 2048
    max_num_seqs: int = 32
    max_num_batched_tokens: int | None = None
    kv_cache_gib: float = 1.0
    gpu_memory_utilization: float | None = None
    seed: int = 0
    failover_wait: float = 30.0  # a head's engine looks this long for a new tail before restarting
    # a head's spot checks of its stages (molinkd.audit): fraction of auditable new requests,
    # nats of tolerance, distinct verifier routes that must disagree before a ban
    audit_rate: float = 0.05
    audit_tolerance: float = 2.0
    audit_quorum: int = 2
    # behaviour
    announce_period: float = 2.0  # peers expire after 3 periods of silence
    ban_seconds: float = 30.0  # first exclusion of a faulty peer from routes (doubles on repeats)
    drain_timeout: float = 30.0  # SIGTERM: seconds to finish in-flight work after saying goodbye
    log_level: str = "warning"
    log_json: bool = False
    engine_metrics: bool = True  # vLLM's own stats (vllm:* metrics, KV cache usage)

    @property
    def http_host_port(self) -> tuple[str, int]:
        host, _, port = self.http.rpartition(":")
        return host or "127.0.0.1", int(port)


# ------------------------------------------------------------------------ the config file


class ConfigError(ValueError):
    """The config file cannot be used; the message names the file and the key."""


def load_file(path: str | Path) -> dict:
    """Read a TOML config file (with the standard library's ``tomllib``): a flat table whose keys
    are ``molinkd join`` flags without the dashes (``max-model-len = 512``)."""
    import tomllib

    p = Path(path).expanduser()
    try:
        with open(p, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read it: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    return data


def _toml_value(v: object) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a TOML basic string: JSON's escapes are TOML's


def to_toml(items: list[tuple[str, object]], comments: dict[str, str] | None = None) -> str:
    """``key = value`` lines (None values become a commented-out line), readable by :func:`load_file`."""
    lines = []
    for k, v in items:
        note = (comments or {}).get(k)
        if v is None:
            lines.append(f"# {k} = ...  ({note or 'not set'})")
        else:
            lines.append(f"{k} = {_toml_value(v)}" + (f"  # {note}" if note else ""))
    return "\n".join(lines) + "\n"


def number_from_env(name: str, kind: type, minimum: float, default: float | None, expect: str) -> float | None:
    """A developer knob from the environment (benchmarks): ``kind(value)`` at least ``minimum``,
    ``default`` when unset; a bad value is a ValueError naming the variable and ``expect``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"${name}={raw!r}: expected {expect}") from None
    if value < minimum:
        raise ValueError(f"${name}={raw!r}: expected {expect}")
    return value
