"""Faults against the push → version guarantee, judged from a history (Jepsen's way).

A generator of pushes drives a warm `textgen serve` stack (Prefect server, serve, a bare
repository, the real offline model); a nemesis injects one fault per scenario at the bad moment
(SIGKILL of the run, of serve, of the Prefect server, of everything; the MLflow store locked;
deliveries out of order, twice, oversized; a force-push). Every push the receiver accepted is
recorded; afterwards a checker finds what became of each: a version, a recorded skip (in MLflow,
or Superseded in Prefect, carried by a newer push), a recorded failure, or nothing (lost).

    .venv/bin/python benchmarks/faults.py
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from _common import print_header
from _stack import SECRET, Stack, running_stack

from tasks.names import is_superseded
from tasks.store import experiment_name
from tests.servers import start_serve, wait_for

TERMINAL = {"COMPLETED", "CANCELLED", "FAILED", "CRASHED"}
SLOW = "max_new_tokens: 200\ndo_sample: true\n"  # seconds of generation: room for a kill


@dataclass
class Push:
    scenario: str
    sha: str
    accepted: bool


@dataclass
class Scenario:
    name: str
    expected: str
    happened: str = ""
    restart_to_running: float | None = None
    pushes: list[Push] = field(default_factory=list)


class Faults:
    """The generator, the nemesis and the history, on one stack."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.seed = 1000
        self.history: list[Push] = []
        stack.hook(enabled=False)  # deliveries are sent by hand: their answers are recorded

    # -- generator -------------------------------------------------------------------------
    def commit(self, slow: bool = False, files: dict[str, str | None] | None = None) -> str:
        self.seed += 1
        text = self.stack.settings(self.seed) + (SLOW if slow else "")
        if slow:
            text = text.replace("max_length: 30\n", "")
        return self.stack.work.commit(files or {"textgen.yaml": text}, f"seed {self.seed}")

    def deliver(
        self, scenario: Scenario, after: str, before: str, extra: dict[str, Any] | None = None
    ) -> str:
        self.stack.push()
        payload = {
            "ref": "refs/heads/main",
            "before": before,
            "after": after,
            "repository": {"url": str(self.stack.bare)},
            **(extra or {}),
        }
        from tests.servers import deliver

        try:
            response = deliver(self.stack.receiver_url, SECRET, payload)
            status = response.json().get("status", str(response.status_code))
        except Exception as exc:
            status = f"unreachable ({type(exc).__name__})"
        push = Push(scenario.name, after, status == "queued")
        scenario.pushes.append(push)
        self.history.append(push)
        return status

    def head(self) -> str:
        return self.stack.work.git("rev-parse", "HEAD")

    # -- observation ----------------------------------------------------------------------
    def mlflow_runs(self) -> list[Any]:
        """The experiment's runs; none while the store cannot be read (it may be locked)."""
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.stack.tracking_uri)
        try:
            experiment = client.get_experiment_by_name(experiment_name(str(self.stack.bare)))
            if experiment is None:
                return []
            return list(client.search_runs([experiment.experiment_id], max_results=2000))
        except Exception:
            return []

    def running_run(self, sha: str) -> Any:
        for run in self.mlflow_runs():
            if (
                run.data.tags.get("mlflow.source.git.commit") == sha
                and run.info.status == "RUNNING"
            ):
                return run
        return None

    def flow_runs(self, sha: str) -> list[dict[str, Any]]:
        try:
            runs = self.stack.flow_runs()
        except Exception:
            return []
        return [r for r in runs if r["parameters"].get("commit_sha") == sha]

    def settled(self) -> bool:
        shas = {p.sha for p in self.history if p.accepted}
        try:
            runs = [r for r in self.stack.flow_runs() if r["parameters"].get("commit_sha") in shas]
        except Exception:
            return False
        pending = _outbox_pending(self.stack)
        return not pending and all(r["state_type"] in TERMINAL for r in runs)

    def wait_running(self, sha: str, timeout: float = 180) -> float:
        started = time.monotonic()
        wait_for(
            lambda: any(r["state_type"] in {"RUNNING", "COMPLETED"} for r in self.flow_runs(sha)),
            timeout,
            f"a run of {sha[:7]}\n{self.stack.service.output()[-2000:]}",
        )
        return time.monotonic() - started

    def wait_version(self, sha: str, timeout: float = 240) -> Any:
        def found() -> Any:
            for run in self.mlflow_runs():
                tags = run.data.tags
                if tags.get("mlflow.source.git.commit") == sha and run.info.status != "RUNNING":
                    return run
            return None

        return wait_for(found, timeout, f"an MLflow record of {sha[:7]}")

    # -- nemesis --------------------------------------------------------------------------
    def kill_run_mid_generation(self, sha: str) -> int:
        run = wait_for(lambda: self.running_run(sha), 180, f"the run of {sha[:7]} to start")
        time.sleep(3)
        pid = int(run.data.tags["textgen.worker.pid"])
        os.kill(pid, signal.SIGKILL)
        return pid

    def kill_serve(self) -> None:
        process = self.stack.service.process
        assert process is not None
        os.killpg(process.pid, signal.SIGKILL)  # serve, its fork server and its runs
        process.wait(timeout=10)
        self.stack.service.process = None

    def kill_prefect(self) -> None:
        self.stack.prefect.stopping.set()  # our own supervisor must not restart it meanwhile
        child = self.stack.prefect.child
        assert child is not None
        child.kill()  # SIGKILL to its process group
        self.stack.prefect.child = None

    def restart_serve(self) -> None:
        from tasks.config import model_cache_dir

        self.stack.hook(enabled=True)  # so that the hook is reinstalled where git runs it
        service, url, _ = start_serve(
            self.stack.root, self.stack.bare, self.stack.prefect, SECRET, str(model_cache_dir())
        )
        self.stack.service = service
        self.stack.receiver_url = url
        self.stack.hook(enabled=False)


def _outbox_pending(stack: Stack) -> int:
    """Deliveries the receiver accepted but has not handed to Prefect yet."""
    total = 0
    for path in (stack.root / "home" / "receiver").glob("*.sqlite"):
        with sqlite3.connect(path, timeout=10) as db:
            row = db.execute("SELECT COUNT(*) FROM deliveries WHERE status = 'pending'").fetchone()
            total += int(row[0])
    return total


def scenarios(f: Faults) -> list[tuple[Scenario, Callable[[Scenario], None]]]:
    def next_push_runs(s: Scenario, previous: str, restarted: float | None = None) -> None:
        """Push again; it must run (timed from the restart, if any) and be recorded."""
        sha = f.commit()
        f.deliver(s, sha, previous)
        f.wait_running(sha)
        if restarted is not None:
            s.restart_to_running = time.monotonic() - restarted
        f.wait_version(sha)

    def kill_run(s: Scenario) -> None:
        before = f.head()
        doomed = f.commit(slow=True)
        f.deliver(s, doomed, before)
        f.kill_run_mid_generation(doomed)
        record = f.wait_version(doomed)
        next_push_runs(s, doomed)
        s.happened = f"killed run: MLflow {record.info.status}; next push ran"

    def kill_serve(s: Scenario) -> None:
        before = f.head()
        doomed = f.commit(slow=True)
        f.deliver(s, doomed, before)
        wait_for(lambda: f.running_run(doomed), 180, "the run to start")
        f.kill_serve()
        restarted = time.monotonic()
        f.restart_serve()
        next_push_runs(s, doomed, restarted)
        s.happened = "serve restarted; the next push ran"

    def kill_prefect(s: Scenario) -> None:
        f.kill_prefect()
        before = f.head()
        during = f.commit()
        status = f.deliver(s, during, before)  # Prefect is down: the outbox keeps it
        time.sleep(2)
        restarted = time.monotonic()
        f.stack.prefect.start()
        f.wait_running(during)
        s.restart_to_running = time.monotonic() - restarted
        f.wait_version(during)
        s.happened = f"push while Prefect was down: {status}; ran after the restart"

    def kill_everything(s: Scenario) -> None:
        before = f.head()
        doomed = f.commit(slow=True)
        f.deliver(s, doomed, before)
        f.kill_run_mid_generation(doomed)
        f.kill_serve()
        f.kill_prefect()
        restarted = time.monotonic()
        f.stack.prefect.start()
        f.restart_serve()
        next_push_runs(s, doomed, restarted)
        record = f.wait_version(doomed)
        s.happened = f"dead run: MLflow {record.info.status}; next push ran"

    def mlflow_locked(seconds: float) -> Callable[[Scenario], None]:
        def act(s: Scenario) -> None:
            db = sqlite3.connect(
                f.stack.tracking_uri.removeprefix("sqlite:///"),
                timeout=30,
                check_same_thread=False,
            )
            db.execute("BEGIN EXCLUSIVE")
            before = f.head()
            sha = f.commit()
            f.deliver(s, sha, before)
            threading.Timer(seconds, db.rollback).start()
            time.sleep(seconds)
            wait_for(
                lambda: any(r["state_type"] in TERMINAL for r in f.flow_runs(sha)),
                240,
                f"the run of {sha[:7]} to end",
            )
            db.close()
            (run,) = f.flow_runs(sha)
            record = f.wait_version(sha, timeout=10) if run["state_type"] == "COMPLETED" else None
            outcome = record.data.tags.get("textgen.outcome") if record else "no MLflow run"
            s.happened = (
                f"store locked {seconds:g} s: Prefect {run['state_type']} "
                f"({(run['state']['message'] or '')[:80]}), {outcome}"
            )

        return act

    def out_of_order(s: Scenario) -> None:
        base = f.head()
        x = f.commit()
        y = f.commit()
        f.deliver(s, y, x)
        time.sleep(3)
        f.deliver(s, x, base)
        record = f.wait_version(y)
        s.happened = f"tip {y[:7]}: {record.data.tags.get('textgen.outcome')}"

    def duplicates(s: Scenario) -> None:
        from tests.servers import deliver

        before = f.head()
        sha = f.commit()
        f.deliver(s, sha, before)
        payload = {"ref": "refs/heads/main", "before": before, "after": sha}
        payload["repository"] = {"url": str(f.stack.bare)}  # type: ignore[assignment]
        again = deliver(f.stack.receiver_url, SECRET, payload).json()["status"]
        f.wait_version(sha)
        s.happened = f"second delivery of the commit: {again}"

    def oversized(s: Scenario) -> None:
        before = f.head()
        sha = f.commit()
        paths = [f"data/shard-{i:05d}/part-with-a-longer-file-name.json" for i in range(30_000)]
        extra = {"commits": [{"added": paths, "removed": [], "modified": ["textgen.yaml"]}]}
        size = len(json.dumps(extra))
        status = f.deliver(s, sha, before, extra)
        record = f.wait_version(sha)
        s.happened = (
            f"{size / 1e6:.1f} MB body: {status}, {record.data.tags.get('textgen.outcome')}"
        )

    def force_push(s: Scenario) -> None:
        root = f.head()
        handled = f.commit()
        f.deliver(s, handled, root)
        f.wait_version(handled)
        f.stack.work.git("reset", "--quiet", "--hard", root)
        f.commit()  # B1: a new seed
        tip = f.commit(files={"README.md": f"rewritten {time.time()}\n"})  # B2: README only
        f.stack.work.git("push", "--quiet", "--force", "origin", "main")
        status = f.deliver(s, tip, handled, {"forced": True})
        record = f.wait_version(tip)
        s.happened = f"B2 after force-push: {status}, {record.data.tags.get('textgen.outcome')}"

    return [
        (Scenario("kill -9 of the run", "run ends FAILED, next push runs"), kill_run),
        (Scenario("kill -9 of serve", "restart recovers; next push runs"), kill_serve),
        (Scenario("kill -9 of the Prefect server", "push kept in outbox, runs"), kill_prefect),
        (Scenario("kill -9 of everything", "Crashed/FAILED; next push runs"), kill_everything),
        (Scenario("MLflow store locked 10 s", "version once unlocked"), mlflow_locked(10)),
        (
            Scenario("MLflow store locked 40 s", "recorded failure (Prefect) or version"),
            mlflow_locked(40),
        ),
        (Scenario("out-of-order deliveries", "the tip runs"), out_of_order),
        (Scenario("duplicate deliveries", "one run"), duplicates),
        (Scenario("oversized delivery (30k paths)", "a version"), oversized),
        (Scenario("force-push", "the rewritten settings run"), force_push),
    ]


def check(f: Faults) -> dict[str, Any]:
    """Judge the history: what became of every accepted push."""
    runs = f.mlflow_runs()
    by_sha: dict[str, list[Any]] = {}
    for run in runs:
        by_sha.setdefault(run.data.tags.get("mlflow.source.git.commit", ""), []).append(run)
    flow_runs = f.stack.flow_runs()
    lost = []
    outcome_of: dict[str, str] = {}
    for push in f.history:
        if not push.accepted:
            continue
        records = by_sha.get(push.sha, [])
        outcomes = {r.data.tags.get("textgen.outcome") for r in records}
        mine = [r for r in flow_runs if r["parameters"].get("commit_sha") == push.sha]
        superseded = any(is_superseded((r.get("state") or {}).get("message")) for r in mine)
        # A failure Prefect recorded with its reason counts too (when MLflow could not be written).
        failed_in_prefect = any(r["state_type"] in {"FAILED", "CRASHED"} for r in mine)
        if "new" in outcomes or "reused" in outcomes:
            outcome_of[push.sha] = "version"
        elif "skipped" in outcomes or superseded:
            outcome_of[push.sha] = "recorded skip"
        elif "failed" in outcomes or failed_in_prefect:
            outcome_of[push.sha] = "recorded failure"
        else:
            outcome_of[push.sha] = "lost"
            lost.append(push)
    versions = [
        int(r.data.tags["textgen.version"])
        for r in runs
        if r.data.tags.get("textgen.outcome") == "new"
    ]
    return {
        "accepted": sum(p.accepted for p in f.history),
        "version": sum(v == "version" for v in outcome_of.values()),
        "recorded skip": sum(v == "recorded skip" for v in outcome_of.values()),
        "recorded failure": sum(v == "recorded failure" for v in outcome_of.values()),
        "lost": len(lost),
        "duplicate numbers": len(versions) - len(set(versions)),
        "missing numbers": len(set(range(1, max(versions, default=0) + 1)) - set(versions)),
        "left RUNNING": sum(r.info.status == "RUNNING" for r in runs),
        "lost shas": [p.sha[:7] for p in lost],
    }


def main() -> None:
    print_header("faults: the push → version guarantee under SIGKILL, outages and odd deliveries")
    from tasks.offline import offline_model

    with running_stack(offline_model(), "faults") as stack:
        f = Faults(stack)
        done = []
        for scenario, act in scenarios(f):
            started = time.monotonic()
            try:
                act(scenario)
            except Exception as exc:
                scenario.happened = f"ERROR {type(exc).__name__}: {str(exc)[:300]}"
            took = time.monotonic() - started
            done.append(scenario)
            print(f"- {scenario.name}: {scenario.happened} ({took:.0f} s)", flush=True)
        wait_for(f.settled, 300, "every accepted push to settle", interval=1.0)
        time.sleep(2)
        totals = check(f)

    print("\n| fault | expected | what happened | restart → next push running |")
    print("|---|---|---|---|")
    for s in done:
        restart = f"{s.restart_to_running:.1f} s" if s.restart_to_running is not None else ""
        print(f"| {s.name} | {s.expected} | {s.happened} | {restart} |")
    print("\n| total | count |\n|---|---|")
    for key, value in totals.items():
        print(f"| {key} | {value} |")


if __name__ == "__main__":
    main()
