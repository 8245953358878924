"""The emitter: drains the outbox into the Prefect API, in order, retrying while it is away.

An event the API takes (2xx) is marked sent; one it refuses for good (a 4xx that waiting cannot
heal) is kept as `refused`, so it holds up no later push; anything else is retried with backoff.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from deployments.orchestration import queries
from deployments.service.outbox import Outbox
from tasks.retry import Backoff

logger = logging.getLogger(__name__)

PRUNE_SECONDS = 3600.0


def post_events(events: list[dict[str, Any]]) -> None:
    """Send events to the Prefect API over HTTP, raising unless they were taken (2xx)."""
    with queries.client() as client:
        response = client.request("POST", "/events", json=events)
        response.raise_for_status()


def _refused(exc: Exception) -> bool:
    """Whether the API answered that it will never take this event (a 4xx other than a
    timeout or rate limit): retrying cannot help, and it must not hold up later pushes."""
    import httpx

    if not isinstance(exc, httpx.HTTPStatusError):
        return False
    status = exc.response.status_code
    return 400 <= status < 500 and status not in {401, 403, 404, 408, 409, 425, 429}


class Emitter(threading.Thread):
    """Drains the outbox into Prefect, retrying with backoff while the API is unreachable."""

    def __init__(
        self,
        outbox: Outbox,
        send: Callable[[list[dict[str, Any]]], None] = post_events,
        after_send: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(name="textgen-emitter", daemon=True)
        self.outbox = outbox
        self.send = send
        self.after_send = after_send
        self.stopping = threading.Event()
        self.backoff = Backoff(first=0.5, cap=30.0)
        self.pruned_at = 0.0

    def run(self) -> None:
        """Loop until stopped."""
        while not self.stopping.is_set():
            self.outbox.wake.clear()
            if time.monotonic() - self.pruned_at > PRUNE_SECONDS:
                self.pruned_at = time.monotonic()
                try:
                    if pruned := self.outbox.prune():
                        logger.info("Outbox: forgot %d handled deliveries", pruned)
                except Exception:  # the thread must not die; pruning is tried again in an hour
                    logger.exception("Outbox pruning failed; trying again in an hour")
            try:
                sent = self.drain()
            except Exception:  # the thread must not die; the events stay in the outbox
                logger.exception("Sending the outbox's events failed; retrying in 5 s")
                sent = False
            if sent and self.after_send is not None:
                try:
                    self.after_send()
                except Exception:  # the thread must not die; the next send tries it again
                    logger.exception("The step after sending the outbox's events failed")
            self.outbox.wake.wait(self.backoff.delay or 5.0)

    def drain(self) -> bool:
        """Send every pending event in order; stop at the first failure. True if any was sent."""
        sent = False
        for provider, delivery, event in self.outbox.pending():
            sha = event["payload"]["after"][:7]
            try:
                self.send([event])
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                if _refused(exc):
                    self.outbox.mark(provider, delivery, error, True)
                    logger.error(
                        "Prefect API refused the push event for %s (%s); it will not run. "
                        "The delivery is kept in the outbox as refused",
                        sha,
                        exc,
                    )
                    continue
                self.outbox.mark(provider, delivery, error)
                logger.warning(
                    "Prefect API did not take the push event for %s (%s); retrying in %.1f s",
                    sha,
                    exc,
                    self.backoff.next(),
                )
                return sent
            self.outbox.mark(provider, delivery, None)
            self.backoff.reset()
            sent = True
            branch = event["payload"]["branch"]
            logger.info("Emitted %s for %s@%s (delivery %s)", event["event"], branch, sha, delivery)
        return sent
