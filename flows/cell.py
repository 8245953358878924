"""One matrix cell of a version, generated on a free worker of the team's pool for the version's
own flow run (`tasks.cells`): the commit, the plan read again at it, the cell's model, its
prompts; the rows written into the version's MLflow run, which records the version."""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, get_run_logger
from prefect.utilities.timeout import timeout as deadline

from tasks import config, logs
from tasks.cells import CELL_FLOW_NAME, CELL_RUNS, Done, check_revision, error_doc, find_work
from tasks.cells import generate as generate_here
from tasks.errors import RunTimeoutError
from tasks.evaluation import model_revision
from tasks.inputs import fetch_repo_commit, read_settings
from tasks.links import run_link_settings
from tasks.model import local_revision, locate_model
from tasks.tracking import Tracker


class _Deadline(TimeoutError):
    """Raised inside the cell run when its deadline passes."""


@flow(name=CELL_FLOW_NAME, log_prints=False)
def nlp_text_generation_cell(
    repo_url: str,
    branch: str,
    commit_sha: str,
    cell: str,
    prompt_ids: list[str],
    revision: str,
    into_run: str,
    overrides: dict[str, Any] | None = None,
    pull_ref: str | None = None,
) -> str:
    """Generate `prompt_ids` in the cell named `cell` at `commit_sha` and leave the rows in the
    version's MLflow run `into_run`; `revision` is the model revision the version's run keyed
    the rows with. Returns where the rows are."""
    from prefect.runtime import flow_run

    logs.quiet_console()
    logger = get_run_logger()
    tracker = Tracker.for_repo(repo_url, create=False)
    if (status := tracker.client.get_run(into_run).info.status) != "RUNNING":
        # Its version's run died or ended while this run waited for a worker: nobody waits.
        logger.info("The version's run %s is %s: cell %s is not needed", into_run, status, cell)
        return ""
    path = f"{CELL_RUNS}/{flow_run.id}.json"
    seconds = float(config.RUN_TIMEOUT.get())
    try:
        with (
            config.overrides(run_link_settings(repo_url, branch, required=True)),
            deadline(seconds, timeout_exc_type=_Deadline),
        ):
            commit = fetch_repo_commit(repo_url, branch, commit_sha, pull_ref=pull_ref)
            work = find_work(read_settings(commit, overrides), cell, prompt_ids, revision)
            model = locate_model(work.cell.settings, commit)
            local = local_revision(work.cell.settings, model)
            check_revision(work, model_revision(work.cell.settings, local))
            done = generate_here(work, model, local)
    except _Deadline:
        error = RunTimeoutError(
            f"cell {cell}: not generated within the run's deadline of {seconds:g} s "
            f"({config.RUN_TIMEOUT.name}); it was stopped"
        )
        _leave(tracker, into_run, error_doc(error), path)
        raise error from None
    except Exception as exc:
        _leave(tracker, into_run, error_doc(exc), path)
        raise
    done = Done(done.rows, done.loaded, str(flow_run.id), os.getpid())
    tracker.client.log_dict(into_run, done.as_dict(), path)
    return path


def _leave(tracker: Tracker, run_id: str, doc: dict[str, Any], path: str) -> None:
    """Leave a failure for the version's run; the failure itself is what the run raises."""
    try:
        tracker.client.log_dict(run_id, doc, path)
    except Exception as exc:  # the version's run then says the cell's run failed
        get_run_logger().warning("Could not leave the cell's failure in %s: %s", run_id, exc)
