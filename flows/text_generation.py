"""The nlp-text-generation flow: one commit of a linked repository in, one output version out."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any, cast

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed, State
from prefect.utilities.timeout import timeout as deadline

from tasks import cells, config, logs, recovery, versions
from tasks import tags as T
from tasks.errors import RunTimeoutError, SettingsError
from tasks.evalset import Plan
from tasks.evaluation import CELLS_FILE, Row, cell_metrics, model_revision, row_key
from tasks.gates import evaluate, gate_tags, gate_values, load_gates, resolve_cells
from tasks.generate import generate_text
from tasks.inputs import fetch_repo_commit, read_settings
from tasks.links import run_link_settings
from tasks.model import load_generator, local_revision, locate_model
from tasks.names import AUTOMATIC_TRIGGERS, FLOW_NAME, MANUAL, PREVIEW_TRIGGER, SKIPPED, SUPERSEDED
from tasks.quality import score_text
from tasks.record_set import Loaded, log_evaluation, record_cells, revisions_digest
from tasks.repo import CommitInfo, RepoLocation
from tasks.store import storable
from tasks.tracking import RunRecord, Tracker, log_to_mlflow, output_metrics
from tasks.triggers import filter_preview, filter_push


@dataclass(frozen=True)
class Request:
    """What a flow run was asked to do: the flow's parameters, passed along as one."""

    repo_url: str | None
    branch: str
    commit_sha: str | None
    overrides: dict[str, Any] | None
    trigger: str
    force: bool
    before: str | None
    changed_paths: list[str] | None
    attempt: int
    pull_request: PullRequest | None = None


@dataclass(frozen=True)
class PullRequest:
    """The pull request a preview run is for, as the receiver read it from the delivery."""

    number: int
    ref: str
    """Its head in the linked repository: `refs/pull/N/head` or `refs/merge-requests/N/head`."""
    head_branch: str = ""
    fork: bool = True

    @classmethod
    def of(cls, value: dict[str, Any] | None, trigger: str) -> PullRequest | None:
        """The `pull_request` parameter, checked; required exactly for preview runs."""
        if trigger != PREVIEW_TRIGGER:
            if value:
                raise SettingsError("pull_request is given only to preview runs")
            return None
        if not isinstance(value, dict):
            raise SettingsError(
                "a preview run needs pull_request: {number, ref} naming the pull request"
            )
        number, ref = value.get("number"), value.get("ref")
        if not isinstance(number, int) or isinstance(number, bool) or not 0 < number < 10**10:
            raise SettingsError(f"pull_request.number must be a positive number, not {number!r}")
        if not isinstance(ref, str):
            raise SettingsError(f"pull_request.ref must be the head ref, not {ref!r}")
        return cls(
            number, ref, str(value.get("head_branch") or "")[:200], value.get("fork") is not False
        )


class _Deadline(TimeoutError):
    """Raised inside the run when its deadline passes."""


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    ref = params.get("commit_sha") or params.get("branch") or "main"
    pull = params.get("pull_request")
    if isinstance(pull, dict) and pull.get("number"):
        return f"preview-pr{pull['number']}-{str(ref)[:12]}"
    return f"{params.get('trigger', MANUAL)}-{str(ref)[:12]}"


def _markdown(record: RunRecord, params: dict[str, Any]) -> str:
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in params.items())
    title = f"Version {record.version}" if record.version else record.outcome.capitalize()
    return (
        f"# {title}\n\n"
        f"- outcome: **{record.outcome}** {record.reason}\n"
        f"- commit: `{record.commit_sha}`\n"
        f"- settings digest: `{record.settings_digest}`\n"
        f"- MLflow run: [{record.run_id}]({record.url})\n\n"
        f"| setting | value |\n|---|---|\n{rows}\n"
    )


def _record_crash(flow: Any, flow_run: Any, state: State[Any]) -> None:
    """When the run's process died (Prefect marks it Crashed), end its MLflow run too: in the
    process that watched it (the runner or worker), right after the crash."""
    logger = logging.getLogger(__name__)
    try:
        repo_url = flow_run.parameters.get("repo_url") or config.default_repo()
        tracker = Tracker.for_repo(repo_url, create=False)
        reason = f"the process running it crashed: {state.message or state.name}"
        for run in versions.of_flow_run(tracker, flow_run.id, running=True):
            recovery.recover(tracker, run, reason)
    except Exception as exc:  # a hook of Prefect's: it must not fail, and says what it skipped
        logger.warning("Could not record the crash of flow run %s: %s", flow_run.id, exc)


@flow(name=FLOW_NAME, flow_run_name=_flow_run_name, log_prints=False, on_crashed=[_record_crash])
def nlp_text_generation(
    repo_url: str | None = None,
    branch: str = "main",
    commit_sha: str | None = None,
    overrides: dict[str, Any] | None = None,
    trigger: str = MANUAL,
    force: bool = False,
    before: str | None = None,
    changed_paths: list[str] | None = None,
    attempt: int = 1,
    pull_request: dict[str, Any] | None = None,
) -> RunRecord:
    """Generate text with the settings at one commit and record it as a new MLflow version.

    Args:
        repo_url: URL or local path of the linked repository (default: this project's own).
        branch: The branch to fetch; its tip is run when `commit_sha` is not given.
        commit_sha: The commit to run, full or short.
        overrides: Settings changed for this run only, validated like the settings file.
        trigger: What started the run: manual, push, poll, ... Push and poll runs honour the
            workflow specs' trigger section and are skipped once a newer push superseded them.
        force: Make a new version even when this commit, settings and model already have one.
        before: For a push, the branch's previous tip.
        changed_paths: For a push, the files it changed, when the sender knows them.
        attempt: Which try of this push: a push run whose worker died is run once more.
        pull_request: For a preview run (trigger `preview`): the pull request into `branch`,
            `{number, ref}`, whose head `commit_sha` is. Recorded as its preview, compared
            with the branch's latest version, never numbered.
    """
    logs.quiet_console()  # this process's console, as Prefect set it up: one format, no chatter
    pr = PullRequest.of(pull_request, trigger)
    request = Request(
        repo_url, branch, commit_sha, overrides, trigger, force, before, changed_paths, attempt, pr
    )
    repo = config.default_repo() if repo_url is None else repo_url
    required = trigger in AUTOMATIC_TRIGGERS or trigger == PREVIEW_TRIGGER
    with config.overrides(run_link_settings(repo, branch, required)):
        return _tracked(request)


def _tracked(request: Request) -> RunRecord:
    """The run, inside its MLflow run: opened first, ended whatever happens."""
    r = request
    location = RepoLocation.parse(config.default_repo() if r.repo_url is None else r.repo_url)
    tracker = Tracker.for_repo(location)
    _recover(tracker)
    run_id = tracker.start(r.branch, r.commit_sha, r.trigger, r.attempt)
    _label_flow_run(tracker.url(run_id))
    seconds = float(config.RUN_TIMEOUT.get())
    try:
        with deadline(seconds, timeout_exc_type=_Deadline):
            return _run(tracker, run_id, location, request)
    except _Deadline:
        error = RunTimeoutError(
            f"the run did not finish within its deadline of {seconds:g} s "
            f"({config.RUN_TIMEOUT.name}); it was stopped"
        )
        tracker.fail(run_id, error)
        raise error from None
    except BaseException as exc:
        tracker.fail(run_id, exc)
        raise


def _run(tracker: Tracker, run_id: str, location: RepoLocation, request: Request) -> RunRecord:
    """The flow's stages for its MLflow run `run_id`: commit, filter, settings, model, output."""
    r = request
    pr = r.pull_request
    # Pushes, polls and previews are the runs that the workflow specs' triggers decide on.
    filtered = r.trigger in AUTOMATIC_TRIGGERS or pr is not None
    pull_ref, preview = (pr.ref, pr.number) if pr else (None, None)
    commit = fetch_repo_commit(
        r.repo_url or location.url, r.branch, r.commit_sha, refresh=filtered, pull_ref=pull_ref
    )
    tracker.tag_commit(run_id, commit)
    if pr is not None:
        tracker.tag_preview(run_id, pr.number, pr.head_branch, pr.fork)
    if filtered:
        if pr is not None:
            go, reason, kind = filter_preview(commit, r.branch, pr.ref)
        else:
            last = versions.last_handled_commit(tracker, r.branch, AUTOMATIC_TRIGGERS)
            go, reason, kind = filter_push(commit, last, r.before, r.changed_paths)
        if not go:
            record = tracker.finish_skipped(run_id, reason, commit.sha, kind)
            _publish(record, {})
            # The flow run ends Completed, its message saying Skipped or Superseded and why:
            # a state of Prefect's own name, which its deployment page lists by default (a
            # custom name is hidden by the page's default filter). A caller of the flow still
            # receives the record.
            word = SUPERSEDED if kind == "superseded" else SKIPPED
            state: State[RunRecord] = Completed(message=f"{word}: {reason}", data=record)
            return cast(RunRecord, state)
    plan = read_settings(commit, r.overrides)
    # A malformed gate, or one naming a cell there is not, fails the run before a model loads.
    gates = resolve_cells(load_gates(commit), [c.key for c in plan.cells])
    if plan.evaluation:
        record = _run_set(tracker, run_id, commit, plan, r, gates)
        _publish(record, plan.settings.as_params())
        return record
    settings, source = plan.settings, plan.source
    model_path = locate_model(settings, commit)
    revision = local_revision(settings, model_path)
    existing = None
    if not r.force and pr is None:
        existing = versions.find_version(tracker, commit.sha, settings.digest(), revision)
    if existing is not None:
        record = tracker.finish_reused(run_id, existing, settings)
        cells = _one_cell(tracker, plan, existing.info.run_id, None, record.version)
        record = replace(record, cells=cells)
    else:
        generator = load_generator(settings, revision, model_path)
        generations = generate_text(generator, settings)
        scores = score_text(generator, generations)
        metrics = output_metrics(generator, generations, scores)
        tags = _check_gates(tracker, r.branch, gates, {"": metrics})
        record = log_to_mlflow(
            tracker, run_id, commit, settings, source, generator, generations, scores, tags, preview
        )
        cells = _one_cell(tracker, plan, run_id, generations.texts, record.version)
        record = replace(record, cells=cells)
    _publish(record, settings.as_params())
    return record


def _one_cell(
    tracker: Tracker, plan: Plan, run_id: str, texts: list[str] | None, version: int | None
) -> tuple[dict[str, Any], ...]:
    """The one cell of a one-prompt version, for `textgen run --json`: its texts as generated
    now, or (`texts` None) as the version's run `run_id` recorded them."""
    generated = texts is not None
    if texts is None:
        texts = versions.texts_of(tracker, run_id)
    prompt = plan.prompts[0]
    row = Row("", prompt.id, prompt.text, "", texts, [], {}, generated, version)
    return record_cells(plan, [row], {"": run_id}, version)


def _run_set(
    tracker: Tracker,
    run_id: str,
    commit: CommitInfo,
    plan: Plan,
    request: Request,
    gates: list[Any],
) -> RunRecord:
    """An evaluation set's version: every prompt in every cell, copied from an earlier version
    where the same inputs already made it, generated where not; one model loaded at a time."""
    r = request
    pr = r.pull_request
    preview = pr.number if pr else None
    paths, local = {}, {}
    for cell in plan.cells:
        with cells.naming(cell):
            paths[cell.key] = locate_model(cell.settings, commit)
            local[cell.key] = local_revision(cell.settings, paths[cell.key])
    revisions = {c.key: model_revision(c.settings, local[c.key]) for c in plan.cells}
    if not r.force and pr is None:
        existing = versions.find_version(
            tracker, commit.sha, plan.digest(), revisions_digest(revisions)
        )
        if existing is not None:
            record = tracker.finish_reused(run_id, existing, plan.settings, plan.digest())
            earlier = versions.rows_of(tracker, existing)
            found = record_cells(plan, earlier, _cell_runs(tracker, existing), record.version)
            return replace(record, cells=found)
    previous = {} if r.force else versions.reusable_rows(tracker)
    logger = get_run_logger()
    rows: list[Row] = []
    work: list[cells.Work] = []
    # Cells of one model together: one model is loaded at a time, once, in each process.
    for cell in sorted(plan.cells, key=lambda c: (c.settings.model, c.settings.revision or "")):
        keys = {p.id: row_key(cell, p, revisions[cell.key]) for p in plan.prompts}
        rows += [
            previous[keys[p.id]].reused_in(cell.key, p)
            for p in plan.prompts
            if keys[p.id] in previous
        ]
        todo = [p for p in plan.prompts if keys[p.id] not in previous]
        if todo:
            work.append(cells.Work(cell, todo, revisions[cell.key]))
        else:
            logger.info("Cell %s: all %d prompts reused", cell.key or "-", len(plan.prompts))
    pool = None
    if len(work) > 1:
        base = {
            "repo_url": commit.repo_url,
            "branch": r.branch,
            "commit_sha": commit.sha,
            "overrides": r.overrides,
            "pull_ref": pr.ref if pr else None,
        }
        pool = cells.PrefectPool.for_run(tracker, run_id, base)

    def here(item: cells.Work) -> cells.Done:
        return cells.generate(item, paths[item.cell.key], local[item.cell.key])

    done = cells.run_all(work, here, pool)
    loaded: Loaded = {
        key: {**made.loaded, "made_by": {"flow_run": made.flow_run_id, "pid": made.pid}}
        for key, made in done.items()
    }
    for made in done.values():
        rows += made.rows
    per_cell = {
        c.key: cell_metrics(
            [row for row in rows if row.cell == c.key], loaded.get(c.key, {}).get("metrics")
        )
        for c in plan.cells
    }
    tags = _check_gates(tracker, r.branch, gates, per_cell)
    return log_evaluation(
        tracker, run_id, commit, plan, rows, loaded, per_cell, revisions, tags, preview
    )


def _cell_runs(tracker: Tracker, run: Any) -> dict[str, str]:
    """Each cell's run of a version (the version's own run without a matrix)."""
    try:
        stored = versions.artifact_json(tracker, run.info.run_id, CELLS_FILE)["cells"]
    except Exception:  # an older record: every cell is the version's run
        return defaultdict(lambda: run.info.run_id)
    return {c["cell"]: c["run_id"] for c in stored}


def _check_gates(
    tracker: Tracker, branch: str, gates: list[Any], per_cell: dict[str, dict[str, float]]
) -> dict[str, str]:
    """The repository's quality gates, checked against this version's metrics (per cell, and
    their means) and those of the branch's latest version (the base); their outcome as MLflow
    tags (none without gates)."""
    if not gates:
        return {}
    base = versions.latest_version(tracker, branch)
    base_cells = versions.cell_metrics_of(tracker, base) if base is not None else None
    results = evaluate(
        gates, gate_values(per_cell), gate_values(base_cells) if base_cells else None
    )
    logger = get_run_logger()
    for result in results:
        logger.info("Gate %s: %s", "passed" if result.passed else "FAILED", result.line())
    tags = gate_tags(results)
    if base is not None:
        tags[T.GATES_BASE] = f"v{base.data.tags.get(T.VERSION, '?')}"
    return tags


def _label_flow_run(mlflow_url: str) -> None:
    """Put the MLflow run's link on the flow run, for notifications about it; best effort."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if not flow_run.id:
        return
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run_labels(flow_run.id, {T.FLOW_RUN_LABEL: mlflow_url})
    except Exception as exc:  # a convenience: the run goes on without its label
        logging.getLogger(__name__).warning("Could not label the flow run: %s", exc)


def _recover(tracker: Tracker) -> None:
    """End the runs of earlier processes that died (never blocks this run)."""
    try:
        recovery.recover_dead_runs(tracker)
    except Exception as exc:  # ending others' dead runs never blocks this run
        logging.getLogger(__name__).warning("Could not check for runs left RUNNING: %s", exc)


def _publish(record: RunRecord, params: dict[str, Any]) -> None:
    """The Prefect artifact of the run; never fails the run (its record is already complete)."""
    try:
        create_markdown_artifact(
            storable(_markdown(record, params)),
            key=FLOW_NAME,
            description=storable(record.summary()),
        )
    except Exception as exc:  # the record is complete already; the artifact is a view of it
        logging.getLogger(__name__).warning("Could not create the Prefect artifact: %s", exc)
