"""The repair loops of the receiver's process: what the push → version guarantee needs beyond
Prefect's own triggers and automations.

- The janitor, after every emitted push and every second: starts the run Prefect's trigger did
  not (an event the API took, whose flow run never appeared), and marks the queued push runs
  older than the newest push superseded (Cancelled, the message saying so).
- The reaper (`--reap`, for work pools): runs a crashed push once more, and ends the MLflow
  runs of dead workers (`tasks.recovery`).
- On a service's start: the flow runs a killed service left behind end Crashed.

A failure of one step is logged at WARNING with what was skipped, counted in the outbox (and
shown by `textgen status`), and tried again on the next pass; it never stops the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from deployments.orchestration import queries
from deployments.service.outbox import Outbox
from tasks import recovery, versions
from tasks.errors import NoExperimentError
from tasks.names import PUSH, SUPERSEDED
from tasks.repo import RepoLocation
from tasks.store import Experiment

logger = logging.getLogger(__name__)

RETRIED_TAG = "textgen-retried"
"""The Prefect tag of a crashed push run the reaper has retried (each is retried once)."""
RUN_GRACE_SECONDS = 30.0
"""How long after Prefect took a push event its deployment trigger has to start a run."""


@dataclass(frozen=True)
class Watched:
    """A served link's deployment, whose queued runs the janitor and the reaper look after."""

    deployment_id: Any
    repo: RepoLocation
    branch: str


def supersede_queued_runs(deployment_id: Any, newest_sha: str) -> int:
    """Mark the queued push/poll runs of a deployment whose commit is not the newest push's,
    `newest_sha`, Cancelled (`Superseded: ...`, naming it), and name them after their commit:
    the newest push's run runs instead. Manual runs are never touched. Returns how many."""
    from prefect.states import Cancelled

    marked = 0
    message = f"{SUPERSEDED}: by the newer push of {newest_sha[:7]}, which runs instead"
    with queries.client() as api:
        for run in queries.flow_runs(api, deployment_id, ["SCHEDULED"]):
            if not queries.automatic(run) or queries.commit_of(run) == newest_sha:
                continue
            api.set_flow_run_state(run.id, Cancelled(message=message), force=True)
            # Named after its commit, as the runs that start are (a queued run has the name
            # Prefect gave it, and a superseded one never starts).
            commit = str(run.parameters.get("commit_sha") or "")
            name = f"{run.parameters.get('trigger', PUSH)}-{commit[:12]}"
            try:
                api.update_flow_run(run.id, name=name)
            except Exception as exc:  # a name is cosmetic: the run is superseded all the same
                logger.warning("Could not rename superseded flow run %s: %s", run.id, exc)
            marked += 1
    if marked:
        logger.info("Marked %d queued run(s) superseded by %s", marked, newest_sha[:7])
    return marked


def recover_after_restart(deployment_id: Any, repo: RepoLocation) -> int:
    """End the runs a killed service left behind, before its runner starts again: a flow run
    still Pending, Running or Cancelling has no process now, unless its MLflow run names a live
    one on this machine (it outlived the service: left to finish). The others are set Crashed,
    which releases the deployment's concurrency slot, and their MLflow runs end FAILED (or are
    published, when they had taken their number). Returns how many were ended."""
    from prefect.states import Crashed

    experiment = Experiment.for_repo(repo)
    reason = "its process ended with the service that ran it (textgen serve restarted)"
    ended = 0
    with queries.client() as api:
        for run in queries.flow_runs(api, deployment_id, ["PENDING", "RUNNING", "CANCELLING"]):
            tracked = versions.of_flow_run(experiment, run.id)
            running = [r for r in tracked if r.info.status == "RUNNING"]
            if any(recovery.process_gone(r.data.tags) is None for r in running):
                logger.info("Flow run %s outlived the service; leaving it to finish", run.name)
                continue
            api.set_flow_run_state(run.id, Crashed(message=reason), force=True)
            for r in running:
                recovery.recover(experiment, r, reason)
            logger.warning("Flow run %s was left behind: %s; marked it Crashed", run.name, reason)
            ended += 1
    return ended + recovery.recover_dead_runs(experiment)


def start_missing_runs(item: Watched, outbox: Outbox, grace: float = RUN_GRACE_SECONDS) -> int:
    """Start the runs Prefect's trigger did not: a push event the API took (2xx) whose flow run
    did not appear within `grace` seconds gets one, with the parameters the trigger would have
    given (runs of older pushes are then superseded as usual). Returns how many were started."""
    pending = outbox.without_run(item.repo, item.branch, grace)
    if not pending:
        return 0
    started = 0
    with queries.client() as api:
        seen = {queries.commit_of(r) for r in queries.flow_runs(api, item.deployment_id)}
        for provider, delivery, event in pending:
            payload = event["payload"]
            if payload["after"] not in seen:
                api.create_flow_run_from_deployment(
                    item.deployment_id,
                    parameters={
                        "commit_sha": payload["after"],
                        "before": payload.get("before"),
                        "changed_paths": payload.get("changed_paths"),
                        "trigger": payload.get("trigger", PUSH),
                    },
                    tags=["textgen-recovered-event"],
                )
                seen.add(payload["after"])
                started += 1
                logger.warning(
                    "Prefect took the push event for %s (delivery %s) but its trigger started no "
                    "run within %.0f s; started it",
                    payload["after"][:7],
                    delivery,
                    grace,
                )
            outbox.run_seen(provider, delivery)
    return started


def retry_crashed_runs(item: Watched, newest: str | None) -> int:
    """Start a crashed push run once more (on whichever worker takes it) when its commit is
    still the branch's newest push, at most once per run, never a retry's retry. Returns how
    many runs were started."""
    started = 0
    with queries.client() as api:
        for run in queries.flow_runs(api, item.deployment_id, ["CRASHED"], limit=50):
            if RETRIED_TAG in run.tags or not queries.automatic(run):
                continue
            # Marked first: a reaper that dies here loses a retry, never doubles one.
            api.update_flow_run(run.id, tags=[*run.tags, RETRIED_TAG])
            sha = queries.commit_of(run)
            if run.parameters.get("attempt", 1) >= 2 or (newest and sha != newest):
                continue
            api.create_flow_run_from_deployment(
                item.deployment_id,
                parameters={**run.parameters, "attempt": 2},
                tags=[*(t for t in run.tags if t != RETRIED_TAG), "retry"],
            )
            why = run.state.message if run.state else ""
            logger.warning(
                "Flow run %s of %s crashed (%s); started it once more", run.name, sha[:7], why
            )
            started += 1
    return started


class Failures:
    """A loop's failures, each said at WARNING with what was skipped (once a minute while it
    stays the same failure) and counted in the outbox, where `textgen status` reads them."""

    SAY_EVERY = 60.0

    def __init__(
        self, loop: str, outbox: Outbox, redact: Callable[[str], str] = lambda text: text
    ) -> None:
        self.loop = loop
        self.outbox = outbox
        self.redact = redact
        """What a failure's text goes through before it is said or kept (credentials out)."""
        self.said: dict[str, tuple[str, float, int]] = {}
        """By what failed: the last failure said, when, and how many since (not yet counted)."""

    def failed(self, what: str, exc: Exception, then: str = "trying again next pass") -> None:
        """`what` failed with `exc`; the loop goes on."""
        text = self.redact(f"{type(exc).__name__}: {exc}")
        last, when, unsaid = self.said.get(what, ("", 0.0, 0))
        if text == last and time.monotonic() - when < self.SAY_EVERY:
            self.said[what] = (last, when, unsaid + 1)
            return
        self.outbox.count_failure(self.loop, f"{what}: {text}", unsaid + 1)
        self.said[what] = (text, time.monotonic(), 0)
        logger.warning("The %s could not %s; %s: %s", self.loop, what, then, text)

    def succeeded(self, what: str) -> None:
        """`what` worked again: the failures not counted yet are."""
        last, _, unsaid = self.said.pop(what, ("", 0.0, 0))
        if unsaid:
            self.outbox.count_failure(self.loop, f"{what}: {last}", unsaid)


class RepairLoop(threading.Thread):
    """Steps over every watched deployment, every `seconds`; a step's failure is said and
    counted (`Failures`), and the loop goes on."""

    loop = "repair loop"

    def __init__(self, watched: list[Watched], outbox: Outbox, seconds: float) -> None:
        super().__init__(name=f"textgen-{self.loop}", daemon=True)
        self.watched = watched
        self.outbox = outbox
        self.seconds = seconds
        self.stopping = threading.Event()
        self.failures = Failures(self.loop, outbox)

    def attempt(self, what: str, step: Callable[[], object]) -> None:
        """Run one step now; a failure is skipped until the next pass."""
        try:
            step()
        except Exception as exc:  # one step's trouble must not stop the others
            self.failures.failed(what, exc)
        else:
            self.failures.succeeded(what)


class Janitor(RepairLoop):
    """Keeps at most one queued automatic run per deployment: the newest push's."""

    loop = "janitor"

    def __init__(self, watched: list[Watched], outbox: Outbox, seconds: float = 1.0) -> None:
        super().__init__(watched, outbox, seconds)
        self.wake = threading.Event()

    def run(self) -> None:
        """Check after each emitted push and every `seconds`."""
        while not self.stopping.is_set():
            for item in self.watched:
                where = item.repo.url
                missing = partial(start_missing_runs, item, self.outbox)
                self.attempt(f"check {where} for missing runs", missing)
                self.attempt(f"supersede queued runs of {where}", partial(self.supersede, item))
            self.wake.wait(self.seconds)
            self.wake.clear()

    def supersede(self, item: Watched) -> None:
        """Mark the deployment's queued runs older than the newest push superseded."""
        if newest := self.outbox.latest(item.repo, item.branch):
            supersede_queued_runs(item.deployment_id, newest)


class Reaper(RepairLoop):
    """Ends what dead workers left: MLflow runs of crashed flow runs end FAILED with the reason
    (or are published, when they held their number), and crashed push runs run once more.
    Prefect itself marks a run whose worker died Crashed (the heartbeat automation), which frees
    its deployment's slot; this thread does the rest, from the receiver's machine."""

    loop = "reaper"

    def __init__(self, watched: list[Watched], outbox: Outbox, seconds: float = 5.0) -> None:
        super().__init__(watched, outbox, seconds)

    def run(self) -> None:
        """Check every `seconds`."""
        while not self.stopping.wait(self.seconds):
            self.check()

    def check(self) -> None:
        """One pass over every watched deployment."""
        for item in self.watched:
            where = item.repo.url
            self.attempt(f"retry crashed runs of {where}", partial(self.retry, item))
            self.attempt(f"end the dead runs of {where}", partial(self.end_dead_runs, item))

    def retry(self, item: Watched) -> None:
        """Run the deployment's crashed push runs once more, when they are still the newest."""
        retry_crashed_runs(item, self.outbox.latest(item.repo, item.branch))

    @staticmethod
    def end_dead_runs(item: Watched) -> None:
        """End the MLflow runs of the repository whose process is gone (none before its first)."""
        try:
            experiment = Experiment.for_repo(item.repo, create=False)
        except NoExperimentError:
            return
        recovery.recover_dead_runs(experiment)
