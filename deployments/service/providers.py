"""What the providers send, read in one form: signatures, push and pull request payloads.

- GitHub and Gitea sign the raw body (`X-Hub-Signature-256`: HMAC-SHA256, compared in constant
  time; Gitea also `X-Gitea-Signature`); GitLab sends its token (`X-Gitlab-Token`).
- A push names its ref, the new and old tips and (up to 20 commits, for GitHub and Gitea) the
  files each commit changed; a pull request (GitLab: merge request) its head, base and number.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from tasks.names import PULL_REQUEST_EVENT, PUSH, PUSH_EVENT

PROVIDERS = ("github", "gitea", "gitlab")
PREVIEW_ACTIONS = {
    "github": {"opened", "synchronize", "reopened"},
    "gitea": {"opened", "synchronized", "synchronize", "reopened"},
    "gitlab": {"open", "reopen", "update"},
}
"""The pull request actions that (re)run its preview: a new head, or the request (re)opened."""
SHA = re.compile(r"^[0-9a-f]{40}$")
# GitHub and Gitea list at most 20 commits in a push payload; GitLab says how many there were.
_GITHUB_COMMIT_CAP = 20
# The fields that name a payload's repository (GitLab: project), GitHub's and Gitea's first.
_URL_FIELDS: tuple[str, ...] = ("clone_url", "ssh_url", "html_url", "git_url", "url")
_URL_FIELDS += ("git_http_url", "git_ssh_url", "web_url")


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
    trigger: str = PUSH
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
        return PULL_REQUEST_EVENT if self.pull_request is not None else PUSH_EVENT


def sign(secret: bytes, body: bytes) -> str:
    """The `X-Hub-Signature-256` value for a body: `sha256=<hex HMAC-SHA256>`."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_signature(secret: bytes, body: bytes, header: str | None) -> bool:
    """Check a GitHub/Gitea `X-Hub-Signature-256` header in constant time."""
    if not header:
        return False
    return hmac.compare_digest(sign(secret, body).encode(), header.strip().encode())


def payload_repositories(payload: Mapping[str, Any]) -> list[str]:
    """The URLs a payload's `repository` (GitLab: `project`) names it by."""
    infos = [_dict(payload.get(key)) for key in ("repository", "project")]
    values = [info.get(field_name) for info in infos for field_name in _URL_FIELDS]
    return [v for v in values if isinstance(v, str) and 0 < len(v) <= 2000]


def changed_paths(commits: Any) -> list[str] | None:
    """The files a push's commits added, removed or changed; None unless every commit says."""
    if not isinstance(commits, list) or not all(isinstance(c, dict) for c in commits):
        return None
    lists = [c.get(key) for c in commits for key in ("added", "removed", "modified")]
    if not lists or not all(isinstance(values, list) for values in lists):
        return None
    return sorted({v for values in lists for v in values if isinstance(v, str)})


def push_event(
    provider: str, delivery: str, ref: str, after: str, payload: Mapping[str, Any]
) -> PushEvent:
    """The push a payload describes, its `ref` and `after` already checked: the tip it replaced,
    whether it was forced, the files it changed (when the payload lists them all) and who pushed."""
    before = str(payload.get("before") or "").lower() or None
    forced = payload.get("forced") is True
    commits = payload.get("commits")
    changed = None if forced else changed_paths(commits)
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
    return PushEvent(
        provider=provider,
        delivery=delivery,
        ref=ref,
        after=after,
        before=before if before and SHA.match(before) else None,
        changed_paths=changed,
        forced=forced,
        pusher=pusher[:200],
    )


def authentic(secret: bytes | None, provider: str, h: Mapping[str, str], body: bytes) -> bool:
    """Whether a delivery's headers (lower-cased) prove it was signed with `secret`: GitHub's
    and Gitea's HMAC-SHA256 over the raw body, compared in constant time; GitLab's token."""
    if secret is None:
        return True  # started with --insecure, or a link without a secret
    if provider == "gitlab":
        return hmac.compare_digest(h.get("x-gitlab-token", "").encode(), secret)
    if provider == "gitea" and "x-gitea-signature" in h:
        expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected.encode(), h["x-gitea-signature"].strip().encode())
    return verify_signature(secret, body, h.get("x-hub-signature-256"))


def event_and_delivery(provider: str, h: Mapping[str, str]) -> tuple[str, str]:
    """The event name (lower case) and the delivery id a provider's headers carry."""
    if provider == "gitlab":
        event = h.get("x-gitlab-event", "")
        delivery = h.get("x-gitlab-event-uuid", "") or h.get("x-gitlab-webhook-uuid", "")
    else:
        event = h.get("x-github-event", "") or h.get("x-gitea-event", "")
        delivery = h.get("x-github-delivery", "") or h.get("x-gitea-delivery", "")
    return event.strip().lower(), delivery.strip()[:200]


def decode(h: Mapping[str, str], body: bytes) -> Any:
    """The JSON payload of a delivery (GitHub may send it as a form's `payload` field)."""
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
    """Read a `pull_request` (GitHub, Gitea) or `Merge Request Hook` (GitLab) payload. A pull
    request counts as from a fork unless the payload shows its head repository is the base one;
    its head is fetched from the linked repository's own pull request ref, never the fork's URL."""
    if provider == "gitlab":
        attrs = payload.get("object_attributes")
        if not isinstance(attrs, dict):
            raise ValueError("merge request payload needs `object_attributes`")
        number = attrs.get("iid")
        source, target = attrs.get("source_project_id"), attrs.get("target_project_id")
        pull = PullRequestDelivery(
            action=_text(attrs.get("action"), 40),
            number=number if isinstance(number, int) else -1,
            head=str(_dict(attrs.get("last_commit")).get("id") or "").lower(),
            base=_text(attrs.get("target_branch")),
            head_branch=_text(attrs.get("source_branch")),
            fork=source is None or source != target,
            ref=f"refs/merge-requests/{number}/head",
            repositories=payload_repositories(payload),
            author=_text(_dict(payload.get("user")).get("username"), 200),
            new_commits="oldrev" in attrs or attrs.get("action") != "update",
        )
    else:
        info = payload.get("pull_request")
        if not isinstance(info, dict):
            raise ValueError("pull request payload needs `pull_request`")
        number = payload.get("number", info.get("number"))
        head_info, base_info = _dict(info.get("head")), _dict(info.get("base"))
        head_name = _dict(head_info.get("repo")).get("full_name")
        base_name = _dict(base_info.get("repo")).get("full_name")
        pull = PullRequestDelivery(
            action=_text(payload.get("action"), 40),
            number=number if isinstance(number, int) else -1,
            head=str(head_info.get("sha") or "").lower(),
            base=_text(base_info.get("ref")),
            head_branch=_text(head_info.get("ref")),
            fork=not head_name or head_name != base_name,
            ref=f"refs/pull/{number}/head",
            repositories=payload_repositories(payload),
            author=_text(_dict(info.get("user")).get("login"), 200),
        )
    if not 0 < pull.number < 10**10 or isinstance(pull.number, bool):
        raise ValueError("pull request payload needs a positive `number` (GitLab: `iid`)")
    if not SHA.match(pull.head):
        raise ValueError(
            "pull request payload needs the head's 40-character SHA "
            "(pull_request.head.sha; GitLab: object_attributes.last_commit.id)"
        )
    if not pull.base:
        raise ValueError("pull request payload needs the base branch (pull_request.base.ref)")
    return pull
