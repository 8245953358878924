"""What a command shows on the console: one line for an expected failure, not its traceback;
and no line a user cannot act on, unless asked for with `-v`."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from tasks import config
from tasks.errors import TextgenError


class ExpectedErrors(logging.Filter):
    """Keeps an expected failure (a `TextgenError`: bad settings, unreachable repository,
    missing model) off the console: `textgen` prints its one message. Prefect's tracebacks and
    state lines about it still reach the Prefect and MLflow records, and `--verbose` shows them."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, TextgenError):
            first = str(exc).splitlines()[0] if str(exc) else ""
            self.seen.append(first[:120])
            return False
        if self.seen and record.levelno >= logging.INFO:
            try:
                text = record.getMessage()
            except Exception:  # a record whose arguments do not fit: shown, as logging would
                return True
            return not any(mark and mark in text for mark in self.seen)
        return True


QUIET_ENVIRONMENT = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' and the hub's tqdm bars
    "TQDM_DISABLE": "1",  # any other tqdm bar
    "MLFLOW_CONFIGURE_LOGGING": "false",  # MLflow's lines in this format, through these filters
}
"""For the command and every process it starts (runs, servers), unless `-v` or already set."""


def configure(verbose: bool) -> None:
    """One log format on stderr (`tasks.logs`), for the command and the processes it starts;
    without `verbose`, no chatter and no progress bars."""
    import os
    import sys

    from tasks import logs

    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(
        level=level, format=logs.FORMAT, datefmt=logs.DATE_FORMAT, stream=sys.stderr, force=True
    )
    if verbose:
        os.environ[config.VERBOSE.name] = "1"  # the runs it starts keep their chatter too
    else:
        for name, value in QUIET_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
    logs.quiet_console()


@contextlib.contextmanager
def quiet_expected_errors(enabled: bool = True) -> Iterator[None]:
    """An `ExpectedErrors` filter on every console handler (not Prefect's API handler), for
    the length of the block."""
    from prefect.logging.handlers import APILogHandler

    quiet = ExpectedErrors()
    handlers = [h for h in logging.getLogger().handlers if not isinstance(h, APILogHandler)]
    for handler in handlers if enabled else []:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)
