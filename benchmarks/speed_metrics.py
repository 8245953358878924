"""Speed metrics: what a pushed run records against a manual run of the same settings.

The walkthrough's case: serve has just started, and the first push's run loads the model while
serve gets ready to keep it warm. Then, in turns, a manual `textgen run --force` of the pushed
commit (its own process: imports, load, generation) and a push of a new seed, each alone on the
machine. Baseline: the manual runs' recorded `tokens_per_second`; judged: the pushed runs',
each against the manual run of the same round, in the same invocation. Target: every pushed
run within 20% of the manual median, and no run that shared its cores (`shared_cores`, what
the machine spent beyond the run while it generated) unless it says so.

    .venv/bin/python benchmarks/speed_metrics.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from typing import Any

from _common import ROOT, median, print_header
from _stack import Stack, running_stack

from tasks.offline import offline_model
from tests.servers import wait_for

TEXTGEN = str(ROOT / ".venv" / "bin" / "textgen")


def describe(run: Any) -> tuple[float, float | None]:
    metrics = run.data.metrics
    return float(metrics["tokens_per_second"]), metrics.get("shared_cores")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print_header("speed metrics: pushed runs against manual runs of the same settings")
    model = offline_model()
    rows: list[tuple[str, float, float | None]] = []
    with running_stack(model, "speed-metrics") as stack:
        env = dict(stack.service.env)
        first = stack.mlflow_run(stack.work.git("rev-parse", "HEAD"))
        rows.append(("push (first after serve started)", *describe(first)))
        for round_ in range(1, args.rounds + 1):
            sha = stack.work.git("rev-parse", "HEAD")
            subprocess.run(
                [TEXTGEN, "run", "--repo", str(stack.bare), "--commit", sha, "--force", "--json"],
                env=env,
                check=True,
                capture_output=True,
                cwd=stack.root,
            )
            manual = next(
                r for r in _runs_of(stack, sha) if r.data.tags.get("textgen.trigger") == "manual"
            )
            rows.append((f"manual, round {round_}", *describe(manual)))
            time.sleep(2)  # let serve keep the model warm between runs, as it does
            pushed = stack.commit(100 + round_)
            stack.push()
            run = wait_for(lambda sha=pushed: stack.mlflow_run(sha), 600, "the pushed run")
            rows.append((f"push, round {round_}", *describe(run)))
            time.sleep(2)
        log = stack.service.output()
    manual_rate = median([rate for name, rate, _ in rows if name.startswith("manual")])
    print(f"{'run':<36} {'tokens/s':>9} {'x manual':>9} {'shared cores':>13}")
    for name, rate, shared in rows:
        cores = "unknown" if shared is None else f"{shared:.2f}"
        print(f"{name:<36} {rate:9.1f} {rate / manual_rate:8.2f}x {cores:>13}")
    pushed = [rate / manual_rate for name, rate, _ in rows if name.startswith("push")]
    print(f"pushed runs / manual median: min {min(pushed):.2f}x, max {max(pushed):.2f}x")
    print(
        "serve loaded the model warm "
        f"{log.count('Loading model')} times; runs waited for a load "
        f"{log.count('Waiting for the model being loaded warm')} times"
    )
    print(f"cores: {os.cpu_count()}")


def _runs_of(stack: Stack, sha: str) -> list[Any]:
    """The FINISHED runs of a commit, newest first."""
    from mlflow import MlflowClient

    from tasks.store import experiment_name

    client = MlflowClient(tracking_uri=stack.tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name(str(stack.bare)))
    query = f"tags.`mlflow.source.git.commit` = '{sha}' and attributes.status = 'FINISHED'"
    return list(
        client.search_runs(
            [experiment.experiment_id], query, order_by=["attributes.start_time DESC"]
        )
    )


if __name__ == "__main__":
    main()
