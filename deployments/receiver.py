"""The push receiver: webhooks in, `git.push` Prefect events out, with nothing lost in between.

- `POST /webhooks/github` (also `/webhooks/gitea`, `/webhooks/gitlab`) verifies the delivery
  (`X-Hub-Signature-256`: HMAC-SHA256 over the raw body, compared in constant time; GitLab:
  `X-Gitlab-Token`), parses it, and keeps only pushes to the served branch of the served
  repository.
- An accepted push is written to a durable outbox (SQLite) before the 202 answer, and emitted to
  the Prefect API afterwards, retried until it is taken: a Prefect server that is down or
  restarting loses no accepted push.
- Deliveries are deduplicated by delivery id (redelivery) and by repository, branch and SHA.
- The flow always clones the configured repository: nothing in a payload picks what is cloned.

The local git hook (deployments/hook.py) and the poller below send the same event.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from tasks.links import Link
from tasks.repo import ZERO_SHA, RepoLocation, normalize_repo

logger = logging.getLogger(__name__)

EVENT_NAME = "git.push"
PULL_REQUEST_EVENT = "git.pull_request"
PREVIEW_ACTIONS = {
    "github": {"opened", "synchronize", "reopened"},
    "gitea": {"opened", "synchronized", "synchronize", "reopened"},
    "gitlab": {"open", "reopen", "update"},
}
"""The pull request actions that (re)run its preview: a new head, or the request (re)opened."""
PROVIDERS = ("github", "gitea", "gitlab")
DEFAULT_MAX_BYTES = 5 * 1024 * 1024
MAX_CONNECTIONS = 64
CONNECTION_SECONDS = 30.0
BODY_SECONDS = 20.0
MAX_EVENT_BYTES = 64 * 1024
"""Events stay far below the Prefect server's limit (PREFECT_SERVER_EVENTS_MAXIMUM_SIZE_BYTES,
1.5 MB by default), which it enforces by dropping the event after answering 2xx."""
RETENTION_SECONDS = 14 * 86400
_SHA = re.compile(r"^[0-9a-f]{40}$")
_EVENT_NAMESPACE = uuid.UUID("6f1c3a52-8d7e-4f43-9a55-2c1f0e6b7d10")
# GitHub and Gitea list at most 20 commits in a push payload; GitLab says how many there were.
_GITHUB_COMMIT_CAP = 20


@dataclass(frozen=True)
class PushEvent:
    """One push to the served branch, as the flow needs it."""

    provider: str
    delivery: str
    ref: str
    after: str
    before: str | None
    changed_paths: list[str] | None
    forced: bool = False
    pusher: str = ""
    trigger: str = "push"
    pull_request: dict[str, Any] | None = None
    """For a pull request's head (trigger `preview`): number, ref, head_branch, fork."""
    base: str | None = None
    """For a pull request: the branch it targets (its `ref` is the pull request's head)."""

    @property
    def branch(self) -> str:
        """The branch name of `refs/heads/<branch>` (for a pull request, its base branch)."""
        return self.base or self.ref.removeprefix("refs/heads/")

    @property
    def event_name(self) -> str:
        """`git.push`, or `git.pull_request` for a pull request's head."""
        return PULL_REQUEST_EVENT if self.pull_request is not None else EVENT_NAME


@dataclass
class Verdict:
    """The HTTP answer to one delivery."""

    status: int
    body: dict[str, Any]
    push: PushEvent | None = field(default=None, repr=False)


def sign(secret: bytes, body: bytes) -> str:
    """The `X-Hub-Signature-256` value for a body: `sha256=<hex HMAC-SHA256>`."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_signature(secret: bytes, body: bytes, header: str | None) -> bool:
    """Check a GitHub/Gitea `X-Hub-Signature-256` header in constant time."""
    if not header:
        return False
    return hmac.compare_digest(sign(secret, body).encode(), header.strip().encode())


def _payload_repositories(payload: Mapping[str, Any]) -> list[str]:
    names: list[str] = []
    for key in ("repository", "project"):
        info = payload.get(key)
        if not isinstance(info, dict):
            continue
        for field_name in (
            "clone_url",
            "ssh_url",
            "html_url",
            "git_url",
            "url",
            "git_http_url",
            "git_ssh_url",
            "web_url",
        ):
            value = info.get(field_name)
            if isinstance(value, str) and 0 < len(value) <= 2000:
                names.append(value)
    return names


def _changed_paths(commits: Any) -> list[str] | None:
    if not isinstance(commits, list) or not commits:
        return None
    paths: set[str] = set()
    for commit in commits:
        if not isinstance(commit, dict):
            return None
        for key in ("added", "removed", "modified"):
            values = commit.get(key)
            if not isinstance(values, list):
                return None
            paths.update(v for v in values if isinstance(v, str))
    return sorted(paths)


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
            return Verdict(
                404, {"error": f"unknown webhook provider {provider!r}; use {', '.join(PROVIDERS)}"}
            )
        h = {k.lower(): v for k, v in headers.items()}
        # Only the links whose secret signed this body are considered further: a sender that
        # knows one link's secret cannot start runs of another.
        authentic = [
            t
            for t in self.targets
            if provider in t.providers and self._authentic(t.secret, provider, h, body)
        ]
        if not authentic:
            return Verdict(401, {"error": "missing or invalid signature"})
        event, delivery = self._event_and_delivery(provider, h, body)
        try:
            payload = self._decode(h, body)
        except ValueError as exc:
            return Verdict(400, {"error": f"body is not valid JSON: {str(exc)[:200]}"})
        except RecursionError:
            return Verdict(400, {"error": "body is not valid JSON: nested too deeply"})
        if event in {"ping", "system hook"}:
            return Verdict(200, {"status": "pong"})
        if event in {"pull_request", "merge request hook"}:
            if not isinstance(payload, dict):
                return Verdict(400, {"error": "pull request payload must be a JSON object"})
            return self._pull_request(provider, delivery, payload, authentic)
        if event not in {"push", "push hook", "tag push hook"}:
            return Verdict(202, {"status": "ignored", "reason": f"event {event!r} starts no run"})
        if not isinstance(payload, dict):
            return Verdict(400, {"error": "push payload must be a JSON object"})
        ref = payload.get("ref")
        after = str(payload.get("after") or "").lower()
        if not isinstance(ref, str) or not _SHA.match(after):
            return Verdict(
                400, {"error": "push payload needs `ref` and a 40-character `after` SHA"}
            )
        if ref.startswith("refs/tags/") or event == "tag push hook":
            return Verdict(202, {"status": "ignored", "reason": f"tag push {ref} starts no run"})
        if payload.get("deleted") is True or after == ZERO_SHA:
            return Verdict(
                202, {"status": "ignored", "reason": f"branch deletion {ref} starts no run"}
            )
        on_branch = [t for t in authentic if ref == f"refs/heads/{t.branch}"]
        if not on_branch:
            branches = ", ".join(sorted({t.branch for t in authentic}))
            return Verdict(
                202,
                {"status": "ignored", "reason": f"push to {ref}; this receiver serves {branches}"},
            )
        named = _payload_repositories(payload)[:20]
        if not named:
            return Verdict(
                400,
                {
                    "error": "push payload names no repository: expected `repository` (or "
                    "`project`) as an object with clone_url, url, html_url or ssh_url"
                },
            )
        keys = {normalize_repo(n) for n in named}
        target = next((t for t in on_branch if t.key in keys), None)
        if target is None:
            served = on_branch[0].repo.url if len(on_branch) == 1 else "other linked repositories"
            return Verdict(
                202,
                {
                    "status": "ignored",
                    "reason": f"push for {named[0]}; this receiver serves {served}",
                },
            )
        before = str(payload.get("before") or "").lower() or None
        forced = payload.get("forced") is True
        commits = payload.get("commits")
        changed = None if forced else _changed_paths(commits)
        total = payload.get("total_commits_count")
        if isinstance(commits, list) and (
            (isinstance(total, int) and total > len(commits))
            or (total is None and len(commits) >= _GITHUB_COMMIT_CAP)
        ):
            changed = None  # truncated: let git compute it
        pusher_info = payload.get("pusher") or {}
        pusher = str(pusher_info.get("name", "")) if isinstance(pusher_info, dict) else ""
        if not pusher:
            pusher = str(payload.get("user_username") or payload.get("user_name") or "")
        pusher = pusher[:200]
        push = PushEvent(
            provider=provider,
            delivery=delivery or f"sha-{after}",
            ref=ref,
            after=after,
            before=before if before and _SHA.match(before) else None,
            changed_paths=changed,
            forced=forced,
            pusher=pusher,
        )
        status, event_id = self.outbox.enqueue(
            push, target.repo, target.branch, target.name if target.reports else None
        )
        code = 202 if status == "queued" else 200
        return Verdict(
            code,
            {"status": status, "event_id": event_id, "after": after, "link": target.name},
            push,
        )

    def _pull_request(
        self, provider: str, delivery: str, payload: dict[str, Any], authentic: list[Served]
    ) -> Verdict:
        """A pull request (merge request) delivery: its head previewed when a link asks."""
        try:
            pull = parse_pull_request(provider, payload)
        except ValueError as exc:
            return Verdict(400, {"error": str(exc)})
        if pull.action not in PREVIEW_ACTIONS[provider]:
            return Verdict(
                202,
                {
                    "status": "ignored",
                    "reason": f"pull request action {pull.action!r} runs no preview",
                },
            )
        if provider == "gitlab" and pull.action == "update" and not pull.new_commits:
            return Verdict(
                202, {"status": "ignored", "reason": "merge request update without new commits"}
            )
        keys = {normalize_repo(n) for n in pull.repositories[:20]}
        target = next((t for t in authentic if t.key in keys and t.branch == pull.base), None)
        if target is None:
            served = ", ".join(sorted({f"{t.repo.url}@{t.branch}" for t in authentic})[:5])
            return Verdict(
                202,
                {
                    "status": "ignored",
                    "reason": f"pull request into {pull.base} of "
                    f"{pull.repositories[0] if pull.repositories else 'an unnamed repository'}; "
                    f"this receiver serves {served}",
                },
            )
        if target.previews == "off" or (target.previews == "same-repo" and pull.fork):
            why = "previews are off" if target.previews == "off" else "it comes from a fork"
            reason = f"link {target.name}: no preview, {why}"
            if target.link is None:
                reason = (
                    "no preview: only linked repositories preview their pull requests "
                    "(`textgen link add`)"
                )
            return Verdict(202, {"status": "ignored", "reason": reason})
        push = PushEvent(
            provider=provider,
            delivery=delivery or f"pr-{pull.number}-{pull.head}",
            ref=pull.ref,
            after=pull.head,
            before=None,
            changed_paths=None,
            pusher=pull.author,
            trigger="preview",
            pull_request={
                "number": pull.number,
                "ref": pull.ref,
                "head_branch": pull.head_branch,
                "fork": pull.fork,
            },
            base=target.branch,
        )
        status, event_id = self.outbox.enqueue(
            push, target.repo, target.branch, target.name if target.reports else None
        )
        return Verdict(
            202 if status == "queued" else 200,
            {
                "status": status,
                "event_id": event_id,
                "after": pull.head,
                "link": target.name,
                "pull_request": pull.number,
            },
            push,
        )

    @staticmethod
    def _authentic(secret: bytes | None, provider: str, h: Mapping[str, str], body: bytes) -> bool:
        if secret is None:
            return True  # started with --insecure, or a link without a secret
        if provider == "gitlab":
            token = h.get("x-gitlab-token", "")
            return hmac.compare_digest(token.encode(), secret)
        if provider == "gitea" and "x-gitea-signature" in h:
            expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
            return hmac.compare_digest(expected.encode(), h["x-gitea-signature"].strip().encode())
        return verify_signature(secret, body, h.get("x-hub-signature-256"))

    @staticmethod
    def _event_and_delivery(provider: str, h: Mapping[str, str], body: bytes) -> tuple[str, str]:
        if provider == "gitlab":
            event = h.get("x-gitlab-event", "")
            delivery = h.get("x-gitlab-event-uuid", "") or h.get("x-gitlab-webhook-uuid", "")
        else:
            event = h.get("x-github-event", "") or h.get("x-gitea-event", "")
            delivery = h.get("x-github-delivery", "") or h.get("x-gitea-delivery", "")
        return event.strip().lower(), delivery.strip()[:200]

    @staticmethod
    def _decode(h: Mapping[str, str], body: bytes) -> Any:
        text = body.decode("utf-8")
        if h.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            form = parse_qs(text)
            if "payload" not in form:
                raise ValueError("form body has no `payload` field")
            text = form["payload"][0]
        return json.loads(text)


@dataclass(frozen=True)
class PullRequestDelivery:
    """What a pull request (merge request) delivery says, in one form for every provider."""

    action: str
    number: int
    head: str
    """The head commit's SHA."""
    base: str
    """The branch it targets."""
    head_branch: str
    fork: bool
    ref: str
    """Its head ref in the target repository: refs/pull/N/head, refs/merge-requests/N/head."""
    repositories: list[str]
    author: str = ""
    new_commits: bool = True


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any, limit: int = 300) -> str:
    return value[:limit] if isinstance(value, str) else ""


def parse_pull_request(provider: str, payload: dict[str, Any]) -> PullRequestDelivery:
    """Read a `pull_request` (GitHub, Gitea) or `Merge Request Hook` (GitLab) payload.

    A pull request from a fork counts as one unless the payload shows the head repository is
    the base repository; its head is fetched from the linked repository's own pull request
    ref, never from the fork's URL.
    """
    if provider == "gitlab":
        attrs = payload.get("object_attributes")
        if not isinstance(attrs, dict):
            raise ValueError("merge request payload needs `object_attributes`")
        number = attrs.get("iid")
        last = _dict(attrs.get("last_commit"))
        head = str(last.get("id") or "").lower()
        source, target = attrs.get("source_project_id"), attrs.get("target_project_id")
        user = _dict(payload.get("user"))
        pull = PullRequestDelivery(
            action=_text(attrs.get("action"), 40),
            number=number if isinstance(number, int) else -1,
            head=head,
            base=_text(attrs.get("target_branch")),
            head_branch=_text(attrs.get("source_branch")),
            fork=source is None or source != target,
            ref=f"refs/merge-requests/{number}/head",
            repositories=_payload_repositories(payload),
            author=_text(user.get("username"), 200),
            new_commits="oldrev" in attrs or attrs.get("action") != "update",
        )
    else:
        info = payload.get("pull_request")
        if not isinstance(info, dict):
            raise ValueError("pull request payload needs `pull_request`")
        number = payload.get("number", info.get("number"))
        head_info = _dict(info.get("head"))
        base_info = _dict(info.get("base"))
        head_repo = _dict(head_info.get("repo"))
        base_repo = _dict(base_info.get("repo"))
        head_name = head_repo.get("full_name")
        user = _dict(info.get("user"))
        pull = PullRequestDelivery(
            action=_text(payload.get("action"), 40),
            number=number if isinstance(number, int) else -1,
            head=str(head_info.get("sha") or "").lower(),
            base=_text(base_info.get("ref")),
            head_branch=_text(head_info.get("ref")),
            fork=not head_name or head_name != base_repo.get("full_name"),
            ref=f"refs/pull/{number}/head",
            repositories=_payload_repositories(payload),
            author=_text(user.get("login"), 200),
        )
    if not 0 < pull.number < 10**10 or isinstance(pull.number, bool):
        raise ValueError("pull request payload needs a positive `number` (GitLab: `iid`)")
    if not _SHA.match(pull.head):
        raise ValueError(
            "pull request payload needs the head's 40-character SHA "
            "(pull_request.head.sha; GitLab: object_attributes.last_commit.id)"
        )
    if not pull.base:
        raise ValueError("pull request payload needs the base branch (pull_request.base.ref)")
    return pull


def event_document(
    push: PushEvent, repo: RepoLocation, branch: str, received_at: float
) -> dict[str, Any]:
    """The Prefect event for a push: stable id per delivery, repository and branch as labels.

    It stays under `MAX_EVENT_BYTES`: past that, the changed paths are left out (the flow then
    asks git what changed), since the Prefect server drops large events after accepting them.
    """
    event = _event(push, repo, branch, received_at)
    if push.changed_paths is not None and len(json.dumps(event)) > MAX_EVENT_BYTES:
        event = _event(replace(push, changed_paths=None), repo, branch, received_at)
    return event


def _event(push: PushEvent, repo: RepoLocation, branch: str, received_at: float) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid5(_EVENT_NAMESPACE, f"{push.provider}:{push.delivery}")),
        "occurred": datetime.fromtimestamp(received_at, UTC).isoformat(),
        "event": push.event_name,
        "resource": {
            "prefect.resource.id": f"git.repo.{repo.key}",
            "prefect.resource.name": repo.display_name,
            "git.repository": repo.url,
            "git.branch": branch,
        },
        "payload": {**asdict(push), "branch": push.branch, "repository": repo.url},
    }


class Outbox:
    """Accepted pushes, durable on disk until the Prefect API has taken them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.wake = threading.Event()
        with self._connect() as db:
            db.executescript(
                """
                PRAGMA journal_mode=WAL;
                CREATE TABLE IF NOT EXISTS deliveries (
                    provider TEXT NOT NULL,
                    delivery TEXT NOT NULL,
                    repo TEXT NOT NULL,
                    ref TEXT NOT NULL,
                    after TEXT NOT NULL,
                    status TEXT NOT NULL,
                    event TEXT,
                    received_at REAL NOT NULL,
                    attempts INTEGER NOT NULL DEFAULT 0,
                    last_error TEXT,
                    sent_at REAL,
                    before_sha TEXT,
                    PRIMARY KEY (provider, delivery)
                );
                CREATE UNIQUE INDEX IF NOT EXISTS one_event_per_commit
                    ON deliveries (repo, ref, after) WHERE status IN ('pending', 'sent');
                CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS reports (
                    provider TEXT NOT NULL,
                    delivery TEXT NOT NULL,
                    link TEXT NOT NULL,
                    kind TEXT NOT NULL,
                    sha TEXT NOT NULL,
                    pr INTEGER,
                    phase TEXT NOT NULL DEFAULT 'queued',
                    result TEXT,
                    attempts INTEGER NOT NULL DEFAULT 0,
                    next_at REAL NOT NULL DEFAULT 0,
                    last_error TEXT,
                    created_at REAL NOT NULL,
                    PRIMARY KEY (provider, delivery)
                );
                """
            )
            columns = {row[1] for row in db.execute("PRAGMA table_info(deliveries)")}
            if "before_sha" not in columns:  # an outbox written before pushes were chained
                db.execute("ALTER TABLE deliveries ADD COLUMN before_sha TEXT")
            if "run_seen_at" not in columns:  # written before runs were checked for
                db.execute("ALTER TABLE deliveries ADD COLUMN run_seen_at REAL")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA synchronous=FULL")
        return db

    def enqueue(
        self, push: PushEvent, repo: RepoLocation, branch: str, report: str | None = None
    ) -> tuple[str, str | None]:
        """Store a push; returns (queued | duplicate delivery | duplicate commit, event id).

        `report` names the link whose provider hears how the run went: a queued push is then
        also a row of `reports`, in the same transaction (see deployments.reporter)."""
        now = time.time()
        event = event_document(push, repo, branch, now)
        with self._lock, self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            seen = db.execute(
                "SELECT status FROM deliveries WHERE provider = ? AND delivery = ?",
                (push.provider, push.delivery),
            ).fetchone()
            if seen:
                db.execute("COMMIT")
                return "duplicate delivery", None
            same_commit = db.execute(
                "SELECT 1 FROM deliveries WHERE repo = ? AND ref = ? AND after = ? "
                "AND status IN ('pending', 'sent')",
                (repo.url, push.ref, push.after),
            ).fetchone()
            status = "duplicate" if same_commit else "pending"
            db.execute(
                "INSERT INTO deliveries "
                "(provider, delivery, repo, ref, after, status, event, received_at, before_sha) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    push.provider,
                    push.delivery,
                    repo.url,
                    push.ref,
                    push.after,
                    status,
                    json.dumps(event),
                    now,
                    push.before,
                ),
            )
            if report is not None and not same_commit:
                db.execute(
                    "INSERT OR IGNORE INTO reports "
                    "(provider, delivery, link, kind, sha, pr, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        push.provider,
                        push.delivery,
                        report,
                        "preview" if push.pull_request else "push",
                        push.after,
                        (push.pull_request or {}).get("number"),
                        now,
                    ),
                )
            db.execute("COMMIT")
        if same_commit:
            return "duplicate commit", None
        self.wake.set()
        return "queued", str(event["id"])

    def pending(self, limit: int = 100) -> list[tuple[str, str, dict[str, Any]]]:
        """Events not yet taken by Prefect, oldest first: (provider, delivery, event)."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT provider, delivery, event FROM deliveries WHERE status = 'pending' "
                "ORDER BY received_at LIMIT ?",
                (limit,),
            ).fetchall()
        return [(p, d, json.loads(e)) for p, d, e in rows]

    def mark(self, provider: str, delivery: str, error: str | None, refused: bool = False) -> None:
        """Record an attempt: sent when `error` is None, else still pending with the error;
        `refused` (the API rejected the event itself) ends it as `refused`, kept with its
        error for the operator (`/healthz` counts it), so it blocks no later push."""
        with self._lock, self._connect() as db:
            if refused:
                db.execute(
                    "UPDATE deliveries SET status = 'refused', attempts = attempts + 1, "
                    "last_error = ? WHERE provider = ? AND delivery = ?",
                    ((error or "")[:2000], provider, delivery),
                )
            elif error is None:
                db.execute(
                    "UPDATE deliveries SET status = 'sent', sent_at = ?, attempts = attempts + 1, "
                    "last_error = NULL WHERE provider = ? AND delivery = ?",
                    (time.time(), provider, delivery),
                )
            else:
                db.execute(
                    "UPDATE deliveries SET attempts = attempts + 1, last_error = ? "
                    "WHERE provider = ? AND delivery = ?",
                    (error[:2000], provider, delivery),
                )

    def latest(self, repo: RepoLocation, branch: str) -> str | None:
        """The SHA the branch was last pushed to, by the order of the pushes, not of arrival.

        Each push names the tip it replaced (`before`): a push whose SHA a later push replaced
        is older, however late its delivery came. Among those no push replaced, the last to
        arrive wins (a chain broken by a lost delivery, or a branch pushed back and forth).
        """
        with self._connect() as db:
            rows = db.execute(
                "SELECT after, before_sha FROM deliveries WHERE repo = ? AND ref = ? "
                "AND status IN ('pending', 'sent') ORDER BY received_at DESC LIMIT 500",
                (repo.url, f"refs/heads/{branch}"),
            ).fetchall()
        if not rows:
            return None
        replaced = {before for _, before in rows if before}
        for after, _ in rows:
            if after not in replaced:
                return str(after)
        return str(rows[0][0])

    def prune(self, older_than: float = RETENTION_SECONDS) -> int:
        """Forget deliveries handled more than `older_than` seconds ago; returns how many."""
        cutoff = time.time() - older_than
        with self._lock, self._connect() as db:
            cursor = db.execute(
                "DELETE FROM deliveries WHERE status IN ('sent', 'duplicate') AND received_at < ?",
                (cutoff,),
            )
            # Results the provider took (or refused) are kept as long.
            db.execute(
                "DELETE FROM reports WHERE phase IN ('done', 'gave_up') AND created_at < ?",
                (cutoff,),
            )
            return int(cursor.rowcount)

    def without_run(
        self, repo: RepoLocation, branch: str, older_than: float
    ) -> list[tuple[str, str, dict[str, Any]]]:
        """Sent events no flow run has been seen for yet, sent over `older_than` seconds ago
        (and within a day): (provider, delivery, event), oldest first."""
        now = time.time()
        with self._connect() as db:
            rows = db.execute(
                "SELECT provider, delivery, event FROM deliveries WHERE status = 'sent' "
                "AND run_seen_at IS NULL AND repo = ? AND ref = ? AND sent_at < ? "
                "AND sent_at > ? ORDER BY received_at LIMIT 200",
                (repo.url, f"refs/heads/{branch}", now - older_than, now - 86400),
            ).fetchall()
        return [(p, d, json.loads(e)) for p, d, e in rows]

    def run_seen(self, provider: str, delivery: str) -> None:
        """Record that a flow run exists for a sent event."""
        with self._lock, self._connect() as db:
            db.execute(
                "UPDATE deliveries SET run_seen_at = ? WHERE provider = ? AND delivery = ?",
                (time.time(), provider, delivery),
            )

    def counts(self) -> dict[str, int]:
        """Deliveries by status."""
        with self._connect() as db:
            return dict(
                db.execute("SELECT status, COUNT(*) FROM deliveries GROUP BY status").fetchall()
            )

    def get_state(self, key: str) -> str | None:
        """A small persisted value (the poller's last seen SHA)."""
        with self._connect() as db:
            row = db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_state(self, key: str, value: str) -> None:
        """Persist a small value."""
        with self._lock, self._connect() as db:
            db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, value))


def retention_seconds() -> float:
    """How long handled deliveries are kept (`TEXTGEN_OUTBOX_RETENTION_DAYS`, default 14)."""
    try:
        return float(os.environ.get("TEXTGEN_OUTBOX_RETENTION_DAYS", "14")) * 86400
    except ValueError:
        return RETENTION_SECONDS


def post_events(events: list[dict[str, Any]]) -> None:
    """Send events to the Prefect API over HTTP, raising unless they were taken (2xx)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
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
        self.delay = 0.0
        self.pruned_at = 0.0

    def run(self) -> None:
        """Loop until stopped."""
        while not self.stopping.is_set():
            self.outbox.wake.clear()
            if time.monotonic() - self.pruned_at > 3600:
                self.pruned_at = time.monotonic()
                try:
                    pruned = self.outbox.prune(retention_seconds())
                    if pruned:
                        logger.info("Outbox: forgot %d handled deliveries", pruned)
                except Exception:
                    logger.exception("outbox pruning failed")
            try:
                sent = self.drain()
            except Exception:  # never let the thread die
                logger.exception("outbox drain failed")
                sent = False
            if sent and self.after_send is not None:
                try:
                    self.after_send()
                except Exception:
                    logger.exception("after-send step failed")
            wait = self.delay if self.delay else 5.0
            self.outbox.wake.wait(wait)

    def drain(self) -> bool:
        """Send every pending event in order; stop at the first failure. True if any was sent."""
        sent = False
        for provider, delivery, event in self.outbox.pending():
            try:
                self.send([event])
            except Exception as exc:
                if _refused(exc):
                    self.outbox.mark(provider, delivery, f"{type(exc).__name__}: {exc}", True)
                    logger.error(
                        "Prefect API refused the push event for %s (%s); it will not run. "
                        "The delivery is kept in the outbox as refused",
                        event["payload"]["after"][:7],
                        exc,
                    )
                    continue
                self.outbox.mark(provider, delivery, f"{type(exc).__name__}: {exc}")
                self.delay = min(30.0, max(0.5, self.delay * 2))
                logger.warning(
                    "Prefect API did not take the push event for %s (%s); retrying in %.1f s",
                    event["payload"]["after"][:7],
                    exc,
                    self.delay,
                )
                return sent
            self.outbox.mark(provider, delivery, None)
            self.delay = 0.0
            sent = True
            logger.info(
                "Emitted %s for %s@%s (delivery %s)",
                event["event"],
                event["payload"]["branch"],
                event["payload"]["after"][:7],
                delivery,
            )
        return sent


class Poller(threading.Thread):
    """For remotes that send no webhook: notices new commits and emits the same event."""

    def __init__(self, repo: RepoLocation, branch: str, outbox: Outbox, seconds: float) -> None:
        super().__init__(name="textgen-poller", daemon=True)
        self.repo = repo
        self.branch = branch
        self.outbox = outbox
        self.seconds = seconds
        self.stopping = threading.Event()

    def tip(self) -> str | None:
        """The branch's tip on the remote, or None if it has no such branch."""
        import git

        out = git.Git().execute(
            ["git", "ls-remote", self.repo.url, f"refs/heads/{self.branch}"],
            env=self.repo.git_env(),
            kill_after_timeout=60,
        )
        for line in str(out).splitlines():
            sha, _, ref = line.partition("\t")
            if ref == f"refs/heads/{self.branch}":
                return sha.strip()
        return None

    def check(self) -> str | None:
        """Compare the tip with the last one seen; enqueue a push when it moved. Returns the tip."""
        key = f"poll:{self.repo.url}:{self.branch}"
        tip = self.tip()
        last = self.outbox.get_state(key)
        if tip is None or tip == last:
            return tip
        if last is None:
            logger.info("Polling %s@%s from %s on", self.repo.url, self.branch, tip[:7])
        else:
            status = self._enqueue_move("poll", last, tip)
            logger.info("Poll: %s moved %s -> %s (%s)", self.branch, last[:7], tip[:7], status)
        self.outbox.set_state(key, tip)
        return tip

    def _enqueue_move(self, provider: str, before: str, tip: str) -> str:
        """Queue the branch's move from `before` to `tip` as a push; returns the outbox status."""
        push = PushEvent(
            provider=provider,
            delivery=f"{provider}-{tip}",
            ref=f"refs/heads/{self.branch}",
            after=tip,
            before=before,
            changed_paths=None,
            trigger="poll",
        )
        return self.outbox.enqueue(push, self.repo, self.branch)[0]

    def catch_up(self) -> str | None:
        """On start: if the branch moved while nothing was listening (a push the hook or the
        provider could not deliver), queue its tip as a push. Only once a push was accepted
        here before, so a first start runs nothing by itself. Returns the status, if queued."""
        last = self.outbox.latest(self.repo, self.branch)
        if last is None:
            return None
        tip = self.tip()
        if tip is None or tip == last:
            return None
        status = self._enqueue_move("startup", last, tip)
        logger.info(
            "%s moved %s -> %s while nothing listened: %s", self.branch, last[:7], tip[:7], status
        )
        return status

    def run(self) -> None:
        """Check every `seconds` until stopped."""
        while not self.stopping.is_set():
            try:
                self.check()
            except Exception as exc:
                logger.warning("Polling %s failed: %s", self.repo.url, self.repo.redact(str(exc)))
            self.stopping.wait(self.seconds)


class _DeadlineProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on each connection: a webhook is one short
    request, so a connection still open after `CONNECTION_SECONDS` (a body or headers sent a
    byte at a time) is closed, whatever state it is in."""

    seconds = CONNECTION_SECONDS

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._deadline = asyncio.get_running_loop().call_later(self.seconds, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline.cancel()
        super().connection_lost(exc)


def build_app(receiver: Receiver) -> Starlette:
    """The receiver's HTTP endpoints, as a Starlette app."""

    async def webhook(request: Request) -> JSONResponse:
        provider = request.path_params["provider"]
        length_header = request.headers.get("content-length")
        if length_header is None or not length_header.isdigit():
            return _json(Verdict(411, {"error": "Content-Length is required"}))
        length = int(length_header)
        if length > receiver.max_bytes:
            return _json(
                Verdict(413, {"error": f"body of {length} bytes exceeds {receiver.max_bytes}"})
            )
        try:
            body = await asyncio.wait_for(request.body(), timeout=BODY_SECONDS)
        except TimeoutError:
            return _json(Verdict(408, {"error": f"body not received within {BODY_SECONDS} s"}))
        except ClientDisconnect:
            return _json(Verdict(400, {"error": "the sender went away before the body ended"}))
        if len(body) > receiver.max_bytes:
            return _json(Verdict(413, {"error": f"body exceeds {receiver.max_bytes} bytes"}))
        try:
            # The outbox writes to SQLite: off the event loop.
            verdict = await run_in_threadpool(
                receiver.handle, provider, dict(request.headers), body
            )
        except Exception as exc:  # the receiver must never crash
            logger.exception("webhook handling failed")
            verdict = Verdict(500, {"error": f"internal error: {type(exc).__name__}"})
        logger.info(
            "POST %s -> %d %s",
            request.url.path,
            verdict.status,
            verdict.body.get("status") or verdict.body.get("error"),
        )
        return _json(verdict)

    async def health(request: Request) -> JSONResponse:
        counts = await run_in_threadpool(receiver.outbox.counts)
        return _json(Verdict(200, {"status": "ok", "outbox": counts}))

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return _json(
            Verdict(404, {"error": "not found; POST to /webhooks/github, gitea or gitlab"})
        )

    async def not_allowed(request: Request, exc: Exception) -> JSONResponse:
        return _json(Verdict(405, {"error": "use POST"}))

    return Starlette(
        routes=[
            Route("/webhooks/{provider}", webhook, methods=["POST"]),
            Route("/webhooks/{provider}/", webhook, methods=["POST"]),
            Route("/healthz", health, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={404: not_found, 405: not_allowed},
    )


def _json(verdict: Verdict) -> JSONResponse:
    return JSONResponse(verdict.body, status_code=verdict.status)


class HttpService:
    """The receiver served by uvicorn in a background thread."""

    def __init__(self, server: uvicorn.Server, sock: socket.socket, grace: float) -> None:
        self.server = server
        self.grace = grace
        self.socket = sock
        self.server_address: tuple[str, int] = sock.getsockname()[:2]
        self.thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="textgen-receiver", daemon=True
        )

    def shutdown(self) -> None:
        """Stop accepting, finish what is in flight (bounded), and stop the thread."""
        self.server.should_exit = True
        self.thread.join(timeout=self.grace)

    def server_close(self) -> None:
        """Release the listening socket."""
        with contextlib.suppress(OSError):
            self.socket.close()


def start_http(
    receiver: Receiver,
    host: str,
    port: int,
    max_connections: int = MAX_CONNECTIONS,
    connection_seconds: float = CONNECTION_SECONDS,
) -> HttpService:
    """Serve the receiver on host:port in a background thread; returns the service.

    Limits, in one place: at most `MAX_CONNECTIONS` connections at once (more get 503), a
    deadline per connection and per body, and the body size cap of the receiver.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    config = uvicorn.Config(
        build_app(receiver),
        http=type("Protocol", (_DeadlineProtocol,), {"seconds": connection_seconds}),
        lifespan="off",
        access_log=False,
        log_config=None,
        limit_concurrency=max_connections,
        timeout_keep_alive=5,
        h11_max_incomplete_event_size=64 * 1024,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    service = HttpService(server, sock, connection_seconds + 5)
    service.thread.start()
    deadline = time.monotonic() + 30
    while not server.started and service.thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    return service
