"""Workflow spec triggers: GitHub Actions glob semantics, Gradient's branches.only, decisions."""

from __future__ import annotations

import pytest

from tasks.errors import SettingsError
from tasks.globs import glob_match, matches_patterns
from tasks.repo import RepoLocation, resolve_commit
from tasks.triggers import changed_since, decide_push, load_triggers, parse_workflow
from tests.conftest import RepoFactory

# Examples from GitHub's "Filter pattern cheat sheet" (workflow syntax for GitHub Actions).
CHEAT_SHEET = [
    ("feature/*", ["feature/my-branch", "feature/your-branch"], ["feature/a/b", "main"]),
    (
        "feature/**",
        ["feature/beta-a/my-branch", "feature/your-branch", "feature/mona/the/octocat"],
        ["features/x"],
    ),
    ("main", ["main"], ["main2", "x/main"]),
    ("v2*", ["v2", "v2.0", "v2.9"], ["v1.0"]),
    ("v[12].[0-9]+.[0-9]+", ["v1.10.1", "v2.0.0"], ["v3.0.0", "v1.x.1"]),
    ("*", ["README.md", "server.rb"], ["docs/file.md"]),
    ("*.jsx?", ["page.js", "page.jsx"], ["page.jsxx", "src/page.js"]),
    ("**", ["all/the/files.md"], []),
    ("*.js", ["app.js", "index.js"], ["js/index.js"]),
    ("**.js", ["index.js", "js/index.js", "src/js/app.js"], ["index.json"]),
    ("docs/*", ["docs/README.md", "docs/file.txt"], ["docs/mona/octocat.txt"]),
    ("docs/**", ["docs/README.md", "docs/mona/octocat.txt"], ["README.md"]),
    (
        "docs/**/*.md",
        ["docs/README.md", "docs/mona/hello-world.md", "docs/a/markdown/file.md"],
        ["docs/a.txt"],
    ),
    (
        "**/docs/**",
        ["docs/hello.md", "dir/docs/my-file.txt", "space/docs/plan/space.doc"],
        ["doc/x"],
    ),
    ("**/README.md", ["README.md", "js/README.md"], ["README.mdx"]),
    ("**/*src/**", ["a/src/app.js", "my-src/code/js/app.js"], ["src.js"]),
    ("**/*-post.md", ["my-post.md", "path/their-post.md"], ["post.md"]),
    (
        "**/migrate-*.sql",
        ["migrate-10909.sql", "db/migrate-v1.0.sql", "db/sept/migrate-v1.sql"],
        ["migrate.sql"],
    ),
    ("\\*.md", ["*.md"], ["a.md"]),
]


@pytest.mark.parametrize(("pattern", "yes", "no"), CHEAT_SHEET)
def test_glob_semantics_follow_githubs_cheat_sheet(
    pattern: str, yes: list[str], no: list[str]
) -> None:
    for path in yes:
        assert glob_match(pattern, path), f"{pattern} should match {path}"
    for path in no:
        assert not glob_match(pattern, path), f"{pattern} should not match {path}"


def test_negation_undoes_earlier_patterns_and_order_matters() -> None:
    patterns = ["sub-project/**", "!sub-project/docs/**"]
    assert matches_patterns("sub-project/app.py", patterns)
    assert not matches_patterns("sub-project/docs/index.md", patterns)
    patterns = ["*.md", "!README*", "README*"]
    assert matches_patterns("README.md", patterns)
    assert not matches_patterns("src/app.py", patterns)


def spec(text: str):  # type: ignore[no-untyped-def]
    return parse_workflow(text.encode(), "w.yaml at commit abc1234")


def test_parses_gradients_trigger_and_the_path_filters() -> None:
    trigger = spec(
        "on:\n  github:\n    branches:\n      only: main\n    paths-ignore: ['**/*.md']\n"
    )
    assert trigger.branches == ("main",)
    assert trigger.paths_ignore == ("**/*.md",)
    assert spec("on:\n  github:\n    branches:\n      only: [main, release/*]\n").branches == (
        "main",
        "release/*",
    )
    assert spec("jobs: {}\n") is None
    assert spec("on:\n  schedule: daily\n") is None
    assert spec("on:\n  github:\n").branches == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("on:\n  github:\n    paths: [a]\n    paths-ignore: [b]\n", "both paths and paths-ignore"),
        ("on:\n  github:\n    branch: main\n", "unknown keys \\['branch'\\]"),
        (
            "on:\n  github:\n    branches:\n      except: main\n",
            "unknown keys \\['except'\\]; allowed: only",
        ),
        ("on:\n  github:\n    paths: 3\n", "expected a pattern or a list of patterns, got 3"),
        ("on: [\n", "not valid YAML"),
    ],
)
def test_bad_workflow_specs_fail_with_the_file_and_commit(text: str, message: str) -> None:
    with pytest.raises(SettingsError, match=f"^w.yaml at commit abc1234: .*{message}"):
        spec(text)


def test_decisions_give_their_reason() -> None:
    trigger = spec(
        "on:\n  github:\n    branches:\n      only: main\n    paths-ignore: ['**/*.md', 'docs/**']\n"
    )
    assert decide_push([trigger], "main", ("README.md", "docs/a.txt"))[0] is False
    run, reason = decide_push([trigger], "main", ("README.md", "textgen.yaml"))
    assert run and "textgen.yaml is not ignored" in reason
    run, reason = decide_push([trigger], "dev", ("textgen.yaml",))
    assert not run and "branch 'dev' is not in branches.only ['main']" in reason
    run, reason = decide_push([trigger], "main", None)
    assert run and "unknown" in reason
    run, reason = decide_push([], "main", ("a",))
    assert not run and "no workflow in .gradient/workflows/ has an on.github trigger" in reason
    only_settings = spec("on:\n  github:\n    paths: [textgen.yaml, 'models/**']\n")
    assert decide_push([only_settings], "main", ("models/x.bin",))[0]
    run, reason = decide_push([only_settings], "main", ("README.md",))
    assert not run and "none of the 1 changed files matches paths" in reason
    # Any workflow that selects the push runs it.
    assert decide_push([only_settings, trigger], "main", ("README.md", "src/a.py"))[0]


def test_triggers_are_read_from_the_commit(make_repo: RepoFactory) -> None:
    repo = make_repo(
        {
            ".gradient/workflows/a.yaml": "on:\n  github:\n    branches:\n      only: main\n",
            ".gradient/workflows/b.yml": "jobs: {}\n",
            ".gradient/workflows/notes.txt": "on: github\n",
        }
    )
    commit = resolve_commit(RepoLocation.parse(str(repo.path)), "main", None)
    (trigger,) = load_triggers(commit)
    assert trigger.source == f".gradient/workflows/a.yaml at commit {commit.short_sha}"


def test_changed_files_since_the_last_handled_commit(make_repo: RepoFactory) -> None:
    repo = make_repo({"textgen.yaml": "random_seed: 1\n"})
    handled = repo.git("rev-parse", "HEAD")
    superseded = repo.commit({"textgen.yaml": "random_seed: 2\n"})
    repo.commit({"README.md": "typo"})
    commit = resolve_commit(RepoLocation.parse(str(repo.path)), "main", None)
    changed, how = changed_since(commit, [handled, superseded], None)
    assert changed == ("README.md", "textgen.yaml") and how.startswith("git diff")
    changed, _ = changed_since(commit, [None, superseded], ["ignored-when-git-knows"])
    assert changed == ("README.md",)
    changed, how = changed_since(commit, ["0" * 40, "f" * 40], ["a", "a", "b"])
    assert changed == ("a", "b") and how == "the push payload"
    # Nothing to compare with: unknown, so path filters cannot skip the run.
    changed, how = changed_since(commit, [commit.sha], None)
    assert changed is None and how == "no earlier commit to compare with"


def test_a_force_push_keeps_the_settings_change_of_the_rewritten_history(
    make_repo: RepoFactory,
) -> None:
    repo = make_repo({"textgen.yaml": "random_seed: 1\n", "README.md": "r"})
    root = repo.git("rev-parse", "HEAD")
    handled = repo.commit({"notes.md": "a"}, "A")
    location = RepoLocation.parse(str(repo.path))
    resolve_commit(location, "main", None)  # the mirror has seen A
    repo.git("reset", "--hard", root)
    repo.commit({"textgen.yaml": "random_seed: 2\n"}, "B1: seed")
    repo.commit({"README.md": "typo"}, "B2: README")
    commit = resolve_commit(location, "main", None, refresh=True)
    changed, how = changed_since(commit, [handled, handled], None)
    assert changed == ("README.md", "notes.md", "textgen.yaml")
    assert how.endswith("(history rewritten)")
    trigger = parse_workflow(b"on:\n  github:\n    paths-ignore: ['**/*.md']\n", "w.yaml")
    assert trigger is not None
    assert decide_push([trigger], "main", changed)[0], "the seed change must run"
