"""End to end: a linked repository served by `textgen serve`, results posted to a GitHub double.

A push gets a pending, then a success status naming its version; a signed `pull_request`
delivery runs a preview, whose comparison with main's latest version is posted as one comment;
a second delivery (synchronize) updates that comment in place, and a gate the new head fails
turns its status to failure. The double checks every request against GitHub's API description.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient

from tasks.store import experiment_name
from tests.conftest import GitRepo, build_tiny_gpt2, settings_yaml
from tests.forge_double import ForgeDouble
from tests.servers import PrefectServer, Service, bare_origin, deliver, start_serve, wait_for

# serve for linked repositories, a forge double and previews end to end: slow, run by CI after
# the default run (the reporter, comments and gates have fast tests of their own).
pytestmark = [pytest.mark.server, pytest.mark.slow]

SECRET = "results-e2e-secret-1234"
TOKEN = "ghp_e2eT0kenNeverLogged0000000000000000"
SPEC = yaml.safe_dump(
    {
        "on": {
            "github": {
                "branches": {"only": "main"},
                "paths-ignore": ["**/*.md"],
                "pull_request": {"branches": ["main"]},
            }
        }
    }
)
EXAMPLES = Path(__file__).parent / "data" / "providers"


@dataclass
class Setup:
    prefect: PrefectServer
    service: Service
    double: ForgeDouble
    bare: Path
    work: GitRepo
    model: Path
    receiver_url: str
    tracking_uri: str

    def runs(self) -> list[Any]:
        client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = client.get_experiment_by_name(experiment_name(str(self.bare)))
        return [] if experiment is None else list(client.search_runs([experiment.experiment_id]))

    def status(self, sha: str, final: bool = True) -> dict[str, Any] | None:
        found = self.double.last_status(sha)
        if found is None or (final and found["state"] == "pending"):
            return None
        return found

    def wait_status(self, sha: str) -> dict[str, Any]:
        return dict(
            wait_for(
                lambda: self.status(sha),
                180,
                f"a final status on {sha[:7]}\n{self.service.output()[-4000:]}",
            )
        )

    def pull_request(self, action: str, number: int, head: str) -> dict[str, Any]:
        name = "opened" if action == "opened" else "synchronize"
        payload = copy.deepcopy(
            json.loads((EXAMPLES / f"github_pull_request_{name}.json").read_text())
        )
        payload["number"] = number
        pull = payload["pull_request"]
        pull["number"] = number
        pull["head"]["sha"] = head
        pull["head"]["ref"] = f"feature-{number}"
        pull["base"]["ref"] = "main"
        payload["repository"]["clone_url"] = str(self.bare)
        return dict(payload)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, shared_model_cache: Path) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("results")
    model = build_tiny_gpt2(root / "tiny")
    work, bare = bare_origin(
        root,
        {"textgen.yaml": settings_yaml(model, random_seed=1), ".gradient/workflows/w.yaml": SPEC},
    )
    double = ForgeDouble("github")
    links = root / "links.yaml"
    links.write_text(
        yaml.safe_dump(
            {
                "links": [
                    {
                        "name": "hello",
                        "url": str(bare),
                        "provider": "github",
                        "secret": "env:HELLO_WEBHOOK_SECRET",
                        "token": "env:HELLO_API_TOKEN",
                        "api_url": double.api_url,
                        "repository": "octo/hello",
                    }
                ]
            }
        )
    )
    prefect = PrefectServer(root / "prefect")
    prefect.start()
    try:
        service, receiver_url, tracking_uri = start_serve(
            root,
            bare,
            prefect,
            SECRET,
            str(shared_model_cache),
            extra_env={"HELLO_WEBHOOK_SECRET": SECRET, "HELLO_API_TOKEN": TOKEN},
            links=links,
            deployment="hello",
        )
    except BaseException:
        prefect.stop()
        double.close()
        raise
    try:
        yield Setup(prefect, service, double, bare, work, model, receiver_url, tracking_uri)
    finally:
        service.stop()
        prefect.stop()
        double.close()


def test_a_push_gets_pending_then_its_version(setup: Setup) -> None:
    sha = setup.work.commit({"textgen.yaml": settings_yaml(setup.model, random_seed=5)}, "new seed")
    setup.work.git("push", "--quiet", "origin", "main")  # the hook delivers it
    status = setup.wait_status(sha)
    assert status["state"] == "success" and status["description"] == "Version 1 recorded"
    assert status["context"] == "textgen/hello"
    assert "#/experiments/" in status["target_url"]
    states = [s["state"] for s in setup.double.statuses[sha]]
    assert states[0] == "pending" and states[-1] == "success"
    assert setup.double.violations == []


def test_a_pull_request_preview_is_commented_and_updated_in_place(setup: Setup) -> None:
    wait_for(lambda: setup.status(setup.work.git("rev-parse", "HEAD")), 180, "the version of main")
    work = setup.work
    work.git("checkout", "--quiet", "-b", "feature-7")
    head = work.commit(
        {"textgen.yaml": settings_yaml(setup.model, random_seed=6)}, "try another seed"
    )
    work.git("push", "--quiet", "origin", "HEAD:refs/pull/7/head")  # as GitHub keeps it
    answer = deliver(
        setup.receiver_url, SECRET, setup.pull_request("opened", 7, head), "pull_request"
    )
    assert answer.status_code == 202 and answer.json()["status"] == "queued", answer.text
    status = setup.wait_status(head)
    assert status["state"] == "success", status
    assert status["context"] == "textgen/hello/preview"
    assert (
        status["description"].startswith("Preview: ") and "differ from v1" in status["description"]
    )
    comments = wait_for(lambda: setup.double.pr_comments(7), 60, "the preview comment")
    assert len(comments) == 1
    body = comments[0]["body"]
    assert body.startswith("<!-- textgen-preview hello -->")
    assert "| `random_seed` | 5 | 6 |" in body
    assert "```diff" in body and "\n- " in body and "\n+ " in body

    # A second push to the pull request adds a gate its texts cannot meet.
    second = work.commit(
        {
            "textgen.yaml": settings_yaml(setup.model, random_seed=7)
            + "gates:\n  - distinct_1 > 1.5\n"
        },
        "tighten the gate",
    )
    work.git("push", "--quiet", "--force", "origin", "HEAD:refs/pull/7/head")
    answer = deliver(
        setup.receiver_url, SECRET, setup.pull_request("synchronize", 7, second), "pull_request"
    )
    assert answer.status_code == 202, answer.text
    gated = setup.wait_status(second)
    assert gated["state"] == "failure"
    assert gated["description"].startswith("Preview gated: distinct_1 = ")
    assert "needs > 1.5" in gated["description"]
    comments = wait_for(
        lambda: [c for c in setup.double.pr_comments(7) if c["edits"] >= 1],
        60,
        "the comment updated in place",
    )
    assert (
        len(setup.double.pr_comments(7)) == 1
        and comments[0]["id"] == setup.double.pr_comments(7)[0]["id"]
    )
    assert "**Gated:** distinct_1 = " in comments[0]["body"]
    assert "| `random_seed` | 5 | 7 |" in comments[0]["body"]
    work.git("checkout", "--quiet", "main")

    # Previews are recorded, never numbered: main still has one version.
    runs = setup.runs()
    previews = [r for r in runs if r.data.tags.get("textgen.preview.pr") == "7"]
    assert {r.data.tags["textgen.outcome"] for r in previews} == {"preview"}
    assert len(previews) == 2
    assert sorted(
        r.data.tags["textgen.version"] for r in runs if "textgen.version" in r.data.tags
    ) == ["1"]
    # Every request met GitHub's description; the token went only into its header.
    assert setup.double.violations == []
    assert TOKEN not in setup.service.output()
    for run in runs:
        assert TOKEN not in json.dumps({**run.data.tags, **run.data.params})
    assert uuid.UUID(answer.json()["event_id"])


def descendants(pid: int) -> list[int]:
    """The processes below `pid`, from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_no_process_serve_starts_inherits_the_token(setup: Setup) -> None:
    assert setup.service.process is not None
    children = descendants(setup.service.process.pid)
    assert children, "serve runs its fork server as a child"
    for pid in children:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue  # ended meanwhile
        assert b"HELLO_API_TOKEN" not in environ and TOKEN.encode() not in environ, pid
