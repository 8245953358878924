"""Generation parity: the original example's bare script against the flow's generate step.

Baseline: `pipeline("text-generation", model=...)`, `set_seed`, one call, as the original script
does. Candidate: the body of the flow's `generate_text` task (`run_generation`). Same model, same
settings, each loaded once; the generation calls alternate, and only they are timed.
Target: flow / bare <= 1.05 on generation time, identical texts.

    .venv/bin/python benchmarks/generation_parity.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import time

from _common import PROMPT, bench_dir, gpt2_124m, median, print_header, spread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print_header("generation parity: flow's generate step / bare pipeline call")

    from prefect.logging import disable_run_logger
    from transformers import pipeline, set_seed

    from tasks.generate import generate_text
    from tasks.model import build_generator
    from tasks.offline import offline_model
    from tasks.settings import GenerationSettings

    models = {
        "gpt2-124m (random weights, float32)": gpt2_124m(bench_dir() / "gpt2-124m"),
        "SmolLM2-135M (float32)": offline_model(),
    }
    cases = {
        "original (max_length 30, 5 sequences)": {"max_length": 30, "num_return_sequences": 5},
        "longer (max_new_tokens 100, 5 sequences)": {
            "max_new_tokens": 100,
            "num_return_sequences": 5,
        },
    }
    for model_name, folder in models.items():
        bare = pipeline("text-generation", model=str(folder), device="cpu")
        for case_name, knobs in cases.items():
            settings = GenerationSettings(model=str(folder), initial_sentence=PROMPT, **knobs)
            generator = build_generator(settings)
            kwargs = settings.pipeline_kwargs()
            bare_times: list[float] = []
            flow_times: list[float] = []
            same = True
            for index in range(args.repeats + 1):
                order = ("bare", "flow") if index % 2 == 0 else ("flow", "bare")
                texts = {}
                for which in order:
                    if which == "bare":
                        set_seed(settings.random_seed)
                        started = time.perf_counter()
                        out = bare(PROMPT, **kwargs)
                        elapsed = time.perf_counter() - started
                        texts["bare"] = [o["generated_text"] for o in out]
                        if index:
                            bare_times.append(elapsed)
                    else:
                        with disable_run_logger():
                            started = time.perf_counter()
                            generations = generate_text.fn(generator, settings)
                            elapsed = time.perf_counter() - started
                        texts["flow"] = generations.texts
                        if index:  # the first round warms both up
                            flow_times.append(elapsed)
                same = same and texts["bare"] == texts["flow"]
            ratio = median(flow_times) / median(bare_times)
            tokens = generations.total_new_tokens
            print(f"\n{model_name}, {case_name}: {tokens} new tokens per call")
            print(f"  bare pipeline call : {spread(bare_times)}")
            print(f"  flow generate step : {spread(flow_times)}")
            print(f"  ratio flow / bare  : {ratio:.3f} (target <= 1.05)   identical texts: {same}")


if __name__ == "__main__":
    main()
