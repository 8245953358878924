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
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.config import artifact_root, tracking_uri
from tasks.errors import TrackingError
from tasks.generate import Generations, format_output
from tasks.model import Generator
from tasks.repo import CommitInfo, RepoLocation
from tasks.settings import GenerationSettings

logger = logging.getLogger(__name__)

TAG_VERSION = "textgen.version"
TAG_VERSION_KEY = "textgen.version_key"
TAG_OUTCOME = "textgen.outcome"
TAG_DIGEST = "textgen.settings_digest"
TAG_MODEL_REVISION = "textgen.model_revision"
TAG_TRIGGER = "textgen.trigger"
TAG_COMMIT = "mlflow.source.git.commit"
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
        return f"{self.outcome}: {self.reason} (MLflow run {self.run_id}): {self.url}"


def mlflow_client() -> Any:
    """An MlflowClient on `MLFLOW_TRACKING_URI`, or the embedded SQLite store."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri())


def ui_base_url() -> str:
    """The MLflow UI that shows this store: the tracking server itself, or `textgen ui`."""
    explicit = os.environ.get("TEXTGEN_MLFLOW_UI_URL")
    if explicit:
        return explicit.rstrip("/")
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return "http://127.0.0.1:5000"


def run_url(experiment_id: str, run_id: str) -> str:
    """Link to a run in the MLflow UI."""
    # `workflowType` opens MLflow 3's model-training navigation rather than the GenAI one.
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    return f"{ui_base_url()}/{page}?workflowType=machine_learning"


def experiment_name(repo_url: str) -> str:
    """One experiment per repository, named by its credential-free location."""
    return RepoLocation.parse(repo_url).url


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
            experiment = client.get_experiment_by_name(name)
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
                            "mlflow.experimentKind": "custom_model_development",
                        },
                    )
                except MlflowException:
                    # Created meanwhile by a concurrent run.
                    experiment = client.get_experiment_by_name(name)
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
        return cls(client, experiment_id, name)

    def url(self, run_id: str) -> str:
        """Link to a run of this experiment."""
        return run_url(self.experiment_id, run_id)

    def start(self, branch: str, ref: str | None, trigger: str) -> str:
        """Open the MLflow run of a flow run, before anything can fail; return its id."""
        tags = {
            "mlflow.source.type": "PROJECT",
            "mlflow.source.name": self.repo_url,
            "mlflow.source.git.repoURL": self.repo_url,
            "mlflow.source.git.branch": branch,
            TAG_TRIGGER: trigger,
            TAG_OUTCOME: "running",
            "textgen.requested_ref": ref or branch,
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
                }
            ),
        )
        self.client.set_terminated(run_id, "FINISHED")
        return RunRecord(
            "reused", run_id, self.experiment_id, version, sha, settings.digest(), self.url(run_id)
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

    def fail(self, run_id: str, exc: BaseException) -> None:
        """Mark a run FAILED with its reason; never raises (the original error matters more)."""
        reason = f"{type(exc).__name__}: {exc}"
        try:
            self.client.log_batch(
                run_id,
                tags=_tags(
                    {
                        TAG_OUTCOME: "failed",
                        "textgen.failure": _truncate(reason),
                    }
                ),
            )
            detail = "".join(traceback.format_exception(exc))
            self.client.log_text(run_id, detail, "error.txt")
        except Exception:  # the store itself may be what failed
            logger.exception("could not record the failure of MLflow run %s", run_id)
        finally:
            with contextlib.suppress(Exception):
                self.client.set_terminated(run_id, "FAILED")

    def allocate_version(self, run_id: str) -> int:
        """Give the run the next output version of the experiment.

        Claim max+1, then look for another run that claimed the same number earlier; on a
        clash the later claimant takes the next number. Bounded; numbers stay unique.
        """
        for _ in range(20):
            latest = self.client.search_runs(
                [self.experiment_id],
                f"tags.`{TAG_VERSION_KEY}` LIKE '%'",
                order_by=[f"tags.`{TAG_VERSION_KEY}` DESC"],
                max_results=1,
            )
            version = int(latest[0].data.tags[TAG_VERSION]) + 1 if latest else 1
            claim = f"{time.time_ns():020d}:{run_id}"
            self.client.log_batch(
                run_id,
                tags=_tags(
                    {
                        TAG_VERSION: str(version),
                        TAG_VERSION_KEY: f"{version:010d}",
                        "textgen.version_claim": claim,
                    }
                ),
            )
            holders = self.client.search_runs(
                [self.experiment_id], f"tags.`{TAG_VERSION}` = '{version}'", max_results=10
            )
            claims = sorted(r.data.tags.get("textgen.version_claim", "") for r in holders)
            if claims and claims[0] == claim:
                return version
            time.sleep(0.05)
        raise TrackingError(
            f"could not allocate a version number in experiment {self.experiment_id}"
        )

    def record_generation(
        self,
        run_id: str,
        commit: CommitInfo,
        settings: GenerationSettings,
        settings_source: str,
        generator: Generator,
        generations: Generations,
        quality: dict[str, float] | None = None,
    ) -> RunRecord:
        """Log the whole record of a new output and end the run FINISHED."""
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
            **{f"generation.{k}": str(v) for k, v in generations.generation_config.items()},
            "settings.source": settings_source,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
        }
        metrics = {
            "load_seconds": generator.load_seconds,
            "generation_seconds": generations.generation_seconds,
            "new_tokens": float(generations.total_new_tokens),
            "tokens_per_second": generations.tokens_per_second,
            "prompt_tokens": float(len(generations.prompt_token_ids)),
            **(quality or {}),
        }
        self.client.log_batch(
            run_id,
            metrics=_metrics(metrics),
            params=_params(params),
            tags=_tags({TAG_DIGEST: digest, TAG_MODEL_REVISION: generator.revision}),
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
        version = self.allocate_version(run_id)
        self.client.log_batch(
            run_id,
            tags=_tags(
                {
                    TAG_OUTCOME: "new",
                    "mlflow.runName": f"v{version} {commit.short_sha}",
                    "mlflow.note.content": _note(version, commit, settings, generations),
                    "textgen.output_digest": dataset.digest,
                }
            ),
        )
        self.client.set_terminated(run_id, "FINISHED")
        return RunRecord(
            "new", run_id, self.experiment_id, version, commit.sha, digest, self.url(run_id)
        )


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


def _tags(values: dict[str, str]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(k, v) for k, v in values.items()]


def _params(values: dict[str, str]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(k, _truncate(v, 6000)) for k, v in values.items()]


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
) -> RunRecord:
    """Record the output as a new numbered version: tags, params, metrics, artifacts, dataset."""
    record = tracker.record_generation(
        run_id, commit, settings, settings_source, generator, generations, quality
    )
    get_run_logger().info("Logged %s", record.summary())
    return record
