"""The MLflow store: its client, one experiment per repository, links into its UI, and the entities
a run's record is written as. Everything goes through `MlflowClient` with an explicit run id:
Prefect may run tasks in other threads, and MLflow's fluent API keeps its active run per thread."""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

from tasks import config
from tasks import tags as T
from tasks.bounded import shorten
from tasks.errors import NoExperimentError, TrackingError
from tasks.files import file_lock
from tasks.repo import RepoLocation, normalize_repo, repository_identity
from tasks.retry import Backoff, retry

logger = logging.getLogger(__name__)

TAG_CHARS = 5000
PARAM_CHARS = 6000
STORE_WAIT_SECONDS = 120.0


def mlflow_client() -> Any:
    """An MlflowClient on `MLFLOW_TRACKING_URI`, or the embedded SQLite store. A SQLite store is
    created (its tables migrated) by one process at a time, under a file lock beside it: MLflow's
    migrations race when several processes open a fresh store at once. Its first opening waits
    out a lock another writer holds (up to `STORE_WAIT_SECONDS`), as MLflow's own sessions do."""
    from mlflow import MlflowClient

    uri = config.tracking_uri()
    if uri.startswith("sqlite:///"):
        _prepare_sqlite(uri)
    return MlflowClient(tracking_uri=uri)


@functools.cache
def _prepare_sqlite(uri: str) -> None:
    """Open a SQLite store once per process, creating its tables under the store's lock."""
    from mlflow import MlflowClient

    path = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])

    def open_store() -> None:
        with file_lock(path.with_name(path.name + ".init.lock")):
            # Opening the tracking and the registry store runs their migrations, once.
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
            client.search_registered_models(max_results=1)

    retry(
        open_store,
        retry_on=lambda exc: "database is locked" in str(exc),
        backoff=Backoff(first=0.5, cap=5.0),
        seconds=STORE_WAIT_SECONDS,
        on_retry=lambda exc, delay: logger.warning(
            "The MLflow store %s is locked; waiting %.1f s", path, delay
        ),
    )


def ui_base_url() -> str:
    """The MLflow UI that shows this store: `TEXTGEN_MLFLOW_UI_URL` (serve sets it for its runs
    and commands), the tracking server itself, or `textgen ui`'s default address."""
    if explicit := config.MLFLOW_UI_URL.get():
        return explicit.rstrip("/")
    uri = config.tracking_uri()
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return "http://127.0.0.1:5000"


def run_url(experiment_id: str, run_id: str, artifact: str | None = None) -> str:
    """Link to a run in the MLflow UI, or to one of its artifacts (its artifact view, with the
    file open)."""
    # `workflowType` opens MLflow 3's model-training navigation rather than the GenAI one.
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if artifact:
        page += f"/artifactPath/{artifact}"
    return f"{ui_base_url()}/{page}?workflowType=machine_learning"


def experiment_name(repo_url: str) -> str:
    """One experiment per repository, however it is reached (a checkout, a bare clone of it,
    its https URL): named by where the repository comes from, without credentials."""
    return repository_identity(repo_url)


def _find_experiment(client: Any, name: str, location: str = "") -> Any | None:
    """The repository's experiment: tagged with its normalized location (so `.git` or not,
    https or ssh are one), else one from before the tag existed, named `name` or by the
    `location` it was reached at then; that one is tagged and used from now on."""
    from mlflow.entities import ViewType

    key = normalize_repo(name)
    if "'" not in key and "\\" not in key:
        query = f"tags.`{T.REPO_KEY}` = '{key}'"
        oldest_first = ["creation_time ASC"]
        found = client.search_experiments(
            view_type=ViewType.ALL, filter_string=query, order_by=oldest_first, max_results=10
        )
        if found:
            return found[0]
    experiment = client.get_experiment_by_name(name)
    if experiment is None and location and location != name:
        experiment = client.get_experiment_by_name(location)
        if experiment is not None and experiment.tags.get(T.REPO_KEY):
            return None  # another repository's, as it is tagged now
    if experiment is not None and experiment.lifecycle_stage != "deleted":
        client.set_experiment_tag(experiment.experiment_id, T.REPO_KEY, key)
    return experiment


class Experiment:
    """The MLflow experiment of one repository."""

    def __init__(
        self, client: Any, experiment_id: str, repo_url: str, name: str | None = None
    ) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.repo_url = repo_url
        """Where runs were reached from (credential-free); the experiment is the repository's."""
        self.name = name or repo_url
        """The repository's one name, wherever it is reached from (`experiment_name`)."""

    @classmethod
    def for_repo(cls, repo: str | RepoLocation, create: bool = True) -> Any:
        """The repository's experiment, created if asked; a TrackingError if it has none."""
        from mlflow.exceptions import MlflowException

        location = repo if isinstance(repo, RepoLocation) else RepoLocation.parse(repo)
        client = mlflow_client()
        name = experiment_name(location.url)
        try:
            experiment = _find_experiment(client, name, location.url)
            if experiment is None:
                if not create:
                    raise NoExperimentError(
                        f"no MLflow experiment for repository {name} in "
                        f"{config.tracking_uri()}: nothing has run for it yet"
                    )
                experiment_id = _create_experiment(client, name)
            elif experiment.lifecycle_stage == "deleted":
                raise TrackingError(
                    f"the MLflow experiment {name!r} is deleted; restore it "
                    f"(mlflow experiments restore --experiment-id {experiment.experiment_id})"
                )
            else:
                experiment_id = experiment.experiment_id
        except MlflowException as exc:
            store = config.tracking_uri()
            raise TrackingError(f"cannot use the MLflow store {store}: {exc}") from exc
        return cls(client, experiment_id, location.url, name)

    def url(self, run_id: str, artifact: str | None = None) -> str:
        """Link to a run of this experiment (or to one of its artifacts)."""
        return run_url(self.experiment_id, run_id, artifact)

    def finish(
        self, run_id: str, tags: dict[str, str], params: dict[str, str] | None = None
    ) -> None:
        """Log a run's last tags (and params) and end it FINISHED."""
        self.client.log_batch(run_id, params=as_params(params or {}), tags=as_tags(tags))
        self.client.set_terminated(run_id, "FINISHED")

    def search(
        self, query: str = "", order_by: list[str] | None = None, max_results: int | None = 1000
    ) -> list[Any]:
        """The experiment's runs that `query` (MLflow's filter syntax) selects: the first
        `max_results`, or all of them (page by page) for None."""
        runs: list[Any] = []
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id],
                query,
                order_by=order_by,
                max_results=PAGE if max_results is None else max_results,
                page_token=token,
            )
            runs += page
            token = page.token
            if max_results is not None or not token:
                return runs


PAGE = 1000
"""Runs read per query when all of them are asked for."""


def _create_experiment(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    root = config.artifact_root()
    location = f"{root}/{RepoLocation.parse(name).key}" if root else None
    # Opens in the UI's model-training view (runs table), not GenAI's.
    kind = "custom_model_development"
    tags = {T.EXPERIMENT_REPO: name, T.REPO_KEY: normalize_repo(name), T.EXPERIMENT_KIND: kind}
    try:
        return str(client.create_experiment(name, artifact_location=location, tags=tags))
    except MlflowException:
        # Created meanwhile by a concurrent run.
        experiment = _find_experiment(client, name)
        if experiment is None:
            raise
        return str(experiment.experiment_id)


def one_line_reason(exc: BaseException) -> str:
    """`SettingsError: textgen.yaml at ...: random_seed='forty': expected a number`, on one line."""
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text}"


def storable(text: str) -> str:
    """Text a tag or param may hold in any MLflow store: PostgreSQL refuses NUL characters in
    text (a model may generate them, a settings file may hold them), so they become U+FFFD."""
    return text.replace("\x00", "\ufffd")


def as_tags(values: dict[str, str]) -> list[Any]:
    """MLflow tags, each cut to what any store keeps."""
    from mlflow.entities import RunTag

    return [RunTag(k, storable(shorten(v, TAG_CHARS))) for k, v in values.items()]


def as_params(values: dict[str, str]) -> list[Any]:
    """MLflow params, each cut to what any store keeps."""
    from mlflow.entities import Param

    return [Param(k, storable(shorten(v, PARAM_CHARS))) for k, v in values.items()]


def as_metrics(values: dict[str, float]) -> list[Any]:
    """MLflow metrics, logged now at step 0."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, 0) for k, v in values.items()]
