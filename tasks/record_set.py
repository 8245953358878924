"""The MLflow record of an evaluation set's version: one parent run (the flow run's), and for a
matrix one child run per cell (`mlflow.parentRunId`, `textgen.cell`), each with its settings,
metrics and `output.txt`. The parent holds the whole output: `output.txt` by sections,
`outputs.json` (every row, with what later versions reuse), `cells.json` (each cell's run and
metrics), the table `generations.json` and the output dataset. Children are written once every
cell has its rows, and the number is taken last: a version is complete or it is not one."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks import numbering
from tasks import tags as T
from tasks.evalset import Cell, Plan
from tasks.evaluation import (
    CELLS_FILE,
    OUTPUTS_FILE,
    Row,
    format_sections,
    ordered,
    version_metrics,
)
from tasks.genai import session_name, trace_set
from tasks.recovery import owner_tags
from tasks.repo import CommitInfo
from tasks.store import as_metrics, as_params, as_tags
from tasks.tracking import OUTPUT_FILE, RunRecord, Tracker

Loaded = dict[str, dict[str, Any]]
"""Per cell name: `params` (the model's description), `metrics` (its load) and `made_by` (the
cell's flow run, empty for the version's own, and process), for the cells whose model was
loaded."""


def revisions_digest(revisions: dict[str, str]) -> str:
    """One text for the model revisions of every cell (the one revision for a single cell)."""
    values = sorted(set(revisions.values()))
    if len(values) == 1:
        return values[0]
    return "sha256:" + hashlib.sha256("\n".join(values).encode()).hexdigest()


def table_columns(rows: list[Row]) -> dict[str, list[Any]]:
    """The output table: one row per text. The first two columns are what MLflow's artifact
    view groups by and compares; then what each row is."""
    columns: dict[str, list[Any]] = {
        k: []
        for k in (
            "output",
            "generated_text",
            "cell",
            "prompt_id",
            "sequence",
            "prompt",
            "new_tokens",
            "from_run_id",
        )
    }
    for row in rows:
        for sequence, (text, tokens) in enumerate(zip(row.texts, row.new_tokens, strict=True), 1):
            columns["output"].append(f"{row.cell or '-'} | {row.prompt_id} | {sequence}")
            columns["generated_text"].append(text)
            columns["cell"].append(row.cell)
            columns["prompt_id"].append(row.prompt_id)
            columns["sequence"].append(sequence)
            columns["prompt"].append(row.prompt)
            columns["new_tokens"].append(tokens)
            columns["from_run_id"].append(row.from_run_id or "")
    return columns


def record_cells(
    plan: Plan, rows: list[Row], runs: dict[str, str], version: int | None
) -> tuple[dict[str, Any], ...]:
    """The cells of `textgen run --json`."""
    cells = []
    for cell in plan.cells:
        outputs = [
            {
                "id": r.prompt_id,
                "prompt": r.prompt,
                "texts": r.texts,
                "generated": r.generated,
                "from_version": r.from_version if not r.generated else version,
            }
            for r in rows
            if r.cell == cell.key
        ]
        cells.append(
            {
                "cell": cell.key,
                "settings": cell_settings(cell),
                "run_id": runs[cell.key],
                "outputs": outputs,
            }
        )
    return tuple(cells)


def cell_settings(cell: Cell) -> dict[str, Any]:
    """A cell's settings that have a value (the prompt is the row's)."""
    return cell.settings.without_prompt()


def _child(tracker: Tracker, parent_id: str, commit: CommitInfo, cell: Cell) -> str:
    """A cell's child run, written whole and ended FINISHED."""
    tags = {
        T.PARENT_RUN: parent_id,
        T.CELL: cell.key,
        T.SOURCE_TYPE: "PROJECT",
        T.SOURCE_NAME: tracker.repo_url,
        T.REPO_URL: tracker.repo_url,
        T.COMMIT: commit.sha,
        T.BRANCH: commit.branch,
        T.DIGEST: cell.settings.digest(),
        **owner_tags(),
    }
    run = tracker.client.create_run(tracker.experiment_id, tags=tags, run_name=cell.key)
    return str(run.info.run_id)


@task(name="log-evaluation-to-mlflow", cache_policy=NO_CACHE)
def log_evaluation(
    tracker: Tracker,
    run_id: str,
    commit: CommitInfo,
    plan: Plan,
    rows: list[Row],
    loaded: Loaded,
    per_cell: dict[str, dict[str, float]],
    revisions: dict[str, str],
    extra_tags: dict[str, str] | None = None,
    preview: int | None = None,
) -> RunRecord:
    """Record an evaluation set's version (`per_cell`: each cell's metrics, `cell_metrics`)
    and end its run."""
    import torch
    import transformers

    rows = ordered(plan, rows)
    for row in rows:
        if row.generated:
            row.from_run_id = run_id
    versions = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "settings.source": plan.source,
    }
    runs: dict[str, str] = {}
    for cell in plan.cells:
        cell_rows = [r for r in rows if r.cell == cell.key]
        reused = sum(not r.generated for r in cell_rows)
        if not plan.matrix:
            runs[cell.key] = run_id
            continue
        child = _child(tracker, run_id, commit, cell)
        runs[cell.key] = child
        params = {
            **cell.settings.as_params(),
            **loaded.get(cell.key, {}).get("params", {}),
            **versions,
        }
        params.pop("initial_sentence", None)
        tags = {
            T.MODEL_REVISION: revisions[cell.key],
            T.REUSED_ROWS: str(reused),
            T.RUN_NAME: cell.key,
        }
        if made := loaded.get(cell.key, {}).get("made_by"):
            tags[T.CELL_PID] = str(made["pid"])
            if made["flow_run"]:
                tags[T.CELL_FLOW_RUN] = made["flow_run"]
        tracker.client.log_batch(
            child,
            metrics=as_metrics(per_cell[cell.key]),
            params=as_params(params),
            tags=as_tags(tags),
        )
        tracker.client.log_text(child, format_sections(cell_rows), OUTPUT_FILE)
        tracker.client.log_dict(child, {"cell": cell.key, **cell_settings(cell)}, "settings.json")
        tracker.client.set_terminated(child, "FINISHED")

    metrics = per_cell[""] if not plan.matrix else version_metrics(per_cell)
    params = {**plan.settings.as_params(), **versions}
    if plan.prompts_source != "initial_sentence":
        params.pop("initial_sentence", None)
        params["prompts"] = plan.prompts_source
    if plan.matrix:
        params["matrix.cells"] = json.dumps([c.key for c in plan.cells])
    if not plan.matrix:
        params.update(loaded.get("", {}).get("params", {}))
    reused_rows = sum(not r.generated for r in rows)
    tags = {
        T.DIGEST: plan.digest(),
        T.MODEL_REVISION: revisions_digest(revisions),
        T.CELLS: str(len(plan.cells)),
        T.PROMPTS: str(len(plan.prompts)),
        T.PROMPTS_SOURCE: plan.prompts_source,
        T.REUSED_ROWS: str(reused_rows),
        **(extra_tags or {}),
    }
    client = tracker.client
    client.log_batch(
        run_id, metrics=as_metrics(metrics), params=as_params(params), tags=as_tags(tags)
    )
    client.log_text(run_id, format_sections(rows), OUTPUT_FILE)
    client.log_dict(run_id, {"rows": [r.as_dict() for r in rows]}, OUTPUTS_FILE)
    cells_doc = [
        {"cell": c.key, "run_id": runs[c.key], "values": c.values, "metrics": per_cell[c.key]}
        for c in plan.cells
    ]
    client.log_dict(run_id, {"cells": cells_doc}, CELLS_FILE)
    settings_doc = {
        "settings": plan.settings.effective().model_dump(),
        "source": plan.source,
        "digest": plan.digest(),
        "repository": commit.repo_url,
        "branch": commit.branch,
        "commit": commit.sha,
        "prompts": [{"id": p.id, "prompt": p.text} for p in plan.prompts],
        "cells": [{"cell": c.key, **cell_settings(c)} for c in plan.cells],
    }
    client.log_dict(run_id, settings_doc, "settings.json")
    output_digest = tracker.log_output_table(run_id, commit, table_columns(rows))
    logger = get_run_logger()
    if preview is not None:
        record = tracker.finish_preview(run_id, commit, plan.digest(), output_digest, preview)
        logger.info("Recorded the preview of PR #%s as MLflow run %s", preview, run_id)
        trace_set(tracker, run_id, plan, rows, runs, session_name(None, preview, commit.sha))
        return _with_cells(record, plan, rows, runs, None)
    version = numbering.allocate(tracker, run_id)
    note = (
        f"**Version {version}** from commit `{commit.short_sha}` on `{commit.branch}`: "
        f"{commit.message.splitlines()[0] if commit.message else ''}\n\n"
        f"{len(plan.cells)} cells x {len(plan.prompts)} prompts; {reused_rows} of "
        f"{len(rows)} reused from earlier versions."
    )
    numbering.publish(
        tracker, run_id, version, commit.sha, {T.NOTE: note, T.OUTPUT_DIGEST: output_digest}
    )
    logger.info(
        "Recorded version %s as MLflow run %s: %d cells x %d prompts, %d reused",
        version,
        run_id,
        len(plan.cells),
        len(plan.prompts),
        reused_rows,
    )
    trace_set(tracker, run_id, plan, rows, runs, session_name(version, None, commit.sha))
    record = RunRecord(
        T.NEW,
        run_id,
        tracker.experiment_id,
        version,
        commit.sha,
        plan.digest(),
        tracker.url(run_id),
        output_url=tracker.url(run_id, OUTPUT_FILE),
    )
    return _with_cells(record, plan, rows, runs, version)


def _with_cells(
    record: RunRecord, plan: Plan, rows: list[Row], runs: dict[str, str], version: int | None
) -> RunRecord:
    from dataclasses import replace

    return replace(record, cells=record_cells(plan, rows, runs, version))
