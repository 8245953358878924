"""Every MLflow tag the project writes or reads, and the outcomes a run ends in, named once.

MLflow's own keys (`mlflow.*`) are the ones its UI shows; the `textgen.*` keys are this
project's record. An MLflow run ends in one outcome (`OUTCOME`):
- `new`: a new output version, numbered `VERSION` 1, 2, 3 ... per experiment;
- `reused`: the same commit, settings and model already have a version; it names that one;
- `skipped`: nothing to generate (every changed file is ignored by the workflow spec, or a
  newer push superseded it);
- `preview`: a pull request's head, recorded for comparison, never numbered;
- `failed`: the run failed; `FAILURE` says why, and the MLflow status is FAILED.
"""

from __future__ import annotations

# MLflow's own
RUN_NAME = "mlflow.runName"
NOTE = "mlflow.note.content"
SOURCE_TYPE = "mlflow.source.type"
SOURCE_NAME = "mlflow.source.name"
REPO_URL = "mlflow.source.git.repoURL"
COMMIT = "mlflow.source.git.commit"
BRANCH = "mlflow.source.git.branch"
DATASET_CONTEXT = "mlflow.data.context"
EXPERIMENT_KIND = "mlflow.experimentKind"
PARENT_RUN = "mlflow.parentRunId"

# The outcome of a run
OUTCOME = "textgen.outcome"
RUNNING, NEW, REUSED = "running", "new", "reused"
SKIPPED, PREVIEW, FAILED = "skipped", "preview", "failed"
VERSION = "textgen.version"
VERSION_KEY = "textgen.version_key"
"""The version zero-padded, so that MLflow sorts versions as numbers."""
FAILURE = "textgen.failure"
SKIP_REASON = "textgen.skip_reason"
SKIP_KIND = "textgen.skip_kind"
REUSED_VERSION = "textgen.reused_version"
REUSED_RUN_ID = "textgen.reused_run_id"
RECOVERED = "textgen.recovered"
OUTPUT_DIGEST = "textgen.output_digest"

# Evaluation sets (tasks.evalset): a version's cells are child runs of its run
CELL = "textgen.cell"
"""A cell's canonical name, `key=value,...`, on its child run."""
CELLS = "textgen.cells"
"""How many cells a version has (on an evaluation set's version)."""
PROMPTS = "textgen.prompts"
"""How many prompts an evaluation set's version has, and where they were read (`..._source`)."""
PROMPTS_SOURCE = "textgen.prompts_source"
REUSED_ROWS = "textgen.reused_rows"
"""How many (cell, prompt) rows of a version were copied from earlier versions."""
CELL_FLOW_RUN = "textgen.cell.flow_run"
"""On a cell's child run: the Prefect flow run that generated its rows on a worker of the pool
(none: the version's own flow run did)."""
CELL_PID = "textgen.cell.pid"
"""On a cell's child run: the process that generated its rows."""

# What the run was asked and what it resolved
TRIGGER = "textgen.trigger"
ATTEMPT = "textgen.attempt"
REQUESTED_REF = "textgen.requested_ref"
DIGEST = "textgen.settings_digest"
MODEL_REVISION = "textgen.model_revision"
COMMIT_MESSAGE = "textgen.commit.message"
COMMIT_AUTHOR = "textgen.commit.author"
COMMIT_TIME = "textgen.commit.time"
COMMIT_ON_BRANCH = "textgen.commit.on_branch"
COMMIT_CHANGED_PATHS = "textgen.commit.changed_paths"
PREVIEW_PR = "textgen.preview.pr"
"""The pull request a preview run previews (its number)."""
PREVIEW_HEAD_BRANCH = "textgen.preview.head_branch"
PREVIEW_FORK = "textgen.preview.fork"

# Quality gates (tasks.gates)
GATES = "textgen.gates"
"""`passed` or `failed` (absent when the repository has no gates)."""
GATES_FAILED = "textgen.gates.failed"
GATES_REPORT = "textgen.gates.report"
GATES_BASE = "textgen.gates.base"

# Who runs it, to tell when its process is gone (tasks.recovery)
WORKER_HOST = "textgen.worker.host"
WORKER_PID = "textgen.worker.pid"
WORKER_PROCESS_START = "textgen.worker.process_start"
FLOW_RUN_ID = "textgen.prefect.flow_run_id"
FLOW_RUN_NAME = "textgen.prefect.flow_run_name"
FLOW_RUN_URL = "textgen.prefect.flow_run_url"

# Experiments, and the registered model whose versions number the outputs
REPO_KEY = "textgen.repo_key"
EXPERIMENT_REPO = "textgen.repo_url"
REGISTRY_EXPERIMENT = "textgen.experiment_id"
NUMBER_STATE = "textgen.state"
"""A version number's state: `allocated`, then `published`."""

# A Prefect flow run's label linking to its MLflow run
FLOW_RUN_LABEL = "textgen.mlflow_run_url"
