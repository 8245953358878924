"""Shared pieces of the benchmarks: timing statistics, the machine, the models they run.

Every benchmark measures its baseline in the same invocation and reports medians and the ratio
against that baseline: absolute seconds on a shared machine mean little on their own.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT = "Hello, I'm a language model,"


def median(values: Sequence[float]) -> float:
    """The median of the samples."""
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> str:
    """`median (min–max, n=N)` of a list of seconds."""
    return f"{median(values):.3f} s (min {min(values):.3f}, max {max(values):.3f}, n={len(values)})"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    import torch
    import transformers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": memory,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
    }


def print_header(title: str) -> None:
    """The benchmark's name and the machine."""
    print(f"== {title}")
    print("machine: " + json.dumps(machine()))


def gpt2_124m(folder: Path) -> Path:
    """A GPT-2 of the real size (12 layers, 768 wide, 50,257-token vocabulary, 124M parameters)
    with random weights, saved with save_pretrained; its tokenizer is SmolLM2's, padded with
    extra tokens to GPT-2's vocabulary size. Built once per folder, which becomes one of the
    model folders settings may name (TEXTGEN_MODEL_DIRS)."""
    from tasks.config import model_dirs

    allowed = [str(d) for d in model_dirs()]
    if str(folder.parent) not in allowed:
        os.environ["TEXTGEN_MODEL_DIRS"] = os.pathsep.join([*allowed, str(folder.parent)])
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from tasks.offline import offline_model

    tokenizer = AutoTokenizer.from_pretrained(offline_model())
    missing = 50257 - len(tokenizer)
    if missing > 0:
        tokenizer.add_tokens([f"<extra_{i}>" for i in range(missing)])
    config = GPT2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def parameter_count(folder: Path) -> int:
    """Parameters of a saved model (tied weights counted once)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def bench_dir() -> Path:
    """Where benchmarks keep the models and repositories they build (reused across runs)."""
    from tasks.config import data_dir

    path = Path(os.environ.get("TEXTGEN_BENCH_DIR") or data_dir() / "bench")
    path.mkdir(parents=True, exist_ok=True)
    return path
