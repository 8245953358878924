"""A version's matrix cells, generated where there is room: in the version's own flow run, and,
when its deployment has a cell deployment on a work pool (`textgen team apply` makes one per
link), on the pool's other free workers at once, as one Prefect subflow run per cell.

The version's run hands every cell but its first to the pool and generates the first itself.
Each time it is free, it takes back a cell no worker has taken yet (its flow run claimed
Pending from Scheduled, as a worker claims one, then Cancelled) and generates it too; so one
worker, or a pool whose workers are busy, makes the version as the run alone would, never
waiting on itself. A cell run whose process or worker died (Crashed: at once for a killed
process, through the zombie automation for a dead worker; or Pending for `PENDING_SECONDS`) is
handed out again, up to `ATTEMPTS` times. A cell that fails (a prompt past the model's context,
say) fails the version with the cell's error. Each cell run writes its rows into the version's
MLflow run, as `cell-runs/<flow run id>.json`; the version is recorded, as without a pool, once
every cell is in. A cell run that starts after its version's run ended does nothing; when the
version's run crashes, the reaper cancels the cell runs it left (`deployments.service.repair`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

from tasks import errors
from tasks.errors import ModelError, TextgenError
from tasks.evalset import Cell, Plan, Prompt
from tasks.evaluation import Row, row_key

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun, State

logger = logging.getLogger(__name__)

CELL_FLOW_NAME = "nlp-text-generation-cell"
CELL_ENTRYPOINT = "flows/cell.py:nlp_text_generation_cell"
"""The cell flow, as its deployments name it."""
CELL_RUNS = "cell-runs"
"""The version's MLflow run's folder where cell runs leave their rows."""
ATTEMPTS = 3
"""How many times a cell is handed out before its crashes fail the version."""
POLL_SECONDS = 1.0
"""How often the version's run reads its cell runs' states while it waits for them."""
PENDING_SECONDS = 180.0
"""A cell run Pending this long never started (its worker died as it took it): handed out
again. (A run that started is Running; one whose worker then dies is Crashed by Prefect.)"""
PAGE = 200


@dataclass
class Work:
    """One cell's prompts to generate (those no earlier version made), with their rows' keys and
    the model revision the keys were made with."""

    cell: Cell
    prompts: list[Prompt]
    revision: str

    @property
    def keys(self) -> dict[str, str]:
        return {p.id: row_key(self.cell, p, self.revision) for p in self.prompts}


@dataclass
class Done:
    """A cell's generated rows and its model's load (`params`, `metrics`), and who made them:
    the cell's flow run (empty: the version's own) and its process."""

    rows: list[Row]
    loaded: dict[str, Any]
    flow_run_id: str = ""
    pid: int = field(default_factory=os.getpid)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": [r.as_dict() for r in self.rows],
            "loaded": self.loaded,
            "flow_run_id": self.flow_run_id,
            "pid": self.pid,
        }

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> Done:
        rows = [Row.from_dict(r) for r in stored["rows"]]
        return cls(rows, stored["loaded"], stored.get("flow_run_id", ""), int(stored["pid"]))


@contextmanager
def naming(cell: Cell) -> Iterator[None]:
    """The project's errors raised for a matrix cell, saying which cell."""
    try:
        yield
    except TextgenError as exc:
        if not cell.key or str(exc).startswith(f"cell {cell.key}: "):
            raise
        raise type(exc)(f"cell {cell.key}: {exc}") from exc


def generate(work: Work, path: Any, local: str | None) -> Done:
    """Generate one cell's prompts in this process (`path`, `local`: its model's folder and
    local revision, as `tasks.model` finds them)."""
    from tasks.generate_set import generate_cell
    from tasks.model import load_generator

    with naming(work.cell):
        generator = load_generator(work.cell.settings, local, path)
        rows = generate_cell(generator, work.cell, work.prompts, work.keys)
    load = {"load_seconds": generator.load_seconds}
    if generator.load_shared_cores is not None:
        load["load_shared_cores"] = generator.load_shared_cores
    return Done(rows, {"params": generator.describe(), "metrics": load})


def find_work(plan: Plan, cell_key: str, prompt_ids: list[str], revision: str) -> Work:
    """A cell run's work, found again in the plan read at its commit."""
    cells = {c.key: c for c in plan.cells}
    if cell_key not in cells:
        raise errors.SettingsError(f"there is no cell {cell_key!r} at this commit")
    prompts = {p.id: p for p in plan.prompts}
    missing = [i for i in prompt_ids if i not in prompts]
    if missing:
        raise errors.SettingsError(f"cell {cell_key}: no prompt {missing[0]!r} at this commit")
    return Work(cells[cell_key], [prompts[i] for i in prompt_ids], revision)


def check_revision(work: Work, revision: str) -> None:
    """Refuse to generate a cell with another model than the version's run keyed it with."""
    if revision != work.revision:
        raise ModelError(
            f"cell {work.cell.key}: this worker's model is {revision}, the version's run "
            f"has {work.revision}: give every worker the same model folders"
        )


class Pool(Protocol):
    """Where cells run besides the version's own run (Prefect's, `PrefectPool`)."""

    def submit(self, work: Work, attempt: int) -> Any:
        """Start a cell run; returns its id."""

    def states(self, ids: list[Any]) -> dict[Any, tuple[str, str]]:
        """Each run's state type (`SCHEDULED`, `RUNNING`, `COMPLETED`, ...) and message."""

    def take_back(self, run_id: Any) -> bool:
        """Cancel a run no worker has taken yet; False when one has."""

    def result(self, run_id: Any) -> Done | TextgenError | None:
        """What a finished run left: its rows, its error, or nothing."""

    def cancel(self, ids: list[Any]) -> None:
        """Stop runs the version no longer waits for (best effort)."""


def run_all(
    work: list[Work],
    here: Callable[[Work], Done],
    pool: Pool | None,
    poll: float = POLL_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Done]:
    """Every cell's rows, by cell name: generated here, or on the pool (see the module)."""
    if pool is None or len(work) < 2:
        return {w.cell.key: here(w) for w in work}
    done: dict[str, Done] = {}
    out: dict[Any, Work] = {}
    attempts: dict[str, int] = {}
    pending_since: dict[Any, float] = {}

    def hand_out(item: Work) -> None:
        attempts[item.cell.key] = attempts.get(item.cell.key, 0) + 1
        out[pool.submit(item, attempts[item.cell.key])] = item

    for item in work[1:]:
        hand_out(item)
    try:
        done[work[0].cell.key] = here(work[0])
        while out:
            states = pool.states(list(out))
            # A run the pool no longer knows (deleted): as if it crashed.
            states.update({i: ("CRASHED", "its run is gone") for i in out if i not in states})
            for run_id, (state, _) in list(states.items()):
                since = pending_since.setdefault(run_id, clock()) if state == "PENDING" else None
                if since is not None and clock() - since > PENDING_SECONDS:
                    pool.cancel([run_id])
                    states[run_id] = ("CRASHED", f"Pending for {PENDING_SECONDS:g} s, not started")
            waiting = []
            for run_id, (state, message) in states.items():
                item = out[run_id]
                if state == "COMPLETED":
                    finished = pool.result(run_id)
                    if not isinstance(finished, Done):
                        raise _failed(item, finished, f"its run left no rows ({message})")
                    done[item.cell.key] = finished
                    del out[run_id]
                elif state == "CRASHED":
                    del out[run_id]
                    if attempts[item.cell.key] >= ATTEMPTS:
                        raise TextgenError(
                            f"cell {item.cell.key}: its run crashed {ATTEMPTS} times, "
                            f"last: {message}"
                        )
                    logger.warning("Cell %s: its run crashed (%s); again", item.cell.key, message)
                    hand_out(item)
                elif state in {"FAILED", "CANCELLED"}:
                    del out[run_id]
                    raise _failed(item, pool.result(run_id), f"its run {state.lower()}: {message}")
                elif state == "SCHEDULED":
                    waiting.append(run_id)
            taken = next((r for r in waiting if pool.take_back(r)), None)
            if taken is not None:
                item = out.pop(taken)
                done[item.cell.key] = here(item)
            elif out:
                sleep(poll)
    finally:
        if out:
            pool.cancel(list(out))
    return done


def _failed(item: Work, found: Done | TextgenError | None, otherwise: str) -> TextgenError:
    if isinstance(found, TextgenError):
        return found
    return TextgenError(f"cell {item.cell.key}: {otherwise}")


def error_doc(exc: BaseException) -> dict[str, Any]:
    """A cell run's failure, as it leaves it for the version's run."""
    kind = type(exc).__name__ if isinstance(exc, TextgenError) else "TextgenError"
    return {"error": {"type": kind, "message": str(exc) or repr(exc)}}


def error_of(stored: dict[str, Any]) -> TextgenError:
    """A cell run's failure, raised again in the version's run as the same kind of error."""
    kind = getattr(errors, str(stored["error"].get("type")), TextgenError)
    if not (isinstance(kind, type) and issubclass(kind, TextgenError)):
        kind = TextgenError
    return kind(str(stored["error"].get("message", "")))


class PrefectPool:
    """Cells as subflow runs of the version's flow run, on its link's cell deployment."""

    def __init__(self, deployment_id: Any, tracker: Any, run_id: str, base: dict[str, Any]) -> None:
        self.deployment_id = deployment_id
        self.tracker = tracker
        self.run_id = run_id
        self.base = base

    @classmethod
    def for_run(cls, tracker: Any, run_id: str, base: dict[str, Any]) -> PrefectPool | None:
        """The pool of this flow run's deployment's cell deployment; None when it has none
        (a run outside a deployment, `textgen serve`'s runner, a pool set up before cells)."""
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound
        from prefect.runtime import deployment

        if not deployment.id:
            return None
        try:
            with get_client(sync_client=True) as client:
                found = client.read_deployment_by_name(f"{CELL_FLOW_NAME}/{deployment.name}")
        except ObjectNotFound:
            return None
        return cls(found.id, tracker, run_id, base)

    def submit(self, work: Work, attempt: int) -> Any:
        from prefect.deployments import run_deployment

        parameters = {
            **self.base,
            "cell": work.cell.key,
            "prompt_ids": [p.id for p in work.prompts],
            "revision": work.revision,
            "into_run": self.run_id,
        }
        run = run_deployment(
            self.deployment_id,
            parameters=parameters,
            timeout=0,
            flow_run_name=f"cell-{work.cell.key}"[:200],
            # A submission retried after a lost answer makes no second run; a rerun of the
            # version's flow run (a new MLflow run) makes its own.
            idempotency_key=f"{self.run_id}:{work.cell.key}:{attempt}",
        )
        return cast("FlowRun", run).id

    def states(self, ids: list[Any]) -> dict[Any, tuple[str, str]]:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        runs = []
        with get_client(sync_client=True) as client:
            for start in range(0, len(ids), PAGE):  # the most the API gives at once
                page = ids[start : start + PAGE]
                runs += client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=page)), limit=len(page)
                )
        return {
            r.id: (
                r.state.type.value if r.state else "SCHEDULED",
                (r.state and r.state.message) or "",
            )
            for r in runs
        }

    def take_back(self, run_id: Any) -> bool:
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelled, Pending

        with get_client(sync_client=True) as client:
            # Claimed as a worker claims a run: Prefect accepts Pending only from Scheduled, so
            # either this run or one worker has it, never both.
            claim: State[Any] = Pending()
            if client.set_flow_run_state(run_id, claim).status.value != "ACCEPT":
                return False
            message = "Taken back: the version's own run generated this cell"
            taken: State[Any] = Cancelled(message=message)
            client.set_flow_run_state(run_id, taken, force=True)
        return True

    def result(self, run_id: Any) -> Done | TextgenError | None:
        from tasks.versions import artifact_json

        path = f"{CELL_RUNS}/{run_id}.json"
        for attempt in range(3):
            try:
                stored = artifact_json(self.tracker, self.run_id, path)
                break
            except Exception as exc:  # not written (the run died first), or MLflow away now
                if attempt == 2:
                    logger.warning("Could not read %s of run %s: %s", path, self.run_id, exc)
                    return None
                time.sleep(1 + attempt)
        return error_of(stored) if "error" in stored else Done.from_dict(stored)

    def cancel(self, ids: list[Any]) -> None:
        cancel_cell_runs(ids, "The version's run ended without this cell")


def cancel_cell_runs(ids: list[Any], message: str, client: Any = None) -> None:
    """Set cell runs Cancelling, saying why: Prefect ends one no worker started at once, and a
    started one's worker stops its process. Best effort: a cell run left over writes only its
    file. `client`: a synchronous Prefect client already open, else one is opened."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    with contextlib.nullcontext(client) if client else get_client(sync_client=True) as api:
        for run_id in ids:
            try:
                api.set_flow_run_state(run_id, Cancelling(message=message))
            except Exception as exc:
                logger.warning("Could not cancel cell run %s: %s", run_id, exc)
