"""Pull request deliveries: the providers' published payload examples, read and queued as previews."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from deployments.service.outbox import Outbox, event_document
from deployments.service.providers import parse_pull_request, sign
from deployments.service.receiver import Receiver, Served
from tasks.links import Link
from tasks.names import PULL_REQUEST_EVENT
from tasks.repo import RepoLocation

DATA = Path(__file__).parent / "data" / "providers"
SECRET = b"pull-request-secret"


def example(name: str) -> dict[str, Any]:
    return dict(json.loads((DATA / name).read_text()))


@pytest.mark.parametrize(
    ("provider", "name", "number", "head", "base", "branch", "fork", "ref"),
    [
        (
            "github",
            "github_pull_request_opened.json",
            2,
            "ec26c3e57ca3a959ca5aad62de7213c562f8c821",
            "master",
            "changes",
            False,
            "refs/pull/2/head",
        ),
        (
            "github",
            "github_pull_request_synchronize.json",
            2,
            "ec26c3e57ca3a959ca5aad62de7213c562f8c821",
            "master",
            "changes",
            False,
            "refs/pull/2/head",
        ),
        (
            "gitea",
            "gitea_pull_request_opened.json",
            1,
            "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c",
            "main",
            "feature/changes",
            True,  # the example names no head repository
            "refs/pull/1/head",
        ),
        (
            "gitlab",
            "gitlab_merge_request_open.json",
            1,
            "da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
            "master",
            "ms-viewport",
            False,
            "refs/merge-requests/1/head",
        ),
    ],
)
def test_published_examples_are_read(
    provider: str,
    name: str,
    number: int,
    head: str,
    base: str,
    branch: str,
    fork: bool,
    ref: str,
) -> None:
    pull = parse_pull_request(provider, example(name))
    assert (pull.number, pull.head, pull.base, pull.head_branch, pull.fork, pull.ref) == (
        number,
        head,
        base,
        branch,
        fork,
        ref,
    )


def test_a_fork_is_told_apart_from_a_branch() -> None:
    payload = example("github_pull_request_opened.json")
    payload["pull_request"]["head"]["repo"]["full_name"] = "mallory/Hello-World"
    assert parse_pull_request("github", payload).fork
    gitlab = example("gitlab_merge_request_open.json")
    gitlab["object_attributes"]["source_project_id"] = 99
    assert parse_pull_request("gitlab", gitlab).fork


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p["pull_request"]["head"].update(sha="abc"), "40-character SHA"),
        (lambda p: p.update(number=0) or p["pull_request"].update(number=0), "positive"),
        (lambda p: p.pop("pull_request"), "needs `pull_request`"),
        (lambda p: p["pull_request"]["base"].update(ref=""), "base branch"),
    ],
)
def test_a_malformed_pull_request_is_refused_with_the_reason(mutate: Any, message: str) -> None:
    payload = example("github_pull_request_opened.json")
    mutate(payload)
    with pytest.raises(ValueError, match=message):
        parse_pull_request("github", payload)


def served(
    provider: str, url: str, branch: str, previews: str = "all", token: bool = True
) -> Served:
    link = Link(
        name="hello",
        url=url,
        branch=branch,
        provider=provider,  # type: ignore[arg-type]
        secret="env:UNUSED",
        token="env:HELLO_TOKEN" if token else None,
        previews=previews,  # type: ignore[arg-type]
    )
    return Served(
        link.name,
        RepoLocation.parse(link.url),
        link.branch,
        SECRET,
        frozenset({provider}),
        link.previews,
        token,
        link,
    )


def headers(provider: str, body: bytes, delivery: str) -> dict[str, str]:
    if provider == "gitlab":
        return {
            "X-Gitlab-Event": "Merge Request Hook",
            "X-Gitlab-Token": SECRET.decode(),
            "X-Gitlab-Event-UUID": delivery,
        }
    if provider == "gitea":
        return {
            "X-Gitea-Event": "pull_request",
            "X-Gitea-Delivery": delivery,
            "X-Gitea-Signature": hmac.new(SECRET, body, hashlib.sha256).hexdigest(),
        }
    return {
        "X-GitHub-Event": "pull_request",
        "X-GitHub-Delivery": delivery,
        "X-Hub-Signature-256": sign(SECRET, body),
    }


CASES = {
    "github": (
        "github_pull_request_opened.json",
        "https://github.com/Codertocat/Hello-World",
        "master",
    ),
    "gitea": (
        "gitea_pull_request_opened.json",
        "https://gitea.golang.org/gordon/hello-world",
        "main",
    ),
    "gitlab": (
        "gitlab_merge_request_open.json",
        "http://example.com/gitlabhq/gitlab-test",
        "master",
    ),
}


@pytest.mark.parametrize("provider", ["github", "gitea", "gitlab"])
def test_a_signed_pull_request_is_queued_as_a_preview(provider: str, tmp_path: Path) -> None:
    name, url, branch = CASES[provider]
    outbox = Outbox(tmp_path / "outbox.sqlite")
    receiver = Receiver.for_links([served(provider, url, branch)], outbox)
    body = json.dumps(example(name)).encode()
    verdict = receiver.handle(provider, headers(provider, body, "d-1"), body)
    assert verdict.status == 202, verdict.body
    assert verdict.body["status"] == "queued" and verdict.push is not None
    push = verdict.push
    assert push.trigger == "preview" and push.branch == branch
    pending = outbox.pending()
    assert len(pending) == 1
    event = pending[0][2]
    assert event["event"] == PULL_REQUEST_EVENT
    assert event["resource"]["git.branch"] == branch
    assert event["payload"]["pull_request"]["number"] == push.pull_request["number"]  # type: ignore[index]
    # The result goes back to the provider: a report row, in the same transaction.
    with sqlite3.connect(outbox.path) as db:
        rows = db.execute("SELECT link, kind, sha, pr, phase FROM reports").fetchall()
    assert rows == [("hello", "preview", push.after, push.pull_request["number"], "queued")]  # type: ignore[index]
    # The same delivery again starts nothing more.
    again = receiver.handle(provider, headers(provider, body, "d-1"), body)
    assert again.body["status"] == "duplicate delivery"


def test_what_runs_no_preview_is_answered_with_the_reason(tmp_path: Path) -> None:
    name, url, branch = CASES["github"]
    outbox = Outbox(tmp_path / "outbox.sqlite")

    def answer(payload: dict[str, Any], previews: str = "all") -> dict[str, Any]:
        receiver = Receiver.for_links([served("github", url, branch, previews)], outbox)
        body = json.dumps(payload).encode()
        return receiver.handle("github", headers("github", body, f"d-{id(payload)}"), body).body

    closed = example("github_pull_request_opened.json") | {"action": "closed"}
    assert "action 'closed'" in answer(closed)["reason"]
    other_base = copy.deepcopy(example(name))
    other_base["pull_request"]["base"]["ref"] = "develop"
    assert "into develop" in answer(other_base)["reason"]
    assert "previews are off" in answer(example(name), "off")["reason"]
    fork = copy.deepcopy(example(name))
    fork["pull_request"]["head"]["repo"]["full_name"] = "mallory/Hello-World"
    assert "from a fork" in answer(fork, "same-repo")["reason"]
    assert answer(example(name), "same-repo")["status"] == "queued"
    assert outbox.counts() == {"pending": 1}


def test_a_gitlab_update_without_new_commits_runs_nothing(tmp_path: Path) -> None:
    name, url, branch = CASES["gitlab"]
    payload = example(name)
    payload["object_attributes"]["action"] = "update"
    receiver = Receiver.for_links([served("gitlab", url, branch)], Outbox(tmp_path / "o.sqlite"))
    body = json.dumps(payload).encode()
    assert (
        "without new commits"
        in receiver.handle("gitlab", headers("gitlab", body, "u1"), body).body["reason"]
    )
    payload["object_attributes"]["oldrev"] = "1" * 40
    body = json.dumps(payload).encode()
    assert receiver.handle("gitlab", headers("gitlab", body, "u2"), body).body["status"] == "queued"


def test_a_link_without_a_token_queues_the_preview_and_no_report(tmp_path: Path) -> None:
    name, url, branch = CASES["github"]
    receiver = Receiver.for_links(
        [served("github", url, branch, token=False)], Outbox(tmp_path / "o.sqlite")
    )
    body = json.dumps(example(name)).encode()
    verdict = receiver.handle("github", headers("github", body, "x"), body)
    assert verdict.push is not None
    document = event_document(verdict.push, RepoLocation.parse(url), branch, 0.0)
    assert document["event"] == PULL_REQUEST_EVENT
    with sqlite3.connect(tmp_path / "o.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM reports").fetchone() == (0,)  # no token, no report
