"""Serve's footprint: its memory at idle, and how long it takes to stop. `textgen serve` with its
MLflow UI and local Prefect server, after one pushed run of the offline model (so the fork
server holds it warm), left idle; then SIGTERM.

Measured: every process of serve's tree (the runs' fork servers, the Prefect server and the MLflow
UI are in sessions of their own, found by parent pid), resident (RSS) and proportional (PSS,
shared pages split between the processes sharing them) memory, after `--idle` seconds.
Baseline, in the same invocation: the same with MLflow's job runner on
(`MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true`, MLflow's default, which serve used to inherit).
Goal: under 1.5 GB for serve with its UI. Then SIGTERM: seconds until serve has exited, and
until no process of its tree is left (goal: 3 s).

    .venv/bin/python benchmarks/serve_footprint.py [--idle 20]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

from _common import bench_dir, print_header
from _stack import SECRET, SPEC

from tasks.offline import offline_model
from tests.conftest import GitRepo
from tests.servers import Service, free_port, process_tree, still_running, wait_for

TEXTGEN = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "textgen")


def memory(pid: int) -> tuple[str, float, float]:
    """A process's kind, RSS and PSS in MB."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        values[key] = float(value.split()[0]) / 1024
    kinds = (
        "huey",
        "_job_runner",
        "uvicorn",
        "mlflow server",
        "prefect server",
        "forkserver",
        "resource_tracker",
        "textgen serve",
    )
    kind = next((k for k in kinds if k in args), args[:40])
    return kind, values.get("Rss", 0.0), values.get("Pss", 0.0)


def measure(
    job_execution: bool, idle: float
) -> tuple[list[tuple[str, float, float]], float, float]:
    root = bench_dir() / "serve-footprint" / f"jobs-{int(job_execution)}"
    subprocess.run(["rm", "-rf", str(root)], check=True)
    work = GitRepo(root / "work")
    model = offline_model()

    def settings(seed: int) -> str:
        return f"model: {model}\nrandom_seed: {seed}\n"

    work.commit({"textgen.yaml": settings(1), ".gradient/workflows/w.yaml": SPEC}, "initial")
    bare = root / "origin.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(work.path), str(bare)], check=True)
    work.git("remote", "add", "origin", str(bare))
    port, ui_port, prefect_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEXTGEN_", "MLFLOW_"))}
    env.pop("PREFECT_API_URL", None)
    env |= {
        "TEXTGEN_HOME": str(root / "home"),
        "TEXTGEN_MODEL_DIRS": str(model.parent),
        "TEXTGEN_WEBHOOK_SECRET": SECRET,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": str(job_execution).lower(),
    }
    subprocess.run(
        [
            TEXTGEN,
            "hook",
            "install",
            str(bare),
            "--url",
            f"http://127.0.0.1:{port}/webhooks/github",
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    args = ["serve", "--repo", str(bare), "--port", str(port), "--ui-port", str(ui_port)]
    service = Service(
        [TEXTGEN, *args, "--prefect-port", str(prefect_port)], env, root / "serve.log"
    )
    try:
        wait_for(lambda: "Serving nlp-text-generation" in service.output(), 300, "serve")
        wait_for(lambda: "MLflow UI on" in service.output(), 300, "the MLflow UI")
        time.sleep(idle)
        assert service.process is not None
        started_rows = [memory(pid) for pid in process_tree(service.process.pid)]
        work.commit({"textgen.yaml": settings(2)}, "seed 2")
        work.git("push", "--quiet", "origin", "main")
        wait_for(lambda: "Runs now start with model" in service.output(), 600, "the warm model")
        time.sleep(idle)
        assert service.process is not None
        pids = process_tree(service.process.pid)
        rows = [memory(pid) for pid in pids]
        started = time.perf_counter()
        service.process.send_signal(signal.SIGTERM)
        service.process.wait(120)
        exited = time.perf_counter() - started
        while still_running(pids) and time.perf_counter() - started < 120:
            time.sleep(0.05)
        all_gone = time.perf_counter() - started
    finally:
        service.stop()
    return started_rows, rows, exited, all_gone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle", type=float, default=20.0)
    args = parser.parse_args()
    print_header("serve footprint: idle memory (serve + MLflow UI + Prefect server), stop time")
    for label, jobs in (("MLflow's job runner on (baseline)", True), ("as serve starts it", False)):
        started, warm, exited, all_gone = measure(jobs, args.idle)
        print(f"{label}:")
        for moment, rows in (("idle, before any run", started), ("idle, model warm", warm)):
            rss, pss = sum(r for _, r, _ in rows), sum(p for _, _, p in rows)
            print(f"  {moment:<22} {len(rows):>2} processes, RSS {rss:6.0f} MB, PSS {pss:6.0f} MB")
            for kind, count in Counter(kind for kind, _, _ in rows).items():
                mine = [(r, p) for k, r, p in rows if k == kind]
                print(
                    f"    {kind:<18} x{count}: RSS {sum(r for r, _ in mine):6.0f} MB, "
                    f"PSS {sum(p for _, p in mine):6.0f} MB"
                )
        print(
            f"  SIGTERM: serve exited after {exited:.1f} s, every process gone after {all_gone:.1f} s"
        )


if __name__ == "__main__":
    main()
