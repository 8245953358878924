"""The packed-weight fast path: the pipeline's texts, unchanged, on the tiny and the offline model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tasks.generate import run_generation
from tasks.model import build_generator
from tasks.packing import pack_linears, packed_linear_class
from tasks.settings import GenerationSettings

# (seed, settings): sampling as the example does, then greedy, beam search and other knobs.
CASES: list[tuple[int, dict[str, Any]]] = [
    (42, {"max_length": 30, "num_return_sequences": 5}),
    (1, {"max_new_tokens": 24, "num_return_sequences": 3}),
    (7, {"max_new_tokens": 24, "do_sample": False, "num_return_sequences": 1}),
    (7, {"max_new_tokens": 20, "num_beams": 4, "do_sample": False, "num_return_sequences": 2}),
    (3, {"max_new_tokens": 24, "top_k": 0, "top_p": 0.9, "temperature": 0.8}),
    (5, {"max_new_tokens": 24, "repetition_penalty": 1.3, "no_repeat_ngram_size": 3}),
]


def plain_texts(model: str, seed: int, settings: dict[str, Any], prompt: str) -> list[str]:
    """What the original script's `pipeline(...)` call gives, on a model loaded as transformers
    loads it."""
    from transformers import set_seed

    pipe = _plain(model)
    set_seed(seed)
    return [out["generated_text"] for out in pipe(prompt, **settings)]


_PLAIN: dict[str, Any] = {}


def _plain(model: str) -> Any:
    from transformers import pipeline

    if model not in _PLAIN:
        _PLAIN.clear()
        _PLAIN[model] = pipeline("text-generation", model=model, device="cpu")
    return _PLAIN[model]


def packed_layers(model: Any) -> int:
    cls = packed_linear_class()
    return sum(isinstance(module, cls) for module in model.modules())


def check_same_texts(model: Path) -> None:
    for seed, values in CASES:
        settings = GenerationSettings(model=str(model), random_seed=seed, **values)
        generator = build_generator(settings)
        assert generator.fast_path.startswith("packed-linear"), generator.fast_path
        assert packed_layers(generator.pipeline.model) > 0
        got = run_generation(generator, settings).texts
        assert got == plain_texts(
            str(model), seed, settings.pipeline_kwargs(), settings.initial_sentence
        ), (seed, values)


def test_packed_tiny_model_gives_the_pipelines_texts(tiny_model: Path) -> None:
    check_same_texts(tiny_model)


def test_packing_replaces_every_linear_and_keeps_tied_embeddings(tiny_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    embedding = model.transformer.wte.weight
    packing = pack_linears(model, "cpu")
    # 2 layers x (c_attn, c_proj, c_fc, mlp c_proj) + the tied output projection.
    assert packing.layers == 9 == packed_layers(model)
    assert packing.extra_bytes == embedding.numel() * embedding.element_size()
    assert model.transformer.wte.weight is embedding
    with torch.inference_mode():
        after = model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-5)


def test_a_model_that_reads_a_layers_weight_is_left_unpacked(tiny_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.modeling_outputs import CausalLMOutput

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    real_forward = model.transformer.forward

    def forward(input_ids: Any = None, **kwargs: Any) -> Any:
        hidden = real_forward(input_ids=input_ids).last_hidden_state
        return CausalLMOutput(logits=hidden @ model.lm_head.weight.T)

    model.forward = forward  # type: ignore[method-assign]
    packing = pack_linears(model, "cpu")
    assert packing.layers == 0
    assert packing.describe() == "none (packed forward failed: AttributeError)"
    assert packed_layers(model) == 0
    assert type(model.lm_head) is torch.nn.Linear


def test_operator_can_turn_packing_off(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEXTGEN_PACKED_WEIGHTS", "0")
    settings = GenerationSettings(model=str(tiny_model), max_length=24)
    generator = build_generator(settings)
    assert generator.fast_path == "none (TEXTGEN_PACKED_WEIGHTS=0)"
    assert generator.describe()["model.fast_path"] == generator.fast_path
    assert packed_layers(generator.pipeline.model) == 0
    kwargs = settings.pipeline_kwargs()
    assert run_generation(generator, settings).texts == plain_texts(
        str(tiny_model), 42, kwargs, settings.initial_sentence
    )


def test_other_devices_and_dtypes_are_not_packed(tiny_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    assert pack_linears(model, "cuda").describe() == "none (device cuda)"
    half = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float16).eval()
    assert pack_linears(half, "cpu").describe() == "none (dtype float16)"
    assert packed_layers(model) == packed_layers(half) == 0


@pytest.mark.slow
def test_packed_offline_model_gives_the_pipelines_texts() -> None:
    from tasks.offline import offline_model

    check_same_texts(offline_model())
