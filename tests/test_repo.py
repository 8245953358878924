"""Fetching one commit into a cached mirror: resolution, errors, credentials."""

from __future__ import annotations

import base64
import socket
from pathlib import Path

import pytest

from tasks import repo as repo_module
from tasks.errors import RepositoryError, TransientRepositoryError
from tasks.repo import RepoLocation, changed_between, mirror_path, resolve_commit
from tests.conftest import RepoFactory
from tests.gitserver import serve_repo, sync


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def count_fetches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = repo_module._fetch

    def counting(repo, location, refspec, ref, env):
        calls.append(refspec)
        return real(repo, location, refspec, ref, env)

    monkeypatch.setattr(repo_module, "_fetch", counting)
    return calls


def test_resolves_the_tip_a_short_sha_and_commit_metadata(make_repo: RepoFactory) -> None:
    repo = make_repo({"a.txt": "1"}, "first")
    second = repo.commit({"b.txt": "2", "a.txt": "changed"}, "second change\n\nbody")
    location = RepoLocation.parse(str(repo.path))
    tip = resolve_commit(location, "main", None)
    assert tip.sha == second
    assert tip.message == "second change\n\nbody"
    assert tip.author == "Dev Example <dev@example.com>"
    assert tip.changed_paths == ("a.txt", "b.txt")
    assert tip.on_branch
    first = repo.git("rev-parse", "HEAD~1")
    short = resolve_commit(location, "main", first[:7].upper())
    assert short.sha == first
    assert short.changed_paths == ("a.txt",)


def test_reads_files_from_the_commit_not_the_working_tree(make_repo: RepoFactory) -> None:
    repo = make_repo({"textgen.yaml": "random_seed: 1\n"})
    (repo.path / "textgen.yaml").write_text("random_seed: 999\n")  # uncommitted edit
    commit = resolve_commit(RepoLocation.parse(str(repo.path)), "main", None)
    assert commit.read_file("textgen.yaml") == b"random_seed: 1\n"
    assert commit.read_file("missing.yaml") is None
    assert commit.read_file(".") is None


def test_a_rerun_fetches_nothing_and_a_new_commit_fetches_incrementally(
    make_repo: RepoFactory, count_fetches: list[str]
) -> None:
    repo = make_repo({"a.txt": "1"})
    location = RepoLocation.parse(str(repo.path))
    first = resolve_commit(location, "main", None)
    assert len(count_fetches) == 1
    mirror = mirror_path(location)
    assert Path(first.mirror) == mirror and (mirror / "HEAD").exists()
    resolve_commit(location, "main", first.sha)
    assert len(count_fetches) == 1, "a known full SHA needs no fetch"
    new = repo.commit({"a.txt": "2"})
    assert resolve_commit(location, "main", new).sha == new
    assert len(count_fetches) == 2
    assert mirror_path(location) == mirror


def test_missing_commit_branch_and_repository_name_the_repository_and_ref(
    make_repo: RepoFactory,
) -> None:
    repo = make_repo({"a.txt": "1"})
    location = RepoLocation.parse(str(repo.path))
    with pytest.raises(
        RepositoryError, match=rf"commit 'deadbeef' was not found in repository {repo.path}"
    ):
        resolve_commit(location, "main", "deadbeef")
    with pytest.raises(RepositoryError, match=rf"'nope' does not exist in repository {repo.path}"):
        resolve_commit(location, "nope", None)
    with pytest.raises(RepositoryError, match="is not a SHA"):
        resolve_commit(location, "main", "12345e7; rm -rf /")
    gone = RepoLocation.parse(str(repo.path.parent / "does-not-exist"))
    with pytest.raises(RepositoryError, match="does-not-exist does not exist on this machine"):
        resolve_commit(gone, "main", None)


def test_an_unreachable_remote_is_a_transient_error_naming_it(make_repo: RepoFactory) -> None:
    url = f"http://127.0.0.1:{_free_port()}/repo.git"
    with pytest.raises(
        TransientRepositoryError, match=rf"fetching 'main' from repository {url} failed"
    ):
        resolve_commit(RepoLocation.parse(url), "main", None)


def test_a_host_that_does_not_resolve_is_not_retried() -> None:
    """A name that does not resolve does not heal by waiting: not a transient error, so the
    fetch task's retries (for transient ones only) do not run, and its repr is one line."""
    from tasks.inputs import _is_transient

    url = "http://textgen-no-such-host.invalid/repo.git"
    with pytest.raises(RepositoryError, match="Could not resolve host") as caught:
        resolve_commit(RepoLocation.parse(url), "main", None)
    assert not isinstance(caught.value, TransientRepositoryError)
    assert "\n" not in repr(caught.value)
    assert repr(caught.value).startswith("RepositoryError: fetching 'main' from repository")

    class Failed:
        def result(self) -> None:
            raise caught.value

    assert not _is_transient(None, None, Failed())


def test_a_commit_off_the_branch_is_fetched_and_flagged(make_repo: RepoFactory) -> None:
    repo = make_repo({"a.txt": "1"})
    repo.git("checkout", "-q", "-b", "feature")
    feature = repo.commit({"a.txt": "feature"})
    repo.git("checkout", "-q", "main")
    repo.git("update-ref", "refs/heads/feature", feature)
    location = RepoLocation.parse(str(repo.path))
    with pytest.raises(RepositoryError, match="was not found"):
        resolve_commit(location, "main", feature[:8])  # a short SHA can only match fetched objects
    # A local remote serves unadvertised full SHAs only when allowed, as GitHub does.
    repo.git("config", "uploadpack.allowAnySHA1InWant", "true")
    commit = resolve_commit(location, "main", feature)
    assert commit.sha == feature
    assert not commit.on_branch


def test_changed_between_two_commits(make_repo: RepoFactory) -> None:
    repo = make_repo({"a.txt": "1", "docs/x.md": "x"})
    before = repo.git("rev-parse", "HEAD")
    repo.commit({"docs/x.md": None, "b.txt": "b"})
    after = repo.commit({"a.txt": "2"})
    commit = resolve_commit(RepoLocation.parse(str(repo.path)), "main", None)
    assert changed_between(commit.mirror, before, after) == ("a.txt", "b.txt", "docs/x.md")


def test_location_parsing_keeps_secrets_out_of_what_is_recorded() -> None:
    location = RepoLocation.parse("https://octo:s3cr3t-token@github.com/owner/name.git")
    assert location.url == "https://github.com/owner/name.git"
    assert location.secret == "octo:s3cr3t-token"
    assert "s3cr3t" not in repr(location)
    assert location.display_name == "owner/name"
    assert (
        location.redact("fatal: https://octo:s3cr3t-token@github.com/x")
        == "fatal: https://***@github.com/x"
    )
    env = location.git_env()
    assert (
        env["GIT_CONFIG_KEY_0"]
        == "url.https://octo:s3cr3t-token@github.com/owner/name.git.insteadOf"
    )
    assert env["GIT_CONFIG_VALUE_0"] == "https://github.com/owner/name.git"
    assert (
        RepoLocation.parse("git@github.com:owner/name.git").url == "git@github.com:owner/name.git"
    )


def test_credentials_in_the_url_authenticate_and_stay_off_disk(
    make_repo: RepoFactory, tmp_path: Path
) -> None:
    repo = make_repo({"textgen.yaml": "random_seed: 1\n"})
    served = tmp_path / "served"
    served.mkdir()
    with serve_repo(repo.path, served, "bot:tok-123456") as (url, seen):
        location = RepoLocation.parse(url.replace("http://", "http://bot:tok-123456@"))
        commit = resolve_commit(location, "main", None)
        assert commit.read_file("textgen.yaml") == b"random_seed: 1\n"
        assert f"Basic {base64.b64encode(b'bot:tok-123456').decode()}" in seen
        new = repo.commit({"textgen.yaml": "random_seed: 2\n"})
        sync(repo.path, served)
        assert resolve_commit(location, "main", None).sha == new
        config = (mirror_path(location) / "config").read_text()
        assert "tok-123456" not in config and url in config
        without = RepoLocation.parse(url)
        with pytest.raises(RepositoryError) as caught:
            resolve_commit(without, "main", None)
        assert "tok-123456" not in str(caught.value)


def test_credentials_never_appear_in_error_messages(tmp_path: Path) -> None:
    url = f"http://tok-abcdef@127.0.0.1:{_free_port()}/repo.git"
    with pytest.raises(RepositoryError) as caught:
        resolve_commit(RepoLocation.parse(url), "main", None)
    assert "tok-abcdef" not in str(caught.value)
    assert "127.0.0.1" in str(caught.value)
