"""Evaluation sets and matrices end to end: one version with a child run per cell, texts that
depend only on their own prompt and cell, rows reused from earlier versions (tiny GPT-2)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from flows.text_generation import nlp_text_generation
from tasks.errors import SettingsError
from tasks.evaluation import format_output
from tests.conftest import RepoFactory, settings_yaml

pytestmark = pytest.mark.usefixtures("prefect_harness")

PROMPTS = ["Hello, I'm a language model,", "The weather today", "Once upon a time"]


def client() -> MlflowClient:
    return MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


def settings(model: Path, **values: Any) -> str:
    return settings_yaml(model, max_new_tokens=8, num_return_sequences=2, **values)


def texts_by_prompt(record: Any) -> dict[tuple[str, str], list[str]]:
    return {
        (cell["cell"], output["prompt"]): output["texts"]
        for cell in record.as_dict()["cells"]
        for output in cell["outputs"]
    }


def generated(record: Any) -> dict[tuple[str, str], bool]:
    return {
        (cell["cell"], output["prompt"]): output["generated"]
        for cell in record.as_dict()["cells"]
        for output in cell["outputs"]
    }


def test_a_matrix_is_one_version_with_a_child_run_per_cell(
    make_repo: RepoFactory, tiny_model: Path
) -> None:
    files = {"textgen.yaml": settings(tiny_model, prompts=PROMPTS, matrix={"random_seed": [42, 7]})}
    repo = make_repo(files)
    record = nlp_text_generation(repo_url=str(repo.path))
    assert (record.outcome, record.version) == ("new", 1)
    found = record.as_dict()
    assert found["run_id"] == record.run_id
    assert [c["cell"] for c in found["cells"]] == ["random_seed=42", "random_seed=7"]
    parent = client().get_run(record.run_id)
    assert parent.data.tags["textgen.cells"] == "2"
    assert parent.data.tags["textgen.prompts"] == "3"
    children = client().search_runs(
        [parent.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{record.run_id}' and tags.`textgen.cell` IS NOT NULL",
    )
    assert sorted(c.data.tags["textgen.cell"] for c in children) == [
        "random_seed=42",
        "random_seed=7",
    ]
    assert {c.info.run_id for c in children} == {c["run_id"] for c in found["cells"]}
    for child in children:
        assert child.info.status == "FINISHED"
        assert "textgen.outcome" not in child.data.tags  # a cell is never a version of its own
        assert child.data.metrics["prompts"] == 3
        assert child.data.params["random_seed"] == child.data.tags["textgen.cell"].split("=")[1]
    # 2 cells x 3 prompts x 2 sequences
    texts = texts_by_prompt(record)
    assert len(texts) == 6 and all(len(t) == 2 for t in texts.values())
    assert all(generated(record).values())
    table = json.loads(
        Path(client().download_artifacts(record.run_id, "generations.json")).read_text()
    )
    assert len(table["data"]) == 12
    assert parent.data.tags["textgen.output_digest"]
    inputs = parent.inputs.dataset_inputs
    assert inputs and inputs[0].dataset.digest == parent.data.tags["textgen.output_digest"]
    output = Path(client().download_artifacts(record.run_id, "output.txt")).read_text()
    assert output.count("=== cell random_seed=42 | prompt ") == 3
    first = found["cells"][0]["outputs"][0]
    assert format_output(first["texts"]) in output
    # The first prompt of the seed-42 cell is what the one-prompt form makes of it.
    single = make_repo({"textgen.yaml": settings(tiny_model, initial_sentence=PROMPTS[0])})
    alone = nlp_text_generation(repo_url=str(single.path))
    assert (
        texts[("random_seed=42", PROMPTS[0])] == alone.as_dict()["cells"][0]["outputs"][0]["texts"]
    )


def test_adding_reordering_and_removing_reuse_every_unchanged_text(
    make_repo: RepoFactory, tiny_model: Path
) -> None:
    matrix = {"random_seed": [42, 7]}
    repo = make_repo({"textgen.yaml": settings(tiny_model, prompts=PROMPTS, matrix=matrix)})
    first = nlp_text_generation(repo_url=str(repo.path))
    before = texts_by_prompt(first)

    added = ["A new prompt at the front", *reversed(PROMPTS)]
    repo.commit({"textgen.yaml": settings(tiny_model, prompts=added, matrix=matrix)}, "add one")
    second = nlp_text_generation(repo_url=str(repo.path))
    assert second.version == 2
    after = texts_by_prompt(second)
    for key, texts in before.items():
        assert after[key] == texts
    made = generated(second)
    assert [k for k, v in made.items() if v] == [
        ("random_seed=42", "A new prompt at the front"),
        ("random_seed=7", "A new prompt at the front"),
    ]
    reused = [o for c in second.as_dict()["cells"] for o in c["outputs"] if not o["generated"]]
    assert {o["from_version"] for o in reused} == {1}
    parent = client().get_run(second.run_id)
    assert parent.data.tags["textgen.reused_rows"] == "6"
    assert parent.data.metrics["prompts_generated"] == 2

    repo.commit(
        {"textgen.yaml": settings(tiny_model, prompts=added, matrix={"random_seed": [7]})}, "drop"
    )
    third = nlp_text_generation(repo_url=str(repo.path))
    assert not any(generated(third).values())
    assert texts_by_prompt(third) == {k: v for k, v in after.items() if k[0] == "random_seed=7"}
    assert {o["from_version"] for c in third.as_dict()["cells"] for o in c["outputs"]} == {1, 2}

    again = nlp_text_generation(repo_url=str(repo.path))
    assert (again.outcome, again.version) == ("reused", 3)
    assert (
        client().get_run(again.run_id).data.tags["textgen.settings_digest"] == third.settings_digest
    )
    assert texts_by_prompt(again) == texts_by_prompt(third)

    forced = nlp_text_generation(repo_url=str(repo.path), force=True)
    assert all(generated(forced).values())
    assert texts_by_prompt(forced) == texts_by_prompt(third)


def test_a_failed_cell_leaves_no_numbered_version(make_repo: RepoFactory, tiny_model: Path) -> None:
    # The second cell's length passes the context of the tiny model (128 positions): it
    # fails once the first cell has generated all its prompts.
    matrix = {"max_new_tokens": [8, 120]}
    repo = make_repo({"textgen.yaml": settings_yaml(tiny_model, prompts=PROMPTS, matrix=matrix)})
    with pytest.raises(SettingsError, match=r"cell max_new_tokens=120: .*past the context"):
        nlp_text_generation(repo_url=str(repo.path))
    (experiment,) = [e for e in client().search_experiments() if e.name.endswith(repo.path.name)]
    runs = client().search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]  # no child run, no number
    assert "textgen.version" not in runs[0].data.tags
    assert "cell max_new_tokens=120" in runs[0].data.tags["textgen.failure"]
    # A model that is not there is named with its cell too, before anything generates.
    repo.commit({"textgen.yaml": settings(tiny_model, matrix={"model": [str(tiny_model), "./no"]})})
    with pytest.raises(SettingsError, match=r"cell model=\./no: model '\./no' names no folder"):
        nlp_text_generation(repo_url=str(repo.path))


def test_the_one_prompt_form_records_what_it_did(make_repo: RepoFactory, tiny_model: Path) -> None:
    repo = make_repo({"textgen.yaml": settings(tiny_model)})
    record = nlp_text_generation(repo_url=str(repo.path))
    run = client().get_run(record.run_id)
    assert "textgen.cells" not in run.data.tags
    assert not client().search_runs(
        [run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{record.run_id}'"
    )
    cells = record.as_dict()["cells"]
    assert len(cells) == 1 and cells[0]["cell"] == "" and cells[0]["run_id"] == record.run_id
    (output,) = cells[0]["outputs"]
    text = Path(client().download_artifacts(record.run_id, "output.txt")).read_text()
    assert text == format_output(output["texts"])
    assert output["generated"] and output["from_version"] == 1


@pytest.mark.parametrize(
    ("files", "match"),
    [
        (
            {"matrix": {"random_seed": list(range(1000)), "top_k": list(range(1000))}},
            "1000000 cells",
        ),
        ({"prompts": "prompts.txt", "prompts.txt": "x" * (10 << 20)}, "bytes; allowed"),
        ({"prompts": "prompts.txt", "prompts.txt": "a prompt\n" * 100_000}, "line 1001: more than"),
        ({"prompts": "missing.jsonl"}, "no such file"),
        ({"prompts": "p.jsonl", "p.jsonl": '{"prompt": "a"}\n{"prompt": 3}\n'}, "line 2"),
        (
            {
                "prompts": "p.jsonl",
                "p.jsonl": '{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n',
            },
            "unique",
        ),
        ({"prompts": ["a", "b"], "matrix": {"initial_sentence": ["x"]}}, "prompts"),
        ({"prompts": "notes.md"}, ".txt or .jsonl"),
    ],
)
def test_hostile_sets_are_refused_by_name(
    make_repo: RepoFactory, tiny_model: Path, files: dict[str, Any], match: str
) -> None:
    from tasks.evalset import load_plan
    from tasks.repo import RepoLocation, resolve_commit

    extra = {k: v for k, v in files.items() if "." in k}
    keys = {k: v for k, v in files.items() if "." not in k}
    repo = make_repo({"textgen.yaml": settings(tiny_model, **keys), **extra})
    commit = resolve_commit(RepoLocation.parse(str(repo.path)), "main", None)
    with pytest.raises(SettingsError, match=match):
        load_plan(commit)


def test_run_json_and_compare_read_cells_and_prompts(
    make_repo: RepoFactory, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from deployments.cli import main
    from deployments.reports.compare import compare
    from deployments.reports.compare_views import render_markdown, render_text
    from deployments.reports.history import history_rows

    matrix = {"random_seed": [42, 7]}
    repo = make_repo({"textgen.yaml": settings(tiny_model, prompts=PROMPTS[:2], matrix=matrix)})
    assert main(["run", "--repo", str(repo.path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["version"] == 1 and printed["run_id"]
    assert [c["cell"] for c in printed["cells"]] == ["random_seed=42", "random_seed=7"]
    cell = printed["cells"][0]
    assert cell["settings"]["random_seed"] == 42 and cell["run_id"] != printed["run_id"]
    assert [o["prompt"] for o in cell["outputs"]] == PROMPTS[:2]
    assert all(o["generated"] and o["from_version"] == 1 for o in cell["outputs"])

    prompts = [*PROMPTS[:2], "A third prompt"]
    repo.commit({"textgen.yaml": settings(tiny_model, prompts=prompts, matrix=matrix)}, "one more")
    assert main(["run", "--repo", str(repo.path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    outputs = printed["cells"][1]["outputs"]
    assert [(o["generated"], o["from_version"]) for o in outputs] == [
        (False, 1),
        (False, 1),
        (True, 2),
    ]
    # history lists the two versions, not their cells' runs
    assert [row["version"] for row in history_rows(str(repo.path), None)] == ["2", "1"]

    report = compare(str(repo.path), "1", "2")
    assert [s.status for s in report.shown] == ["new", "new"]
    assert {s.status for s in report.sections} == {"new", "same"}
    reused = [s for s in report.sections if s.status == "same"]
    assert {s.note for s in reused} == {"reused from v1"}
    text = render_text(report)
    assert "Cells:" in text and "random_seed=7" in text
    assert "== cell random_seed=42 | prompt " in text and "(new): A third prompt" in text
    assert "4 unchanged (cell, prompt) texts not shown; --all shows them" in text
    assert render_text(compare(str(repo.path), "1", "2", show_all=True)).count("== cell") == 6
    markdown = render_markdown(report)
    assert "#### cell random\\_seed=7 \\| prompt" in markdown
    assert "| `random\\_seed=42` |" in markdown
    found = report.as_dict()
    assert {s["status"] for s in found["sections"]} == {"new", "same"}
    assert any(c["cell"] == "random_seed=7" for c in found["cells"])


def test_the_new_token_budget_bounds_a_version(
    make_repo: RepoFactory, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.evalset import load_plan
    from tasks.repo import RepoLocation, resolve_commit

    monkeypatch.setenv("TEXTGEN_MAX_VERSION_TOKENS", "60")
    matrix = {"random_seed": [1, 2]}
    repo = make_repo({"textgen.yaml": settings(tiny_model, prompts=PROMPTS, matrix=matrix)})
    commit = resolve_commit(RepoLocation.parse(str(repo.path)), "main", None)
    # 2 cells x 3 prompts x 2 sequences x 8 new tokens
    with pytest.raises(SettingsError, match="up to 96 new tokens; allowed: at most 60"):
        load_plan(commit)


def test_a_version_is_at_home_on_mlflows_genai_side(
    make_repo: RepoFactory, tiny_model: Path
) -> None:
    import mlflow

    matrix = {"random_seed": [42, 7]}
    repo = make_repo({"textgen.yaml": settings(tiny_model, prompts=PROMPTS[:2], matrix=matrix)})
    record = nlp_text_generation(repo_url=str(repo.path))
    experiment_id = record.experiment_id
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    traces = mlflow.search_traces(
        locations=[experiment_id],
        filter_string="metadata.`mlflow.trace.session` = 'v1'",
        return_type="list",
    )
    assert len(traces) == 4  # 2 cells x 2 prompts
    cells = {c["cell"]: c["run_id"] for c in record.as_dict()["cells"]}
    by_prompt = {}
    for trace in traces:
        span = trace.data.spans[0]
        assert trace.info.trace_metadata["mlflow.sourceRun"] == cells[span.inputs["cell"]]
        assert span.outputs["texts"] and span.get_attribute("textgen.generated") is True
        assert span.get_attribute("mlflow.chat.tokenUsage")["output_tokens"] > 0
        names = {a.name for a in trace.info.assessments}
        assert {"distinct_2", "repetition_rate", "perplexity"} <= names
        by_prompt[(span.inputs["cell"], span.inputs["prompt"])] = span.outputs["texts"]
    assert by_prompt == texts_by_prompt(record)
    (evaluation,) = client().search_runs([experiment_id], "tags.`mlflow.runName` = 'evaluation v1'")
    assert evaluation.data.tags["mlflow.parentRunId"] == record.run_id
    assert "distinct_2/mean" in evaluation.data.metrics
    from mlflow.genai.datasets import search_datasets

    (dataset,) = search_datasets(experiment_ids=[experiment_id])
    assert len(dataset.to_df()) == 2
    # A push that changes nothing but one prompt traces every row again, the copied ones
    # without token usage and naming the version they came from.
    repo.commit(
        {"textgen.yaml": settings(tiny_model, prompts=[*PROMPTS[:2], "New"], matrix=matrix)}
    )
    second = nlp_text_generation(repo_url=str(repo.path))
    traces = mlflow.search_traces(
        locations=[experiment_id],
        filter_string="metadata.`mlflow.trace.session` = 'v2'",
        return_type="list",
    )
    every = mlflow.search_traces(locations=[experiment_id], return_type="list")
    assert len(every) == 10, [t.info.trace_metadata.get("mlflow.trace.session") for t in every]
    copied = [t for t in traces if not t.data.spans[0].get_attribute("textgen.generated")]
    assert len(traces) == 6 and len(copied) == 4
    assert {t.data.spans[0].get_attribute("textgen.from_version") for t in copied} == {1}
    assert all(t.data.spans[0].get_attribute("mlflow.chat.tokenUsage") is None for t in copied)
    assert second.version == 2 and len(search_datasets(experiment_ids=[experiment_id])) == 2


def test_a_one_prompt_version_is_one_trace(make_repo: RepoFactory, tiny_model: Path) -> None:
    import mlflow

    repo = make_repo({"textgen.yaml": settings(tiny_model)})
    record = nlp_text_generation(repo_url=str(repo.path))
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    (trace,) = mlflow.search_traces(locations=[record.experiment_id], return_type="list")
    assert trace.info.trace_metadata["mlflow.trace.session"] == "v1"
    assert trace.info.trace_metadata["mlflow.sourceRun"] == record.run_id
    assert (
        trace.data.spans[0].outputs["texts"] == record.as_dict()["cells"][0]["outputs"][0]["texts"]
    )
    assert {a.name for a in trace.info.assessments} >= {"distinct_2", "perplexity"}


def test_a_prompt_past_the_context_fails_by_name_and_loses_nothing(
    make_repo: RepoFactory, tiny_model: Path
) -> None:
    repo = make_repo(
        {
            "textgen.yaml": settings(tiny_model, prompts="prompts.txt"),
            "prompts.txt": "\n".join(PROMPTS) + "\n",
        }
    )
    first = nlp_text_generation(repo_url=str(repo.path))
    long = "a long prompt " * 12  # the tiny model has 128 positions
    repo.commit({"prompts.txt": "\n".join([*PROMPTS, long]) + "\n"}, "a prompt too long")
    with pytest.raises(SettingsError, match=r"prompts.txt at commit \w+, line 4 \(prompt p\w+\)"):
        nlp_text_generation(repo_url=str(repo.path))
    kept = client().get_run(first.run_id)
    assert kept.info.status == "FINISHED" and kept.data.tags["textgen.version"] == "1"
    again = nlp_text_generation(repo_url=str(repo.path), commit_sha=first.commit_sha)
    assert (again.outcome, again.version) == ("reused", 1)


def test_a_run_killed_while_it_evaluates_keeps_its_version_and_leaves_nothing_running(
    make_repo: RepoFactory, tiny_model: Path, tmp_path: Path
) -> None:
    import signal
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    from deployments.reports.history import history_rows
    from tests.servers import wait_for

    prompts = [f"Prompt number {i} is here" for i in range(12)]
    matrix = {"random_seed": [42, 7]}
    repo = make_repo({"textgen.yaml": settings(tiny_model, prompts=prompts, matrix=matrix)})
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    log = (tmp_path / "run.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "deployments.cli", "run", "--repo", str(repo.path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )

    def evaluating() -> Any:
        found = [e for e in client().search_experiments() if e.name.endswith(repo.path.name)]
        if not found:
            return None
        query = "tags.`mlflow.runName` = 'evaluation v1' and attributes.status = 'RUNNING'"
        return client().search_runs([found[0].experiment_id], query) or None

    try:
        # The bad moment: the version is numbered, its evaluation run is being written.
        (evaluation,) = wait_for(evaluating, 300, "the version's evaluation run", interval=0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
        log.close()
    rows = history_rows(str(repo.path), None)  # as any later command: ends dead runs first
    assert [(r["version"], r["status"]) for r in rows] == [("1", "FINISHED")]
    experiment_id = evaluation.info.experiment_id
    assert not client().search_runs([experiment_id], "attributes.status = 'RUNNING'")
    assert client().get_run(evaluation.info.run_id).info.status == "FAILED"
    cells = client().search_runs([experiment_id], "tags.`textgen.cell` IS NOT NULL")
    assert sorted(c.info.status for c in cells) == ["FINISHED", "FINISHED"]
