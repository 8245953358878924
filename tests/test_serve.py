"""`textgen serve` against a real local Prefect server, a bare repository and an MLflow store.

One service for the module; the tests run in order and each waits for its own commits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlflow import MlflowClient

from tasks.names import is_superseded
from tasks.store import experiment_name
from tests.conftest import GitRepo, build_tiny_gpt2, settings_yaml
from tests.servers import (
    PrefectServer,
    Service,
    bare_origin,
    deliver,
    set_hook,
    start_serve,
    wait_for,
)

pytestmark = pytest.mark.server

SECRET = "serve-test-secret-4711"
SPEC = "on:\n  github:\n    branches:\n      only: main\n    paths-ignore: ['**/*.md']\n"
DEPLOYMENT = "nlp-text-generation/on-push"
TERMINAL = {"COMPLETED", "CANCELLED", "FAILED", "CRASHED"}


@dataclass
class Setup:
    prefect: PrefectServer
    service: Service
    bare: Path
    work: GitRepo
    model: Path
    receiver_url: str
    tracking_uri: str

    def mlflow(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)

    def runs(self) -> list[Any]:
        client = self.mlflow()
        experiment = client.get_experiment_by_name(experiment_name(str(self.bare)))
        if experiment is None:
            return []
        return list(client.search_runs([experiment.experiment_id], max_results=500))

    def run_for(self, sha: str, outcome: str | None = None) -> Any:
        for run in self.runs():
            tags = run.data.tags
            if tags.get("mlflow.source.git.commit") != sha or run.info.status not in {
                "FINISHED",
                "FAILED",
            }:
                continue
            if outcome is None or tags.get("textgen.outcome") == outcome:
                return run
        return None

    def wait_run(self, sha: str, outcome: str | None = None, timeout: float = 120) -> Any:
        return wait_for(
            lambda: self.run_for(sha, outcome),
            timeout,
            f"an MLflow run of {sha[:7]} ({outcome or 'any outcome'})\n{self.service.output()[-3000:]}",
        )

    def push(self, files: dict[str, str | None], message: str) -> str:
        sha = self.work.commit(files, message)
        self.work.git("push", "--quiet", "origin", "main")
        return sha

    def hook(self, enabled: bool) -> None:
        set_hook(self.bare, enabled)

    def deliver(
        self,
        payload: dict[str, Any],
        event: str = "push",
        delivery: str | None = None,
        signature: str | None = None,
    ) -> httpx.Response:
        return deliver(self.receiver_url, SECRET, payload, event, delivery, signature)

    def payload(self, after: str, before: str, ref: str = "refs/heads/main") -> dict[str, Any]:
        return {"ref": ref, "before": before, "after": after, "repository": {"url": str(self.bare)}}

    def deployment_runs(self) -> list[dict[str, Any]]:
        return self.prefect.flow_runs(DEPLOYMENT)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, shared_model_cache: Path) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("serve")
    model = build_tiny_gpt2(root / "tiny")
    work, bare = bare_origin(
        root,
        {"textgen.yaml": settings_yaml(model, random_seed=1), ".gradient/workflows/w.yaml": SPEC},
    )

    prefect = PrefectServer(root / "prefect")
    prefect.start()
    try:
        service, receiver_url, tracking_uri = start_serve(
            root, bare, prefect, SECRET, str(shared_model_cache)
        )
    except BaseException:
        prefect.stop()
        raise
    try:
        assert "Runs start warm" in service.output()
        yield Setup(prefect, service, bare, work, model, receiver_url, tracking_uri)
    finally:
        service.stop()
        prefect.stop()


def test_git_push_through_the_hook_makes_a_version(setup: Setup) -> None:
    sha = setup.push({"textgen.yaml": settings_yaml(setup.model, random_seed=2)}, "seed 2")
    run = setup.wait_run(sha, "new")
    assert run.info.status == "FINISHED"
    assert run.data.tags["textgen.trigger"] == "push"
    assert run.data.tags["textgen.version"] == "1"
    assert run.data.params["random_seed"] == "2"

    # The version is numbered before the flow run ends: its trace on MLflow's GenAI side is
    # written after (tasks.genai), so the flow run is waited for.
    def ended() -> Any:
        runs = [r for r in setup.deployment_runs() if r["parameters"].get("commit_sha") == sha]
        return runs if runs and runs[0]["state_type"] in TERMINAL else None

    (flow_run,) = wait_for(ended, 60, "the push's flow run to end")
    assert flow_run["state_type"] == "COMPLETED"
    assert run.data.tags["textgen.prefect.flow_run_id"] == flow_run["id"]


def test_a_signed_github_push_makes_a_version(setup: Setup) -> None:
    setup.hook(enabled=False)
    try:
        before = setup.work.git("rev-parse", "HEAD")
        sha = setup.push({"textgen.yaml": settings_yaml(setup.model, random_seed=3)}, "seed 3")
        response = setup.deliver(setup.payload(sha, before))
        assert response.status_code == 202 and response.json()["status"] == "queued"
        assert setup.wait_run(sha, "new").data.params["random_seed"] == "3"
    finally:
        setup.hook(enabled=True)


def test_refused_and_ignored_deliveries_start_no_run(setup: Setup) -> None:
    runs_before = len(setup.deployment_runs())
    head = setup.work.git("rev-parse", "HEAD")
    fake = "d" * 40
    assert (
        setup.deliver(setup.payload(fake, head), signature="sha256=" + "0" * 64).status_code == 401
    )
    assert setup.deliver(setup.payload(fake, head), signature="").status_code == 401
    assert setup.deliver({"zen": "Keep it logically awesome."}, event="ping").json() == {
        "status": "pong"
    }
    for payload, reason in [
        (setup.payload(fake, "0" * 40, ref="refs/tags/v1"), "tag push"),
        (setup.payload(fake, head, ref="refs/heads/dev"), "this receiver serves main"),
        ({**setup.payload("0" * 40, head), "deleted": True}, "branch deletion"),
    ]:
        response = setup.deliver(payload)
        assert response.status_code == 202 and reason in response.json()["reason"]
    time.sleep(3)
    assert len(setup.deployment_runs()) == runs_before


def test_a_readme_only_push_makes_no_new_version(setup: Setup) -> None:
    versions = {r.data.tags.get("textgen.version") for r in setup.runs()} - {None}
    sha = setup.push({"README.md": "# a typo, fixed\n"}, "Update README.md")
    run = setup.wait_run(sha, "skipped")
    assert "matches paths-ignore" in run.data.tags["textgen.skip_reason"]
    assert {r.data.tags.get("textgen.version") for r in setup.runs()} - {None} == versions


def test_the_same_delivery_twice_starts_one_run(setup: Setup) -> None:
    setup.hook(enabled=False)
    try:
        before = setup.work.git("rev-parse", "HEAD")
        sha = setup.push({"textgen.yaml": settings_yaml(setup.model, random_seed=4)}, "seed 4")
        delivery = str(uuid.uuid4())
        assert setup.deliver(setup.payload(sha, before), delivery=delivery).status_code == 202
        again = setup.deliver(setup.payload(sha, before), delivery=delivery)
        assert (again.status_code, again.json()["status"]) == (200, "duplicate delivery")
        setup.wait_run(sha, "new")
        time.sleep(2)
        assert (
            len([r for r in setup.deployment_runs() if r["parameters"].get("commit_sha") == sha])
            == 1
        )
    finally:
        setup.hook(enabled=True)


def test_a_push_while_prefect_is_down_still_runs(setup: Setup) -> None:
    setup.prefect.stop()
    try:
        sha = setup.push({"textgen.yaml": settings_yaml(setup.model, random_seed=5)}, "seed 5")
        time.sleep(3)
        assert setup.service.alive(), setup.service.output()[-3000:]
    finally:
        setup.prefect.start()
    setup.wait_run(sha, "new", timeout=180)


def test_a_burst_runs_the_newest_commit_and_leaves_nothing_pending(setup: Setup) -> None:
    shas = [
        setup.push({"textgen.yaml": settings_yaml(setup.model, random_seed=100 + i)}, f"burst {i}")
        for i in range(8)
    ]
    newest = setup.wait_run(shas[-1], "new", timeout=240)
    assert newest.data.params["random_seed"] == "107"

    def settled() -> bool:
        runs = [r for r in setup.deployment_runs() if r["parameters"].get("commit_sha") in shas]
        return bool(runs) and all(r["state_type"] in TERMINAL for r in runs)

    wait_for(settled, 120, "every burst run to end")
    generated = [
        r
        for r in setup.runs()
        if r.data.tags.get("mlflow.source.git.commit") in shas
        and r.data.tags.get("textgen.outcome") == "new"
    ]
    assert len(generated) <= 3, [r.data.tags["mlflow.source.git.commit"][:7] for r in generated]
    runs = [r for r in setup.deployment_runs() if r["parameters"].get("commit_sha") in shas]
    superseded = [r for r in runs if is_superseded(r["state"]["message"])]
    assert superseded, "older pushes are marked superseded"
    # States of Prefect's own names (its deployment page hides custom ones), named by commit.
    assert all(r["state_name"] in {"Cancelled", "Completed"} for r in superseded)
    assert all(r["name"] == f"push-{r['parameters']['commit_sha'][:12]}" for r in superseded)


def test_an_oversized_push_still_becomes_a_run(setup: Setup) -> None:
    setup.hook(enabled=False)
    try:
        before = setup.work.git("rev-parse", "HEAD")
        sha = setup.push({"textgen.yaml": settings_yaml(setup.model, random_seed=6)}, "seed 6")
        paths = [f"data/shard-{i:05d}/part-with-a-longer-file-name.json" for i in range(30_000)]
        payload = {
            **setup.payload(sha, before),
            "commits": [{"added": paths, "removed": [], "modified": ["textgen.yaml"]}],
        }
        response = setup.deliver(payload)
        assert response.status_code == 202 and response.json()["status"] == "queued"
        assert setup.wait_run(sha, "new").data.params["random_seed"] == "6"
    finally:
        setup.hook(enabled=True)


def test_deliveries_out_of_order_still_run_the_tip(setup: Setup) -> None:
    setup.hook(enabled=False)
    try:
        base = setup.work.git("rev-parse", "HEAD")
        x = setup.push({"textgen.yaml": settings_yaml(setup.model, random_seed=7)}, "seed 7")
        y = setup.push({"textgen.yaml": settings_yaml(setup.model, random_seed=8)}, "seed 8")
        assert setup.deliver(setup.payload(y, x)).status_code == 202
        time.sleep(3)
        assert setup.deliver(setup.payload(x, base)).status_code == 202
        tip = setup.wait_run(y, "new", timeout=180)
        assert tip.data.params["random_seed"] == "8"

        def settled() -> bool:
            runs = [
                r for r in setup.deployment_runs() if r["parameters"].get("commit_sha") in {x, y}
            ]
            return len(runs) == 2 and all(r["state_type"] in TERMINAL for r in runs)

        wait_for(settled, 120, "both runs to end")
        older = setup.run_for(x)
        assert older is None or older.data.tags.get("textgen.outcome") in {"skipped", "new"}
    finally:
        setup.hook(enabled=True)


def test_a_force_push_keeps_the_settings_change_it_brings(setup: Setup) -> None:
    root = setup.work.git("rev-parse", "HEAD")
    handled = setup.push({"textgen.yaml": settings_yaml(setup.model, random_seed=9)}, "A")
    setup.wait_run(handled, "new")
    setup.work.git("reset", "--quiet", "--hard", root)
    setup.work.commit({"textgen.yaml": settings_yaml(setup.model, random_seed=10)}, "B1: seed")
    tip = setup.work.commit({"README.md": "# rewritten\n"}, "B2: README")
    setup.work.git("push", "--quiet", "--force", "origin", "main")
    run = setup.wait_run(tip, "new")
    assert run.data.params["random_seed"] == "10"


def test_prefect_deployment_run_reruns_a_commit_by_hand(setup: Setup) -> None:
    first = setup.work.git("rev-list", "--max-parents=0", "HEAD")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefect",
            "--no-prompt",
            "deployment",
            "run",
            DEPLOYMENT,
            "--param",
            f'commit_sha="{first[:7]}"',
        ],
        env={**os.environ, "PREFECT_API_URL": setup.prefect.api_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    run = setup.wait_run(first, "new")
    assert run.data.tags["textgen.trigger"] == "manual"
    assert run.data.tags["textgen.requested_ref"] == first[:7]


def test_a_later_run_finds_the_model_an_earlier_run_loaded(setup: Setup) -> None:
    # Earlier tests ran this model; serve has since loaded it into the server runs fork from.
    deadline = time.monotonic() + 60
    while "Runs now start with model" not in setup.service.output():
        assert time.monotonic() < deadline, setup.service.output()[-3000:]
        time.sleep(0.5)
    sha = setup.push({"textgen.yaml": settings_yaml(setup.model, random_seed=21)}, "seed 21")
    run = setup.wait_run(sha, "new")
    assert run.data.params["model.cache_hit"] == "True"
    assert float(run.data.metrics["load_seconds"]) < 0.1
    assert run.data.params["model.fast_path"].startswith("packed-linear")
