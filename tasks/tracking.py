"""The MLflow record of a run: one MLflow run per flow run, numbered output versions.

Everything goes through `MlflowClient` with an explicit run id: Prefect may run tasks in other
threads, and MLflow's fluent API keeps its active run per thread.

An MLflow run ends in one of four outcomes (tag `textgen.outcome`):
- `new`: generated a new output version, numbered `textgen.version` 1, 2, 3 ... per experiment;
- `reused`: the same commit, settings and model already have a version; it names that one;
- `skipped`: nothing to generate (for example every changed file is ignored by the workflow spec);
- `failed`: the run failed; `textgen.failure` says why. The MLflow status is then FAILED.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.config import artifact_root, file_lock, running_service, tracking_uri
from tasks.errors import TrackingError
from tasks.generate import Generations, format_output
from tasks.model import Generator
from tasks.repo import CommitInfo, RepoLocation, normalize_repo, repository_identity
from tasks.settings import GenerationSettings

logger = logging.getLogger(__name__)

TAG_VERSION = "textgen.version"
TAG_VERSION_KEY = "textgen.version_key"
TAG_OUTCOME = "textgen.outcome"
TAG_DIGEST = "textgen.settings_digest"
TAG_MODEL_REVISION = "textgen.model_revision"
TAG_TRIGGER = "textgen.trigger"
TAG_COMMIT = "mlflow.source.git.commit"
TAG_STATE = "textgen.state"
TAG_PREVIEW = "textgen.preview.pr"
"""The pull request a preview run previews (its number)."""
TAG_HOST = "textgen.worker.host"
TAG_PID = "textgen.worker.pid"
TAG_PROCESS_START = "textgen.worker.process_start"
_MAX_TAG = 5000


@dataclass(frozen=True)
class RunRecord:
    """Where a flow run's output went."""

    outcome: str
    run_id: str
    experiment_id: str
    version: int | None
    commit_sha: str | None
    settings_digest: str | None
    url: str
    reason: str = ""
    output_url: str = ""
    """The run holding `output.txt`: this run for a new version, the version's run for a reuse."""

    def as_dict(self) -> dict[str, Any]:
        """The record for machines (`textgen run --json`)."""
        return {
            "outcome": self.outcome,
            "version": self.version,
            "commit": self.commit_sha,
            "settings_digest": self.settings_digest,
            "mlflow_run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "url": self.url,
            "output_url": self.output_url or self.url,
            "reason": self.reason,
        }

    def summary(self) -> str:
        """One line for people: what happened and where to look."""
        sha = (self.commit_sha or "")[:7]
        if self.outcome == "new":
            return f"version {self.version} (commit {sha}), MLflow run {self.run_id}: {self.url}"
        if self.outcome == "reused":
            return (
                f"commit {sha} with these settings is already version {self.version}; "
                f"reused it (MLflow run {self.run_id}): {self.url}"
            )
        if self.outcome == "preview":
            return (
                f"preview of commit {sha} (never a numbered version), "
                f"MLflow run {self.run_id}: {self.url}"
            )
        return f"{self.outcome}: {self.reason} (MLflow run {self.run_id}): {self.url}"


_READY_STORES: set[str] = set()
STORE_WAIT_SECONDS = 120.0


def mlflow_client() -> Any:
    """An MlflowClient on `MLFLOW_TRACKING_URI`, or the embedded SQLite store.

    A SQLite store is created (its tables migrated) by one process at a time, under a file lock
    beside it: MLflow's migrations race when several processes open a fresh store at once. Its
    first opening waits out a lock another writer holds (up to `STORE_WAIT_SECONDS`), as MLflow's
    own sessions do, instead of failing after SQLite's five seconds.
    """
    from mlflow import MlflowClient

    uri = tracking_uri()
    if uri in _READY_STORES or not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    path = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    deadline = time.monotonic() + STORE_WAIT_SECONDS
    delay = 0.5
    while True:
        try:
            with file_lock(path.with_name(path.name + ".init.lock")):
                # Opening the tracking and the registry store runs their migrations, once.
                client = MlflowClient(tracking_uri=uri)
                client.search_experiments(max_results=1)
                client.search_registered_models(max_results=1)
            break
        except Exception as exc:
            if "database is locked" not in str(exc) or time.monotonic() > deadline:
                raise
            logger.warning("The MLflow store %s is locked; waiting %.1f s", path, delay)
            time.sleep(delay)
            delay = min(5.0, delay * 2)
    _READY_STORES.add(uri)
    return client


def ui_base_url() -> str:
    """The MLflow UI that shows this store: the tracking server itself, or `textgen ui`."""
    explicit = os.environ.get("TEXTGEN_MLFLOW_UI_URL")
    if explicit:
        return explicit.rstrip("/")
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return _served_ui() or "http://127.0.0.1:5000"


def _served_ui() -> str | None:
    """The MLflow UI a running `textgen serve` of this data folder serves (`serve.json`)."""
    info = running_service() or {}
    return str(info.get("mlflow_ui") or "").rstrip("/") or None


def run_url(experiment_id: str, run_id: str) -> str:
    """Link to a run in the MLflow UI."""
    # `workflowType` opens MLflow 3's model-training navigation rather than the GenAI one.
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    return f"{ui_base_url()}/{page}?workflowType=machine_learning"


TAG_REPO_KEY = "textgen.repo_key"


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
        found = client.search_experiments(
            view_type=ViewType.ALL,
            filter_string=f"tags.`{TAG_REPO_KEY}` = '{key}'",
            order_by=["creation_time ASC"],
            max_results=10,
        )
        if found:
            return found[0]
    experiment = client.get_experiment_by_name(name)
    if experiment is None and location and location != name:
        experiment = client.get_experiment_by_name(location)
        if experiment is not None and experiment.tags.get(TAG_REPO_KEY):
            return None  # another repository's, as it is tagged now
    if experiment is not None and experiment.lifecycle_stage != "deleted":
        client.set_experiment_tag(experiment.experiment_id, TAG_REPO_KEY, key)
    return experiment


def _truncate(text: str, limit: int = _MAX_TAG) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _prefect_links() -> dict[str, str]:
    """The Prefect flow run's id and UI link, when running inside one."""
    tags: dict[str, str] = {}
    with contextlib.suppress(Exception):
        from prefect.runtime import flow_run
        from prefect.utilities.urls import url_for

        if flow_run.id:
            tags["textgen.prefect.flow_run_id"] = str(flow_run.id)
            tags["textgen.prefect.flow_run_name"] = str(flow_run.name)
            # The UI's own route, as the engine's "View at" log line uses.
            url = url_for("flow-run", obj_id=flow_run.id)
            if url:
                tags["textgen.prefect.flow_run_url"] = str(url)
    return tags


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
        TAG_HOST: socket.gethostname(),
        TAG_PID: str(pid),
        TAG_PROCESS_START: _process_start(pid) or "",
    }


def process_gone(tags: dict[str, str]) -> str | None:
    """Why the process that ran a run (on this machine) is gone; None if alive or elsewhere."""
    if tags.get(TAG_HOST) != socket.gethostname() or not tags.get(TAG_PID, "").isdigit():
        return None
    pid = int(tags[TAG_PID])
    started = _process_start(pid)
    if started is None:
        return f"its process {pid} on {tags[TAG_HOST]} ended without finishing the run"
    if tags.get(TAG_PROCESS_START) and started != tags[TAG_PROCESS_START]:
        return f"its process {pid} on {tags[TAG_HOST]} ended (the pid now belongs to another)"
    return None


def flow_run_ended(tags: dict[str, str]) -> str | None:
    """Why a run is over, by its Prefect flow run (on any machine): the flow run reached a final
    state (Crashed when its worker died, for example) while the MLflow run was never ended.

    None while the flow run is not final, when the run has no flow run, or when the Prefect API
    cannot be asked. Never compares clocks: the state is the server's.
    """
    flow_run_id = tags.get("textgen.prefect.flow_run_id")
    if not flow_run_id:
        return None
    try:
        from uuid import UUID

        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        with get_client(sync_client=True) as client:
            try:
                flow_run = client.read_flow_run(UUID(flow_run_id))
            except ObjectNotFound:
                return f"its Prefect flow run {flow_run_id} no longer exists"
    except Exception as exc:
        logger.debug("cannot read flow run %s: %s", flow_run_id, exc)
        return None
    state = flow_run.state
    if state is None or not state.is_final():
        return None
    message = f": {state.message}" if state.message else ""
    return f"its Prefect flow run {flow_run.name} ended {state.name}{message}"


class Tracker:
    """The MLflow experiment of one repository, and the runs made in it."""

    def __init__(self, client: Any, experiment_id: str, repo_url: str) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.repo_url = repo_url

    @classmethod
    def for_repo(cls, repo_url: str, create: bool = True) -> Tracker:
        """The tracker for a repository's experiment, creating the experiment if asked."""
        from mlflow.exceptions import MlflowException

        client = mlflow_client()
        name = experiment_name(repo_url)
        try:
            experiment = _find_experiment(client, name, RepoLocation.parse(repo_url).url)
            if experiment is None:
                if not create:
                    raise TrackingError(
                        f"no MLflow experiment for repository {name} in {tracking_uri()}: "
                        f"nothing has run for it yet"
                    )
                root = artifact_root()
                try:
                    experiment_id = client.create_experiment(
                        name,
                        artifact_location=f"{root}/{RepoLocation.parse(name).key}"
                        if root
                        else None,
                        # Opens in the UI's model-training view (runs table), not GenAI's.
                        tags={
                            "textgen.repo_url": name,
                            TAG_REPO_KEY: normalize_repo(name),
                            "mlflow.experimentKind": "custom_model_development",
                        },
                    )
                except MlflowException:
                    # Created meanwhile by a concurrent run.
                    experiment = _find_experiment(client, name)
                    if experiment is None:
                        raise
                    experiment_id = experiment.experiment_id
            else:
                if experiment.lifecycle_stage == "deleted":
                    raise TrackingError(
                        f"the MLflow experiment {name!r} is deleted; restore it "
                        f"(mlflow experiments restore --experiment-id {experiment.experiment_id})"
                    )
                experiment_id = experiment.experiment_id
        except MlflowException as exc:
            raise TrackingError(f"cannot use the MLflow store {tracking_uri()}: {exc}") from exc
        # Runs record the location they ran from; the experiment is the repository's.
        return cls(client, experiment_id, RepoLocation.parse(repo_url).url)

    def url(self, run_id: str) -> str:
        """Link to a run of this experiment."""
        return run_url(self.experiment_id, run_id)

    def start(self, branch: str, ref: str | None, trigger: str, attempt: int = 1) -> str:
        """Open the MLflow run of a flow run, before anything can fail; return its id."""
        tags = {
            "textgen.attempt": str(attempt),
            "mlflow.source.type": "PROJECT",
            "mlflow.source.name": self.repo_url,
            "mlflow.source.git.repoURL": self.repo_url,
            "mlflow.source.git.branch": branch,
            TAG_TRIGGER: trigger,
            TAG_OUTCOME: "running",
            "textgen.requested_ref": ref or branch,
            **worker_tags(),
            **_prefect_links(),
        }
        run = self.client.create_run(
            self.experiment_id, tags=tags, run_name=f"{trigger} {ref or branch}"
        )
        return str(run.info.run_id)

    def tag_commit(self, run_id: str, commit: CommitInfo) -> None:
        """Record the resolved commit as soon as it is known."""
        tags = {
            TAG_COMMIT: commit.sha,
            "mlflow.runName": f"{commit.short_sha} (running)",
            "textgen.commit.message": _truncate(commit.message),
            "textgen.commit.author": commit.author,
            "textgen.commit.time": commit.authored_at,
            "textgen.commit.on_branch": str(commit.on_branch).lower(),
            "textgen.commit.changed_paths": _truncate(json.dumps(list(commit.changed_paths))),
        }
        self.client.log_batch(run_id, tags=_tags(tags))

    def tag_preview(self, run_id: str, pr: int, head_branch: str, fork: bool) -> None:
        """Mark a run as the preview of pull request `pr`, before it can fail."""
        tags = {
            TAG_PREVIEW: str(pr),
            "textgen.preview.head_branch": head_branch,
            "textgen.preview.fork": str(fork).lower(),
        }
        self.client.log_batch(run_id, tags=_tags(tags))

    def find_version(self, commit_sha: str, digest: str, model_revision: str | None) -> Any | None:
        """The run holding an output for this commit, settings and model, if any."""
        query = (
            f"tags.`{TAG_OUTCOME}` = 'new' and tags.`{TAG_COMMIT}` = '{commit_sha}' "
            f"and tags.`{TAG_DIGEST}` = '{digest}' and attributes.status = 'FINISHED'"
        )
        for run in self.client.search_runs([self.experiment_id], query, max_results=50):
            if model_revision is None or run.data.tags.get(TAG_MODEL_REVISION) == model_revision:
                return run
        return None

    def finish_reused(self, run_id: str, existing: Any, settings: GenerationSettings) -> RunRecord:
        """End a run whose output already exists, pointing at that version."""
        version = int(existing.data.tags[TAG_VERSION])
        sha = existing.data.tags[TAG_COMMIT]
        self.client.log_batch(
            run_id,
            params=_params(settings.as_params()),
            tags=_tags(
                {
                    TAG_OUTCOME: "reused",
                    TAG_DIGEST: settings.digest(),
                    "textgen.reused_version": str(version),
                    "textgen.reused_run_id": existing.info.run_id,
                    "mlflow.runName": f"{sha[:7]} reuses v{version}",
                    **{
                        k: v for k, v in existing.data.tags.items() if k.startswith("textgen.gates")
                    },
                }
            ),
        )
        self.client.set_terminated(run_id, "FINISHED")
        return RunRecord(
            "reused",
            run_id,
            self.experiment_id,
            version,
            sha,
            settings.digest(),
            self.url(run_id),
            output_url=self.url(existing.info.run_id),
        )

    def finish_skipped(
        self, run_id: str, reason: str, commit_sha: str | None = None, kind: str = "filtered"
    ) -> RunRecord:
        """End a run that had nothing to generate, saying why (`kind`: filtered or superseded)."""
        self.client.log_batch(
            run_id,
            tags=_tags(
                {
                    TAG_OUTCOME: "skipped",
                    "textgen.skip_kind": kind,
                    "textgen.skip_reason": _truncate(reason),
                    "mlflow.runName": f"{(commit_sha or '')[:7]} {kind}".strip(),
                }
            ),
        )
        self.client.set_terminated(run_id, "FINISHED")
        return RunRecord(
            "skipped", run_id, self.experiment_id, None, commit_sha, None, self.url(run_id), reason
        )

    def last_handled_commit(self, branch: str, triggers: frozenset[str]) -> str | None:
        """The commit of the latest automatic run on `branch` that was not superseded.

        Changes since that commit are what a new push brings, even when pushes in between were
        superseded before they ran.
        """
        # The branch is compared here, not in the query: a git branch name may hold quotes.
        runs = self.client.search_runs(
            [self.experiment_id],
            "attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=200,
        )
        for run in runs:
            tags = run.data.tags
            if tags.get("mlflow.source.git.branch") != branch:
                continue
            if tags.get(TAG_TRIGGER) not in triggers or TAG_COMMIT not in tags:
                continue
            if tags.get(TAG_OUTCOME) == "skipped" and tags.get("textgen.skip_kind") == "superseded":
                continue
            return str(tags[TAG_COMMIT])
        return None

    def _finish_preview(
        self, run_id: str, commit: CommitInfo, digest: str, output_digest: str, pr: int
    ) -> RunRecord:
        """End a pull request's preview run FINISHED: recorded, tagged, never numbered."""
        self.client.log_batch(run_id, tags=_tags(_preview_tags(pr, commit, output_digest)))
        self.client.set_terminated(run_id, "FINISHED")
        return RunRecord(
            "preview",
            run_id,
            self.experiment_id,
            None,
            commit.sha,
            digest,
            self.url(run_id),
            output_url=self.url(run_id),
        )

    def latest_version(self, branch: str) -> Any | None:
        """The run of the branch's latest numbered version (the base gates compare with)."""
        runs = self.client.search_runs(
            [self.experiment_id],
            f"tags.`{TAG_OUTCOME}` = 'new' and attributes.status = 'FINISHED'",
            order_by=[f"tags.`{TAG_VERSION_KEY}` DESC"],
            max_results=200,
        )
        # The branch is compared here, not in the query: a git branch name may hold quotes.
        for run in runs:
            if run.data.tags.get("mlflow.source.git.branch") == branch:
                return run
        return None

    def _failed_name(self, run_id: str) -> str:
        """`1a2b3c4 (failed)`, or the requested ref when the commit was never resolved."""
        try:
            tags = self.client.get_run(run_id).data.tags
        except Exception:
            return "failed"
        ref = tags.get(TAG_COMMIT, "")[:7] or tags.get("textgen.requested_ref", "")[:12]
        return f"{ref} (failed)".strip()

    def fail(self, run_id: str, exc: BaseException) -> None:
        """Mark a run FAILED with its reason; never raises (the original error matters more).

        `textgen.failure` and the first line of `error.txt` hold the one-line reason; the
        traceback follows it in `error.txt`."""
        reason = one_line_reason(exc)
        try:
            self.client.log_batch(
                run_id,
                tags=_tags(
                    {
                        TAG_OUTCOME: "failed",
                        "textgen.failure": _truncate(reason),
                        "mlflow.runName": self._failed_name(run_id),
                    }
                ),
            )
            detail = "".join(traceback.format_exception(exc))
            self.client.log_text(run_id, f"{reason}\n\n{detail}", "error.txt")
        except Exception:  # the store itself may be what failed
            logger.exception("could not record the failure of MLflow run %s", run_id)
        finally:
            with contextlib.suppress(Exception):
                self.client.set_terminated(run_id, "FAILED")

    @property
    def registry_name(self) -> str:
        """The registered model whose version numbers are this experiment's output versions."""
        return f"textgen-outputs-{self.experiment_id}"

    def _ensure_registry(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                self.registry_name,
                tags={
                    "textgen.repo_url": self.repo_url,
                    "textgen.experiment_id": self.experiment_id,
                },
                description=(
                    f"Output versions of {self.repo_url}: each version number is allocated here, "
                    f"once, and names the MLflow run that holds the output."
                ),
            )
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    def _allocated(self, run_id: str) -> Any | None:
        """The model version allocated to a run, if any."""
        found = self.client.search_model_versions(
            f"name = '{self.registry_name}' and run_id = '{run_id}'", max_results=5
        )
        return min(found, key=lambda mv: int(mv.version)) if found else None

    def allocate_version(self, run_id: str) -> int:
        """Give the run the next output version of the experiment, in one atomic step.

        The number is a model version of the experiment's registered model: the tracking
        database allocates max+1 under its primary key (name, version), so two runs can never
        hold the same number, whatever the clocks say, and numbers have no gaps. Call this
        only once the run's record is complete: a run that dies after it is rolled forward
        by `recover`, never left holding a number nobody can find.
        """
        from mlflow.exceptions import MlflowException

        source = self.client.get_run(run_id).info.artifact_uri
        delay = 0.05
        last: Exception | None = None
        for _ in range(40):
            try:
                self._ensure_registry()
                mv = self.client.create_model_version(
                    self.registry_name,
                    source=source,
                    run_id=run_id,
                    tags={TAG_STATE: "allocated"},
                    description=f"output of MLflow run {run_id}",
                )
                return int(mv.version)
            except MlflowException as exc:
                last = exc
                # An answer lost on the way back may still have allocated a number: reuse it.
                with contextlib.suppress(MlflowException):
                    existing = self._allocated(run_id)
                    if existing is not None:
                        return int(existing.version)
                time.sleep(delay)
                delay = min(1.0, delay * 2)
        raise TrackingError(
            f"could not allocate a version number in experiment {self.experiment_id}: {last}"
        )

    def publish(self, run_id: str, version: int, commit_sha: str, extra: dict[str, str]) -> None:
        """Tag the run with its version and end it FINISHED; then mark the number published."""
        self.client.log_batch(
            run_id,
            tags=_tags(
                {
                    TAG_VERSION: str(version),
                    TAG_VERSION_KEY: f"{version:010d}",
                    TAG_OUTCOME: "new",
                    "mlflow.runName": f"v{version} {commit_sha[:7]}",
                    **extra,
                }
            ),
        )
        self.client.set_terminated(run_id, "FINISHED")
        self.client.set_model_version_tag(self.registry_name, str(version), TAG_STATE, "published")

    def recover(self, run: Any, reason: str) -> str:
        """End a run whose process is gone: roll it forward to its version when it holds one
        (its record was complete before the number was taken), else mark it FAILED with
        `reason`. Returns `published` or `failed`."""
        run_id = run.info.run_id
        allocated = self._allocated(run_id)
        if allocated is not None:
            commit_sha = run.data.tags.get(TAG_COMMIT, "")
            self.publish(
                run_id,
                int(allocated.version),
                commit_sha,
                {"textgen.recovered": _truncate(f"published after its process ended: {reason}")},
            )
            logger.warning(
                "Run %s held version %s when %s; published it", run_id, allocated.version, reason
            )
            return "published"
        self.client.log_batch(
            run_id,
            tags=_tags(
                {
                    TAG_OUTCOME: "failed",
                    "textgen.failure": _truncate(reason),
                    "mlflow.runName": self._failed_name(run_id),
                }
            ),
        )
        with contextlib.suppress(Exception):
            self.client.log_text(run_id, reason + "\n", "error.txt")
        self.client.set_terminated(run_id, "FAILED")
        logger.warning("Run %s was left RUNNING: %s; marked it FAILED", run_id, reason)
        return "failed"

    def recover_dead_runs(self) -> int:
        """End every RUNNING run of the experiment whose process is gone: on this machine by its
        pid and process start time (tagged at start), on others by its Prefect flow run's final
        state; and publish numbers taken by runs that ended before publishing them. Returns how
        many runs were ended or published."""
        runs = self.client.search_runs(
            [self.experiment_id], "attributes.status = 'RUNNING'", max_results=500
        )
        ended = 0
        for run in runs:
            reason = process_gone(run.data.tags)
            if reason is None and run.data.tags.get(TAG_HOST) != socket.gethostname():
                reason = flow_run_ended(run.data.tags)
            if reason is None:
                continue
            self.recover(run, reason)
            ended += 1
        # A number taken and never published (the tags were lost with the process).
        for mv in self.client.search_model_versions(
            f"name = '{self.registry_name}' and tags.`{TAG_STATE}` = 'allocated'", max_results=200
        ):
            try:
                run = self.client.get_run(mv.run_id)
            except Exception:
                continue
            if run.info.status != "RUNNING" and run.data.tags.get(TAG_VERSION) != str(mv.version):
                self.recover(run, "its process ended after the version number was allocated")
                ended += 1
            elif run.info.status == "FINISHED":
                self.client.set_model_version_tag(
                    self.registry_name, str(mv.version), TAG_STATE, "published"
                )
        return ended

    def record_generation(
        self,
        run_id: str,
        commit: CommitInfo,
        settings: GenerationSettings,
        settings_source: str,
        generator: Generator,
        generations: Generations,
        quality: dict[str, float] | None = None,
        extra_tags: dict[str, str] | None = None,
        preview: int | None = None,
    ) -> RunRecord:
        """Log the whole record of a new output and end the run FINISHED: as the next numbered
        version, or, for `preview` (a pull request's number), as that pull request's preview,
        which takes no number. `extra_tags` (the gates' outcome) are logged with the record."""
        import pandas as pd
        import torch
        import transformers
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.pandas_dataset import from_pandas
        from mlflow.entities import DatasetInput, InputTag

        digest = settings.digest()
        params = {
            **settings.as_params(),
            **generator.describe(),
            **{
                f"generation.{k}": str(v)
                for k, v in generations.generation_config.items()
                if v is not None  # settings.json holds the whole config
            },
            "settings.source": settings_source,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
        }
        metrics = output_metrics(generator, generations, quality)
        self.client.log_batch(
            run_id,
            metrics=_metrics(metrics),
            params=_params(params),
            tags=_tags(
                {TAG_DIGEST: digest, TAG_MODEL_REVISION: generator.revision, **(extra_tags or {})}
            ),
        )
        self.client.log_text(run_id, format_output(generations.texts), "output.txt")
        settings_doc = {
            "settings": settings.effective().model_dump(),
            "source": settings_source,
            "digest": digest,
            "repository": commit.repo_url,
            "branch": commit.branch,
            "commit": commit.sha,
            "model": {k: v for k, v in generator.describe().items()},
            "model_choice": settings.model_choice,
            "generation": generations.generation_config,
        }
        self.client.log_dict(run_id, settings_doc, "settings.json")
        # Column order matters to MLflow's artifact evaluation view: it groups by the first
        # column and compares the second across runs.
        table = pd.DataFrame(
            {
                "sequence": list(range(1, len(generations.texts) + 1)),
                "generated_text": generations.texts,
                "new_tokens": generations.new_tokens,
                "prompt": [generations.prompt] * len(generations.texts),
            }
        )
        self.client.log_table(run_id, table, "generations.json")
        # The output derives from the repository at this commit: that is its source.
        source = CodeDatasetSource(
            tags={"mlflow.source.name": commit.repo_url, TAG_COMMIT: commit.sha}
        )
        with warnings.catch_warnings():
            # MLflow's hint that integer columns cannot hold missing values: ours have none.
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
            dataset = from_pandas(table, source=source, name=f"generations-{commit.short_sha}")
            self.client.log_inputs(
                run_id,
                datasets=[
                    DatasetInput(
                        dataset._to_mlflow_entity(),
                        tags=[InputTag(key="mlflow.data.context", value="output")],
                    )
                ],
            )
        if preview is not None:
            return self._finish_preview(run_id, commit, digest, dataset.digest, preview)
        version = self.allocate_version(run_id)
        self.publish(
            run_id,
            version,
            commit.sha,
            {
                "mlflow.note.content": _note(version, commit, settings, generations),
                "textgen.output_digest": dataset.digest,
            },
        )
        return RunRecord(
            "new",
            run_id,
            self.experiment_id,
            version,
            commit.sha,
            digest,
            self.url(run_id),
            output_url=self.url(run_id),
        )


def output_metrics(
    generator: Generator, generations: Generations, quality: dict[str, float] | None = None
) -> dict[str, float]:
    """The metrics a run records: timings, token counts and the quality metrics."""
    return {
        "load_seconds": generator.load_seconds,
        "generation_seconds": generations.generation_seconds,
        "new_tokens": float(generations.total_new_tokens),
        "tokens_per_second": generations.tokens_per_second,
        "prompt_tokens": float(len(generations.prompt_token_ids)),
        **(quality or {}),
    }


def _preview_tags(pr: int, commit: CommitInfo, output_digest: str) -> dict[str, str]:
    return {
        TAG_OUTCOME: "preview",
        TAG_PREVIEW: str(pr),
        "textgen.output_digest": output_digest,
        "mlflow.runName": f"PR #{pr} preview {commit.short_sha}",
        "mlflow.note.content": _truncate(
            f"**Preview of pull request #{pr}** at commit `{commit.short_sha}`: "
            f"{commit.message.splitlines()[0] if commit.message else ''}\n\n"
            "A preview is recorded for comparison and never becomes a numbered version."
        ),
    }


def _note(
    version: int, commit: CommitInfo, settings: GenerationSettings, generations: Generations
) -> str:
    first = generations.texts[0] if generations.texts else ""
    return _truncate(
        f"**Version {version}** from commit `{commit.short_sha}` on `{commit.branch}`: "
        f"{commit.message.splitlines()[0] if commit.message else ''}\n\n"
        f"Model `{settings.model}`, seed {settings.random_seed}, "
        f"{len(generations.texts)} sequences.\n\n> {first}"
    )


def one_line_reason(exc: BaseException) -> str:
    """`SettingsError: textgen.yaml at ...: random_seed='forty': expected a number`, on one line."""
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text}"


def storable(text: str) -> str:
    """Text a tag or param may hold in any MLflow store: PostgreSQL refuses NUL characters in
    text (a model may generate them, a settings file may hold them), so they become U+FFFD."""
    return text.replace("\x00", "\ufffd")


def _tags(values: dict[str, str]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(k, storable(v)) for k, v in values.items()]


def _params(values: dict[str, str]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(k, storable(_truncate(v, 6000))) for k, v in values.items()]


def _metrics(values: dict[str, float]) -> list[Any]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, 0) for k, v in values.items()]


@task(name="log-to-mlflow", cache_policy=NO_CACHE)
def log_to_mlflow(
    tracker: Tracker,
    run_id: str,
    commit: CommitInfo,
    settings: GenerationSettings,
    settings_source: str,
    generator: Generator,
    generations: Generations,
    quality: dict[str, float] | None = None,
    extra_tags: dict[str, str] | None = None,
    preview: int | None = None,
) -> RunRecord:
    """Record the output as a new numbered version (or a pull request's preview): tags,
    params, metrics, artifacts, dataset."""
    record = tracker.record_generation(
        run_id,
        commit,
        settings,
        settings_source,
        generator,
        generations,
        quality,
        extra_tags,
        preview,
    )
    logger = get_run_logger()
    if preview is not None:
        logger.info("Recorded the preview of PR #%s as MLflow run %s", preview, record.run_id)
    else:
        logger.info("Recorded version %s as MLflow run %s", record.version, record.run_id)
    return record
