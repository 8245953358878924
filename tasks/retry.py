"""Waiting between attempts, written once: an exponential backoff, and a call retried with it.
Prefect tasks retry through Prefect's own `retries`; this is for the loops outside a task (the
MLflow store's first opening, a version number's allocation, the receiver's threads)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass
class Backoff:
    """Delays of `first`, `first * factor`, ... up to `cap` seconds."""

    first: float
    cap: float
    factor: float = 2.0
    delay: float = 0.0
    """The delay last handed out (0 before the first, and after `reset`)."""

    def next(self) -> float:
        """The next delay: longer than the last one, up to the cap."""
        self.delay = min(self.cap, max(self.first, self.delay * self.factor))
        return self.delay

    def reset(self) -> None:
        """Start again from `first` (the thing waited on works again)."""
        self.delay = 0.0

    def after(self, attempts: int) -> float:
        """The delay after `attempts` failed attempts, for a count kept elsewhere."""
        return float(min(self.cap, self.first * self.factor ** max(0, attempts - 1)))


def retry(
    call: Callable[[], T],
    retry_on: Callable[[Exception], bool],
    backoff: Backoff,
    attempts: int | None = None,
    seconds: float | None = None,
    on_retry: Callable[[Exception, float], None] | None = None,
) -> T:
    """`call()`, again after each failure that `retry_on` accepts, waiting `backoff` between
    attempts, for at most `attempts` attempts and `seconds` seconds; the last failure is raised.
    `on_retry(exc, delay)` hears of each retry (to log it)."""
    deadline = None if seconds is None else time.monotonic() + seconds
    made = 0
    while True:
        made += 1
        try:
            return call()
        except Exception as exc:
            out_of_attempts = attempts is not None and made >= attempts
            out_of_time = deadline is not None and time.monotonic() > deadline
            if not retry_on(exc) or out_of_attempts or out_of_time:
                raise
            delay = backoff.next()
            if on_retry is not None:
                on_retry(exc, delay)
            time.sleep(delay)
