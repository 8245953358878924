"""Reading the record back: every MLflow query for a repository's versions and runs, written once.
The flow asks which version a commit already has and what the branch's latest is; the reports
list, compare and chart versions; the service finds the MLflow run of a flow run. A git branch
name may hold quotes, so branches are compared here, never put in a query."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from tasks import tags as T
from tasks.evaluation import CELLS_FILE, OUTPUTS_FILE, Row
from tasks.store import Experiment, mlflow_client, run_url

NEW_VERSIONS = f"tags.`{T.OUTCOME}` = '{T.NEW}'"
FINISHED = "attributes.status = 'FINISHED'"
NEWEST_FIRST = ["attributes.start_time DESC"]


def numbered(experiment: Experiment, finished: bool = True, limit: int = 5000) -> list[Any]:
    """The runs holding numbered versions, newest first (`finished`: those ended FINISHED)."""
    query = f"{NEW_VERSIONS} and {FINISHED}" if finished else NEW_VERSIONS
    return experiment.search(query, NEWEST_FIRST, limit)


def version_number(experiment: Experiment, number: int) -> Any | None:
    """The run holding version `number`, finished or not; None when there is none."""
    found = experiment.search(f"{NEW_VERSIONS} and tags.`{T.VERSION}` = '{int(number)}'", [], 1)
    return found[0] if found else None


def versions_of_commit(experiment: Experiment, prefix: str, limit: int = 11) -> list[Any]:
    """The numbered runs of commits starting with `prefix` (hexadecimal), newest first."""
    if not prefix or any(c not in "0123456789abcdef" for c in prefix):
        raise ValueError(f"not a commit prefix: {prefix!r}")
    query = f"{NEW_VERSIONS} and tags.`{T.COMMIT}` LIKE '{prefix}%'"
    return experiment.search(query, NEWEST_FIRST, limit)


def find_version(
    experiment: Experiment, commit_sha: str, digest: str, model_revision: str | None
) -> Any | None:
    """The run holding an output for this commit, settings and model, if any."""
    query = (
        f"{NEW_VERSIONS} and tags.`{T.COMMIT}` = '{commit_sha}' "
        f"and tags.`{T.DIGEST}` = '{digest}' and {FINISHED}"
    )
    for run in experiment.search(query, max_results=50):
        if model_revision is None or run.data.tags.get(T.MODEL_REVISION) == model_revision:
            return run
    return None


def latest_version(experiment: Experiment, branch: str) -> Any | None:
    """The run of the branch's latest numbered version (the base gates compare with)."""
    highest_first = [f"tags.`{T.VERSION_KEY}` DESC"]
    runs = experiment.search(f"{NEW_VERSIONS} and {FINISHED}", highest_first, 200)
    return next((r for r in runs if r.data.tags.get(T.BRANCH) == branch), None)


def last_handled_commit(
    experiment: Experiment, branch: str, triggers: Collection[str]
) -> str | None:
    """The commit of the latest automatic run on `branch` that was not superseded: changes since
    it are what a new push brings, even when pushes in between were superseded before they ran."""
    top_level = f"{FINISHED} and tags.`{T.PARENT_RUN}` IS NULL"  # not a version's cell runs
    for run in experiment.search(top_level, NEWEST_FIRST, 200):
        found = run.data.tags
        handled = found.get(T.BRANCH) == branch and found.get(T.TRIGGER) in triggers
        superseded = found.get(T.OUTCOME) == T.SKIPPED and found.get(T.SKIP_KIND) == "superseded"
        if handled and T.COMMIT in found and not superseded:
            return str(found[T.COMMIT])
    return None


def of_flow_run(experiment: Experiment, flow_run_id: Any, running: bool = False) -> list[Any]:
    """The MLflow runs a Prefect flow run made (`running`: those still RUNNING)."""
    query = f"tags.`{T.FLOW_RUN_ID}` = '{flow_run_id}'"
    if running:
        query += " and attributes.status = 'RUNNING'"
    return experiment.search(query, max_results=5)


def running(experiment: Experiment) -> list[Any]:
    """The runs not ended yet."""
    return experiment.search("attributes.status = 'RUNNING'", max_results=500)


def history(experiment: Experiment, filters: list[str], limit: int | None) -> list[Any]:
    """The runs the `filters` (MLflow's syntax, joined with `and`) select, newest first: the
    first `limit`, or all of them for None."""
    # A matrix cell's run is part of its version, not a run of its own.
    query = " and ".join([*filters, f"tags.`{T.PARENT_RUN}` IS NULL"])
    return experiment.search(query, NEWEST_FIRST, limit)


def ended_run_of(experiment: Experiment, sha: str, triggers: Collection[str]) -> bool:
    """Whether a run of `sha` started by one of `triggers` has ended, whatever its outcome."""
    found = experiment.search(
        f"tags.`{T.COMMIT}` = '{sha}' and attributes.status != 'RUNNING'", max_results=50
    )
    return any(run.data.tags.get(T.TRIGGER) in triggers for run in found)


def latest_per_repository() -> list[dict[str, Any]]:
    """The latest version of every repository in the store."""
    client = mlflow_client()
    versions = []
    for experiment in client.search_experiments(max_results=1000):
        repo = experiment.tags.get(T.EXPERIMENT_REPO)
        if not repo:
            continue
        for run in numbered(Experiment(client, experiment.experiment_id, repo), limit=1):
            versions.append(
                {
                    "repository": repo,
                    "version": int(run.data.tags.get(T.VERSION, "0") or 0),
                    "commit": run.data.tags.get(T.COMMIT, "")[:7],
                    "url": run_url(experiment.experiment_id, run.info.run_id),
                }
            )
    return versions


def artifact_json(experiment: Experiment, run_id: str, path: str) -> Any:
    """A JSON artifact of a run, read back."""
    import json
    from pathlib import Path

    return json.loads(Path(experiment.client.download_artifacts(run_id, path)).read_text())


def rows_of(experiment: Experiment, run: Any) -> list[Row]:
    """The (cell, prompt) rows of an evaluation set's version, each naming the version that
    generated it; empty for a one-prompt version (it keeps no rows)."""
    if T.CELLS not in run.data.tags:
        return []
    stored = artifact_json(experiment, run.info.run_id, OUTPUTS_FILE)["rows"]
    own = run.data.tags.get(T.VERSION)
    rows = [Row.from_dict(item) for item in stored]
    for row in rows:
        if row.from_version is None and own:
            row.from_version = int(own)
    return rows


REUSE_FROM = 3
"""How many of the latest versions a new version looks through for rows it can reuse."""


def reusable_rows(experiment: Experiment) -> dict[str, Row]:
    """The rows of the repository's latest evaluation-set versions, by key (newest first wins):
    what a new version copies instead of generating."""
    found: dict[str, Row] = {}
    query = f"{NEW_VERSIONS} and {FINISHED} and tags.`{T.CELLS}` IS NOT NULL"
    for run in experiment.search(query, [f"tags.`{T.VERSION_KEY}` DESC"], REUSE_FROM):
        for row in rows_of(experiment, run):
            found.setdefault(row.key, row)
    return found


def texts_of(experiment: Experiment, run_id: str) -> list[str]:
    """The texts a version's run recorded, in order (its `generations.json` table)."""
    table = artifact_json(experiment, run_id, "generations.json")
    column = table["columns"].index("generated_text")
    return [str(row[column]) for row in table["data"]]


def cell_metrics_of(experiment: Experiment, run: Any) -> dict[str, dict[str, float]]:
    """Each cell's metrics of a version, by cell name; a one-prompt version is one cell (`""`)."""
    if T.CELLS not in run.data.tags:
        return {"": dict(run.data.metrics)}
    cells = artifact_json(experiment, run.info.run_id, CELLS_FILE)["cells"]
    return {c["cell"]: dict(c["metrics"]) for c in cells}
