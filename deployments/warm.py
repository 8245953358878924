"""Warm starts for the runs `textgen serve` executes.

Prefect's runner starts each served run in a fresh interpreter (multiprocessing's `spawn`),
which then imports Prefect, MLflow, torch and transformers again: about four seconds before
the flow does anything, on every run. Here the runner's starter (the module-level
`run_flow_in_subprocess` that Prefect's `DirectSubprocessStarter` documents as its override
point) starts runs with multiprocessing's `forkserver` instead: one single-threaded server
process imports those libraries once, and each run is a fork of it. Runs stay isolated in
processes of their own, cancellable and crash-contained as before.

`TEXTGEN_WARM_START=0` turns this off.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.forkserver
import os
import threading
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

PRELOAD = (
    "flows.text_generation",
    "mlflow",
    "mlflow.data.pandas_dataset",
    "mlflow.store.tracking.sqlalchemy_store",
    "pandas",
    "torch",
    "transformers",
    "transformers.pipelines",
)

_lock = threading.Lock()


class _ForkingMultiprocessing:
    """Stands in for the `multiprocessing` module inside Prefect's flow engine, for one call:
    asked for the `spawn` context, it gives the fork server's."""

    def __init__(self, context: Any) -> None:
        self._context = context

    def __getattr__(self, name: str) -> Any:
        return getattr(multiprocessing, name)

    def get_context(self, method: str | None = None) -> Any:
        return self._context if method == "spawn" else multiprocessing.get_context(method)


def enabled() -> bool:
    """Whether warm starts are on (`TEXTGEN_WARM_START`, default on)."""
    return os.environ.get("TEXTGEN_WARM_START", "1").strip().lower() not in {"0", "false", "no"}


def enable(preload: Sequence[str] = PRELOAD) -> bool:
    """Start the fork server (importing `preload` there) and route served runs through it.

    Returns False, leaving Prefect's own starter in place, where forkserver is unavailable.
    """
    if not enabled() or "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    import prefect.flow_engine as engine
    import prefect.runner._starter_direct as starter

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    multiprocessing.forkserver.ensure_running()  # import once now: the first run is warm too
    real = engine.run_flow_in_subprocess
    shim = _ForkingMultiprocessing(context)

    def run_flow_in_warm_process(*args: Any, **kwargs: Any) -> Any:
        with _lock:
            engine.multiprocessing = shim  # type: ignore[assignment]
            try:
                return real(*args, **kwargs)
            finally:
                engine.multiprocessing = multiprocessing

    starter.run_flow_in_subprocess = run_flow_in_warm_process
    logger.info("Runs start warm: forked from a server that imported %s", ", ".join(preload))
    return True
