"""Decode speed against the hardware: tokens per second of the generate step against the
memory-bandwidth bound of this machine, for a GPT-2-size model in float32 and in bfloat16.

Each decode step reads every weight once (the sequences of one call share it), so the fastest
a step can be is weight bytes / read bandwidth; the bound in tokens per second is that rate
times the number of sequences. Bandwidth is measured here, in the same process, as torch's
sum over a 1 GiB tensor (all threads torch uses). Reported: measured / bound.

    .venv/bin/python benchmarks/decode_speed.py [--repeats 5] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import time

from _common import PROMPT, bench_dir, gpt2_124m, median, print_header


def read_bandwidth(repeats: int = 7) -> float:
    """Bytes per second torch reads from memory (sum over a 1 GiB float32 tensor)."""
    import torch

    data = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    data.sum()  # fault the pages in
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        data.sum()
        samples.append(time.perf_counter() - started)
    return data.numel() * data.element_size() / median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--sequences", type=int, default=5)
    args = parser.parse_args()
    print_header("decode speed: generate step / memory-bandwidth bound")

    from tasks.generate import run_generation
    from tasks.model import build_generator
    from tasks.settings import GenerationSettings

    folder = gpt2_124m(bench_dir() / "gpt2-124m")
    bandwidth = read_bandwidth()
    print(f"read bandwidth: {bandwidth / 1e9:.2f} GB/s")
    for dtype in ("float32", "bfloat16"):
        settings = GenerationSettings(
            model=str(folder),
            initial_sentence=PROMPT,
            max_new_tokens=args.new_tokens,
            num_return_sequences=args.sequences,
            dtype=dtype,  # type: ignore[arg-type]
        )
        generator = build_generator(settings)
        model = generator.pipeline.model
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        params = sum(p.numel() for p in model.parameters())
        run_generation(generator, settings)  # warm-up
        rates, steps = [], []
        for _ in range(args.repeats):
            generations = run_generation(generator, settings)
            rates.append(generations.tokens_per_second)
            steps.append(generations.generation_seconds / max(generations.new_tokens))
        bound_steps = bandwidth / weight_bytes
        bound_tokens = bound_steps * args.sequences
        measured = median(rates)
        print(
            f"\n{dtype}: {params / 1e6:.1f}M parameters, {weight_bytes / 1e6:.0f} MB of weights, "
            f"{args.sequences} sequences x {args.new_tokens} new tokens"
        )
        print(f"  measured : {measured:.1f} tokens/s ({median(steps) * 1000:.1f} ms per step)")
        print(f"  bound    : {bound_tokens:.1f} tokens/s ({1000 / bound_steps:.1f} ms per step)")
        print(f"  ratio measured / bound: {measured / bound_tokens:.3f}")


if __name__ == "__main__":
    main()
