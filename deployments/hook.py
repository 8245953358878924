"""A local git hook that reports pushes to the push receiver, signed like a GitHub webhook.

`textgen hook install PATH` writes a `post-receive` hook into a bare repository, so a
`git push` to a repository on the same machine starts a run with no web service in between.
A non-bare repository gets `post-receive` (pushes into it) and `post-commit` (commits made in
it). The hook never fails a push: if the receiver cannot be reached it says so and exits 0.

This module is run by the hook itself, so it imports nothing heavy.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from tasks.errors import HookError

MARKER = "# textgen push hook"
ZERO_SHA = "0" * 40  # as tasks.repo.ZERO_SHA; not imported: the hook must start fast
DEFAULT_URL = "http://127.0.0.1:8787/webhooks/github"


def _git(cwd: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise HookError(f"git {' '.join(args)} failed in {cwd}: {result.stderr.strip()}")
    return result.stdout.strip()


def repository_identity(path: Path) -> tuple[Path, bool]:
    """The location pushes are reported for (the bare repository, or the work tree) and bareness."""
    bare = _git(path, "rev-parse", "--is-bare-repository") == "true"
    where = _git(path, "rev-parse", "--absolute-git-dir" if bare else "--show-toplevel")
    return Path(where).resolve(), bare


def _script(hook: str, url: str, secret_file: Path, repo: Path) -> str:
    return (
        "#!/bin/sh\n"
        f"{MARKER} ({hook}): reports pushes to the textgen receiver; never fails the push.\n"
        f"exec {_quote(sys.executable)} -m deployments.hook report --hook {hook} "
        f"--url {_quote(url)} --secret-file {_quote(str(secret_file))} --repo {_quote(str(repo))}\n"
    )


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def default_secret_file() -> Path:
    """Where `hook install` keeps the receiver's webhook secret (mode 0600)."""
    from tasks.config import data_dir

    return data_dir() / "receiver" / "webhook-secret"


def install(path: Path, url: str, secret_file: Path | None, force: bool = False) -> list[Path]:
    """Install the hook(s) into the repository at `path`; returns the files written."""
    if not path.exists():
        raise HookError(f"repository {path} does not exist")
    repo, bare = repository_identity(path)
    if secret_file is None:
        from tasks.config import WEBHOOK_SECRET

        secret = WEBHOOK_SECRET.get()
        if not secret:
            raise HookError(
                f"the hook signs its reports: set {WEBHOOK_SECRET.name} (the receiver's secret) "
                "or pass --secret-file FILE"
            )
        secret_file = default_secret_file()
        secret_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secret + "\n")
    elif not secret_file.is_file():
        raise HookError(f"secret file {secret_file} does not exist")
    hooks_dir = Path(_git(path, "rev-parse", "--git-path", "hooks"))
    if not hooks_dir.is_absolute():
        hooks_dir = (path / hooks_dir).resolve()
    hooks_dir.mkdir(parents=True, exist_ok=True)
    names = ["post-receive"] if bare else ["post-receive", "post-commit"]
    written = []
    for name in names:
        target = hooks_dir / name
        if target.exists() and MARKER not in target.read_text(errors="ignore"):
            if not force:
                raise HookError(
                    f"{target} exists and is not textgen's; move it away or pass --force "
                    f"(it is then kept as {name}.before-textgen)"
                )
            target.replace(target.with_name(f"{name}.before-textgen"))
        target.write_text(_script(name, url, secret_file.resolve(), repo))
        target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        written.append(target)
    return written


def _updates(hook: str, stdin_text: str, cwd: Path) -> list[tuple[str, str, str]]:
    """(before, after, ref) of each updated ref, from the hook's input or the new commit."""
    if hook == "post-receive":
        lines = [line.split() for line in stdin_text.splitlines()]
        return [(parts[0], parts[1], parts[2]) for parts in lines if len(parts) == 3]
    after = _git(cwd, "rev-parse", "HEAD")
    try:
        before = _git(cwd, "rev-parse", "HEAD~1")
    except HookError:
        before = ZERO_SHA
    try:
        ref = _git(cwd, "symbolic-ref", "HEAD")
    except HookError:
        return []  # detached HEAD: no branch moved
    return [(before, after, ref)]


def report(hook: str, url: str, secret_file: Path, repo: Path, stdin_text: str) -> int:
    """Send one signed GitHub-style push delivery per updated ref. Always returns 0."""
    try:
        secret = secret_file.read_text().strip().encode()
        updates = _updates(hook, stdin_text, Path.cwd())
    except (OSError, HookError) as exc:
        _say(f"push not reported: {exc}")
        return 0
    for before, after, ref in updates:
        push = {
            "ref": ref,
            "before": before,
            "after": after,
            "created": before == ZERO_SHA,
            "deleted": after == ZERO_SHA,
            "forced": False,
            "repository": {"url": str(repo)},
            "pusher": {"name": os.environ.get("USER", "")},
        }
        body = json.dumps(push).encode()
        headers = {
            "Content-Type": "application/json",
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-Hub-Signature-256": "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest(),
            "User-Agent": "textgen-hook",
        }
        request = Request(url, data=body, method="POST", headers=headers)
        try:
            with urlopen(request, timeout=5) as response:
                answer = json.loads(response.read() or b"{}")
            status, detail = answer.get("status", ""), answer.get("reason", "")
            _say(f"{ref} {after[:7]}: {status}{': ' + detail if detail else ''}")
        except HTTPError as exc:
            _say(f"push not reported ({exc.code}): {exc.read().decode(errors='replace')}")
        except (URLError, OSError, ValueError) as exc:
            _say(f"push not reported: receiver at {url} unreachable ({exc})")
    return 0


def _say(text: str) -> None:
    print(f"textgen: {text}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """`python -m deployments.hook report ...`, as the installed hook runs it."""
    parser = argparse.ArgumentParser(prog="textgen-hook")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report")
    rep.add_argument("--hook", choices=["post-receive", "post-commit"], required=True)
    rep.add_argument("--url", required=True)
    rep.add_argument("--secret-file", required=True, type=Path)
    rep.add_argument("--repo", required=True, type=Path)
    args = parser.parse_args(argv)
    stdin_text = sys.stdin.read() if args.hook == "post-receive" else ""
    return report(args.hook, args.url, args.secret_file, args.repo, stdin_text)


if __name__ == "__main__":
    sys.exit(main())
