"""Structured, quiet-by-default logging for the daemon (``key=value`` or JSON lines on stderr)."""

from __future__ import annotations

import json
import logging
import sys
import time

_NOISY = ("libp2p", "multiaddr", "hypercorn.error", "hypercorn.access", "quart", "transformers", "urllib3",
          "httpx", "httpcore", "filelock", "asyncio")


class _KVFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        extra = getattr(record, "kv", None)
        tail = "".join(f" {k}={_fmt(v)}" for k, v in extra.items()) if extra else ""
        msg = f"{ts} {record.levelname.lower():7s} {record.name}: {record.getMessage()}{tail}"
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return msg


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        d = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
             "msg": record.getMessage()}
        d.update(getattr(record, "kv", None) or {})
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d, default=str)


def _fmt(v: object) -> str:
    s = str(v)
    return json.dumps(s) if (" " in s or not s) else s


def setup(level: str = "warning", as_json: bool = False) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(_JSONFormatter() if as_json else _KVFormatter())
    root.addHandler(h)
    lvl = getattr(logging, level.upper(), logging.WARNING)
    root.setLevel(lvl)
    for name in _NOISY:
        logging.getLogger(name).setLevel(max(lvl, logging.WARNING) if name != "libp2p" else max(lvl, logging.ERROR))
    # swarm events (peers joining/leaving, routes, bans, failed or resumed requests: one line each,
    # see molinkd.metrics) are shown at the default level; --log-level error hides them
    logging.getLogger("molinkd.events").setLevel(min(lvl, logging.INFO) if lvl <= logging.WARNING else lvl)
    # p2p.discovery's own join/leave lines would repeat those events at --log-level info
    logging.getLogger("p2p.discovery").setLevel(lvl if lvl <= logging.DEBUG else max(lvl, logging.WARNING))
    global _as_json
    _as_json = as_json
    # vLLM's import-time warnings (Triton on CPU, ...) say nothing an operator can act on
    logging.getLogger("vllm").setLevel(max(lvl, logging.ERROR) if lvl > logging.DEBUG else lvl)


_as_json = False


def say(msg: str) -> None:
    """An operator-facing progress line, always shown: ``[molinkd] msg``, or with ``--log-json`` a
    JSON object like every other log line."""
    if _as_json:
        line = json.dumps({"ts": round(time.time(), 3), "level": "info", "logger": "molinkd", "msg": msg})
    else:
        line = f"[molinkd] {msg}"
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def kv(**fields: object) -> dict:
    """``log.info("msg", extra=kv(peer=..., n=...))``"""
    return {"kv": fields}
