"""Settings: the textgen.yaml contract, the legacy script, overrides and operator limits."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tasks.config import OperatorLimits
from tasks.errors import SettingsError
from tasks.repo import RepoLocation, resolve_commit
from tasks.settings import GenerationSettings, load_settings, parse_legacy_script
from tests.conftest import RepoFactory

ORIGINAL_SCRIPT = """\
# Setup
from transformers import pipeline, set_seed

# Settings
random_seed = 42
max_length = 30
num_return_sequences = 5
initial_sentence = "Hello, I'm a language model,"

# Create generator that uses GPT-2
generator = pipeline('text-generation', model='gpt2')
set_seed(random_seed)
output = generator(initial_sentence, max_length = max_length,
                   num_return_sequences = num_return_sequences)
with open('output.txt', 'w') as f:
    print(output, file=f)
print('Done')
"""


def settings_at(make_repo, files: dict[str, str], overrides=None, limits=None):
    repo = make_repo(files)
    commit = resolve_commit(RepoLocation.parse(str(repo.path)), "main", None)
    return load_settings(commit, overrides, limits), commit


def error_at(make_repo, files: dict[str, str], overrides=None, limits=None) -> tuple[str, str]:
    repo = make_repo(files)
    commit = resolve_commit(RepoLocation.parse(str(repo.path)), "main", None)
    with pytest.raises(SettingsError) as caught:
        load_settings(commit, overrides, limits)
    return str(caught.value), commit.short_sha


def test_defaults_are_the_original_example() -> None:
    settings = GenerationSettings().effective()
    assert settings.model == "gpt2"
    assert (settings.random_seed, settings.max_length, settings.num_return_sequences) == (42, 30, 5)
    assert settings.initial_sentence == "Hello, I'm a language model,"
    assert settings.pipeline_kwargs() == {"max_length": 30, "num_return_sequences": 5}


def test_reads_textgen_yaml_at_the_commit(make_repo: RepoFactory) -> None:
    (settings, source), _ = settings_at(
        make_repo,
        {"textgen.yaml": "model: gpt2\nrandom_seed: 7\nmax_new_tokens: 12\ntop_k: 5\n"},
    )
    assert source == "textgen.yaml"
    assert settings.random_seed == 7
    assert settings.pipeline_kwargs() == {
        "max_new_tokens": 12,
        "num_return_sequences": 5,
        "top_k": 5,
    }


def test_digest_is_stable_and_follows_every_setting() -> None:
    base = GenerationSettings()
    assert (
        base.digest() == GenerationSettings(max_length=30).digest()
    )  # the same effective settings
    assert base.digest() != GenerationSettings(random_seed=43).digest()
    assert base.digest() != GenerationSettings(model="gpt2-medium").digest()
    assert re.fullmatch(r"[0-9a-f]{64}", base.digest())


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            "random_seed: 1\nbogus: 3\n",
            r"unknown key 'bogus' is not a setting; allowed keys: model, ",
        ),
        ("trust_remote_code: true\n", r"'trust_remote_code' is set by TEXTGEN_TRUST_REMOTE_CODE"),
        ("random_seed: forty\n", r"random_seed='forty': expected a number"),
        ("max_length: 12.5\n", r"max_length=12.5: expected a whole number"),
        ("max_length: 0\n", r"max_length=0: Input should be greater than or equal to 1"),
        (
            "num_return_sequences: -2\n",
            r"num_return_sequences=-2: Input should be greater than or equal to 1",
        ),
        ("random_seed: true\n", r"random_seed=True: expected a number"),
        ("do_sample: 'yes'\n", r"do_sample='yes': expected true or false"),
        ("top_p: 1.5\n", r"top_p=1.5: Input should be less than or equal to 1"),
        ("initial_sentence: 12\n", r"initial_sentence=12: expected text"),
        ("initial_sentence: ''\n", r"initial_sentence='': String should have at least 1 character"),
        (
            "dtype: float8\n",
            r"dtype='float8': allowed values: 'auto', 'float32', 'float16' or 'bfloat16'",
        ),
        ("max_length: 20\nmax_new_tokens: 5\n", r"give max_length or max_new_tokens, not both"),
        ("do_sample: false\n", r"greedy decoding \(do_sample: false\) gives one sequence"),
        ("- a list\n- of things\n", r"expected a mapping of settings \(key: value\), got list"),
        ("random_seed: [1, 2\n", r"not valid YAML"),
    ],
)
def test_each_bad_settings_file_names_file_commit_key_value_and_what_is_allowed(
    make_repo: RepoFactory, content: str, expected: str
) -> None:
    message, sha = error_at(make_repo, {"textgen.yaml": content})
    assert message.startswith(f"textgen.yaml at commit {sha} of "), message
    assert re.search(expected, message), message


def test_not_utf8_is_refused(make_repo: RepoFactory) -> None:
    repo = make_repo()
    (repo.path / "textgen.yaml").write_bytes(b"initial_sentence: \xff\xfe\n")
    repo.git("add", "textgen.yaml")
    repo.git("commit", "-qm", "binary")
    commit = resolve_commit(RepoLocation.parse(str(repo.path)), "main", None)
    with pytest.raises(SettingsError, match="not UTF-8"):
        load_settings(commit)


def test_no_settings_file_says_what_was_expected(make_repo: RepoFactory) -> None:
    message, sha = error_at(make_repo, {"README.md": "hi"})
    assert f"no settings at commit {sha}" in message
    assert "textgen.yaml" in message and "nlp_text_generation.py" in message


def test_operator_limits_refuse_a_greedy_push(make_repo: RepoFactory) -> None:
    limits = OperatorLimits(
        max_return_sequences=4,
        max_total_tokens=64,
        max_prompt_chars=10,
        allowed_models=("gpt2", "EleutherAI/*"),
        trust_remote_code=False,
    )
    message, _ = error_at(
        make_repo,
        {
            "textgen.yaml": (
                "model: evil/model\nmax_length: 500\ninitial_sentence: a long prompt here\n"
            )
        },
        limits=limits,
    )
    assert (
        "num_return_sequences=5 exceeds the operator limit 4 (TEXTGEN_MAX_RETURN_SEQUENCES)"
        in message
    )
    assert "max_length=500 exceeds the operator limit 64 (TEXTGEN_MAX_TOTAL_TOKENS)" in message
    assert "over the operator limit 10 (TEXTGEN_MAX_PROMPT_CHARS)" in message
    assert (
        "model='evil/model' is not allowed on this worker; allowed: gpt2, EleutherAI/*" in message
    )


def test_operator_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEXTGEN_MAX_RETURN_SEQUENCES", "3")
    monkeypatch.setenv("TEXTGEN_ALLOWED_MODELS", "gpt2, /models/*")
    limits = OperatorLimits.from_env()
    assert limits.max_return_sequences == 3
    assert limits.allowed_models == ("gpt2", "/models/*")
    monkeypatch.setenv("TEXTGEN_MAX_TOTAL_TOKENS", "lots")
    with pytest.raises(SettingsError, match="TEXTGEN_MAX_TOTAL_TOKENS='lots' is not an integer"):
        OperatorLimits.from_env()


def test_overrides_apply_for_one_run_and_are_validated(make_repo: RepoFactory) -> None:
    files = {"textgen.yaml": "random_seed: 1\nmax_length: 40\n"}
    (settings, _), _ = settings_at(make_repo, files, {"random_seed": 9, "max_new_tokens": 8})
    assert settings.random_seed == 9
    assert settings.max_length is None and settings.max_new_tokens == 8
    message, _ = error_at(make_repo, files, {"temperature": -1})
    assert (
        "with overrides of temperature: temperature=-1: Input should be greater than 0" in message
    )


def test_legacy_script_is_read_without_running_it(make_repo: RepoFactory, tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    script = ORIGINAL_SCRIPT + f"open({str(marker)!r}, 'w').write('ran')\n"
    (legacy, source), _ = settings_at(make_repo, {"nlp_text_generation.py": script})
    (modern, _), _ = settings_at(
        make_repo,
        {
            "textgen.yaml": (
                "model: gpt2\nrandom_seed: 42\nmax_length: 30\nnum_return_sequences: 5\n"
                'initial_sentence: "Hello, I\'m a language model,"\n'
            )
        },
    )
    assert source == "nlp_text_generation.py"
    assert legacy == modern
    assert legacy.digest() == modern.digest()
    assert not marker.exists()


def test_legacy_script_takes_the_model_of_its_pipeline_call() -> None:
    text = ORIGINAL_SCRIPT.replace("model='gpt2'", "model='EleutherAI/gpt-neo-125M'")
    assert parse_legacy_script(text.encode(), "s")["model"] == "EleutherAI/gpt-neo-125M"


@pytest.mark.parametrize(
    ("replace", "expected"),
    [
        (
            ("random_seed = 42", "random_seed = int('42')"),
            r"line 5: random_seed must be a literal value",
        ),
        (("max_length = 30", "max_length = 10 * 3"), r"line 6: max_length must be a literal value"),
        (
            ("num_return_sequences = 5\n", ""),
            r"assigns none of num_return_sequences at module level",
        ),
        (
            ("model='gpt2'", "model=MODEL"),
            r"pipeline\(model=...\) must be a literal string, got `MODEL`",
        ),
        (("# Setup", "def broken(:"), r"cannot parse the script"),
    ],
)
def test_legacy_script_refuses_what_it_cannot_read_safely(
    make_repo: RepoFactory, replace: tuple[str, str], expected: str
) -> None:
    message, sha = error_at(
        make_repo, {"nlp_text_generation.py": ORIGINAL_SCRIPT.replace(*replace)}
    )
    assert message.startswith(f"nlp_text_generation.py at commit {sha}")
    assert re.search(expected, message), message


def test_legacy_script_values_are_validated_too(make_repo: RepoFactory) -> None:
    message, _ = error_at(
        make_repo,
        {"nlp_text_generation.py": ORIGINAL_SCRIPT.replace("max_length = 30", "max_length = -1")},
    )
    assert "max_length=-1: Input should be greater than or equal to 1" in message


def test_textgen_yaml_wins_over_the_legacy_script(make_repo: RepoFactory) -> None:
    (settings, source), _ = settings_at(
        make_repo, {"nlp_text_generation.py": ORIGINAL_SCRIPT, "textgen.yaml": "random_seed: 3\n"}
    )
    assert source == "textgen.yaml"
    assert settings.random_seed == 3
