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
    # behaviour
    announce_period: float = 2.0
    drain_timeout: float = 30.0  # SIGTERM: seconds to finish in-flight work after saying goodbye
    log_level: str = "warning"
    log_json: bool = False

    @property
    def http_host_port(self) -> tuple[str, int]:
        host, _, port = self.http.rpartition(":")
        return host or "127.0.0.1", int(port)
