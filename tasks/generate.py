"""Generate text as the original example does: `set_seed(random_seed)`, then one pipeline call.

The call is the pipeline's public one, asked for token ids as well, so the texts are the
pipeline's, and the token ids it generated are kept for counting and scoring.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.errors import SettingsError
from tasks.machine import CoreShare, shared
from tasks.model import Generator
from tasks.settings import GenerationSettings

logger = logging.getLogger(__name__)

_RECORDED_GENERATION_KEYS = (
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "num_beams",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "max_length",
    "max_new_tokens",
)


@dataclass
class Generations:
    """The texts of one run and what they cost."""

    prompt: str
    texts: list[str]
    new_token_ids: list[list[int]] = field(repr=False)
    prompt_token_ids: list[int] = field(repr=False)
    generation_seconds: float
    generation_config: dict[str, Any]
    step_seconds: list[float] = field(default_factory=list, repr=False)
    """The time of each decoding step (one new token per sequence), the first one included."""
    shared_cores: float | None = None
    """Cores busy with other work while this generated (`tasks.machine`); None where unknown."""

    @property
    def new_tokens(self) -> list[int]:
        """New tokens generated for each sequence (up to and including its end-of-text token)."""
        return [len(ids) for ids in self.new_token_ids]

    @property
    def total_new_tokens(self) -> int:
        """All new tokens of the run."""
        return sum(self.new_tokens)

    @property
    def tokens_per_second(self) -> float:
        """New tokens over generation time."""
        return self.total_new_tokens / self.generation_seconds if self.generation_seconds else 0.0

    @property
    def step_spread(self) -> float | None:
        """How much the decoding steps' times vary, relative to their median (interquartile
        range over median, the first step, which also reads the prompt, left out): the noise
        of this machine a speed difference must exceed to mean something."""
        steps = sorted(self.step_seconds[1:])
        if len(steps) < 4 or not (middle := statistics.median(steps)):
            return None
        low, _, high = statistics.quantiles(steps, n=4)
        return (high - low) / middle


def effective_generation(pipe: Any, call_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The decoding parameters generate() uses for this call: its defaults, under the model's
    generation config, under what the pipeline adds (its sampling default), under the call's.

    transformers has no public API that says this (the merge happens inside the pipeline and
    `generate()`), so two of its private helpers answer it: the pipeline's
    `_prepare_generate_kwargs` and `GenerationConfig._get_default_generation_params`.
    tests/test_internals.py fails loudly when either changes; a run on a transformers without
    them records what it can, and says so."""
    from transformers import GenerationConfig

    defaults = getattr(GenerationConfig, "_get_default_generation_params", None)
    prepare = getattr(pipe, "_prepare_generate_kwargs", None)
    if not (callable(defaults) and callable(prepare)):
        logger.warning(
            "This transformers does not say what generate() will use; recording the call's own"
        )
    values: dict[str, Any] = dict(defaults()) if callable(defaults) else {}
    values.update(pipe.model.generation_config.to_diff_dict())
    values.update(prepare(dict(call_kwargs)) if callable(prepare) else call_kwargs)
    return {key: values.get(key) for key in _RECORDED_GENERATION_KEYS}


def _trim(ids: list[int], stop_ids: set[int]) -> list[int]:
    """Drop the padding after a sequence's first end-of-text token."""
    for index, token in enumerate(ids):
        if token in stop_ids:
            return ids[: index + 1]
    return ids


def model_context(generator: Generator) -> int | None:
    """How many positions the loaded model can attend to, when its config says."""
    config = generator.pipeline.model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(generator: Generator, settings: GenerationSettings, prompt_tokens: int) -> None:
    """Refuse lengths past the model's context before generating, naming the key and the cap."""
    context = model_context(generator)
    if context is None:
        return
    effective = settings.effective()
    if prompt_tokens >= context:
        raise SettingsError(
            f"initial_sentence is {prompt_tokens} tokens, which fills the context of model "
            f"{generator.model} ({context} positions); allowed: fewer than {context} tokens"
        )
    if effective.max_length is not None:
        key, value, total = "max_length", effective.max_length, effective.max_length
        if value <= prompt_tokens:
            raise SettingsError(
                f"max_length={value} leaves no room for new tokens after the prompt "
                f"({prompt_tokens} tokens); allowed: more than {prompt_tokens}, or use "
                f"max_new_tokens"
            )
    else:
        value = effective.max_new_tokens or 0
        key, total = "max_new_tokens", prompt_tokens + value
    if total > context:
        raise SettingsError(
            f"{key}={value}: the prompt ({prompt_tokens} tokens) and the new tokens come to "
            f"{total}, past the context of model {generator.model} ({context} positions); "
            f"allowed: max_length up to {context}, or max_new_tokens up to "
            f"{context - prompt_tokens}"
        )


PROGRESS_SECONDS = 2.0
"""How often a long generation reports the tokens it has made so far."""


def progress_criteria(
    total: int | None, report: Callable[[int, int | None, float], None] | None, every: float
) -> Any:
    """A stopping criterion that never stops: generate() calls it once per new token; it keeps
    each step's time (`steps`), and calls `report(tokens so far, total, seconds)` at most every
    `every` seconds. It reads nothing and draws no random numbers, so the texts are the same
    with it as without."""
    import torch
    from transformers import StoppingCriteria

    class TokenProgress(StoppingCriteria):
        def __init__(self) -> None:
            self.tokens = 0
            self.started = self.last = self.previous = time.perf_counter()
            self.steps: list[float] = []

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            self.tokens += 1
            now = time.perf_counter()
            self.steps.append(now - self.previous)
            self.previous = now
            if report is not None and now - self.last >= every:
                self.last = now
                report(self.tokens, total, now - self.started)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return TokenProgress()


def run_generation(
    generator: Generator,
    settings: GenerationSettings,
    progress: Callable[[int, int | None, float], None] | None = None,
    every: float = PROGRESS_SECONDS,
) -> Generations:
    """Seed, then generate the texts with one public call of the pipeline; `progress` hears of
    the tokens made so far every `every` seconds. The call returns the token ids
    (`return_tensors=True`) to count and score them; each text is what the pipeline's own text
    output is: the prompt followed by the decoded new tokens (special tokens skipped as it does)."""
    import torch
    from transformers import StoppingCriteriaList, set_seed

    pipe = generator.pipeline
    call_kwargs = settings.pipeline_kwargs()
    prompt = settings.initial_sentence
    prompt_ids = list(pipe.tokenizer(prompt)["input_ids"])
    check_context(generator, settings, len(prompt_ids))
    effective = settings.effective()
    total = effective.max_new_tokens or (
        effective.max_length - len(prompt_ids) if effective.max_length else None
    )
    criteria = progress_criteria(total, progress, every)
    run_kwargs = dict(call_kwargs, stopping_criteria=StoppingCriteriaList([criteria]))

    set_seed(settings.random_seed)
    with CoreShare() as share:
        records = pipe(prompt, return_tensors=True, **run_kwargs)
        if generator.device.startswith("cuda"):
            torch.cuda.synchronize()
    elapsed = share.wall_seconds

    sequences = [[int(t) for t in record["generated_token_ids"]] for record in records]
    new_ids = [sequence[len(prompt_ids) :] for sequence in sequences]
    # As the pipeline's text output: special tokens skipped, unless its tokenizer has a
    # response template (chat models that parse their answer).
    skip = not getattr(pipe.tokenizer, "response_template", None)
    stop = pipe.model.generation_config.eos_token_id
    stop_ids = set(stop if isinstance(stop, list) else [stop] if stop is not None else [])
    return Generations(
        prompt=prompt,
        texts=[prompt + pipe.tokenizer.decode(ids, skip_special_tokens=skip) for ids in new_ids],
        new_token_ids=[_trim(ids, stop_ids) for ids in new_ids],
        prompt_token_ids=prompt_ids,
        generation_seconds=elapsed,
        generation_config=effective_generation(pipe, call_kwargs),
        step_seconds=criteria.steps,
        shared_cores=share.elsewhere,
    )


@task(name="generate-text", cache_policy=NO_CACHE)
def generate_text(generator: Generator, settings: GenerationSettings) -> Generations:
    """`set_seed(random_seed)` and one pipeline call; measure time and new tokens."""
    logger = get_run_logger()

    def report(tokens: int, total: int | None, seconds: float) -> None:
        of = f" of {total}" if total else ""
        logger.info("Generating: %d%s new tokens per sequence (%.0f s)", tokens, of, seconds)

    generations = run_generation(generator, settings, progress=report)
    logger.info(
        "Generated %d sequences, %d new tokens in %.2f s (%.1f tokens/s)",
        len(generations.texts),
        generations.total_new_tokens,
        generations.generation_seconds,
        generations.tokens_per_second,
    )
    if shared(generations.shared_cores):
        logger.warning(
            "Other work kept %.1f cores busy while this generated: its speed is recorded, "
            "and compare says it is not comparable",
            generations.shared_cores,
        )
    return generations
