"""The push receiver: signatures, payload parsing, status codes, dedupe, the durable outbox."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from deployments.service.emitter import Emitter
from deployments.service.http import start_http
from deployments.service.outbox import Outbox, event_document
from deployments.service.poller import Poller
from deployments.service.providers import sign, verify_signature
from deployments.service.receiver import Receiver
from tasks.repo import RepoLocation
from tests.conftest import RepoFactory

SECRET = b"It's a Secret to Everybody"
SHA_A = "a" * 40
SHA_B = "b" * 40


def test_github_published_signature_vector() -> None:
    expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    assert sign(SECRET, b"Hello, World!") == expected
    assert verify_signature(SECRET, b"Hello, World!", expected)
    assert not verify_signature(SECRET, b"Hello, World?", expected)
    assert not verify_signature(SECRET, b"Hello, World!", expected.replace("sha256=", "sha1="))
    assert not verify_signature(SECRET, b"Hello, World!", None)
    assert not verify_signature(b"other", b"Hello, World!", expected)


def github_push(
    after: str = SHA_A,
    ref: str = "refs/heads/main",
    before: str = SHA_B,
    repo: str = "https://github.com/octo/widget",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "ref": ref,
        "before": before,
        "after": after,
        "forced": False,
        "deleted": False,
        "repository": {
            "full_name": "octo/widget",
            "clone_url": f"{repo}.git",
            "html_url": repo,
            "url": "https://api.github.com/repos/octo/widget",
        },
        "pusher": {"name": "octo"},
        "commits": [
            {"added": ["a.txt"], "removed": [], "modified": ["textgen.yaml"]},
            {"added": [], "removed": ["old.md"], "modified": ["a.txt"]},
        ],
        **extra,
    }


@pytest.fixture
def receiver(tmp_path: Path) -> Receiver:
    repo = RepoLocation.parse("https://github.com/octo/widget.git")
    return Receiver(repo, "main", SECRET, Outbox(tmp_path / "outbox.sqlite"))


def deliver(
    receiver: Receiver,
    payload: Any,
    event: str = "push",
    delivery: str = "d-1",
    provider: str = "github",
    signature: str | None = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
):  # type: ignore[no-untyped-def]
    body = raw if raw is not None else json.dumps(payload).encode()
    h = {
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery,
        "X-Hub-Signature-256": signature if signature is not None else sign(SECRET, body),
        "Content-Type": "application/json",
        **(headers or {}),
    }
    return receiver.handle(provider, h, body)


def test_a_signed_push_is_stored_before_the_answer(receiver: Receiver) -> None:
    verdict = deliver(receiver, github_push())
    assert verdict.status == 202 and verdict.body["status"] == "queued"
    ((provider, delivery, event),) = receiver.outbox.pending()
    assert (provider, delivery) == ("github", "d-1")
    assert event["event"] == "git.push"
    assert event["id"] == verdict.body["event_id"]
    assert event["resource"]["prefect.resource.id"].startswith("git.repo.")
    assert event["resource"]["git.repository"] == "https://github.com/octo/widget.git"
    assert event["resource"]["git.branch"] == "main"
    payload = event["payload"]
    assert (payload["after"], payload["before"], payload["ref"]) == (
        SHA_A,
        SHA_B,
        "refs/heads/main",
    )
    assert payload["changed_paths"] == ["a.txt", "old.md", "textgen.yaml"]
    assert payload["trigger"] == "push" and payload["pusher"] == "octo"


@pytest.mark.parametrize(
    ("signature", "status"),
    [("", 401), ("sha256=" + "0" * 64, 401), ("garbage", 401)],
)
def test_bad_or_missing_signatures_are_refused(
    receiver: Receiver, signature: str, status: int
) -> None:
    verdict = deliver(receiver, github_push(), signature=signature)
    assert verdict.status == status
    assert verdict.body == {"error": "missing or invalid signature"}
    assert receiver.outbox.pending() == []


@pytest.mark.parametrize(
    ("kwargs", "status", "text"),
    [
        ({"event": "ping", "payload": {"zen": "Design for failure."}}, 200, "pong"),
        ({"event": "issues", "payload": {"action": "opened"}}, 202, "event 'issues' starts no run"),
        (
            {"payload": github_push(ref="refs/tags/v1.0")},
            202,
            "tag push refs/tags/v1.0 starts no run",
        ),
        (
            {"payload": github_push(ref="refs/heads/dev")},
            202,
            "push to refs/heads/dev; this receiver serves main",
        ),
        (
            {"payload": github_push(after="0" * 40, deleted=True)},
            202,
            "branch deletion refs/heads/main",
        ),
        (
            {"payload": github_push(repo="https://github.com/evil/fork")},
            202,
            "push for https://github.com/evil/fork.git",
        ),
        ({"raw": b"{not json"}, 400, "body is not valid JSON"),
        ({"payload": ["a", "list"]}, 400, "push payload must be a JSON object"),
        (
            {"payload": {"ref": "refs/heads/main", "after": "12345e7"}},
            400,
            "40-character `after` SHA",
        ),
    ],
)
def test_everything_else_gets_its_status_and_no_run(
    receiver: Receiver, kwargs: dict[str, Any], status: int, text: str
) -> None:
    verdict = deliver(receiver, kwargs.pop("payload", None), **kwargs)
    assert verdict.status == status
    assert text in json.dumps(verdict.body)
    assert receiver.outbox.pending() == []


def test_redelivery_and_the_same_commit_start_one_run(receiver: Receiver) -> None:
    assert deliver(receiver, github_push(), delivery="d-1").body["status"] == "queued"
    again = deliver(receiver, github_push(), delivery="d-1")
    assert (again.status, again.body["status"]) == (200, "duplicate delivery")
    other = deliver(receiver, github_push(), delivery="d-2")
    assert (other.status, other.body["status"]) == (200, "duplicate commit")
    assert len(receiver.outbox.pending()) == 1
    assert deliver(receiver, github_push(after=SHA_B, before=SHA_A), delivery="d-3").status == 202
    assert receiver.outbox.counts() == {"pending": 2, "duplicate": 1}


def test_unknown_changed_files_are_left_to_git(receiver: Receiver) -> None:
    forced = deliver(receiver, github_push(forced=True), delivery="f")
    assert forced.push is not None and forced.push.changed_paths is None
    truncated = github_push(
        after=SHA_B, commits=[{"added": [], "removed": [], "modified": ["x"]}] * 20
    )
    verdict = deliver(receiver, truncated, delivery="t")
    assert verdict.push is not None and verdict.push.changed_paths is None
    no_commits = deliver(receiver, github_push(after="c" * 40, commits=[]), delivery="n")
    assert no_commits.push is not None and no_commits.push.changed_paths is None


def test_form_encoded_github_deliveries(receiver: Receiver) -> None:
    body = ("payload=" + quote(json.dumps(github_push()))).encode()
    verdict = deliver(
        receiver, None, raw=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert verdict.status == 202


def test_gitlab_token_and_payload(tmp_path: Path) -> None:
    repo = RepoLocation.parse("https://gitlab.example.com/group/widget.git")
    receiver = Receiver(repo, "main", b"tok", Outbox(tmp_path / "o.sqlite"))
    payload = {
        "object_kind": "push",
        "ref": "refs/heads/main",
        "before": SHA_B,
        "after": SHA_A,
        "user_username": "dev",
        "project": {"git_http_url": "https://gitlab.example.com/group/widget.git"},
        "commits": [{"added": [], "modified": ["textgen.yaml"], "removed": []}],
        "total_commits_count": 1,
    }
    body = json.dumps(payload).encode()
    headers = {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Event-UUID": "u-1"}
    assert receiver.handle("gitlab", {**headers, "X-Gitlab-Token": "nope"}, body).status == 401
    verdict = receiver.handle("gitlab", {**headers, "X-Gitlab-Token": "tok"}, body)
    assert verdict.status == 202 and verdict.push is not None
    assert verdict.push.changed_paths == ["textgen.yaml"] and verdict.push.pusher == "dev"
    truncated = {**payload, "after": SHA_B, "total_commits_count": 40}
    verdict = receiver.handle(
        "gitlab",
        {**headers, "X-Gitlab-Token": "tok", "X-Gitlab-Event-UUID": "u-2"},
        json.dumps(truncated).encode(),
    )
    assert verdict.push is not None and verdict.push.changed_paths is None
    tag = receiver.handle(
        "gitlab",
        {"X-Gitlab-Event": "Tag Push Hook", "X-Gitlab-Token": "tok"},
        json.dumps({**payload, "ref": "refs/tags/v1"}).encode(),
    )
    assert tag.status == 202 and tag.body["status"] == "ignored"


def test_gitea_signature_header(tmp_path: Path) -> None:
    import hashlib
    import hmac

    repo = RepoLocation.parse("https://gitea.example.com/octo/widget.git")
    receiver = Receiver(repo, "main", b"s", Outbox(tmp_path / "o.sqlite"))
    body = json.dumps(github_push(repo="https://gitea.example.com/octo/widget")).encode()
    signature = hmac.new(b"s", body, hashlib.sha256).hexdigest()
    headers = {"X-Gitea-Event": "push", "X-Gitea-Delivery": "g-1", "X-Gitea-Signature": signature}
    assert receiver.handle("gitea", headers, body).status == 202
    assert receiver.handle("gitea", {**headers, "X-Gitea-Signature": "0" * 64}, body).status == 401


def test_event_ids_are_stable_per_delivery() -> None:
    repo = RepoLocation.parse("/srv/repo.git")
    from deployments.service.providers import PushEvent

    push = PushEvent("github", "d-1", "refs/heads/main", SHA_A, None, None)
    assert (
        event_document(push, repo, "main", 1.0)["id"]
        == event_document(push, repo, "main", 99.0)["id"]
    )
    other = PushEvent("github", "d-2", "refs/heads/main", SHA_A, None, None)
    assert (
        event_document(push, repo, "main", 1.0)["id"]
        != event_document(other, repo, "main", 1.0)["id"]
    )


def test_the_emitter_retries_until_the_api_takes_the_event(receiver: Receiver) -> None:
    deliver(receiver, github_push(), delivery="d-1")
    deliver(receiver, github_push(after=SHA_B), delivery="d-2")
    taken: list[str] = []
    down = {"value": True}

    def send(events: list[dict[str, Any]]) -> None:
        if down["value"]:
            raise ConnectionError("Prefect API is down")
        taken.extend(e["payload"]["after"] for e in events)

    emitter = Emitter(receiver.outbox, send)
    assert emitter.drain() is False
    assert emitter.backoff.delay > 0 and len(receiver.outbox.pending()) == 2
    # A restart of the receiver process finds the events still there.
    reopened = Outbox(receiver.outbox.path)
    assert [d for _, d, _ in reopened.pending()] == ["d-1", "d-2"]
    down["value"] = False
    assert Emitter(reopened, send).drain() is True
    assert taken == [SHA_A, SHA_B]
    assert reopened.pending() == [] and reopened.counts() == {"sent": 2}


def test_an_event_the_api_refuses_is_kept_as_refused_and_holds_up_nothing(
    receiver: Receiver,
) -> None:
    import httpx

    deliver(receiver, github_push(), delivery="d-1")
    deliver(receiver, github_push(after=SHA_B), delivery="d-2")
    taken: list[str] = []

    def send(events: list[dict[str, Any]]) -> None:
        (event,) = events
        if event["payload"]["after"] == SHA_A:
            request = httpx.Request("POST", "http://127.0.0.1/api/events")
            response = httpx.Response(422, request=request, text="invalid event")
            raise httpx.HTTPStatusError("422 Unprocessable", request=request, response=response)
        taken.append(event["payload"]["after"])

    assert Emitter(receiver.outbox, send).drain() is True
    assert taken == [SHA_B]
    assert receiver.outbox.counts() == {"refused": 1, "sent": 1}


def test_the_latest_push_is_known_in_arrival_order(receiver: Receiver) -> None:
    assert receiver.outbox.latest(receiver.repo, "main") is None
    deliver(receiver, github_push(after=SHA_B), delivery="1")
    time.sleep(0.01)
    deliver(receiver, github_push(after=SHA_A), delivery="2")
    assert receiver.outbox.latest(receiver.repo, "main") == SHA_A


def test_the_poller_emits_when_the_branch_moves(make_repo: RepoFactory, tmp_path: Path) -> None:
    repo = make_repo({"a.txt": "1"})
    location = RepoLocation.parse(str(repo.path))
    outbox = Outbox(tmp_path / "poll.sqlite")
    poller = Poller(location, "main", outbox, 60)
    first = poller.check()
    assert first == repo.git("rev-parse", "HEAD")
    assert outbox.pending() == [], "the first look only records where the branch is"
    assert poller.check() == first and outbox.pending() == []
    new = repo.commit({"a.txt": "2"})
    assert poller.check() == new
    ((provider, _, event),) = outbox.pending()
    assert provider == "poll"
    assert event["payload"]["trigger"] == "poll"
    assert (event["payload"]["before"], event["payload"]["after"]) == (first, new)
    assert event["payload"]["changed_paths"] is None


@pytest.fixture
def http_receiver(receiver: Receiver) -> Iterator[tuple[str, int]]:
    receiver.max_bytes = 1024
    server = start_http(receiver, "127.0.0.1", 0)
    try:
        yield "127.0.0.1", int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def request(
    address: tuple[str, int],
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    connection = HTTPConnection(*address, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


def test_http_endpoint_status_codes(http_receiver: tuple[str, int]) -> None:
    body = json.dumps(github_push(commits=[])).encode()
    headers = {
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": "h-1",
        "X-Hub-Signature-256": sign(SECRET, body),
        "Content-Type": "application/json",
    }
    assert request(http_receiver, "POST", "/webhooks/github", body, headers)[0] == 202
    assert request(http_receiver, "POST", "/webhooks/github", b"x" * 2048, headers)[0] == 413
    assert request(http_receiver, "POST", "/webhooks/bitbucket", body, headers)[0] == 404
    assert request(http_receiver, "POST", "/elsewhere", body, headers)[0] == 404
    assert request(http_receiver, "PUT", "/webhooks/github", body, headers)[0] == 405
    status, health = request(http_receiver, "GET", "/healthz")
    assert status == 200 and health["outbox"] == {"pending": 1}


def test_the_endpoint_survives_concurrent_deliveries(
    http_receiver: tuple[str, int], receiver: Receiver
) -> None:
    def push(index: int) -> None:
        body = json.dumps(github_push(after=f"{index:040x}", commits=[])).encode()
        headers = {
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": f"c-{index}",
            "X-Hub-Signature-256": sign(SECRET, body),
        }
        assert request(http_receiver, "POST", "/webhooks/github", body, headers)[0] == 202

    threads = [threading.Thread(target=push, args=(i + 1,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(receiver.outbox.pending()) == 20


def test_the_receiver_refuses_to_start_without_a_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from deployments.cli import main
    from deployments.service.receiver import read_secret
    from tasks.errors import ServeError

    monkeypatch.delenv("TEXTGEN_WEBHOOK_SECRET", raising=False)
    with pytest.raises(
        ServeError, match="no webhook secret: set TEXTGEN_WEBHOOK_SECRET or pass --secret-file"
    ):
        read_secret(None, insecure=False)
    assert read_secret(None, insecure=True) is None
    monkeypatch.setenv("TEXTGEN_WEBHOOK_SECRET", " from-env ")
    assert read_secret(None, insecure=False) == b"from-env"
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-file\n")
    assert read_secret(str(secret_file), insecure=False) == b"from-file"
    secret_file.write_text("")
    with pytest.raises(ServeError, match="is empty"):
        read_secret(str(secret_file), insecure=False)
    monkeypatch.delenv("TEXTGEN_WEBHOOK_SECRET")
    assert main(["serve", "--repo", str(tmp_path)]) == 6
    assert "no webhook secret" in capsys.readouterr().err


@pytest.mark.parametrize("repository", ["octo/widget", {}, None, [], {"url": 7}])
def test_a_payload_without_a_usable_repository_is_refused(
    receiver: Receiver, repository: Any
) -> None:
    payload = github_push()
    if repository is None:
        del payload["repository"]
    else:
        payload["repository"] = repository
    verdict = deliver(receiver, payload)
    assert verdict.status == 400
    assert "names no repository" in verdict.body["error"]
    assert receiver.outbox.pending() == []


def test_a_deeply_nested_body_is_a_bad_request(receiver: Receiver) -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    verdict = receiver.handle(
        "github",
        {"X-GitHub-Event": "push", "X-Hub-Signature-256": sign(SECRET, body)},
        body,
    )
    assert verdict.status == 400 and "nested too deeply" in verdict.body["error"]


def test_a_push_naming_thirty_thousand_paths_becomes_a_small_event(receiver: Receiver) -> None:
    paths = [f"data/shard-{i:05d}/part-with-a-longer-file-name.json" for i in range(30_000)]
    payload = github_push(commits=[{"added": paths, "removed": [], "modified": []}])
    assert len(json.dumps(payload)) > 1_500_000  # over the Prefect server's event limit
    verdict = deliver(receiver, payload)
    assert verdict.status == 202
    ((_, _, event),) = receiver.outbox.pending()
    assert len(json.dumps(event)) < 64 * 1024
    assert event["payload"]["changed_paths"] is None  # the flow asks git instead


def test_an_event_stays_small_whatever_the_paths(receiver: Receiver) -> None:
    from deployments.service.outbox import MAX_EVENT_BYTES
    from deployments.service.providers import PushEvent

    push = PushEvent("github", "d", "refs/heads/main", SHA_A, SHA_B, ["x" * 400] * 400)
    event = event_document(push, receiver.repo, "main", time.time())
    assert len(json.dumps(event)) <= MAX_EVENT_BYTES
    assert event["payload"]["changed_paths"] is None


def test_latest_push_follows_the_chain_of_pushes_not_arrival(receiver: Receiver) -> None:
    x, y, w = "1" * 40, "2" * 40, "3" * 40
    # Y (whose parent push is X) arrives first, then X three seconds "later".
    assert deliver(receiver, github_push(after=y, before=x), delivery="dy").status == 202
    assert deliver(receiver, github_push(after=x, before=w), delivery="dx").status == 202
    assert receiver.outbox.latest(receiver.repo, "main") == y
    # A force-push replaces Y with Z: the chain still says Z is the tip.
    z = "4" * 40
    assert (
        deliver(receiver, github_push(after=z, before=y, forced=True), delivery="dz").status == 202
    )
    assert receiver.outbox.latest(receiver.repo, "main") == z


def test_handled_deliveries_are_pruned_after_the_retention(receiver: Receiver) -> None:
    outbox = receiver.outbox
    deliver(receiver, github_push(after=SHA_A), delivery="old")
    deliver(receiver, github_push(after=SHA_A), delivery="old-dup")
    deliver(receiver, github_push(after="c" * 40), delivery="pending")
    outbox.mark("github", "old", None)
    assert outbox.counts() == {"sent": 1, "duplicate": 1, "pending": 1}
    assert outbox.prune(older_than=3600) == 0
    assert outbox.prune(older_than=-1) == 2
    assert outbox.counts() == {"pending": 1}, "a push not yet sent is never pruned"


def test_slow_senders_are_cut_off_and_connections_are_bounded(receiver: Receiver) -> None:
    import socket

    server = start_http(receiver, "127.0.0.1", 0, max_connections=3, connection_seconds=3)
    address = ("127.0.0.1", int(server.server_address[1]))
    trickling = []
    try:
        # Two senders that never finish, one after the other: headers, then a body.
        for head in (
            b"POST /webhooks/github HTTP/1.1\r\nHost: x\r\nX-Slow: ",
            b"POST /webhooks/github HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n\r\nxx",
        ):
            sock = socket.create_connection(address, timeout=30)
            sock.sendall(head)
            trickling.append(sock)
            time.sleep(0.3)
        # A third connection reaches the limit: turned away at once, no thread queued for it.
        connection = HTTPConnection(*address, timeout=10)
        try:
            connection.request("GET", "/healthz")
            assert connection.getresponse().status == 503
        finally:
            connection.close()
        # At their deadline the slow connections are closed by the server...
        for sock in trickling:
            sock.settimeout(30)
            assert sock.recv(65536) is not None  # returns (b"" or a 408) once closed
        # ...and the endpoint serves again.
        assert request(address, "GET", "/healthz")[0] == 200
    finally:
        for sock in trickling:
            sock.close()
        server.shutdown()
        server.server_close()


def test_the_prefect_server_gets_none_of_our_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deployments.ops.prefect_server import LocalPrefectServer

    monkeypatch.setenv("TEXTGEN_GIT_CREDENTIALS", "user:ghp_secret")
    monkeypatch.setenv("TEXTGEN_WEBHOOK_SECRET", "hook-secret")
    env = LocalPrefectServer(home=tmp_path).environment()
    assert "ghp_secret" not in json.dumps(env) and "hook-secret" not in json.dumps(env)
    assert env["PREFECT_HOME"] == str(tmp_path)


def test_a_push_missed_while_nothing_listened_is_caught_up_on_start(
    make_repo: RepoFactory, tmp_path: Path
) -> None:
    from deployments.service.providers import PushEvent

    repo = make_repo({"a.txt": "1"})
    location = RepoLocation.parse(str(repo.path))
    outbox = Outbox(tmp_path / "catch-up.sqlite")
    poller = Poller(location, "main", outbox, 60)
    assert poller.catch_up() is None, "a first start runs nothing by itself"
    seen = repo.git("rev-parse", "HEAD")
    push = PushEvent("github", "d-1", "refs/heads/main", seen, None, None)
    outbox.enqueue(push, location, "main")
    assert poller.catch_up() is None, "nothing moved"
    missed = repo.commit({"a.txt": "2"})  # pushed while the receiver was down
    assert poller.catch_up() == "queued"
    event = outbox.pending()[-1][2]
    assert (event["payload"]["before"], event["payload"]["after"]) == (seen, missed)
    assert poller.catch_up() is None, "queued once"
