"""Several prompts in one generate() call, each with the texts the one-prompt form gives it.

Prompts of the same length in tokens share a call (no padding). Sampling stays per prompt: a
logits processor holds, for each prompt, a `torch.Generator` seeded as `set_seed(random_seed)`
seeds torch's own, applies to that prompt's rows the sampling warpers generate() would apply
(temperature, top-k, top-p, ...: the same classes, values and order), and draws its tokens with
`torch.multinomial` on those rows alone: the draws of the one-prompt call. It returns scores
that are -inf but at the drawn token, and generate() itself runs greedy on inputs repeated here
as it would repeat them, so it picks exactly those tokens and draws nothing of its own.

What this rests on:
- transformers' private `_prepare_generation_config` (the call's generation config) and the
  order of the warpers in `GenerationMixin._get_logits_processor`, both checked by
  tests/test_internals.py;
- the model giving each row the same logits whatever else is in the batch. CPU matrix
  products are computed row by row in the same order for any batch on the machines measured
  (`benchmarks/eval_set.py` compares every text with the one-prompt calls), but no library
  promises it: `TEXTGEN_BATCH_PROMPTS=0` generates each prompt on its own, as the original
  script's call, for texts that are the one-prompt form's by construction.

Beam search (`num_beams` > 1) and generation configs with watermarking or renormalised logits
are generated prompt by prompt.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from tasks.generate import Generations, _trim, effective_generation
from tasks.machine import CoreShare
from tasks.model import Generator
from tasks.settings import GenerationSettings

SAMPLING_KEYS = (
    "temperature",
    "top_h",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
)


def _warpers(config: Any, device: Any) -> list[Any] | None:
    """generate()'s sampling warpers for `config`, in its order; None where it would add
    something this cannot reproduce."""
    from transformers.generation import logits_process as lp

    if config.watermarking_config is not None or config.renormalize_logits:
        return None
    found: list[Any] = []
    if config.temperature is not None and config.temperature != 1.0:
        found.append(lp.TemperatureLogitsWarper(config.temperature))
    if config.top_h is not None:
        found.append(lp.TopHLogitsWarper(top_h=config.top_h))
    if config.top_k is not None and config.top_k != 0:
        found.append(lp.TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
    if config.top_p is not None and config.top_p < 1.0:
        found.append(lp.TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    if config.min_p is not None:
        found.append(lp.MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=1))
    if config.typical_p is not None and config.typical_p < 1.0:
        found.append(lp.TypicalLogitsWarper(mass=config.typical_p, min_tokens_to_keep=1))
    if config.epsilon_cutoff is not None and 0.0 < config.epsilon_cutoff < 1.0:
        found.append(lp.EpsilonLogitsWarper(epsilon=config.epsilon_cutoff, min_tokens_to_keep=1))
    if config.eta_cutoff is not None and 0.0 < config.eta_cutoff < 1.0:
        found.append(
            lp.EtaLogitsWarper(epsilon=config.eta_cutoff, min_tokens_to_keep=1, device=device)
        )
    return found


def _sampler(warpers: list[Any], generators: list[Any], rows: int) -> Any:
    import torch
    from transformers import LogitsProcessor

    class PerPromptSampler(LogitsProcessor):
        """Each prompt's rows sampled with its own generator, as generate() samples them."""

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            out = torch.full_like(scores, -float("inf"))
            for index, generator in enumerate(generators):
                block = slice(index * rows, (index + 1) * rows)
                warped, ids = scores[block], input_ids[block]
                for warper in warpers:
                    warped = warper(ids, warped)
                probs = torch.nn.functional.softmax(warped, dim=-1)
                drawn = torch.multinomial(probs, num_samples=1, generator=generator)
                out[block].scatter_(1, drawn, 0.0)
            return out

    return PerPromptSampler()


def plan_call(generator: Generator, settings: GenerationSettings) -> dict[str, Any] | None:
    """How a batch of prompts with these settings is generated: the generate() keyword
    arguments, the warpers and the rows per prompt; None when only one prompt at a time can
    give the one-prompt form's texts."""
    pipe = generator.pipeline
    prepare = getattr(pipe, "_prepare_generate_kwargs", None)
    configure = getattr(pipe.model, "_prepare_generation_config", None)
    if not (callable(prepare) and callable(configure)) or (settings.num_beams or 1) > 1:
        return None
    kwargs = prepare(dict(settings.pipeline_kwargs()))
    config, _ = configure(None, **kwargs)
    if (config.num_beams or 1) > 1:
        return None
    rows = config.num_return_sequences or 1
    call = dict(kwargs, do_sample=False, num_return_sequences=1)
    warpers: list[Any] | None = []
    if config.do_sample:
        # generate() runs greedy here: it adds no warpers of its own, and is given none of
        # their settings (it would warn that they are ignored).
        warpers = _warpers(config, pipe.model.device)
        call.update(dict.fromkeys(SAMPLING_KEYS))
    if warpers is None:
        return None
    return {"call": call, "warpers": warpers, "rows": rows, "sample": bool(config.do_sample)}


def generate_batch(
    generator: Generator, settings: list[GenerationSettings], plan: dict[str, Any]
) -> list[Generations]:
    """The texts of prompts of one length (each its settings' `initial_sentence`, the rest of
    the settings alike), as one generate() call."""
    import torch

    pipe = generator.pipeline
    tokenizer = pipe.tokenizer
    prompts = [s.initial_sentence for s in settings]
    encoded = [list(tokenizer(p)["input_ids"]) for p in prompts]
    length = len(encoded[0])
    rows = plan["rows"]
    device = pipe.model.device
    ids = torch.tensor(encoded, device=device).repeat_interleave(rows, 0)
    extra: dict[str, Any] = {}
    if plan["sample"]:
        seeded = [torch.Generator(device=device).manual_seed(s.random_seed) for s in settings]
        from transformers import LogitsProcessorList

        extra["logits_processor"] = LogitsProcessorList([_sampler(plan["warpers"], seeded, rows)])
    started = time.perf_counter()
    with CoreShare() as share, torch.inference_mode():
        out = pipe.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), **plan["call"], **extra
        )
    seconds = time.perf_counter() - started
    skip = not getattr(tokenizer, "response_template", None)
    stop = pipe.model.generation_config.eos_token_id
    stop_ids = set(stop if isinstance(stop, list) else [stop] if stop is not None else [])
    made = out.reshape(len(prompts), rows, -1)
    config = effective_generation(pipe, settings[0].pipeline_kwargs())
    results = []
    tokens = [[_trim(row[length:].tolist(), stop_ids) for row in block] for block in made]
    total = sum(len(t) for block in tokens for t in block) or 1
    for prompt, prompt_ids, block, new in zip(prompts, encoded, made, tokens, strict=True):
        share_of_time = seconds * sum(len(t) for t in new) / total
        results.append(
            Generations(
                prompt=prompt,
                texts=[
                    prompt + tokenizer.decode(row[length:].tolist(), skip_special_tokens=skip)
                    for row in block
                ],
                new_token_ids=new,
                prompt_token_ids=prompt_ids,
                generation_seconds=share_of_time,
                generation_config=config,
                shared_cores=share.elsewhere,
            )
        )
    return results


MAX_ROWS = 64
"""Most rows (prompts x sequences) one call generates: its cache grows with them."""


def batches(generator: Generator, prompts: list[str], rows: int) -> list[list[int]]:
    """The indexes of the prompts in batches: prompts of one length in tokens, at most
    `MAX_ROWS` rows a batch."""
    groups: dict[int, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        groups[len(generator.pipeline.tokenizer(prompt)["input_ids"])].append(index)
    size = max(1, MAX_ROWS // max(1, rows))
    return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]
