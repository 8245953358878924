"""Generate an evaluation set's prompts in one cell: every prompt as the one-prompt form would,
scored the same way, as one Prefect task per cell (not one per prompt)."""

from __future__ import annotations

import time

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.errors import SettingsError
from tasks.evalset import Cell, Prompt
from tasks.evaluation import Row, generated_row
from tasks.generate import check_context, run_generation
from tasks.machine import shared
from tasks.model import Generator
from tasks.quality import quality_metrics


def check_prompts(generator: Generator, cell: Cell, prompts: list[Prompt]) -> None:
    """Refuse, before generating any, a prompt that does not fit the model's context."""
    tokenizer = generator.pipeline.tokenizer
    for prompt in prompts:
        try:
            check_context(
                generator, cell.for_prompt(prompt), len(tokenizer(prompt.text)["input_ids"])
            )
        except SettingsError as exc:
            raise SettingsError(f"{prompt.where} (prompt {prompt.id}): {exc}") from None


@task(name="generate-cell", cache_policy=NO_CACHE)
def generate_cell(
    generator: Generator, cell: Cell, prompts: list[Prompt], keys: dict[str, str]
) -> list[Row]:
    """The rows of `prompts` in `cell`: `set_seed(random_seed)` and the pipeline call for each
    prompt, then its quality metrics; `keys` maps prompt ids to their rows' keys."""
    logger = get_run_logger()
    check_prompts(generator, cell, prompts)
    rows = []
    for prompt in prompts:
        started = time.time()
        generations = run_generation(generator, cell.for_prompt(prompt))
        quality = quality_metrics(generator.pipeline.model, generations)
        row = generated_row(cell, prompt, keys[prompt.id], generations, quality, started)
        rows.append(row)
    seconds = sum(r.metrics["generation_seconds"] for r in rows)
    tokens = sum(r.metrics["new_tokens"] for r in rows)
    logger.info(
        "Cell %s: generated %d prompts, %d new tokens in %.2f s (%.1f tokens/s)",
        cell.key or "(the one cell)",
        len(rows),
        tokens,
        seconds,
        tokens / seconds if seconds else 0.0,
    )
    if busy := [r for r in rows if shared(r.metrics.get("shared_cores"))]:
        logger.warning(
            "Other work kept cores busy while %d of these prompts generated: their speed is "
            "recorded, and compare says it is not comparable",
            len(busy),
        )
    return rows
