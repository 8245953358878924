"""Decode speed against the hardware: a decode step of the generate call against the
memory-bandwidth bound of this machine, for a GPT-2-size model (float32, then bfloat16), and
with `--large` for a GPT-Neo 1.3B-size one; each as transformers loads it and with the weights
packed (`tasks/packing.py`, the product's default on CPU), and with `--compiled` as an
experiment: the unpacked model's forward under `torch.compile` (inductor, freezing).

Each decode step reads every weight once (the sequences of one call share it), so the fastest
a step can be is weight bytes / read bandwidth. Bandwidth is measured here, in the same
process, as torch's sum over a 1 GiB tensor (all threads torch uses), before the first timed
step and again between every two timed calls: on a shared machine it swings with the
neighbours (49 and 83 GB/s have been seen at one commit), so the bound is taken from the best
bandwidth seen through the whole run, and the spread of both the bandwidth and the per-token
times is printed; the ratios are printed once everything has been measured. Two times per step:
`forward` is the model's own decode step (a forward pass of one new token per sequence, timed
inside generate()), `per token` is generate()'s whole time over the new tokens, with
sampling and its bookkeeping. Reported: each / bound, and the packed path's speed-up.

    .venv/bin/python benchmarks/decode_speed.py [--repeats 5] [--new-tokens 100] [--large] [--load]
        [--compiled]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import PROMPT, ROOT, bench_dir, gpt2_124m, median, print_header


class Bandwidth:
    """Bytes per second torch reads from memory, sampled through the run: a sum over a 1 GiB
    float32 tensor (the best of 3 at each sampling). The bound uses the best sample: it is what
    the machine can do when its neighbours let it."""

    def __init__(self) -> None:
        import torch

        self.data = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
        self.data.sum()  # fault the pages in
        self.samples: list[float] = []

    def sample(self, repeats: int = 3) -> None:
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            self.data.sum()
            seconds.append(time.perf_counter() - started)
        self.samples.append(self.data.numel() * self.data.element_size() / min(seconds))

    @property
    def best(self) -> float:
        return max(self.samples)

    def spread(self) -> str:
        gb = [s / 1e9 for s in self.samples]
        return f"best {max(gb):.1f} GB/s (median {median(gb):.1f}, min {min(gb):.1f}, n={len(gb)})"


def gpt_neo_1_3b(folder: Path) -> Path:
    """GPT-Neo 1.3B's architecture (24 layers, 2048 wide, 16 heads, local and global
    attention, 50,257-token vocabulary) with random weights, saved once with save_pretrained;
    the tokenizer is the one of `gpt2_124m`."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoTokenizer, GPTNeoConfig, GPTNeoForCausalLM

    small = gpt2_124m(bench_dir() / "gpt2-124m")
    tokenizer = AutoTokenizer.from_pretrained(small)
    config = GPTNeoConfig(
        vocab_size=50257,
        max_position_embeddings=2048,
        hidden_size=2048,
        num_layers=24,
        num_heads=16,
        attention_types=[[["global", "local"], 12]],
        window_size=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    print(f"building {folder.name} (random weights, once) ...", flush=True)
    model = GPTNeoForCausalLM(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class StepTimer:
    """Times the model's decode steps (forward passes of one new token) inside generate()."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.seconds: list[float] = []
        self._forward = model.forward

    def __enter__(self) -> StepTimer:
        def timed(*args: Any, **kwargs: Any) -> Any:
            ids = kwargs.get("input_ids")
            started = time.perf_counter()
            out = self._forward(*args, **kwargs)
            if ids is not None and ids.shape[-1] == 1:
                self.seconds.append(time.perf_counter() - started)
            return out

        self.model.forward = timed
        return self

    def __exit__(self, *exc: object) -> None:
        del self.model.forward


def sampler_rng_seconds(vocab: int, rows: int) -> float:
    """One step of torch.multinomial's random draws: an exponential per vocabulary entry per
    sequence, drawn serially from the seeded generator (fixed by the texts)."""
    import torch

    draws = torch.empty(rows, vocab)
    samples = []
    for _ in range(20):
        started = time.perf_counter()
        draws.exponential_()
        samples.append(time.perf_counter() - started)
    return median(samples)


def measure(
    folder: Path,
    dtype: str,
    packed: bool,
    args: argparse.Namespace,
    bandwidth: Bandwidth,
    compiled: bool = False,
) -> dict[str, Any]:
    from tasks.generate import run_generation
    from tasks.model import _CACHE, build_generator
    from tasks.settings import GenerationSettings

    os.environ["TEXTGEN_PACKED_WEIGHTS"] = "1" if packed else "0"
    _CACHE.clear()
    settings = GenerationSettings(
        model=str(folder),
        initial_sentence=PROMPT,
        max_new_tokens=args.new_tokens,
        num_return_sequences=args.sequences,
        dtype=dtype,  # type: ignore[arg-type]
    )
    generator = build_generator(settings)
    model = generator.pipeline.model
    compile_seconds = 0.0
    if compiled:  # an experiment, not the product: inductor packs the weights itself
        import torch
        import torch._inductor.config as inductor

        inductor.freezing = True
        model.forward = torch.compile(model.forward, dynamic=True)
        started = time.perf_counter()
    run_generation(generator, settings)  # warm-up (and, compiled, the compilation)
    if compiled:
        compile_seconds = time.perf_counter() - started
    per_token, forward, texts = [], [], []
    for _ in range(args.repeats):
        bandwidth.sample()  # between the timed calls, never during one
        with StepTimer(model) as steps:
            generations = run_generation(generator, settings)
        forward.extend(steps.seconds)
        per_token.append(generations.generation_seconds / max(generations.new_tokens))
        texts = generations.texts
    bandwidth.sample()
    result = {
        "per_token": median(per_token),
        "per_token_spread": (min(per_token), max(per_token), len(per_token)),
        "forward": median(forward),
        "load": generator.load_seconds,
        "fast_path": "compiled (inductor, freezing)" if compiled else generator.fast_path,
        "compile": compile_seconds,
        "texts": texts,
        "vocab": int(model.config.vocab_size),
    }
    del generator, model
    _CACHE.clear()
    return result


def weight_bytes(folder: Path, dtype: str) -> tuple[int, int]:
    """Bytes and count of the weights as transformers loads them (tied ones once)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    params = list(model.parameters())
    return sum(p.numel() * p.element_size() for p in params), sum(p.numel() for p in params)


def load_in_fresh_process(folder: Path, packed: bool) -> float:
    """Seconds `build_generator` takes in a new interpreter (the model files in the page
    cache): what each run pays when nothing keeps the model loaded."""
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "from tasks.model import build_generator\n"
        "from tasks.settings import GenerationSettings\n"
        f"g = build_generator(GenerationSettings(model={str(folder)!r}))\n"
        "print(g.load_seconds)\n"
    )
    env = {**os.environ, "TEXTGEN_PACKED_WEIGHTS": "1" if packed else "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def report(name: str, folder: Path, dtype: str, bandwidth: Bandwidth, args: Any) -> Any:
    """Measure one model and dtype; returns what prints its lines once the bound is known."""
    size, params = weight_bytes(folder, dtype)
    rows = {}
    for packed in (False, True):
        label = "packed" if packed else "as loaded"
        rows[label] = measure(folder, dtype, packed, args, bandwidth)
    if args.compiled and dtype == "float32":
        rows["compiled"] = measure(folder, dtype, False, args, bandwidth, compiled=True)
    rng = sampler_rng_seconds(rows["packed"]["vocab"], args.sequences)
    new_tokens = args.new_tokens
    loads = {}
    if args.load:
        for packed in (False, True):
            loads[packed] = median([load_in_fresh_process(folder, packed) for _ in range(3)])

    def show(bound_bandwidth: float) -> None:
        bound = size / bound_bandwidth
        print(
            f"\n{name}, {dtype}: {params / 1e6:.1f}M parameters, {size / 1e6:.0f} MB of weights, "
            f"{args.sequences} sequences x {new_tokens} new tokens; bound "
            f"{bound * 1000:.1f} ms per step"
        )
        for label, row in rows.items():
            low, high, calls = row["per_token_spread"]
            extra = (
                f"first call (compiling) {row['compile']:.1f} s | same texts as packed: "
                f"{row['texts'] == rows['packed']['texts']} (an experiment, not the product)"
                if label == "compiled"
                else f"load {row['load']:.2f} s | fast path {row['fast_path']}"
            )
            print(
                f"  {label:9}: forward {row['forward'] * 1000:6.1f} ms "
                f"({row['forward'] / bound:.2f}x bound) | per token {row['per_token'] * 1000:6.1f}"
                f" ms ({row['per_token'] / bound:.2f}x bound; {low * 1000:.1f}-"
                f"{high * 1000:.1f} ms over {calls} calls) | {extra}"
            )
        before, after = rows["as loaded"], rows["packed"]
        print(
            f"  speed-up  : forward {before['forward'] / after['forward']:.2f}x, per token "
            f"{before['per_token'] / after['per_token']:.2f}x; identical texts: "
            f"{before['texts'] == after['texts']}"
        )
        print(
            f"  sampler's random draws alone: {rng * 1000:.1f} ms per step; per token without "
            f"them: {(after['per_token'] - rng) / bound:.2f}x bound"
        )
        for packed, seconds in loads.items():
            label = "packed" if packed else "as loaded"
            print(f"  load per run in a fresh process ({label}): {seconds:.2f} s (n=3)")

    return show


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--sequences", type=int, default=5)
    parser.add_argument("--large", action="store_true", help="also GPT-Neo 1.3B's size")
    parser.add_argument("--load", action="store_true", help="also load time per fresh process")
    parser.add_argument(
        "--compiled", action="store_true", help="also torch.compile's step (float32; ~1 min)"
    )
    args = parser.parse_args()
    print_header("decode speed: decode step / memory-bandwidth bound, as loaded and packed")

    bandwidth = Bandwidth()
    bandwidth.sample()
    small = gpt2_124m(bench_dir() / "gpt2-124m")
    shows = [
        report("gpt2-124m", small, "float32", bandwidth, args),
        report("gpt2-124m", small, "bfloat16", bandwidth, args),
    ]
    if args.large:
        large = gpt_neo_1_3b(bench_dir() / "gpt-neo-1.3b")
        args.new_tokens, args.repeats = min(args.new_tokens, 32), min(args.repeats, 3)
        shows.append(report("gpt-neo-1.3b", large, "float32", bandwidth, args))
    print(f"read bandwidth, sampled between the timed calls: {bandwidth.spread()}")
    for show in shows:
        show(bandwidth.best)


if __name__ == "__main__":
    main()
