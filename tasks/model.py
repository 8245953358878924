"""Load a Hugging Face text-generation pipeline: a hub id, a local folder, or a GGUF file.

A GGUF file is dequantized once into a safetensors folder kept in the model cache, keyed by
the file's SHA-256, and that folder is what later runs load. Whatever is loaded is recorded as
it is: the model as written in the settings, its resolved revision, the folder actually read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.config import OperatorLimits, file_lock, model_cache_dir, requested_device
from tasks.errors import ModelError
from tasks.settings import GenerationSettings

logger = logging.getLogger(__name__)

_MARKER = "textgen-source.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


@dataclass
class Generator:
    """A loaded pipeline and what it was loaded from."""

    pipeline: Any = field(repr=False)
    model: str
    """The model as the settings name it."""
    kind: str
    """`hub`, `local` or `gguf`."""
    revision: str
    """Hub commit hash, or `sha256:...` of a local folder's files or of the GGUF file."""
    loaded_from: str
    """The hub id or folder transformers actually read."""
    device: str
    dtype: str
    model_class: str
    load_seconds: float
    cache_hit: bool = False

    def describe(self) -> dict[str, str]:
        """The model's identity and placement, as MLflow parameters."""
        return {
            "model.kind": self.kind,
            "model.revision": self.revision,
            "model.loaded_from": self.loaded_from,
            "model.class": self.model_class,
            "model.dtype": self.dtype,
            "model.cache_hit": str(self.cache_hit),
            "device": self.device,
        }


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, cached by (path, size, mtime) so large weights are hashed once."""
    stat = path.stat()
    index_path = model_cache_dir() / "digests.json"
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return str(index[key])
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    value = digest.hexdigest()
    with file_lock(index_path.with_suffix(".lock")):
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError):
            index = {}
        # Forget files that are gone, so the index does not grow without bound.
        index = {k: v for k, v in index.items() if Path(k.split("|", 1)[0]).exists()}
        index[key] = value
        tmp = index_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(index, indent=0, sort_keys=True))
        tmp.replace(index_path)
    return value


def folder_digest(folder: Path) -> str:
    """`sha256:` over the names and contents of every file in a model folder."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != _MARKER):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        digest.update(file_sha256(path).encode() + b"\0")
    return f"sha256:{digest.hexdigest()}"


def model_kind(model: str) -> str:
    """`gguf` for a .gguf file, `local` for an existing folder, else `hub`."""
    if model.lower().endswith(".gguf"):
        return "gguf"
    path = Path(model).expanduser()
    if model.startswith(("/", "./", "../", "~")) or path.is_dir():
        return "local"
    return "hub"


def local_revision(settings: GenerationSettings) -> str | None:
    """The content digest of a local model (folder or GGUF file); None for a hub id."""
    kind = model_kind(settings.model)
    path = Path(settings.model).expanduser()
    if kind == "hub":
        return None
    if not path.exists():
        raise ModelError(
            f"model {settings.model!r} does not exist on this worker; give a hub id, a folder "
            f"made with save_pretrained, or a .gguf file"
        )
    if kind == "gguf":
        return f"sha256:{file_sha256(path)}"
    if not path.is_dir():
        raise ModelError(
            f"model {settings.model!r} is a file; a local model is a folder (or a .gguf)"
        )
    return folder_digest(path)


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors folder in the model cache; return it.

    Later calls with the same file (same SHA-256) return the folder without dequantizing.
    """
    gguf_path = gguf_path.expanduser().resolve()
    if not gguf_path.is_file():
        raise ModelError(f"GGUF file {gguf_path} does not exist on this worker")
    sha = file_sha256(gguf_path)
    target = model_cache_dir() / "gguf" / f"{gguf_path.stem}-{sha[:16]}"
    if (target / _MARKER).exists():
        return target
    with file_lock(target.with_suffix(".lock")):
        if (target / _MARKER).exists():
            return target
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:  # pragma: no cover - the core dependencies
            raise ModelError(f"transformers is required to convert GGUF: {exc}") from exc
        started = time.perf_counter()
        logger.info("Dequantizing %s into %s (once)", gguf_path, target)
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            quantized = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
            )
        except ImportError as exc:
            raise ModelError(
                f"loading {gguf_path.name} needs the gguf extra: "
                f"pip install 'nlp-text-generation[gguf]' ({exc})"
            ) from exc
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"cannot read GGUF file {gguf_path}: {exc}") from exc
        # The loaded model is tagged as GGUF-quantized and refuses save_pretrained, though its
        # weights are plain float tensors by now: copy them into an untagged model of that config.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantized.state_dict(), strict=True)
        staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            plain.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            (staging / _MARKER).write_text(
                json.dumps({"source": str(gguf_path), "sha256": sha}, indent=2)
            )
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("Converted %s in %.1f s", gguf_path.name, time.perf_counter() - started)
    return target


def resolve_device(requested: str | None = None) -> str:
    """`auto` becomes cuda when present, then mps, else cpu; anything else is checked."""
    import torch

    device = (requested or requested_device()).lower()
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(
            f"TEXTGEN_DEVICE={device!r} but this worker has no CUDA device; use auto or cpu"
        )
    if device not in {"cpu", "mps"} and not device.startswith("cuda"):
        raise ModelError(
            f"TEXTGEN_DEVICE={device!r} is not a device; allowed: auto, cpu, cuda, cuda:N, mps"
        )
    return device


_CACHE: OrderedDict[tuple[str, ...], Generator] = OrderedDict()


def _cache_size() -> int:
    try:
        return max(0, int(os.environ.get("TEXTGEN_MODEL_CACHE_SIZE", "1")))
    except ValueError:
        return 1


def build_generator(settings: GenerationSettings, revision: str | None = None) -> Generator:
    """Load (or reuse from this process) the pipeline the settings ask for.

    `revision` is the local content digest when the caller has computed it already.
    """
    from transformers import pipeline

    kind = model_kind(settings.model)
    revision = revision or local_revision(settings)
    device = resolve_device()
    key = (settings.model, settings.revision or "", revision or "", settings.dtype or "", device)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        cached = _CACHE[key]
        return Generator(**{**cached.__dict__, "load_seconds": 0.0, "cache_hit": True})

    limits = OperatorLimits.from_env()
    started = time.perf_counter()
    if kind == "gguf":
        source = str(convert_gguf(Path(settings.model)))
    elif kind == "local":
        source = str(Path(settings.model).expanduser().resolve())
    else:
        source = settings.model
    kwargs: dict[str, Any] = {"device": device, "trust_remote_code": limits.trust_remote_code}
    if settings.revision and kind == "hub":
        kwargs["revision"] = settings.revision
    if settings.dtype:
        kwargs["dtype"] = settings.dtype
    try:
        pipe = pipeline("text-generation", model=source, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        where = "the Hugging Face hub" if kind == "hub" else source
        hint = (
            " (no network? set model to a local folder, or run `textgen offline-model`)"
            if kind == "hub"
            else ""
        )
        raise ModelError(f"cannot load model {settings.model!r} from {where}: {exc}{hint}") from exc
    load_seconds = time.perf_counter() - started
    if kind == "hub":
        revision = (
            getattr(pipe.model.config, "_commit_hash", None) or settings.revision or "unknown"
        )
    generator = Generator(
        pipeline=pipe,
        model=settings.model,
        kind=kind,
        revision=revision or "unknown",
        loaded_from=source,
        device=str(pipe.device),
        dtype=str(pipe.model.dtype).removeprefix("torch."),
        model_class=type(pipe.model).__name__,
        load_seconds=load_seconds,
    )
    if _cache_size():
        _CACHE[key] = generator
        while len(_CACHE) > _cache_size():
            _CACHE.popitem(last=False)
    return generator


@task(name="load-generator", cache_policy=NO_CACHE)
def load_generator(settings: GenerationSettings, revision: str | None = None) -> Generator:
    """Load the text-generation pipeline for the settings' model."""
    generator = build_generator(settings, revision)
    get_run_logger().info(
        "Model %s (%s, revision %s) on %s in %s: %s",
        generator.model,
        generator.kind,
        generator.revision,
        generator.device,
        generator.dtype,
        "reused from this worker"
        if generator.cache_hit
        else f"loaded in {generator.load_seconds:.2f} s",
    )
    return generator
