"""`textgen compare` and `textgen history` filters, on versions made by the flow."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from deployments.cli import main
from deployments.reports.compare import _word_diff, compare
from deployments.reports.compare_views import _delta, render_html, render_text
from flows.text_generation import nlp_text_generation
from tasks.errors import UsageError
from tests.conftest import GitRepo, settings_yaml

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def recorded(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model: Path,
    mlflow_template: Path,
    textgen_home: Path,
    shared_model_cache: Path,
    prefect_harness: None,
) -> tuple[Path, GitRepo, list[Any]]:
    """Three versions, recorded once for the module in a store of its own (each test gets a
    copy of it): v1 seed 1, v2 seed 2 two commits later, v3 seed 1 at v2's commit."""
    folder = tmp_path_factory.mktemp("compare")
    store = folder / "mlflow.db"
    shutil.copyfile(mlflow_template, store)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
        env.setenv("TEXTGEN_ARTIFACT_ROOT", (folder / "artifacts").as_uri())
        env.setenv("TEXTGEN_HOME", str(textgen_home))
        env.setenv("TEXTGEN_MODEL_CACHE", str(shared_model_cache))
        env.setenv("TEXTGEN_MODEL_DIRS", str(tmp_path_factory.getbasetemp()))
        repo = GitRepo(folder / "repo")
        repo.commit({"textgen.yaml": settings_yaml(tiny_model, random_seed=1)}, "seed 1")
        v1 = nlp_text_generation(repo_url=str(repo.path))
        repo.commit({"README.md": "notes"}, "notes")
        repo.commit({"textgen.yaml": settings_yaml(tiny_model, random_seed=2)}, "seed 2")
        v2 = nlp_text_generation(repo_url=str(repo.path))
        v3 = nlp_text_generation(
            repo_url=str(repo.path), overrides={"random_seed": 1}
        )  # same commit as v2
    return store, repo, [v1, v2, v3]


@pytest.fixture
def versions(
    recorded: tuple[Path, GitRepo, list[Any]], isolated_env: Path
) -> tuple[GitRepo, list[Any]]:
    """The module's three versions, in this test's own copy of their store."""
    store, repo, records = recorded
    shutil.copyfile(store, isolated_env / "mlflow.db")
    return repo, records


def test_compare_shows_settings_commits_metrics_and_texts(
    versions: tuple[GitRepo, list[Any]],
) -> None:
    repo, (v1, v2, _) = versions
    result = compare(str(repo.path), "1", "v2")
    assert (result.a.version, result.b.version) == (1, 2)
    assert result.settings == [("random_seed", "1", "2")]
    assert [line.split(" ", 1)[1] for line in result.commits] == [
        "Dev Example: seed 2",
        "Dev Example: notes",
    ]
    assert result.commits_note == f"{v1.commit_sha[:7]}..{v2.commit_sha[:7]}"
    metrics = {name for name, _, _ in result.metrics}
    assert {
        "distinct_1",
        "distinct_2",
        "repetition_rate",
        "mean_new_tokens",
        "mean_log_likelihood",
    } <= metrics
    assert len(result.pairs) == 5
    text = render_text(result, width=120)
    assert "random_seed  1   2" in text
    assert "[-" in text and "{+" in text
    assert "Output 5 of 5:" in text
    page = render_html(compare(str(repo.path), "1", "v2", chart=True))
    assert "<svg" in page and not result.chart, "the chart is read for the HTML report only"
    assert page.startswith("<!doctype html>") and "<del>" in page and "<ins>" in page
    assert "http" not in page.split("</style>")[0], "no remote assets"


def test_the_same_version_twice_is_identical(versions: tuple[GitRepo, list[Any]]) -> None:
    repo, _ = versions
    result = compare(str(repo.path), "2", "2")
    assert result.settings == [] and result.commits_note == "the same commit"
    assert all(kind == "same" for left, right in result.pairs for kind, _ in left + right)
    assert "none: the same settings" in render_text(result)
    assert "(identical)" in render_text(result)


def test_references_by_commit_run_id_and_reuse(versions: tuple[GitRepo, list[Any]]) -> None:
    repo, (v1, _, v3) = versions
    assert compare(str(repo.path), v1.commit_sha[:7], v3.run_id).b.version == 3
    reused = nlp_text_generation(repo_url=str(repo.path), commit_sha=v1.commit_sha)
    assert reused.outcome == "reused"
    assert compare(str(repo.path), reused.run_id, "3").a.version == 1


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("v9", r"unknown reference 'v9': no version 9; closest matches: v\d \("),
        ("deadbee", r"unknown reference 'deadbee': no version of a commit starting with it; "),
        (
            "main",
            r"not a version \(3, v3\), a commit SHA or an MLflow run id; latest versions: v3 ",
        ),
    ],
)
def test_unknown_references_list_the_closest_matches(
    versions: tuple[GitRepo, list[Any]], ref: str, message: str
) -> None:
    repo, _ = versions
    with pytest.raises(UsageError, match=message):
        compare(str(repo.path), ref, "1")


def test_a_commit_with_two_versions_is_ambiguous(versions: tuple[GitRepo, list[Any]]) -> None:
    repo, (_, v2, _) = versions
    with pytest.raises(
        UsageError, match=rf"'{v2.commit_sha[:7]}' is ambiguous: .* 2 versions .*: v3 .*, v2 "
    ):
        compare(str(repo.path), v2.commit_sha[:7], "1")


def test_the_command_prints_and_writes_html(
    versions: tuple[GitRepo, list[Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo, _ = versions
    page = tmp_path / "report.html"
    assert main(["compare", "1", "2", "--repo", str(repo.path), "--html", str(page)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Comparing v1 (commit ")
    assert "<h1>v1 vs v2</h1>" in page.read_text()
    # A reference that names nothing is a usage error (2), not a failure of the store (5).
    assert main(["compare", "1", "v7", "--repo", str(repo.path)]) == 2
    assert "unknown reference 'v7'" in capsys.readouterr().err


def test_history_filters(
    versions: tuple[GitRepo, list[Any]], capsys: pytest.CaptureFixture[str], tiny_model: Path
) -> None:
    repo, (v1, v2, _) = versions

    def rows(*args: str) -> list[list[str]]:
        assert main(["history", "--repo", str(repo.path), *args]) == 0
        lines = capsys.readouterr().out.splitlines()
        return [line.split() for line in lines[1:]] if len(lines) > 1 else []

    everything = rows()
    assert [r[0] for r in everything] == ["3", "2", "1"]
    assert all(r[3] == tiny_model.name for r in everything)  # the model column
    assert [r[0] for r in rows("--commit", v1.commit_sha[:6])] == ["1"]
    assert [r[0] for r in rows("--commit", v2.commit_sha)] == ["3", "2"]
    assert len(rows("--since", "1h")) == 3
    assert rows("--since", "2999-01-01") == []
    assert len(rows("--model", tiny_model.name)) == 3
    assert rows("--model", "gpt-neo") == []
    assert main(["history", "--repo", str(repo.path), "--since", "yesterday"]) == 2
    assert "--since 'yesterday': expected a date" in capsys.readouterr().err
    # The latest page, and a line saying there is more; --all shows everything.
    assert [r[0] for r in rows("--limit", "2")] == ["3", "2"]
    assert main(["history", "--repo", str(repo.path), "--limit", "2"]) == 0
    assert "the latest 2 runs; --limit N or --all for more" in capsys.readouterr().err
    assert [r[0] for r in rows("--all")] == ["3", "2", "1"]
    assert main(["history", "--repo", str(repo.path), "--limit", "3"]) == 0
    assert "for more" not in capsys.readouterr().err


def test_word_diff_marks_only_what_changed() -> None:
    left, right = _word_diff("the quick brown fox", "the slow brown fox jumps")
    assert left == [("same", "the "), ("del", "quick"), ("same", " brown fox")]
    assert right == [("same", "the "), ("ins", "slow"), ("same", " brown fox "), ("ins", "jumps")]


def test_word_diff_marks_a_run_of_changed_words_once() -> None:
    left, right = _word_diff(
        "I like red apples and pears a lot", "I like green fresh figs and pears"
    )
    assert left == [
        ("same", "I like "),
        ("del", "red apples"),
        ("same", " and pears "),
        ("del", "a lot"),
    ]
    assert right == [("same", "I like "), ("ins", "green fresh figs"), ("same", " and pears")]


def test_percent_change_has_the_sign_of_the_change() -> None:
    # A negative metric that falls (log-likelihood -1.463 -> -1.601) fell: -9.4%, not +9.4%.
    assert _delta(-1.463, -1.601) == "-0.138 (-9.4%)"
    assert _delta(-1.601, -1.463) == "+0.138 (+8.6%)"
    assert _delta(0.5, 0.6) == "+0.1 (+20.0%)"
    assert _delta(0.0, 0.6) == "+0.6"


def test_prefect_and_mlflow_link_to_each_other(versions: tuple[GitRepo, list[Any]]) -> None:
    _, (v1, _, _) = versions
    tags = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"]).get_run(v1.run_id).data.tags
    assert tags["textgen.prefect.flow_run_id"]
    assert tags["textgen.prefect.flow_run_url"].endswith(
        f"/runs/flow-run/{tags['textgen.prefect.flow_run_id']}"
    )


def test_json_output_and_charts_across_versions(
    versions: tuple[GitRepo, list[Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json
    import xml.etree.ElementTree as ET

    repo, (v1, v2, v3) = versions
    assert main(["compare", "1", "2", "--repo", str(repo.path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["a"]["version"], report["b"]["version"]) == (1, 2)
    assert report["settings"] == [{"key": "random_seed", "a": "1", "b": "2"}]
    assert {m["metric"] for m in report["metrics"]} >= {"distinct_2", "tokens_per_second"}
    assert len(report["texts"]) == 5 and all("a" in t and "b" in t for t in report["texts"])

    assert main(["history", "--repo", str(repo.path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["version"] for r in rows] == ["3", "2", "1"]
    assert rows[0]["commit"] == v3.commit_sha[:7]

    chart = tmp_path / "history.svg"
    assert main(["history", "--repo", str(repo.path), "--plot", str(chart)]) == 0
    svg = ET.fromstring(chart.read_text())  # well-formed, self-contained SVG
    assert svg.tag.endswith("svg")
    text = chart.read_text()
    for metric in ("distinct_2", "repetition_rate", "mean_log_likelihood", "tokens_per_second"):
        assert f'data-metric="{metric}"' in text
    for version, record in ((1, v1), (2, v2), (3, v3)):
        assert f">v{version}<" in text and record.commit_sha[:7] in text
    assert "<script" not in text and "http" not in text.replace("http://www.w3.org/2000/svg", "")

    page = tmp_path / "report.html"
    assert main(["compare", "1", "3", "--repo", str(repo.path), "--html", str(page)]) == 0
    html = page.read_text()
    assert "<svg" in html and "Across versions" in html
    assert html.count('r="5"') >= 2  # the two compared versions are marked on each panel
