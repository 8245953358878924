"""CLI latency: how long the read-only commands take, against the interpreter and MLflow alone.

Baselines, in the same invocation and interleaved with the commands they judge: `python -c
pass` (the interpreter) and `python -c "import mlflow"` (the least any command that reads the
MLflow store can cost). Judged: `textgen --version`, `history`, `compare 1 2` and `status`, on
a repository with 2 versions and on one with `--versions` (602), each a fresh process, medians
of `--repeats` (5) with their spread. Target: `history` at most 1.5x importing MLflow.

The two versions are real runs of the flow (tiny GPT-2, `textgen run`); the larger repository's
runs are copies of them (same tags, parameters and metrics, each its own commit and number), so
the store holds what hundreds of real versions hold without generating them all.

    .venv/bin/python benchmarks/cli_latency.py [--repeats 5] [--versions 602]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, median, print_header

from tests.conftest import GitRepo, build_tiny_gpt2

PYTHON = str(ROOT / ".venv" / "bin" / "python")
TEXTGEN = str(ROOT / ".venv" / "bin" / "textgen")


def timed(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}: {done.stderr[-2000:]}")
    return seconds


def two_versions(tmp: Path, env: dict[str, str], name: str) -> GitRepo:
    """A repository with two real versions, run by `textgen run` on the tiny model."""
    repo = GitRepo(tmp / name)
    repo.commit({"textgen.yaml": f"model: {env['TINY_MODEL']}\nrandom_seed: 42\n"}, "settings")
    subprocess.run(
        [TEXTGEN, "run", "--repo", str(repo.path)], env=env, check=True, capture_output=True
    )
    repo.commit({"textgen.yaml": f"model: {env['TINY_MODEL']}\nrandom_seed: 7\n"}, "seed 7")
    subprocess.run(
        [TEXTGEN, "run", "--repo", str(repo.path)], env=env, check=True, capture_output=True
    )
    return repo


def grow(repo: GitRepo, env: dict[str, str], total: int) -> None:
    """Copy the repository's two versions until it holds `total` numbered versions."""
    script = f"""
import hashlib, sys
sys.path.insert(0, {str(ROOT)!r})
from tasks import tags as T
from tasks.store import Experiment, as_metrics, as_params, as_tags
experiment = Experiment.for_repo({str(repo.path)!r}, create=False)
runs = experiment.search(order_by=["attributes.start_time ASC"])
for number in range(len(runs) + 1, {total} + 1):
    model = runs[number % len(runs)]
    tags = {{k: v for k, v in model.data.tags.items() if not k.startswith("mlflow.")}}
    tags |= {{T.VERSION: str(number), T.VERSION_KEY: f"{{number:010d}}",
             T.COMMIT: hashlib.sha1(str(number).encode()).hexdigest()}}
    run = experiment.client.create_run(experiment.experiment_id, tags=tags,
                                       run_name=tags[T.COMMIT][:7])
    metrics = {{k: float(v) for k, v in model.data.metrics.items()}}
    experiment.client.log_batch(run.info.run_id, params=as_params(model.data.params),
                                metrics=as_metrics(metrics))
    experiment.client.set_terminated(run.info.run_id, "FINISHED")
"""
    subprocess.run([PYTHON, "-c", script], env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--versions", type=int, default=602)
    args = parser.parse_args()
    print_header("cli latency: read-only commands against python -c pass and import mlflow")
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TEXTGEN_", "MLFLOW_"))}
        env |= {
            "TEXTGEN_HOME": str(tmp / "home"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
            "TINY_MODEL": str(build_tiny_gpt2(tmp / "tiny")),
            "TEXTGEN_MODEL_DIRS": str(tmp),
        }
        small = two_versions(tmp, env, "small")
        large = two_versions(tmp, env, "large")
        grow(large, env, args.versions)
        cases: dict[str, list[str]] = {
            "python -c pass": [PYTHON, "-c", "pass"],
            "python -c 'import mlflow'": [PYTHON, "-c", "import mlflow"],
            "textgen --version": [TEXTGEN, "--version"],
        }
        for name, repo in (("2", small), (str(args.versions), large)):
            for command in (["history"], ["compare", "1", "2"]):
                label = f"textgen {' '.join(command)} ({name} versions)"
                cases[label] = [TEXTGEN, *command, "--repo", str(repo.path)]
        cases["textgen status"] = [TEXTGEN, "status"]  # every repository's last version
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for argv in cases.values():  # a warm-up round: page cache and bytecode
            timed(argv, env, small.path)
        for _ in range(args.repeats):  # interleaved: each round runs every case once
            for name, argv in cases.items():
                samples[name].append(timed(argv, env, small.path))
        mlflow = median(samples["python -c 'import mlflow'"])
        print(f"{'command':<40} {'median':>8} {'min':>7} {'max':>7} {'x mlflow':>9}")
        for name, values in samples.items():
            print(
                f"{name:<40} {median(values):7.2f}s {min(values):6.2f}s {max(values):6.2f}s "
                f"{median(values) / mlflow:8.2f}x"
            )


if __name__ == "__main__":
    sys.exit(main())
