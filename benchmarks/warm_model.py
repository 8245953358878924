"""A model kept warm across the runs of `textgen serve`, against loading it in every run.

Two stacks per model (Prefect server, `textgen serve`, a bare repository; see `_stack.py`),
identical but for `TEXTGEN_WARM_MODEL_START`: `0` loads the model in each run (as before),
`1` (the default) lets serve load the model a run used into the fork server later runs start
from. After the stack's warm-up run (and, kept warm, once serve says the model is loaded),
`--repeats` forced runs of the deployment, one after another; for each, what the run recorded
(`load_seconds`, `model.cache_hit`) and its whole time from creation through the API to the
MLflow run's end. Reported: medians per mode and what keeping the model warm saves per run.

    .venv/bin/python benchmarks/warm_model.py [--repeats 3] [--large]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import bench_dir, gpt2_124m, median, print_header, spread
from _stack import running_stack
from decode_speed import gpt_neo_1_3b

from tests.servers import wait_for

READY_LINE = "Runs now start with model"


def forced_runs(model: Path, name: str, warm: bool, repeats: int) -> dict[str, list[float]]:
    env = {"TEXTGEN_MODEL_DIRS": str(bench_dir()), "TEXTGEN_WARM_MODEL_START": str(int(warm))}
    results: dict[str, list[float]] = {"total": [], "load": [], "hits": []}
    with running_stack(model, name, env) as stack:
        if warm:
            wait_for(lambda: READY_LINE in stack.service.output(), 300, "the model kept warm")
        for _ in range(repeats):
            started = time.time()
            flow_run_id = stack.force_run()
            run = wait_for(
                lambda run_id=flow_run_id: stack.mlflow_run(flow_run_id=run_id), 600, "the run"
            )
            results["total"].append(run.info.end_time / 1000 - started)
            results["load"].append(float(run.data.metrics["load_seconds"]))
            results["hits"].append(float(run.data.params["model.cache_hit"] == "True"))
            time.sleep(1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--large", action="store_true", help="also GPT-Neo 1.3B's size")
    args = parser.parse_args()
    print_header("warm model: serve keeps the last model loaded / loads it in every run")
    models = {"gpt2-124m": gpt2_124m(bench_dir() / "gpt2-124m")}
    if args.large:
        models["gpt-neo-1.3b"] = gpt_neo_1_3b(bench_dir() / "gpt-neo-1.3b")
    for name, model in models.items():
        rows = {
            warm: forced_runs(model, f"warm-{name}-{int(warm)}", warm, args.repeats)
            for warm in (False, True)
        }
        print(f"\n{name}, seed settings (max_length 30, 5 sequences), {args.repeats} runs each")
        for warm, row in rows.items():
            label = "kept warm " if warm else "load each "
            print(
                f"  {label}: run {spread(row['total'])}; load_seconds median "
                f"{median(row['load']):.2f} s; cache hits {int(sum(row['hits']))}/{len(row['hits'])}"
            )
        saved = median(rows[False]["total"]) - median(rows[True]["total"])
        print(f"  saved per run: {saved:.2f} s (load: {median(rows[False]['load']):.2f} s)")


if __name__ == "__main__":
    main()
