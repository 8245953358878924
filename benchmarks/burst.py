"""Bursts: 20 pushes within 10 s on a warm `textgen serve`.

Reports how many runs executed a generation, the latency from the last push to the newest
commit's version FINISHED (and, as its baseline, one lone push's latency measured first), and
whether every run of the burst ended (nothing left pending).
Target: at most 3 generations executed, the newest commit done.

    .venv/bin/python benchmarks/burst.py [--pushes 20] [--seconds 10]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

from _common import print_header
from _stack import running_stack

from tests.servers import wait_for

TERMINAL = {"COMPLETED", "CANCELLED", "FAILED", "CRASHED"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pushes", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    print_header(f"burst: {args.pushes} pushes within {args.seconds:g} s")

    from tasks.offline import offline_model

    with running_stack(offline_model(), "burst") as stack:
        sha = stack.commit(1)
        started = time.time()
        stack.push()
        lone = (
            wait_for(lambda: stack.mlflow_run(sha), 240, "a lone push's run").info.end_time / 1000
            - started
        )
        time.sleep(2)

        shas = []
        began = time.time()
        for index in range(args.pushes):
            shas.append(stack.commit(2000 + index))
            stack.push()
            wait = began + (index + 1) * args.seconds / args.pushes - time.time()
            if wait > 0:
                time.sleep(wait)
        last_push = time.time()
        newest = wait_for(lambda: stack.mlflow_run(shas[-1]), 300, "the newest commit's version")
        latency = newest.info.end_time / 1000 - last_push

        def settled() -> list[dict[str, object]] | None:
            runs = [r for r in stack.flow_runs() if r["parameters"].get("commit_sha") in shas]
            return runs if runs and all(r["state_type"] in TERMINAL for r in runs) else None

        runs = wait_for(settled, 180, "every run of the burst to end")
        generations = [
            s
            for s in shas
            if (run := stack.mlflow_run(s)) and run.data.tags.get("textgen.outcome") == "new"
        ]
        states = Counter(f"{r['state_name']} ({r['state_type'].lower()})" for r in runs)
        print(f"\npushes                      : {len(shas)} in {last_push - began:.1f} s")
        print(f"flow runs created           : {len(runs)}  ({dict(states)})")
        print(f"generations executed        : {len(generations)} (target <= 3)")
        print(
            f"newest commit's version     : {newest.data.tags.get('textgen.version')} (commit {shas[-1][:7]})"
        )
        print(
            f"last push -> newest FINISHED: {latency:.2f} s   (one lone push: {lone:.2f} s, ratio {latency / lone:.2f})"
        )
        print(
            f"left pending                : {len([r for r in runs if r['state_type'] not in TERMINAL])}"
        )


if __name__ == "__main__":
    main()
