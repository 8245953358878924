"""The trigger section of the repository's workflow specs (`.gradient/workflows/*.yaml`).

Gradient's format (`on.github.branches.only`, a string or a list), plus path filters with
GitHub Actions semantics (`paths` or `paths-ignore`), read at the pushed commit:

```yaml
on:
  github:
    branches:
      only: main
    paths-ignore: ["**/*.md", "docs/**"]
```

Patterns follow GitHub's filter cheat sheet: `*` matches any characters but `/`, `**` any
characters, `?` makes the preceding character optional, `+` repeats it, `[...]` is a class,
`\\` escapes, and a leading `!` negates the patterns before it. A pattern matches the whole path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.errors import SettingsError
from tasks.repo import ZERO_SHA, CommitInfo, changed_between, is_ancestor

WORKFLOWS_DIR = ".gradient/workflows"
AUTOMATIC_TRIGGERS = frozenset({"push", "poll"})


@lru_cache(maxsize=512)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """Translate one filter pattern (without its leading `!`) into an anchored regex."""
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
                    out.append("(?:.*/)?")  # `**/` also matches no folder at all
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
    return re.compile("".join(out) + r"\Z")


def _as_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise SettingsError(f"{where}: expected a pattern or a list of patterns, got {value!r}")


def matches_patterns(path: str, patterns: list[str]) -> bool:
    """Whether `path` is selected by the list: the last pattern that matches it decides."""
    selected = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if glob_regex(pattern[1:] if negated else pattern).match(path):
            selected = not negated
    return selected


@dataclass(frozen=True)
class WorkflowTrigger:
    """The `on.github` section of one workflow file."""

    source: str
    branches: tuple[str, ...]
    paths: tuple[str, ...] | None
    paths_ignore: tuple[str, ...] | None

    def decide(self, branch: str, changed: tuple[str, ...] | None) -> tuple[bool, str]:
        """Whether a push of `changed` files to `branch` runs, and why."""
        if self.branches and not any(glob_regex(b).match(branch) for b in self.branches):
            return (
                False,
                f"{self.source}: branch {branch!r} is not in branches.only {list(self.branches)}",
            )
        if changed is None:
            return (
                True,
                f"{self.source}: the changed files are unknown, so the path filters cannot skip",
            )
        if not changed:
            return False, f"{self.source}: the push changed no files"
        if self.paths is not None:
            hits = [p for p in changed if matches_patterns(p, list(self.paths))]
            if not hits:
                return False, (
                    f"{self.source}: none of the {len(changed)} changed files matches paths "
                    f"{list(self.paths)}"
                )
            return True, f"{self.source}: {hits[0]} matches paths"
        if self.paths_ignore is not None:
            kept = [p for p in changed if not matches_patterns(p, list(self.paths_ignore))]
            if not kept:
                return False, (
                    f"{self.source}: every changed file ({', '.join(changed[:5])}"
                    f"{', ...' if len(changed) > 5 else ''}) matches paths-ignore "
                    f"{list(self.paths_ignore)}"
                )
            return True, f"{self.source}: {kept[0]} is not ignored"
        return True, f"{self.source}: a push to {branch!r} runs"


def parse_workflow(text: bytes, source: str) -> WorkflowTrigger | None:
    """The trigger of one workflow file, or None when it has no `on.github` section."""
    try:
        doc = yaml.safe_load(text.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SettingsError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        return None
    # YAML 1.1 reads a bare `on:` key as the boolean True.
    on = doc.get("on", doc.get(True))
    if not isinstance(on, dict) or "github" not in on:
        return None
    github = on["github"] or {}
    if not isinstance(github, dict):
        raise SettingsError(f"{source}: on.github must be a mapping, got {github!r}")
    branches_doc = github.get("branches")
    if isinstance(branches_doc, dict):
        unknown = set(branches_doc) - {"only"}
        if unknown:
            raise SettingsError(
                f"{source}: on.github.branches has unknown keys {sorted(unknown)}; allowed: only"
            )
        branches = _as_list(branches_doc.get("only"), f"{source}: on.github.branches.only")
    else:
        branches = _as_list(branches_doc, f"{source}: on.github.branches")
    paths = github.get("paths")
    ignore = github.get("paths-ignore")
    if paths is not None and ignore is not None:
        raise SettingsError(f"{source}: on.github has both paths and paths-ignore; use one of them")
    unknown_keys = set(github) - {"branches", "paths", "paths-ignore"}
    if unknown_keys:
        raise SettingsError(
            f"{source}: on.github has unknown keys {sorted(unknown_keys)}; "
            f"allowed: branches, paths, paths-ignore"
        )
    return WorkflowTrigger(
        source=source,
        branches=tuple(branches),
        paths=None if paths is None else tuple(_as_list(paths, f"{source}: on.github.paths")),
        paths_ignore=None
        if ignore is None
        else tuple(_as_list(ignore, f"{source}: on.github.paths-ignore")),
    )


def load_triggers(commit: CommitInfo) -> list[WorkflowTrigger]:
    """Every `on.github` trigger in `.gradient/workflows/*.yaml` at the commit."""
    triggers = []
    for path in commit.list_files(WORKFLOWS_DIR):
        if not path.endswith((".yaml", ".yml")):
            continue
        text = commit.read_file(path)
        if text is None:
            continue
        trigger = parse_workflow(text, f"{path} at commit {commit.short_sha}")
        if trigger is not None:
            triggers.append(trigger)
    return triggers


def decide_push(
    triggers: list[WorkflowTrigger], branch: str, changed: tuple[str, ...] | None
) -> tuple[bool, str]:
    """A push runs when any workflow's trigger selects it; the reason names the deciding file."""
    if not triggers:
        return False, f"no workflow in {WORKFLOWS_DIR}/ has an on.github trigger"
    reasons = []
    for trigger in triggers:
        run, reason = trigger.decide(branch, changed)
        if run:
            return True, reason
        reasons.append(reason)
    return False, "; ".join(reasons)


def changed_since(
    commit: CommitInfo,
    bases: list[str | None],
    reported: list[str] | None,
) -> tuple[tuple[str, ...] | None, str]:
    """The files changed up to `commit`: from the first base that is a proper ancestor, else the
    paths the push reported, else the commit's own change. Returns them and how they were found."""
    for base in bases:
        if (
            base
            and base != ZERO_SHA
            and base != commit.sha
            and is_ancestor(commit.mirror, base, commit.sha)
        ):
            return changed_between(
                commit.mirror, base, commit.sha
            ), f"git diff {base[:7]}..{commit.short_sha}"
    if reported is not None:
        return tuple(sorted(set(reported))), "the push payload"
    return commit.changed_paths, f"the change of commit {commit.short_sha}"


@task(name="filter-push", cache_policy=NO_CACHE)
def filter_push(
    commit: CommitInfo,
    last_handled: str | None,
    before: str | None,
    reported: list[str] | None,
) -> tuple[bool, str, str]:
    """Whether an automatic run of `commit` goes ahead: (run, reason, kind of skip).

    A commit that is no longer the branch's tip is superseded: the newer push runs instead.
    Otherwise the workflow specs at the commit decide, on the files changed since the last
    commit an automatic run handled (or since `before`).
    """
    logger = get_run_logger()
    tip = commit.branch_tip
    if tip and tip != commit.sha:
        how = (
            "moved on from it to"
            if is_ancestor(commit.mirror, commit.sha, tip)
            else "been rewritten to"
        )
        reason = f"superseded: {commit.branch} has {how} {tip[:7]}, whose push runs instead"
        logger.info("Skipping %s: %s", commit.short_sha, reason)
        return False, reason, "superseded"
    changed, how = changed_since(commit, [last_handled, before], reported)
    logger.info(
        "Changed files (from %s): %s",
        how,
        "unknown" if changed is None else f"{len(changed)}: {', '.join(changed[:10])}",
    )
    run, reason = decide_push(load_triggers(commit), commit.branch, changed)
    logger.info("%s %s: %s", "Running" if run else "Skipping", commit.short_sha, reason)
    return run, reason, "filtered"
