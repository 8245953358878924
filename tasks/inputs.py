"""The flow's first two stages as Prefect tasks: fetch the commit (`tasks.repo`), then read and
validate its settings (`tasks.settings`). Those two modules import no Prefect, so the commands
that only read versions start without it."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.errors import TransientRepositoryError
from tasks.evalset import Plan, load_plan
from tasks.repo import CommitInfo, RepoLocation, resolve_commit


def _is_transient(task: object, task_run: object, state: object) -> bool:
    """Retry only failures that a later attempt can fix (an unreachable remote)."""
    try:
        state.result()  # type: ignore[attr-defined]
    except Exception as exc:
        return isinstance(exc, TransientRepositoryError)
    return False


@task(
    name="fetch-repo-commit",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=_is_transient,
    cache_policy=NO_CACHE,
)
def fetch_repo_commit(
    repo_url: str,
    branch: str = "main",
    commit_sha: str | None = None,
    refresh: bool = False,
    pull_ref: str | None = None,
) -> CommitInfo:
    """Resolve the commit to run (a short SHA too, or the tip of `branch`) in a cached mirror;
    `refresh` and `pull_ref` as in `resolve_commit`."""
    location = RepoLocation.parse(repo_url)
    commit = resolve_commit(location, branch, commit_sha, refresh, pull_ref)
    logger = get_run_logger()
    logger.info(
        "Resolved %s@%s to %s (%s): %s",
        location.url,
        commit_sha or branch,
        commit.sha,
        commit.author,
        commit.message.splitlines()[0] if commit.message else "",
    )
    if not commit.on_branch and pull_ref is None:
        logger.warning("Commit %s is not on branch %r of %s", commit.sha, branch, location.url)
    return commit


@task(name="read-settings", cache_policy=NO_CACHE)
def read_settings(commit: CommitInfo, overrides: dict[str, Any] | None = None) -> Plan:
    """Read and validate the settings at the commit, with their prompt set and matrix; fail
    before any model is loaded."""
    plan = load_plan(commit, overrides)
    settings = plan.settings
    logger = get_run_logger()
    if choice := settings.model_choice:
        logger.info(
            "Generating with this machine's model %s (set by %s) in place of the settings' %s",
            settings.model,
            choice["model.set_by"],
            choice["model.requested"],
        )
    logger.info(
        "Settings from %s at %s%s: %s",
        plan.source,
        commit.short_sha,
        f" with overrides {sorted(overrides)}" if overrides else "",
        settings.pipeline_kwargs() | {"model": settings.model, "random_seed": settings.random_seed},
    )
    if plan.evaluation:
        logger.info(
            "Evaluation set: %d prompts (from %s) x %d cells%s",
            len(plan.prompts),
            plan.prompts_source,
            len(plan.cells),
            f": {'; '.join(c.key for c in plan.cells)}" if plan.matrix else "",
        )
    return plan
