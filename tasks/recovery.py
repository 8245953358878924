"""Runs whose process is gone: found by the worker that ran them, and ended.

A run is tagged at its start with the host, pid and process start time of its worker. On the same
machine, a pid that no longer runs (or now belongs to another process) means the run's process
died; on another machine, the run's Prefect flow run in a final state (Crashed when its worker
died) says so. Neither compares clocks. A dead run that had taken its number is published (its
record was complete before the number was taken); any other ends FAILED. The flow ends the dead
runs of every worker before it starts its own, so this reads one flow run's state from the
Prefect API: the one Prefect query below `deployments/`.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any
from uuid import UUID

from tasks import numbering, versions
from tasks import tags as T
from tasks.store import Experiment

logger = logging.getLogger(__name__)


def _process_start(pid: int) -> str | None:
    """When a process started (clock ticks since boot, from /proc), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields follow its last ')'.
    return stat.rpartition(")")[2].split()[19]


def worker_tags() -> dict[str, str]:
    """Which process on which machine runs this run: lets a later process see it is gone."""
    pid = os.getpid()
    return {
        T.WORKER_HOST: socket.gethostname(),
        T.WORKER_PID: str(pid),
        T.WORKER_PROCESS_START: _process_start(pid) or "",
    }


def owner_tags() -> dict[str, str]:
    """`worker_tags` and the Prefect flow run this process runs, if any: the tags of a run a
    flow run opens besides its own (a matrix cell's, an evaluation's), so that it is ended
    like the flow run's own when its process dies."""
    from prefect.runtime import flow_run

    return {**worker_tags(), **({T.FLOW_RUN_ID: str(flow_run.id)} if flow_run.id else {})}


def process_gone(found: dict[str, str]) -> str | None:
    """Why the process that ran a run (on this machine) is gone; None if alive or elsewhere."""
    host, pid_tag = found.get(T.WORKER_HOST), found.get(T.WORKER_PID, "")
    if host != socket.gethostname() or not pid_tag.isdigit():
        return None
    pid = int(pid_tag)
    started = _process_start(pid)
    if started is None:
        return f"its process {pid} on {host} ended without finishing the run"
    if found.get(T.WORKER_PROCESS_START) and started != found[T.WORKER_PROCESS_START]:
        return f"its process {pid} on {host} ended (the pid now belongs to another)"
    return None


def flow_run_ended(found: dict[str, str]) -> str | None:
    """Why a run is over, by its Prefect flow run (on any machine): the flow run reached a final
    state while the MLflow run was never ended. None while the flow run is not final, or when the
    run has no flow run; the API's own error when it cannot be asked."""
    flow_run_id = found.get(T.FLOW_RUN_ID)
    if not flow_run_id:
        return None
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(UUID(flow_run_id))
    except ObjectNotFound:
        return f"its Prefect flow run {flow_run_id} no longer exists"
    state = flow_run.state
    if state is None or not state.is_final():
        return None
    message = f": {state.message}" if state.message else ""
    return f"its Prefect flow run {flow_run.name} ended {state.name}{message}"


def recover(experiment: Experiment, run: Any, reason: str) -> str:
    """End a run whose process is gone: roll it forward to its version when it holds one, else
    mark it FAILED with `reason`. Returns `published` or `failed`."""
    run_id = run.info.run_id
    if (held := numbering.allocated(experiment, run_id)) is not None:
        recovered = {T.RECOVERED: f"published after its process ended: {reason}"}
        sha = run.data.tags.get(T.COMMIT, "")
        numbering.publish(experiment, run_id, int(held.version), sha, recovered)
        logger.warning("Run %s held version %s when %s; published it", run_id, held.version, reason)
        return "published"
    numbering.end_failed(experiment, run_id, reason, reason + "\n")
    logger.warning("Run %s was left RUNNING: %s; marked it FAILED", run_id, reason)
    return "failed"


def end_runs_of_flow_run(repo: str, flow_run_id: Any, reason: str) -> int:
    """End the runs a Prefect flow run's process left RUNNING in the repository's experiment,
    its worker having seen the process die (`recover` each). Returns how many."""
    from tasks.errors import NoExperimentError

    try:
        experiment = Experiment.for_repo(repo, create=False)
    except NoExperimentError:
        return 0
    found = versions.of_flow_run(experiment, flow_run_id, running=True)
    for run in found:
        recover(experiment, run, reason)
    return len(found)


def recover_dead_runs(experiment: Experiment) -> int:
    """End every RUNNING run of the experiment whose process is gone, and publish numbers taken
    by runs that ended before publishing them. Returns how many runs were ended or published.

    When the Prefect API cannot say whether another machine's run is over, the others are still
    checked, and its error is raised at the end: the caller's loop says it and looks again."""
    ended = 0
    unanswered: Exception | None = None
    for run in versions.running(experiment):
        reason = process_gone(run.data.tags)
        if reason is None and run.data.tags.get(T.WORKER_HOST) != socket.gethostname():
            try:
                reason = flow_run_ended(run.data.tags)
            except Exception as exc:  # an API away now: the other runs are checked all the same
                unanswered = unanswered or exc
                continue
        if reason is not None:
            recover(experiment, run, reason)
            ended += 1
    # A number taken and never published (the tags were lost with the process).
    from mlflow.exceptions import MlflowException

    for mv in numbering.unpublished(experiment):
        try:
            run = experiment.client.get_run(mv.run_id)
        except MlflowException:
            continue
        if run.info.status != "RUNNING" and run.data.tags.get(T.VERSION) != str(mv.version):
            recover(experiment, run, "its process ended after the version number was allocated")
            ended += 1
        elif run.info.status == "FINISHED":
            numbering.mark_published(experiment, mv.version)
    if unanswered is not None:
        raise unanswered
    return ended
