"""The flow end to end against a temporary git repository and MLflow store (tiny GPT-2)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from deployments.cli import main
from flows.text_generation import nlp_text_generation
from tasks import model as model_module
from tasks.errors import ModelError, SettingsError
from tasks.evaluation import format_output
from tasks.store import experiment_name
from tests.conftest import RepoFactory, settings_yaml
from tests.gitserver import serve_repo
from tests.test_settings import ORIGINAL_SCRIPT

pytestmark = pytest.mark.usefixtures("prefect_harness")


def client() -> MlflowClient:
    return MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


def artifact_text(run_id: str, path: str) -> str:
    local = client().download_artifacts(run_id, path)
    return Path(local).read_text()


def runs_of(repo_path: Path | str) -> list[Any]:
    experiment = client().get_experiment_by_name(experiment_name(str(repo_path)))
    assert experiment is not None
    return client().search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def test_a_run_records_the_whole_contract(make_repo: RepoFactory, tiny_model: Path) -> None:
    repo = make_repo(
        {"textgen.yaml": settings_yaml(tiny_model, random_seed=42, max_length=30)}, "add settings"
    )
    sha = repo.git("rev-parse", "HEAD")
    record = nlp_text_generation(repo_url=str(repo.path))
    assert (record.outcome, record.version, record.commit_sha) == ("new", 1, sha)

    run = client().get_run(record.run_id)
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert run.info.status == "FINISHED"
    assert tags["mlflow.source.type"] == "PROJECT"
    assert tags["mlflow.source.name"] == str(repo.path)
    assert tags["mlflow.source.git.repoURL"] == str(repo.path)
    assert tags["mlflow.source.git.commit"] == sha
    assert tags["mlflow.source.git.branch"] == "main"
    assert tags["textgen.version"] == "1"
    assert tags["textgen.trigger"] == "manual"
    assert tags["textgen.outcome"] == "new"
    assert tags["textgen.commit.message"] == "add settings"
    assert tags["mlflow.runName"] == f"v1 {sha[:7]}"
    assert tags["textgen.prefect.flow_run_id"]
    assert len(tags["textgen.settings_digest"]) == 64

    assert params["model"] == str(tiny_model)
    assert params["random_seed"] == "42"
    assert params["max_length"] == "30"
    assert params["num_return_sequences"] == "5"
    assert params["initial_sentence"] == "Hello, I'm a language model,"
    assert params["model.revision"].startswith("sha256:")
    assert params["device"] == "cpu"
    assert params["settings.source"] == "textgen.yaml"
    assert params["transformers_version"] and params["torch_version"]
    assert params["generation.do_sample"] == "True"

    for name in ("load_seconds", "generation_seconds", "new_tokens", "tokens_per_second"):
        assert name in metrics
    assert metrics["new_tokens"] > 0 and metrics["tokens_per_second"] > 0

    artifacts = {a.path for a in client().list_artifacts(record.run_id)}
    assert {"output.txt", "settings.json", "generations.json"} <= artifacts
    table = json.loads(artifact_text(record.run_id, "generations.json"))
    texts = [row[table["columns"].index("generated_text")] for row in table["data"]]
    assert len(texts) == 5
    assert artifact_text(record.run_id, "output.txt") == format_output(texts)
    settings_doc = json.loads(artifact_text(record.run_id, "settings.json"))
    assert settings_doc["commit"] == sha and settings_doc["settings"]["random_seed"] == 42
    assert json.loads(tags["mlflow.loggedArtifacts"]) == [
        {"path": "generations.json", "type": "table"}
    ]

    (dataset_input,) = run.inputs.dataset_inputs
    assert {t.key: t.value for t in dataset_input.tags} == {"mlflow.data.context": "output"}
    assert dataset_input.dataset.digest == tags["textgen.output_digest"]


def test_same_commit_and_settings_reuse_the_version_unless_forced(
    make_repo: RepoFactory, tiny_model: Path
) -> None:
    repo = make_repo({"textgen.yaml": settings_yaml(tiny_model)})
    first = nlp_text_generation(repo_url=str(repo.path))
    again = nlp_text_generation(repo_url=str(repo.path))
    assert (again.outcome, again.version) == ("reused", 1)
    assert client().get_run(again.run_id).data.tags["textgen.reused_run_id"] == first.run_id
    forced = nlp_text_generation(repo_url=str(repo.path), force=True)
    assert (forced.outcome, forced.version) == ("new", 2)
    # Same commit, settings and machine: the same text.
    assert artifact_text(forced.run_id, "output.txt") == artifact_text(first.run_id, "output.txt")


def test_a_changed_seed_makes_a_new_version_with_other_text(
    make_repo: RepoFactory, tiny_model: Path
) -> None:
    repo = make_repo({"textgen.yaml": settings_yaml(tiny_model, random_seed=1)})
    first = nlp_text_generation(repo_url=str(repo.path))
    repo.commit({"textgen.yaml": settings_yaml(tiny_model, random_seed=2)}, "seed 2")
    second = nlp_text_generation(repo_url=str(repo.path))
    assert (first.version, second.version) == (1, 2)
    assert artifact_text(first.run_id, "output.txt") != artifact_text(second.run_id, "output.txt")
    override = nlp_text_generation(repo_url=str(repo.path), overrides={"random_seed": 1})
    assert override.version == 3
    assert client().get_run(override.run_id).data.params["random_seed"] == "1"
    back = nlp_text_generation(repo_url=str(repo.path), commit_sha=first.commit_sha[:7])
    assert (back.outcome, back.version) == ("reused", 1)


def test_a_legacy_repository_yields_the_same_params_as_textgen_yaml(
    make_repo: RepoFactory, tiny_model: Path
) -> None:
    legacy = make_repo(
        {"nlp_text_generation.py": ORIGINAL_SCRIPT.replace("'gpt2'", repr(str(tiny_model)))}
    )
    modern = make_repo(
        {
            "textgen.yaml": settings_yaml(
                tiny_model,
                random_seed=42,
                max_length=30,
                num_return_sequences=5,
                initial_sentence="Hello, I'm a language model,",
            )
        }
    )
    a = client().get_run(nlp_text_generation(repo_url=str(legacy.path)).run_id)
    b = client().get_run(nlp_text_generation(repo_url=str(modern.path)).run_id)
    ignore = {"settings.source"}
    assert {k: v for k, v in a.data.params.items() if k not in ignore} == {
        k: v for k, v in b.data.params.items() if k not in ignore
    }
    assert a.data.params["settings.source"] == "nlp_text_generation.py"
    assert a.data.tags["textgen.settings_digest"] == b.data.tags["textgen.settings_digest"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("random_seed: 1\ncolour: blue\n", "unknown key 'colour'"),
        ("random_seed: one\n", "random_seed='one': expected a number"),
        ("num_return_sequences: 0\n", "num_return_sequences=0"),
        ("max_length: 10\nmax_new_tokens: 4\n", "give max_length or max_new_tokens, not both"),
        ("random_seed: [\n", "not valid YAML"),
    ],
)
def test_bad_settings_fail_before_loading_and_keep_earlier_versions(
    make_repo: RepoFactory,
    tiny_model: Path,
    monkeypatch: pytest.MonkeyPatch,
    content: str,
    message: str,
) -> None:
    repo = make_repo({"textgen.yaml": settings_yaml(tiny_model)})
    good = nlp_text_generation(repo_url=str(repo.path))
    output_before = artifact_text(good.run_id, "output.txt")
    bad_sha = repo.commit({"textgen.yaml": f"model: {tiny_model}\n{content}"}, "bad settings")

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded for invalid settings")

    monkeypatch.setattr(model_module, "build_generator", no_loading)
    with pytest.raises(SettingsError, match=message):
        nlp_text_generation(repo_url=str(repo.path))

    runs = runs_of(repo.path)
    assert [r.info.status for r in runs] == ["FINISHED", "FAILED"]
    failed = runs[1]
    assert failed.data.tags["textgen.outcome"] == "failed"
    assert failed.data.tags["mlflow.source.git.commit"] == bad_sha
    assert message in failed.data.tags["textgen.failure"]
    assert f"textgen.yaml at commit {bad_sha[:7]}" in failed.data.tags["textgen.failure"]
    assert "textgen.version" not in failed.data.tags
    kept = client().get_run(good.run_id)
    assert kept.info.status == "FINISHED" and kept.data.tags["textgen.version"] == "1"
    assert artifact_text(good.run_id, "output.txt") == output_before


def test_a_model_that_cannot_load_fails_the_run_with_its_reason(
    make_repo: RepoFactory, tmp_path: Path
) -> None:
    repo = make_repo({"textgen.yaml": settings_yaml(tmp_path / "missing-model")})
    with pytest.raises(ModelError, match="does not exist in the operator's model folders"):
        nlp_text_generation(repo_url=str(repo.path))
    (run,) = runs_of(repo.path)
    assert run.info.status == "FAILED"
    assert run.data.tags["textgen.failure"].startswith("ModelError: model ")
    assert "ModelError" in artifact_text(run.info.run_id, "error.txt")


def test_a_missing_commit_fails_the_run_naming_repository_and_ref(
    make_repo: RepoFactory, tiny_model: Path
) -> None:
    repo = make_repo({"textgen.yaml": settings_yaml(tiny_model)})
    with pytest.raises(
        Exception, match=f"commit 'abcdef1' was not found in repository {repo.path}"
    ):
        nlp_text_generation(repo_url=str(repo.path), commit_sha="abcdef1")
    (run,) = runs_of(repo.path)
    assert run.info.status == "FAILED"
    assert run.data.tags["textgen.requested_ref"] == "abcdef1"


def test_a_token_in_the_repository_url_appears_nowhere_in_mlflow_or_prefect(
    make_repo: RepoFactory,
    tiny_model: Path,
    tmp_path: Path,
    isolated_env: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = "ghp_SuperSecretToken123"
    repo = make_repo({"textgen.yaml": settings_yaml(tiny_model)})
    served = tmp_path / "served"
    served.mkdir()
    with serve_repo(repo.path, served, f"x-access-token:{token}") as (url, _):
        secret_url = url.replace("http://", f"http://x-access-token:{token}@")
        assert main(["run", "--repo", secret_url]) == 0
        assert main(["history", "--repo", secret_url]) == 0
        os.environ.pop("TEXTGEN_GIT_CREDENTIALS", None)  # set by the command for this process
        record = nlp_text_generation(repo_url=secret_url, force=True)  # called directly, too
    out = capsys.readouterr()
    assert token not in out.out + out.err
    assert record.version == 2
    run = client().get_run(record.run_id)
    assert run.data.tags["mlflow.source.git.repoURL"] == url
    stored = [isolated_env / "mlflow.db", *(p for p in isolated_env.rglob("*") if p.is_file())]
    for path in stored:
        assert token.encode() not in path.read_bytes(), path
    for path in Path(os.environ["TEXTGEN_HOME"]).rglob("config"):
        assert token not in path.read_text(errors="ignore"), path

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:
        runs = prefect.read_flow_runs(limit=50, sort="START_TIME_DESC")
    cli_run = next(r for r in runs if r.parameters.get("repo_url") == url)
    assert token not in json.dumps(cli_run.parameters)


def test_commands_run_and_list_history(
    make_repo: RepoFactory, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = make_repo({"textgen.yaml": settings_yaml(tiny_model)})
    assert (
        main(
            [
                "run",
                "--repo",
                str(repo.path),
                "--set",
                "random_seed=7",
                "--set",
                "initial_sentence=Hi there",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    run = runs_of(repo.path)[0]
    assert out.count("version 1 (commit") == 1, out  # the summary, once
    assert f"MLflow run {run.info.run_id}" in out and "output.txt: http" in out
    assert run.data.params["random_seed"] == "7"
    assert run.data.params["initial_sentence"] == "Hi there"
    assert main(["run", "--repo", str(repo.path), "--set", "max_length=lots"]) == 2
    assert "max_length='lots': expected a number" in capsys.readouterr().err
    assert main(["history", "--repo", str(repo.path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "version",
        "commit",
        "settings",
        "model",
        "status",
        "outcome",
        "trigger",
        "started",
        "run",
        "id",
        "reason",
    ]
    assert lines[1].split()[1:4] == ["FAILED", "failed", "manual"]  # no version, digest or model
    assert "SettingsError: textgen.yaml at commit" in lines[1]  # the reason, in one line
    assert lines[2].split()[0] == "1" and "FINISHED" in lines[2]
    assert main(["history", "--repo", str(repo.path.parent / "never-ran")]) == 5


def test_each_run_leaves_a_markdown_artifact_in_prefect(
    make_repo: RepoFactory, tiny_model: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    repo = make_repo({"textgen.yaml": settings_yaml(tiny_model)})
    state = nlp_text_generation(repo_url=str(repo.path), return_state=True)
    record = state.result()
    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    (artifact,) = artifacts
    assert artifact.key == "nlp-text-generation"
    assert f"# Version {record.version}" in artifact.data
    assert record.url in artifact.data and record.commit_sha in artifact.data
