"""The MLflow record of a run: one MLflow run per flow run, ending as a numbered output version, a
reuse of one, a skip, a preview or a failure (the outcomes of `tasks.tags`). The run is opened
before anything can fail and ended whatever happens; its number is taken last, once the record is
complete (`tasks.numbering`)."""

from __future__ import annotations

import json
import logging
import traceback
import warnings
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks import numbering
from tasks import tags as T
from tasks.evaluation import format_output, generated_row
from tasks.genai import session_name, trace_one
from tasks.generate import Generations
from tasks.model import Generator
from tasks.recovery import worker_tags
from tasks.repo import CommitInfo
from tasks.settings import GenerationSettings
from tasks.store import Experiment, as_metrics, as_params, as_tags, one_line_reason

logger = logging.getLogger(__name__)

OUTPUT_FILE = "output.txt"
"""The texts, as the original script wrote them."""


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
    """Link to `output.txt`: this run's for a new version, the version's run's for a reuse."""
    cells: tuple[dict[str, Any], ...] = ()
    """Each cell: `cell` (its name), `settings`, `run_id`, and `outputs`, one per prompt: `id`,
    `prompt`, `texts`, `generated` (false when copied) and `from_version`."""

    def as_dict(self) -> dict[str, Any]:
        """The record for machines (`textgen run --json`)."""
        return {
            "outcome": self.outcome,
            "version": self.version,
            "commit": self.commit_sha,
            "settings_digest": self.settings_digest,
            "run_id": self.run_id,
            "mlflow_run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "url": self.url,
            "output_url": self.output_url or self.url,
            "reason": self.reason,
            "cells": list(self.cells),
        }

    def summary(self) -> str:
        """One line for people: what happened and where to look."""
        sha = (self.commit_sha or "")[:7]
        run = f"MLflow run {self.run_id}"
        if self.outcome == T.NEW:
            return f"version {self.version} (commit {sha}), {run}: {self.url}"
        if self.outcome == T.REUSED:
            return (
                f"commit {sha} with these settings is already version {self.version}; "
                f"reused it ({run}): {self.url}"
            )
        if self.outcome == T.PREVIEW:
            return f"preview of commit {sha} (never a numbered version), {run}: {self.url}"
        return f"{self.outcome}: {self.reason} ({run}): {self.url}"


def _prefect_links() -> dict[str, str]:
    """The Prefect flow run's id and UI link, when running inside one."""
    from prefect.runtime import flow_run
    from prefect.utilities.urls import url_for

    try:
        if not flow_run.id:
            return {}
        links = {T.FLOW_RUN_ID: str(flow_run.id), T.FLOW_RUN_NAME: str(flow_run.name)}
        # The UI's own route, as the engine's "View at" log line uses.
        if url := url_for("flow-run", obj_id=flow_run.id):
            links[T.FLOW_RUN_URL] = str(url)
    except Exception as exc:  # the run opens before anything can fail: links are a convenience
        logger.warning("Could not read the Prefect flow run of this run: %s", exc)
        return {}
    return links


def output_metrics(
    generator: Generator, generations: Generations, quality: dict[str, float] | None = None
) -> dict[str, float]:
    """The metrics a run records: timings, token counts and the quality metrics; and, where
    they are known, what shared the cores while it loaded and generated (`tasks.machine`) and
    how much its decoding steps' times varied, which say how far its timings can be compared."""
    measured = {
        "shared_cores": generations.shared_cores,
        "load_shared_cores": generator.load_shared_cores,
        "step_time_spread": generations.step_spread,
    }
    return {
        "load_seconds": generator.load_seconds,
        "generation_seconds": generations.generation_seconds,
        "new_tokens": float(generations.total_new_tokens),
        "tokens_per_second": generations.tokens_per_second,
        "prompt_tokens": float(len(generations.prompt_token_ids)),
        **{k: float(v) for k, v in measured.items() if v is not None},
        **(quality or {}),
    }


def generation_columns(generations: Generations) -> dict[str, list[Any]]:
    """The one-prompt form's output table. Column order matters to MLflow's artifact evaluation
    view: it groups by the first column and compares the second across runs."""
    return {
        "sequence": list(range(1, len(generations.texts) + 1)),
        "generated_text": generations.texts,
        "new_tokens": generations.new_tokens,
        "prompt": [generations.prompt] * len(generations.texts),
    }


class Tracker(Experiment):
    """The repository's experiment, and the runs this process writes in it."""

    def start(self, branch: str, ref: str | None, trigger: str, attempt: int = 1) -> str:
        """Open the MLflow run of a flow run, before anything can fail; return its id."""
        opened = {
            T.ATTEMPT: str(attempt),
            T.SOURCE_TYPE: "PROJECT",
            T.SOURCE_NAME: self.repo_url,
            T.REPO_URL: self.repo_url,
            T.BRANCH: branch,
            T.TRIGGER: trigger,
            T.OUTCOME: T.RUNNING,
            T.REQUESTED_REF: ref or branch,
            **worker_tags(),
            **_prefect_links(),
        }
        name = f"{trigger} {ref or branch}"
        run = self.client.create_run(self.experiment_id, tags=opened, run_name=name)
        return str(run.info.run_id)

    def tag_commit(self, run_id: str, commit: CommitInfo) -> None:
        """Record the resolved commit as soon as it is known."""
        resolved = {
            T.COMMIT: commit.sha,
            T.RUN_NAME: f"{commit.short_sha} (running)",
            T.COMMIT_MESSAGE: commit.message,
            T.COMMIT_AUTHOR: commit.author,
            T.COMMIT_TIME: commit.authored_at,
            T.COMMIT_ON_BRANCH: str(commit.on_branch).lower(),
            T.COMMIT_CHANGED_PATHS: json.dumps(list(commit.changed_paths)),
        }
        self.client.log_batch(run_id, tags=as_tags(resolved))

    def tag_preview(self, run_id: str, pr: int, head_branch: str, fork: bool) -> None:
        """Mark a run as the preview of pull request `pr`, before it can fail."""
        preview = {
            T.PREVIEW_PR: str(pr),
            T.PREVIEW_HEAD_BRANCH: head_branch,
            T.PREVIEW_FORK: str(fork).lower(),
        }
        self.client.log_batch(run_id, tags=as_tags(preview))

    def finish_reused(
        self, run_id: str, existing: Any, settings: GenerationSettings, digest: str | None = None
    ) -> RunRecord:
        """End a run whose output already exists, pointing at that version (`digest`: of the
        inputs, when they are more than `settings`: an evaluation set's)."""
        version = int(existing.data.tags[T.VERSION])
        sha = existing.data.tags[T.COMMIT]
        digest = digest or settings.digest()
        reused = {
            T.OUTCOME: T.REUSED,
            T.DIGEST: digest,
            T.REUSED_VERSION: str(version),
            T.REUSED_RUN_ID: existing.info.run_id,
            T.RUN_NAME: f"{sha[:7]} reuses v{version}",
            **{k: v for k, v in existing.data.tags.items() if k.startswith(T.GATES)},
        }
        self.finish(run_id, reused, settings.as_params())
        url, output_url = self.url(run_id), self.url(existing.info.run_id, OUTPUT_FILE)
        return RunRecord(
            T.REUSED, run_id, self.experiment_id, version, sha, digest, url, output_url=output_url
        )

    def finish_skipped(
        self, run_id: str, reason: str, commit_sha: str | None = None, kind: str = "filtered"
    ) -> RunRecord:
        """End a run that had nothing to generate, saying why (`kind`: filtered or superseded)."""
        skipped = {
            T.OUTCOME: T.SKIPPED,
            T.SKIP_KIND: kind,
            T.SKIP_REASON: reason,
            T.RUN_NAME: f"{(commit_sha or '')[:7]} {kind}".strip(),
        }
        self.finish(run_id, skipped)
        return RunRecord(
            T.SKIPPED, run_id, self.experiment_id, None, commit_sha, None, self.url(run_id), reason
        )

    def fail(self, run_id: str, exc: BaseException) -> None:
        """Mark a run FAILED with its reason; never raises (the original error matters more).
        `textgen.failure` and `error.txt`'s first line hold the reason, its traceback follows."""
        reason = one_line_reason(exc)
        detail = "".join(traceback.format_exception(exc))
        try:
            numbering.end_failed(self, run_id, reason, f"{reason}\n\n{detail}")
        except Exception:  # the store itself may be what failed; the run's own error wins
            logger.exception("could not record the failure of MLflow run %s", run_id)

    def log_output_table(
        self, run_id: str, commit: CommitInfo, columns: dict[str, list[Any]]
    ) -> str:
        """A table of the texts (`generations.json`), also the run's output dataset; its digest."""
        import pandas as pd
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.pandas_dataset import from_pandas
        from mlflow.entities import Dataset, DatasetInput, InputTag

        table = pd.DataFrame(columns)
        self.client.log_table(run_id, table, "generations.json")
        # The output derives from the repository at this commit: that is its source.
        source = CodeDatasetSource(tags={T.SOURCE_NAME: commit.repo_url, T.COMMIT: commit.sha})
        with warnings.catch_warnings():
            # MLflow's hint that integer columns cannot hold missing values: ours have none.
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
            dataset = from_pandas(table, source=source, name=f"generations-{commit.short_sha}")
            described = dataset.to_dict()
        entity = Dataset(
            name=described["name"],
            digest=described["digest"],
            source_type=described["source_type"],
            source=described["source"],
            schema=described.get("schema"),
            profile=described.get("profile"),
        )
        context = InputTag(key=T.DATASET_CONTEXT, value="output")
        self.client.log_inputs(run_id, datasets=[DatasetInput(entity, tags=[context])])
        return str(dataset.digest)

    def finish_preview(
        self, run_id: str, commit: CommitInfo, digest: str, output_digest: str, pr: int
    ) -> RunRecord:
        """End a pull request's preview run FINISHED: recorded, tagged, never numbered."""
        preview = {
            T.OUTCOME: T.PREVIEW,
            T.PREVIEW_PR: str(pr),
            T.OUTPUT_DIGEST: output_digest,
            T.RUN_NAME: f"PR #{pr} preview {commit.short_sha}",
            T.NOTE: (
                f"**Preview of pull request #{pr}** at commit `{commit.short_sha}`: "
                f"{commit.message.splitlines()[0] if commit.message else ''}\n\n"
                "A preview is recorded for comparison and never becomes a numbered version."
            ),
        }
        self.finish(run_id, preview)
        url = self.url(run_id)
        return RunRecord(
            T.PREVIEW,
            run_id,
            self.experiment_id,
            None,
            commit.sha,
            digest,
            url,
            output_url=self.url(run_id, OUTPUT_FILE),
        )


def _trace(
    tracker: Tracker,
    run_id: str,
    settings: GenerationSettings,
    generations: Generations,
    quality: dict[str, float] | None,
    session: str,
) -> None:
    """The version's one trace on MLflow's GenAI side (`tasks.genai`)."""
    from tasks.evalset import Cell, Prompt, prompt_id

    prompt = Prompt(prompt_id(generations.prompt), generations.prompt, "initial_sentence")
    cell = Cell("", {}, settings)
    row = generated_row(cell, prompt, "", generations, quality or {})
    trace_one(tracker, run_id, row, settings.without_prompt(), session)


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
    """Record a new output (tags, params, metrics, artifacts, dataset; `extra_tags`: the gates'
    outcome) and end the run: the next numbered version, or pull request `preview`'s preview."""
    import torch
    import transformers

    digest = settings.digest()
    # Only the knobs that are set: settings.json holds the whole config.
    knobs = {k: v for k, v in generations.generation_config.items() if v is not None}
    params = {
        **settings.as_params(),
        **generator.describe(),
        **{f"generation.{k}": str(v) for k, v in knobs.items()},
        "settings.source": settings_source,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
    metrics = as_metrics(output_metrics(generator, generations, quality))
    tags = {T.DIGEST: digest, T.MODEL_REVISION: generator.revision, **(extra_tags or {})}
    tracker.client.log_batch(run_id, metrics=metrics, params=as_params(params), tags=as_tags(tags))
    tracker.client.log_text(run_id, format_output(generations.texts), OUTPUT_FILE)
    settings_doc = {
        "settings": settings.effective().model_dump(),
        "source": settings_source,
        "digest": digest,
        "repository": commit.repo_url,
        "branch": commit.branch,
        "commit": commit.sha,
        "model": generator.describe(),
        "model_choice": settings.model_choice,
        "generation": generations.generation_config,
    }
    tracker.client.log_dict(run_id, settings_doc, "settings.json")
    output_digest = tracker.log_output_table(run_id, commit, generation_columns(generations))
    if preview is not None:
        record = tracker.finish_preview(run_id, commit, digest, output_digest, preview)
        get_run_logger().info("Recorded the preview of PR #%s as MLflow run %s", preview, run_id)
        _trace(
            tracker, run_id, settings, generations, quality, session_name(None, preview, commit.sha)
        )
        return record
    version = numbering.allocate(tracker, run_id)
    first = generations.texts[0] if generations.texts else ""
    note = (
        f"**Version {version}** from commit `{commit.short_sha}` on `{commit.branch}`: "
        f"{commit.message.splitlines()[0] if commit.message else ''}\n\n"
        f"Model `{settings.model}`, seed {settings.random_seed}, "
        f"{len(generations.texts)} sequences.\n\n> {first}"
    )
    numbering.publish(
        tracker, run_id, version, commit.sha, {T.NOTE: note, T.OUTPUT_DIGEST: output_digest}
    )
    get_run_logger().info("Recorded version %s as MLflow run %s", version, run_id)
    _trace(tracker, run_id, settings, generations, quality, session_name(version, None, commit.sha))
    url = tracker.url(run_id)
    return RunRecord(
        T.NEW,
        run_id,
        tracker.experiment_id,
        version,
        commit.sha,
        digest,
        url,
        output_url=tracker.url(run_id, OUTPUT_FILE),
    )
