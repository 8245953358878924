"""Generate an evaluation set's prompts in one cell: every prompt as the one-prompt form would,
scored the same way, as one Prefect task per cell (not one per prompt)."""

from __future__ import annotations

import time

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks import config
from tasks.batching import batches, generate_batch, plan_call
from tasks.errors import SettingsError
from tasks.evalset import Cell, Prompt
from tasks.evaluation import Row, generated_row
from tasks.generate import Generations, check_context, run_generation
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
    made: dict[int, tuple[Generations, float]] = {}
    plan = plan_call(generator, cell.settings) if config.BATCH_PROMPTS.get() else None
    if plan is None:
        for index, prompt in enumerate(prompts):
            started = time.time()
            made[index] = (run_generation(generator, cell.for_prompt(prompt)), started)
    else:
        for batch in batches(generator, [p.text for p in prompts], plan["rows"]):
            started = time.time()
            settings = [cell.for_prompt(prompts[i]) for i in batch]
            texts = generate_batch(generator, settings, plan)
            for index, generations in zip(batch, texts, strict=True):
                made[index] = (generations, started)
    rows = []
    for index, prompt in enumerate(prompts):
        generations, started = made[index]
        quality = quality_metrics(generator.pipeline.model, generations)
        rows.append(generated_row(cell, prompt, keys[prompt.id], generations, quality, started))
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
