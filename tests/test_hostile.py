"""Hostile settings and workflow files: each is refused with a named error, in bounded work."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.bounded import load_yaml, show
from tasks.errors import SettingsError
from tasks.globs import glob_match, matches_patterns
from tasks.repo import RepoLocation, resolve_commit
from tasks.settings import load_settings, parse_settings
from tasks.triggers import parse_workflow
from tests.conftest import RepoFactory

# Nine levels of nine aliases: 322 bytes that stand for 9**9 (387 million) values.
ALIAS_BOMB = "\n".join(
    [
        "a: &a [x, x, x, x, x, x, x, x, x]",
        *(
            f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]"
            for prev, name in zip("abcdefgh", "bcdefghi", strict=True)
        ),
    ]
)


def _settings_error(make_repo: RepoFactory, text: str) -> str:
    repo = make_repo({"textgen.yaml": text})
    commit = resolve_commit(RepoLocation.parse(str(repo.path)), "main", None)
    with pytest.raises(SettingsError) as info:
        load_settings(commit)
    return str(info.value)


def test_an_alias_bomb_in_settings_is_refused_before_expanding(make_repo: RepoFactory) -> None:
    message = _settings_error(make_repo, ALIAS_BOMB + "\nrandom_seed: *i\n")
    assert "textgen.yaml at commit" in message
    assert "aliases expand to more than" in message
    assert len(message) < 500


def test_an_alias_bomb_in_a_workflow_file_is_refused() -> None:
    text = ALIAS_BOMB + "\non:\n  github:\n    branches:\n      only: *i\n"
    with pytest.raises(SettingsError, match=r"w\.yaml: YAML aliases expand"):
        parse_workflow(text.encode(), "w.yaml")


def test_small_aliases_still_work() -> None:
    doc = load_yaml(b"base: &b {x: 1}\nuse: *b\nlist: [*b, *b]\n", "f")
    assert doc["list"] == [{"x": 1}, {"x": 1}]


def test_a_self_referencing_alias_is_refused() -> None:
    with pytest.raises(SettingsError, match="aliases expand"):
        load_yaml(b"a: &a [1, *a]\n", "f")


def test_messages_never_carry_unbounded_values() -> None:
    huge = "x" * 1_000_000
    with pytest.raises(SettingsError) as info:
        parse_settings({"random_seed": huge}, "textgen.yaml")
    assert len(str(info.value)) < 300
    with pytest.raises(SettingsError) as info:
        parse_settings({huge: 1}, "textgen.yaml")
    assert len(str(info.value)) < 1500
    assert len(show([[huge] * 100] * 100)) < 300


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            {"num_beams": 200000, "num_return_sequences": 1},
            "num_beams=200000 exceeds the operator limit 8 (TEXTGEN_MAX_BEAMS)",
        ),
        ({"temperature": float("inf")}, "temperature=inf: Input should be a finite number"),
        ({"temperature": float("nan")}, "temperature=nan: Input should be a finite number"),
        (
            {"repetition_penalty": float("inf")},
            "repetition_penalty=inf: Input should be a finite number",
        ),
        ({"top_k": 1e20}, "top_k=1e+20: Unable to parse input string as an integer"),
        ({"top_p": -1.0}, "top_p=-1.0: Input should be greater than 0"),
        (
            {"no_repeat_ngram_size": 10**9},
            "no_repeat_ngram_size=1000000000: Input should be less than or equal to 1024",
        ),
        ({"max_length": 10**6}, "max_length=1000000 exceeds the operator limit"),
        (
            {"num_return_sequences": 10**6},
            "num_return_sequences=1000000 exceeds the operator limit",
        ),
    ],
)
def test_knobs_that_multiply_work_are_capped(
    make_repo: RepoFactory, values: dict[str, object], expected: str
) -> None:
    import yaml

    text = yaml.safe_dump({"model": "gpt2", **values})
    message = _settings_error(make_repo, text)
    assert "textgen.yaml at commit" in message
    assert expected in message


def test_an_oversized_settings_file_is_refused_before_parsing(make_repo: RepoFactory) -> None:
    message = _settings_error(make_repo, 'random_seed: "' + "x" * 300_000 + '"\n')
    assert "textgen.yaml at commit" in message
    assert "the file has 300016 bytes; allowed: at most 262144" in message


def test_a_five_thousand_digit_seed_names_the_file_and_key(make_repo: RepoFactory) -> None:
    message = _settings_error(make_repo, "model: gpt2\nrandom_seed: " + "7" * 5000 + "\n")
    assert "textgen.yaml at commit" in message
    assert (
        "random_seed=<a number of 5000 characters>: a number of 5000 characters is out of range"
        in message
    )
    assert len(message) < 400


def test_max_length_past_the_models_context_is_a_named_error(
    make_repo: RepoFactory, tiny_model: Path
) -> None:
    from tasks.generate import run_generation
    from tasks.model import build_generator

    settings = parse_settings({"model": str(tiny_model), "max_length": 400}, "textgen.yaml")
    generator = build_generator(settings)
    with pytest.raises(
        SettingsError,
        match=r"max_length=400: .* past the context of model .* \(128 positions\); allowed: max_length up to 128",
    ):
        run_generation(generator, settings)
    settings = parse_settings({"model": str(tiny_model), "max_new_tokens": 127}, "textgen.yaml")
    with pytest.raises(
        SettingsError, match=r"max_new_tokens=127: .* allowed: .* max_new_tokens up to \d+"
    ):
        run_generation(generator, settings)
    long_prompt = " ".join(["Hello"] * 300)
    settings = parse_settings(
        {"model": str(tiny_model), "initial_sentence": long_prompt, "max_new_tokens": 5}, "t"
    )
    with pytest.raises(
        SettingsError, match=r"initial_sentence is \d+ tokens, which fills the context"
    ):
        run_generation(generator, settings)
    settings = parse_settings(
        {"model": str(tiny_model), "initial_sentence": long_prompt[:200]}, "t"
    )
    with pytest.raises(
        SettingsError,
        match=r"max_length=30 leaves no room for new tokens after the prompt \(\d+ tokens\)",
    ):
        run_generation(generator, settings)


# The regex translation the matcher replaced: a slow reference for small inputs.
def _reference(pattern: str) -> re.Pattern[str]:
    out: list[str] = []
    i = 0
    n = len(pattern)
    while i < n:
        char = pattern[i]
        if char == "\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if char == "*":
            if pattern.startswith("**", i):
                i += 2
                if i < n and pattern[i] == "/":
                    out.append("(?:.*/)?")
                    i += 1
                else:
                    out.append(".*")
                continue
            out.append("[^/]*")
        elif char in "?+":
            if out and not out[-1].endswith(("*", "?", "+")):
                out.append(char)
            else:
                out.append(re.escape(char))
        elif char == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(char))
            else:
                body = pattern[i + 1 : end].replace("\\", "\\\\")
                out.append(f"[{body}]")
                i = end
        else:
            out.append(re.escape(char))
        i += 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "possible nested set"
        return re.compile("".join(out) + r"\Z")


@settings(max_examples=400, deadline=None)
@given(
    pattern=st.text(alphabet="ab/*?+.[]-\\", min_size=0, max_size=10),
    path=st.text(alphabet="ab/.-*", min_size=0, max_size=12),
)
def test_the_linear_matcher_agrees_with_the_regex_reference(pattern: str, path: str) -> None:
    try:
        ours = glob_match(pattern, path)
    except SettingsError as exc:
        # Malformed classes are named errors (the regex either raised re.error or read
        # `[]...]` as a class holding `]`).
        assert "is empty" in str(exc) or "is reversed" in str(exc)
        return
    try:
        reference = _reference(pattern)
    except re.error:
        pytest.fail(f"the matcher accepted {pattern!r}, which the reference cannot compile")
    assert ours == bool(reference.match(path)), (pattern, path)


def test_a_pathological_pattern_is_matched_in_linear_time() -> None:
    # Backtracking takes exponential time here; the matcher walks the name once.
    pattern = "*a" * 20 + "*b"
    name = "a" * 5000
    assert not glob_match(pattern, name)
    patterns = ["**" + "*a" * 12 + "c"] * 50
    assert not matches_patterns("a" * 4000, patterns)


def test_pattern_errors_name_the_file_and_pattern() -> None:
    text = b"on:\n  github:\n    paths-ignore: ['docs/[z-a].md']\n"
    with pytest.raises(
        SettingsError,
        match=r"w.yaml: on.github.paths-ignore: pattern 'docs/\[z-a\].md': the class range z-a is reversed",
    ):
        parse_workflow(text, "w.yaml")
    long = "a" * 300
    with pytest.raises(SettingsError, match="has 300 characters; allowed: at most 256"):
        parse_workflow(f"on:\n  github:\n    paths: ['{long}']\n".encode(), "w.yaml")
    many = ", ".join(["a"] * 201)
    with pytest.raises(SettingsError, match="201 patterns; allowed: at most 200"):
        parse_workflow(f"on:\n  github:\n    paths: [{many}]\n".encode(), "w.yaml")


@pytest.mark.usefixtures("prefect_harness")
def test_a_run_past_its_deadline_ends_failed_with_the_reason(
    make_repo: RepoFactory, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from mlflow import MlflowClient

    from flows.text_generation import nlp_text_generation
    from tasks import generate
    from tasks.errors import RunTimeoutError
    from tests.conftest import settings_yaml

    def endless(*args: object, **kwargs: object) -> None:
        for _ in range(600):  # a push that would hold the slot for ten minutes
            time.sleep(0.1)

    monkeypatch.setattr(generate, "run_generation", endless)
    monkeypatch.setenv("TEXTGEN_RUN_TIMEOUT", "3")
    repo = make_repo({"textgen.yaml": settings_yaml(tiny_model)})
    started = time.monotonic()
    with pytest.raises(RunTimeoutError, match=r"deadline of 3 s \(TEXTGEN_RUN_TIMEOUT\)"):
        nlp_text_generation(repo_url=str(repo.path))
    assert time.monotonic() - started < 50  # stopped, not left to run its ten minutes
    client = MlflowClient()
    [experiment] = [e for e in client.search_experiments() if e.name == str(repo.path)]
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"
    assert "deadline of 3 s" in run.data.tags["textgen.failure"]


def _model_error(make_repo: RepoFactory, model: str) -> str:
    from tasks.model import locate_model

    repo = make_repo({"textgen.yaml": f"model: {model}\n"})
    commit = resolve_commit(RepoLocation.parse(str(repo.path)), "main", None)
    settings, _ = load_settings(commit)
    with pytest.raises(SettingsError) as info:
        locate_model(settings, commit)
    return str(info.value)


@pytest.mark.parametrize("model", ["/etc", "/usr", "/nonexistent/secret", "~/.ssh", "../../etc"])
def test_a_push_cannot_name_paths_outside_the_allowed_model_folders(
    make_repo: RepoFactory, model: str
) -> None:
    message = _model_error(make_repo, model)
    assert "is not allowed: give a hub id, a path inside the repository" in message
    assert "TEXTGEN_MODEL_DIRS" in message


def test_existing_and_missing_paths_are_refused_alike(make_repo: RepoFactory) -> None:
    assert _model_error(make_repo, "/etc").replace("/etc", "X") == _model_error(
        make_repo, "/no-such-dir"
    ).replace("/no-such-dir", "X")


def test_the_data_folder_and_a_symlink_out_of_an_allowed_folder_are_refused(
    make_repo: RepoFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    allowed = tmp_path / "models"
    allowed.mkdir()
    (allowed / "escape").symlink_to("/etc")
    monkeypatch.setenv("TEXTGEN_MODEL_DIRS", str(allowed))
    assert "is not allowed" in _model_error(make_repo, str(allowed / "escape"))
    assert "is not allowed" in _model_error(make_repo, os.environ["TEXTGEN_HOME"])


def test_a_model_folder_inside_the_repository_is_used_from_the_commit(
    make_repo: RepoFactory, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.model import build_generator, local_revision, locate_model

    files = {f"models/tiny/{p.name}": p.read_bytes() for p in tiny_model.iterdir() if p.is_file()}
    repo = make_repo({"textgen.yaml": "model: models/tiny\nmax_new_tokens: 4\n"})
    for name, data in files.items():
        target = repo.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    repo.commit({}, "add the model")
    monkeypatch.setenv("TEXTGEN_MODEL_DIRS", "/nonexistent-allowed")  # not needed for it
    commit = resolve_commit(RepoLocation.parse(str(repo.path)), "main", None)
    settings, _ = load_settings(commit)
    path = locate_model(settings, commit)
    assert path is not None and path.is_dir() and (path / "config.json").exists()
    generator = build_generator(settings, local_revision(settings, path), path)
    assert generator.kind == "hub" or generator.loaded_from == str(path)
    assert "no folder or .gguf file in the repository" in _model_error(make_repo, "./missing")


def test_a_huge_model_folder_is_refused_before_hashing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.errors import ModelError
    from tasks.model import folder_digest

    folder = tmp_path / "many"
    folder.mkdir()
    for index in range(30):
        (folder / f"f{index}").write_bytes(b"x" * 100)
    monkeypatch.setenv("TEXTGEN_MAX_MODEL_BYTES", "1000")
    with pytest.raises(ModelError, match="more than 10000 files or 1000 bytes"):
        folder_digest(folder)
