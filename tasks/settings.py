"""Generation settings: one pydantic model for `textgen.yaml`, read at the commit being run. A
repository laid out like the original Gradient example (`nlp_text_generation.py` with the four
settings as module-level assignments) is read too, with `ast`: the script is never run."""

from __future__ import annotations

import ast
import hashlib
import json
from fnmatch import fnmatch
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from tasks import config
from tasks.bounded import LongNumber, check_size, load_yaml, show
from tasks.config import OperatorLimits, operator_model
from tasks.errors import SettingsError
from tasks.repo import CommitInfo

SETTINGS_FILE = "textgen.yaml"
LEGACY_SCRIPT = "nlp_text_generation.py"
LEGACY_NAMES = ("random_seed", "max_length", "num_return_sequences", "initial_sentence")
OPERATOR_ONLY = dict(
    trust_remote_code=f"{config.TRUST_REMOTE_CODE.name} (operator only, never from a repository)",
    device=f"{config.DEVICE.name} (operator only)",
)


class GenerationSettings(BaseModel):
    """The contract of `textgen.yaml`. Knobs left unset keep the model's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)

    model: str = Field(
        "gpt2", min_length=1, max_length=1000, description="hub id, local folder, or .gguf file"
    )
    revision: str | None = Field(
        None, min_length=1, max_length=200, description="hub branch, tag or commit"
    )
    random_seed: int = Field(42, ge=0, le=2**32 - 1, description="seed given to set_seed")
    max_length: int | None = Field(
        None, ge=1, description="prompt tokens + new tokens, as in transformers"
    )
    max_new_tokens: int | None = Field(None, ge=1, description="new tokens, excluding the prompt")
    num_return_sequences: int = Field(5, ge=1, description="texts generated from the one prompt")
    initial_sentence: str = Field(
        "Hello, I'm a language model,", min_length=1, description="the prompt"
    )
    do_sample: bool | None = Field(None, description="sample (true) or decode greedily (false)")
    temperature: float | None = Field(None, gt=0, le=100, description="sampling temperature")
    top_k: int | None = Field(
        None, ge=0, le=1_000_000, description="sample among the k likeliest tokens"
    )
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass")
    typical_p: float | None = Field(None, gt=0, le=1, description="typical sampling mass")
    repetition_penalty: float | None = Field(None, gt=0, le=100, description="1.0 means none")
    no_repeat_ngram_size: int | None = Field(
        None, ge=0, le=1024, description="forbid repeated n-grams"
    )
    num_beams: int | None = Field(None, ge=1, description="beam search width")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] | None = Field(
        None, description="weights' dtype; unset keeps transformers' default"
    )
    _requested_model: str | None = PrivateAttr(None)
    _model_set_by: str | None = PrivateAttr(None)

    @property
    def model_choice(self) -> dict[str, str]:
        """When the operator's model replaced the settings' own: the model the settings asked
        for and who replaced it (the operator's variable or file); else empty."""
        if self._model_set_by is None:
            return {}
        return {"model.requested": str(self._requested_model), "model.set_by": self._model_set_by}

    def with_operator_model(self, model: str, set_by: str) -> GenerationSettings:
        """These settings generating with the operator's `model` instead of their own."""
        if model == self.model:
            return self
        chosen = self.model_copy(update={"model": model})
        chosen._requested_model = self.model
        chosen._model_set_by = set_by
        return chosen

    @model_validator(mode="after")
    def _lengths(self) -> GenerationSettings:
        if self.max_length is not None and self.max_new_tokens is not None:
            raise ValueError("give max_length or max_new_tokens, not both")
        if self.num_beams is not None and self.num_return_sequences > self.num_beams:
            raise ValueError(
                f"num_return_sequences ({self.num_return_sequences}) cannot exceed "
                f"num_beams ({self.num_beams}) in beam search"
            )
        if self.do_sample is False and self.num_beams is None and self.num_return_sequences > 1:
            raise ValueError(
                "greedy decoding (do_sample: false) gives one sequence: "
                "set num_return_sequences: 1, do_sample: true, or num_beams >= num_return_sequences"
            )
        return self

    def effective(self) -> GenerationSettings:
        """These settings with the original example's length (max_length 30) when none is given."""
        if self.max_length is None and self.max_new_tokens is None:
            return self.model_copy(update={"max_length": 30})
        return self

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the pipeline call: lengths, count and the knobs that are set."""
        skip = {"model", "revision", "random_seed", "initial_sentence", "dtype"}
        values = self.effective().model_dump()
        return {k: v for k, v in values.items() if k not in skip and v is not None}

    def as_params(self) -> dict[str, str]:
        """The settings that have a value, as MLflow parameters; unset knobs (the model's
        defaults) are left out, and `settings.json` holds the whole set. With the operator's
        model, `model` is the one used and `model_choice`'s two params say what was asked for."""
        values = {k: str(v) for k, v in self.effective().model_dump().items() if v is not None}
        return values | self.model_choice

    def without_prompt(self) -> dict[str, Any]:
        """The effective settings that have a value, the prompt left out: a cell's settings."""
        values = self.effective().model_dump()
        return {k: v for k, v in values.items() if v is not None and k != "initial_sentence"}

    def digest(self) -> str:
        """A stable SHA-256 of the effective settings, the identity of an output's inputs."""
        canonical = json.dumps(self.effective().model_dump(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def check_limits(self, limits: OperatorLimits, source: str) -> None:
        """Refuse settings beyond the operator's caps, naming the cap and how to raise it."""
        problems = []
        if self.num_beams is not None and self.num_beams > limits.max_beams:
            problems.append(
                f"num_beams={self.num_beams} exceeds the operator limit {limits.max_beams} "
                f"({config.MAX_BEAMS.name})"
            )
        if self.num_return_sequences > limits.max_return_sequences:
            problems.append(
                f"num_return_sequences={self.num_return_sequences} exceeds the operator limit "
                f"{limits.max_return_sequences} ({config.MAX_RETURN_SEQUENCES.name})"
            )
        length = self.effective().max_length or self.max_new_tokens or 0
        if length > limits.max_total_tokens:
            key = "max_length" if self.max_length else "max_new_tokens"
            problems.append(
                f"{key}={length} exceeds the operator limit {limits.max_total_tokens} "
                f"({config.MAX_TOTAL_TOKENS.name})"
            )
        if len(self.initial_sentence) > limits.max_prompt_chars:
            problems.append(
                f"initial_sentence has {len(self.initial_sentence)} characters, over the operator "
                f"limit {limits.max_prompt_chars} ({config.MAX_PROMPT_CHARS.name})"
            )
        if limits.allowed_models and not any(fnmatch(self.model, p) for p in limits.allowed_models):
            problems.append(
                f"model={show(self.model)} is not allowed on this worker; allowed: "
                f"{', '.join(limits.allowed_models)} ({config.ALLOWED_MODELS.name})"
            )
        if problems:
            raise SettingsError(f"{source}: " + "; ".join(problems))


def _format_validation(exc: ValidationError, raw: dict[str, Any], source: str) -> str:
    lines = []
    for error in exc.errors():
        key = ".".join(str(p) for p in error["loc"]) or "(settings)"
        if error["type"] == "extra_forbidden":
            allowed = ", ".join([*GenerationSettings.model_fields, "gates", *PLAN_KEYS])
            hint = OPERATOR_ONLY.get(key)
            reason = f"is set by {hint}" if hint else f"is not a setting; allowed keys: {allowed}"
            lines.append(f"unknown key {show(key)} {reason}")
            continue
        value = raw.get(key, error.get("input"))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "literal_error":
            message = f"allowed values: {error.get('ctx', {}).get('expected', '')}"
        lines.append(message if key == "(settings)" else f"{key}={show(value)}: {message}")
    return f"{source}: " + "; ".join(lines)


def parse_settings(raw: Any, source: str) -> GenerationSettings:
    """Validate a mapping of settings; `source` names the file and commit in every message."""
    raw = _mapping({} if raw is None else raw, source)
    if bad_keys := [k for k in raw if not isinstance(k, str)]:
        raise SettingsError(f"{source}: keys must be names, got {show(bad_keys)}")
    for key, value in raw.items():
        # pydantic would quietly turn "7" into 7 and 1.0 into 1; a settings file should not.
        field = GenerationSettings.model_fields.get(key)
        if field is None or value is None:
            continue
        args = getattr(field.annotation, "__args__", None)
        types = (set(args) if args else {field.annotation}) - {type(None)}
        problem = None
        if isinstance(value, LongNumber):
            problem = f"a number of {len(value)} characters is out of range"
        elif bool in types:
            if not isinstance(value, bool):
                problem = "expected true or false"
        elif int in types or float in types:
            if isinstance(value, bool) or not isinstance(value, int | float):
                problem = "expected a number"
            elif float not in types and isinstance(value, float) and not value.is_integer():
                problem = "expected a whole number"
        elif str in types and not isinstance(value, str):
            problem = "expected text (quote it in YAML)"
        if problem:
            raise SettingsError(f"{source}: {key}={show(value)}: {problem}")
    try:
        return GenerationSettings.model_validate(raw)
    except ValidationError as exc:
        raise SettingsError(_format_validation(exc, raw, source)) from None


def parse_yaml_settings(text: bytes, source: str) -> dict[str, Any]:
    """Load a YAML settings file into a mapping, with a message naming the line on errors."""
    raw = load_yaml(text, source)
    return {} if raw is None else _mapping(raw, source)


def _mapping(raw: Any, source: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise SettingsError(
            f"{source}: expected a mapping of settings (key: value), got {type(raw).__name__}"
        )
    return raw


def parse_legacy_script(text: bytes, source: str) -> dict[str, Any]:
    """Read the original example's settings from its script with `ast`, without running it:
    module-level `name = <literal>` assignments of the four settings, and the literal `model=`
    of its `pipeline(...)` call. Any other value form is refused."""
    check_size(text, source)
    try:
        tree = ast.parse(text.decode("utf-8"), filename=source)
    except (SyntaxError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{source}: cannot parse the script: {exc}") from None
    found: dict[str, Any] = {}
    for node in tree.body:
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets = [node.target]
        for target in targets:
            if isinstance(target, ast.Name) and target.id in LEGACY_NAMES:
                value_node = node.value  # type: ignore[attr-defined]
                try:
                    found[target.id] = ast.literal_eval(value_node)
                except ValueError:
                    raise SettingsError(
                        f"{source}, line {node.lineno}: {target.id} must be a literal value "
                        f"(number or string), got `{ast.unparse(value_node)}`"
                    ) from None
    for call in [n for n in ast.walk(tree) if isinstance(n, ast.Call)]:
        if getattr(call.func, "id", getattr(call.func, "attr", None)) != "pipeline":
            continue
        for keyword in call.keywords:
            if keyword.arg == "model":
                try:
                    found["model"] = ast.literal_eval(keyword.value)
                except ValueError:
                    raise SettingsError(
                        f"{source}, line {call.lineno}: pipeline(model=...) must be a literal "
                        f"string, got `{ast.unparse(keyword.value)}`"
                    ) from None
    if missing := [name for name in LEGACY_NAMES if name not in found]:
        raise SettingsError(
            f"{source}: the script assigns none of {', '.join(missing)} at module level; "
            f"expected the original example's `random_seed = 42`-style settings"
        )
    return found


PLAN_KEYS = ("prompts", "matrix")
"""Keys of `textgen.yaml` that say what to generate for, not how (`tasks.evalset`)."""


def read_settings_file(commit: CommitInfo) -> tuple[dict[str, Any], str, str]:
    """The raw settings at `commit` (quality gates left out), the file they came from, and the
    label every message about them starts with (file and commit)."""
    where = f"at commit {commit.short_sha} of {commit.repo_url}"
    if (text := commit.read_file(SETTINGS_FILE)) is not None:
        source = SETTINGS_FILE
        raw = parse_yaml_settings(text, f"{SETTINGS_FILE} {where}")
        raw.pop("gates", None)  # quality gates, not generation settings (tasks.gates)
    else:
        if (script := commit.read_file(LEGACY_SCRIPT)) is None:
            raise SettingsError(
                f"no settings {where}: expected {SETTINGS_FILE} (or the original example's "
                f"{LEGACY_SCRIPT}) at the repository root"
            )
        source = LEGACY_SCRIPT
        raw = parse_legacy_script(script, f"{LEGACY_SCRIPT} {where}")
    return raw, source, f"{source} {where}"


def replace_lengths(raw: dict[str, Any], changed: dict[str, Any]) -> dict[str, Any]:
    """`raw` updated with `changed`, where setting one length key replaces the other."""
    merged = {**raw, **changed}
    for key, other in (("max_new_tokens", "max_length"), ("max_length", "max_new_tokens")):
        if key in changed and other not in changed:
            merged.pop(other, None)
    return merged


def resolve_settings(
    raw: dict[str, Any],
    label: str,
    overrides: dict[str, Any] | None = None,
    limits: OperatorLimits | None = None,
) -> GenerationSettings:
    """Validated settings from a raw mapping labelled `label`: `overrides` applied, the
    operator's model chosen, the operator limits checked."""
    if overrides:
        parse_settings(raw, label)
        raw = replace_lengths(raw, overrides)
        label = f"{label} with overrides of {', '.join(sorted(overrides))}"
    settings = parse_settings(raw, label)
    chosen = operator_model()
    if chosen is not None and "model" not in (overrides or {}):
        # The machine's model (an operator setting) over the repository's; `--set model=`
        # of one run wins over both.
        settings = settings.with_operator_model(*chosen)
    settings.check_limits(limits or OperatorLimits.from_env(), label)
    return settings


def load_settings(
    commit: CommitInfo,
    overrides: dict[str, Any] | None = None,
    limits: OperatorLimits | None = None,
) -> tuple[GenerationSettings, str]:
    """The validated settings at `commit`, with `overrides` applied; and the file they came from.
    A prompt set and a matrix (`tasks.evalset`) are not read here."""
    raw, source, label = read_settings_file(commit)
    for key in PLAN_KEYS:
        raw.pop(key, None)
    return resolve_settings(raw, label, overrides, limits), source
