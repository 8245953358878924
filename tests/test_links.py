"""Linked repositories: the links file, the commands that edit it, and what a link allows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.cli import main
from deployments.service.outbox import Outbox
from deployments.service.providers import sign
from deployments.service.receiver import Receiver, Served
from tasks.errors import SettingsError
from tasks.links import Link, link_for, load_links, parse_links, resolve_ref, save_links
from tests.conftest import RepoFactory, settings_yaml


def _link(**values: Any) -> dict[str, Any]:
    return {"name": "alpha", "url": "https://github.com/org/alpha.git", **values}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"name": "Alpha"}, "link 1: name: Value error, must be 1-63 characters"),
        ({"url": "https://bot:tok3n@github.com/org/a.git"}, "url: Value error, holds credentials"),
        ({"secret": "hunter2"}, "secret: Value error, must be a reference"),
        ({"credentials": "user:token"}, "credentials: Value error, must be a reference"),
        (
            {"limits": {"max_tokens": 5}},
            "unknown limit 'max_tokens'; allowed: max_return_sequences",
        ),
        ({"limits": {"max_total_tokens": 0}}, "max_total_tokens must be a whole number"),
        (
            {"provider": "svn"},
            "provider: Input should be 'github', 'gitea', 'gitlab', 'hook' or 'poll'",
        ),
        ({"branch": "../x"}, "branch: Value error, is not a branch name"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
    ],
)
def test_a_bad_link_is_refused_naming_the_field_and_what_is_allowed(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(SettingsError) as error:
        parse_links({"links": [_link(**values)]}, "links.yaml")
    assert message in str(error.value)
    assert "tok3n" not in str(error.value) and "hunter2" not in str(error.value)


def test_names_and_repositories_are_linked_once() -> None:
    twice = [_link(), _link(name="other", url="https://github.com/org/alpha")]
    with pytest.raises(SettingsError, match="linked twice"):
        parse_links({"links": twice}, "links.yaml")
    with pytest.raises(SettingsError, match="two links are named 'alpha'"):
        parse_links({"links": [_link(), _link(url="https://github.com/org/b.git")]}, "x")
    # The same repository on two branches is two links.
    assert len(parse_links({"links": [_link(), _link(name="b", branch="dev")]}, "x")) == 2


def test_references_resolve_from_the_environment_or_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOK_SECRET", "s3cret")
    (tmp_path / "token").write_text("bot:abc\n")
    assert resolve_ref("env:HOOK_SECRET", "x") == "s3cret"
    assert resolve_ref(f"file:{tmp_path / 'token'}", "x") == "bot:abc"
    with pytest.raises(SettingsError, match="link a: secret: environment variable NOPE is not set"):
        resolve_ref("env:NOPE", "link a: secret")
    with pytest.raises(SettingsError, match="cannot read"):
        resolve_ref(f"file:{tmp_path / 'missing'}", "x")


def test_the_link_commands_add_list_and_remove(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "links.yaml"
    assert (
        main(
            [
                "link",
                "add",
                "https://github.com/org/alpha.git",
                "--secret",
                "env:A_SECRET",
                "--limit",
                "max_total_tokens=512",
                "--links",
                str(path),
            ]
        )
        == 0
    )
    assert (
        main(["link", "add", "/srv/git/beta.git", "--provider", "hook", "--links", str(path)]) == 0
    )
    assert [link.name for link in load_links(path)] == ["alpha", "beta"]
    assert load_links(path)[0].limits == {"max_total_tokens": 512}
    capsys.readouterr()
    assert main(["link", "list", "--links", str(path)]) == 0
    listing = capsys.readouterr().out
    assert "alpha" in listing and "env:A_SECRET" in listing and "max_total_tokens=512" in listing
    assert main(["link", "remove", "alpha", "--links", str(path)]) == 0
    assert [link.name for link in load_links(path)] == ["beta"]
    # Mistakes are errors that say what is there; the file is untouched.
    before = path.read_text()
    assert main(["link", "remove", "gamma", "--links", str(path)]) == 2
    assert main(["link", "add", "https://x:tok@h/o/r.git", "--links", str(path)]) == 2
    error = capsys.readouterr().err
    assert "no link named 'gamma'" in error and "linked: beta" in error
    assert "holds credentials" in error and "tok" not in error.replace("token", "")
    assert path.read_text() == before


def test_a_deployment_of_a_link_runs_only_its_repository(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    link = Link(name="alpha", url="https://github.com/org/alpha.git")
    monkeypatch.setenv("TEXTGEN_LINK", link.public_json())
    assert link_for("https://github.com/org/alpha", "main", required=False) == link
    with pytest.raises(SettingsError, match=r"this deployment runs only .*alpha\.git@main"):
        link_for("https://github.com/org/other.git", "main", required=False)
    with pytest.raises(SettingsError, match="runs only"):
        link_for("https://github.com/org/alpha.git", "dev", required=False)


def test_with_a_links_file_pushes_must_be_linked_and_manual_runs_need_not(
    tmp_path: Path,
) -> None:
    save_links([Link(name="alpha", url="https://github.com/org/alpha.git")])
    assert link_for("https://github.com/org/alpha.git", "main", required=True) is not None
    with pytest.raises(SettingsError, match=r"is not a linked repository; linked: .*alpha"):
        link_for("https://github.com/org/beta.git", "main", required=True)
    assert link_for("https://github.com/org/beta.git", "main", required=False) is None


def test_secrets_stay_references_in_the_file_and_the_deployment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("A_SECRET", "value-never-written")
    link = Link(name="alpha", url="https://github.com/org/alpha.git", secret="env:A_SECRET")
    path = save_links([link])
    assert "value-never-written" not in path.read_text()
    assert "value-never-written" not in link.public_json()
    assert link.webhook_secret() == b"value-never-written"
    assert yaml.safe_load(path.read_text())["links"][0]["secret"] == "env:A_SECRET"


def _push(repo: str, branch: str = "main") -> bytes:
    return json.dumps(
        {
            "ref": f"refs/heads/{branch}",
            "before": "0" * 39 + "1",
            "after": "a" * 40,
            "repository": {"clone_url": repo},
            "commits": [],
        }
    ).encode()


def _deliver(receiver: Receiver, body: bytes, secret: bytes, provider: str = "github") -> Any:
    headers = {
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": sign(secret, body)[-12:],
        "X-Hub-Signature-256": sign(secret, body),
        "X-Gitlab-Event": "Push Hook",
        "X-Gitlab-Token": secret.decode(),
    }
    return receiver.handle(provider, headers, body)


def test_one_receiver_serves_every_link_each_with_its_own_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALPHA_SECRET", "alpha-s")
    monkeypatch.setenv("BETA_TOKEN", "beta-t")
    links = [
        Link(name="alpha", url="https://github.com/org/alpha.git", secret="env:ALPHA_SECRET"),
        Link(
            name="beta",
            url="https://gitlab.example.com/team/beta.git",
            provider="gitlab",
            secret="env:BETA_TOKEN",
        ),
    ]
    outbox = Outbox(tmp_path / "outbox.sqlite")
    receiver = Receiver.for_links([Served.of(link) for link in links], outbox)
    alpha, beta = "https://github.com/org/alpha.git", "https://gitlab.example.com/team/beta.git"

    accepted = _deliver(receiver, _push(alpha), b"alpha-s")
    assert (accepted.status, accepted.body["link"]) == (202, "alpha")
    accepted = _deliver(receiver, _push(beta), b"beta-t", "gitlab")
    assert (accepted.status, accepted.body["link"]) == (202, "beta")
    # alpha's secret cannot start runs of beta, nor of a repository nobody linked.
    refused = _deliver(receiver, _push(beta, "main").replace(b"a" * 40, b"b" * 40), b"alpha-s")
    assert refused.status == 202 and refused.body["status"] == "ignored"
    assert "this receiver serves https://github.com/org/alpha.git" in refused.body["reason"]
    other = _deliver(receiver, _push("https://github.com/evil/x.git"), b"alpha-s")
    assert other.body["status"] == "ignored"
    assert _deliver(receiver, _push(alpha), b"wrong").status == 401
    # A GitLab project's token is checked on the GitLab endpoint only.
    assert _deliver(receiver, _push(beta), b"beta-t", "github").status == 401
    assert outbox.counts() == {"pending": 2}


def test_a_push_of_an_unlinked_repository_records_nothing(
    prefect_harness: None, make_repo: RepoFactory, tiny_model: Path
) -> None:
    from mlflow import MlflowClient

    from flows.text_generation import nlp_text_generation

    linked = make_repo({"textgen.yaml": settings_yaml(tiny_model)})
    other = make_repo({"textgen.yaml": settings_yaml(tiny_model)})
    save_links([Link(name="linked", url=str(linked.path), provider="hook")])
    with pytest.raises(SettingsError, match="is not a linked repository"):
        nlp_text_generation(repo_url=str(other.path), trigger="push")
    assert MlflowClient().get_experiment_by_name(str(other.path)) is None


def test_a_links_limits_and_credentials_hold_for_its_runs_only(
    prefect_harness: None, make_repo: RepoFactory, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.text_generation import nlp_text_generation

    repo = make_repo(
        {
            "textgen.yaml": settings_yaml(tiny_model, num_return_sequences=3),
            ".gradient/workflows/w.yaml": "on:\n  github:\n    branches:\n      only: main\n",
        }
    )
    save_links(
        [
            Link(
                name="capped",
                url=str(repo.path),
                provider="hook",
                limits={"max_return_sequences": 2},
            )
        ]
    )
    with pytest.raises(SettingsError, match="num_return_sequences"):
        nlp_text_generation(repo_url=str(repo.path), trigger="push")
    # The same repository run by hand, unlinked limits: the operator's defaults.
    save_links([])
    record = nlp_text_generation(repo_url=str(repo.path), trigger="manual")
    assert record.outcome == "new"


def test_serving_a_link_without_a_secret_needs_insecure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "unsigned.yaml"
    save_links([Link(name="open", url="https://github.com/org/open.git")], path)
    assert main(["receive", "--links", str(path), "--port", "0"]) == 2
    error = capsys.readouterr().err
    assert "link 'open' has no webhook secret" in error and "--insecure" in error


def test_team_up_without_links_says_how_to_add_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "none.yaml"
    assert main(["team", "up", "--home", str(tmp_path / "team"), "--links", str(empty)]) == 2
    assert "no linked repositories" in capsys.readouterr().err
    assert not (tmp_path / "team").exists()
