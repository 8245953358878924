"""The outputs of an evaluation set: one row per (cell, prompt), how they are summed up per cell
and per version, written to `output.txt`, and found again to be reused.

A row's `key` is the identity of what generated it: the cell's settings for that prompt (its
`GenerationSettings.digest`, the prompt and seed included) and the model's revision. A later
version of the repository whose row has the same key copies the texts instead of generating
them, and records the version that generated them (`from_version`).

A hub model's revision is known only once it is loaded; its key uses the `revision` setting
(`main` when unset), so pin `revision:` to a commit to have a moved branch regenerate, or run
with `--force`.
"""

from __future__ import annotations

import hashlib
import statistics
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from tasks.evalset import Cell, Plan, Prompt

if TYPE_CHECKING:
    from tasks.generate import Generations
    from tasks.settings import GenerationSettings

QUALITY = (
    "distinct_1",
    "distinct_2",
    "repetition_rate",
    "mean_new_tokens",
    "mean_log_likelihood",
    "perplexity",
)
"""Per-prompt metrics a cell reports as their mean over its prompts."""
OUTPUTS_FILE = "outputs.json"
"""Every row of a version, with its key: what a later version reuses."""
CELLS_FILE = "cells.json"
"""Each cell's name, run and metrics: what compare and the gates read of a version."""


@dataclass
class Row:
    """The texts of one prompt in one cell, and what they cost."""

    cell: str
    prompt_id: str
    prompt: str
    key: str
    texts: list[str]
    new_tokens: list[int]
    metrics: dict[str, float]
    generated: bool = True
    from_version: int | None = None
    """The version whose run generated the texts (None until this version has its number)."""
    from_run_id: str | None = None
    started_at: float | None = None
    """When its generation started (seconds since the epoch)."""
    token_ids: tuple[list[int], list[list[int]]] | None = field(default=None, repr=False)
    """(prompt ids, new ids) of a row generated now: for traces, never stored."""

    def as_dict(self) -> dict[str, Any]:
        """The row as `outputs.json` stores it."""
        stored = asdict(self)
        stored.pop("token_ids")
        return stored

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> Row:
        """A row read back from `outputs.json`."""
        names = set(cls.__dataclass_fields__) - {"token_ids"}
        return cls(**{k: v for k, v in stored.items() if k in names})

    def reused_in(self, cell: str, prompt: Prompt) -> Row:
        """This earlier row, as a row of a new version (the cell's name may have changed)."""
        return Row(
            cell,
            prompt.id,
            prompt.text,
            self.key,
            list(self.texts),
            list(self.new_tokens),
            dict(self.metrics),
            generated=False,
            from_version=self.from_version,
            from_run_id=self.from_run_id,
            started_at=self.started_at,
        )


def model_revision(settings: GenerationSettings, local: str | None) -> str:
    """The revision rows are keyed with: a local model's digest, else its hub id and revision."""
    return local or f"hub:{settings.model}@{settings.revision or 'main'}"


def row_key(cell: Cell, prompt: Prompt, revision: str | None) -> str:
    """The identity of a row's inputs: settings for the prompt (seed included) and model."""
    settings = cell.for_prompt(prompt)
    model = model_revision(settings, revision)
    return hashlib.sha256(f"{settings.digest()}\0{model}".encode()).hexdigest()


def generated_row(
    cell: Cell,
    prompt: Prompt,
    key: str,
    generations: Generations,
    quality: dict[str, float],
    started_at: float | None = None,
) -> Row:
    """The row of texts generated now."""
    metrics = {
        "generation_seconds": generations.generation_seconds,
        "new_tokens": float(generations.total_new_tokens),
        "tokens_per_second": generations.tokens_per_second,
        "prompt_tokens": float(len(generations.prompt_token_ids)),
        **({"shared_cores": generations.shared_cores} if generations.shared_cores else {}),
        **({"step_time_spread": s} if (s := generations.step_spread) is not None else {}),
        **{k: float(v) for k, v in quality.items() if k in QUALITY},
    }
    return Row(
        cell.key,
        prompt.id,
        prompt.text,
        key,
        list(generations.texts),
        generations.new_tokens,
        metrics,
        started_at=started_at,
        token_ids=(generations.prompt_token_ids, generations.new_token_ids),
    )


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v == v]
    return sum(finite) / len(finite) if finite else None


def cell_metrics(rows: list[Row], load: dict[str, float] | None = None) -> dict[str, float]:
    """A cell's metrics: quality as the mean over its prompts, tokens summed, timings over the
    prompts generated now (reused ones cost nothing), and how many were reused."""
    made = [r for r in rows if r.generated]
    metrics: dict[str, float] = dict(load or {})
    for name in QUALITY:
        if (value := _mean([r.metrics[name] for r in rows if name in r.metrics])) is not None:
            metrics[name] = value
    metrics["new_tokens"] = sum(r.metrics.get("new_tokens", 0.0) for r in rows)
    metrics["prompt_tokens"] = _mean([r.metrics.get("prompt_tokens", 0.0) for r in rows]) or 0.0
    metrics["prompts"] = float(len(rows))
    metrics["prompts_generated"] = float(len(made))
    metrics["prompts_reused"] = float(len(rows) - len(made))
    if made:
        seconds = sum(r.metrics["generation_seconds"] for r in made)
        tokens = sum(r.metrics["new_tokens"] for r in made)
        metrics["generation_seconds"] = seconds
        metrics["tokens_per_second"] = tokens / seconds if seconds else 0.0
        if shared := [r.metrics["shared_cores"] for r in made if "shared_cores" in r.metrics]:
            metrics["shared_cores"] = max(shared)
        if spread := [
            r.metrics["step_time_spread"] for r in made if "step_time_spread" in r.metrics
        ]:
            metrics["step_time_spread"] = statistics.median(spread)
    return metrics


SUMMED = frozenset(
    {"new_tokens", "generation_seconds", "load_seconds", "prompts_generated", "prompts_reused"}
)


def version_metrics(per_cell: dict[str, dict[str, float]]) -> dict[str, float]:
    """A version's metrics over its cells: counts and seconds summed, every other metric the
    mean over the cells that have it (what a gate's `mean(metric)` reads)."""
    names = sorted({name for metrics in per_cell.values() for name in metrics})
    merged: dict[str, float] = {}
    for name in names:
        values = [m[name] for m in per_cell.values() if name in m]
        total = sum(values) if name in SUMMED else _mean(values)
        if total is not None:
            merged[name] = total
    merged["cells"] = float(len(per_cell))
    return merged


def format_output(texts: list[str]) -> str:
    """`output.txt` exactly as the original script wrote it."""
    count = len(texts)
    return "\n".join(
        f"---\nOutput {index} of {count}\n---\n\n{text}\n" for index, text in enumerate(texts, 1)
    )


def section_header(cell: str, prompt: Prompt | Row) -> str:
    """The line naming the cell and the prompt above their texts in `output.txt`."""
    pid = prompt.id if isinstance(prompt, Prompt) else prompt.prompt_id
    text = prompt.text if isinstance(prompt, Prompt) else prompt.prompt
    first = text.splitlines()[0] if text else ""
    where = f"cell {cell} | " if cell else ""
    return f"=== {where}prompt {pid}: {first} ==="


def format_sections(rows: list[Row]) -> str:
    """`output.txt` of an evaluation set: the original script's format for each (cell, prompt),
    under a header line naming them."""
    return "\n".join(f"{section_header(r.cell, r)}\n\n{format_output(r.texts)}" for r in rows)


def ordered(plan: Plan, rows: list[Row]) -> list[Row]:
    """Rows in the plan's order: cell by cell, prompt by prompt."""
    index = {(r.cell, r.prompt_id): r for r in rows}
    return [index[(c.key, p.id)] for c in plan.cells for p in plan.prompts]
