"""The push receiver: deliveries in, accepted pushes stored in the outbox, with nothing lost.

A delivery is verified first (only the links whose secret signed it are considered further),
then parsed (`service.providers`), and kept only when it is a push to the served branch of a
served repository, or a pull request into it that a link previews. An accepted push is in the
outbox before the answer; the emitter sends it to Prefect afterwards. Deliveries are
deduplicated by delivery id (redelivery) and by repository, branch and SHA. The flow always
clones the configured repository: nothing in a payload picks what is cloned.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from deployments.service.outbox import Outbox
from deployments.service.providers import (
    PREVIEW_ACTIONS,
    PROVIDERS,
    SHA,
    PushEvent,
    authentic,
    decode,
    event_and_delivery,
    parse_pull_request,
    payload_repositories,
    push_event,
)
from tasks import config
from tasks.errors import ServeError, SettingsError
from tasks.links import Link, resolve_ref
from tasks.names import PREVIEW_TRIGGER
from tasks.repo import ZERO_SHA, RepoLocation, normalize_repo

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 5 * 1024 * 1024


@dataclass
class Verdict:
    """The HTTP answer to one delivery."""

    status: int
    body: dict[str, Any]
    push: PushEvent | None = field(default=None, repr=False)


def _ignored(reason: str) -> Verdict:
    """A delivery that starts no run, and why."""
    return Verdict(202, {"status": "ignored", "reason": reason})


def _error(status: int, error: str) -> Verdict:
    """A delivery refused: unknown, unsigned, or not what it says it is."""
    return Verdict(status, {"error": error})


@dataclass(frozen=True)
class Served:
    """A repository and branch the receiver takes pushes for, with how deliveries are checked."""

    name: str
    repo: RepoLocation
    branch: str
    secret: bytes | None = field(default=None, repr=False)
    providers: frozenset[str] = frozenset(PROVIDERS)
    """The endpoints whose deliveries may be for it (a GitLab project sends to /gitlab)."""
    previews: str = "off"
    """Pull requests that get a preview run: all, same-repo or off."""
    reports: bool = False
    """Whether results go back to the provider (the link has an API token)."""
    link: Link | None = field(default=None, repr=False, compare=False)
    token: str | None = field(default=None, repr=False, compare=False)
    """The link's API token, resolved (see `of`)."""

    @property
    def key(self) -> str:
        """The repository's comparable form."""
        return normalize_repo(self.repo.url)

    @classmethod
    def of(cls, link: Link) -> Served:
        """A link as served: its secret and API token resolved now, so a missing one fails at
        start. The token's environment variable is then removed from this process, so nothing
        it starts later (flow runs, their fork server, a Prefect server) inherits it."""
        # The local hook and the poller's moves come signed like GitHub deliveries.
        endpoint = "github" if link.provider in {"hook", "poll"} else link.provider
        forge = link.provider in PROVIDERS
        token = link.api_token() if forge else None
        if token is not None and link.token and link.token.startswith("env:"):
            os.environ.pop(link.token.removeprefix("env:"), None)
        return cls(
            link.name,
            RepoLocation.parse(link.url),
            link.branch,
            link.webhook_secret(),
            frozenset({endpoint}),
            link.previews if forge else "off",
            token is not None,
            link,
            token,
        )


class Receiver:
    """Turns deliveries into verdicts, and accepted pushes into outbox rows."""

    def __init__(
        self,
        repo: RepoLocation,
        branch: str,
        secret: bytes | None,
        outbox: Outbox,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.targets = [Served(repo.key, repo, branch, secret)]
        self.outbox = outbox
        self.max_bytes = max_bytes

    @classmethod
    def for_links(
        cls, targets: list[Served], outbox: Outbox, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> Receiver:
        """One endpoint for many linked repositories, each with its own secret."""
        if not targets:
            raise ValueError("a receiver needs at least one linked repository")
        receiver = cls(targets[0].repo, targets[0].branch, targets[0].secret, outbox, max_bytes)
        receiver.targets = list(targets)
        return receiver

    @property
    def repo(self) -> RepoLocation:
        """The first served repository (the only one of a single-repository receiver)."""
        return self.targets[0].repo

    def handle(self, provider: str, headers: Mapping[str, str], body: bytes) -> Verdict:
        """The answer to one delivery; accepted pushes are stored before this returns."""
        if provider not in PROVIDERS:
            return _error(404, f"unknown webhook provider {provider!r}; use {', '.join(PROVIDERS)}")
        h = {k.lower(): v for k, v in headers.items()}
        # Only the links whose secret signed this body are considered further: a sender that
        # knows one link's secret cannot start runs of another.
        signed = [
            t
            for t in self.targets
            if provider in t.providers and authentic(t.secret, provider, h, body)
        ]
        if not signed:
            return _error(401, "missing or invalid signature")
        event, delivery = event_and_delivery(provider, h)
        try:
            payload = decode(h, body)
        except ValueError as exc:
            return _error(400, f"body is not valid JSON: {str(exc)[:200]}")
        except RecursionError:
            return _error(400, "body is not valid JSON: nested too deeply")
        if event in {"ping", "system hook"}:
            return Verdict(200, {"status": "pong"})
        if event in {"pull_request", "merge request hook"}:
            if not isinstance(payload, dict):
                return _error(400, "pull request payload must be a JSON object")
            return self._pull_request(provider, delivery, payload, signed)
        if event not in {"push", "push hook", "tag push hook"}:
            return _ignored(f"event {event!r} starts no run")
        if not isinstance(payload, dict):
            return _error(400, "push payload must be a JSON object")
        ref = payload.get("ref")
        after = str(payload.get("after") or "").lower()
        if not isinstance(ref, str) or not SHA.match(after):
            return _error(400, "push payload needs `ref` and a 40-character `after` SHA")
        if ref.startswith("refs/tags/") or event == "tag push hook":
            return _ignored(f"tag push {ref} starts no run")
        if payload.get("deleted") is True or after == ZERO_SHA:
            return _ignored(f"branch deletion {ref} starts no run")
        on_branch = [t for t in signed if ref == f"refs/heads/{t.branch}"]
        if not on_branch:
            branches = ", ".join(sorted({t.branch for t in signed}))
            return _ignored(f"push to {ref}; this receiver serves {branches}")
        named = payload_repositories(payload)[:20]
        if not named:
            return _error(
                400,
                "push payload names no repository: expected `repository` (or `project`) as an "
                "object with clone_url, url, html_url or ssh_url",
            )
        keys = {normalize_repo(n) for n in named}
        target = next((t for t in on_branch if t.key in keys), None)
        if target is None:
            served = on_branch[0].repo.url if len(on_branch) == 1 else "other linked repositories"
            return _ignored(f"push for {named[0]}; this receiver serves {served}")
        push = push_event(provider, delivery or f"sha-{after}", ref, after, payload)
        return self._accept(push, target)

    def _accept(self, push: PushEvent, target: Served, **extra: Any) -> Verdict:
        """Store an accepted push: 202 when it is queued, 200 when it is a duplicate."""
        status, event_id = self.outbox.enqueue(
            push, target.repo, target.branch, target.name if target.reports else None
        )
        body = {"status": status, "event_id": event_id, "after": push.after, "link": target.name}
        return Verdict(202 if status == "queued" else 200, {**body, **extra}, push)

    def _pull_request(
        self, provider: str, delivery: str, payload: dict[str, Any], signed: list[Served]
    ) -> Verdict:
        """A pull request (merge request) delivery: its head previewed when a link asks."""
        try:
            pull = parse_pull_request(provider, payload)
        except ValueError as exc:
            return _error(400, str(exc))
        if pull.action not in PREVIEW_ACTIONS[provider]:
            return _ignored(f"pull request action {pull.action!r} runs no preview")
        if provider == "gitlab" and pull.action == "update" and not pull.new_commits:
            return _ignored("merge request update without new commits")
        keys = {normalize_repo(n) for n in pull.repositories[:20]}
        target = next((t for t in signed if t.key in keys and t.branch == pull.base), None)
        if target is None:
            served = ", ".join(sorted({f"{t.repo.url}@{t.branch}" for t in signed})[:5])
            named = pull.repositories[0] if pull.repositories else "an unnamed repository"
            return _ignored(
                f"pull request into {pull.base} of {named}; this receiver serves {served}"
            )
        if target.previews == "off" or (target.previews == "same-repo" and pull.fork):
            if target.link is None:
                return _ignored(
                    "no preview: only linked repositories preview their pull requests "
                    "(`textgen link add`)"
                )
            why = "previews are off" if target.previews == "off" else "it comes from a fork"
            return _ignored(f"link {target.name}: no preview, {why}")
        push = PushEvent(
            provider=provider,
            delivery=delivery or f"pr-{pull.number}-{pull.head}",
            ref=pull.ref,
            after=pull.head,
            before=None,
            changed_paths=None,
            pusher=pull.author,
            trigger=PREVIEW_TRIGGER,
            pull_request={
                "number": pull.number,
                "ref": pull.ref,
                "head_branch": pull.head_branch,
                "fork": pull.fork,
            },
            base=target.branch,
        )
        return self._accept(push, target, pull_request=pull.number)


def read_secret(secret_file: str | None, insecure: bool) -> bytes | None:
    """The webhook secret from `--secret-file` or the operator's variable; none means refuse."""
    if secret_file:
        try:
            return resolve_ref(f"file:{secret_file}", "--secret-file").encode()
        except SettingsError as exc:
            raise ServeError(str(exc)) from None
    if value := config.WEBHOOK_SECRET.get():
        return value.encode()
    if insecure:
        logger.warning(
            "Accepting unsigned webhooks (--insecure): anyone who reaches the port can start runs"
        )
        return None
    raise ServeError(
        f"no webhook secret: set {config.WEBHOOK_SECRET.name} or pass --secret-file FILE "
        "(or --insecure to accept unsigned deliveries, for a receiver only this machine can reach)"
    )
