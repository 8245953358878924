"""Linked repositories: the declarative list of what an installation runs.

`links.yaml` (in the data folder, or where the links variable points) names every repository the
service may clone, with its branch, provider, webhook secret and git credentials (by reference,
never by value) and optional operator limits:

    links:
      - name: alpha
        url: https://github.com/org/alpha.git
        branch: main
        provider: github              # github, gitea, gitlab, hook or poll
        secret: env:ALPHA_WEBHOOK_SECRET
        credentials: env:ALPHA_GIT_TOKEN
        token: env:ALPHA_API_TOKEN     # commit statuses and pull-request comments
        previews: all                  # all, same-repo (no forks) or off
        limits: {max_total_tokens: 512}

The receiver accepts pushes only for these, and a deployment of a link runs only its repository:
nothing in a payload chooses what is cloned.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks import config
from tasks.bounded import load_yaml
from tasks.config import links_file
from tasks.errors import SettingsError
from tasks.files import write_atomic

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_REF = re.compile(r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:.+)$")
_API_PATHS = {"github": "/api/v3", "gitea": "/api/v1", "gitlab": "/api/v4"}
"""Where a self-hosted provider's REST API lives on its host."""


def resolve_ref(ref: str, what: str) -> str:
    """The value behind a reference: `env:NAME` (an environment variable) or `file:PATH`."""
    kind, _, target = ref.partition(":")
    if kind == "env":
        value = os.environ.get(target, "").strip()
        if not value:
            raise SettingsError(f"{what}: environment variable {target} is not set or empty")
        return value
    if kind == "file":
        try:
            value = Path(target).expanduser().read_text().strip()
        except OSError as exc:
            raise SettingsError(f"{what}: cannot read {target}: {exc.strerror}") from None
        if not value:
            raise SettingsError(f"{what}: the file {target} is empty")
        return value
    raise SettingsError(f"{what}: {ref!r} is not a reference; use env:NAME or file:PATH")


class Link(BaseModel):
    """One linked repository and branch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="unique name: the deployment's name, lower case")
    url: str = Field(description="clone URL or local path, without credentials")
    branch: str = "main"
    provider: Literal["github", "gitea", "gitlab", "hook", "poll"] = "github"
    secret: str | None = Field(
        default=None, description="webhook secret by reference: env:NAME or file:PATH"
    )
    credentials: str | None = Field(
        default=None, description="git credentials (user:token) by reference: env:NAME or file:PATH"
    )
    poll: float | None = Field(default=None, gt=0, description="poll the remote every N seconds")
    limits: dict[str, int | str] = Field(default_factory=dict)
    token: str | None = Field(
        default=None,
        description="API token for commit statuses and pull-request comments, by reference: "
        "env:NAME or file:PATH",
    )
    api_url: str | None = Field(
        default=None, description="the provider's REST API root; by default derived from url"
    )
    repository: str | None = Field(
        default=None,
        description="owner/name (GitLab: the project's full path) on the provider; by default "
        "from url",
    )
    previews: Literal["all", "same-repo", "off"] = Field(
        default="all",
        description="pull requests that get a preview run: all, same-repo (none from forks), off",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                "must be 1-63 characters of a-z, 0-9, '.', '_' or '-', starting with a letter "
                "or digit"
            )
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        from tasks.repo import RepoLocation

        location = RepoLocation.parse(value)
        if location.secret and "@" in value:
            raise ValueError(
                "holds credentials; put them in an environment variable or a file and name it "
                "with credentials: env:NAME"
            )
        return location.url

    @field_validator("branch")
    @classmethod
    def _branch(cls, value: str) -> str:
        if not value or value.startswith(("-", "/")) or ".." in value or len(value) > 200:
            raise ValueError("is not a branch name")
        return value.removeprefix("refs/heads/")

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/@]+(/[^\s]*)?$", value):
            raise ValueError(
                "must be an http(s) URL without credentials, e.g. https://api.github.com"
            )
        return None if value is None else value.rstrip("/")

    @field_validator("repository")
    @classmethod
    def _repository(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)+$", value):
            raise ValueError("must be owner/name (GitLab: group/subgroup/project)")
        return value

    @model_validator(mode="after")
    def _reporting(self) -> Link:
        if self.token is not None:
            if self.provider not in {"github", "gitea", "gitlab"}:
                raise ValueError(
                    f"token: a {self.provider} link has no provider API to report to; "
                    "statuses need provider github, gitea or gitlab"
                )
            self.api_target()  # derivable, or say what to add
        return self

    def api_target(self) -> tuple[str, str]:
        """The provider's API root and the repository's path there (owner/name)."""
        from tasks.repo import RepoLocation

        url = RepoLocation.parse(self.url).url
        parts = urlsplit(url) if "://" in url else None
        host = parts.hostname if parts is not None else None
        if host is None and url.count(":") == 1 and "@" in url:
            host = url.split("@", 1)[1].split(":", 1)[0]  # git@host:owner/name
        repository = self.repository
        if repository is None and host is not None:
            path = parts.path if parts is not None else url.split(":", 1)[1]
            repository = re.sub(r"\.git$", "", path.strip("/")) or None
        api = self.api_url
        if api is None and host is not None:
            root = f"https://{host}"
            if parts is not None and parts.scheme in {"http", "https"}:
                root = f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")
            if self.provider == "github" and host == "github.com":
                api = "https://api.github.com"
            elif self.provider in _API_PATHS:
                api = root + _API_PATHS[self.provider]
        if api is None or repository is None:
            raise ValueError(
                f"token: cannot tell the {self.provider} API and repository from {self.url!r}; "
                "set api_url and repository (owner/name)"
            )
        return api, repository

    def api_token(self) -> str | None:
        """The resolved API token, or None when the link has none."""
        return None if self.token is None else resolve_ref(self.token, f"link {self.name}: token")

    @field_validator("secret", "credentials", "token")
    @classmethod
    def _reference(cls, value: str | None) -> str | None:
        if value is not None and not _REF.match(value):
            raise ValueError("must be a reference, env:NAME or file:PATH, never the value itself")
        return value

    @field_validator("limits")
    @classmethod
    def _limits(cls, value: dict[str, int | str]) -> dict[str, int | str]:
        if unknown := sorted(set(value) - set(config.LIMITS)):
            raise ValueError(f"unknown limit {unknown[0]!r}; allowed: {', '.join(config.LIMITS)}")
        for key, item in value.items():
            if key != "allowed_models" and (not isinstance(item, int) or item < 1):
                raise ValueError(f"{key} must be a whole number of at least 1, not {item!r}")
        return value

    @property
    def repo_key(self) -> str:
        """A comparable form of the URL (see the receiver's matching)."""
        from tasks.repo import normalize_repo

        return normalize_repo(self.url)

    def webhook_secret(self) -> bytes | None:
        """The resolved webhook secret; None when the link has none (hook on this machine)."""
        if self.secret is None:
            return None
        return resolve_ref(self.secret, f"link {self.name}: secret").encode()

    def git_credentials(self) -> str | None:
        """The resolved git credentials, or None."""
        if self.credentials is None:
            return None
        return resolve_ref(self.credentials, f"link {self.name}: credentials")

    def limit_env(self) -> dict[str, str]:
        """The link's limits, by the name of the operator variable each overrides."""
        return {config.LIMITS[k].name: str(v) for k, v in self.limits.items()}

    def public_json(self) -> str:
        """What a deployment of this link carries for the flow: references, never values."""
        return json.dumps(self.model_dump(), sort_keys=True)


def links_path(explicit: str | None) -> Path:
    """The links file a command was given (`--links`), else `links_file()`."""
    return Path(explicit).expanduser() if explicit else links_file()


def problems(exc: ValidationError) -> str:
    """A link's validation errors, each as `field: message`."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'entry'}: {e['msg']}" for e in exc.errors()
    )


def parse_links(data: Any, source: Path | str) -> list[Link]:
    """Validate the document of a links file."""
    if data is None:
        return []
    if not isinstance(data, dict) or set(data) - {"links"}:
        raise SettingsError(f"{source}: expected a mapping with one key, `links`, a list")
    items = data.get("links") or []
    if not isinstance(items, list):
        raise SettingsError(f"{source}: `links` must be a list")
    links: list[Link] = []
    for index, item in enumerate(items):
        try:
            links.append(Link.model_validate(item))
        except ValidationError as exc:
            raise SettingsError(f"{source}: link {index + 1}: {problems(exc)}") from None
    _check_unique(links, source)
    return links


def _check_unique(links: Iterable[Link], source: Path | str) -> None:
    names: set[str] = set()
    targets: set[tuple[str, str]] = set()
    for link in links:
        if link.name in names:
            raise SettingsError(f"{source}: two links are named {link.name!r}")
        target = (link.repo_key, link.branch)
        if target in targets:
            raise SettingsError(
                f"{source}: {link.url}@{link.branch} is linked twice (as {link.name!r})"
            )
        names.add(link.name)
        targets.add(target)


def load_links(path: Path | None = None) -> list[Link]:
    """The links of a file (`links_file()` by default); none if it does not exist."""
    path = path or links_file()
    if not path.exists():
        return []
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SettingsError(f"cannot read the links file {path}: {exc.strerror}") from None
    return parse_links(load_yaml(raw, str(path)), path)


def save_links(links: list[Link], path: Path | None = None) -> Path:
    """Write the links file atomically (only references are ever in it)."""
    path = path or links_file()
    _check_unique(links, path)
    entries = [link.model_dump(exclude_defaults=True) | {"url": link.url} for link in links]
    header = "# Linked repositories: see `textgen link --help`.\n"
    return write_atomic(path, header + yaml.safe_dump({"links": entries}, sort_keys=False))


def default_name(url: str) -> str:
    """A link name from a URL: its repository name, lower case."""
    from tasks.repo import RepoLocation

    name = RepoLocation.parse(url).display_name.rsplit("/", 1)[-1].lower()
    return re.sub(r"[^a-z0-9._-]+", "-", name).strip("-._")[:63] or "repo"


def deployment_link() -> Link | None:
    """The link a deployment of one link carries (set by `textgen team apply`), if any."""
    raw = config.LINK.get()
    if not raw:
        return None
    try:
        return Link.model_validate_json(raw)
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"]
        raise SettingsError(f"{config.LINK.name} is not a valid link: {reason}") from None


def link_for(repo_url: str, branch: str, required: bool) -> Link | None:
    """The link that allows running `repo_url`@`branch`. A deployment of one link runs only that
    link. Otherwise, with a links file, `required` runs (those of a deployment, or started by a
    push) must be on the list. Raises SettingsError naming what is linked when it is not."""
    from tasks.repo import normalize_repo

    own = deployment_link()
    candidates = [own] if own is not None else load_links()
    key = normalize_repo(repo_url)
    for link in candidates:
        if link.repo_key == key and link.branch == branch:
            return link
    if own is not None:
        raise SettingsError(
            f"this deployment runs only {own.url}@{own.branch} (link {own.name!r}), "
            f"not {repo_url}@{branch}"
        )
    if required and candidates:
        names = ", ".join(f"{c.url}@{c.branch}" for c in candidates[:10])
        raise SettingsError(
            f"{repo_url}@{branch} is not a linked repository; linked: {names} "
            f"(add it with `textgen link add`)"
        )
    return None


def run_link_settings(repo_url: str, branch: str, required: bool) -> dict[str, str]:
    """The operator limits and git credentials of the linked repository a flow run is for, for
    the length of its run; runs of a deployment, and `required` ones, must be linked."""
    from prefect.runtime import deployment

    from tasks.repo import RepoLocation

    link = link_for(RepoLocation.parse(repo_url).url, branch, required or bool(deployment.id))
    if link is None:
        return {}
    values = link.limit_env()
    if credentials := link.git_credentials():
        values[config.GIT_CREDENTIALS.name] = credentials
    return values
