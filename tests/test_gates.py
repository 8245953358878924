"""Quality gates and pull request previews: parsing, checking, and what the flow records."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from deployments.reports.compare import compare
from deployments.reports.compare_views import render_markdown
from deployments.reports.history import history_rows
from flows.text_generation import nlp_text_generation
from tasks.errors import SettingsError
from tasks.gates import evaluate, parse_gate, parse_gates
from tasks.triggers import decide_preview, parse_workflow
from tests.conftest import GitRepo, RepoFactory, settings_yaml

SPEC = {
    "on": {
        "github": {
            "branches": {"only": "main"},
            "pull_request": {"branches": ["main"], "paths-ignore": ["**/*.md"]},
        }
    }
}


def spec(gates: list[str] | None = None) -> str:
    return yaml.safe_dump({**SPEC, **({"gates": gates} if gates else {})}, sort_keys=False)


def tags_of(run_id: str) -> dict[str, str]:
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    return dict(client.get_run(run_id).data.tags)


def test_gates_are_read_with_their_meaning() -> None:
    assert parse_gate("distinct_2 >= 0.6", "f").threshold(None) == 0.6
    relative = parse_gate("mean_log_likelihood >= base - 0.05", "f")
    assert relative.relative and relative.threshold(-2.0) == pytest.approx(-2.05)
    assert relative.threshold(None) is None
    assert parse_gate("tokens_per_second>base*0.8", "f").threshold(10.0) == pytest.approx(8.0)
    assert parse_gate("repetition_rate <= base", "f").threshold(0.2) == 0.2
    assert parse_gates("distinct_1 > 0.1", "f")[0].metric == "distinct_1"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("distinct_3 >= 0.5", "unknown metric 'distinct_3'; allowed: distinct_1"),
        ("distinct_2 => 0.5", "is not understood; expected `METRIC OP VALUE`"),
        ("distinct_2 >= base / 2", "is not understood"),
        (0.5, "is not text"),
        ("distinct_2 >= 1e999", "not finite"),
    ],
)
def test_a_bad_gate_says_what_is_allowed(value: object, message: str) -> None:
    with pytest.raises(SettingsError, match=message) as caught:
        parse_gates([value], "textgen.yaml at commit abc1234")
    assert "textgen.yaml at commit abc1234" in str(caught.value)


def test_gates_are_checked_against_the_run_and_the_base() -> None:
    gates = parse_gates(
        ["distinct_2 >= 0.6", "repetition_rate <= 0.1", "mean_log_likelihood >= base - 0.1"], "f"
    )
    passed = evaluate(
        gates,
        {"distinct_2": 0.7, "repetition_rate": 0.0, "mean_log_likelihood": -2.05},
        {"mean_log_likelihood": -2.0},
    )
    assert all(r.passed and r.checked for r in passed)
    failed = evaluate(
        gates,
        {"distinct_2": 0.41, "repetition_rate": 0.2, "mean_log_likelihood": -2.5},
        {"mean_log_likelihood": -2.0},
    )
    assert [r.passed for r in failed] == [False, False, False]
    assert failed[0].line() == "distinct_2 = 0.41, needs >= 0.6"
    assert "needs >= -2.1 (mean_log_likelihood >= base - 0.1)" in failed[2].line()
    first = evaluate(gates[2:], {"mean_log_likelihood": -2.5}, None)
    assert first[0].passed and not first[0].checked and "no base version" in first[0].line()
    missing = evaluate(gates[:1], {}, None)
    assert not missing[0].passed and "was not recorded" in missing[0].line()


def test_pull_request_filters_use_github_actions_syntax() -> None:
    trigger = parse_workflow(spec().encode(), "w.yaml")
    assert trigger is not None and trigger.pull_request is not None
    assert decide_preview([trigger], "main", ("textgen.yaml",))[0]
    run, reason = decide_preview([trigger], "main", ("README.md",))
    assert not run and "matches paths-ignore" in reason
    run, reason = decide_preview([trigger], "develop", ("textgen.yaml",))
    assert not run and "base branch 'develop' is not in pull_request.branches" in reason
    plain = parse_workflow(b"on:\n  github:\n    branches:\n      only: main\n", "p.yaml")
    assert plain is not None
    run, reason = decide_preview([plain], "main", ("textgen.yaml",))
    assert not run and "on.github.pull_request" in reason
    bare = parse_workflow(b"on:\n  github:\n    pull_request:\n", "b.yaml")
    assert bare is not None and decide_preview([bare], "any", ("x",))[0]
    with pytest.raises(SettingsError, match="unknown keys \\['types'\\]; allowed: branches"):
        parse_workflow(b"on:\n  github:\n    pull_request:\n      types: [opened]\n", "t.yaml")
    with pytest.raises(SettingsError, match="both branches and branches-ignore"):
        parse_workflow(
            b"on:\n  github:\n    pull_request:\n      branches: [a]\n      branches-ignore: [b]\n",
            "t.yaml",
        )


@pytest.mark.usefixtures("prefect_harness")
def test_a_gated_version_is_recorded_numbered_and_tagged(
    make_repo: RepoFactory, tiny_model: Path
) -> None:
    repo = make_repo(
        {
            "textgen.yaml": settings_yaml(tiny_model) + "gates:\n  - distinct_1 > 1.5\n",
            ".gradient/workflows/w.yaml": spec(["repetition_rate <= 1"]),
        }
    )
    record = nlp_text_generation(repo_url=str(repo.path), trigger="push")
    assert (record.outcome, record.version) == ("new", 1)
    tags = tags_of(record.run_id)
    assert tags["textgen.gates"] == "failed"
    assert tags["textgen.gates.failed"].startswith("distinct_1 = ")
    assert "needs > 1.5" in tags["textgen.gates.failed"]
    report = json.loads(tags["textgen.gates.report"])
    assert [r["passed"] for r in report] == [False, True]
    row = history_rows(str(repo.path), 5)[0]
    assert row["version"] == "1" and row["outcome"] == "new (gated)" and row["gates"] == "failed"
    assert row["reason"].startswith("gated: distinct_1 = ")


@pytest.mark.usefixtures("prefect_harness")
def test_a_malformed_gate_fails_the_run_before_the_model_loads(
    make_repo: RepoFactory, tiny_model: Path
) -> None:
    repo = make_repo({"textgen.yaml": settings_yaml(tiny_model) + "gates: [speed >= 1]\n"})
    state = nlp_text_generation(repo_url=str(repo.path), return_state=True)
    assert state.is_failed()
    with pytest.raises(SettingsError, match="unknown metric 'speed'"):
        state.result()


def open_pull_request(repo: GitRepo, number: int, files: dict[str, str | None]) -> str:
    """A commit on a side branch, published as the pull request's head ref."""
    repo.git("checkout", "--quiet", "-B", f"feature-{number}")
    sha = repo.commit(files, f"change for #{number}")
    repo.git("update-ref", f"refs/pull/{number}/head", sha)
    repo.git("checkout", "--quiet", "main")
    return sha


@pytest.mark.usefixtures("prefect_harness")
def test_a_preview_is_recorded_compared_and_never_numbered(
    make_repo: RepoFactory, tiny_model: Path
) -> None:
    repo = make_repo(
        {
            "textgen.yaml": settings_yaml(tiny_model, random_seed=1),
            ".gradient/workflows/w.yaml": spec(["mean_log_likelihood >= base - 1000"]),
        }
    )
    base = nlp_text_generation(repo_url=str(repo.path), trigger="push")
    assert base.version == 1
    head = open_pull_request(repo, 7, {"textgen.yaml": settings_yaml(tiny_model, random_seed=2)})
    pull = {"number": 7, "ref": "refs/pull/7/head", "head_branch": "feature-7", "fork": True}
    record = nlp_text_generation(
        repo_url=str(repo.path), commit_sha=head, trigger="preview", pull_request=pull
    )
    assert (record.outcome, record.version, record.commit_sha) == ("preview", None, head)
    tags = tags_of(record.run_id)
    assert tags["textgen.preview.pr"] == "7" and tags["textgen.preview.fork"] == "true"
    assert "textgen.version" not in tags and tags["textgen.trigger"] == "preview"
    assert tags["textgen.gates"] == "passed" and tags["textgen.gates.base"] == "v1"
    # Still one numbered version; the preview compares with it as `textgen compare` does.
    assert [r["version"] for r in history_rows(str(repo.path), 10) if r["version"]] == ["1"]
    report = render_markdown(compare(str(repo.path), "1", record.run_id))
    assert "| `random_seed` | 1 | 2 |" in report
    assert "```diff" in report and "\n- " in report and "\n+ " in report
    # A README-only pull request previews nothing; a head the pull request left is superseded.
    readme = open_pull_request(repo, 8, {"README.md": "typo"})
    skipped = nlp_text_generation(
        repo_url=str(repo.path),
        commit_sha=readme,
        trigger="preview",
        pull_request={"number": 8, "ref": "refs/pull/8/head"},
    )
    assert skipped.outcome == "skipped" and "matches paths-ignore" in skipped.reason
    newer = open_pull_request(repo, 7, {"textgen.yaml": settings_yaml(tiny_model, random_seed=3)})
    old = nlp_text_generation(
        repo_url=str(repo.path), commit_sha=head, trigger="preview", pull_request=pull
    )
    assert old.outcome == "skipped" and f"moved on to {newer[:7]}" in old.reason


@pytest.mark.usefixtures("prefect_harness")
def test_a_fork_preview_cannot_pass_the_operator_limits(
    make_repo: RepoFactory, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo(
        {"textgen.yaml": settings_yaml(tiny_model), ".gradient/workflows/w.yaml": spec()}
    )
    links = tmp_path / "links.yaml"
    links.write_text(
        yaml.safe_dump(
            {
                "links": [
                    {
                        "name": "limited",
                        "url": str(repo.path),
                        "provider": "github",
                        "limits": {"max_return_sequences": 3},
                    }
                ]
            }
        )
    )
    monkeypatch.setenv("TEXTGEN_LINKS", str(links))
    head = open_pull_request(
        repo, 9, {"textgen.yaml": settings_yaml(tiny_model, num_return_sequences=50)}
    )
    state = nlp_text_generation(
        repo_url=str(repo.path),
        commit_sha=head,
        trigger="preview",
        pull_request={"number": 9, "ref": "refs/pull/9/head", "fork": True},
        return_state=True,
    )
    assert state.is_failed()
    with pytest.raises(SettingsError, match="num_return_sequences=50") as caught:
        state.result()
    assert "TEXTGEN_MAX_RETURN_SEQUENCES" in str(caught.value) or "3" in str(caught.value)
    # A repository that is not linked gets no preview at all.
    monkeypatch.setenv("TEXTGEN_LINKS", str(tmp_path / "other.yaml"))
    (tmp_path / "other.yaml").write_text(
        yaml.safe_dump({"links": [{"name": "x", "url": "https://github.com/o/x.git"}]})
    )
    unlinked = nlp_text_generation(
        repo_url=str(repo.path),
        commit_sha=head,
        trigger="preview",
        pull_request={"number": 9, "ref": "refs/pull/9/head"},
        return_state=True,
    )
    assert unlinked.is_failed()
    with pytest.raises(SettingsError, match="is not a linked repository"):
        unlinked.result()
