"""The team's warm worker: a Prefect worker type of this project's own, `textgen-warm`.

    prefect worker start --pool textgen --type textgen-warm --limit 1

Prefect finds it through the `prefect.collections` entry point (pyproject.toml), as it finds any
integration's worker. It is Prefect's process worker in every way but how a run's process
starts: the flow its job configuration names (`warm_flow`, this project's flow by default) runs
in a process forked from the worker's fork server, which imported Prefect, MLflow, torch and
transformers once and keeps the last model loaded (`deployments.service.warm`, the same start as
`textgen serve`'s runs). Each run is still a process of its own, with the run's environment
(the work pool's and the deployment's `env`, the run's deadline among them) and its state
reported to Prefect by the flow engine, as with a process worker. A deployment of the project's
matrix cell flow starts warm too. A job configuration with an empty `warm_flow`, or a run whose
deployment runs another flow, starts as the process worker starts it (`python -m
prefect.engine`).

A warm run asks the Prefect server less than a process worker's: 7 requests fewer per run,
which tests/test_workpool.py checks from the server's access log. The worker hands the run's
process what it already read for the run's job configuration (the flow, the deployment, the
work pool, and the work queue, read once), for the related resources Prefect attaches to the
run's events (`Known`), which a fresh process reads again; and, when neither Prefect's settings
nor the server name a default result storage (the server's answer is read at most once a
minute), the flow's result storage is the local storage path it would default to, which each
of the run's tasks otherwise asks the server for (`GET /api/admin/storage`).

When a run's process dies (SIGKILL, the kernel's OOM killer), the worker sees it at once: Prefect's
executor marks the flow run Crashed, which frees the deployment's slot, and the worker ends the
run's MLflow runs FAILED with the reason (or publishes the one that held its number), so the
receiver's reaper can start the push again, and holds its slot for `CRASH_PAUSE_SECONDS`, so that
another worker, when one is free, takes the retry.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from prefect.workers.process import (
    ProcessJobConfiguration,
    ProcessVariables,
    ProcessWorker,
    ProcessWorkerResult,
)
from pydantic import Field, PrivateAttr

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun
    from prefect.runner._control_channel import ControlChannel

logger = logging.getLogger(__name__)

TYPE = "textgen-warm"
FLOW = "flows.text_generation:nlp_text_generation"
"""The flow a warm worker runs warm, as `module:attribute`: by default, this project's."""
WARM_FLOWS = {
    "flows/text_generation.py:nlp_text_generation": FLOW,
    "flows/cell.py:nlp_text_generation_cell": "flows.cell:nlp_text_generation_cell",
}
"""This project's flows, as their deployments name them, and as the warm process imports them:
the version's and its matrix cells'."""
CRASH_PAUSE_SECONDS = 15.0
"""How long a worker whose run's process died waits before it takes another run."""
STORAGE_SECONDS = 60.0
"""How long a worker keeps the server's answer to "which default result storage?"."""
RESULT_SETTINGS = ("PREFECT_RESULTS_", "PREFECT_LOCAL_STORAGE_PATH", "PREFECT_HOME")
"""A run whose environment sets one of these resolves its result storage as Prefect does."""


class WarmJobConfiguration(ProcessJobConfiguration):
    """The process worker's job configuration, and the flow to run warm."""

    warm_flow: str = Field(default=FLOW)
    _read: dict[str, Any] = PrivateAttr(default_factory=dict)
    """What the worker read to prepare it (the run's flow, deployment and work pool), by the
    keys Prefect's event client caches them under (`Known`)."""

    def prepare_for_flow_run(
        self,
        flow_run: FlowRun,
        deployment: Any = None,
        flow: Any = None,
        work_pool: Any = None,
        worker_name: str | None = None,
        worker_id: Any = None,
    ) -> None:
        super().prepare_for_flow_run(
            flow_run, deployment, flow, work_pool, worker_name, worker_id=worker_id
        )
        read = {
            f"flow.{getattr(flow, 'id', '')}": flow,
            f"deployment.{getattr(deployment, 'id', '')}": deployment,
            f"work-pool.{getattr(work_pool, 'name', '')}": work_pool,
        }
        self._read = {key: found for key, found in read.items() if found is not None}


class Known:
    """A flow run's `on_running` hook that gives Prefect's event client, in the run's process,
    the objects the worker already read, by the keys it caches them under
    (`prefect.events.related`): the run's events then name their flow, deployment, work queue
    and work pool without reading them again."""

    def __init__(self, objects: dict[str, Any]) -> None:
        self.objects = objects

    def __call__(self, *_: Any) -> None:
        from datetime import UTC, datetime

        from prefect.events import related

        at: Any = datetime.now(UTC)  # when cached: the oldest goes first when full
        for key, found in self.objects.items():
            related.RESOURCE_CACHE.setdefault(
                key, ({"kind": key.split(".", 1)[0], "object": found}, at)
            )


class WarmVariables(ProcessVariables):
    """The process worker's job variables, and the flow to run warm."""

    warm_flow: str = Field(
        default=FLOW,
        title="Flow run warm",
        description=(
            "The flow (module:attribute) whose runs start forked from the worker's warm "
            "process; empty: every run starts in a fresh interpreter, as a process worker's."
        ),
    )


class WarmStarter:
    """Starts a flow run's process with `warm.launch` (Prefect's `ProcessStarter` contract:
    hand over the handle, then wait for the process to exit)."""

    def __init__(self, flow: Any, env: dict[str, str | None], control: ControlChannel) -> None:
        self.flow = flow
        self.env = env
        self.control = control

    async def start(
        self,
        flow_run: FlowRun,
        task_status: anyio.abc.TaskStatus[Any] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        from prefect.runner._process_manager import ProcessHandle

        from deployments.service import warm

        env = dict(self.env)
        registered = False
        try:
            port, token = self.control.register(flow_run.id)
        except RuntimeError:  # no loopback listener: cancellation falls back to a kill
            pass
        else:
            env.update(PREFECT__CONTROL_PORT=str(port), PREFECT__CONTROL_TOKEN=token)
            registered = True
        handed_off = False
        try:
            process = warm.launch(self.flow, flow_run=flow_run, env=env)
            task_status.started(ProcessHandle(process))
            handed_off = True
            await anyio.to_thread.run_sync(process.join)
        except BaseException:
            if registered and not handed_off:
                self.control.unregister(flow_run.id)
            raise


class WarmWorker(ProcessWorker):
    """Prefect's process worker, starting this project's runs warm."""

    type = TYPE
    job_configuration = WarmJobConfiguration
    job_configuration_variables = WarmVariables  # type: ignore[assignment]
    _description = (
        "Runs nlp-text-generation's flow runs as processes forked from a warm one that has "
        "imported the stack and keeps the last model loaded."
    )
    _display_name = "textgen (warm)"
    _documentation_url = "https://github.com/nlp-text-generation/nlp-text-generation#team"

    async def setup(self) -> None:
        await super().setup()
        from deployments.service import warm

        self._warm = await anyio.to_thread.run_sync(lambda: warm.enable(runner=False))
        if self._warm:
            self._logger.info("Runs start warm: forked from a process that imported the stack")
        else:
            self._logger.info("Warm starts are off: runs start as a process worker's do")

    async def teardown(self, *exc_info: Any) -> None:
        try:
            await super().teardown(*exc_info)
        finally:
            from deployments.service import warm

            warm.stop()

    async def run(
        self,
        flow_run: FlowRun,
        configuration: WarmJobConfiguration,  # type: ignore[override]
        task_status: anyio.abc.TaskStatus[int] | None = None,
    ) -> ProcessWorkerResult:
        flow = await self._warm_flow(flow_run, configuration)
        if flow is None:
            return await super().run(flow_run, configuration, task_status)
        flow = await self._told(flow, flow_run, configuration)
        from prefect.runner._flow_run_executor import FlowRunExecutorContext

        task_status = task_status or anyio.TASK_STATUS_IGNORED
        env = dict(configuration.env)
        async with FlowRunExecutorContext() as context:
            starter = WarmStarter(flow, env, context.control_channel)

            async def resolve(_: FlowRun) -> Any:
                return flow

            executor = context.create_executor(
                flow_run, starter, resolve_flow=resolve, propose_submitting=False
            )
            execution = None

            async def execute(*, task_status: anyio.abc.TaskStatus[Any]) -> None:
                nonlocal execution
                execution = await executor.submit(task_status=task_status)

            async with anyio.create_task_group() as group:
                handle = await group.start(execute)
                task_status.started(handle.pid)
        if execution is None or execution.status_code is None:
            raise RuntimeError("Failed to start flow run process.")
        if execution.status_code != 0:
            reason = _died(execution.status_code, execution.handle.pid)
            await asyncio.to_thread(_end_mlflow_runs, flow_run, reason)
            # A process killed here (by the OOM killer, say) would likely be killed again here:
            # the slot is held a while, so that the retry goes to another worker if one is free.
            await anyio.sleep(CRASH_PAUSE_SECONDS)
        return ProcessWorkerResult(
            status_code=execution.status_code, identifier=str(execution.handle.pid)
        )

    async def _told(self, flow: Any, flow_run: FlowRun, configuration: WarmJobConfiguration) -> Any:
        """The flow to start, given what the run's process would otherwise ask the server:
        the objects its events name (`Known`), and its default result storage."""
        objects = dict(configuration._read)
        if flow_run.work_queue_id is not None:
            queue = await self._work_queue(flow_run.work_queue_id)
            objects[f"work-queue.{queue.id}"] = queue
        options: dict[str, Any] = {"on_running": [*flow.on_running_hooks, Known(objects)]}
        if flow.result_storage is None and (
            storage := await self._local_result_storage(configuration)
        ):
            from prefect.settings import get_current_settings

            # As Prefect defaults them: persisted by the setting, in its local storage path.
            options["result_storage"] = storage
            options["persist_result"] = (
                flow.persist_result
                if flow.persist_result is not None
                else get_current_settings().results.persist_by_default
            )
        return flow.with_options(**options)

    async def _work_queue(self, queue_id: Any) -> Any:
        """A work queue of the pool, read once (its events name it; nothing else is used)."""
        queues: dict[Any, Any] = self.__dict__.setdefault("_queues", {})
        if queue_id not in queues:
            queues[queue_id] = await self.client.read_work_queue(queue_id)
        return queues[queue_id]

    async def _local_result_storage(self, configuration: WarmJobConfiguration) -> Path | None:
        """The local storage path Prefect would store a run's results in by default; None when
        it would use a storage block (set in Prefect's settings or on the server), or when the
        run's environment sets where results go (then the run resolves it as Prefect does)."""
        from prefect.settings import get_current_settings

        if any(name.startswith(RESULT_SETTINGS) for name in configuration.env):
            return None
        settings = get_current_settings().results
        if settings.default_storage_block is not None:
            return None
        read_at, block = self.__dict__.get("_server_storage", (float("-inf"), None))
        if time.monotonic() - read_at > STORAGE_SECONDS:
            try:
                answer = await self.client.read_server_default_result_storage()
            except Exception:  # as Prefect does when it cannot ask: its own lookup decides
                return None
            block = answer.default_result_storage_block_id
            self.__dict__["_server_storage"] = (time.monotonic(), block)
        return None if block is not None else Path(settings.local_storage_path)

    async def _warm_flow(self, flow_run: FlowRun, configuration: WarmJobConfiguration) -> Any:
        """The flow object to start warm, or None to start the run as a process worker does:
        warm starts off, no flow named, or a run of a deployment of another flow."""
        if not getattr(self, "_warm", False) or not configuration.warm_flow:
            return None
        target = configuration.warm_flow
        if target == FLOW and flow_run.deployment_id is not None:
            entrypoints: dict[Any, str | None] = self.__dict__.setdefault("_entrypoints", {})
            if flow_run.deployment_id not in entrypoints:
                deployment = await self.client.read_deployment(flow_run.deployment_id)
                entrypoints[flow_run.deployment_id] = deployment.entrypoint
            found = WARM_FLOWS.get(entrypoints[flow_run.deployment_id] or "")
            if found is None:
                return None
            target = found
        module, _, name = target.partition(":")
        return getattr(importlib.import_module(module), name)


def _died(status: int, pid: int | None) -> str:
    """Why a run's process ended without finishing the run."""
    import signal

    if status < 0 or status > 128:
        number = -status if status < 0 else status - 128
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return f"its process {pid} was killed by {name} (seen by its worker at once)"
    return f"its process {pid} exited with status {status} without ending the run"


def _end_mlflow_runs(flow_run: FlowRun, reason: str) -> None:
    """End the MLflow runs the dead process left RUNNING; a failure here is the reaper's to
    retry, never the worker's end."""
    from tasks import recovery

    try:
        repo = flow_run.parameters.get("repo_url")
        ended = recovery.end_runs_of_flow_run(repo, flow_run.id, reason) if repo else 0
    except Exception as exc:  # the MLflow server away: the reaper ends them later
        logger.warning("Could not end the MLflow runs of flow run %s: %s", flow_run.name, exc)
        return
    if ended:
        logger.warning("Flow run %s: %s; ended its %d MLflow run(s)", flow_run.name, reason, ended)
