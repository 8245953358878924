"""What the commands print: no line a user cannot act on, one log format, the links that lead
to what they name, one line for a missing optional package, and `status --wait` saying when
no push arrived."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from deployments.cli import main
from deployments.service.record import service_file
from tasks import logs
from tests.conftest import RepoFactory, settings_yaml
from tests.servers import textgen_process

LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| (INFO|WARNING|ERROR|DEBUG|CRITICAL) *\| .+ - ")


@pytest.mark.slow  # two commands in processes of their own
def test_a_run_prints_its_stages_in_one_format_and_no_library_chatter(
    make_repo: RepoFactory, tiny_model: Path, prefect_harness: None
) -> None:
    repo = make_repo({"textgen.yaml": settings_yaml(tiny_model)})
    done = textgen_process("run", "--repo", str(repo.path), harness_api=False)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    for noise in (*logs.CHATTER, "Loading weights", "it/s]", "See https://www.prefect.io"):
        assert noise not in done.stderr, (noise, done.stderr)
    assert all(LINE.match(line) for line in lines), done.stderr  # one format, no stray lines
    for stage in ("Resolved ", "Settings from textgen.yaml", "Model ", "Generated ", "Recorded"):
        assert any(stage in line for line in lines), (stage, done.stderr)
    assert "output.txt: " in done.stdout and "/artifactPath/output.txt?" in done.stdout
    verbose = textgen_process("-v", "run", "--repo", str(repo.path), "--force")
    assert verbose.returncode == 0, verbose.stderr
    assert "Finished in state Completed()" in verbose.stderr  # -v keeps the rest


def test_the_ui_hint_is_printed_only_when_nothing_serves_the_ui(
    make_repo: RepoFactory, tiny_model: Path, capsys: Any, prefect_harness: None
) -> None:
    hint = "the links open in the MLflow UI that `textgen serve` or `textgen ui` serves"
    repo = make_repo({"textgen.yaml": settings_yaml(tiny_model)})
    assert main(["run", "--repo", str(repo.path)]) == 0
    assert hint in capsys.readouterr().out
    service_file().parent.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "mlflow_ui": "http://127.0.0.1:5999", "serves_ui": True}
    service_file().write_text(json.dumps(record))
    try:
        assert main(["run", "--repo", str(repo.path), "--force"]) == 0
        out = capsys.readouterr().out
        assert hint not in out and "http://127.0.0.1:5999/#/experiments/" in out
    finally:
        service_file().unlink()


def test_team_up_without_the_team_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "psycopg2" else real(name, *a)
    )
    assert main(["team", "up"]) == 6
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, no traceback
    assert "pip install 'nlp-text-generation[team]'" in err and "psycopg2" in err


def test_status_wait_says_when_no_push_reached_serve(capsys: Any) -> None:
    service_file().parent.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "mlflow_ui": "", "prefect_api": None, "started": time.time()}
    service_file().write_text(json.dumps(record))
    try:
        assert main(["status", "--wait", "--timeout", "30"]) == 0
        out = capsys.readouterr().out
        assert "none received\n  no push has reached serve since it started: if you pushed" in out
        assert main(["status", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["received_since_start"] == 0
    finally:
        service_file().unlink()


def test_the_read_only_commands_import_neither_torch_nor_prefect(make_repo: RepoFactory) -> None:
    repo = make_repo({"README.md": "nothing has run here"})
    where = ["--repo", str(repo.path)]
    commands = [["history", *where], ["compare", "1", "2", *where], ["status"], ["config"]]
    code = (
        "import sys\n"
        "from deployments.cli import main\n"
        f"codes = [main(args) for args in {commands!r}]\n"
        "heavy = sorted(m for m in ('prefect', 'torch', 'transformers') if m in sys.modules)\n"
        "print(codes, heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # 5: nothing has run for the repository yet; status and config answer.
    assert done.stdout.strip().splitlines()[-1] == "[5, 5, 0, 0] []", (done.stdout, done.stderr)
