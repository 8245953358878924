"""The real offline model (SmolLM2-135M from a PyPI wheel): converted once, writes English."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.text_generation import nlp_text_generation
from tasks.offline import offline_gguf, offline_model
from tests.conftest import RepoFactory, settings_yaml

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

COMMON_WORDS = set(
    [
        "a",
        "about",
        "after",
        "all",
        "also",
        "an",
        "and",
        "any",
        "are",
        "as",
        "at",
        "be",
        "because",
        "been",
        "but",
        "by",
        "can",
        "could",
        "do",
        "does",
        "for",
        "from",
        "get",
        "had",
        "has",
        "have",
        "he",
        "her",
        "him",
        "his",
        "how",
        "i",
        "i'm",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "just",
        "know",
        "language",
        "like",
        "make",
        "many",
        "me",
        "model",
        "more",
        "most",
        "my",
        "new",
        "no",
        "not",
        "now",
        "of",
        "on",
        "one",
        "only",
        "or",
        "other",
        "our",
        "out",
        "over",
        "people",
        "said",
        "see",
        "she",
        "so",
        "some",
        "such",
        "than",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "time",
        "to",
        "two",
        "up",
        "us",
        "use",
        "used",
        "very",
        "was",
        "way",
        "we",
        "well",
        "were",
        "what",
        "when",
        "which",
        "who",
        "will",
        "with",
        "would",
        "you",
        "your",
        "learn",
        "learning",
        "help",
        "text",
        "write",
        "words",
        "computer",
        "data",
        "trained",
        "designed",
        "generate",
        "can't",
        "don't",
        "it's",
        "english",
        "human",
        "questions",
        "answer",
        "information",
        "understand",
        "world",
        "work",
    ]
)


def english_share(text: str) -> tuple[int, float]:
    words = re.findall(r"[a-z']+", text.lower())
    return len(words), sum(w in COMMON_WORDS for w in words) / max(1, len(words))


@pytest.fixture
def smollm2() -> Path:
    """The converted folder, in this machine's model cache (converted there at most once)."""
    return offline_model()


def test_conversion_happens_once(smollm2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    assert (smollm2 / "model.safetensors").is_file() and (smollm2 / "config.json").is_file()

    def no_dequantizing(*args: object, **kwargs: object) -> None:
        raise AssertionError("the GGUF file was dequantized again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_dequantizing)
    assert offline_model() == smollm2


def test_the_real_model_writes_english_through_the_flow(
    make_repo: RepoFactory, smollm2: Path
) -> None:
    gguf = offline_gguf()
    repo = make_repo({"textgen.yaml": settings_yaml(gguf, max_length=40, num_return_sequences=3)})
    record = nlp_text_generation(repo_url=str(repo.path))
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(record.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == str(gguf)
    assert run.data.params["model.kind"] == "gguf"
    assert run.data.params["model.loaded_from"] == str(smollm2)
    assert run.data.params["model.class"] == "LlamaForCausalLM"
    output = Path(client.download_artifacts(record.run_id, "output.txt")).read_text()
    assert output.startswith("---\nOutput 1 of 3\n---\n\nHello, I'm a language model,")
    count, share = english_share(output.replace("Hello, I'm a language model,", ""))
    assert count >= 40, output
    assert share >= 0.3, output

    folder_repo = make_repo(
        {"textgen.yaml": settings_yaml(smollm2, max_length=40, num_return_sequences=3)}
    )
    same = nlp_text_generation(repo_url=str(folder_repo.path))
    again = Path(client.download_artifacts(same.run_id, "output.txt")).read_text()
    assert again == output, "the converted folder and the GGUF file are the same model"
