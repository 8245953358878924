"""Where things live and what the operator allows, read from the environment when asked.

Nothing here runs at import time: the data folder is created by the code that writes to it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.errors import SettingsError

DATA_DIR_ENV = "TEXTGEN_HOME"

_OVERRIDES: dict[str, str] = {}
"""Operator settings of the link being run, over the process environment (see `overrides`)."""


def setting(name: str, default: str | None = None) -> str | None:
    """An operator setting: the running link's value, else the environment's."""
    if name in _OVERRIDES:
        return _OVERRIDES[name]
    return os.environ.get(name, default)


def switched_off(name: str) -> bool:
    """Whether an on-by-default operator switch is set to 0, false, no or off."""
    return (setting(name) or "").strip().lower() in {"0", "false", "no", "off"}


@contextlib.contextmanager
def overrides(values: dict[str, str]) -> Iterator[None]:
    """Let a linked repository's own limits and credentials hold while its run goes on."""
    saved = dict(_OVERRIDES)
    _OVERRIDES.update(values)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)


def data_dir() -> Path:
    """The embedded data folder: MLflow store and artifacts, repository mirrors, models."""
    explicit = os.environ.get(DATA_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser().resolve()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser().resolve() / "textgen"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) across processes of this machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set, else a SQLite store in the data folder."""
    explicit = os.environ.get("MLFLOW_TRACKING_URI")
    if explicit:
        return explicit
    folder = data_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def artifact_root() -> str | None:
    """Where new experiments keep artifacts: the data folder for the embedded store.

    `None` lets a remote tracking server choose (its `--default-artifact-root`).
    """
    explicit = os.environ.get("TEXTGEN_ARTIFACT_ROOT")
    if explicit:
        return explicit
    if os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://", "databricks")):
        return None
    return (data_dir() / "artifacts").as_uri()


def repo_cache_dir() -> Path:
    """Bare mirrors of the linked repositories, one per repository."""
    return Path(os.environ.get("TEXTGEN_REPO_CACHE") or data_dir() / "repos")


def model_cache_dir() -> Path:
    """Models converted to safetensors (from GGUF) and the offline model."""
    return Path(os.environ.get("TEXTGEN_MODEL_CACHE") or data_dir() / "models")


def model_dirs() -> list[Path]:
    """Folders a repository's settings may name models in: `TEXTGEN_MODEL_DIRS` (separated by
    `:`), else the model cache."""
    raw = os.environ.get("TEXTGEN_MODEL_DIRS", "")
    dirs = [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]
    return dirs or [model_cache_dir()]


def max_model_bytes() -> int:
    """The most bytes a local model may have (`TEXTGEN_MAX_MODEL_BYTES`, default 64 GiB)."""
    return _env_int("TEXTGEN_MAX_MODEL_BYTES", 64 << 30)


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    raw = setting(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(
            f"environment variable {name}={raw!r} is not an integer; "
            "unset it or give a whole number"
        ) from None
    if value < minimum:
        raise SettingsError(f"environment variable {name}={value} must be at least {minimum}")
    return value


@dataclass(frozen=True)
class OperatorLimits:
    """Caps set by whoever runs the worker, so that a push cannot exhaust it."""

    max_return_sequences: int
    max_total_tokens: int
    max_prompt_chars: int
    allowed_models: tuple[str, ...]
    trust_remote_code: bool
    max_beams: int = 8

    @classmethod
    def from_env(cls) -> OperatorLimits:
        """Read `TEXTGEN_MAX_*`, `TEXTGEN_ALLOWED_MODELS` and `TEXTGEN_TRUST_REMOTE_CODE`."""
        allowed = setting("TEXTGEN_ALLOWED_MODELS", "") or ""
        return cls(
            max_return_sequences=_env_int("TEXTGEN_MAX_RETURN_SEQUENCES", 20),
            max_beams=_env_int("TEXTGEN_MAX_BEAMS", 8),
            max_total_tokens=_env_int("TEXTGEN_MAX_TOTAL_TOKENS", 1024),
            max_prompt_chars=_env_int("TEXTGEN_MAX_PROMPT_CHARS", 4000),
            allowed_models=tuple(p.strip() for p in allowed.split(",") if p.strip()),
            trust_remote_code=setting("TEXTGEN_TRUST_REMOTE_CODE", "") in {"1", "true"},
        )


def service_file() -> Path:
    """Written by `textgen serve` once it takes pushes: its pid and addresses."""
    return data_dir() / "serve.json"


def record_service(info: dict[str, Any]) -> None:
    """Say that serve is up (called by serve once its receiver listens)."""
    path = service_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), **info}))
    tmp.replace(path)


def forget_service() -> None:
    """Serve is stopping."""
    with contextlib.suppress(OSError):
        service_file().unlink()


def running_service() -> dict[str, Any] | None:
    """What serve recorded, if the process that recorded it still runs."""
    try:
        info = json.loads(service_file().read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return dict(info)


MODEL_ENV = "TEXTGEN_MODEL"
OPERATOR_FILE = "operator.yaml"


def operator_file() -> Path:
    """This machine's durable operator settings (`model`), in the data folder."""
    return data_dir() / OPERATOR_FILE


def operator_model() -> tuple[str, str] | None:
    """The model this machine generates with in place of the settings' own, and who chose it:
    `TEXTGEN_MODEL`, else `model` in the operator file (`textgen offline-model --use`)."""
    explicit = (setting(MODEL_ENV) or "").strip()
    if explicit:
        return explicit, MODEL_ENV
    path = operator_file()
    if not path.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"cannot read the operator settings {path}: {exc}") from None
    model = data.get("model") if isinstance(data, dict) else None
    if model is None:
        return None
    if not isinstance(model, str) or not model.strip():
        raise SettingsError(f"{path}: model={model!r}: expected a hub id or a path")
    return model.strip(), str(path)


def set_operator_model(model: str | None) -> Path:
    """Record (or with None, forget) this machine's model in the operator file."""
    import yaml

    path = operator_file()
    data: dict[str, object] = {}
    if path.is_file():
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        data = loaded if isinstance(loaded, dict) else {}
    if model is None:
        data.pop("model", None)
    else:
        data["model"] = model
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(
        "# Operator settings of this machine (textgen); TEXTGEN_MODEL overrides `model`.\n"
        + yaml.safe_dump(data, sort_keys=True),
        encoding="utf-8",
    )
    tmp.replace(path)
    return path


RUN_TIMEOUT_ENV = "TEXTGEN_RUN_TIMEOUT"


def run_timeout() -> float:
    """Seconds a flow run may take before it is stopped and marked FAILED (default an hour)."""
    return float(_env_int(RUN_TIMEOUT_ENV, 3600))


def requested_device() -> str:
    """`TEXTGEN_DEVICE` (cpu, cuda, cuda:1, mps) or `auto`: CUDA when present."""
    return os.environ.get("TEXTGEN_DEVICE", "auto").strip() or "auto"
