"""Hostile settings, workflow files and deliveries: each input class, its error, and what it
cost (wall time and peak Python memory, measured with tracemalloc around the refusal alone).

    .venv/bin/python benchmarks/hostile.py
"""

from __future__ import annotations

import json
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import print_header

from tests.conftest import GitRepo, build_tiny_gpt2

BOMB = "\n".join(
    [
        "a: &a [x, x, x, x, x, x, x, x, x]",
        *(
            f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]"
            for prev, name in zip("abcdefgh", "bcdefghi", strict=True)
        ),
    ]
)


def measure(action: Callable[[], Any]) -> tuple[str, float, float]:
    """Run `action`; return (its error, seconds, peak MB of Python allocations)."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        result = action()
        error = f"(accepted: {str(result)[:80]})"
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return error, seconds, peak / 1e6


def main() -> None:
    print_header("hostile inputs: every class refused in bounded time and memory")
    import os

    from deployments.service.outbox import Outbox
    from deployments.service.providers import sign
    from deployments.service.receiver import Receiver
    from tasks.bounded import load_yaml
    from tasks.errors import SettingsError
    from tasks.evalset import Cell, Prompt, load_plan
    from tasks.gates import parse_gate, parse_gates
    from tasks.generate import run_generation
    from tasks.generate_set import check_prompts
    from tasks.globs import matches_patterns
    from tasks.model import build_generator, folder_digest, locate_model
    from tasks.repo import RepoLocation, resolve_commit
    from tasks.settings import load_settings, parse_settings
    from tasks.triggers import parse_workflow

    root = Path(tempfile.mkdtemp(prefix="textgen-hostile-"))
    os.environ["TEXTGEN_HOME"] = str(root / "home")
    os.environ["TEXTGEN_MODEL_DIRS"] = str(root)
    tiny = build_tiny_gpt2(root / "tiny")
    counter = iter(range(1000))

    def settings_at(text: str) -> Callable[[], Any]:
        repo = GitRepo(root / f"repo{next(counter)}")
        repo.commit({"textgen.yaml": text})
        commit = resolve_commit(RepoLocation.parse(str(repo.path)), "main", None)
        return lambda: load_settings(commit)

    def plan_at(text: str, files: dict[str, str] | None = None) -> Callable[[], Any]:
        repo = GitRepo(root / f"repo{next(counter)}")
        repo.commit({"textgen.yaml": text, **(files or {})})
        commit = resolve_commit(RepoLocation.parse(str(repo.path)), "main", None)
        return lambda: load_plan(commit)

    def model_at(model: str) -> Callable[[], Any]:
        repo = GitRepo(root / f"repo{next(counter)}")
        repo.commit({"textgen.yaml": f"model: {model}\n"})
        commit = resolve_commit(RepoLocation.parse(str(repo.path)), "main", None)
        settings, _ = load_settings(commit)
        return lambda: locate_model(settings, commit)

    generator = build_generator(parse_settings({"model": str(tiny)}, "t"))
    long_settings = parse_settings({"model": str(tiny), "max_length": 400}, "t")
    long_prompt = Prompt("p1", "a long prompt " * 30, "prompts.txt at commit 1a2b3c4, line 7")
    cell = Cell("", {}, parse_settings({"model": str(tiny), "max_new_tokens": 8}, "t"))
    axes = "matrix: {random_seed: [%s], top_k: [%s]}\n" % ((",".join(map(str, range(1000))),) * 2)
    many = root / "many-files"
    many.mkdir()
    for index in range(12_000):
        (many / f"f{index}").touch()
    receiver = Receiver(
        RepoLocation.parse("https://example.com/o/r.git"),
        "main",
        b"secret",
        Outbox(root / "outbox.sqlite"),
    )

    def delivery(body: bytes, event: str = "push") -> Callable[[], Any]:
        headers = {"X-GitHub-Event": event, "X-Hub-Signature-256": sign(b"secret", body)}

        def send() -> Any:
            verdict = receiver.handle("github", headers, body)
            if verdict.status >= 400:
                raise SettingsError(f"HTTP {verdict.status}: {verdict.body['error']}")
            return verdict.body

        return send

    push = {"ref": "refs/heads/main", "before": "b" * 40, "after": "a" * 40}
    pull = {
        "action": "opened",
        "number": 7,
        "repository": {"clone_url": "https://example.com/o/r.git"},
        "pull_request": {"head": {"sha": "a" * 40, "ref": "x"}, "base": {"ref": "main"}},
    }
    paths = [f"data/shard-{i:05d}/part-with-a-longer-file-name.json" for i in range(30_000)]
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("YAML alias bomb in textgen.yaml (322 bytes)", settings_at(BOMB + "\nrandom_seed: *i\n")),
        (
            "YAML alias bomb in a workflow file",
            lambda: parse_workflow((BOMB + "\non: {github: {branches: *i}}\n").encode(), "w.yaml"),
        ),
        ("5000-digit random_seed", settings_at("random_seed: " + "7" * 5000 + "\n")),
        ("num_beams: 200000", settings_at("num_beams: 200000\nnum_return_sequences: 1\n")),
        ("temperature: .inf", settings_at("temperature: .inf\n")),
        ("repetition_penalty: .nan", settings_at("repetition_penalty: .nan\n")),
        ("top_k: 1.0e+20", settings_at("top_k: 1.0e+20\n")),
        ("random_seed: a 200 KB string", settings_at('random_seed: "' + "x" * 200_000 + '"\n')),
        ("textgen.yaml of 1 MB", settings_at('random_seed: "' + "x" * 1_000_000 + '"\n')),
        (
            "max_length 400 on a 128-position model",
            lambda: run_generation(generator, long_settings),
        ),
        ("matrix of 1000 x 1000 cells", plan_at(axes)),
        (
            "prompts.txt of 10 MB",
            plan_at("prompts: prompts.txt\n", {"prompts.txt": "x" * (10 << 20)}),
        ),
        (
            "prompts.txt of 100,000 lines",
            plan_at("prompts: prompts.txt\n", {"prompts.txt": "a prompt\n" * 100_000}),
        ),
        ("prompts: a missing file", plan_at("prompts: missing.jsonl\n")),
        (
            "a prompt past the model's context (tiny, 128 positions)",
            lambda: check_prompts(generator, cell, [long_prompt]),
        ),
        (
            "paths-ignore '*a' x 20 + '*b' vs a 5000-char name",
            lambda: matches_patterns("a" * 5000, ["*a" * 20 + "*b"]),
        ),
        (
            "YAML alias bomb in gates",
            lambda: parse_gates(load_yaml((BOMB + "\ngates: *i\n").encode(), "t.yaml"), "t.yaml"),
        ),
        ("gate with a 1 MB number", lambda: parse_gate("distinct_2 >= " + "9" * 1_000_000, "t")),
        ("60 gates", lambda: parse_gates(["distinct_2 >= 0.5"] * 60, "t.yaml")),
        (
            "invalid class [z-a]",
            lambda: parse_workflow(b"on: {github: {paths-ignore: ['[z-a]']}}\n", "w.yaml"),
        ),
        ("model: /etc", model_at("/etc")),
        ("model: /usr", model_at("/usr")),
        ("model: /no/such/path", model_at("/no/such/path")),
        ("model: ../../etc", model_at("../../etc")),
        ("model folder of 12,000 files", lambda: folder_digest(many)),
        (
            "payload repository is a string",
            delivery(json.dumps({**push, "repository": "o/r"}).encode()),
        ),
        ("payload repository missing", delivery(json.dumps(push).encode())),
        ("100k-deep JSON body", delivery(b"[" * 100_000 + b"]" * 100_000)),
        (
            "pull request head SHA of 40 non-hex characters",
            delivery(
                json.dumps(
                    {**pull, "pull_request": {**pull["pull_request"], "head": {"sha": "z" * 40}}}
                ).encode(),
                "pull_request",
            ),
        ),
        (
            "pull request number 10^12",
            delivery(json.dumps({**pull, "number": 10**12}).encode(), "pull_request"),
        ),
        (
            "pull request into a repository previews are off for",
            delivery(json.dumps(pull).encode(), "pull_request"),
        ),
        (
            "signed push naming 30k paths (1.6 MB)",
            delivery(
                json.dumps(
                    {
                        **push,
                        "repository": {"url": "https://example.com/o/r.git"},
                        "commits": [{"added": paths, "removed": [], "modified": []}],
                    }
                ).encode()
            ),
        ),
    ]
    print("\n| input | error | seconds | peak MB |\n|---|---|---|---|")
    for name, action in cases:
        error, seconds, peak = measure(action)
        shown = " ".join(error.split())[:230].replace("|", "/")
        print(f"| {name} | {shown} | {seconds:.3f} | {peak:.1f} |")


if __name__ == "__main__":
    main()
