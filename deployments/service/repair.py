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
from typing import Any, NamedTuple

from deployments.orchestration import queries
from deployments.service.outbox import Outbox
from tasks import cells, recovery, versions
from tasks.errors import NoExperimentError
from tasks.names import PUSH, SUPERSEDED
from tasks.repo import RepoLocation
from tasks.store import Experiment

logger = logging.getLogger(__name__)

RETRIED_TAG = "textgen-retried"
"""The Prefect tag of a crashed push run the reaper has retried (each is retried once)."""
CELLS_ENDED_TAG = "textgen-cells-ended"
"""The Prefect tag of a crashed manual run whose cell runs the reaper has ended (a manual run
is not retried: its user starts it again)."""
RUN_GRACE_SECONDS = 30.0
"""How long after Prefect took a push event its deployment trigger has to start a run."""


@dataclass(frozen=True)
class Watched:
    """A served link's deployment, whose queued runs the janitor and the reaper look after."""

    deployment_id: Any
    repo: RepoLocation
    branch: str


def supersede_queued_runs(api: Any, queued: list[Any], newest_sha: str) -> int:
    """Mark the queued push/poll runs (`queued`: a deployment's Scheduled runs) whose commit is
    not the newest push's, `newest_sha`, Cancelled (`Superseded: ...`, naming it), and name them
    after their commit: the newest push's run runs instead. Manual runs are never touched.
    Returns how many."""
    from prefect.states import Cancelled

    marked = 0
    message = f"{SUPERSEDED}: by the newer push of {newest_sha[:7]}, which runs instead"
    for run in queued:
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


def by_deployment(runs: list[Any]) -> dict[Any, list[Any]]:
    """Flow runs (of several deployments, read at once) grouped by their deployment's id."""
    grouped: dict[Any, list[Any]] = {}
    for run in runs:
        grouped.setdefault(run.deployment_id, []).append(run)
    return grouped


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
    """Note the push events the API took (2xx) whose flow run has appeared, and start the runs
    Prefect's trigger did not: an event whose run did not appear within `grace` seconds gets
    one, with the parameters the trigger would have given (runs of older pushes are then
    superseded as usual). Reads Prefect only while an event waits for its run. Returns how
    many runs were started."""
    pending = outbox.without_run(item.repo, item.branch, 0)
    if not pending:
        return 0
    overdue = {d for _, d, _ in outbox.without_run(item.repo, item.branch, grace)}
    started = 0
    with queries.client() as api:
        seen = {queries.commit_of(r) for r in queries.flow_runs(api, item.deployment_id)}
        for provider, delivery, event in pending:
            payload = event["payload"]
            if payload["after"] not in seen:
                if delivery not in overdue:
                    continue  # the trigger still has time
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


class Reaped(NamedTuple):
    """What a retry pass did and saw: runs started again, runs going (Pending, Running)."""

    started: int
    active: int


ACTIVE = ("PENDING", "RUNNING", "CANCELLING")


def retry_crashed_runs(watched: list[Watched], newest: Callable[[Watched], str | None]) -> Reaped:
    """Start a crashed push run once more (on whichever worker takes it) when its commit is
    still its branch's newest push (`newest`), at most once per run, never a retry's retry; one
    a newer push replaced is marked superseded (Cancelled, the message saying why). Every
    crashed run's cell runs still going are ended (`cancel_orphan_cells`), a manual run's too.
    One read for every watched deployment, which also counts their runs going."""
    from prefect.states import Cancelled

    items = {item.deployment_id: item for item in watched}
    started = 0
    with queries.client() as api:
        runs = queries.flow_runs(api, list(items), ["CRASHED", *ACTIVE], limit=100)
        crashed = [r for r in runs if r.state_type.value == "CRASHED"]
        for run in crashed:
            item = items.get(run.deployment_id)
            if item is None or RETRIED_TAG in run.tags or CELLS_ENDED_TAG in run.tags:
                continue
            automatic = queries.automatic(run)
            # Marked first: a reaper that dies here loses a retry, never doubles one.
            tag = RETRIED_TAG if automatic else CELLS_ENDED_TAG
            api.update_flow_run(run.id, tags=[*run.tags, tag])
            cancel_orphan_cells(api, run)
            if not automatic:
                continue  # a manual run is its user's to start again
            sha = queries.commit_of(run)
            latest = newest(item)
            why = run.state.message if run.state else ""
            if run.parameters.get("attempt", 1) >= 2:
                continue
            if latest and sha != latest:
                # Not run again: recorded as a queued run a newer push replaced is (its crash
                # stays in the run's state history).
                message = (
                    f"{SUPERSEDED}: it crashed ({why}); the newer push of {latest[:7]} runs instead"
                )
                api.set_flow_run_state(run.id, Cancelled(message=message), force=True)
                logger.info(
                    "Flow run %s of %s crashed; superseded by %s", run.name, sha[:7], latest[:7]
                )
                continue
            api.create_flow_run_from_deployment(
                item.deployment_id,
                parameters={**run.parameters, "attempt": 2},
                tags=[*(t for t in run.tags if t != RETRIED_TAG), "retry"],
            )
            logger.warning(
                "Flow run %s of %s crashed (%s); started it once more", run.name, sha[:7], why
            )
            started += 1
    return Reaped(started, len(runs) - len(crashed))


ORPHANED = "Its version's run crashed; the retry, if any, makes its own cells"


def cancel_orphan_cells(api: Any, run: Any) -> int:
    """Cancel the matrix cell runs a crashed version's run left queued or generating: their
    rows would go into its FAILED MLflow run, and the workers they take are wanted by its
    retry's cells. Cancelled as the version's run cancels a cell it no longer needs
    (`cells.cancel_cell_runs`). Returns how many were cancelled."""
    going = queries.flow_runs(api, states=["SCHEDULED", "PENDING", "RUNNING"], parent=run.id)
    cells.cancel_cell_runs([cell.id for cell in going], ORPHANED, api)
    if going:
        logger.info("Flow run %s crashed; cancelled its %d cell run(s)", run.name, len(going))
    return len(going)


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
    """Keeps at most one queued automatic run per deployment: the newest push's. It reads
    Prefect only while a push event waits for its run, and once more after the last one
    appeared (the runs of older pushes may be queued then): an idle service asks nothing."""

    loop = "janitor"

    def __init__(self, watched: list[Watched], outbox: Outbox, seconds: float = 1.0) -> None:
        super().__init__(watched, outbox, seconds)
        self.wake = threading.Event()
        self.again: list[Watched] = []
        """The links whose last events got their runs in the previous pass."""

    def run(self) -> None:
        """Check after each emitted push and every `seconds`."""
        while not self.stopping.is_set():
            self.step()
            self.wake.wait(self.seconds)
            self.wake.clear()

    def step(self) -> None:
        """One pass: the links with events waiting for their runs, and those done last pass."""
        waiting = [i for i in self.watched if self.outbox.without_run(i.repo, i.branch, 0)]
        for item in waiting:
            missing = partial(start_missing_runs, item, self.outbox)
            self.attempt(f"check {item.repo.url} for missing runs", missing)
        due = [i for i in self.watched if i in waiting or i in self.again]
        self.again = waiting
        if due:
            self.attempt("supersede queued runs", partial(self.supersede, due))

    def supersede(self, items: list[Watched]) -> None:
        """Mark the queued runs older than each deployment's newest push superseded."""
        newest = {i.deployment_id: self.outbox.latest(i.repo, i.branch) for i in items}
        with queries.client() as api:
            queued = queries.flow_runs(api, [i.deployment_id for i in items], ["SCHEDULED"])
            for deployment, runs in by_deployment(queued).items():
                if sha := newest.get(deployment):
                    supersede_queued_runs(api, runs, sha)


class Reaper(RepairLoop):
    """Ends what dead workers left: MLflow runs of crashed flow runs end FAILED with the reason
    (or are published, when they held their number), and crashed push runs run once more.
    Prefect itself marks a run whose worker died Crashed (the heartbeat automation), and a warm
    worker marks a run whose process died Crashed at once and ends its MLflow runs; this
    thread does the rest, from the receiver's machine. While the service is busy (a push sent
    to Prefect, runs going, or a crashed run started again, in the last `BUSY_SECONDS`; or
    Prefect not answering) it reads the retries every `seconds` (one read for every
    deployment) and the dead runs' MLflow records every `dead_seconds`; once idle, every
    `idle_seconds` and `dead_idle_seconds`: an idle service asks Prefect once a minute and
    MLflow almost nothing. A push sent wakes it (`pushed`). (A version's run also ends its
    repository's dead runs as it starts.)"""

    loop = "reaper"
    BUSY_SECONDS = 60.0

    def __init__(
        self,
        watched: list[Watched],
        outbox: Outbox,
        seconds: float = 5.0,
        idle_seconds: float = 60.0,
        dead_seconds: float = 15.0,
        dead_idle_seconds: float = 300.0,
    ) -> None:
        super().__init__(watched, outbox, seconds)
        self.idle_seconds = idle_seconds
        self.dead_seconds = dead_seconds
        self.dead_idle_seconds = dead_idle_seconds
        self.wake = threading.Event()
        self.busy_until = 0.0
        """Until when (monotonic) the service counts as busy: what the last retry pass saw, or
        the last push sent."""
        self.dead_at = float("-inf")
        """When (monotonic) the dead runs were last looked for."""
        self.experiments: dict[str, Experiment] = {}
        """Each repository's experiment, once it has one."""

    def busy(self) -> bool:
        """Whether the service was busy in the last `BUSY_SECONDS`."""
        return time.monotonic() < self.busy_until

    def pushed(self) -> None:
        """A push's event reached Prefect: its run may start, and crash, at any moment."""
        self.busy_until = max(self.busy_until, time.monotonic() + self.BUSY_SECONDS)
        self.wake.set()

    def run(self) -> None:
        """Check every `seconds` while busy, every `idle_seconds` when idle; a push sent
        brings an idle wait's end to at most `seconds` away."""
        due = time.monotonic() + self.seconds
        while not self.stopping.is_set():
            woken = self.wake.wait(max(0.0, due - time.monotonic()))
            self.wake.clear()
            if woken:
                due = min(due, time.monotonic() + self.seconds)
                continue
            if self.stopping.is_set():
                break
            self.check()
            due = time.monotonic() + (self.seconds if self.busy() else self.idle_seconds)

    def check(self) -> None:
        """One pass: the retries, and now and then the dead runs."""
        self.attempt("retry crashed runs", self.retry)
        every = self.dead_seconds if self.busy() else self.dead_idle_seconds
        if time.monotonic() - self.dead_at >= every:
            self.dead_at = time.monotonic()
            for item in self.watched:
                dead = partial(self.end_dead_runs, item)
                self.attempt(f"end the dead runs of {item.repo.url}", dead)

    def retry(self) -> None:
        """Run the crashed push runs once more, when they are still the newest."""
        busy = time.monotonic() + self.BUSY_SECONDS
        try:
            reaped = retry_crashed_runs(
                self.watched, lambda i: self.outbox.latest(i.repo, i.branch)
            )
        except Exception:  # Prefect not answering: what it would say is unknown
            self.busy_until = max(self.busy_until, busy)
            raise
        if reaped.started or reaped.active:
            self.busy_until = max(self.busy_until, busy)

    def end_dead_runs(self, item: Watched) -> None:
        """End the MLflow runs of the repository whose process is gone (none before its first)."""
        experiment = self.experiments.get(item.repo.url)
        if experiment is None:
            try:
                experiment = Experiment.for_repo(item.repo, create=False)
            except NoExperimentError:
                return
            self.experiments[item.repo.url] = experiment
        recovery.recover_dead_runs(experiment)
