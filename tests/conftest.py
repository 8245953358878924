"""Shared fixtures: a tiny GPT-2 saved locally, temporary git repositories and MLflow stores."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

TINY_CORPUS = [
    "Hello, I'm a language model, and I write text about models and language.",
    "The quick brown fox jumps over the lazy dog while the model learns to write.",
    "Paperspace Gradient workflows run on every push to the main branch of a repository.",
    "MLOps keeps code, data, models and outputs versioned and reproducible.",
    "A seed makes sampling repeatable: the same seed gives the same text.",
]


def build_tiny_gpt2(folder: Path) -> Path:
    """A 2-layer GPT-2 with a small byte-level BPE tokenizer, saved with save_pretrained."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        TINY_CORPUS * 4, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"]
    )
    tokenizer = GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=128,
    )
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def pytest_configure(config: pytest.Config) -> None:
    """No usage statistics from the temporary Prefect server: it has no network. In CI (`CI`
    set), one line per test, with its outcome."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if os.environ.get("CI") and config.option.verbose < 1:
        config.option.verbose = 1


@pytest.fixture(scope="session")
def shared_model_cache() -> Path:
    """The model cache of this machine, shared across sessions: converting a GGUF takes seconds."""
    from tasks.config import model_cache_dir

    return model_cache_dir()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the tiny GPT-2."""
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def textgen_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder for the whole session (mirrors, model cache)."""
    return tmp_path_factory.mktemp("textgen-home")


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated MLflow SQLite store, copied for each test (migrating takes seconds)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker more than the cores, as the tests spend much of their time waiting
    on the servers they start."""
    return (os.cpu_count() or 1) + 1


def _shared_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder every worker of this test run shares (pytest-xdist gives each its own)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def prefect_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated Prefect database, made once per test run (under a lock, for every
    worker) and copied in by each Prefect server a test starts: migrating one takes about 15 s
    of CPU, starting a server on a migrated one a third of that."""
    from tasks.files import file_lock

    folder = _shared_tmp(tmp_path_factory) / "prefect-template"
    database = folder / "prefect.db"
    with file_lock(folder.with_suffix(".lock")):
        if not database.exists():
            folder.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "PREFECT_HOME": str(folder / "home")}
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{folder / 'new.db'}"
            subprocess.run(
                [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                env=env,
                check=True,
                capture_output=True,
                timeout=300,
            )
            (folder / "new.db").rename(database)
    os.environ["TEXTGEN_TEST_PREFECT_DB"] = str(database)
    return database


@pytest.fixture(autouse=True)
def isolated_env(
    textgen_home: Path,
    shared_model_cache: Path,
    mlflow_template: Path,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Path]:
    """Every test gets its own MLflow store, and no test may leave a run RUNNING."""
    monkeypatch.setenv("TEXTGEN_HOME", str(textgen_home))
    monkeypatch.setenv("TEXTGEN_MODEL_CACHE", str(shared_model_cache))
    # Models the tests build live in their temporary folders: the operator allows those.
    monkeypatch.setenv(
        "TEXTGEN_MODEL_DIRS", f"{tmp_path_factory.getbasetemp()}{os.pathsep}{shared_model_cache}"
    )
    store = tmp_path / "mlflow"
    store.mkdir()
    shutil.copyfile(mlflow_template, store / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    monkeypatch.setenv("TEXTGEN_ARTIFACT_ROOT", (store / "artifacts").as_uri())
    for name in (
        "TEXTGEN_REPO",
        "TEXTGEN_GIT_CREDENTIALS",
        "TEXTGEN_ALLOWED_MODELS",
        "TEXTGEN_LINK",
        "TEXTGEN_MODEL",
        "TEXTGEN_VERBOSE",
    ):
        monkeypatch.delenv(name, raising=False)
    # Each test links repositories in a file of its own.
    monkeypatch.setenv("TEXTGEN_LINKS", str(tmp_path / "links.yaml"))
    yield store
    if (store / "mlflow.db").exists():
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
        experiments = [e.experiment_id for e in client.search_experiments()]
        running = (
            client.search_runs(experiments, "attributes.status = 'RUNNING'") if experiments else []
        )
        assert not running, f"runs left RUNNING: {[r.info.run_id for r in running]}"


@pytest.fixture(scope="session")
def prefect_harness(prefect_template: Path) -> Iterator[None]:
    """A temporary Prefect API for the tests that run the flow, on a copy of the migrated
    database (the harness makes its database in a `mkdtemp()` folder of its own)."""
    import tempfile

    from prefect.testing import utilities
    from prefect.testing.utilities import prefect_test_harness

    def seeded_folder() -> str:
        folder = tempfile.mkdtemp()
        shutil.copyfile(prefect_template, Path(folder) / "prefect-test.db")
        return folder

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(utilities, "mkdtemp", seeded_folder)
        with prefect_test_harness(server_startup_timeout=60):
            yield


class GitRepo:
    """A throwaway git repository with a `main` branch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.git("init", "--quiet", "--initial-branch=main")
        self.git("config", "user.email", "dev@example.com")
        self.git("config", "user.name", "Dev Example")
        self.git("config", "commit.gpgsign", "false")

    def git(self, *args: str) -> str:
        """Run git in the repository and return its stdout."""
        result = subprocess.run(
            ["git", *args], cwd=self.path, check=True, capture_output=True, text=True
        )
        return result.stdout.strip()

    def commit(self, files: dict[str, str | None], message: str = "change") -> str:
        """Write (or, for None, delete) files, commit them, and return the new SHA."""
        for name, content in files.items():
            target = self.path / name
            if content is None:
                target.unlink()
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        self.git("add", "--all")
        self.git("commit", "--quiet", "--allow-empty", "-m", message)
        return self.git("rev-parse", "HEAD")


def settings_yaml(model: Path | str, **values: object) -> str:
    """A textgen.yaml for the given model and settings."""
    import yaml

    return yaml.safe_dump({"model": str(model), **values}, sort_keys=False)


RepoFactory = Callable[..., GitRepo]


@pytest.fixture
def make_repo(tmp_path: Path) -> RepoFactory:
    """Factory of git repositories under the test's temporary folder."""
    counter = iter(range(1000))

    def factory(files: dict[str, str] | None = None, message: str = "initial") -> GitRepo:
        repo = GitRepo(tmp_path / f"repo{next(counter)}")
        if files is not None:
            repo.commit(files, message)
        return repo

    return factory
