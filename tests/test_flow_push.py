"""Push-triggered runs of the flow: workflow-spec filters, superseded pushes, manual runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.text_generation import nlp_text_generation
from tasks import model as model_module
from tasks.names import is_superseded
from tasks.repo import RepoLocation, resolve_commit
from tests.conftest import RepoFactory, settings_yaml

pytestmark = pytest.mark.usefixtures("prefect_harness")

SPEC = "on:\n  github:\n    branches:\n      only: main\n    paths-ignore: ['**/*.md', 'docs/**']\n"


def tags_of(run_id: str) -> dict[str, str]:
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    return dict(client.get_run(run_id).data.tags)


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded for a skipped push")

    monkeypatch.setattr(model_module, "build_generator", refuse)


def test_a_readme_only_push_loads_no_model_and_makes_no_version(
    make_repo: RepoFactory, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo(
        {"textgen.yaml": settings_yaml(tiny_model), ".gradient/workflows/w.yaml": SPEC}
    )
    first = nlp_text_generation(repo_url=str(repo.path), trigger="push")
    assert (first.outcome, first.version) == ("new", 1)
    before = first.commit_sha
    sha = repo.commit({"README.md": "typo fixed", "docs/guide.txt": "x"}, "Update README.md")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded for a skipped push")

    monkeypatch.setattr(model_module, "build_generator", refuse)
    state = nlp_text_generation(
        repo_url=str(repo.path), commit_sha=sha, trigger="push", before=before, return_state=True
    )
    record = state.result()
    assert state.name == "Completed" and (state.message or "").startswith("Skipped: ")
    assert "matches paths-ignore" in (state.message or "")
    assert (record.outcome, record.version) == ("skipped", None)
    tags = tags_of(record.run_id)
    assert tags["textgen.outcome"] == "skipped" and tags["textgen.skip_kind"] == "filtered"
    assert (
        "every changed file (README.md, docs/guide.txt) matches paths-ignore"
        in tags["textgen.skip_reason"]
    )
    assert "textgen.version" not in tags


def test_a_manual_run_ignores_the_trigger_spec(make_repo: RepoFactory, tiny_model: Path) -> None:
    repo = make_repo({"textgen.yaml": settings_yaml(tiny_model), "README.md": "x"})
    assert nlp_text_generation(repo_url=str(repo.path)).outcome == "new"  # no workflow spec at all
    repo.commit({"README.md": "y"})
    pushed = nlp_text_generation(repo_url=str(repo.path), trigger="push")
    assert pushed.outcome == "skipped"
    assert "no workflow in .gradient/workflows/ has an on.github trigger" in pushed.reason


def test_branches_only_is_honoured(
    make_repo: RepoFactory, tiny_model: Path, no_loading: None
) -> None:
    spec = "on:\n  github:\n    branches:\n      only: release\n"
    repo = make_repo(
        {"textgen.yaml": settings_yaml(tiny_model), ".gradient/workflows/w.yaml": spec}
    )
    record = nlp_text_generation(repo_url=str(repo.path), trigger="push")
    assert record.outcome == "skipped"
    assert "branch 'main' is not in branches.only ['release']" in record.reason


def test_an_older_push_is_superseded_and_the_newest_picks_up_its_changes(
    make_repo: RepoFactory, tiny_model: Path
) -> None:
    repo = make_repo(
        {
            "textgen.yaml": settings_yaml(tiny_model, random_seed=1),
            ".gradient/workflows/w.yaml": SPEC,
        }
    )
    base = repo.git("rev-parse", "HEAD")
    assert nlp_text_generation(repo_url=str(repo.path), trigger="push").version == 1
    settings_push = repo.commit(
        {"textgen.yaml": settings_yaml(tiny_model, random_seed=2)}, "seed 2"
    )
    readme_push = repo.commit({"README.md": "docs"}, "docs")

    older = nlp_text_generation(
        repo_url=str(repo.path),
        commit_sha=settings_push,
        before=base,
        trigger="push",
        return_state=True,
    )
    assert older.name == "Completed" and is_superseded(older.message)
    assert f"main has moved on from it to {readme_push[:7]}" in (older.message or "")
    assert tags_of(older.result().run_id)["textgen.skip_kind"] == "superseded"

    # The README-only push alone would be skipped, but it carries the superseded settings change.
    newest = nlp_text_generation(
        repo_url=str(repo.path),
        commit_sha=readme_push,
        before=settings_push,
        trigger="push",
        changed_paths=["README.md"],
    )
    assert (newest.outcome, newest.version, newest.commit_sha) == ("new", 2, readme_push)

    # A manual run of an older commit is never skipped.
    manual = nlp_text_generation(repo_url=str(repo.path), commit_sha=settings_push, force=True)
    assert (manual.outcome, manual.version) == ("new", 3)


def test_a_rewritten_branch_supersedes_the_old_commit(
    make_repo: RepoFactory, tiny_model: Path, no_loading: None
) -> None:
    repo = make_repo(
        {"textgen.yaml": settings_yaml(tiny_model), ".gradient/workflows/w.yaml": SPEC}
    )
    old = repo.commit({"textgen.yaml": settings_yaml(tiny_model, random_seed=5)}, "old")
    resolve_commit(RepoLocation.parse(str(repo.path)), "main", None)  # the mirror has seen it
    repo.git("reset", "--quiet", "--hard", "HEAD~1")
    repo.commit({"textgen.yaml": settings_yaml(tiny_model, random_seed=6)}, "rewritten")
    state = nlp_text_generation(
        repo_url=str(repo.path), commit_sha=old, trigger="push", return_state=True
    )
    assert is_superseded(state.message) and "has been rewritten to" in (state.message or "")
