"""One log format for every process of the project, and the library lines a user cannot act on.

The commands (`deployments.cli.console.configure`) and the flow's run processes (which Prefect's
own logging set-up configures) both print `FORMAT`, Prefect's own layout, so serve's log reads as
one; without `-v` (`VERBOSE`), `Chatter` keeps library notices off the console. The records sent
to the Prefect API are never filtered.
"""

from __future__ import annotations

import logging
import sys

from tasks import config

FORMAT = "%(asctime)s.%(msecs)03d | %(levelname)-7s | %(name)s - %(message)s"
DATE_FORMAT = "%H:%M:%S"

CHATTER = (
    "Finished in state Completed()",  # Prefect, after every task: the next line says as much
    "Starting temporary server on",  # Prefect's own server for one command
    "Stopping temporary server on",
    "Creating initial MLflow database tables",  # MLflow, on a new store
    "Updating database tables",
)
"""Library messages (at INFO) that say nothing a user can act on."""

QUIET_LOGGERS = ("httpx", "httpcore", "alembic", "mlflow.store.db.utils", "uvicorn.access")
"""Loggers whose INFO lines are chatter too: kept to warnings unless `-v`."""


class Chatter(logging.Filter):
    """Keeps `CHATTER` off a console handler; warnings and errors always pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        try:
            return not record.getMessage().startswith(CHATTER)
        except Exception:  # a record whose arguments do not fit: shown, as logging would
            return True


def console_handlers() -> list[logging.Handler]:
    """The handlers that print to the console (stderr or stdout), on the root and Prefect's
    loggers; not Prefect's API handler, nor one that writes anywhere else."""
    found: list[logging.Handler] = []
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            stream = getattr(handler, "stream", None)
            console = stream is not None and stream in (sys.stderr, sys.stdout)
            if isinstance(handler, logging.StreamHandler) and console and handler not in found:
                found.append(handler)
    return found


def quiet_console() -> None:
    """The console handlers in place print `FORMAT`, without chatter unless `VERBOSE`."""
    verbose = bool(config.VERBOSE.get())
    for handler in console_handlers():
        if not verbose and not any(isinstance(f, Chatter) for f in handler.filters):
            handler.addFilter(Chatter())
        if not isinstance(handler.formatter, _Prefect):
            handler.setFormatter(_Prefect())
    if not verbose:
        for noisy in QUIET_LOGGERS:
            logging.getLogger(noisy).setLevel(logging.WARNING)


class _Prefect(logging.Formatter):
    """`FORMAT`; a Prefect run's record keeps the flow or task run's name in front of its
    message, as Prefect's own format shows it."""

    def __init__(self) -> None:
        super().__init__(FORMAT, DATE_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        run = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        if run and record.name.startswith("prefect."):
            kind = "Task run" if getattr(record, "task_run_name", None) else "Flow run"
            original = record.name
            record.name = f"{kind} {run!r}"
            try:
                return super().format(record)
            finally:
                record.name = original
        return super().format(record)
