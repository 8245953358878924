"""A version on MLflow's GenAI side: a trace per (cell, prompt), the quality metrics as
assessments, and for an evaluation set an evaluation run over its prompt set.

- Each row of a version is one trace, in a session named for the version (`v3`, or the
  preview's `PR #7 1a2b3c4`): inputs the prompt, its id and the cell; outputs the texts; the
  span's attributes the cell's settings, the model, the seconds and (for texts generated now)
  the token usage MLflow's overview counts. A row copied from an earlier version is traced too,
  without token usage (nothing was generated), naming the version it came from. Each trace's
  source run is its cell's run.
- An evaluation set's version has an evaluation run, a child of the version's run named
  `evaluation v3`: `mlflow.genai.evaluate` over the version's traces, with the project's
  quality metrics as code scorers that read the values computed at generation (no LLM judge).
  The scorers' values become the traces' assessments, and MLflow's "Evaluation runs" compares
  two versions row by row. The prompt set is an MLflow evaluation dataset, linked to that run.
- A one-prompt version's one trace gets its quality metrics as feedback assessments directly.

All of it is a view of a version already recorded: it is written after the version has its
number, and a failure here is a warning, never a failed version.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from tasks import config
from tasks import tags as T
from tasks.evalset import Plan
from tasks.evaluation import Row
from tasks.recovery import owner_tags
from tasks.store import Experiment

logger = logging.getLogger(__name__)

ATTRIBUTE = "textgen."
"""The prefix of the project's span attributes."""
SCORED = ("distinct_1", "distinct_2", "repetition_rate", "mean_log_likelihood", "perplexity")
"""The quality metrics each trace is assessed with."""
SOURCE = "textgen.quality"
"""The source id of the assessments (a code source)."""


def session_name(version: int | None, preview: int | None, sha: str) -> str:
    """The session of a version's traces: `v3`, or `PR #7 1a2b3c4` for a preview."""
    return f"v{version}" if version is not None else f"PR #{preview} {sha[:7]}"


def _fluent(experiment: Experiment) -> Any:
    """MLflow's fluent API on the same store as `experiment`, writing traces as they end."""
    # Written synchronously: a version has tens of traces, and the background queue's flush
    # costs more than writing them (1.5 s at least).
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")
    import random

    import mlflow

    mlflow.set_tracking_uri(config.tracking_uri())
    # Trace ids come from Python's `random`, which `set_seed(random_seed)` set before each
    # generation: seeded alike, every version would make the same ids and overwrite the last
    # version's traces. Reseeded from the system's entropy (every generation seeds it again).
    random.seed()
    return mlflow


def _trace(
    mlflow: Any,
    experiment: Experiment,
    row: Row,
    run_id: str,
    session: str,
    settings: dict[str, Any],
) -> str:
    from mlflow.entities import SpanType
    from mlflow.tracing.constant import SpanAttributeKey, TraceMetadataKey

    seconds = row.metrics.get("generation_seconds", 0.0) if row.generated else 0.0
    started = row.started_at if row.generated and row.started_at else time.time() - seconds
    attributes: dict[str, Any] = {
        SpanAttributeKey.MODEL: str(settings.get("model", "")),
        f"{ATTRIBUTE}settings": json.dumps(settings, sort_keys=True),
        f"{ATTRIBUTE}generated": row.generated,
        **{f"{ATTRIBUTE}{k}": v for k, v in row.metrics.items() if v == v},
    }
    if row.generated:
        prompt_tokens = int(row.metrics.get("prompt_tokens", 0))
        new = int(row.metrics.get("new_tokens", 0))
        usage = {"input_tokens": prompt_tokens, "output_tokens": new}
        attributes[SpanAttributeKey.CHAT_USAGE] = usage | {"total_tokens": prompt_tokens + new}
    elif row.from_version is not None:
        attributes[f"{ATTRIBUTE}from_version"] = row.from_version
    span = mlflow.start_span_no_context(
        name=f"generate {row.cell}" if row.cell else "generate",
        span_type=SpanType.LLM,
        inputs={"prompt": row.prompt, "prompt_id": row.prompt_id, "cell": row.cell},
        attributes=attributes,
        metadata={TraceMetadataKey.SOURCE_RUN: run_id, TraceMetadataKey.TRACE_SESSION: session},
        tags={"prompt_id": row.prompt_id, "cell": row.cell},
        experiment_id=experiment.experiment_id,
        start_time_ns=int(started * 1e9),
    )
    span.end(outputs={"texts": row.texts}, end_time_ns=int((started + seconds) * 1e9))
    return str(span.trace_id)


def _scorers() -> list[Any]:
    from mlflow.genai.scorers import scorer

    def reading(name: str) -> Any:
        @scorer(name=name)
        def read(trace: Any) -> Any:
            return trace.data.spans[0].get_attribute(f"{ATTRIBUTE}{name}")

        return read

    return [reading(name) for name in SCORED]


def trace_one(
    experiment: Experiment, run_id: str, row: Row, settings: dict[str, Any], session: str
) -> None:
    """A one-prompt version's trace, its quality metrics as feedback; never raises."""
    try:
        mlflow = _fluent(experiment)
        from mlflow.entities import AssessmentSource, AssessmentSourceType

        trace_id = _trace(mlflow, experiment, row, run_id, session, settings)
        source = AssessmentSource(AssessmentSourceType.CODE, source_id=SOURCE)
        for name in SCORED:
            if (value := row.metrics.get(name)) is not None and value == value:
                mlflow.log_feedback(trace_id=trace_id, name=name, value=value, source=source)
    except Exception as exc:  # a view of a recorded version: never its failure
        logger.warning("Could not trace the version in MLflow's GenAI view: %s", exc)


def trace_set(
    experiment: Experiment,
    parent_id: str,
    plan: Plan,
    rows: list[Row],
    runs: dict[str, str],
    session: str,
) -> str | None:
    """An evaluation set's traces, its prompt set as a dataset and its evaluation run (whose
    id is returned); never raises."""
    try:
        mlflow = _fluent(experiment)
        settings = {c.key: c.settings.without_prompt() for c in plan.cells}
        for row in rows:
            _trace(mlflow, experiment, row, runs[row.cell], session, settings[row.cell])
        return _evaluate(mlflow, experiment, parent_id, plan, session)
    except Exception as exc:  # a view of a recorded version: never its failure
        logger.warning("Could not write the version to MLflow's GenAI view: %s", exc)
        return None


def _evaluate(mlflow: Any, experiment: Experiment, parent_id: str, plan: Plan, session: str) -> str:
    """The evaluation run of a version: the code scorers over its traces, under its run."""
    import contextlib
    import io

    from mlflow.entities import DatasetInput

    traces = mlflow.search_traces(
        locations=[experiment.experiment_id],
        filter_string=f"metadata.`mlflow.trace.session` = '{session}'",
        max_results=len(plan.cells) * len(plan.prompts) + 10,
    )
    dataset = _prompt_dataset(experiment, plan)
    tags = {T.PARENT_RUN: parent_id, T.RUN_NAME: f"evaluation {session}", **owner_tags()}
    run = experiment.client.create_run(experiment.experiment_id, tags=tags)
    eval_id = str(run.info.run_id)
    # evaluate prints a banner and a progress bar: kept out of the run's output.
    with contextlib.redirect_stdout(io.StringIO()), mlflow.start_run(run_id=eval_id):
        mlflow.genai.evaluate(data=traces, scorers=_scorers())
    if dataset is not None:
        experiment.client.log_inputs(eval_id, datasets=[DatasetInput(dataset._to_mlflow_entity())])
    return eval_id


def _prompt_dataset(experiment: Experiment, plan: Plan) -> Any:
    """The prompt set as an MLflow evaluation dataset, one per distinct set (by digest)."""
    import hashlib

    from mlflow.genai.datasets import create_dataset, search_datasets

    canonical = json.dumps([[p.id, p.text] for p in plan.prompts], separators=(",", ":"))
    name = f"prompts-{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"
    found = search_datasets(
        experiment_ids=[experiment.experiment_id], filter_string=f"name = '{name}'"
    )
    if found:
        return found[0]
    dataset = create_dataset(
        name=name,
        experiment_id=experiment.experiment_id,
        tags={
            T.PROMPTS_SOURCE: plan.prompts_source,
            T.PROMPTS: str(len(plan.prompts)),
        },
    )
    dataset.merge_records([{"inputs": {"prompt": p.text, "prompt_id": p.id}} for p in plan.prompts])
    return dataset
