"""Every `TEXTGEN_*` setting, declared once: typed, with its default and its help. Code reads a
setting through its variable here, never `os.environ` by name; `textgen config` lists them all.

A value is read when asked for, so a changed environment is seen at once; a bad one is a
`SettingsError` naming the variable and what is allowed (`check()` finds them all at start-up).
A linked repository's own limits and credentials hold for its run through `overrides`, a
`ContextVar`: they reach the run's tasks (Prefect copies the context into the threads it runs
them in), and nothing else in the process. Nothing here runs at import time: the data folder is
created by the code that writes to it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from tasks.errors import RepositoryError, SettingsError

T = TypeVar("T")
N = TypeVar("N", int, float)

_OVERRIDES: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "textgen_overrides", default=MappingProxyType({})
)


@dataclass(frozen=True)
class Kind(Generic[T]):
    """How a variable's text becomes its value, and how to say what is allowed."""

    noun: str
    """What a good value is: `an integer`, `a switch`, ..."""
    parse: Callable[[str], T]
    """Raises ValueError for text that is not one."""
    allowed: str = ""
    secret: bool = False
    """Never shown: `textgen config` says only whether it is set."""


def _at_least(convert: Callable[[str], N], minimum: N, noun: str, allowed: str) -> Kind[N]:
    def parse(text: str) -> N:
        value = convert(text)
        if not value >= minimum:  # also refuses nan
            raise ValueError(f"must be at least {minimum:g}")
        return value

    return Kind(noun, parse, f"{allowed} of at least {minimum:g}")


def _switch(text: str) -> bool:
    lowered = text.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("is not a switch")


SWITCH = Kind("a switch", _switch, "1, true, yes or on; 0, false, no or off")
TEXT = Kind("text", str)
SECRET = Kind("text", str, secret=True)
INTEGER = _at_least(int, 1, "an integer", "a whole number")
COUNT = _at_least(int, 0, "an integer", "a whole number")
SECONDS = _at_least(float, 0.05, "a number", "a number")
DAYS = _at_least(float, 0.0, "a number", "a number")
PATH: Kind[Path | None] = Kind("a path", lambda text: Path(text).expanduser())
PATHS = Kind(
    "a list of paths",
    lambda text: [Path(p).expanduser() for p in text.split(os.pathsep) if p.strip()],
    f"folders separated by {os.pathsep!r}",
)
PATTERNS = Kind(
    "a list of patterns",
    lambda text: [p.strip() for p in text.split(",") if p.strip()],
    "glob patterns separated by commas",
)


class Variable(Generic[T]):
    """One `TEXTGEN_*` environment variable."""

    def __init__(
        self, name: str, kind: Kind[T], default: T, help: str, limit: str | None = None
    ) -> None:
        self.name = name
        self.kind = kind
        self.default = default
        self.help = help
        self.secret = kind.secret
        self.limit = limit
        """The key of a link's `limits` that overrides it for that repository's runs."""

    def __repr__(self) -> str:
        return f"Variable({self.name})"

    def raw(self) -> str | None:
        """The text given, by the running link or the environment; None (or empty) if unset."""
        return _OVERRIDES.get().get(self.name, os.environ.get(self.name))

    def is_set(self) -> bool:
        """Whether a value is given (an empty one counts as unset)."""
        return bool((self.raw() or "").strip())

    def get(self) -> T:
        """The value: the given one, parsed, else the default."""
        raw = (self.raw() or "").strip()
        if not raw:
            return self.default
        try:
            return self.kind.parse(raw)
        except ValueError as exc:
            shown = "(hidden)" if self.secret else repr(raw)
            detail = str(exc) if str(exc).startswith("must be") else f"is not {self.kind.noun}"
            hint = f"; allowed: {self.kind.allowed}" if self.kind.allowed else ""
            raise SettingsError(
                f"environment variable {self.name}={shown} {detail}{hint} ({self.help})"
            ) from None

    def source(self) -> str:
        """Where the value comes from: `override` (a linked repository's, for its run, or the
        UI serve serves), `environment` or `default`; `invalid` when it cannot be read."""
        try:
            self.get()
        except SettingsError:
            return "invalid"
        if self.name in _OVERRIDES.get():
            return "override"
        return "environment" if self.is_set() else "default"


# ---------------------------------------------------------------------------------------------
# Where things live (<home> is the data folder)

HOME = Variable("TEXTGEN_HOME", PATH, None, "the data folder (default ~/.local/share/textgen)")
REPO_CACHE = Variable("TEXTGEN_REPO_CACHE", PATH, None, "bare mirrors (default <home>/repos)")
MODEL_CACHE = Variable("TEXTGEN_MODEL_CACHE", PATH, None, "models (default <home>/models)")
MODEL_DIRS = Variable("TEXTGEN_MODEL_DIRS", PATHS, [], "where settings may name models")
ARTIFACT_ROOT = Variable("TEXTGEN_ARTIFACT_ROOT", TEXT, "", "new experiments' artifacts")
LINKS = Variable("TEXTGEN_LINKS", PATH, None, "the links file (default <home>/links.yaml)")
LINK = Variable("TEXTGEN_LINK", TEXT, "", "a work pool deployment's one link (team apply)")
REPO = Variable("TEXTGEN_REPO", TEXT, "", "the default repository (default: this checkout)")
MLFLOW_UI_URL = Variable("TEXTGEN_MLFLOW_UI_URL", TEXT, "", "the MLflow UI links point at")

# Operator limits: caps a push cannot raise (a link's `limits` may, for its repository)
MAX_RETURN_SEQUENCES = Variable(
    "TEXTGEN_MAX_RETURN_SEQUENCES", INTEGER, 20, "most sequences a run", "max_return_sequences"
)
MAX_TOTAL_TOKENS = Variable(
    "TEXTGEN_MAX_TOTAL_TOKENS", INTEGER, 1024, "most tokens a sequence", "max_total_tokens"
)
MAX_PROMPT_CHARS = Variable(
    "TEXTGEN_MAX_PROMPT_CHARS", INTEGER, 4000, "longest prompt (characters)", "max_prompt_chars"
)
MAX_BEAMS = Variable("TEXTGEN_MAX_BEAMS", INTEGER, 8, "the widest beam search", "max_beams")
MAX_PROMPTS = Variable(
    "TEXTGEN_MAX_PROMPTS", INTEGER, 1000, "most prompts a version", "max_prompts"
)
MAX_CELLS = Variable("TEXTGEN_MAX_CELLS", INTEGER, 64, "most matrix cells a version", "max_cells")
MAX_VERSION_TOKENS = Variable(
    "TEXTGEN_MAX_VERSION_TOKENS",
    INTEGER,
    2_000_000,
    "most new tokens a version (cells x prompts x sequences x length)",
    "max_version_tokens",
)
MAX_MODEL_BYTES = Variable(
    "TEXTGEN_MAX_MODEL_BYTES", INTEGER, 64 << 30, "largest local model", "max_model_bytes"
)
ALLOWED_MODELS = Variable(
    "TEXTGEN_ALLOWED_MODELS", PATTERNS, [], "models runs may load (any)", "allowed_models"
)
RUN_TIMEOUT = Variable("TEXTGEN_RUN_TIMEOUT", INTEGER, 3600, "a run's deadline (s)", "run_timeout")

# What runs where
TRUST_REMOTE_CODE = Variable("TEXTGEN_TRUST_REMOTE_CODE", SWITCH, False, "models run own code")
DEVICE = Variable("TEXTGEN_DEVICE", TEXT, "auto", "cpu, cuda, cuda:N, mps or auto")
MODEL = Variable("TEXTGEN_MODEL", TEXT, "", "this machine's model, over the settings' own")
MODEL_CACHE_SIZE = Variable("TEXTGEN_MODEL_CACHE_SIZE", COUNT, 1, "models a process keeps")
PACKED_WEIGHTS = Variable("TEXTGEN_PACKED_WEIGHTS", SWITCH, True, "pack weights for CPU")
BATCH_PROMPTS = Variable(
    "TEXTGEN_BATCH_PROMPTS", SWITCH, True, "generate a set's prompts of one length together"
)
GIT_TIMEOUT = Variable("TEXTGEN_GIT_TIMEOUT", SECONDS, 300.0, "seconds a git fetch may take")
GIT_CREDENTIALS = Variable("TEXTGEN_GIT_CREDENTIALS", SECRET, "", "user:token for http(s) git")
WEBHOOK_SECRET = Variable("TEXTGEN_WEBHOOK_SECRET", SECRET, "", "the webhooks' signing secret")

# The service
RUNNER_POLL_SECONDS = Variable("TEXTGEN_RUNNER_POLL_SECONDS", SECONDS, 0.5, "serve's run polls")
OUTBOX_RETENTION_DAYS = Variable("TEXTGEN_OUTBOX_RETENTION_DAYS", DAYS, 14.0, "handled kept")
WARM_START = Variable("TEXTGEN_WARM_START", SWITCH, True, "serve and warm workers fork runs")
WARM_MODEL_START = Variable(
    "TEXTGEN_WARM_MODEL_START", SWITCH, True, "serve and warm workers keep the model"
)
WARM_HINT = Variable("TEXTGEN_WARM_HINT", PATH, None, "set by serve: the loaded-model note")
WARM_MODEL = Variable("TEXTGEN_WARM_MODEL", TEXT, "", "set by serve: a fork server's model")
WARM_READY = Variable("TEXTGEN_WARM_READY", PATH, None, "set by serve: a fork server's answer")
VERBOSE = Variable("TEXTGEN_VERBOSE", SWITCH, False, "set by -v: runs log library chatter")
TEAM_HOME = Variable("TEXTGEN_TEAM_HOME", PATH, None, "set by team up: the team of a process")

VARIABLES = tuple(value for value in list(globals().values()) if isinstance(value, Variable))
LIMITS: dict[str, Variable[Any]] = {v.limit: v for v in VARIABLES if v.limit}
"""The link limits, by their key in `links.yaml`."""
SECRETS = frozenset(v.name for v in VARIABLES if v.secret)
"""What servers never get in their environment."""


def without_secrets(env: Mapping[str, str]) -> dict[str, str]:
    """An environment for a server: the secrets (git credentials, webhook secret) left out."""
    return {k: v for k, v in env.items() if k not in SECRETS}


@contextlib.contextmanager
def overrides(values: Mapping[str, str]) -> Iterator[None]:
    """Let `values` (by variable name) hold over the environment for the length of the block
    and in what it starts in this context: a linked repository's limits and credentials for
    its run, the MLflow UI that serve serves for a command."""
    token = _OVERRIDES.set({**_OVERRIDES.get(), **values})
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


def check() -> None:
    """Read every variable once: a bad value fails the command at start-up, naming it."""
    problems = []
    for variable in VARIABLES:
        try:
            variable.get()
        except SettingsError as exc:
            problems.append(str(exc))
    if problems:
        raise SettingsError("; ".join(problems))


def describe() -> list[dict[str, str]]:
    """Every variable with its value (secrets only as set or not) and where it comes from."""
    rows = []
    for variable in VARIABLES:
        raw = (variable.raw() or "").strip()
        rows.append(
            {
                "variable": variable.name,
                "value": ("(set)" if raw else "") if variable.secret else raw,
                "source": variable.source(),
                "default": "" if variable.default in (None, "", []) else str(variable.default),
                "help": variable.help,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Folders and stores, derived from the variables above


def data_dir() -> Path:
    """The embedded data folder: MLflow store and artifacts, repository mirrors, models."""
    if (explicit := HOME.get()) is not None:
        return explicit.resolve()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser().resolve() / "textgen"


def repo_cache_dir() -> Path:
    """Bare mirrors of the linked repositories, one per repository."""
    return REPO_CACHE.get() or data_dir() / "repos"


def model_cache_dir() -> Path:
    """Models converted to safetensors (from GGUF) and the offline model."""
    return MODEL_CACHE.get() or data_dir() / "models"


def model_dirs() -> list[Path]:
    """Folders a repository's settings may name models in: the model folders, else the cache."""
    return MODEL_DIRS.get() or [model_cache_dir()]


def default_repo() -> str:
    """The operator's default repository, else the git checkout this project runs from (it
    links itself)."""
    if explicit := REPO.get():
        return explicit
    root = Path(__file__).resolve().parents[1]
    if (root / ".git").exists():
        return str(root)
    raise RepositoryError(
        f"no repository given, and {root} is not a git checkout: pass repo_url (or --repo), "
        f"or set {REPO.name}"
    )


def links_file() -> Path:
    """The links file: `TEXTGEN_LINKS`, else `links.yaml` in the data folder."""
    return LINKS.get() or data_dir() / "links.yaml"


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set, else a SQLite store in the data folder."""
    if explicit := os.environ.get("MLFLOW_TRACKING_URI"):
        return explicit
    folder = data_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def tracking_server() -> bool:
    """Whether runs are recorded on a tracking server (not in a store of this machine)."""
    return tracking_uri().startswith(("http://", "https://", "databricks"))


def artifact_root() -> str | None:
    """Where new experiments keep artifacts: the data folder for the embedded store; `None`
    lets a remote tracking server choose (its `--default-artifact-root`)."""
    if explicit := ARTIFACT_ROOT.get():
        return explicit
    if tracking_server():
        return None
    return (data_dir() / "artifacts").as_uri()


@dataclass(frozen=True)
class OperatorLimits:
    """Caps set by whoever runs the worker, so that a push cannot exhaust it."""

    max_return_sequences: int
    max_total_tokens: int
    max_prompt_chars: int
    allowed_models: tuple[str, ...]
    trust_remote_code: bool
    max_beams: int = 8
    max_prompts: int = 1000
    max_cells: int = 64
    max_version_tokens: int = 2_000_000

    @classmethod
    def from_env(cls) -> OperatorLimits:
        """The limits in force: the running link's, else the environment's, else the defaults."""
        return cls(
            max_return_sequences=MAX_RETURN_SEQUENCES.get(),
            max_beams=MAX_BEAMS.get(),
            max_total_tokens=MAX_TOTAL_TOKENS.get(),
            max_prompt_chars=MAX_PROMPT_CHARS.get(),
            allowed_models=tuple(ALLOWED_MODELS.get()),
            trust_remote_code=TRUST_REMOTE_CODE.get(),
            max_prompts=MAX_PROMPTS.get(),
            max_cells=MAX_CELLS.get(),
            max_version_tokens=MAX_VERSION_TOKENS.get(),
        )


# ---------------------------------------------------------------------------------------------
# This machine's durable operator settings (`textgen offline-model --use`)


def operator_file() -> Path:
    """This machine's durable operator settings (`model`), in the data folder."""
    return data_dir() / "operator.yaml"


def operator_model() -> tuple[str, str] | None:
    """The model this machine generates with in place of the settings' own, and who chose it:
    `TEXTGEN_MODEL`, else `model` in the operator file (`textgen offline-model --use`)."""
    if explicit := MODEL.get():
        return explicit, MODEL.name
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

    from tasks.files import write_atomic

    path = operator_file()
    loaded = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    data: dict[str, object] = loaded if isinstance(loaded, dict) else {}
    data.pop("model", None)
    if model is not None:
        data["model"] = model
    header = f"# Operator settings of this machine (textgen); {MODEL.name} overrides `model`.\n"
    return write_atomic(path, header + yaml.safe_dump(data, sort_keys=True))
