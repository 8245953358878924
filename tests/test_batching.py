"""Prompts of one length generated together give every prompt the texts it gets alone, across
sampling knobs, greedy decoding and lengths (tiny GPT-2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tasks.batching import MAX_ROWS, batches, generate_batch, plan_call
from tasks.evalset import Cell, Prompt, prompt_id
from tasks.generate import run_generation
from tasks.model import build_generator
from tasks.settings import parse_settings

PROMPTS = [
    "Hello, I'm a language model,",
    "Hello, I'm a language model!",
    "The weather today",
    "The weather tomorrow",
    "Once upon a time",
    "abc",
    "abd",
]


@pytest.mark.parametrize(
    "values",
    [
        {"max_new_tokens": 12, "num_return_sequences": 3},
        {"max_length": 40},
        {"max_new_tokens": 10, "temperature": 0.7, "top_p": 0.9, "top_k": 0},
        {"max_new_tokens": 10, "do_sample": False, "num_return_sequences": 1},
        {"max_new_tokens": 10, "typical_p": 0.8, "repetition_penalty": 1.3},
        {"max_new_tokens": 10, "no_repeat_ngram_size": 2, "random_seed": 5},
    ],
)
def test_a_batch_gives_each_prompt_its_own_texts(tiny_model: Path, values: dict[str, Any]) -> None:
    settings = parse_settings({"model": str(tiny_model), **values}, "t")
    generator = build_generator(settings)
    plan = plan_call(generator, settings)
    assert plan is not None
    cell = Cell("", {}, settings)
    prompts = [Prompt(prompt_id(p), p, "t") for p in PROMPTS]
    groups = batches(generator, PROMPTS, plan["rows"])
    assert any(len(group) > 1 for group in groups)  # some prompts do share a call
    for group in groups:
        together = generate_batch(generator, [cell.for_prompt(prompts[i]) for i in group], plan)
        for index, made in zip(group, together, strict=True):
            alone = run_generation(generator, cell.for_prompt(prompts[index]))
            assert made.texts == alone.texts, PROMPTS[index]
            assert made.new_token_ids == alone.new_token_ids
            assert made.prompt_token_ids == alone.prompt_token_ids


def test_beam_search_is_generated_prompt_by_prompt(tiny_model: Path) -> None:
    settings = parse_settings(
        {"model": str(tiny_model), "num_beams": 2, "num_return_sequences": 2, "do_sample": False},
        "t",
    )
    assert plan_call(build_generator(settings), settings) is None


def test_batches_are_bounded_in_rows(tiny_model: Path) -> None:
    settings = parse_settings({"model": str(tiny_model)}, "t")
    generator = build_generator(settings)
    same_length = [f"prompt {i:03d}" for i in range(40)]
    groups = batches(generator, same_length, 5)
    assert max(len(g) for g in groups) * 5 <= MAX_ROWS
    assert sorted(i for g in groups for i in g) == list(range(40))
