"""The local git hook: installation, and a real `git push` reported to a receiver."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from deployments.hook import HookError, install
from deployments.service.http import start_http
from deployments.service.outbox import Outbox
from deployments.service.receiver import Receiver
from tasks.repo import RepoLocation
from tests.conftest import GitRepo, RepoFactory

SECRET = "s3cr3t-Hook-Value-91"


@pytest.fixture
def bare(tmp_path: Path, make_repo: RepoFactory) -> tuple[Path, GitRepo]:
    work = make_repo({"textgen.yaml": "random_seed: 1\n"})
    path = tmp_path / "origin.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(work.path), str(path)], check=True)
    work.git("remote", "add", "origin", str(path))
    return path, work


@pytest.fixture
def listening(tmp_path: Path, bare: tuple[Path, GitRepo]) -> Iterator[tuple[str, Receiver]]:
    path, _ = bare
    receiver = Receiver(
        RepoLocation.parse(str(path)), "main", SECRET.encode(), Outbox(tmp_path / "o.sqlite")
    )
    server = start_http(receiver, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/webhooks/github", receiver
    finally:
        server.shutdown()
        server.server_close()


def test_a_push_to_a_bare_repository_is_reported_signed(
    bare: tuple[Path, GitRepo],
    listening: tuple[str, Receiver],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, work = bare
    url, receiver = listening
    monkeypatch.setenv("TEXTGEN_WEBHOOK_SECRET", SECRET)
    (hook,) = install(path, url, None)
    assert hook == path / "hooks" / "post-receive"
    assert SECRET not in hook.read_text(), "the hook names the secret file, never the secret"
    before = work.git("rev-parse", "HEAD")
    after = work.commit({"textgen.yaml": "random_seed: 2\n"})
    push = subprocess.run(
        ["git", "push", "origin", "main"], cwd=work.path, capture_output=True, text=True, check=True
    )
    assert f"textgen: refs/heads/main {after[:7]}: queued" in push.stderr
    ((provider, _, event),) = receiver.outbox.pending()
    assert provider == "github"
    assert (event["payload"]["before"], event["payload"]["after"]) == (before, after)
    assert event["payload"]["changed_paths"] is None  # the flow asks git


def test_other_branches_and_tags_are_reported_and_ignored(
    bare: tuple[Path, GitRepo], listening: tuple[str, Receiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, work = bare
    url, receiver = listening
    monkeypatch.setenv("TEXTGEN_WEBHOOK_SECRET", SECRET)
    install(path, url, None)
    work.git("tag", "v1")
    work.git("branch", "dev")
    push = subprocess.run(
        ["git", "push", "origin", "v1", "dev"],
        cwd=work.path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "tag push refs/tags/v1 starts no run" in push.stderr
    assert "push to refs/heads/dev; this receiver serves main" in push.stderr
    assert receiver.outbox.pending() == []


def test_an_unreachable_receiver_never_fails_the_push(
    bare: tuple[Path, GitRepo], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, work = bare
    monkeypatch.setenv("TEXTGEN_WEBHOOK_SECRET", SECRET)
    install(path, "http://127.0.0.1:9/webhooks/github", None)
    work.commit({"a.txt": "x"})
    push = subprocess.run(
        ["git", "push", "origin", "main"], cwd=work.path, capture_output=True, text=True
    )
    assert push.returncode == 0
    assert (
        "push not reported: receiver at http://127.0.0.1:9/webhooks/github unreachable"
        in push.stderr
    )


def test_commits_in_a_work_tree_are_reported(
    make_repo: RepoFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = make_repo({"a.txt": "1"})
    receiver = Receiver(
        RepoLocation.parse(str(work.path)), "main", SECRET.encode(), Outbox(tmp_path / "o.sqlite")
    )
    server = start_http(receiver, "127.0.0.1", 0)
    try:
        secret_file = tmp_path / "secret"
        secret_file.write_text(SECRET)
        written = install(
            work.path, f"http://127.0.0.1:{server.server_address[1]}/webhooks/github", secret_file
        )
        assert {p.name for p in written} == {"post-receive", "post-commit"}
        sha = work.commit({"a.txt": "2"})
    finally:
        server.shutdown()
        server.server_close()
    ((_, _, event),) = receiver.outbox.pending()
    assert event["payload"]["after"] == sha


def test_install_refuses_to_clobber_a_foreign_hook(
    bare: tuple[Path, GitRepo], tmp_path: Path
) -> None:
    path, _ = bare
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET)
    foreign = path / "hooks" / "post-receive"
    foreign.write_text("#!/bin/sh\necho mine\n")
    with pytest.raises(HookError, match="exists and is not textgen's"):
        install(path, "http://127.0.0.1:1/webhooks/github", secret_file)
    install(path, "http://127.0.0.1:1/webhooks/github", secret_file, force=True)
    assert (path / "hooks" / "post-receive.before-textgen").read_text() == "#!/bin/sh\necho mine\n"
    install(path, "http://127.0.0.1:2/webhooks/github", secret_file)  # its own hook is replaced
    assert "127.0.0.1:2" in foreign.read_text()


def test_install_needs_a_secret(
    bare: tuple[Path, GitRepo], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = bare
    monkeypatch.delenv("TEXTGEN_WEBHOOK_SECRET", raising=False)
    with pytest.raises(HookError, match="set TEXTGEN_WEBHOOK_SECRET"):
        install(path, "http://127.0.0.1:1/webhooks/github", None)
