"""Orchestration overhead: a flow run on a warm local stack against the bare script.

Baseline: the original example's whole script as a fresh process (imports, pipeline load,
set_seed, one call, output.txt), wall time. Candidate: a run of the served deployment, from the
flow run's creation through the API to its MLflow run FINISHED (the run's end time). Same model
and settings. Overhead = median(flow) - median(bare); target <= 2 s. The flow run's time is
split by what the Prefect API recorded: dispatch (created -> Running: runner pick-up, process
start, imports), each task, and the gaps between.

    .venv/bin/python benchmarks/orchestration_overhead.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx
from _common import median, print_header, spread
from _stack import running_stack, seconds

from tests.servers import wait_for

BARE_SCRIPT = """\
import sys
from transformers import pipeline, set_seed

random_seed = 42
max_length = 30
num_return_sequences = 5
initial_sentence = "Hello, I'm a language model,"

generator = pipeline('text-generation', model=sys.argv[1])
set_seed(random_seed)
output = generator(initial_sentence, max_length = max_length, num_return_sequences = num_return_sequences)
with open(sys.argv[2], 'w') as f:
    ival = 1
    for val in output:
        print('---\\nOutput {} of {}\\n---\\n'.format(ival, num_return_sequences), file=f)
        print(val['generated_text'], file=f)
        if ival < num_return_sequences: print(file=f)
        ival += 1
print('Done')
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print_header("orchestration overhead: warm flow run - bare script process")

    from tasks.offline import offline_model

    model = offline_model()
    bare: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "nlp_text_generation.py"
        script.write_text(BARE_SCRIPT)
        for _ in range(args.repeats + 1):
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, str(script), str(model), str(Path(tmp) / "output.txt")],
                check=True,
                capture_output=True,
            )
            bare.append(time.perf_counter() - started)
    bare = bare[1:]  # the first run warms the page cache

    flows: list[float] = []
    parts: dict[str, list[float]] = defaultdict(list)
    with running_stack(model, "overhead") as stack:
        api = stack.prefect.api_url
        for _ in range(args.repeats):
            started = time.time()
            flow_run_id = stack.force_run()
            run = wait_for(
                lambda run_id=flow_run_id: stack.mlflow_run(flow_run_id=run_id),
                240,
                "the MLflow run",
            )
            finished = run.info.end_time / 1000
            flows.append(finished - started)
            flow_run = httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=10).json()
            tasks = httpx.post(
                f"{api}/task_runs/filter",
                json={
                    "flow_runs": {"id": {"any_": [flow_run_id]}},
                    "sort": "EXPECTED_START_TIME_ASC",
                },
                timeout=10,
            ).json()
            running = seconds(flow_run["start_time"]) or started
            parts["dispatch: created -> Running"].append(running - started)
            previous_end = running
            for task in sorted(tasks, key=lambda t: seconds(t["start_time"]) or 0):
                begin, end = seconds(task["start_time"]), seconds(task["end_time"])
                if begin is None or end is None:
                    continue
                name = task["name"].rsplit("-", 1)[0]
                parts[f"  gap before {name}"].append(begin - previous_end)
                parts[f"task {name}"].append(end - begin)
                previous_end = end
            parts["tail: last task -> MLflow FINISHED"].append(finished - previous_end)
            time.sleep(1)
    print(f"\nbare script process : {spread(bare)}")
    print(f"warm flow run       : {spread(flows)}")
    print(f"overhead            : {median(flows) - median(bare):+.3f} s (target <= 2 s)")
    print(f"ratio flow / bare   : {median(flows) / median(bare):.3f}")
    print("\nwhere the flow run's time goes (medians):")
    for name, values in parts.items():
        print(f"  {name:42} {median(values):7.3f} s")


if __name__ == "__main__":
    main()
