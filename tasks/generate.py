"""Generate text as the original example does: `set_seed(random_seed)`, then one pipeline call.

The call goes through the pipeline's own preprocess, forward and postprocess steps (what
`pipeline(prompt, **kwargs)` runs for one prompt), so the texts are the pipeline's, and the
token ids it generated are kept for counting and scoring.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.errors import SettingsError
from tasks.model import Generator
from tasks.settings import GenerationSettings

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


def format_output(texts: list[str]) -> str:
    """`output.txt` exactly as the original script wrote it."""
    count = len(texts)
    parts = []
    for index, text in enumerate(texts, start=1):
        parts.append(f"---\nOutput {index} of {count}\n---\n\n{text}\n")
        if index < count:
            parts.append("\n")
    return "".join(parts)


def _effective_generation(pipe: Any, forward_params: dict[str, Any]) -> dict[str, Any]:
    """The decoding parameters generate() will use: its defaults, under the model's generation
    config, under what the pipeline adds (its sampling default), under the call's own."""
    from transformers import GenerationConfig

    values: dict[str, Any] = {}
    defaults = getattr(GenerationConfig, "_get_default_generation_params", None)
    if callable(defaults):
        values.update(defaults())
    values.update(pipe.model.generation_config.to_diff_dict())
    prepare = getattr(pipe, "_prepare_generate_kwargs", None)
    values.update(prepare(dict(forward_params)) if callable(prepare) else forward_params)
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
    total: int | None, report: Callable[[int, int | None, float], None], every: float
) -> Any:
    """A stopping criterion that never stops: generate() calls it once per new token, and it
    calls `report(tokens so far, total, seconds)` at most every `every` seconds. It reads
    nothing and draws no random numbers, so the texts are the same with it as without."""
    import torch
    from transformers import StoppingCriteria

    class TokenProgress(StoppingCriteria):
        def __init__(self) -> None:
            self.tokens = 0
            self.started = self.last = time.perf_counter()

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            self.tokens += 1
            now = time.perf_counter()
            if now - self.last >= every:
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
    """Seed, then generate the texts with the pipeline for the settings; `progress` hears of
    the tokens made so far every `every` seconds."""
    import torch
    from transformers import StoppingCriteriaList, set_seed

    pipe = generator.pipeline
    call_kwargs = settings.pipeline_kwargs()
    # As Pipeline.__call__ does for a single prompt.
    preprocess, forward, postprocess = pipe._sanitize_parameters(**call_kwargs)
    preprocess = {**pipe._preprocess_params, **preprocess}
    forward = {**pipe._forward_params, **forward}
    postprocess = {**pipe._postprocess_params, **postprocess}
    prompt = settings.initial_sentence

    prompt_tokens = len(pipe.tokenizer(prompt)["input_ids"])
    check_context(generator, settings, prompt_tokens)
    model_inputs = pipe.preprocess(prompt, **preprocess)
    run_kwargs = dict(forward)
    if progress is not None:
        effective = settings.effective()
        total = effective.max_new_tokens or (
            effective.max_length - prompt_tokens if effective.max_length else None
        )
        run_kwargs["stopping_criteria"] = StoppingCriteriaList(
            [progress_criteria(total, progress, every)]
        )

    set_seed(settings.random_seed)
    started = time.perf_counter()
    model_outputs = pipe.forward(model_inputs, **run_kwargs)
    records = pipe.postprocess(model_outputs, **postprocess)
    if generator.device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started

    prompt_ids = model_outputs["input_ids"]
    prompt_len = 0 if prompt_ids is None else int(prompt_ids.shape[-1])
    sequences = model_outputs["generated_sequence"][0].tolist()
    config = pipe.model.generation_config
    stop = config.eos_token_id
    stop_ids = set(stop if isinstance(stop, list) else [stop] if stop is not None else [])
    return Generations(
        prompt=prompt,
        texts=[record["generated_text"] for record in records],
        new_token_ids=[_trim(seq[prompt_len:], stop_ids) for seq in sequences],
        prompt_token_ids=[] if prompt_ids is None else prompt_ids[0].tolist(),
        generation_seconds=elapsed,
        generation_config=_effective_generation(pipe, forward),
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
    return generations
