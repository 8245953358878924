"""Loading and generating with the tiny GPT-2: parity with a plain pipeline call, seeds, tokens."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tasks.errors import ModelError
from tasks.evaluation import format_output
from tasks.generate import run_generation
from tasks.model import build_generator, folder_digest, model_kind, resolve_device
from tasks.settings import GenerationSettings


def original_output_file(texts: list[str], num_return_sequences: int) -> str:
    """The original example's writing loop, verbatim but for the file object."""
    f = io.StringIO()
    ival = 1
    for val in [{"generated_text": t} for t in texts]:
        print("---\nOutput {} of {}\n---\n".format(ival, num_return_sequences), file=f)  # noqa: UP032
        print(val["generated_text"], file=f)
        if ival < num_return_sequences:
            print(file=f)
        ival += 1
    return f.getvalue()


@pytest.mark.parametrize("texts", [["one"], ["Hello, a", "Hello\nb", ""], ["x"] * 5])
def test_output_txt_is_byte_identical_to_the_original_script(texts: list[str]) -> None:
    assert format_output(texts) == original_output_file(texts, len(texts))


def test_generation_matches_a_plain_pipeline_call(tiny_model: Path) -> None:
    from transformers import pipeline, set_seed

    settings = GenerationSettings(model=str(tiny_model), max_length=24, num_return_sequences=3)
    generations = run_generation(build_generator(settings), settings)
    plain = pipeline("text-generation", model=str(tiny_model), device="cpu")
    set_seed(42)
    expected = plain(settings.initial_sentence, max_length=24, num_return_sequences=3)
    assert generations.texts == [e["generated_text"] for e in expected]
    assert all(t.startswith(settings.initial_sentence) for t in generations.texts)


def test_same_seed_same_text_other_seed_other_text(tiny_model: Path) -> None:
    settings = GenerationSettings(model=str(tiny_model), random_seed=1)
    generator = build_generator(settings)
    first = run_generation(generator, settings).texts
    assert run_generation(generator, settings).texts == first
    other = settings.model_copy(update={"random_seed": 2})
    assert run_generation(generator, other).texts != first


def test_counts_new_tokens_within_max_length(tiny_model: Path) -> None:
    settings = GenerationSettings(model=str(tiny_model), max_length=30, num_return_sequences=4)
    generations = run_generation(build_generator(settings), settings)
    prompt = len(generations.prompt_token_ids)
    assert prompt > 0
    assert len(generations.new_tokens) == 4
    assert all(1 <= n <= 30 - prompt for n in generations.new_tokens)
    assert generations.total_new_tokens == sum(generations.new_tokens)
    assert generations.tokens_per_second > 0
    # The pipeline samples by default, at its default temperature, up to max_length.
    assert generations.generation_config["do_sample"] is True
    assert generations.generation_config["max_length"] == 30


def test_greedy_decoding_gives_one_deterministic_sequence(tiny_model: Path) -> None:
    settings = GenerationSettings(
        model=str(tiny_model), do_sample=False, num_return_sequences=1, max_new_tokens=6
    )
    generator = build_generator(settings)
    first = run_generation(generator, settings)
    second = run_generation(generator, settings.model_copy(update={"random_seed": 99}))
    assert first.texts == second.texts  # greedy ignores the seed
    assert (
        first.new_tokens == [6]
        or first.new_token_ids[0][-1] == generator.pipeline.tokenizer.eos_token_id
    )
    assert first.generation_config["do_sample"] is False


def test_the_loaded_model_is_recorded_as_it_is(tiny_model: Path) -> None:
    settings = GenerationSettings(model=str(tiny_model))
    generator = build_generator(settings)
    assert generator.kind == "local"
    assert generator.revision == folder_digest(tiny_model)
    assert generator.loaded_from == str(tiny_model.resolve())
    assert generator.model_class == "GPT2LMHeadModel"
    assert generator.device == "cpu" and generator.dtype == "float32"
    again = build_generator(settings)
    assert again.cache_hit and again.load_seconds == 0.0
    assert again.pipeline is generator.pipeline


def test_model_kinds_and_missing_models(tmp_path: Path) -> None:
    assert model_kind("gpt2") == "hub"
    assert model_kind("EleutherAI/gpt-neo-125M") == "hub"
    assert model_kind("/models/x.gguf") == "gguf"
    assert model_kind(str(tmp_path)) == "local"
    with pytest.raises(ModelError, match="does not exist in the operator's model folders"):
        build_generator(GenerationSettings(model=str(tmp_path / "nope")))
    with pytest.raises(
        ModelError, match=r"nope.gguf' does not exist in the operator's model folders"
    ):
        build_generator(GenerationSettings(model=str(tmp_path / "nope.gguf")))


def test_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == "cpu"
    monkeypatch.setenv("TEXTGEN_DEVICE", "tpu")
    with pytest.raises(ModelError, match="allowed: auto, cpu, cuda, cuda:N, mps"):
        resolve_device()
