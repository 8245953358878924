"""What a new user meets first: the machine's model, clear errors, one experiment per
repository, warnings about uncommitted files, failed and reused runs, `status`, `--version`,
the MLflow UI's port, and progress that leaves the texts alone."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from deployments.cli import main
from flows.text_generation import nlp_text_generation
from tasks.config import operator_file, set_operator_model
from tasks.repo import repository_identity, uncommitted_changes
from tasks.tracking import Tracker
from tests.conftest import GitRepo, RepoFactory, settings_yaml
from tests.servers import textgen_process

pytestmark = pytest.mark.usefixtures("prefect_harness")


def client() -> MlflowClient:
    return MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


@pytest.fixture
def own_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data folder of this test's own, for the operator file."""
    home = tmp_path / "home"
    monkeypatch.setenv("TEXTGEN_HOME", str(home))
    return home


def test_the_machines_model_replaces_the_settings_model_and_is_recorded_as_such(
    make_repo: RepoFactory, tiny_model: Path, own_home: Path
) -> None:
    # The repository asks for the hub's gpt2, which this machine cannot download.
    repo = make_repo({"textgen.yaml": settings_yaml("gpt2", random_seed=3)})
    path = set_operator_model(str(tiny_model))
    assert path == operator_file() and path.parent == own_home
    record = nlp_text_generation(repo_url=str(repo.path))
    assert record.outcome == "new"
    run = client().get_run(record.run_id)
    params = run.data.params
    assert params["model"] == str(tiny_model)  # the model used, never the one not used
    assert params["model.requested"] == "gpt2"
    assert params["model.set_by"] == str(path)
    assert params["model.loaded_from"] == str(tiny_model)
    doc = json.loads(Path(client().download_artifacts(record.run_id, "settings.json")).read_text())
    assert doc["settings"]["model"] == str(tiny_model)
    assert doc["model_choice"] == {"model.requested": "gpt2", "model.set_by": str(path)}

    # The same commit again: the same version, found by the settings actually used.
    again = nlp_text_generation(repo_url=str(repo.path))
    assert (again.outcome, again.version) == ("reused", record.version)

    # TEXTGEN_MODEL wins over the file; `--set model=` of one run wins over both.
    os.environ["TEXTGEN_MODEL"] = "/nowhere/model"
    try:
        explicit = nlp_text_generation(
            repo_url=str(repo.path), overrides={"model": str(tiny_model)}, force=True
        )
    finally:
        del os.environ["TEXTGEN_MODEL"]
    explicit_params = client().get_run(explicit.run_id).data.params
    assert explicit_params["model"] == str(tiny_model) and "model.set_by" not in explicit_params

    set_operator_model(None)
    assert "model:" not in operator_file().read_text()


def test_offline_model_use_and_forget(
    own_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: Any
) -> None:
    import tasks.offline

    folder = tmp_path / "smollm2"
    monkeypatch.setattr(tasks.offline, "offline_model", lambda: folder)
    assert main(["offline-model", "--use"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(folder)  # stdout stays the folder, for $(...)
    assert "now generate with" in captured.err
    assert f"model: {folder}" in operator_file().read_text()
    assert main(["offline-model", "--forget"]) == 0
    assert "model:" not in operator_file().read_text()


def test_an_expected_error_is_one_message_and_the_records_keep_the_traceback(
    make_repo: RepoFactory, tiny_model: Path
) -> None:
    repo = make_repo({"textgen.yaml": settings_yaml(tiny_model)})
    quiet = textgen_process(
        "run", "--repo", str(repo.path), "--set", "random_seed=forty", timeout=300
    )
    assert quiet.returncode == 2
    assert "Traceback" not in quiet.stderr, quiet.stderr
    errors = [line for line in quiet.stderr.splitlines() if "random_seed='forty'" in line]
    assert errors == [
        f"textgen: error: textgen.yaml at commit {repo.git('rev-parse', '--short=7', 'HEAD')} "
        f"of {repo.path} with overrides of random_seed: random_seed='forty': expected a number"
    ], quiet.stderr

    loud = textgen_process(
        "--verbose", "run", "--repo", str(repo.path), "--set", "random_seed=forty", timeout=300
    )
    assert loud.returncode == 2 and "Traceback" in loud.stderr

    runs = client().search_runs(
        [Tracker.for_repo(str(repo.path)).experiment_id], order_by=["attributes.start_time DESC"]
    )
    assert len(runs) == 2
    failed = runs[0]
    sha = repo.git("rev-parse", "HEAD")
    assert failed.info.status == "FAILED"
    assert failed.data.tags["mlflow.runName"] == f"{sha[:7]} (failed)"
    reason = failed.data.tags["textgen.failure"]
    assert reason.startswith("SettingsError: textgen.yaml at commit") and "\n" not in reason
    error = Path(client().download_artifacts(failed.info.run_id, "error.txt")).read_text()
    first, blank, *rest = error.splitlines()
    assert (first, blank) == (reason, "")
    assert rest[0].startswith("Traceback") and "SettingsError" in rest[-1]


def test_one_repository_is_one_experiment_however_it_is_reached(
    make_repo: RepoFactory, tiny_model: Path, tmp_path: Path, capsys: Any
) -> None:
    checkout = make_repo({"textgen.yaml": settings_yaml(tiny_model, random_seed=1)})
    bare = tmp_path / "origin.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(checkout.path), str(bare)], check=True)
    checkout.git("remote", "add", "local", str(bare))
    assert repository_identity(str(bare)) == str(checkout.path)

    first = nlp_text_generation(repo_url=str(checkout.path))  # the quick start: the checkout
    checkout.commit({"textgen.yaml": settings_yaml(tiny_model, random_seed=7)}, "seed 7")
    checkout.git("push", "--quiet", "local", "HEAD:main")
    second = nlp_text_generation(repo_url=str(bare))  # the walkthrough: pushes to the bare clone
    assert first.experiment_id == second.experiment_id
    assert (first.version, second.version) == (1, 2)
    assert main(["compare", "1", "2", "--repo", str(checkout.path), "--no-color"]) == 0
    assert "random_seed  1   7" in capsys.readouterr().out

    # A checkout of a hosted repository and its URL, with or without `.git`, are one too.
    hosted = make_repo({"textgen.yaml": settings_yaml(tiny_model)})
    hosted.git("remote", "add", "origin", "https://git.example.com/team/Hosted.git")
    mine = Tracker.for_repo(str(hosted.path))
    assert (
        mine.experiment_id == Tracker.for_repo("https://git.example.com/team/hosted").experiment_id
    )
    assert (
        mine.experiment_id == Tracker.for_repo("git@git.example.com:team/hosted.git").experiment_id
    )
    assert mine.experiment_id != first.experiment_id


def test_an_experiment_from_before_stays_the_repositorys(
    make_repo: RepoFactory, tiny_model: Path
) -> None:
    repo = make_repo({"textgen.yaml": settings_yaml(tiny_model)})
    repo.git("remote", "add", "origin", "https://git.example.com/team/older.git")
    legacy = client().create_experiment(str(repo.path))  # named by the path, untagged
    assert Tracker.for_repo(str(repo.path)).experiment_id == legacy
    assert Tracker.for_repo("https://git.example.com/team/older").experiment_id == legacy


def test_uncommitted_settings_are_named_before_the_run(
    make_repo: RepoFactory, tiny_model: Path, capsys: Any
) -> None:
    repo = make_repo({"textgen.yaml": settings_yaml(tiny_model, random_seed=1), "a.txt": "a"})
    assert main(["run", "--repo", str(repo.path)]) == 0
    capsys.readouterr()
    (repo.path / "textgen.yaml").write_text(settings_yaml(tiny_model, random_seed=5))
    (repo.path / "notes.txt").write_text("untracked, not read by runs")
    (repo.path / ".gradient" / "workflows").mkdir(parents=True)
    (repo.path / ".gradient" / "workflows" / "w.yaml").write_text("on: {}")
    assert uncommitted_changes(repo.path) == [".gradient/workflows/w.yaml", "textgen.yaml"]
    assert uncommitted_changes(repo.path, "other-branch") == []
    assert main(["run", "--repo", str(repo.path)]) == 0
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if "warning:" in line]
    assert len(warning) == 1 and "textgen.yaml" in warning[0] and "commit them" in warning[0]
    assert "already version 1; reused it" in captured.out


def test_a_reused_run_links_the_version_that_holds_the_output(
    make_repo: RepoFactory, tiny_model: Path, capsys: Any
) -> None:
    repo = make_repo({"textgen.yaml": settings_yaml(tiny_model)})
    first = nlp_text_generation(repo_url=str(repo.path))
    assert main(["run", "--repo", str(repo.path), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["outcome"] == "reused" and again["version"] == first.version
    assert again["output_url"] == first.url.replace("?", "/artifactPath/output.txt?")
    assert again["url"] != first.url
    linked = again["output_url"].split("/runs/")[1].split("/")[0]
    names = [a.path for a in client().list_artifacts(linked)]
    assert "output.txt" in names
    assert [a.path for a in client().list_artifacts(again["mlflow_run_id"])] == []


def test_params_hold_what_is_set_and_settings_json_the_rest(
    make_repo: RepoFactory, tiny_model: Path
) -> None:
    repo = make_repo({"textgen.yaml": settings_yaml(tiny_model, top_k=20)})
    record = nlp_text_generation(repo_url=str(repo.path))
    params = client().get_run(record.run_id).data.params
    assert "None" not in params.values()
    assert params["top_k"] == "20" and "top_p" not in params and "temperature" not in params
    assert params["max_length"] == "30"  # the original example's default, which was used
    doc = json.loads(Path(client().download_artifacts(record.run_id, "settings.json")).read_text())
    assert doc["settings"]["top_p"] is None and doc["settings"]["top_k"] == 20


def test_version_and_status_without_a_service(
    make_repo: RepoFactory, tiny_model: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("textgen 0.") and "prefect 3." in out and "mlflow 3." in out

    repo = make_repo({"textgen.yaml": settings_yaml(tiny_model)})
    record = nlp_text_generation(repo_url=str(repo.path))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "Prefect API: none" in out
    assert f"v1 ({record.commit_sha[:7]})  {repo.path}  {record.url}" in out
    assert main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["runs"] == [] and status["versions"][0]["url"] == record.url
    assert main(["status", "--env"]) == 2
    assert "start `textgen serve` first" in capsys.readouterr().err
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4999/api")
    assert main(["status", "--env"]) == 0
    assert capsys.readouterr().out == "export PREFECT_API_URL=http://127.0.0.1:4999/api\n"


def test_a_busy_port_is_an_error(tmp_path: Path, capsys: Any) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main(["ui", "--port", str(port)]) == 6
        assert f"cannot serve the MLflow UI on 127.0.0.1:{port}" in capsys.readouterr().err
        args = ["serve", "--repo", str(tmp_path), "--insecure", "--ui-port", str(port)]
        assert main(args) == 6
        assert "pick another with --ui-port" in capsys.readouterr().err


@pytest.mark.parametrize(
    "settings",
    [
        {"random_seed": 3, "max_new_tokens": 12},
        {"random_seed": 4, "max_length": 20, "num_beams": 3, "num_return_sequences": 2},
    ],
)
def test_progress_reports_tokens_and_leaves_the_texts_alone(
    tiny_model: Path, settings: dict[str, Any]
) -> None:
    from tasks.generate import run_generation
    from tasks.model import build_generator
    from tasks.settings import GenerationSettings

    chosen = GenerationSettings(model=str(tiny_model), **settings)
    generator = build_generator(chosen, None, tiny_model)
    plain = run_generation(generator, chosen)
    heard: list[tuple[int, int | None]] = []
    reported = run_generation(
        generator, chosen, progress=lambda n, total, _: heard.append((n, total)), every=0.0
    )
    assert reported.texts == plain.texts
    total = settings.get("max_new_tokens") or settings["max_length"] - len(
        generator.pipeline.tokenizer(chosen.initial_sentence)["input_ids"]
    )
    assert heard and all(t == total for _, t in heard)
    assert [n for n, _ in heard] == list(range(1, len(heard) + 1)) and len(heard) <= total


def test_uncommitted_changes_of_a_bare_or_remote_repository_are_none(tmp_path: Path) -> None:
    repo = GitRepo(tmp_path / "work")
    repo.commit({"a.txt": "a"})
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(repo.path), str(bare)], check=True)
    assert uncommitted_changes(bare) == []
    assert uncommitted_changes("https://git.example.com/team/repo.git") == []


def test_shell_completion_and_usage_errors(capsys: Any) -> None:
    def complete(*words: str) -> list[str]:
        env = {
            **os.environ,
            "_TEXTGEN_COMPLETE": "complete_bash",
            "COMP_WORDS": " ".join(["textgen", *words]),
            "COMP_CWORD": str(len(words)),
        }
        done = subprocess.run(
            [sys.executable, "-m", "deployments.cli"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert complete("hi") == ["history"]
    assert set(complete("history", "--")) >= {"--repo", "--plot", "--json", "--since"}
    assert complete("link", "") == ["add", "list", "remove"]
    # The script for the shell it is run from (typer detects it), as `--install-completion`.
    script = subprocess.run(
        # Two commands, so bash stays the parent (it would exec a single one in its place).
        ["bash", "-c", f"{shlex.quote(sys.executable)} -m deployments.cli --show-completion; exit"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "_TEXTGEN_COMPLETE=complete_bash" in script.stdout

    assert main(["bogus"]) == 2
    assert "No such command 'bogus'" in capsys.readouterr().err
    assert main(["link", "add", "x", "--provider", "nope"]) == 2
    assert "'nope' is not one of 'github', 'gitea', 'gitlab', 'hook', 'poll'" in (
        " ".join(capsys.readouterr().err.split())
    )
