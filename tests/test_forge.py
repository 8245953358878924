"""Contract tests: textgen's requests to GitHub, Gitea and GitLab, checked against each provider's
published API description (tests/data/providers/api_contracts.json) by a local HTTP double."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from deployments.service.forge import ForgeError, Status, forge_for
from tests.forge_double import ForgeDouble, check_request

TOKEN = "tok-s3cret-0123456789"
SHA = "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c"
REPOSITORY = {"github": "octo/hello", "gitea": "gordon/hello-world", "gitlab": "group/sub/project"}


@pytest.fixture(params=["github", "gitea", "gitlab"])
def double(request: pytest.FixtureRequest) -> Iterator[ForgeDouble]:
    forge_double = ForgeDouble(request.param)
    try:
        yield forge_double
    finally:
        forge_double.close()


def test_every_request_meets_the_published_description(double: ForgeDouble) -> None:
    forge = forge_for(double.provider, double.api_url, REPOSITORY[double.provider], TOKEN)
    for state in ("pending", "success", "failure", "error"):
        forge.set_status(
            SHA,
            Status(state, f"state {state} " + "x" * 200, "textgen/alpha", "http://ui/#/runs/1"),
        )
    forge.set_status(SHA, Status("success", "no link", "textgen/alpha"))
    first = forge.upsert_comment(7, "<!-- m -->", "first report", None)
    second = forge.upsert_comment(7, "<!-- m -->", "second report", first)
    third = forge.upsert_comment(7, "<!-- m -->", "third report", None)  # found by its marker

    assert double.violations == []
    expected = {
        "github": {
            "repos/create-commit-status",
            "issues/list-comments",
            "issues/create-comment",
            "issues/update-comment",
        },
        "gitea": {"repoCreateStatus", "issueGetComments", "issueCreateComment", "issueEditComment"},
        "gitlab": {
            "post-commit-status",
            "list-merge-request-notes",
            "create-merge-request-note",
            "modify-merge-request-note",
        },
    }[double.provider]
    assert double.operations() == expected
    # One comment, edited in place.
    assert first == second == third
    comments = double.pr_comments(7)
    assert len(comments) == 1 and comments[0]["body"].endswith("third report")
    assert comments[0]["edits"] == 2
    # The status descriptions fit GitHub's limit; states map to each provider's own.
    status = double.last_status(SHA)
    assert status is not None and "target_url" not in status
    sent = [r.body for r in double.requests if r.operation and "status" in r.operation.lower()]
    assert all(len(body["description"]) <= 140 for body in sent)
    if double.provider == "gitlab":
        assert [b["state"] for b in sent] == ["pending", "success", "failed", "failed", "success"]
        assert all(r.path.startswith("/projects/group%2Fsub%2Fproject/") for r in double.requests)
    # The token travels in the auth header only.
    for recorded in double.requests:
        assert TOKEN not in recorded.path and TOKEN not in str(recorded.query)
        assert TOKEN not in str(recorded.body)
    assert TOKEN not in repr(forge)


def test_a_deleted_comment_is_posted_again(double: ForgeDouble) -> None:
    forge = forge_for(double.provider, double.api_url, REPOSITORY[double.provider], TOKEN)
    first = forge.upsert_comment(3, "<!-- m -->", "report", None)
    with double.lock:
        double.comments.clear()  # someone deleted it
    again = forge.upsert_comment(3, "<!-- m -->", "report 2", first)
    assert again != first and len(double.pr_comments(3)) == 1
    assert double.violations == []


def test_errors_name_the_answer_never_the_token(double: ForgeDouble) -> None:
    forge = forge_for(double.provider, double.api_url, REPOSITORY[double.provider], TOKEN)
    double.fail_next.append(503)
    with pytest.raises(ForgeError) as caught:
        forge.set_status(SHA, Status("pending", "queued", "textgen/alpha"))
    assert caught.value.status == 503 and not caught.value.permanent
    assert TOKEN not in str(caught.value)
    double.fail_next.append(401)
    with pytest.raises(ForgeError) as refused:
        forge.set_status(SHA, Status("pending", "queued", "textgen/alpha"))
    assert refused.value.permanent


@pytest.mark.parametrize(
    ("provider", "method", "path", "headers", "body", "problem"),
    [
        (
            "github",
            "POST",
            "/repos/o/r/statuses/abc",
            {"Authorization": "Bearer t"},
            {"state": "skipped"},
            "is not one of",
        ),
        ("github", "POST", "/repos/o/r/statuses/abc", {}, {"state": "success"}, "no Authorization"),
        (
            "gitea",
            "POST",
            "/repos/o/r/statuses/abc",
            {"Authorization": "Bearer t"},
            {"state": "success"},
            "not of the form",
        ),
        (
            "gitea",
            "POST",
            "/repos/o/r/issues/1/comments",
            {"Authorization": "token t"},
            {"text": "x"},
            "is required",
        ),
        (
            "gitlab",
            "POST",
            "/projects/1/statuses/abc",
            {"PRIVATE-TOKEN": "t"},
            {"state": "success", "context": 5},
            "must be a string",
        ),
        (
            "gitlab",
            "PATCH",
            "/projects/1/merge_requests/1/notes/2",
            {"PRIVATE-TOKEN": "t"},
            {"body": "x"},
            "no operation",
        ),
    ],
)
def test_the_contract_check_refuses_what_the_description_does_not_allow(
    provider: str, method: str, path: str, headers: dict[str, str], body: object, problem: str
) -> None:
    _, problems = check_request(provider, method, path, [], headers, body)
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize(
    ("url", "provider", "api", "repository"),
    [
        ("https://github.com/org/alpha.git", "github", "https://api.github.com", "org/alpha"),
        ("git@github.com:org/alpha.git", "github", "https://api.github.com", "org/alpha"),
        ("https://ghe.example.com/org/a", "github", "https://ghe.example.com/api/v3", "org/a"),
        (
            "http://gitea.example.com:3000/o/r",
            "gitea",
            "http://gitea.example.com:3000/api/v1",
            "o/r",
        ),
        (
            "ssh://git@gitlab.example.com:2222/g/sub/p.git",
            "gitlab",
            "https://gitlab.example.com/api/v4",
            "g/sub/p",
        ),
    ],
)
def test_the_api_and_repository_come_from_the_link(
    url: str, provider: str, api: str, repository: str
) -> None:
    from tasks.links import Link

    link = Link(name="a", url=url, provider=provider, token="env:A_TOKEN")  # type: ignore[arg-type]
    assert link.api_target() == (api, repository)


def test_a_token_needs_a_provider_and_is_only_a_reference() -> None:
    from pydantic import ValidationError

    from tasks.links import Link

    with pytest.raises(ValidationError, match="a hook link has no provider API"):
        Link(name="a", url="/tmp/repo", provider="hook", token="env:A_TOKEN")
    with pytest.raises(ValidationError, match="set api_url and repository"):
        Link(name="a", url="/tmp/repo", provider="github", token="env:A_TOKEN")
    with pytest.raises(ValidationError, match="must be a reference"):
        Link(name="a", url="https://github.com/o/r", token="ghp_the_value_itself")
    with pytest.raises(ValidationError, match="without credentials"):
        Link(name="a", url="https://github.com/o/r", token="env:T", api_url="https://u:p@api.x")
