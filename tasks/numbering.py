"""Version numbers, and how a run ends: numbered once, published, or FAILED with its reason.

A number is a model version of the experiment's registered model: the tracking database
allocates max+1 under its primary key (name, version), so two runs can never hold the same
number, whatever the clocks say, and numbers have no gaps. A number is taken only once the
run's record is complete; a run that dies after taking one is rolled forward (`publish`),
never left holding a number nobody can find.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from tasks import tags as T
from tasks.errors import TrackingError
from tasks.retry import Backoff, retry
from tasks.store import Experiment, as_tags

logger = logging.getLogger(__name__)


def registry_name(experiment: Experiment) -> str:
    """The registered model whose version numbers are this experiment's output versions."""
    return f"textgen-outputs-{experiment.experiment_id}"


def _ensure_registry(experiment: Experiment) -> None:
    from mlflow.exceptions import MlflowException

    tags = {T.EXPERIMENT_REPO: experiment.repo_url, T.REGISTRY_EXPERIMENT: experiment.experiment_id}
    description = (
        f"Output versions of {experiment.repo_url}: each version number is allocated here, once, "
        "and names the MLflow run that holds the output."
    )
    try:
        experiment.client.create_registered_model(
            registry_name(experiment), tags=tags, description=description
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def allocated(experiment: Experiment, run_id: str) -> Any | None:
    """The model version allocated to a run, if any."""
    found = experiment.client.search_model_versions(
        f"name = '{registry_name(experiment)}' and run_id = '{run_id}'", max_results=5
    )
    return min(found, key=lambda mv: int(mv.version)) if found else None


def unpublished(experiment: Experiment) -> list[Any]:
    """Numbers taken and not yet marked published."""
    query = f"name = '{registry_name(experiment)}' and tags.`{T.NUMBER_STATE}` = 'allocated'"
    return list(experiment.client.search_model_versions(query, max_results=200))


def allocate(experiment: Experiment, run_id: str) -> int:
    """Give the run the next output version in one atomic step, once its record is complete."""
    from mlflow.exceptions import MlflowException

    source = experiment.client.get_run(run_id).info.artifact_uri

    tried = False

    def take() -> int:
        nonlocal tried
        # The try before may have taken a number whose answer was lost (the server died or
        # stalled mid-request): the run keeps that one; a second would leave a gap.
        if tried and (existing := allocated(experiment, run_id)) is not None:
            return int(existing.version)
        tried = True
        try:
            _ensure_registry(experiment)
            mv = experiment.client.create_model_version(
                registry_name(experiment),
                source=source,
                run_id=run_id,
                tags={T.NUMBER_STATE: "allocated"},
                description=f"output of MLflow run {run_id}",
            )
            return int(mv.version)
        except MlflowException:
            # An answer lost on the way back may still have allocated a number: reuse it.
            with contextlib.suppress(MlflowException):
                if (existing := allocated(experiment, run_id)) is not None:
                    return int(existing.version)
            raise

    backoff = Backoff(first=0.05, cap=1.0)
    try:
        return retry(take, lambda exc: isinstance(exc, MlflowException), backoff, attempts=40)
    except MlflowException as exc:
        raise TrackingError(
            f"could not allocate a version number in experiment {experiment.experiment_id}: {exc}"
        ) from exc


def publish(
    experiment: Experiment, run_id: str, version: int, commit_sha: str, extra: dict[str, str]
) -> None:
    """Tag the run with its version and end it FINISHED; then mark the number published."""
    numbered = {
        T.VERSION: str(version),
        T.VERSION_KEY: f"{version:010d}",
        T.OUTCOME: T.NEW,
        T.RUN_NAME: f"v{version} {commit_sha[:7]}",
        **extra,
    }
    experiment.finish(run_id, numbered)
    mark_published(experiment, version)


def mark_published(experiment: Experiment, version: int | str) -> None:
    """The number's run holds it for good."""
    experiment.client.set_model_version_tag(
        registry_name(experiment), str(version), T.NUMBER_STATE, "published"
    )


def failed_name(experiment: Experiment, run_id: str) -> str:
    """`1a2b3c4 (failed)`, or the requested ref when the commit was never resolved."""
    try:
        found = experiment.client.get_run(run_id).data.tags
    except Exception:  # the store may be what failed: the run is named for what it is
        return "failed"
    ref = found.get(T.COMMIT, "")[:7] or found.get(T.REQUESTED_REF, "")[:12]
    return f"{ref} (failed)".strip()


def end_failed(experiment: Experiment, run_id: str, reason: str, error_text: str) -> None:
    """Tag the run failed with its one-line `reason`, keep `error_text` as `error.txt`, and end
    it FAILED. The run ends FAILED even when the tags or the text cannot be written."""
    try:
        failed = {
            T.OUTCOME: T.FAILED,
            T.FAILURE: reason,
            T.RUN_NAME: failed_name(experiment, run_id),
        }
        experiment.client.log_batch(run_id, tags=as_tags(failed))
        try:
            experiment.client.log_text(run_id, error_text, "error.txt")
        except Exception as exc:  # the reason is in the tags already; the text is a copy of it
            logger.warning("Could not keep error.txt of MLflow run %s: %s", run_id, exc)
    finally:
        experiment.client.set_terminated(run_id, "FAILED")
