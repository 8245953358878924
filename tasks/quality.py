"""Quality metrics of one version's texts, logged to MLflow so its compare view can chart them.

- `distinct_1`, `distinct_2`: unique word unigrams (bigrams) over all word unigrams (bigrams) of
  the generated continuations, pooled over the sequences (Li et al., 2016). Higher is more varied.
- `repetition_rate`: the share of word trigrams in a continuation that already occurred earlier
  in the same continuation, averaged over sequences. 0 means no phrase repeats.
- `mean_new_tokens`: new tokens per sequence.
- `mean_log_likelihood`: the mean log-probability (nats per token) of the generated tokens under
  the model that produced them, at temperature 1 and without sampling filters; `perplexity` is
  its exponential's inverse. One extra forward pass of the same model, no second model.

A continuation is the text after the prompt; words are lower-cased runs of letters, digits and
apostrophes, so the measures compare across tokenizers.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.generate import Generations
from tasks.model import Generator

_WORD = re.compile(r"[\w']+")


def words(text: str) -> list[str]:
    """Lower-cased words of a text."""
    return _WORD.findall(text.lower())


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(continuations: list[list[str]], n: int) -> float:
    """Unique n-grams over all n-grams, pooled over the continuations (0 when there are none)."""
    grams = [g for tokens in continuations for g in _ngrams(tokens, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(continuations: list[list[str]], n: int = 3) -> float:
    """Mean share of n-grams that repeat an earlier n-gram of the same continuation."""
    rates = []
    for tokens in continuations:
        grams = _ngrams(tokens, n)
        if grams:
            rates.append(1 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else 0.0


def continuation_words(generations: Generations) -> list[list[str]]:
    """The words each sequence added after the prompt."""
    prompt = generations.prompt
    return [words(t[len(prompt) :] if t.startswith(prompt) else t) for t in generations.texts]


def mean_log_likelihood(model: Any, prompt_ids: list[int], new_token_ids: list[list[int]]) -> float:
    """Token-weighted mean log-probability of the new tokens given everything before them."""
    import torch

    total, count = 0.0, 0
    device = model.device
    with torch.inference_mode():
        for new in new_token_ids:
            if not new:
                continue
            ids = torch.tensor([prompt_ids + new], device=device)
            # Only the logits that predict the new tokens: the last len(new) + 1 positions.
            try:
                logits = model(input_ids=ids, logits_to_keep=len(new) + 1).logits[0, :-1]
            except TypeError:  # a model without `logits_to_keep`
                logits = model(input_ids=ids).logits[0, -(len(new) + 1) : -1]
            if not prompt_ids:  # nothing predicts the first token
                new = new[1:]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            picked = logprobs.gather(-1, torch.tensor(new, device=device).unsqueeze(-1))
            total += float(picked.sum())
            count += len(new)
    return total / count if count else float("nan")


def quality_metrics(model: Any, generations: Generations) -> dict[str, float]:
    """Every quality metric of one run's generations, plus how long scoring took."""
    started = time.perf_counter()
    continuations = continuation_words(generations)
    loglik = mean_log_likelihood(model, generations.prompt_token_ids, generations.new_token_ids)
    return {
        "distinct_1": distinct_n(continuations, 1),
        "distinct_2": distinct_n(continuations, 2),
        "repetition_rate": repetition_rate(continuations),
        "mean_new_tokens": generations.total_new_tokens / max(1, len(generations.texts)),
        "mean_log_likelihood": loglik,
        "perplexity": math.exp(-loglik) if math.isfinite(loglik) else float("nan"),
        "scoring_seconds": time.perf_counter() - started,  # last: it times the entries above
    }


@task(name="score-text", cache_policy=NO_CACHE)
def score_text(generator: Generator, generations: Generations) -> dict[str, float]:
    """Quality metrics of the generated texts (one extra forward pass of the same model)."""
    metrics = quality_metrics(generator.pipeline.model, generations)
    logged = ("distinct_1", "distinct_2", "repetition_rate", "mean_log_likelihood")
    get_run_logger().info(
        "distinct-1 %.3f, distinct-2 %.3f, repetition %.3f, mean log-likelihood %.3f nats/token",
        *(metrics[name] for name in logged),
    )
    return metrics
