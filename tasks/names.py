"""The names the parts of the project agree on: the flow and its default deployment, what starts a
run (the flow's `trigger` parameter), the Prefect events the receiver emits, and how a flow run's
state message says that a push made no run. The CLI imports it at start-up: it imports nothing."""

from __future__ import annotations

FLOW_NAME = "nlp-text-generation"
DEFAULT_DEPLOYMENT = "on-push"

MANUAL = "manual"
PUSH = "push"
POLL = "poll"
PREVIEW_TRIGGER = "preview"
"""The trigger of a pull request's preview run: recorded, compared, never a numbered version."""
AUTOMATIC_TRIGGERS = frozenset({PUSH, POLL})
"""Runs a push started: they honour the workflow specs and are superseded by newer pushes."""

PUSH_EVENT = "git.push"
PULL_REQUEST_EVENT = "git.pull_request"
"""The Prefect events the receiver emits and the deployments' triggers expect."""

SUPERSEDED = "Superseded"
SKIPPED = "Skipped"
"""How the message of a flow run's state starts when a push made no run: it names no state
(Prefect's deployment page hides states of custom names), so the message says it."""


def is_superseded(message: str | None) -> bool:
    """Whether a flow run's state message says a newer push superseded it."""
    return (message or "").startswith(SUPERSEDED)
