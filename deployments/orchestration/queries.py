"""Every Prefect API query of the service, written once, through Prefect's own client and filters.

Open one client for a pass (`client()`), then ask it: the flow runs of a deployment in given
states, a deployment by name, the runs not yet ended. (The flow's own one query, a flow run's
state by id, is `tasks.recovery.flow_run_ended`.)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tasks.names import AUTOMATIC_TRIGGERS, FLOW_NAME, MANUAL

NOT_FINAL = ("SCHEDULED", "PENDING", "RUNNING", "CANCELLING", "PAUSED")
"""Flow run states that have not ended."""


def client(api_url: str | None = None) -> Any:
    """A synchronous client (a context manager) of `api_url`, else of the API in use."""
    from prefect.client.orchestration import SyncPrefectClient, get_client

    if api_url:
        return SyncPrefectClient(api_url, httpx_settings={"timeout": 10})
    return get_client(sync_client=True)


def flow_runs(
    api: Any,
    deployment_id: Any = None,
    states: Iterable[str] = (),
    newest_first: bool = True,
    limit: int = 200,
    flow_name: str | None = None,
    parent: Any = None,
) -> list[Any]:
    """Flow runs of a deployment (a list: of any of them; or of a flow; or the subflow runs of
    the flow run `parent`), in `states` (any when empty), newest first by expected start time
    (oldest first without `newest_first`)."""
    from prefect.client.schemas import filters as F
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    wanted = [StateType(s) for s in states]
    flows = F.FlowFilter(name=F.FlowFilterName(any_=[flow_name])) if flow_name else None
    deployments = None
    if deployment_id is not None:
        ids = list(deployment_id) if isinstance(deployment_id, list | tuple) else [deployment_id]
        deployments = F.DeploymentFilter(id=F.DeploymentFilterId(any_=ids))
    runs = F.FlowRunFilter(
        state=F.FlowRunFilterState(type=F.FlowRunFilterStateType(any_=wanted)) if wanted else None,
        parent_flow_run_id=F.FlowRunFilterParentFlowRunId(any_=[parent]) if parent else None,
    )
    newest, oldest = FlowRunSort.EXPECTED_START_TIME_DESC, FlowRunSort.EXPECTED_START_TIME_ASC
    return list(
        api.read_flow_runs(
            flow_filter=flows,
            deployment_filter=deployments,
            flow_run_filter=runs if wanted or parent else None,
            sort=newest if newest_first else oldest,
            limit=limit,
        )
    )


def deployment_id(api: Any, name: str) -> Any | None:
    """The id of the deployment `nlp-text-generation/<name>`; None when there is none."""
    from prefect.exceptions import ObjectNotFound

    try:
        return api.read_deployment_by_name(f"{FLOW_NAME}/{name}").id
    except ObjectNotFound:
        return None


def commit_of(run: Any) -> str:
    """The commit a flow run is for (lower case; empty for a run of a branch's tip)."""
    return str((run.parameters or {}).get("commit_sha") or "").lower()


def automatic(run: Any) -> bool:
    """Whether a push (or the poller) started the flow run."""
    return (run.parameters or {}).get("trigger") in AUTOMATIC_TRIGGERS


def active_runs(api_url: str) -> list[dict[str, Any]]:
    """The flow runs of nlp-text-generation not yet ended, oldest first, for people."""
    base = api_url.rstrip("/").removesuffix("/api")
    with client(api_url) as api:
        found = flow_runs(api, states=NOT_FINAL, newest_first=False, flow_name=FLOW_NAME)
    rows = []
    for run in found:
        params = run.parameters or {}
        state = run.state
        row = {
            "name": run.name,
            "state": (state.name or state.type.value) if state is not None else None,
            "repository": params.get("repo_url"),
            "commit": str(params.get("commit_sha") or params.get("branch") or "")[:12],
            "trigger": params.get("trigger", MANUAL),
            "url": f"{base}/runs/flow-run/{run.id}",
        }
        rows.append(row)
    return rows
