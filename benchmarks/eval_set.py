"""Evaluation sets: a version of 50 prompts x 5 sequences on a GPT-2-size model, against the
original script's pipeline call looped over the prompts; then a push that adds one prompt; then
a 2 models x 2 seeds matrix.

1. Full set. Baseline: `pipeline("text-generation", model=...)` built once, then for each
   prompt `set_seed(42)` and the call with `max_length=30, num_return_sequences=5`, as the
   original script does for its one prompt. Candidate: the flow, `--force`d, on a repository
   whose `textgen.yaml` lists the 50 prompts (its whole run: commit, settings, model load from
   the warm cache, generation, quality metrics, the MLflow record). Rounds alternate which goes
   first; the first round of each warms up. Reported: each one's times, speed-up baseline /
   flow (target >= 1.5), and whether every text of every prompt is the baseline's.
2. One more prompt. The same repository with a 51st prompt pushed: the new version's wall time
   against the full set's (target <= 1/10), and how many prompts it generated (1).
3. Matrix. `model: [gpt2-124m, gpt2-6-layer]` x `random_seed: [42, 7]` on 10 prompts, each run
   in its own process: wall time and peak resident memory against the same prompts in one cell
   of the larger model; one model loaded at a time means the matrix's peak stays near the
   larger model's.

    .venv/bin/python benchmarks/eval_set.py [--rounds 2] [--skip-matrix]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from _common import ROOT, bench_dir, gpt2_124m, median, print_header, spread

PROMPTS = [
    "Hello, I'm a language model,",
    "The weather today is",
    "Once upon a time",
    "In a shocking finding, scientists discovered",
    "The best way to learn a language is",
    "My favourite food is",
    "The stock market opened",
    "She opened the door and saw",
    "To make a good cup of coffee,",
    "The history of the city begins",
    "Our team is looking for",
    "The first thing you should know about",
    "He said that the meeting",
    "In the year 2050,",
    "The recipe calls for",
    "Researchers at the university",
    "The old man looked at",
    "Welcome to our new",
    "If you want to travel,",
    "The museum is open",
    "At the end of the day,",
    "The train was late because",
    "Here are three reasons why",
    "The company announced",
    "When I was a child,",
    "The river flows",
    "Please remember to",
    "The new phone has",
    "In this tutorial we will",
    "The garden was full of",
    "The election results show",
    "A good night's sleep",
    "The teacher asked the class",
    "Our planet is",
    "The music started and",
    "Scientists believe that",
    "The road to the village",
    "It was the first time",
    "The library has",
    "Yesterday I went to",
    "The painting shows",
    "Most people agree that",
    "The ship sailed",
    "Before you begin,",
    "The doctor said",
    "The children played",
    "There is a small shop",
    "The mountain was covered",
    "Thank you for",
    "The last chapter of the book",
]
SETTINGS = {"random_seed": 42, "max_length": 30, "num_return_sequences": 5}


def small_gpt2(folder: Path, base: Path) -> Path:
    """A 6-layer GPT-2 (82M parameters) with random weights and the 124M one's tokenizer."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(base)
    config = GPT2Config.from_pretrained(base)
    config.n_layer = 6
    torch.manual_seed(1)
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def baseline(model: Path, prompts: list[str]) -> tuple[float, dict[str, list[str]]]:
    """The original script's call, looped: seed, call, for each prompt."""
    from transformers import pipeline, set_seed

    pipe = pipeline("text-generation", model=str(model), device="cpu")
    started = time.perf_counter()
    texts = {}
    for prompt in prompts:
        set_seed(SETTINGS["random_seed"])
        out = pipe(
            prompt,
            max_length=SETTINGS["max_length"],
            num_return_sequences=SETTINGS["num_return_sequences"],
        )
        texts[prompt] = [o["generated_text"] for o in out]
    return time.perf_counter() - started, texts


class Repo:
    """A git repository whose textgen.yaml the benchmark rewrites and commits."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True)
        self.git("init", "--quiet", "--initial-branch", "main")

    def git(self, *args: str) -> None:
        subprocess.run(
            ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com", *args],
            cwd=self.path,
            check=True,
            capture_output=True,
        )

    def commit(self, settings: dict[str, Any], message: str) -> None:
        (self.path / "textgen.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
        self.git("add", "--all")
        self.git("commit", "--quiet", "-m", message)


def flow_run(repo: Repo, force: bool) -> tuple[float, Any]:
    from flows.text_generation import nlp_text_generation

    started = time.perf_counter()
    record = nlp_text_generation(repo_url=str(repo.path), force=force)
    return time.perf_counter() - started, record


def version_seconds(record: Any) -> float:
    """From the version's MLflow run opening to its number: when the version is complete. The
    GenAI view (`tasks.genai`) is written after it."""
    from tasks.store import mlflow_client

    info = mlflow_client().get_run(record.run_id).info
    return (info.end_time - info.start_time) / 1000


def flow_texts(record: Any) -> dict[str, list[str]]:
    (cell,) = record.as_dict()["cells"]
    return {o["prompt"]: o["texts"] for o in cell["outputs"]}


MEASURED = (
    "import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
    "sys.exit(done.returncode)"
)
"""A parent of its own for each measured command, so that its peak is its child's alone."""


def peak_run(repo: Repo, env: dict[str, str]) -> tuple[float, float, dict[str, Any]]:
    """`textgen run --force --json` in its own process: wall seconds, peak RSS (MB), record."""
    command = [sys.executable, "-m", "deployments.cli", "run", "--repo", str(repo.path)]
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", MEASURED, *command, "--force", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    seconds = time.perf_counter() - started
    peak_kb = int(out.stderr.strip().splitlines()[-1])
    return seconds, peak_kb / 1024, json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-matrix", action="store_true")
    parser.add_argument("--only-matrix", action="store_true")
    args = parser.parse_args()
    print_header("evaluation sets: the flow / the original call looped over the prompts")
    model = gpt2_124m(bench_dir() / "gpt2-124m")
    work = Path(tempfile.mkdtemp(prefix="eval-set-"))
    os.environ.setdefault("TEXTGEN_HOME", str(work / "home"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    if not args.only_matrix:
        full_set(model, work, args.rounds)
    if not args.skip_matrix:
        matrix(model, work)


def full_set(model: Path, work: Path, rounds: int) -> None:
    """Parts 1 and 2."""
    repo = Repo(work / "repo")
    repo.commit({"model": str(model), **SETTINGS, "prompts": PROMPTS}, "50 prompts")

    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        flow_run(repo, force=False)  # warms the model cache and the store up
        base_times: list[float] = []
        flow_times: list[float] = []
        to_version: list[float] = []
        identical = True
        for index in range(rounds + 1):
            order = ("baseline", "flow") if index % 2 == 0 else ("flow", "baseline")
            for which in order:
                if which == "baseline":
                    seconds, expected = baseline(model, PROMPTS)
                    if index:
                        base_times.append(seconds)
                else:
                    seconds, record = flow_run(repo, force=True)
                    got = flow_texts(record)
                    if index:
                        flow_times.append(seconds)
                        to_version.append(version_seconds(record))
            identical = identical and got == expected
        texts = sum(len(t) for t in expected.values())
        print(f"\n1. {len(PROMPTS)} prompts x {SETTINGS['num_return_sequences']} ({texts} texts)")
        print(f"   baseline, the pipeline call looped : {spread(base_times)}")
        print(f"   the flow, one version              : {spread(flow_times)}")
        print(f"     of which run start to its number : {spread(to_version)}")
        speedup = median(base_times) / median(flow_times)
        print(f"   speed-up baseline / flow: {speedup:.2f}x (target >= 1.5)")
        print(f"   every text the baseline's (same per-prompt seed): {identical}")

        repo.commit(
            {"model": str(model), **SETTINGS, "prompts": [*PROMPTS, "One more prompt"]}, "+1"
        )
        seconds, record = flow_run(repo, force=False)
        outputs = record.as_dict()["cells"][0]["outputs"]
        made = sum(o["generated"] for o in outputs)
        to_number = version_seconds(record)
        print(f"\n2. a push adding one prompt: version {record.version}")
        print(f"   generated {made} of {len(outputs)} prompts; the others reused")
        print(
            f"   run start to its number: {to_number:.2f} s, / the full set's: "
            f"{to_number / median(to_version):.3f} (target <= 0.1)"
        )
        print(
            f"   the whole flow run, GenAI view included: {seconds:.2f} s, / the full set's: "
            f"{seconds / median(flow_times):.3f}"
        )


def matrix(model: Path, work: Path) -> None:
    """Part 3."""
    small = small_gpt2(model.parent / "gpt2-6-layer", model)
    env = {**os.environ, "TEXTGEN_MODEL_DIRS": str(model.parent)}
    env.pop("PREFECT_API_URL", None)
    cases = {
        "one cell (gpt2-124m, seed 42)": {"model": str(model)},
        "2 models x 2 seeds": {
            "model": str(model),
            "matrix": {"model": [str(model), str(small)], "random_seed": [42, 7]},
        },
    }
    print("\n3. matrix, 10 prompts, each run its own process")
    for name, values in cases.items():
        matrix_repo = Repo(work / name.split()[0].replace("(", ""))
        matrix_repo.commit({**SETTINGS, **values, "prompts": PROMPTS[:10]}, name)
        seconds, peak, printed = peak_run(matrix_repo, env)
        cells = len(printed["cells"])
        print(f"   {name}: {cells} cells, {seconds:.1f} s, peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()
