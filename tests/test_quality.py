"""Quality metrics: distinct-n, repetition, and the log-likelihood under the generating model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tasks.generate import Generations, run_generation
from tasks.model import build_generator
from tasks.quality import (
    continuation_words,
    distinct_n,
    mean_log_likelihood,
    quality_metrics,
    repetition_rate,
    words,
)
from tasks.settings import GenerationSettings


def test_distinct_n_and_repetition_on_known_words() -> None:
    assert words("Hello, it's 2 PM!") == ["hello", "it's", "2", "pm"]
    assert distinct_n([["a", "b", "a"]], 1) == pytest.approx(2 / 3)
    assert distinct_n([["a", "b", "a"]], 2) == 1.0
    assert distinct_n([["a", "b"], ["a", "b"]], 2) == 0.5  # pooled over sequences
    assert distinct_n([[]], 2) == 0.0
    assert repetition_rate([["a", "b", "c", "a", "b", "c"]]) == pytest.approx(0.25)
    assert repetition_rate([["a", "b", "c", "d"], ["x", "y", "x", "y", "x"]]) == pytest.approx(
        (0 + 1 / 3) / 2
    )
    generations = Generations(
        prompt="Hi there,",
        texts=["Hi there, you you", "Other text"],
        new_token_ids=[[1, 2], [3]],
        prompt_token_ids=[9],
        generation_seconds=1.0,
        generation_config={},
    )
    assert continuation_words(generations) == [["you", "you"], ["other", "text"]]


def test_log_likelihood_matches_a_direct_computation(tiny_model: Path) -> None:
    import torch

    settings = GenerationSettings(model=str(tiny_model), num_return_sequences=3, max_length=20)
    generator = build_generator(settings)
    generations = run_generation(generator, settings)
    model = generator.pipeline.model
    expected_total, expected_count = 0.0, 0
    with torch.inference_mode():
        for new in generations.new_token_ids:
            ids = torch.tensor([generations.prompt_token_ids + new])
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            start = len(generations.prompt_token_ids)
            for position, token in enumerate(new):
                expected_total += float(logprobs[start + position - 1, token])
                expected_count += 1
    value = mean_log_likelihood(model, generations.prompt_token_ids, generations.new_token_ids)
    assert value == pytest.approx(expected_total / expected_count, rel=1e-5)
    assert value < 0


def test_greedy_text_is_likelier_than_sampled_text(tiny_model: Path) -> None:
    sampled = GenerationSettings(
        model=str(tiny_model),
        num_return_sequences=4,
        max_new_tokens=12,
        do_sample=True,
        temperature=1.5,
    )
    greedy = GenerationSettings(
        model=str(tiny_model), num_return_sequences=1, max_new_tokens=12, do_sample=False
    )
    generator = build_generator(sampled)
    hot = quality_metrics(generator.pipeline.model, run_generation(generator, sampled))
    best = quality_metrics(generator.pipeline.model, run_generation(generator, greedy))
    assert best["mean_log_likelihood"] > hot["mean_log_likelihood"]
    assert best["perplexity"] == pytest.approx(math.exp(-best["mean_log_likelihood"]))
    assert set(hot) == {
        "distinct_1",
        "distinct_2",
        "repetition_rate",
        "mean_new_tokens",
        "mean_log_likelihood",
        "perplexity",
        "scoring_seconds",
    }
    assert 0 <= hot["distinct_1"] <= 1 and 0 <= hot["repetition_rate"] <= 1
