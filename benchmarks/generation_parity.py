"""Generation parity: the original example's bare script against the flow's generate step.

Baseline: `pipeline("text-generation", model=...)`, `set_seed`, one call, as the original script
does, on the model as transformers loads it. Candidate: the body of the flow's `generate_text`
task (`run_generation`) on the model as the flow loads it (`build_generator`: packed linear
weights on CPU, `tasks/packing.py`). Each loaded once.

1. Speed: the seed's settings (max_length 30, 5 sequences) and 5 x 100 new tokens; calls
   alternate, only they are timed. Target: bare / flow >= 1.5 (the flow faster).
2. Identical texts: 22 (seed, settings) cases across sampling, greedy and beam search, on both
   models; every text of every case must be the bare pipeline's.

    .venv/bin/python benchmarks/generation_parity.py [--repeats 5] [--skip-speed]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from _common import PROMPT, bench_dir, gpt2_124m, median, print_header, spread

SPEED_CASES: dict[str, dict[str, Any]] = {
    "seed settings (max_length 30, 5 sequences)": {"max_length": 30, "num_return_sequences": 5},
    "5 x 100 new tokens": {"max_new_tokens": 100, "num_return_sequences": 5},
}

SAMPLE = {"max_new_tokens": 40, "num_return_sequences": 3}
GREEDY = {"max_new_tokens": 40, "do_sample": False, "num_return_sequences": 1}
BEAM = {"max_new_tokens": 30, "do_sample": False}

# (seed, settings): 22 cases.
TEXT_CASES: list[tuple[int, dict[str, Any]]] = [
    (42, {"max_length": 30, "num_return_sequences": 5}),  # the seed's settings
    (0, {"max_new_tokens": 100, "num_return_sequences": 5}),
    *[(seed, SAMPLE) for seed in (1, 2, 3, 1234)],
    (5, {**SAMPLE, "temperature": 0.7}),
    (6, {**SAMPLE, "temperature": 1.3, "top_k": 10}),
    (7, {**SAMPLE, "top_k": 0, "top_p": 0.9}),
    (8, {**SAMPLE, "top_k": 0, "top_p": 0.5, "temperature": 0.8}),
    (9, {**SAMPLE, "typical_p": 0.8}),
    (10, {**SAMPLE, "repetition_penalty": 1.3}),
    (11, {**SAMPLE, "no_repeat_ngram_size": 2}),
    (12, {"max_new_tokens": 40, "num_return_sequences": 1}),
    (13, {"max_new_tokens": 40, "num_return_sequences": 8}),
    (14, GREEDY),
    (15, {**GREEDY, "repetition_penalty": 1.2}),
    (16, {**GREEDY, "no_repeat_ngram_size": 3}),
    (17, {**BEAM, "num_beams": 2, "num_return_sequences": 1}),
    (18, {**BEAM, "num_beams": 4, "num_return_sequences": 3}),
    (19, {**BEAM, "num_beams": 4, "num_return_sequences": 2, "no_repeat_ngram_size": 2}),
    (20, {"max_new_tokens": 30, "num_beams": 3, "do_sample": True, "num_return_sequences": 3}),
]


def describe(seed: int, values: dict[str, Any]) -> str:
    knobs = ", ".join(f"{k} {v}" for k, v in values.items())
    return f"seed {seed}, {knobs}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    print_header("generation parity: flow's generate step / bare pipeline call")

    from prefect.logging import disable_run_logger
    from transformers import pipeline, set_seed

    from tasks.generate import generate_text
    from tasks.model import build_generator
    from tasks.offline import offline_model
    from tasks.settings import GenerationSettings

    models = {
        "gpt2-124m": gpt2_124m(bench_dir() / "gpt2-124m"),
        "SmolLM2-135M": offline_model(),
    }
    same: dict[tuple[int, str], bool] = {}
    for model_name, folder in models.items():
        bare = pipeline("text-generation", model=str(folder), device="cpu")

        def bare_call(settings: GenerationSettings, pipe: Any = bare) -> tuple[float, list[str]]:
            set_seed(settings.random_seed)
            started = time.perf_counter()
            out = pipe(settings.initial_sentence, **settings.pipeline_kwargs())
            return time.perf_counter() - started, [o["generated_text"] for o in out]

        def flow_call(settings: GenerationSettings) -> tuple[float, list[str], int]:
            generator = build_generator(settings)
            with disable_run_logger():
                started = time.perf_counter()
                generations = generate_text.fn(generator, settings)
                elapsed = time.perf_counter() - started
            return elapsed, generations.texts, generations.total_new_tokens

        fast_path = build_generator(GenerationSettings(model=str(folder))).fast_path
        print(f"\n{model_name} (float32), flow fast path: {fast_path}")
        if not args.skip_speed:
            for case_name, knobs in SPEED_CASES.items():
                settings = GenerationSettings(model=str(folder), initial_sentence=PROMPT, **knobs)
                bare_times: list[float] = []
                flow_times: list[float] = []
                identical = True
                for index in range(args.repeats + 1):
                    order = (0, 1) if index % 2 == 0 else (1, 0)
                    texts: dict[int, list[str]] = {}
                    for which in order:
                        if which == 0:
                            elapsed, texts[0] = bare_call(settings)
                            if index:  # the first round warms both up
                                bare_times.append(elapsed)
                        else:
                            elapsed, texts[1], tokens = flow_call(settings)
                            if index:
                                flow_times.append(elapsed)
                    identical = identical and texts[0] == texts[1]
                speedup = median(bare_times) / median(flow_times)
                print(f"  {case_name}: {tokens} new tokens per call")
                print(f"    bare pipeline call : {spread(bare_times)}")
                print(f"    flow generate step : {spread(flow_times)}")
                print(
                    f"    speed-up bare / flow: {speedup:.2f}x (target >= 1.5)   "
                    f"identical texts: {identical}"
                )
        for index, (seed, values) in enumerate(TEXT_CASES):
            settings = GenerationSettings(
                model=str(folder), initial_sentence=PROMPT, random_seed=seed, **values
            )
            same[(index, model_name)] = bare_call(settings)[1] == flow_call(settings)[1]

    names = list(models)
    print("\n| # | seed, settings | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for index, (seed, values) in enumerate(TEXT_CASES):
        cells = " | ".join("same" if same[(index, n)] else "DIFFERENT" for n in names)
        print(f"| {index + 1} | {describe(seed, values)} | {cells} |")
    total = sum(same.values())
    print(f"\nidentical: {total} of {len(same)} (case, model) pairs")


if __name__ == "__main__":
    main()
