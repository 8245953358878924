"""A linked repository, with GitPython: its identity, a cached bare mirror, one commit fetched
into it, and files read at that commit. No Prefect here: the fetch stage is `tasks.inputs`.

The commit is the provenance of every output: files are read from the commit object itself,
never from a working tree that may have moved on. Credentials in a URL are handed to git
through its environment (`url.<with-credentials>.insteadOf`), so they reach neither the
mirror's config on disk, nor a command line, nor any message, tag or parameter.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import git

from tasks import config
from tasks.config import repo_cache_dir
from tasks.errors import RepositoryError, TransientRepositoryError
from tasks.files import file_lock

ZERO_SHA = "0" * 40
"""What git reports as the old (or new) tip when a branch is created (or deleted)."""
_FULL_SHA = re.compile(r"^[0-9a-f]{40}$")
_SHORT_SHA = re.compile(r"^[0-9a-f]{4,40}$")
# What git's stderr says when the remote could not be reached: a later attempt may succeed. A
# host name that does not resolve ("Could not resolve host", "Name or service not known") does
# not heal by waiting and is not here; a resolver that is down for now says "Temporary failure".
_TRANSIENT = re.compile(
    "failed to connect|couldn't connect to server|connection refused|"
    "connection timed out|operation timed out|timed out|network is unreachable|"
    "temporary failure|the remote end hung up unexpectedly|early eof|502|503|504"
)


def normalize_repo(text: str) -> str:
    """A comparable form of a repository location: host/path, no scheme, user, `.git` or slash."""
    text = text.strip()
    if scp := re.match(r"^[\w.-]+@([\w.-]+):(.+)$", text):
        host, path = scp.groups()
    elif "://" in text and urlsplit(text).scheme != "file":
        parts = urlsplit(text)
        host, path = (parts.hostname or ""), parts.path
    else:
        local = Path(urlsplit(text).path) if "://" in text else Path(text).expanduser()
        return str(local.resolve()).rstrip("/").removesuffix("/.git").removesuffix(".git")
    return f"{host.lower()}/{path.strip('/')}".removesuffix(".git").lower()


@dataclass(frozen=True)
class RepoLocation:
    """A repository as given (URL or local path), split into what is recorded and what is secret."""

    url: str
    """The location with credentials removed: what logs, tags and parameters show."""
    secret: str | None = field(default=None, repr=False, compare=False)
    """The userinfo (`user:token` or `token`) for an http(s) URL, never recorded."""

    @classmethod
    def parse(cls, location: str | os.PathLike[str]) -> RepoLocation:
        """Accept an http(s)/ssh/git/file URL, an scp-like `git@host:org/repo`, or a local path."""
        text = os.fspath(location).strip()
        if not text:
            raise RepositoryError("the repository location is empty; give a URL or a local path")
        parts = urlsplit(text)
        if parts.scheme in {"http", "https"}:
            userinfo, _, netloc = parts.netloc.rpartition("@")
            secret = userinfo or config.GIT_CREDENTIALS.get() or None
            return cls(urlunsplit((parts.scheme, netloc, parts.path, "", "")), secret)
        if parts.scheme in {"ssh", "git", "file"} or re.match(r"^[\w.-]+@[\w.-]+:", text):
            return cls(text)
        return cls(str(Path(text).expanduser().resolve()))

    @property
    def is_local(self) -> bool:
        """True for a path on this machine (or a file:// URL)."""
        return self.url.startswith(("/", "file://"))

    @property
    def display_name(self) -> str:
        """A short human name: `owner/name` for a hosted repository, the folder name for a path."""
        path = urlsplit(self.url).path if "://" in self.url else self.url.split(":")[-1]
        parts = [p for p in path.rstrip("/").split("/") if p]
        tail = parts[-2:] if not self.is_local else parts[-1:]
        return "/".join(tail).removesuffix(".git") or self.url

    @property
    def key(self) -> str:
        """A readable name unique to this location (`owner-name-<12 hex>`), for files and ids."""
        slug = re.sub(r"[^\w.-]+", "-", self.display_name).strip("-") or "repo"
        return f"{slug}-{hashlib.sha256(self.url.encode()).hexdigest()[:12]}"

    def git_env(self) -> dict[str, str]:
        """Environment for git commands: no prompts, and the credentials as a URL rewrite."""
        env = {
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_ASKPASS": "true",
            "GIT_SSH_COMMAND": os.environ.get("GIT_SSH_COMMAND", "ssh -o BatchMode=yes"),
        }
        if self.secret:
            scheme, netloc, path, _, _ = urlsplit(self.url)
            with_secret = urlunsplit((scheme, f"{self.secret}@{netloc}", path, "", ""))
            env["GIT_CONFIG_COUNT"] = "1"
            env["GIT_CONFIG_KEY_0"] = f"url.{with_secret}.insteadOf"
            env["GIT_CONFIG_VALUE_0"] = self.url
        return env

    def redact(self, text: str) -> str:
        """Remove the secret (and any userinfo of an http URL) from a message."""
        if self.secret:
            encoded = base64.b64encode(self.secret.encode()).decode()
            text = text.replace(self.secret, "***").replace(encoded, "***")
        return re.sub(r"(https?://)[^/\s@]+@", r"\1***@", text)


@dataclass(frozen=True)
class CommitInfo:
    """One resolved commit and where its objects are kept."""

    repo_url: str
    branch: str
    sha: str
    message: str
    author: str
    authored_at: str
    changed_paths: tuple[str, ...]
    mirror: str
    on_branch: bool
    branch_tip: str | None = None
    """The branch's tip in the mirror when the commit was resolved."""
    pull_tip: str | None = None
    """For a pull request's head: the pull request's ref tip when the commit was resolved."""

    @property
    def short_sha(self) -> str:
        """The first 7 characters of the SHA, as git shows it."""
        return self.sha[:7]

    def read_file(self, path: str) -> bytes | None:
        """The file's bytes at this commit, or None when the commit has no such file."""
        return read_blob(Path(self.mirror), self.sha, path)

    def object_type(self, path: str) -> str | None:
        """`blob`, `tree` (or another git type) for a path at this commit; None if absent."""
        return _object_type(self.mirror, self.sha, path)

    def list_files(self, folder: str) -> list[str]:
        """Paths of the files directly inside `folder` at this commit (empty if none)."""
        folder = folder.rstrip("/")
        try:
            out = git.Repo(self.mirror).git.ls_tree("--name-only", "-z", f"{self.sha}:{folder}")
        except git.GitCommandError:
            return []
        return sorted(f"{folder}/{name}" for name in out.split("\0") if name)


SETTINGS_PATHS = ("textgen.yaml", "nlp_text_generation.py", ".gradient/")
"""Files a run reads from the commit: an uncommitted one is worth a warning even if untracked."""


def uncommitted_changes(path: str | os.PathLike[str], branch: str | None = None) -> list[str]:
    """Files of a local checkout whose changes a run of it will not see: tracked files that
    differ from the commit, and untracked settings files. Empty for a bare repository, a
    remote URL, or a checkout of another branch than `branch`."""
    location = RepoLocation.parse(path)
    if not location.is_local:
        return []
    try:
        repo = git.Repo(location.url)
        if repo.bare:
            return []
        if branch and not repo.head.is_detached and repo.active_branch.name != branch:
            return []
        out = str(repo.git.status("--porcelain", "--untracked-files=all", "-z"))
    except (git.GitError, OSError, TypeError, ValueError):
        return []
    files = []
    entries = iter(out.split("\0"))
    for entry in entries:
        if len(entry) < 4:
            continue
        status, name = entry[:2], entry[3:]
        if status[0] in "RC":
            next(entries, None)  # the rename's source path
        if status != "??" or name.startswith(SETTINGS_PATHS):
            files.append(name)
    return sorted(set(files))


def _origin(path: str) -> str | None:
    """The `origin` remote's URL of a local repository, resolved against it when relative."""
    try:
        url = str(git.Repo(path).git.config("--get", "remote.origin.url")).strip()
    except (git.GitError, OSError, ValueError):
        return None
    if not url:
        return None
    if "://" in url or re.match(r"^[\w.-]+@[\w.-]+:", url) or url.startswith("/"):
        return url
    return str((Path(path) / url).resolve())


def repository_identity(location: str) -> str:
    """Where a repository comes from, so that every way of reaching it is one repository: a
    local path follows its `origin` remotes (a bare clone of a checkout leads to the checkout,
    a checkout of GitHub to its URL) to the first remote URL or the last local repository.
    Credentials are never part of it."""
    current = RepoLocation.parse(location).url
    chain = [current]
    for _ in range(16):
        if not current.startswith("/") or not Path(current).exists():
            break
        origin = _origin(current)
        if origin is None:
            break
        current = RepoLocation.parse(origin).url
        if current in chain:
            # Repositories that are each other's origin: the same one from every entry point.
            return min(chain[chain.index(current) :])
        chain.append(current)
    return current


def mirror_path(location: RepoLocation) -> Path:
    """The cached bare mirror for a repository: one per (credential-free) location."""
    return repo_cache_dir() / f"{location.key}.git"


def _open_mirror(location: RepoLocation) -> git.Repo:
    path = mirror_path(location)
    if (path / "HEAD").exists():
        repo = git.Repo(path)
        with repo.config_writer() as cfg:
            cfg.set_value('remote "origin"', "url", location.url)
        return repo
    repo = git.Repo.init(path, bare=True, mkdir=True)
    repo.create_remote("origin", location.url)
    return repo


def _fetch(
    repo: git.Repo, location: RepoLocation, refspec: str, ref: str, env: Mapping[str, str]
) -> None:
    command = ["git", "fetch", "--no-tags", "--quiet", "origin", refspec]
    try:
        repo.git.execute(command, env=dict(env), kill_after_timeout=config.GIT_TIMEOUT.get())
    except git.GitCommandError as exc:
        # GitPython formats it as "stderr: '<text>'".
        stderr = re.sub(r"^stderr: '(.*)'$", r"\1", str(exc.stderr or exc).strip(), flags=re.S)
        stderr = location.redact(stderr.strip())
        if "couldn't find remote ref" in stderr.lower():
            message = f"branch or ref {ref!r} does not exist in repository {location.url}"
            raise RepositoryError(message) from None
        error = TransientRepositoryError if _TRANSIENT.search(stderr.lower()) else RepositoryError
        raise error(f"fetching {ref!r} from repository {location.url} failed: {stderr}") from None


def _resolve(repo: git.Repo, ref: str) -> str | None:
    try:
        return str(repo.git.rev_parse("--verify", "--quiet", f"{ref}^{{commit}}")).strip() or None
    except git.GitCommandError:
        return None


def _ambiguous(repo: git.Repo, short: str) -> list[str]:
    out = repo.git.execute(
        ["git", "rev-parse", "--disambiguate=" + short], with_extended_output=True
    )
    return [line for line in out[1].splitlines() if line]


def changed_between(mirror: str | Path, before: str | None, after: str) -> tuple[str, ...]:
    """Paths that differ between two commits; `before=None` compares with the first parent
    (or, for a root commit, lists every file)."""
    repo = git.Repo(mirror)
    if before is None:
        parents = repo.commit(after).parents
        before = parents[0].hexsha if parents else None
    if before is None:
        out = repo.git.ls_tree("-r", "--name-only", "-z", after)
    else:
        out = repo.git.diff("--name-only", "--no-renames", "-z", before, after)
    return tuple(sorted(p for p in out.split("\0") if p))


def _object_type(mirror: str | Path, sha: str, path: str) -> str | None:
    try:
        return str(git.Repo(mirror).git.cat_file("-t", f"{sha}:{path}")).strip()
    except git.GitCommandError:
        return None


def read_blob(mirror: Path, sha: str, path: str) -> bytes | None:
    """Bytes of `path` at commit `sha` in the mirror, or None if absent (or not a file)."""
    if _object_type(mirror, sha, path) != "blob":
        return None
    data = git.Repo(mirror).git.cat_file(
        "blob", f"{sha}:{path}", stdout_as_string=False, strip_newline_in_stdout=False
    )
    return bytes(data)


_PULL_REF = re.compile(r"^refs/(pull/[1-9][0-9]{0,9}/head|merge-requests/[1-9][0-9]{0,9}/head)$")


def resolve_commit(
    location: RepoLocation,
    branch: str,
    commit_sha: str | None,
    refresh: bool = False,
    pull_ref: str | None = None,
) -> CommitInfo:
    """Fetch what is missing into the mirror and resolve `commit_sha` (or the tip of `branch`).

    `refresh` fetches the branch even when the commit is known, to learn the current tip.
    `pull_ref` (`refs/pull/N/head`, `refs/merge-requests/N/head`) is a pull request's head in
    the linked repository: it is fetched too (a fork's commits are reachable only from it), and
    its tip recorded, so a preview of a head the pull request has moved on from is superseded."""
    if pull_ref is not None and not _PULL_REF.match(pull_ref):
        raise RepositoryError(
            f"{pull_ref!r} is not a pull request's head ref; expected refs/pull/N/head or "
            f"refs/merge-requests/N/head"
        )
    if location.is_local and not Path(location.url.removeprefix("file://")).exists():
        raise RepositoryError(f"repository {location.url} does not exist on this machine")
    if not branch or branch.startswith("-") or ".." in branch:
        raise RepositoryError(f"branch name {branch!r} is not valid for repository {location.url}")
    wanted = (commit_sha or "").strip().lower() or None
    if wanted is not None and not _SHORT_SHA.match(wanted):
        raise RepositoryError(
            f"commit {commit_sha!r} is not a SHA (4 to 40 hexadecimal characters); "
            f"repository {location.url}"
        )
    env = location.git_env()
    path = mirror_path(location)
    with file_lock(path.with_name(path.name + ".lock")):  # one fetch at a time
        repo = _open_mirror(location)
        tracking = f"refs/remotes/origin/{branch}"
        have = _resolve(repo, wanted) if wanted and _FULL_SHA.match(wanted) else None
        if have is None or refresh:
            _fetch(repo, location, f"+refs/heads/{branch}:{tracking}", branch, env)
        pull_tracking = None
        if pull_ref is not None:
            pull_tracking = "refs/remotes/origin/" + pull_ref.removeprefix("refs/")
            _fetch(repo, location, f"+{pull_ref}:{pull_tracking}", pull_ref, env)
        if wanted is None:
            sha = _resolve(repo, tracking)
            if sha is None:
                raise RepositoryError(
                    f"branch {branch!r} has no commits in repository {location.url}"
                )
        else:
            sha = have or _resolve(repo, wanted)
            if sha is None and len(wanted) < 40 and len(_ambiguous(repo, wanted)) > 1:
                raise RepositoryError(
                    f"short SHA {wanted!r} is ambiguous in repository {location.url}: "
                    f"give more characters"
                )
            if sha is None and _FULL_SHA.match(wanted):
                # Not on the branch: ask the remote for the commit itself.
                with contextlib.suppress(RepositoryError):
                    _fetch(repo, location, wanted, wanted, env)
                sha = _resolve(repo, wanted)
            if sha is None:
                raise RepositoryError(
                    f"commit {wanted!r} was not found in repository {location.url} "
                    f"(branch {branch!r} fetched)"
                )
        on_branch = is_ancestor(path, sha, tracking)
        tip = _resolve(repo, tracking)
        pull_tip = _resolve(repo, pull_tracking) if pull_tracking else None
    commit = repo.commit(sha)
    return CommitInfo(
        repo_url=location.url,
        branch=branch,
        sha=sha,
        message=str(commit.message).strip(),
        author=f"{commit.author.name} <{commit.author.email}>",
        authored_at=datetime.fromtimestamp(commit.authored_date, UTC).isoformat(),
        changed_paths=changed_between(path, None, sha),
        mirror=str(path),
        on_branch=on_branch,
        branch_tip=tip,
        pull_tip=pull_tip,
    )


def merge_base(mirror: str | Path, a: str, b: str) -> str | None:
    """The best common ancestor of two commits, or None when they share none."""
    try:
        return str(git.Repo(mirror).git.merge_base(a, b)).strip() or None
    except git.GitCommandError:
        return None


def has_commit(mirror: str | Path, sha: str) -> bool:
    """Whether the mirror holds the commit."""
    return _resolve(git.Repo(mirror), sha) is not None


def is_ancestor(mirror: str | Path, ancestor: str, descendant: str) -> bool:
    """Whether `ancestor` is reachable from `descendant` in the mirror (False if one is absent)."""
    repo = git.Repo(mirror)
    if _resolve(repo, ancestor) is None or _resolve(repo, descendant) is None:
        return False
    try:
        repo.git.merge_base("--is-ancestor", ancestor, descendant)
    except git.GitCommandError:
        return False
    return True
