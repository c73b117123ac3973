"""``molinkd``: the MoLink-p2p daemon. Argument parsing only: flags -> DaemonConfig -> serve()."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from molinkd.config import DEFAULT_HTTP, DEFAULT_P2P_PORT, ConfigError, DaemonConfig, config_dir, load_file, to_toml

_LAYERS_RE = re.compile(r"^(all|auto|none|\d+:\d+)$")


def _layers(v: str) -> str:
    v = v.strip()
    if not _LAYERS_RE.match(v):
        raise argparse.ArgumentTypeError(
            f"{v!r}: expected S:E (layers S..E-1, e.g. 0:15), 'all', 'auto' or 'none'"
        )
    if ":" in v:
        s, e = (int(x) for x in v.split(":"))
        if e <= s:
            raise argparse.ArgumentTypeError(f"{v!r}: the span is empty; the end must be greater than the start")
    return v


def _serving_layers(v: str) -> str:
    """The MoLink reference's inclusive 'A,B' (0,39 = layers 0 to 39) -> our 'A:B+1'."""
    m = re.match(r"^\s*(\d+)\s*,\s*(\d+)\s*$", v)
    if not m:
        raise argparse.ArgumentTypeError(f"{v!r}: expected A,B (first and last layer, inclusive), e.g. 0,14")
    a, b = int(m.group(1)), int(m.group(2))
    if b < a:
        raise argparse.ArgumentTypeError(f"{v!r}: the last layer is before the first")
    return f"{a}:{b + 1}"


def _initial_peer(v: str) -> str:
    """The reference's ``IP:PORT``, here ``IP:PORT/PEER_ID`` (libp2p authenticates the peer, so its
    id is part of the address), or a full multiaddr."""
    if v.startswith("/"):
        return _bootstrap(v)
    m = re.match(r"^([\w.\-]+):(\d+)(?:/(?:p2p/)?(\w+))?$", v)
    if not m:
        raise argparse.ArgumentTypeError(f"{v!r}: expected IP:PORT/PEER_ID or a multiaddr (/ip4/1.2.3.4/tcp/8468/p2p/...)")
    host, port, peer = m.groups()
    if not peer:
        raise argparse.ArgumentTypeError(
            f"{v!r}: add the peer's id (IP:PORT/PEER_ID): the peer prints it at start, and /status shows it")
    proto = "ip4" if re.match(r"^\d+\.\d+\.\d+\.\d+$", host) else "dns4"
    return f"/{proto}/{host}/tcp/{port}/p2p/{peer}"


def _bootstrap(v: str) -> str:
    v = _multiaddr(v)
    if "/p2p/" not in v:
        raise argparse.ArgumentTypeError(
            f"{v!r}: a bootstrap address needs the peer id (.../p2p/12D3KooW...), as the peer prints it at start")
    return v


def _multiaddr(v: str) -> str:
    if not v.startswith("/") or len(v.split("/")) < 3:
        raise argparse.ArgumentTypeError(f"{v!r}: not a multiaddr (expected e.g. /ip4/1.2.3.4/tcp/{DEFAULT_P2P_PORT})")
    return v


def _hostport(v: str) -> str:
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{v!r}: expected HOST:PORT, e.g. {DEFAULT_HTTP}")
    return v


def _port(v: str) -> int:
    if not v.isdigit() or not 0 <= int(v) < 65536:
        raise argparse.ArgumentTypeError(f"{v!r}: expected a TCP port number (0-65535)")
    return int(v)


def _number(v: str, kind: type, minimum: float, strict: bool) -> Any:
    try:
        x = kind(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not {'an integer' if kind is int else 'a number'}") from None
    if x < minimum or (strict and x == minimum):
        raise argparse.ArgumentTypeError(f"{v!r}: must be {'greater than' if strict else 'at least'} {minimum}")
    return x


def _pos_int(v: str) -> int:
    return _number(v, int, 1, strict=False)


def _pos_float(v: str) -> float:
    return _number(v, float, 0, strict=True)


def _nonneg_float(v: str) -> float:
    return _number(v, float, 0, strict=False)


def _fraction(v: str) -> float:
    x = _pos_float(v)
    if x > 1:
        raise argparse.ArgumentTypeError(f"{v!r}: must be in (0, 1]")
    return x


def _fraction01(v: str) -> float:
    x = _nonneg_float(v)
    if x > 1:
        raise argparse.ArgumentTypeError(f"{v!r}: must be in [0, 1]")
    return x


def _existing_file(v: str) -> Path:
    p = Path(v).expanduser()
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{v}: no such file")
    return p


def _model_dir(v: str) -> str:
    p = Path(v).expanduser()
    if not p.is_dir() or not (p / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{v}: not a Hugging Face model directory (no config.json)")
    return str(p)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="molinkd",
        description="MoLink-p2p daemon: serve an LLM, alone or as one span of layers in a libp2p swarm.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    j = sub.add_parser("join", help="join (or start) a swarm and serve", description=(
        "Start a peer. With no --bootstrap and --layers all it is plain single-node vLLM serving."))
    g = j.add_argument_group("model")
    g.add_argument("--model", type=_model_dir, default=None,
                   help="Hugging Face model directory (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--served-model-name", default=None, help="model name in the API (default: from the model)")
    g.add_argument("--layers", type=_layers, default=None,
                   help="layers this peer serves: S:E (S..E-1), all, auto (fill gaps in the swarm), none (gateway)")
    g.add_argument("--serving-layers", type=_serving_layers, default=None, metavar="A,B",
                   help="the MoLink reference's spelling of --layers: first,last layer inclusive")
    g.add_argument("--max-layers", type=_pos_int, default=None, metavar="N",
                   help="with --layers auto: take at most N layers (default: as many as fit in free memory)")
    g.add_argument("--pipeline-parallel-size", type=_pos_int, default=None, metavar="N",
                   help="accepted for the reference's users; checked against the route found")
    g = j.add_argument_group("network")
    g.add_argument("--bootstrap", type=_bootstrap, action="append", default=[], metavar="MULTIADDR",
                   help="a peer to join through (repeatable), as printed by that peer at start")
    g.add_argument("--initial-peer", type=_initial_peer, action="append", default=[], metavar="ADDR",
                   help="the reference's spelling of --bootstrap (IP:PORT or multiaddr)")
    g.add_argument("--listen", type=_multiaddr, action="append", default=[], metavar="MULTIADDR",
                   help=f"libp2p listen address (repeatable; default /ip4/0.0.0.0/tcp/{DEFAULT_P2P_PORT})")
    g.add_argument("--announce", type=_multiaddr, action="append", default=[], metavar="MULTIADDR",
                   help="extra address to advertise (port forwarding, proxies); repeatable")
    g.add_argument("--identity", type=Path, default=None, metavar="FILE",
                   help=f"peer identity key, created if missing (default {config_dir() / 'identity.key'})")
    g.add_argument("--swarm-key", type=_existing_file, default=None, metavar="FILE",
                   help="private swarm: only peers with the same key file can connect")
    g.add_argument("--allow-peers", type=_existing_file, default=None, metavar="FILE",
                   help="only these peers (one peer id per line, # comments) may connect, open streams, have "
                        "their announcements accepted or ask for generations; list the bootstrap peers too")
    g.add_argument("--reachability", choices=["auto", "public", "private"], default="auto",
                   help="auto: peers dial back to find out; public: serve as a relay (bootstrap machines); "
                        "private: always reserve relay slots")
    g = j.add_argument_group("HTTP API")
    g.add_argument("--http", type=_hostport, default=None, metavar="HOST:PORT",
                   help=f"HTTP API address (default {DEFAULT_HTTP})")
    g.add_argument("--host", default=None, help="vLLM's spelling: the HTTP API host (default 127.0.0.1)")
    g.add_argument("--port", type=_port, default=None, help="vLLM's spelling: the HTTP API port (default 8000)")
    g.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health")
    g = j.add_argument_group("engine (vLLM)")
    g.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32", "half", "float"], default="auto")
    g.add_argument("--max-model-len", type=_pos_int, default=2048, help="context length (default 2048)")
    g.add_argument("--max-num-seqs", type=_pos_int, default=32, help="max concurrent sequences (default 32)")
    g.add_argument("--max-num-batched-tokens", type=_pos_int, default=None)
    g.add_argument("--kv-cache-gib", "--kv-cache-space", type=_pos_float, default=1.0, metavar="GIB",
                   help="KV cache size on CPU in GiB (default 1)")
    g.add_argument("--gpu-memory-utilization", type=_fraction, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--failover-wait", type=_nonneg_float, default=30.0, metavar="S",
                   help="a head whose route loses a stage looks S seconds for a new one inside its running "
                        "engine (requests wait) before restarting the engine; 0: restart at once (default 30)")
    g.add_argument("--audit-rate", type=_fraction01, default=0.05, metavar="F",
                   help="a head recomputes the first step of this fraction of its new requests on other peers "
                        "serving the same layers and bans a stage that returned wrong values; 0 disables "
                        "(default 0.05)")
    g.add_argument("--audit-tolerance", type=_nonneg_float, default=2.0, metavar="NATS",
                   help="how far (log-probability) the route's token may be from the verifier's best before an "
                        "audit disagrees; other CPUs round bf16 differently (default 2.0)")
    g.add_argument("--audit-quorum", type=_pos_int, default=2, metavar="N",
                   help="disagreements from N distinct verifier routes before a stage is banned, so one lying "
                        "verifier cannot frame an honest stage (default 2)")
    g.add_argument("--drain-timeout", type=_nonneg_float, default=30.0, metavar="S",
                   help="on SIGTERM: leave the swarm, then wait up to S seconds for in-flight requests "
                        "(and a stage's head) to finish before exiting (default 30)")
    g.add_argument("--engine-metrics", action=argparse.BooleanOptionalAction, default=True,
                   help="vLLM records its own stats: vllm:* series and KV cache usage in /metrics (default on; "
                        "no throughput cost measured)")
    g = j.add_argument_group("logging")
    g.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="warning")
    g.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    g = j.add_argument_group("configuration file")
    g.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="TOML file of join flags without the leading dashes (max-model-len = 512); "
                        "flags given on the command line override it")
    g.add_argument("--print-config", action="store_true",
                   help="print the effective configuration (TOML, usable as --config) and exit")
    # timing knobs for tests and labs (hidden: the defaults suit real swarms)
    j.add_argument("--announce-period", type=_pos_float, default=2.0, help=argparse.SUPPRESS)
    j.add_argument("--ban-seconds", type=_pos_float, default=30.0, help=argparse.SUPPRESS)
    return p


def normalize_argv(argv: list[str]) -> list[str]:
    """Accept vLLM-style ``--max_model_len`` as well as ``--max-model-len``."""
    out = []
    for a in argv:
        if a.startswith("--") and len(a) > 2:
            name, eq, val = a.partition("=")
            a = name.replace("_", "-") + eq + val
        out.append(a)
    return out


# dests that are spellings of one setting: a flag for any of them overrides the file for all
_ALIASES = ({"layers", "serving_layers"}, {"bootstrap", "initial_peer"}, {"http", "host", "port"})
_NOT_IN_FILE = {"config", "print_config", "help"}


def _join_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["join"]


def file_keys(join: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Config-file key (a long flag without its dashes, e.g. ``max-model-len``) -> its action."""
    out = {}
    for a in join._actions:
        if a.dest in _NOT_IN_FILE:
            continue
        for opt in a.option_strings:
            if opt.startswith("--") and not (isinstance(a, argparse.BooleanOptionalAction) and opt.startswith("--no-")):
                out[opt[2:]] = a
    return out


def _from_file(key: str, value: Any, action: argparse.Action) -> Any:
    """A config file value, checked and converted by the flag's own parser."""
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [_from_file(key, v, argparse.Action([], key, type=action.type, choices=action.choices)) for v in items]
    if isinstance(value, (dict, list)) or isinstance(value, bool):
        raise ConfigError(f"expected a single value, got {value!r}")
    try:
        v = action.type(str(value)) if action.type else str(value)
    except argparse.ArgumentTypeError as e:
        raise ConfigError(str(e)) from None
    if action.choices and v not in action.choices:
        raise ConfigError(f"{v!r} is not one of {', '.join(map(str, action.choices))}")
    return v


def _merge_file(join: argparse.ArgumentParser, args: argparse.Namespace, explicit: set[str], path: Path) -> None:
    """Fill ``args`` from the config file, except settings given as flags (``explicit`` dests)."""
    data = load_file(path)
    keys = file_keys(join)
    seen: dict[str, str] = {}
    for key, value in data.items():
        action = keys.get(key.replace("_", "-"))
        if action is None:
            raise ConfigError(f"{path}: unknown key {key!r} (keys are molinkd join flags without the dashes, "
                              "e.g. max-model-len; see molinkd join --help)")
        if action.dest in seen:
            raise ConfigError(f"{path}: {key!r} sets the same thing as {seen[action.dest]!r}; keep one")
        seen[action.dest] = key
        group = next((g for g in _ALIASES if action.dest in g), {action.dest})
        try:
            converted = _from_file(key, value, action)
        except ConfigError as e:
            raise ConfigError(f"{path}: {key}: {e}") from None
        if group & explicit:
            continue  # the command line wins
        setattr(args, action.dest, converted)


def _explicit_dests(argv: list[str]) -> set[str]:
    """Dests the command line sets (parsed again with every default suppressed)."""
    p = build_parser()
    for a in _join_parser(p)._actions:
        a.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv))) - {"command"}


def _resolve_http(args: argparse.Namespace) -> str:
    host, port = args.host, args.port
    if args.http is not None:
        h, _, pt = args.http.rpartition(":")
        if (host is not None and host != h) or (port is not None and port != int(pt)):
            raise ConfigError(f"--http {args.http} disagrees with --host/--port "
                              f"({host or h}:{port if port is not None else pt}); give one of them")
        return args.http
    if host is None and port is None:
        return DEFAULT_HTTP
    dh, _, dp = DEFAULT_HTTP.rpartition(":")
    host = host if host is not None else dh
    return f"[{host}]:{port if port is not None else dp}" if ":" in host else f"{host}:{port if port is not None else dp}"


def parse_join(argv: list[str]) -> tuple[DaemonConfig, argparse.Namespace]:
    """Command line (and ``--config`` file under it) -> (config, parsed flags). Exits 2 on errors."""
    parser = build_parser()
    argv = normalize_argv(argv)
    args = parser.parse_args(argv)
    join = _join_parser(parser)
    try:
        if args.config is not None:
            _merge_file(join, args, _explicit_dests(argv), args.config)
        http = _resolve_http(args)
    except ConfigError as e:
        join.error(str(e))
    if args.layers and args.serving_layers and args.layers != args.serving_layers:
        join.error(f"--layers {args.layers} and --serving-layers (= {args.serving_layers}) disagree; give one")
    kw = dict(
        model=args.model,
        served_model_name=args.served_model_name,
        layers=args.layers or args.serving_layers or "all",
        pipeline_parallel_size=args.pipeline_parallel_size,
        max_layers=args.max_layers,
        bootstrap=tuple(args.bootstrap + args.initial_peer),
        announce=tuple(args.announce),
        http=http,
        swarm_key=args.swarm_key,
        allow_peers=args.allow_peers,
        api_key=args.api_key,
        reachability=args.reachability,
        dtype={"half": "float16", "float": "float32"}.get(args.dtype, args.dtype),
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_gib=args.kv_cache_gib,
        gpu_memory_utilization=args.gpu_memory_utilization,
        seed=args.seed,
        failover_wait=args.failover_wait,
        audit_rate=args.audit_rate,
        audit_tolerance=args.audit_tolerance,
        audit_quorum=args.audit_quorum,
        log_level=args.log_level,
        log_json=args.log_json,
        announce_period=args.announce_period,
        ban_seconds=args.ban_seconds,
        drain_timeout=args.drain_timeout,
        engine_metrics=args.engine_metrics,
    )
    if args.listen:
        kw["listen"] = tuple(args.listen)
    if args.identity:
        kw["identity"] = args.identity.expanduser()
    return DaemonConfig(**kw), args


def parse_config(argv: list[str]) -> DaemonConfig:
    return parse_join(argv)[0]


def effective_toml(cfg: DaemonConfig) -> str:
    """The configuration as a ``--config`` file (every setting, defaults included; the API key is
    not printed)."""
    items: list[tuple[str, object]] = [
        ("model", cfg.model), ("served-model-name", cfg.served_model_name), ("layers", cfg.layers),
        ("max-layers", cfg.max_layers), ("pipeline-parallel-size", cfg.pipeline_parallel_size),
        ("bootstrap", list(cfg.bootstrap)), ("listen", list(cfg.listen)), ("announce", list(cfg.announce)),
        ("identity", str(cfg.identity)), ("swarm-key", str(cfg.swarm_key) if cfg.swarm_key else None),
        ("reachability", cfg.reachability), ("http", cfg.http), ("api-key", None),
        ("dtype", cfg.dtype), ("max-model-len", cfg.max_model_len), ("max-num-seqs", cfg.max_num_seqs),
        ("max-num-batched-tokens", cfg.max_num_batched_tokens), ("kv-cache-gib", cfg.kv_cache_gib),
        ("gpu-memory-utilization", cfg.gpu_memory_utilization), ("seed", cfg.seed),
        ("audit-rate", cfg.audit_rate), ("audit-tolerance", cfg.audit_tolerance), ("audit-quorum", cfg.audit_quorum),
        ("engine-metrics", cfg.engine_metrics), ("log-level", cfg.log_level), ("log-json", cfg.log_json),
    ]
    notes = {"api-key": "set, not shown" if cfg.api_key else "not set",
             "model": "the embedded SmolLM2-135M-Instruct", "max-layers": "as many as fit",
             "pipeline-parallel-size": "not checked", "max-num-batched-tokens": "vLLM's default",
             "gpu-memory-utilization": "vLLM's default", "served-model-name": "from the model",
             "swarm-key": "open swarm"}
    return "# molinkd join: effective configuration\n" + to_toml(items, notes)


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_join(sys.argv[1:] if argv is None else argv)
    if args.print_config:
        sys.stdout.write(effective_toml(cfg))
        return 0
    from molinkd.service import run

    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
