"""Load a Hugging Face text-generation pipeline: a hub id, a local folder, or a GGUF file.

A GGUF file is dequantized once into a safetensors folder kept in the model cache, keyed by
the file's SHA-256, and that folder is what later runs load. Whatever is loaded is recorded as
it is: the model as written in the settings, its resolved revision, the folder actually read.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks import config
from tasks.bounded import show
from tasks.config import OperatorLimits, model_cache_dir, model_dirs
from tasks.errors import ModelError, SettingsError, require
from tasks.files import file_lock, write_atomic
from tasks.machine import CoreShare
from tasks.packing import pack_linears
from tasks.repo import CommitInfo
from tasks.settings import GenerationSettings

logger = logging.getLogger(__name__)

_MARKER = "textgen-source.json"


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
    load_shared_cores: float | None = None
    """Cores busy with other work while this loaded (`tasks.machine`); None where unknown."""
    fast_path: str = "none"
    """How the model runs faster than as loaded (`tasks.packing`), or `none (why)`."""

    def describe(self) -> dict[str, str]:
        """The model's identity and placement, as MLflow parameters."""
        return {
            "model.kind": self.kind,
            "model.revision": self.revision,
            "model.loaded_from": self.loaded_from,
            "model.class": self.model_class,
            "model.dtype": self.dtype,
            "model.cache_hit": str(self.cache_hit),
            "model.fast_path": self.fast_path,
            "device": self.device,
        }


MAX_MODEL_FILES = 10_000


def _read_index(path: Path) -> dict[str, str]:
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def file_digests(paths: list[Path]) -> list[str]:
    """SHA-256 of each file, cached by (path, size, mtime) so large weights are hashed once;
    the cache index is read once and written once for the whole list, however long."""
    index_path = model_cache_dir() / "digests.json"
    index = _read_index(index_path)
    found: dict[str, str] = {}
    values = []
    for path in paths:
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        value = index.get(key)
        if value is None:
            with open(path, "rb") as handle:
                value = found[key] = hashlib.file_digest(handle, "sha256").hexdigest()
        values.append(str(value))
    if found:
        with file_lock(index_path.with_suffix(".lock")):
            index = _read_index(index_path)
            # Forget files that are gone, so the index does not grow without bound.
            index = {k: v for k, v in index.items() if Path(k.split("|", 1)[0]).exists()}
            index.update(found)
            write_atomic(index_path, json.dumps(index, indent=0, sort_keys=True))
    return values


def file_sha256(path: Path) -> str:
    """SHA-256 of one file (cached; see `file_digests`)."""
    return file_digests([path])[0]


def folder_digest(folder: Path) -> str:
    """`sha256:` over the names and contents of every file in a model folder; refuses folders
    of more than `MAX_MODEL_FILES` files or the operator's largest model before reading any."""
    limit = config.MAX_MODEL_BYTES.get()
    files: list[Path] = []
    total = 0
    for path in folder.rglob("*"):
        if not path.is_file() or path.is_symlink() or path.name == _MARKER:
            continue
        files.append(path)
        total += path.stat().st_size
        if len(files) > MAX_MODEL_FILES or total > limit:
            raise ModelError(
                f"model folder {folder} holds more than {MAX_MODEL_FILES} files or "
                f"{limit} bytes ({config.MAX_MODEL_BYTES.name}); a model folder is a few files"
            )
    files.sort()
    digest = hashlib.sha256()
    for path, value in zip(files, file_digests(files), strict=True):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        digest.update(value.encode() + b"\0")
    return f"sha256:{digest.hexdigest()}"


def model_kind(model: str) -> str:
    """`gguf` for a .gguf file, `local` for a path (absolute, ./, ../ or ~), else `hub`:
    decided from the text alone, never from whether a path exists."""
    if model.lower().endswith(".gguf"):
        return "gguf"
    if model.startswith(("/", "./", "../", "~")):
        return "local"
    return "hub"


def _refused(model: str) -> SettingsError:
    # The same words whether or not the path exists: a pusher learns nothing about the worker.
    dirs = ", ".join(str(d) for d in model_dirs())
    return SettingsError(
        f"model {show(model)} is not allowed: give a hub id, a path inside the repository, "
        f"or a path under the operator's model folders ({dirs}; {config.MODEL_DIRS.name})"
    )


def _export_from_commit(commit: CommitInfo, rel: str) -> Path:
    """Copy a model folder (or GGUF file) of the commit into the model cache, once per object."""
    import git

    obj: Any = git.Repo(commit.mirror).commit(commit.sha).tree / rel
    folder = model_cache_dir() / "repository" / str(obj.hexsha)
    target = folder / Path(rel).name if obj.type == "blob" else folder
    if target.exists():
        return target
    limit = config.MAX_MODEL_BYTES.get()
    entries: list[Any] = []
    size = 0
    for blob in [obj] if obj.type == "blob" else obj.traverse():
        if blob.type != "blob":
            continue
        entries.append(blob)
        size += int(blob.size)
        if len(entries) > MAX_MODEL_FILES or size > limit:
            raise SettingsError(
                f"model {show(rel)} in the repository holds more than {MAX_MODEL_FILES} files "
                f"or {limit} bytes ({config.MAX_MODEL_BYTES.name})"
            )
    folder.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(folder.parent / f"{folder.name}.lock"):
        if target.exists():
            return target
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=folder.parent))
        try:
            for blob in entries:
                name = Path(rel).name if obj.type == "blob" else str(blob.path)[len(rel) + 1 :]
                out = staging / name
                out.parent.mkdir(parents=True, exist_ok=True)
                with open(out, "wb") as handle:
                    blob.stream_data(handle)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def locate_model(settings: GenerationSettings, commit: CommitInfo | None = None) -> Path | None:
    """The local folder or GGUF file the settings' model names; None for a hub id.

    What a repository may name: a hub id, a path inside the repository at `commit` (copied
    out of the commit into the model cache), or a path under the operator's model folders
    (default the model cache). Anything else is refused with the same message whether it
    exists or not, before it is looked at."""
    model = settings.model
    kind = model_kind(model)
    if commit is not None and not model.startswith(("/", "~")):
        rel = posixpath.normpath(model)
        if rel.startswith("../") or rel == ".." or rel.startswith("/"):
            raise _refused(model)
        found = commit.object_type(rel)
        if found == "tree" or (found == "blob" and kind == "gguf"):
            return _export_from_commit(commit, rel)
        if kind != "hub":
            raise SettingsError(
                f"model {show(model)} names no folder or .gguf file in the repository at "
                f"commit {commit.short_sha}"
            )
    if kind == "hub":
        return None
    if not model.startswith(("/", "~")):
        raise _refused(model)  # a relative path, with no repository to find it in
    path = Path(os.path.realpath(Path(model).expanduser()))
    roots = [Path(os.path.realpath(d)) for d in model_dirs()]
    if settings.model_choice:
        roots.append(path)  # the operator's own choice of model for this machine
    if not any(path.is_relative_to(root) for root in roots):
        raise _refused(model)
    if not path.exists():
        raise ModelError(
            f"model {show(model)} does not exist in the operator's model folders; give a hub "
            f"id, a folder made with save_pretrained, or a .gguf file"
        )
    return path


def local_revision(settings: GenerationSettings, path: Path | None = None) -> str | None:
    """The content digest of a local model (folder or GGUF file); None for a hub id. `path` is
    where `locate_model` found it; without it, it is located here."""
    path = path or locate_model(settings)
    if path is None:
        return None
    name = show(settings.model)
    if model_kind(settings.model) == "gguf":
        if not path.is_file():
            raise ModelError(f"model {name} is not a .gguf file")
        return f"sha256:{file_sha256(path)}"
    if not path.is_dir():
        raise ModelError(f"model {name} is a file; a local model is a folder (or a .gguf)")
    return folder_digest(path)


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantize a GGUF file once (per SHA-256) into a safetensors folder in the model cache."""
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
            for module in ("gguf", "accelerate"):
                require(module, f"loading {gguf_path.name}", ModelError)
            raise ModelError(f"loading {gguf_path.name} failed: {exc}") from exc
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

    device = (requested or config.DEVICE.get()).lower()
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(
            f"{config.DEVICE.name}={device!r} but this worker has no CUDA device; use auto or cpu"
        )
    if device not in {"cpu", "mps"} and not device.startswith("cuda"):
        raise ModelError(
            f"{config.DEVICE.name}={device!r} is not a device; allowed: auto, cpu, cuda, "
            "cuda:N, mps"
        )
    return device


_CACHE: OrderedDict[tuple[str, ...], Generator] = OrderedDict()


def note_loaded(
    settings: GenerationSettings, revision: str | None, path: Path | None
) -> dict[str, Any] | None:
    """Write what `build_generator` needs to load this model again, for serve to keep it
    loaded for the next run (the warm hint serve sets; nothing outside serve)."""
    target = config.WARM_HINT.get()
    if target is None:
        return None
    record = {
        "model": settings.model,
        "revision": settings.revision,
        "dtype": settings.dtype,
        "digest": revision,
        "path": None if path is None else str(path),
    }
    try:
        write_atomic(target, json.dumps(record, sort_keys=True))
    except OSError as exc:  # an optimisation: the run goes on without it
        logger.warning("Could not note the loaded model in %s: %s", target, exc)
        return None
    return record


def load_noted(record: dict[str, Any]) -> Generator:
    """Load a model as `note_loaded` described it, into this process's cache."""
    settings = GenerationSettings.model_validate(
        {"model": record["model"], "revision": record.get("revision"), "dtype": record.get("dtype")}
    )
    path = record.get("path")
    return build_generator(settings, record.get("digest"), Path(path) if path else None)


def build_generator(
    settings: GenerationSettings, revision: str | None = None, path: Path | None = None
) -> Generator:
    """Load (or reuse from this process) the pipeline the settings ask for; `revision` is the
    local content digest and `path` the located model (`locate_model`), when the caller has them."""
    kind = model_kind(settings.model)
    path = path or locate_model(settings)
    revision = revision or local_revision(settings, path)
    device = resolve_device()
    key = (
        settings.model,
        settings.revision or "",
        revision or "",
        settings.dtype or "",
        device,
        str(config.PACKED_WEIGHTS.get()),
    )
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return replace(_CACHE[key], load_seconds=0.0, cache_hit=True, load_shared_cores=None)

    keep = config.MODEL_CACHE_SIZE.get()
    if keep and len(_CACHE) >= keep:
        # Room first: the model that leaves is freed before the next one loads, so a switch
        # of models holds one of them at a time, not both.
        while len(_CACHE) >= keep:
            _CACHE.popitem(last=False)
        with warnings.catch_warnings():
            # Collecting also finalises others' garbage (GitPython's unclosed pipes): their
            # ResourceWarnings, ignored by default, are not this load's to report.
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
    with CoreShare() as share:
        pipe, source, packing = _load_pipeline(settings, kind, path, device)
    if kind == "hub":
        revision = getattr(pipe.model.config, "_commit_hash", None) or settings.revision
    generator = Generator(
        pipeline=pipe,
        model=settings.model,
        kind=kind,
        revision=revision or "unknown",
        loaded_from=source,
        device=str(pipe.device),
        dtype=str(pipe.model.dtype).removeprefix("torch."),
        model_class=type(pipe.model).__name__,
        load_seconds=share.wall_seconds,
        fast_path=packing.describe(),
        load_shared_cores=share.elsewhere,
    )
    if keep:
        _CACHE[key] = generator
    return generator


def _load_pipeline(
    settings: GenerationSettings, kind: str, path: Path | None, device: str
) -> tuple[Any, str, Any]:
    """The pipeline, the source it was read from, and how its weights were packed."""
    from transformers import pipeline

    limits = OperatorLimits.from_env()
    source = settings.model
    if path is not None:
        source = str(convert_gguf(path) if path.is_file() else path)
    kwargs: dict[str, Any] = {"device": device, "trust_remote_code": limits.trust_remote_code}
    if settings.revision and kind == "hub":
        kwargs["revision"] = settings.revision
    if settings.dtype:
        kwargs["dtype"] = settings.dtype
    try:
        pipe = pipeline("text-generation", model=source, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        where = "the Hugging Face hub" if kind == "hub" else source
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        message = f"cannot load model {settings.model!r} from {where}: {detail}"
        if kind == "hub":
            message += (
                ". No model hub here? Run `textgen offline-model --use` once: this machine then "
                "generates with the offline model (SmolLM2-135M), recorded as such in MLflow; or "
                "set model to a local folder"
            )
        raise ModelError(message) from exc
    return pipe, source, pack_linears(pipe.model, str(pipe.device))


@task(name="load-generator", cache_policy=NO_CACHE)
def load_generator(
    settings: GenerationSettings, revision: str | None = None, path: Path | None = None
) -> Generator:
    """Load the text-generation pipeline for the settings' model."""
    generator = build_generator(settings, revision, path)
    if not generator.cache_hit:
        note_loaded(settings, revision, path)
    get_run_logger().info(
        "Model %s (%s, revision %s) on %s in %s, fast path %s: %s",
        generator.model,
        generator.kind,
        generator.revision,
        generator.device,
        generator.dtype,
        generator.fast_path,
        "reused from this worker"
        if generator.cache_hit
        else f"loaded in {generator.load_seconds:.2f} s",
    )
    return generator
