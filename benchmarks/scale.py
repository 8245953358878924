"""Scale: linked repositories, pushes in bursts, on the embedded default and on the team service.

Rows, in one invocation on one machine:
- baseline: the embedded default, `textgen serve --links` (SQLite Prefect and MLflow, one run
  at a time);
- team, W workers: PostgreSQL-backed Prefect and MLflow servers, the receiver, and W warm
  workers, each its own process and data folder (`deployments/ops/team.py`, as compose.yaml).

Each row gets the same push schedule (seeded): `--pushes` pushes to `--repos` repositories in
bursts of 10 over about `--seconds` seconds, through each bare repository's post-receive hook,
after one warm-up push per repository. A checker then judges the history: every accepted push
ends as a version, a recorded skip or a superseded run (else it is lost); version numbers per
repository are unique and gap-free; nothing is left RUNNING in MLflow or unfinished in Prefect
(a crashed run of a team's link the reaper has not yet retried or ended counts as unfinished);
each repository's last push is a version. It reports generations executed against pushes,
push → Running latency (p50/p95), throughput, CPU seconds spent by the workers and by the
servers per generation, and the servers' database work (PostgreSQL transactions and rows
inserted) per push and per version, the HTTP requests each server served per push (from their
access logs), and per second once the service is idle (`--settle` seconds after the drain:
the reaper reads Prefect every 5 s for a minute after the last run, once a minute after).
Last, `--alone` pushes one at a time, each once the one before is a version: push → Running
with nothing queued before it.

    .venv/bin/python benchmarks/scale.py [--repos 6] [--pushes 120] [--seconds 120] [--workers 1,3]
        [--idle 30] [--settle 0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from _common import bench_dir, print_header
from _stack import seconds as api_seconds
from sqlalchemy.engine import make_url

from deployments.hook import install
from deployments.ops.postgres import Postgres
from deployments.ops.team import Team
from deployments.orchestration.deployments import LINK_TAG
from deployments.service.repair import CELLS_ENDED_TAG, RETRIED_TAG
from tasks.links import Link, save_links
from tasks.names import is_superseded
from tasks.store import experiment_name
from tests.conftest import GitRepo, build_tiny_gpt2
from tests.servers import PrefectServer, Service, free_port, wait_for

SPEC = "on:\n  github:\n    branches:\n      only: main\n"
UNFINISHED = {"RUNNING", "PENDING", "SCHEDULED", "CANCELLING", "PAUSED"}


@dataclass
class Push:
    repo: str
    sha: str
    at: float
    accepted: bool


@dataclass
class Row:
    name: str
    pushes: list[Push] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)


def settings(model: Path, seed: int) -> str:
    return f"model: {model}\nrandom_seed: {seed}\nmax_length: 40\nnum_return_sequences: 3\n"


class Repos:
    """Bare repositories with work clones, each linked with the hook as its provider."""

    def __init__(self, root: Path, count: int, model: Path) -> None:
        self.model = model
        self.work: dict[str, GitRepo] = {}
        self.bare: dict[str, Path] = {}
        self.secret = root / "hook.secret"
        self.secret.write_text("scale-secret")
        for index in range(count):
            name = f"repo{index}"
            work = GitRepo(root / f"{name}-work")
            work.commit({"textgen.yaml": settings(model, 0), ".gradient/workflows/w.yaml": SPEC})
            bare = root / f"{name}.git"
            subprocess.run(
                ["git", "clone", "--quiet", "--bare", str(work.path), str(bare)], check=True
            )
            work.git("remote", "add", "origin", str(bare))
            self.work[name], self.bare[name] = work, bare
        self.links = root / "links.yaml"
        save_links(
            [
                Link(name=name, url=str(bare), provider="hook", secret=f"file:{self.secret}")
                for name, bare in self.bare.items()
            ],
            self.links,
        )

    def hook(self, url: str) -> None:
        for bare in self.bare.values():
            install(bare, url, self.secret, force=True)

    def push(self, name: str, seed: int) -> Push:
        work = self.work[name]
        sha = work.commit({"textgen.yaml": settings(self.model, seed)}, f"seed {seed}")
        result = subprocess.run(
            ["git", "push", "--quiet", "origin", "main"],
            cwd=work.path,
            capture_output=True,
            text=True,
            check=True,
        )
        return Push(name, sha, time.time(), "queued" in result.stderr)


def schedule(repos: int, pushes: int, seed: int = 7) -> list[tuple[float, str]]:
    """(offset in seconds, repository) of every push: bursts of 10 over the window."""
    rng = random.Random(seed)
    bursts = max(1, pushes // 10)
    plan = []
    for burst in range(bursts):
        for _ in range(pushes // bursts):
            plan.append((float(burst), f"repo{rng.randrange(repos)}"))
    return plan


def run_pushes(repos: Repos, plan: list[tuple[float, str]], window: float) -> list[Push]:
    bursts = max(1, len(plan) // 10)
    gap = window / bursts
    began = time.time()
    done = []
    for number, (offset, name) in enumerate(plan):
        at = began + int(offset) * gap
        if at > time.time():
            time.sleep(at - time.time())
        done.append(repos.push(name, 1000 + number))
    return done


# ---- what the servers did -------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rpartition(")")[2].split()[1])
            tree.setdefault(parent, []).append(int(entry.name))
    return tree


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process, its live descendants, and the children they reaped."""
    tick = os.sysconf("SC_CLK_TCK")
    tree = _children()
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += sum(int(v) for v in fields[11:15]) / tick
        stack.extend(tree.get(current, []))
    return total


_REQUEST = re.compile(r'"(GET|POST|PUT|PATCH|DELETE) /api/([^ ?"]*)')
_ID = re.compile(
    r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}|[0-9a-f]{32}|(?<=/)tr-[0-9a-f]+|(?<=/)\d+(?=/|$)"
)


def endpoints_served(log: Path) -> Counter[str]:
    """HTTP requests a server's access log holds so far, by method and path (ids as `{id}`)."""
    found: Counter[str] = Counter()
    try:
        for line in log.open(errors="replace"):
            if match := _REQUEST.search(line):
                found[f"{match[1]} /api/{_ID.sub('{id}', match[2])}"] += 1
    except OSError:
        pass
    return found


def requests_served(log: Path) -> int:
    """HTTP requests a server's access log holds so far."""
    return sum(endpoints_served(log).values())


def postmaster_pid(postgres: Postgres) -> int:
    return int((postgres.folder / "data" / "postmaster.pid").read_text().split()[0])


def pg_stats(postgres: Postgres) -> dict[str, dict[str, int]]:
    import psycopg2

    connection = psycopg2.connect(
        host="127.0.0.1",
        port=postgres.port,
        user="textgen",
        password=postgres.password,
        dbname="postgres",
    )
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT datname, xact_commit, tup_inserted FROM pg_stat_database "
                "WHERE datname IN ('prefect', 'mlflow')"
            )
            return {n: {"transactions": x, "rows": r} for n, x, r in cursor.fetchall()}
    finally:
        connection.close()


# ---- one row ----------------------------------------------------------------------------------


@dataclass
class Target:
    """Where a row's runs are recorded, and the processes to charge CPU time to."""

    prefect_api: str
    tracking_uri: str
    workers: list[int]
    servers: dict[str, int]
    """The servers' process ids, by server (PostgreSQL's postmaster too, on the team)."""
    mlflow_db: str
    """The MLflow store's database (an SQLAlchemy URL): the drain is watched there, not
    through the servers, so that the benchmark's own polling is not counted as their work."""
    logs: dict[str, Path] = field(default_factory=dict)
    """The servers' access logs, by server."""


def flow_runs(api: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    offset = 0
    while True:
        response = httpx.post(
            f"{api}/flow_runs/filter", json={"limit": 200, "offset": offset}, timeout=30
        )
        response.raise_for_status()
        page = response.json()
        found += page
        if len(page) < 200:
            return found
        offset += 200


def mlflow_runs(tracking_uri: str, bare: dict[str, Path]) -> dict[str, list[Any]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    runs: dict[str, list[Any]] = {}
    for name, path in bare.items():
        experiment = client.get_experiment_by_name(experiment_name(str(path)))
        runs[name] = (
            []
            if experiment is None
            else client.search_runs([experiment.experiment_id], max_results=5000)
        )
    return runs


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def p95(values: list[float]) -> float | None:
    """The 95th percentile, by nearest rank: the sorted values' ceil(0.95 n)-th (of two values,
    the larger; never below the median)."""
    return sorted(values)[math.ceil(0.95 * len(values)) - 1] if values else None


_VERSIONED = """
SELECT e.name, sha.value FROM runs r
JOIN experiments e ON e.experiment_id = r.experiment_id
JOIN tags sha ON sha.run_uuid = r.run_uuid AND sha.key = 'mlflow.source.git.commit'
JOIN tags outcome ON outcome.run_uuid = r.run_uuid AND outcome.key = 'textgen.outcome'
WHERE outcome.value IN ('new', 'reused')
"""


def versioned(mlflow_db: str) -> set[tuple[str, str]]:
    """(experiment, commit) of every version recorded, read from the store's tables in one
    query (the drain's poll, every 2 s: through the MLflow server it was 12 requests)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(mlflow_db, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            return {(name, sha) for name, sha in connection.execute(sqlalchemy.text(_VERSIONED))}
    finally:
        engine.dispose()


def settled(target: Target, repos: Repos, pushes: list[Push]) -> bool:
    """Each repository's last push a version, no flow run unfinished, and no crashed run of a
    team's link the reaper has still to look at (it may start it once more)."""
    last = {p.repo: p.sha for p in pushes}
    done = versioned(target.mlflow_db)
    if any((experiment_name(str(repos.bare[name])), sha) not in done for name, sha in last.items()):
        return False
    return not any(is_unfinished(r) for r in flow_runs(target.prefect_api))


def is_unfinished(run: dict[str, Any]) -> bool:
    """A flow run still going, or a crashed run of a team's link that the reaper has not
    tagged retried or ended yet (it may start it once more)."""
    if run["state_type"] in UNFINISHED:
        return True
    tags = set(run["tags"])
    return (
        run["state_type"] == "CRASHED"
        and LINK_TAG in tags
        and not tags & {RETRIED_TAG, CELLS_ENDED_TAG}
    )


def one_at_a_time(target: Target, repos: Repos, count: int) -> list[float]:
    """Push → Running of pushes made one at a time, each once the one before is a version: the
    start itself, with nothing queued before it (the burst schedule measures the queueing)."""
    latencies = []
    for index in range(count):
        push = repos.push(f"repo{index % len(repos.bare)}", 5000 + index)
        wait_for(partial(settled, target, repos, [push]), 240, "a push on its own", interval=0.5)
        started = [
            api_seconds(run["start_time"])
            for run in flow_runs(target.prefect_api)
            if run["parameters"].get("commit_sha") == push.sha and run["start_time"]
        ]
        latencies.append(min(t for t in started if t is not None) - push.at)
        time.sleep(1)
    return sorted(latencies)


def check(target: Target, repos: Repos, pushes: list[Push], warm: int) -> dict[str, Any]:
    """Judge the history: classify every accepted push, check the numbering, count."""
    runs = mlflow_runs(target.tracking_uri, repos.bare)
    prefect = flow_runs(target.prefect_api)
    by_sha: dict[str, list[dict[str, Any]]] = {}
    for run in prefect:
        by_sha.setdefault(str(run["parameters"].get("commit_sha") or ""), []).append(run)
    outcomes: Counter[str] = Counter()
    lost: list[str] = []
    latencies = []
    for push in pushes:
        if not push.accepted:
            outcomes["not accepted"] += 1
            continue
        recorded = [
            r for r in runs[push.repo] if r.data.tags.get("mlflow.source.git.commit") == push.sha
        ]
        tags = [r.data.tags for r in recorded]
        flows = by_sha.get(push.sha, [])
        if any(t.get("textgen.outcome") == "new" for t in tags):
            outcomes["version"] += 1
        elif any(t.get("textgen.outcome") == "reused" for t in tags):
            outcomes["reused"] += 1
        elif any(t.get("textgen.outcome") == "skipped" for t in tags):
            outcomes["skipped (recorded)"] += 1
        elif any(is_superseded((f.get("state") or {}).get("message")) for f in flows):
            outcomes["superseded (queued)"] += 1
        elif any(t.get("textgen.outcome") == "failed" for t in tags):
            outcomes["failed (recorded)"] += 1
        else:
            outcomes["lost"] += 1
            lost.append(push.sha)
        # Runs superseded while they waited never ran (their start_time is the cancellation).
        started = [
            api_seconds(f.get("start_time"))
            for f in flows
            if f.get("start_time") and not is_superseded((f.get("state") or {}).get("message"))
        ]
        if started:
            latencies.append(min(s for s in started if s is not None) - push.at)
    duplicates = missing = 0
    running = 0
    versions_total = 0
    for name in repos.bare:
        numbers = [
            int(r.data.tags["textgen.version"])
            for r in runs[name]
            if r.data.tags.get("textgen.outcome") == "new"
        ]
        versions_total += len(numbers)
        duplicates += len(numbers) - len(set(numbers))
        if numbers:
            missing += max(numbers) - len(set(numbers))
        running += sum(1 for r in runs[name] if r.info.status == "RUNNING")
    unfinished = sum(1 for r in prefect if is_unfinished(r))
    last = {p.repo: p.sha for p in pushes}
    tips_not_versions = sum(
        1
        for name, sha in last.items()
        if not any(
            r.data.tags.get("mlflow.source.git.commit") == sha
            and r.data.tags.get("textgen.outcome") in {"new", "reused"}
            for r in runs[name]
        )
    )
    ends = [
        r.info.end_time / 1000
        for rs in runs.values()
        for r in rs
        if r.data.tags.get("textgen.outcome") == "new" and r.info.end_time
    ]
    first = min(p.at for p in pushes)
    generations = versions_total - warm
    minutes = (max(ends) - first) / 60 if ends else float("nan")
    return {
        "pushes": len(pushes),
        "accepted": sum(p.accepted for p in pushes),
        "outcomes": dict(outcomes),
        "lost": outcomes["lost"],
        "lost pushes": lost,
        "duplicate versions": duplicates,
        "missing versions": missing,
        "left RUNNING (MLflow)": running,
        "unfinished flow runs (Prefect)": unfinished,
        "tips without a version": tips_not_versions,
        "generations": generations,
        "push to Running p50 s": median(latencies),
        "push to Running p95 s": p95(latencies),
        "runs started": len(latencies),
        "window min": minutes,
        "generations per min": generations / minutes if ends else None,
        "flow runs": len(prefect),
    }


@contextmanager
def embedded(root: Path, repos: Repos) -> Iterator[Target]:
    """`textgen serve --links` on a local SQLite Prefect server and SQLite MLflow store."""
    prefect = PrefectServer(root / "prefect")
    # Its access log (a line per request), as the team's servers write theirs.
    os.environ["PREFECT_SERVER_LOGGING_LEVEL"] = "INFO"
    try:
        prefect.start()
    finally:
        os.environ.pop("PREFECT_SERVER_LOGGING_LEVEL")
    port = free_port()
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect.api_url,
        "TEXTGEN_HOME": str(root / "home"),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "TEXTGEN_ARTIFACT_ROOT": (root / "artifacts").as_uri(),
        "TEXTGEN_MODEL_DIRS": str(repos.model.parent),
    }
    service = Service.textgen(
        ["serve", "--links", str(repos.links), "--port", str(port), "--ui-port", "0"],
        env,
        root / "serve.log",
    )
    try:
        wait_for(
            lambda: "Serving nlp-text-generation/" in service.output() or not service.alive(),
            180,
            "textgen serve",
        )
        assert service.alive(), service.output()[-3000:]
        repos.hook(f"http://127.0.0.1:{port}/webhooks/github")
        assert service.process is not None and prefect.pid
        logs = {"prefect": prefect.home / "server.log"}
        pids = [service.process.pid]
        yield Target(
            prefect.api_url, tracking_uri, pids, {"prefect": prefect.pid}, tracking_uri, logs
        )
    finally:
        service.stop()
        prefect.stop()


@contextmanager
def team(root: Path, repos: Repos, workers: int) -> Iterator[tuple[Target, Team]]:
    pg_folder = Path(tempfile.mkdtemp(prefix="textgen-pg-", dir="/tmp"))
    os.chmod(pg_folder, 0o755)
    env = {**os.environ, "TEXTGEN_MODEL_DIRS": str(repos.model.parent)}
    service = Team(
        root / "team",
        repos.links,
        workers=workers,
        postgres_folder=pg_folder / "c",
        env=env,
        access_log=True,
    )
    try:
        service.start()
        repos.hook(f"http://127.0.0.1:{service.ports.receiver}/webhooks/github")
        target = Target(
            service.prefect_api,
            service.mlflow_uri,
            [w.pid for w in service.workers],
            {
                **{name: service.servers[name].pid for name in ("prefect", "mlflow")},
                "postgres": postmaster_pid(service.postgres),
            },
            make_url(service.postgres.url("mlflow", "postgresql+psycopg2"))
            .set(password=service.postgres.password)
            .render_as_string(hide_password=False),
            {name: service.servers[name].log for name in ("prefect", "mlflow")},
        )
        yield target, service
    finally:
        service.stop()
        shutil.rmtree(pg_folder, ignore_errors=True)


def measure(
    name: str, root: Path, args: argparse.Namespace, model: Path, workers: int | None
) -> Row:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    repos = Repos(root, args.repos, model)
    plan = schedule(args.repos, args.pushes)
    row = Row(name)
    context = embedded(root, repos) if workers is None else team(root, repos, workers)
    with context as entered:
        target, service = entered if isinstance(entered, tuple) else (entered, None)
        # Warm-up: one push per repository, each made a version, before the clock starts.
        warm = [repos.push(n, 1) for n in repos.bare]
        wait_for(lambda: settled(target, repos, warm), 600, f"{name}: warm-up", interval=2)
        cpu_before = {p: tree_cpu(p) for p in [*target.workers, *target.servers.values()]}
        stats_before = pg_stats(service.postgres) if service else None
        logs = target.logs
        requests_before = {name: endpoints_served(log) for name, log in logs.items()}
        row.pushes = run_pushes(repos, plan, args.seconds)
        wait_for(lambda: settled(target, repos, row.pushes), 900, f"{name}: drain", interval=2)
        row.result = check(target, repos, row.pushes, warm=len(warm))
        generations = max(1, row.result["generations"])
        worker_cpu = sum(tree_cpu(p) - cpu_before[p] for p in target.workers)
        by_server = {name: tree_cpu(p) - cpu_before[p] for name, p in target.servers.items()}
        row.result["worker CPU s per generation"] = worker_cpu / generations
        row.result["server CPU s per generation"] = sum(by_server.values()) / generations
        row.result["server CPU s per generation, by server"] = {
            name: round(cpu / generations, 2) for name, cpu in by_server.items()
        }
        if service and stats_before:
            after = pg_stats(service.postgres)
            pushes = max(1, row.result["accepted"])
            for db in ("prefect", "mlflow"):
                delta = {k: after[db][k] - stats_before[db][k] for k in after[db]}
                row.result[f"{db} db transactions per push"] = delta["transactions"] / pushes
                row.result[f"{db} db rows per version"] = delta["rows"] / generations
        for name, log in logs.items():
            served = endpoints_served(log) - requests_before[name]
            accepted = max(1, row.result["accepted"])
            row.result[f"{name} server requests per push"] = served.total() / accepted
            row.result[f"{name} server requests per push, top"] = {
                path: round(count / accepted, 2) for path, count in served.most_common(8)
            }
        # The service idle: nothing pushed, nothing running (after `--settle` seconds more).
        time.sleep(args.settle)
        idle_before = {name: requests_served(log) for name, log in logs.items()}
        idle_cpu_before = {name: tree_cpu(p) for name, p in target.servers.items()}
        time.sleep(args.idle)
        row.result["server CPU s per s, idle, by server"] = {
            name: round((tree_cpu(target.servers[name]) - before) / args.idle, 3)
            for name, before in idle_cpu_before.items()
        }
        for name, log in logs.items():
            idle = (requests_served(log) - idle_before[name]) / args.idle
            row.result[f"{name} server requests per s, idle"] = idle
        alone = one_at_a_time(target, repos, args.alone)
        row.result["push to Running, one at a time, p50 s"] = median(alone)
        row.result["push to Running, one at a time, p95 s"] = p95(alone)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repos", type=int, default=6)
    parser.add_argument("--pushes", type=int, default=120)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--workers", default="1,3", help="team rows: worker counts")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds idle, counted after")
    parser.add_argument(
        "--settle", type=float, default=0.0, help="seconds waited before the idle count"
    )
    parser.add_argument("--alone", type=int, default=10, help="pushes one at a time, at the end")
    args = parser.parse_args()
    print_header(
        f"scale: {args.repos} repositories, {args.pushes} pushes in bursts over {args.seconds:g} s"
    )
    base = bench_dir() / "scale"
    model = build_tiny_gpt2(base / "tiny-gpt2")
    rows = []
    if not args.skip_baseline:
        rows.append(measure("embedded (SQLite, serve)", base / "embedded", args, model, None))
        print(json.dumps({rows[-1].name: rows[-1].result}, indent=1), flush=True)
    for count in (int(w) for w in args.workers.split(",")):
        rows.append(measure(f"team, {count} worker(s)", base / f"team-{count}", args, model, count))
        print(json.dumps({rows[-1].name: rows[-1].result}, indent=1), flush=True)

    team_rows = [r for r in rows if r.name.startswith("team")]
    if len(team_rows) >= 2:
        one, many = team_rows[0], team_rows[-1]
        n = int(many.name.split()[1])
        speedup = many.result["generations per min"] / one.result["generations per min"]
        fitted = (1 - 1 / speedup) / (1 - 1 / n) if speedup > 1 else 0.0
        worker = one.result["worker CPU s per generation"]
        server = one.result["server CPU s per generation"]
        by_cpu = worker / (worker + server)
        print(f"speed-up {n} vs 1 worker(s): {speedup:.2f}x on {os.cpu_count()} cores")
        print(f"parallel fraction fitted to it (Amdahl, bounded by the cores): {fitted:.2f}")
        print(
            f"parallel fraction by CPU time (worker / (worker + servers) per generation): "
            f"{by_cpu:.2f}"
        )
        for machines in (2, 3, 6, 12):
            predicted = 1 / ((1 - by_cpu) + by_cpu / machines)
            print(f"  predicts {predicted:.2f}x with {machines} worker machines")


if __name__ == "__main__":
    main()
