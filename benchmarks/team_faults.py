"""Faults on the team's own servers, judged from a history as `faults.py` judges serve's.

The team service (`deployments/ops/team.py`: PostgreSQL, the Prefect and MLflow servers on it,
the receiver and warm workers, all under supervisord) takes pushes to linked repositories
through their post-receive hooks. With pushes in flight (queued and running), a nemesis strikes
once per scenario and nobody restarts anything by hand:

- PostgreSQL SIGKILLed (its whole process group: the postmaster and its backends);
- the Prefect server SIGKILLed;
- the MLflow server SIGKILLed (its gunicorn and workers) while runs log to it;
- the MLflow server frozen (SIGSTOP, then SIGCONT after `--freeze` seconds): unreachable from
  every worker, connections hanging rather than refused;
- a worker SIGKILLed with its fork server and its run.

After each fault, once the server answers again, one more push: it must become a version (within
`--next-within` seconds). One that does not leaves what Prefect showed of it then, for whoever
looks into it, in `stalled-<fault>.json` next to the benchmark's repositories: its
repository's flow runs with their states and concurrency leases, the deployment's concurrency
limit, the leases on the server's disk, the work queues and workers, and the worker's and the
receiver's log lines that name its runs. The checker (`scale.check`) then classifies every
accepted push (a version, a recorded skip, a run Prefect shows Superseded, a recorded failure,
else lost), checks the numbering and that nothing is left RUNNING in MLflow or unfinished in
Prefect.

    .venv/bin/python benchmarks/team_faults.py [--workers 2] [--burst 4] [--freeze 30]
        [--only SUBSTRING] [--next-within 600]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from _common import bench_dir, print_header
from scale import Push, Repos, check, flow_runs, settled, team

from deployments.ops.process import healthy
from deployments.ops.team import POOL, Team
from tests.conftest import build_tiny_gpt2
from tests.servers import wait_for


@dataclass
class Outcome:
    fault: str
    back_after: float
    next_push_version_after: float | None
    note: str = ""


def _freeze(service: Team, seconds: float) -> str:
    pid = service.servers["mlflow"].pid
    os.killpg(pid, signal.SIGSTOP)
    time.sleep(seconds)
    os.killpg(pid, signal.SIGCONT)
    return f"pid {pid} stopped {seconds:g} s"


def faults(service: Team, freeze: float) -> list[tuple[str, Callable[[], str], Callable[[], bool]]]:
    """(name, strike, answers again) per scenario."""

    def kill(name: str) -> Callable[[], str]:
        return lambda: f"pid {service.servers[name].kill()} killed"

    prefect = lambda: healthy(service.prefect_api)  # noqa: E731
    mlflow = lambda: healthy(service.mlflow_uri)  # noqa: E731
    worker = service.workers[0]
    killed: list[int] = []

    def kill_worker() -> str:
        killed.append(worker.kill())
        return f"pid {killed[-1]} killed"

    def worker_back() -> bool:
        return worker.pid not in (0, *killed) and worker.alive()

    return [
        ("PostgreSQL SIGKILL", kill("postgres"), lambda: service.postgres.ready() and prefect()),
        ("Prefect server SIGKILL", kill("prefect"), prefect),
        ("MLflow server SIGKILL", kill("mlflow"), mlflow),
        (f"MLflow server frozen {freeze:g} s", lambda: _freeze(service, freeze), mlflow),
        ("worker SIGKILL", kill_worker, worker_back),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repos", type=int, default=2)
    parser.add_argument("--burst", type=int, default=4, help="pushes in flight at each fault")
    parser.add_argument("--freeze", type=float, default=30.0)
    parser.add_argument("--lead", type=float, default=3.0, help="seconds from burst to fault")
    parser.add_argument("--only", default="", help="only the faults whose name has this")
    parser.add_argument(
        "--next-within", type=float, default=600.0, help="seconds the next push has to be a version"
    )
    args = parser.parse_args()
    print_header(f"team faults: {args.workers} workers, {args.repos} repositories")
    root = bench_dir() / "team_faults"
    if root.exists():
        import shutil

        shutil.rmtree(root)
    root.mkdir(parents=True)
    model = build_tiny_gpt2(bench_dir() / "scale" / "tiny-gpt2")
    repos = Repos(root, args.repos, model)
    names = list(repos.bare)
    outcomes: list[Outcome] = []
    pushes: list[Push] = []
    seed = 2000
    during: dict[str, str] = {}
    """The fault each push was in flight at, by its commit."""
    with team(root, repos, args.workers) as (target, service):
        warm = [repos.push(n, 1) for n in names]
        wait_for(lambda: settled(target, repos, warm), 600, "warm-up", interval=2)
        for name, strike, answers in faults(service, args.freeze):
            if args.only.lower() not in name.lower():
                continue
            for index in range(args.burst):
                seed += 1
                pushes.append(repos.push(names[index % len(names)], seed))
                during[pushes[-1].sha] = name
            time.sleep(args.lead)
            began = time.time()
            note = strike()
            wait_for(answers, 300, f"{name}: the service answering again", interval=0.5)
            back = time.time() - began
            seed += 1
            last = repos.push(names[seed % len(names)], seed)
            pushes.append(last)
            during[last.sha] = f"after {name}"
            try:
                next_push = partial(settled, target, repos, [last])
                wait_for(next_push, args.next_within, f"{name}: next push")
                after: float | None = time.time() - last.at
            except Exception as exc:  # recorded, judged below
                kept = stalled(service, repos, last, root / f"stalled-{_slug(name)}.json")
                after, note = None, f"{note}; next push: {exc}; what Prefect showed: {kept}"
            outcomes.append(Outcome(name, back, after, note))
            print(json.dumps(outcomes[-1].__dict__), flush=True)
        wait_for(lambda: settled(target, repos, pushes), 900, "drain", interval=2)
        result: dict[str, Any] = check(target, repos, pushes, warm=len(warm))
        result["lost pushes"] = [f"{sha[:7]} ({during[sha]})" for sha in result["lost pushes"]]
        result["failures recorded"] = failures(target.tracking_uri, repos, during)
        states = service.states()
        result["processes at the end"] = states
        restarts = {n: _starts(service.supervisor.logs / "supervisord.log", n) for n in states}
        result["started by supervisord"] = restarts
    for outcome in outcomes:
        version = (
            "never" if outcome.next_push_version_after is None
            else f"{outcome.next_push_version_after:.1f} s"
        )  # fmt: skip
        print(
            f"| {outcome.fault} | answering again after {outcome.back_after:.1f} s "
            f"| next push a version after {version} | {outcome.note} |"
        )
    print(json.dumps(result, indent=1, default=str))


def stalled(service: Team, repos: Repos, push: Push, path: Path) -> Path:
    """Keep what Prefect shows of a push that did not become a version, in `path`."""
    api = service.prefect_api
    runs = [
        r for r in flow_runs(api) if r["parameters"].get("repo_url") == str(repos.bare[push.repo])
    ]
    deployments = {r["deployment_id"] for r in runs} - {None}
    leases = service.home / "prefect" / "concurrency_leases"
    logs = {w.name: w.log for w in [*service.workers, service.servers["receiver"]]}
    ids = {r["id"] for r in runs}
    shown = {
        "push": {"repo": push.repo, "sha": push.sha, "at": push.at},
        "flow runs": [_run(r) for r in runs],
        "deployments": [httpx.get(f"{api}/deployments/{d}", timeout=30).json() for d in deployments],
        "leases on disk": {p.name: p.read_text() for p in sorted(leases.glob("*.json"))},
        "work queues": httpx.post(f"{api}/work_pools/{POOL}/queues/filter", json={}, timeout=30).json(),
        "workers": httpx.post(f"{api}/work_pools/{POOL}/workers/filter", json={}, timeout=30).json(),
        "log lines naming its runs": {
            name: [line for line in log.read_text().splitlines() if any(i in line for i in ids)][-40:]
            for name, log in logs.items()
        },
    }  # fmt: skip
    path.write_text(json.dumps(shown, indent=1, default=str))
    return path


def _run(run: dict[str, Any]) -> dict[str, Any]:
    state = run.get("state") or {}
    keys = ("id", "name", "state_type", "state_name", "created", "expected_start_time",
            "next_scheduled_start_time", "start_time", "end_time", "work_queue_name", "tags")  # fmt: skip
    return {
        **{key: run.get(key) for key in keys},
        "commit": run["parameters"].get("commit_sha"),
        "message": state.get("message"),
        "lease": (state.get("state_details") or {}).get("deployment_concurrency_lease_id"),
    }


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def failures(tracking_uri: str, repos: Repos, during: dict[str, str]) -> list[str]:
    """The recorded failures, with the fault their push met and their reason."""
    from scale import mlflow_runs

    found = []
    for name, runs in mlflow_runs(tracking_uri, repos.bare).items():
        for run in runs:
            tags = run.data.tags
            if tags.get("textgen.outcome") == "failed":
                sha = tags.get("mlflow.source.git.commit", "")
                fault = during.get(sha, "warm-up")
                found.append(f"{name}@{sha[:7]} ({fault}): {tags.get('textgen.failure')}")
    return found


def _starts(log: Path, name: str) -> int:
    """How often supervisord started a program (the first start and every restart)."""
    try:
        return sum(1 for line in log.open() if f"spawned: '{name}'" in line)
    except OSError:
        return 0


if __name__ == "__main__":
    main()
