"""The README's commands, run as written in a fresh clone: the quick start, the push walkthrough
and the hand-run deployment, in one shell, with a data folder of their own.

Slow (a fresh `.venv` is installed by the quick start's own bootstrap); CI runs it. It needs
the ports the README uses (8787, 4200, 5000) and the /tmp paths it names to be free.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
README_PATHS = ("/tmp/textgen-origin.git", "/tmp/textgen-serve.log", "/tmp/compare.html")
README_PATHS += ("/tmp/versions.svg",)


def bash_blocks(text: str) -> list[str]:
    """The README's ```bash blocks, in order."""
    return re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)


def block_with(blocks: list[str], marker: str) -> str:
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"expected one README block with {marker!r}, found {len(found)}"
    return found[0]


def test_the_readme_commands_work_as_written(tmp_path: Path, shared_model_cache: Path) -> None:
    for port in (8787, 4200, 5000):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} is in use"
    for path in README_PATHS:
        assert not Path(path).exists(), f"{path} exists: the README's walkthrough would use it"
    blocks = bash_blocks((ROOT / "README.md").read_text())
    quick_start = blocks[0].splitlines()[1]  # the main job, below its comment line
    assert quick_start.startswith("deployments/bootstrap.sh && ")
    walkthrough = block_with(blocks, "git clone --bare . /tmp/textgen-origin.git")
    hand_run = block_with(blocks, "prefect deployment run")

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    empty_home = tmp_path / "empty-home"
    empty_home.mkdir()
    commit = subprocess.run(
        ["git", "rev-parse", "--short=7", "HEAD"], cwd=clone, text=True, capture_output=True
    ).stdout.strip()
    script = tmp_path / "readme.sh"
    script.write_text(
        "set -euo pipefail\n"
        # serve, started in the background by the walkthrough, ends with the script.
        "trap 'kill $(jobs -p) 2>/dev/null || true; wait || true' EXIT\n"
        f"{quick_start} | tee {shlex.quote(str(tmp_path / 'quick-start.out'))}\n"
        f"{walkthrough}\n"
        # The placeholder SHA of the README is this clone's commit.
        f"{hand_run.replace('12345e7', commit)}\n"
        ".venv/bin/textgen status --wait\n"
        f".venv/bin/textgen history --json > {shlex.quote(str(tmp_path / 'history.json'))}\n"
    )
    drop = {"MLFLOW_TRACKING_URI", "TEXTGEN_ARTIFACT_ROOT", "PREFECT_API_URL", "TEXTGEN_LINKS"}
    drop |= {"TEXTGEN_MODEL_DIRS", "TEXTGEN_WEBHOOK_SECRET", "TEXTGEN_MODEL", "VIRTUAL_ENV"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        {
            "TEXTGEN_HOME": str(tmp_path / "home"),
            # The offline model converted once on this machine (CI converts it first).
            "TEXTGEN_MODEL_CACHE": str(shared_model_cache),
            "PREFECT_HOME": str(tmp_path / "prefect-cli"),
            # A fresh machine: an empty home, no git identity anywhere (the walkthrough's
            # commit must still work); pip's cache stays where it is.
            "HOME": str(empty_home),
            "GIT_CONFIG_NOSYSTEM": "1",
            "XDG_CACHE_HOME": str(Path.home() / ".cache"),
        }
    )
    for name in (
        "GIT_AUTHOR_NAME",
        "GIT_AUTHOR_EMAIL",
        "GIT_COMMITTER_NAME",
        "GIT_COMMITTER_EMAIL",
    ):
        env.pop(name, None)
    try:
        result = subprocess.run(
            ["bash", str(script)],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        serve_log = Path("/tmp/textgen-serve.log")
        log = serve_log.read_text(errors="replace") if serve_log.exists() else ""
        assert result.returncode == 0, (result.stdout[-4000:], result.stderr[-6000:], log[-4000:])
        assert "version 1 (commit" in (tmp_path / "quick-start.out").read_text()
        rows = json.loads((tmp_path / "history.json").read_text())
        by_outcome = {(r["outcome"], r["trigger"]) for r in rows}
        assert [r["version"] for r in rows if r["outcome"] == "new"] == ["2", "1"], rows
        assert ("new", "push") in by_outcome and ("new", "manual") in by_outcome
        assert all(r["outcome"] != "failed" for r in rows), rows
        # The hand runs: the tip (the pushed version 2) and the clone's first commit (version 1).
        hand = [r for r in rows if r["outcome"] == "reused"]
        assert sorted(r["version"] for r in hand) == ["=1", "=2"], rows
        assert "<svg" in Path("/tmp/compare.html").read_text()
        assert "data-metric" in Path("/tmp/versions.svg").read_text()
        assert "Deployment not found" not in result.stderr + result.stdout
        # The walkthrough's commit, on a machine without a git identity: the placeholder's.
        authors = subprocess.run(
            ["git", "log", "--format=%an|%s", "-3"], cwd=clone, text=True, capture_output=True
        ).stdout
        assert "textgen walkthrough|Generate with seed 7" in authors, authors
    finally:
        for path in README_PATHS:
            target = Path(path)
            if target.is_dir():
                subprocess.run(["rm", "-rf", str(target)], check=False)
            elif target.exists():
                target.unlink()
