"""Provider REST clients: commit statuses and one updatable pull-request comment, on GitHub
(comments through the issues API), Gitea (GitHub's paths under `/api/v1`) and GitLab (merge
request notes).

The token is sent in a header and nowhere else: never in a URL, a log line or an error.
tests/data/providers/api_contracts.json holds the parts of each provider's published API
description these requests are checked against.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Literal
from urllib.parse import quote

import httpx

from tasks.bounded import shorten

logger = logging.getLogger(__name__)

State = Literal["pending", "success", "failure", "error"]
DESCRIPTION_CHARS = 140
"""GitHub refuses longer status descriptions; the others get the same."""
MAX_COMMENT_PAGES = 20


class ForgeError(Exception):
    """A provider answered with an error, or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def permanent(self) -> bool:
        """Whether retrying cannot help: the token, the repository or the request is wrong."""
        return self.status in {400, 401, 403, 404, 410, 422}


@dataclass(frozen=True)
class Status:
    """One commit status, in the common form: GitHub's states."""

    state: State
    description: str
    context: str
    target_url: str | None = None

    def short(self) -> str:
        """The description on one line, cut to what every provider takes."""
        return shorten(self.description, DESCRIPTION_CHARS, one_line=True)


class Forge:
    """One repository on one provider, with the token that may write statuses and comments."""

    provider = "github"

    def __init__(
        self, api: str, repository: str, token: str, timeout: float = 15.0, client: Any = None
    ) -> None:
        self.api = api.rstrip("/")
        self.repository = repository
        self._token = token
        self.timeout = timeout
        self._client = client

    def __repr__(self) -> str:  # never the token
        return f"{type(self).__name__}({self.api!r}, {self.repository!r})"

    def headers(self) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self._token}",
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28",
            "User-Agent": "nlp-text-generation",
        }

    def request(
        self, method: str, path: str, json: dict[str, Any] | None = None, params: Any = None
    ) -> Any:
        """One API call; the decoded JSON answer, or ForgeError (without the token)."""
        url = self.api + path
        if self._client is None:
            self._client = httpx.Client(timeout=self.timeout, follow_redirects=False)
        try:
            response = self._client.request(
                method, url, json=json, params=params, headers=self.headers()
            )
        except httpx.HTTPError as exc:
            raise ForgeError(f"{method} {url}: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 300:
            detail = response.text[:300].replace(self._token, "***")
            raise ForgeError(
                f"{self.provider} answered {response.status_code} to {method} {url}: {detail}",
                response.status_code,
            )
        try:
            return response.json() if response.content else None
        except ValueError:
            return None

    # Statuses

    def set_status(self, sha: str, status: Status) -> None:
        """Set (or replace, by context) the status of a commit."""
        body = {"state": status.state, "description": status.short(), "context": status.context}
        if status.target_url:
            body["target_url"] = status.target_url
        self.request("POST", f"/repos/{self.repository}/statuses/{sha}", body)

    # Comments

    EDIT_METHOD = "PATCH"

    def _list_path(self, number: int) -> str:
        return f"/repos/{self.repository}/issues/{number}/comments"

    def _edit_path(self, number: int, comment_id: int) -> str:
        return f"/repos/{self.repository}/issues/comments/{comment_id}"

    def _list_params(self, page: int) -> dict[str, int] | None:
        return {"per_page": 100, "page": page}

    def find_comment(self, number: int, marker: str) -> int | None:
        """The id of the pull request's comment holding `marker`, if there is one."""
        for page in range(1, MAX_COMMENT_PAGES + 1):
            items = self.request("GET", self._list_path(number), params=self._list_params(page))
            if not isinstance(items, list):
                return None
            for item in items:
                if isinstance(item, dict) and marker in str(item.get("body") or ""):
                    return int(item["id"])
            if self._list_params(page) is None or len(items) < 100:
                return None
        return None

    def upsert_comment(self, number: int, marker: str, body: str, known: int | None) -> int:
        """Put `body` in the pull request's one comment marked `marker`: the `known` one, or
        the one found by its marker, edited in place; a new one only when there is none.
        Returns the comment's id."""
        text = f"{marker}\n{body}"
        for comment_id in (known, None):
            if comment_id is None:
                comment_id = self.find_comment(number, marker)
                if comment_id is None:
                    break
            try:
                self.request(self.EDIT_METHOD, self._edit_path(number, comment_id), {"body": text})
                return comment_id
            except ForgeError as exc:
                if exc.status != 404:  # deleted by someone: look for it again, or post anew
                    raise
        created = self.request("POST", self._list_path(number), {"body": text})
        return int(created["id"])


class Gitea(Forge):
    """Gitea: GitHub's paths and body fields under /api/v1, its own token header."""

    provider = "gitea"

    def headers(self) -> dict[str, str]:
        return {
            "Authorization": f"token {self._token}",
            "Accept": "application/json",
            "User-Agent": "nlp-text-generation",
        }

    def _list_params(self, page: int) -> dict[str, int] | None:
        return None  # the list operation has no paging parameters; it answers every comment


class GitLab(Forge):
    """GitLab: commit statuses and merge request notes of a project (by its full path)."""

    provider = "gitlab"
    EDIT_METHOD = "PUT"
    STATES: ClassVar[dict[str, str]] = {
        "pending": "pending",
        "success": "success",
        "failure": "failed",
        "error": "failed",
    }

    @property
    def project(self) -> str:
        return quote(self.repository, safe="")

    def headers(self) -> dict[str, str]:
        return {"PRIVATE-TOKEN": self._token, "User-Agent": "nlp-text-generation"}

    def set_status(self, sha: str, status: Status) -> None:
        state = self.STATES[status.state]
        body = {"state": state, "name": status.context, "description": status.short()}
        if status.target_url:
            body["target_url"] = status.target_url
        self.request("POST", f"/projects/{self.project}/statuses/{sha}", body)

    def _list_path(self, number: int) -> str:
        return f"/projects/{self.project}/merge_requests/{number}/notes"

    def _edit_path(self, number: int, comment_id: int) -> str:
        return f"/projects/{self.project}/merge_requests/{number}/notes/{comment_id}"

    def _list_params(self, page: int) -> dict[str, Any] | None:
        return {"sort": "asc", "order_by": "created_at", "per_page": 100, "page": page}


FORGES: dict[str, type[Forge]] = {"github": Forge, "gitea": Gitea, "gitlab": GitLab}


def forge_for(provider: str, api: str, repository: str, token: str, client: Any = None) -> Forge:
    """The client of a provider."""
    return FORGES[provider](api, repository, token, client=client)
