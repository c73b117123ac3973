"""The daemon: one trio loop owning the HTTP API, the engine bridge and (with the swarm) the libp2p host.

``serve(config, task_status)`` runs until cancelled; ``run(config)`` is the process entry point
(signals, exit codes).
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from typing import Any

import trio

from molinkd import __version__, logs
from molinkd.api import create_app, serve_http
from molinkd.config import DaemonConfig
from molinkd.engine.driver import EngineOptions, LocalBackend, LocalEngine
from molinkd.model import ModelError, ModelInfo, load_model_info

log = logging.getLogger("molinkd")


class StartupError(RuntimeError):
    """The daemon cannot start; the message says what to change."""


class Daemon:
    """State shared by the daemon's tasks (the one owner of each concern is named below)."""

    def __init__(self, cfg: DaemonConfig, model: ModelInfo) -> None:
        self.cfg = cfg
        self.model = model
        self.span = resolve_span(cfg.layers, model.num_layers)
        self.engine: LocalEngine | None = None  # owned by _run_engine
        self.backend: LocalBackend | None = None
        self.engine_state = "starting"
        self.engine_error: str | None = None
        self.started = time.time()
        self.http_url = ""

    def current_backend(self) -> Any:
        return self.backend

    async def status(self) -> dict:
        b = self.backend
        return {
            "peer_id": None,
            "addrs": [],
            "version": __version__,
            "model": {"name": self.model.name, "hash": self.model.model_hash, "num_layers": self.model.num_layers,
                      "path": self.model.path},
            "layers": list(self.span),
            "engine": {"state": self.engine_state, "error": self.engine_error,
                       "kv_blocks": self.engine.num_kv_blocks if self.engine else None,
                       "max_model_len": self.engine.max_model_len if self.engine else None,
                       "unfinished": self.engine.unfinished() if self.engine else 0},
            "active_requests": b.active if b else 0,
            "total_requests": b.total_requests if b else 0,
            "throughput": round(b.throughput.rate(), 2) if b else 0.0,
            "http": self.http_url,
            "peers": [],
            "uptime": round(time.time() - self.started, 1),
        }


def resolve_span(layers: str, num_layers: int) -> tuple[int, int]:
    if layers == "all":
        return (0, num_layers)
    if layers == "none":
        return (0, 0)
    if layers == "auto":
        raise StartupError("--layers auto is not supported yet: give --layers S:E or all")
    s, e = (int(x) for x in layers.split(":"))
    if e > num_layers:
        raise StartupError(f"--layers {layers}: the model has only {num_layers} layers (valid spans are within 0:{num_layers})")
    if (s, e) != (0, num_layers):
        raise StartupError(f"--layers {layers}: serving a partial span is not supported yet; use --layers all")
    return (s, e)


def engine_options(cfg: DaemonConfig, model: ModelInfo) -> EngineOptions:
    return EngineOptions(
        model=model.path,
        served_name=model.name,
        dtype=cfg.dtype,
        max_model_len=cfg.max_model_len,
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        kv_cache_gib=cfg.kv_cache_gib,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        seed=cfg.seed,
    )


async def _run_engine(d: Daemon, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    engine = LocalEngine(engine_options(d.cfg, d.model))
    d.engine = engine
    task_status.started()
    t0 = time.monotonic()
    _say(f"loading {d.model.name} layers {d.span[0]}:{d.span[1]} with vLLM (about 30 s on CPU)...")
    try:
        await trio.to_thread.run_sync(engine.start, abandon_on_cancel=True)
    except Exception as e:
        d.engine_state = "failed"
        d.engine_error = f"{type(e).__name__}: {e}"
        log.error("engine failed to start", extra=logs.kv(error=d.engine_error))
        raise StartupError(f"the vLLM engine failed to start: {d.engine_error}") from e
    d.backend = LocalBackend(engine)
    d.engine_state = "ready"
    _say(f"engine ready in {time.monotonic() - t0:.1f}s; serving on {d.http_url}")
    try:
        await trio.sleep_forever()
    finally:
        d.backend = None
        d.engine_state = "stopped"
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(engine.shutdown)


def _say(msg: str) -> None:
    """Operator-facing progress lines (always shown, independent of the log level)."""
    sys.stderr.write(f"[molinkd] {msg}\n")
    sys.stderr.flush()


async def serve(cfg: DaemonConfig, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    try:
        model = await trio.to_thread.run_sync(load_model_info, cfg.model, cfg.served_model_name)
    except ModelError as e:
        raise StartupError(str(e)) from e
    d = Daemon(cfg, model)
    app = create_app(d.current_backend, d.status, api_key=cfg.api_key)
    async with trio.open_nursery() as nursery:
        try:
            urls = await nursery.start(serve_http, app, cfg.http)
        except OSError as e:
            raise StartupError(f"cannot listen for HTTP on {cfg.http}: {e.strerror or e}; choose another --http") from e
        d.http_url = urls[0] if urls else f"http://{cfg.http}"
        _say(f"HTTP API on {d.http_url} (model {model.name}, hash {model.short_hash})")
        await nursery.start(_run_engine, d)
        task_status.started(d)


async def _main(cfg: DaemonConfig) -> None:
    async with trio.open_nursery() as nursery:
        async def _signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for s in sigs:
                    _say(f"received {signal.Signals(s).name}; shutting down")
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(_signals)
        await serve(cfg)
        nursery.cancel_scope.cancel()


def _unwrap(e: BaseException) -> BaseException:
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e


def run(cfg: DaemonConfig) -> int:
    logs.setup(cfg.log_level, cfg.log_json)
    try:
        trio.run(_main, cfg)
    except BaseException as e:  # noqa: BLE001 - top level: turn into an exit status
        inner = _unwrap(e)
        if isinstance(inner, StartupError):
            sys.stderr.write(f"molinkd: {inner}\n")
            return 1
        if isinstance(inner, KeyboardInterrupt):
            return 130
        raise
    return 0
