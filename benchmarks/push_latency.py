"""Push to running: from `git push` (through the hook) or a signed webhook delivery to the flow
run's Running state, and to its MLflow run FINISHED, on a warm `textgen serve`.

Baseline for the ratio: the time the same run spends from Running to FINISHED (the work itself).
Target: Running within 3 s of the push, at the median.

    .venv/bin/python benchmarks/push_latency.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import time

from _common import median, print_header, spread
from _stack import Stack, running_stack, seconds

from tests.servers import wait_for


def measure(stack: Stack, seed: int, via: str) -> tuple[float, float]:
    """Seconds from the push to Running, and to MLflow FINISHED."""
    before = stack.work.git("rev-parse", "HEAD")
    sha = stack.commit(seed)
    if via == "hook":
        started = time.time()
        stack.push()
    else:
        stack.push()  # the hook is disabled: the branch moves, nothing is reported
        started = time.time()
        assert stack.deliver(sha, before).status_code == 202

    def running() -> float | None:
        for run in stack.flow_runs():
            if run["parameters"].get("commit_sha") == sha and run["start_time"]:
                return seconds(run["start_time"])
        return None

    began = wait_for(running, 120, f"the run of {sha[:7]} to start", interval=0.05)
    done = wait_for(
        lambda: stack.mlflow_run(sha), 240, f"the MLflow run of {sha[:7]}", interval=0.1
    )
    return began - started, done.info.end_time / 1000 - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print_header("push to running: push -> flow run Running -> MLflow run FINISHED")

    from tasks.offline import offline_model

    with running_stack(offline_model(), "push") as stack:
        for via in ("hook", "webhook"):
            stack.hook(enabled=via == "hook")
            to_running: list[float] = []
            to_finished: list[float] = []
            for index in range(args.repeats):
                running, finished = measure(
                    stack, 1000 + index + (100 if via == "webhook" else 0), via
                )
                to_running.append(running)
                to_finished.append(finished)
                time.sleep(1)
            work = [f - r for r, f in zip(to_running, to_finished, strict=True)]
            print(f"\nvia {via}:")
            print(f"  push -> Running       : {spread(to_running)}   (target <= 3 s)")
            print(f"  push -> MLflow FINISHED: {spread(to_finished)}")
            print(f"  Running -> FINISHED   : {spread(work)}")
            print(f"  latency / work ratio  : {median(to_running) / median(work):.3f}")
        stack.hook(enabled=True)


if __name__ == "__main__":
    main()
