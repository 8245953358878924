"""Evaluation sets and matrices: what one version generates, read from `textgen.yaml`.

```yaml
prompts: prompts.jsonl          # or prompts.txt, or a list: ["Hello,", {id: q1, prompt: "Q:"}]
matrix:                         # as GitHub Actions' strategy.matrix
  model: [gpt2, EleutherAI/gpt-neo-125M]
  random_seed: [42, 7]
  exclude: [{model: EleutherAI/gpt-neo-125M, random_seed: 7}]
  include: [{model: gpt2, temperature: 0.7}]
```

A version generates every prompt in every cell. A cell is one combination of the matrix's
values over the file's other settings, named by its canonical text `key=value,...` (keys
sorted); without a matrix there is one cell, named by the empty text. `initial_sentence` is the
one-prompt form: a file without `prompts:` and `matrix:` records exactly what the original
example's script does.

Seeds: each prompt is generated as the original script generates its one prompt,
`set_seed(random_seed)` and then the pipeline call, with the cell's `random_seed`. A prompt's
texts so depend only on that prompt, its cell's settings and that seed: adding, removing or
reordering other prompts or cells changes none of them, and a prompt set's prompt gets the texts
the one-prompt form gets for it.

A prompt's id is the one its `.jsonl` line or list entry gives, else `p` and the first ten hex
digits of its text's SHA-256, so it is the same wherever the prompt moves.

Every refusal is a SettingsError naming the file, the line or cell and the operator limit, and
comes before any model loads.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from tasks import config
from tasks.bounded import show
from tasks.config import OperatorLimits
from tasks.errors import SettingsError
from tasks.repo import CommitInfo
from tasks.settings import (
    GenerationSettings,
    parse_settings,
    read_settings_file,
    replace_lengths,
    resolve_settings,
)

MAX_PROMPT_FILE_BYTES = 4 << 20
"""A prompt file larger than this is refused before it is read line by line."""
PROMPT_FILE_KINDS = (".txt", ".jsonl")
MAX_MATRIX_ENTRIES = 256
"""Most `include` or `exclude` entries of a matrix."""
EXCLUDABLE = 64
"""A matrix may list up to this many times the cell limit before `exclude` removes some."""
MATRIX_KEYS = tuple(k for k in GenerationSettings.model_fields if k != "initial_sentence")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
_CELL_UNSAFE = re.compile(r"[,=\[\]\n]")


@dataclass(frozen=True)
class Prompt:
    """One prompt of a set: its stable id, its text and where it was read (for messages)."""

    id: str
    text: str
    where: str


@dataclass(frozen=True)
class Cell:
    """One combination of the matrix: its canonical name, its values and its settings."""

    key: str
    values: dict[str, Any]
    settings: GenerationSettings

    def for_prompt(self, prompt: Prompt) -> GenerationSettings:
        """This cell's settings generating `prompt`: what the one-prompt form would run."""
        return self.settings.model_copy(update={"initial_sentence": prompt.text})


@dataclass(frozen=True)
class Plan:
    """What a version generates: every prompt in every cell."""

    settings: GenerationSettings
    """The file's settings (without a matrix, its one cell's)."""
    source: str
    cells: tuple[Cell, ...]
    prompts: tuple[Prompt, ...]
    evaluation: bool = False
    """Whether the file has `prompts:` or `matrix:`: the version is recorded as an evaluation
    set (cells, prompt table); else exactly as the original example's one prompt."""
    matrix: bool = False
    prompts_source: str = field(default="initial_sentence")

    def digest(self) -> str:
        """The identity of the version's inputs: the settings' digest for the one-prompt form,
        else a SHA-256 over every cell's settings and every prompt."""
        if not self.evaluation:
            return self.settings.digest()
        canonical = json.dumps(
            {
                "cells": [[c.key, c.settings.digest()] for c in self.cells],
                "prompts": [[p.id, p.text] for p in self.prompts],
            },
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()

    def cell(self, key: str) -> Cell:
        """The cell named `key`."""
        return next(c for c in self.cells if c.key == key)


def prompt_id(text: str) -> str:
    """The id of a prompt that has none of its own: from its text, so it moves with it."""
    return "p" + hashlib.sha256(text.encode()).hexdigest()[:10]


def cell_key(values: dict[str, Any]) -> str:
    """The canonical name of a cell: `key=value` pairs, keys sorted, joined with commas."""
    return ",".join(f"{k}={format_value(values[k])}" for k in sorted(values))


def format_value(value: Any) -> str:
    """A matrix value as it appears in a cell's name (YAML's spelling of booleans and nulls)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return str(value)


def parse_cell_selector(text: str) -> dict[str, str]:
    """`model=gpt2,random_seed=7` as a mapping of names to value texts."""
    pairs: dict[str, str] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"expected key=value pairs separated by commas, got {text!r}")
        pairs[name.strip()] = value.strip()
    return pairs


def select_cells(cells: tuple[Cell, ...] | list[str], selector: dict[str, str]) -> list[str]:
    """The names of the cells whose values include every pair of `selector`."""
    keys = [c.key if isinstance(c, Cell) else c for c in cells]
    return [key for key in keys if selector.items() <= _pairs(key).items()]


def _pairs(key: str) -> dict[str, str]:
    return parse_cell_selector(key) if key else {}


# ---------------------------------------------------------------------------------------------
# Prompts


def _prompt_entry(item: Any, where: str) -> tuple[str | None, str]:
    """(id or None, text) of a list entry or a `.jsonl` line."""
    if isinstance(item, str):
        return None, item
    if not isinstance(item, dict):
        raise SettingsError(
            f"{where}: a prompt is text or a mapping {{id, prompt}}, got {type(item).__name__}"
        )
    if unknown := sorted(str(k) for k in item if k not in ("id", "prompt")):
        raise SettingsError(f"{where}: unknown key {show(unknown[0])}; allowed keys: id, prompt")
    text, given = item.get("prompt"), item.get("id")
    if not isinstance(text, str):
        raise SettingsError(f"{where}: `prompt` must be text, got {show(text)}")
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, str | int):
            raise SettingsError(f"{where}: `id` must be text or a number, got {show(given)}")
        given = str(given)
        if not _ID.match(given):
            raise SettingsError(
                f"{where}: id {show(given)} is not allowed; allowed: 1-64 letters, digits "
                f"and . _ : - (starting with a letter or digit)"
            )
    return given, text


def _file_entries(commit: CommitInfo, path: str, label: str, limits: OperatorLimits) -> list[Any]:
    """The entries of a prompt file at the commit, each with where it was read."""
    if not path.endswith(PROMPT_FILE_KINDS):
        raise SettingsError(
            f"{label}: prompts={show(path)}: expected a list of prompts or the path of a "
            f"{' or '.join(PROMPT_FILE_KINDS)} file in the repository"
        )
    if path.startswith("/") or ".." in path.split("/"):
        raise SettingsError(
            f"{label}: prompts={show(path)}: the path must be inside the repository"
        )
    data = commit.read_file(path)
    at = f"{path} at commit {commit.short_sha}"
    if data is None:
        raise SettingsError(
            f"{label}: prompts={show(path)}: no such file at commit {commit.short_sha}"
        )
    if len(data) > MAX_PROMPT_FILE_BYTES:
        raise SettingsError(
            f"{at}: the file has {len(data)} bytes; allowed: at most {MAX_PROMPT_FILE_BYTES}"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SettingsError(f"{at}: the file is not UTF-8 text") from None
    entries: list[Any] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{at}, line {number}"
        if len(entries) == limits.max_prompts:
            raise SettingsError(
                f"{where}: more than {limits.max_prompts} prompts; allowed: at most "
                f"{limits.max_prompts} a version (operator limit {config.MAX_PROMPTS.name})"
            )
        if path.endswith(".jsonl"):
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise SettingsError(f"{where}: not a JSON object: {exc}") from None
            if not isinstance(item, dict):
                raise SettingsError(f'{where}: expected a JSON object {{"prompt": ..., "id": ...}}')
        else:
            item = line
        entries.append((item, where))
    return entries


def parse_prompts(
    value: Any, commit: CommitInfo, label: str, limits: OperatorLimits
) -> tuple[tuple[Prompt, ...], str]:
    """The prompt set that `prompts:` names, and where it was read."""
    if isinstance(value, str):
        entries, source = _file_entries(commit, value, label, limits), value
    elif isinstance(value, list):
        if len(value) > limits.max_prompts:
            raise SettingsError(
                f"{label}: prompts has {len(value)} entries; allowed: at most "
                f"{limits.max_prompts} a version (operator limit {config.MAX_PROMPTS.name})"
            )
        entries = [(item, f"{label}, prompts[{i}]") for i, item in enumerate(value)]
        source = "textgen.yaml"
    else:
        raise SettingsError(
            f"{label}: prompts={show(value)}: expected a list of prompts or the path of a "
            f"{' or '.join(PROMPT_FILE_KINDS)} file in the repository"
        )
    if not entries:
        raise SettingsError(f"{label}: prompts names no prompt; give at least one")
    prompts: list[Prompt] = []
    seen: dict[str, str] = {}
    for item, where in entries:
        given, text = _prompt_entry(item, where)
        if not text.strip():
            raise SettingsError(f"{where}: the prompt is empty")
        if len(text) > limits.max_prompt_chars:
            raise SettingsError(
                f"{where}: the prompt has {len(text)} characters, over the operator limit "
                f"{limits.max_prompt_chars} ({config.MAX_PROMPT_CHARS.name})"
            )
        pid = given or prompt_id(text)
        if pid in seen:
            what = f"id {pid!r}" if given else "prompt (same text)"
            raise SettingsError(f"{where}: the {what} is also at {seen[pid]}; ids must be unique")
        seen[pid] = where
        prompts.append(Prompt(pid, text, where))
    return tuple(prompts), source


# ---------------------------------------------------------------------------------------------
# Matrices


def _mappings(value: Any, name: str, label: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) and v for v in value):
        raise SettingsError(f"{label}: matrix.{name} must be a list of mappings (key: value)")
    if len(value) > MAX_MATRIX_ENTRIES:
        raise SettingsError(
            f"{label}: matrix.{name} has {len(value)} entries; allowed: at most "
            f"{MAX_MATRIX_ENTRIES}"
        )
    for entry in value:
        for key, item in entry.items():
            _check_key(key, f"matrix.{name}", label)
            _check_value(item, f"matrix.{name} {key}", label)
    return value


def _check_key(key: Any, where: str, label: str) -> None:
    if key == "initial_sentence":
        raise SettingsError(
            f"{label}: {where}: initial_sentence cannot vary in a matrix; "
            "list the prompts under `prompts:` instead"
        )
    if key not in MATRIX_KEYS:
        raise SettingsError(
            f"{label}: {where}: unknown key {show(key)}; allowed: {', '.join(MATRIX_KEYS)}, "
            "include, exclude"
        )


def _check_value(value: Any, where: str, label: str) -> None:
    if isinstance(value, dict | list):
        raise SettingsError(f"{label}: {where}: a matrix value must be a single value")
    if isinstance(value, str) and _CELL_UNSAFE.search(value):
        raise SettingsError(
            f"{label}: {where}={show(value)}: a matrix value may not hold , = [ ] or a "
            "line break (they delimit cell names)"
        )


def expand_matrix(value: Any, label: str, limit: int) -> list[dict[str, Any]]:
    """The cells of `matrix:` as GitHub Actions expands a strategy matrix: every combination
    of the axes, less those matching an `exclude` entry; then each `include` entry is added
    to every combination whose axis values it does not change, or is a cell of its own when
    it fits none. At most `limit` cells, refused before they are built."""
    if value is None:
        return [{}]
    if not isinstance(value, dict) or not value:
        raise SettingsError(
            f"{label}: matrix must map settings to lists of values, e.g. "
            "matrix: {random_seed: [42, 7]}"
        )
    axes: dict[str, list[Any]] = {}
    for key, values in value.items():
        if key in ("include", "exclude"):
            continue
        _check_key(key, "matrix", label)
        if not isinstance(values, list) or not values:
            raise SettingsError(f"{label}: matrix.{key} must be a non-empty list of values")
        for item in values:
            _check_value(item, f"matrix.{key}", label)
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise SettingsError(f"{label}: matrix.{key} lists a value twice")
        axes[key] = values
    exclude = _mappings(value.get("exclude"), "exclude", label)
    include = _mappings(value.get("include"), "include", label)
    size = math.prod(len(v) for v in axes.values()) if axes else 0
    if size > limit * EXCLUDABLE:  # refused before a combination is built
        raise SettingsError(_too_many(label, size, limit))
    for entry in exclude:
        if unknown := sorted(set(entry) - set(axes)):
            raise SettingsError(
                f"{label}: matrix.exclude names {show(unknown[0])}, which is not an axis of "
                f"the matrix; axes: {', '.join(axes) or 'none'}"
            )
    combos = [dict(zip(axes, c, strict=True)) for c in itertools.product(*axes.values())]
    combos = [c for c in combos if not any(e.items() <= c.items() for e in exclude)]
    originals = [dict(c) for c in combos]
    for entry in include:
        fits = [
            i
            for i, original in enumerate(originals)
            if all(original.get(k, v) == v for k, v in entry.items() if k in axes)
        ]
        if fits and axes:
            for i in fits:
                combos[i].update(entry)
        else:
            combos.append(dict(entry))
    unique: dict[str, dict[str, Any]] = {}
    for combo in combos:
        unique.setdefault(cell_key(combo), combo)
    if not unique:
        raise SettingsError(f"{label}: the matrix has no cells left after `exclude`")
    if len(unique) > limit:
        raise SettingsError(_too_many(label, len(unique), limit))
    return list(unique.values())


def _too_many(label: str, cells: int, limit: int) -> str:
    return (
        f"{label}: the matrix makes {cells} cells; allowed: at most {limit} a version "
        f"(operator limit {config.MAX_CELLS.name})"
    )


# ---------------------------------------------------------------------------------------------
# The plan


def _cell_settings(
    raw: dict[str, Any],
    values: dict[str, Any],
    label: str,
    overrides: dict[str, Any] | None,
    limits: OperatorLimits,
) -> GenerationSettings:
    where = f"{label}, matrix cell {cell_key(values)}"
    return resolve_settings(replace_lengths(raw, values), where, overrides, limits)


def _check_budget(plan: Plan, label: str, limits: OperatorLimits) -> None:
    """Refuse a version whose new tokens (at most) pass the operator's budget."""
    total = 0
    for cell in plan.cells:
        effective = cell.settings.effective()
        length = effective.max_new_tokens or effective.max_length or 0
        total += length * cell.settings.num_return_sequences * len(plan.prompts)
    if total > limits.max_version_tokens:
        raise SettingsError(
            f"{label}: {len(plan.cells)} cells x {len(plan.prompts)} prompts come to up to "
            f"{total} new tokens; allowed: at most {limits.max_version_tokens} a version "
            f"(operator limit {config.MAX_VERSION_TOKENS.name})"
        )


def load_plan(
    commit: CommitInfo,
    overrides: dict[str, Any] | None = None,
    limits: OperatorLimits | None = None,
) -> Plan:
    """What the version of `commit` generates: the settings, the cells and the prompts, every
    one validated and within the operator limits. An override of `initial_sentence` makes
    the one prompt of the run; an override of a matrix axis is refused."""
    limits = limits or OperatorLimits.from_env()
    raw, source, label = read_settings_file(commit)
    prompts_value, matrix_value = raw.pop("prompts", None), raw.pop("matrix", None)
    overrides = dict(overrides or {})
    if "initial_sentence" in overrides:
        prompts_value = None
    settings = resolve_settings(raw, label, overrides, limits)
    if prompts_value is None and matrix_value is None:
        only = Prompt(prompt_id(settings.initial_sentence), settings.initial_sentence, label)
        return Plan(settings, source, (Cell("", {}, settings),), (only,))
    prompts: tuple[Prompt, ...]
    if prompts_value is None:
        prompts = (Prompt(prompt_id(settings.initial_sentence), settings.initial_sentence, label),)
        prompts_source = "initial_sentence"
    else:
        prompts, prompts_source = parse_prompts(prompts_value, commit, label, limits)
    combos = expand_matrix(matrix_value, label, limits.max_cells)
    if overridden := sorted({k for combo in combos for k in combo} & set(overrides)):
        raise SettingsError(
            f"{label}: {overridden[0]} is an axis of the matrix; change the matrix in the "
            "settings file rather than overriding it"
        )
    if combos == [{}]:
        cells: tuple[Cell, ...] = (Cell("", {}, settings),)
    else:
        parse_settings(raw, label)  # the file's own settings first: their errors name no cell
        cells = tuple(
            Cell(cell_key(c), c, _cell_settings(raw, c, label, overrides, limits)) for c in combos
        )
    plan = Plan(
        settings,
        source,
        cells,
        prompts,
        evaluation=True,
        matrix=matrix_value is not None,
        prompts_source=prompts_source,
    )
    _check_budget(plan, label, limits)
    return plan
