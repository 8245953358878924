"""The flow's Prefect deployments, declared once for every way it is served: their event
triggers, their one-run-at-a-time concurrency, and the set-up of a work pool's deployments
(`textgen team apply`, what `deployments/prefect.yaml` declares for `prefect deploy`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from deployments.orchestration import queries
from deployments.orchestration.automations import apply_automations
from tasks import config
from tasks.cells import CELL_ENTRYPOINT
from tasks.links import Link
from tasks.names import PREVIEW_TRIGGER, PULL_REQUEST_EVENT, PUSH_EVENT

logger = logging.getLogger(__name__)

PROJECT = Path(__file__).resolve().parents[2]
ENTRYPOINT = "flows/text_generation.py:nlp_text_generation"
LINK_TAG = "textgen-link"


def triggers(repo_url: str, branch: str) -> list[Any]:
    """Every trigger of a link's deployment: a `git.push` event for this repository and branch,
    and a `git.pull_request` event for a pull request into it (its preview)."""
    from prefect.events import DeploymentEventTrigger

    repository = {"git.repository": repo_url, "git.branch": branch}
    match: dict[str, Any] = {"prefect.resource.id": "git.repo.*", **repository}
    push = {
        "commit_sha": "{{ event.payload.after }}",
        "before": "{{ event.payload.before }}",
        "changed_paths": "{{ event.payload.changed_paths }}",
        "trigger": "{{ event.payload.trigger }}",
    }
    preview = {
        "commit_sha": "{{ event.payload.after }}",
        "trigger": PREVIEW_TRIGGER,
        "pull_request": "{{ event.payload.pull_request }}",
    }

    def on(event: str, name: str, parameters: dict[str, str]) -> Any:
        return DeploymentEventTrigger(name=name, expect={event}, match=match, parameters=parameters)

    return [
        on(PUSH_EVENT, f"{PUSH_EVENT} to {branch}", push),
        on(PULL_REQUEST_EVENT, f"{PULL_REQUEST_EVENT} into {branch}", preview),
    ]


def one_at_a_time() -> Any:
    """One run at a time per repository and branch; further pushes wait their turn."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    return ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def add_to_runner(runner: Any, repo_url: str, branch: str, name: str) -> Any:
    """Register the on-push deployment with a runner, which then runs it from this process's
    flow object (as `flow.serve` does); returns the deployment's id."""
    from prefect.deployments.runner import EntrypointType

    from flows.text_generation import nlp_text_generation

    return runner.add_flow(
        nlp_text_generation,
        name=name,
        parameters={"repo_url": repo_url, "branch": branch},
        triggers=triggers(repo_url, branch),
        concurrency_limit=one_at_a_time(),
        description=f"Text generation for every push to {branch} of {repo_url}",
        tags=["textgen", "on-push"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def apply_links(
    links: list[Link],
    pool: str,
    zombie_seconds: float = 60,
    notify_url: str | None = None,
    mlflow_ui: str = "",
    pool_type: str = "process",
    job_template: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Create the work pool (of `pool_type`, with its workers' `job_template`) if missing, one
    deployment per link (and remove those of links that were removed), and the automations.
    Returns each link's deployment id by name."""
    from prefect import Flow
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags
    from prefect.exceptions import ObjectAlreadyExists

    with queries.client() as client:
        try:
            client.create_work_pool(
                WorkPoolCreate(name=pool, type=pool_type, base_job_template=job_template or {})
            )
        except ObjectAlreadyExists:
            existing = client.read_work_pool(pool)
            if existing.type != pool_type:
                logger.warning(
                    "Work pool %s is of type %s, not %s: its workers start runs as that type "
                    "does (`prefect work-pool delete %s`, then apply again, to change it)",
                    pool,
                    existing.type,
                    pool_type,
                    pool,
                )
    flow = Flow.from_source(source=str(PROJECT), entrypoint=ENTRYPOINT)
    cell_flow = Flow.from_source(source=str(PROJECT), entrypoint=CELL_ENTRYPOINT)
    ids: dict[str, Any] = {}
    kept = set()
    for link in links:
        # The flow checks every run against its link: no parameter can make it clone another
        # repository. References only: the worker resolves them in its own environment.
        # Both deployments of a link: its pool, its link's env, and nothing to build or push.
        shared: dict[str, Any] = {
            "name": link.name,
            "work_pool_name": pool,
            "job_variables": {"env": {config.LINK.name: link.public_json()}},
            "build": False,
            "push": False,
            "print_next_steps": False,
        }
        ids[link.name] = flow.deploy(  # type: ignore[union-attr]
            parameters={"repo_url": link.url, "branch": link.branch},
            triggers=triggers(link.url, link.branch),
            concurrency_limit=one_at_a_time(),
            description=f"Text generation for every push to {link.branch} of {link.url}",
            tags=["textgen", "on-push", LINK_TAG],
            **shared,
        )
        # Its matrix cells, on the pool's free workers while the version's run makes its own
        # (tasks.cells): no trigger, no limit but the workers'.
        kept.add(
            cell_flow.deploy(  # type: ignore[union-attr]
                description=f"Matrix cells of the versions of {link.url}@{link.branch}",
                tags=["textgen", "cells", LINK_TAG],
                **shared,
            )
        )
    kept |= set(ids.values())
    with queries.client() as client:
        tagged = DeploymentFilter(tags=DeploymentFilterTags(all_=[LINK_TAG]))
        found: list[Any] = []
        page = 200  # the most the API gives at once
        while len(found) % page == 0:
            batch = client.read_deployments(deployment_filter=tagged, limit=page, offset=len(found))
            found += batch
            if not batch:
                break
        for deployment in found:
            if deployment.id not in kept:
                client.delete_deployment(deployment.id)
                logger.info("Removed the deployment of unlinked %s", deployment.name)
        apply_automations(client, zombie_seconds, notify_url, mlflow_ui)
    return ids
