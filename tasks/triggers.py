"""The trigger section of the repository's workflow specs (`.gradient/workflows/*.yaml`).

Gradient's format (`on.github.branches.only`, a string or a list), plus path filters with
GitHub Actions semantics (`paths` or `paths-ignore`), read at the pushed commit:

```yaml
on:
  github:
    branches:
      only: main
    paths-ignore: ["**/*.md", "docs/**"]
    pull_request:                 # previews of pull requests (GitHub Actions syntax)
      branches: [main]            # the base branch; or branches-ignore
      paths-ignore: ["**/*.md"]   # or paths
```

Patterns are GitHub Actions' (`tasks.globs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.bounded import load_yaml, show
from tasks.errors import SettingsError
from tasks.globs import glob_match, matches_patterns, pattern_list
from tasks.repo import ZERO_SHA, CommitInfo, changed_between, has_commit, is_ancestor, merge_base

WORKFLOWS_DIR = ".gradient/workflows"

MAX_FILTERED_PATHS = 5000
"""A push that changed more files than this runs without path filtering (it cannot be skipped
wrongly by running; matching stays bounded)."""


@dataclass(frozen=True)
class WorkflowTrigger:
    """The `on.github` section of one workflow file."""

    source: str
    branches: tuple[str, ...]
    paths: tuple[str, ...] | None
    paths_ignore: tuple[str, ...] | None
    pull_request: PullRequestTrigger | None = None

    def decide(self, branch: str, changed: tuple[str, ...] | None) -> tuple[bool, str]:
        """Whether a push of `changed` files to `branch` runs, and why."""
        if self.branches and not any(glob_match(b, branch) for b in self.branches):
            return False, (
                f"{self.source}: branch {branch!r} is not in branches.only {list(self.branches)}"
            )
        if changed is None:
            return True, (
                f"{self.source}: the changed files are unknown, so the path filters cannot skip"
            )
        if not changed:
            return False, f"{self.source}: the push changed no files"
        if len(changed) > MAX_FILTERED_PATHS:
            return True, (
                f"{self.source}: the push changed {len(changed)} files, more than the "
                f"{MAX_FILTERED_PATHS} that path filters are applied to"
            )
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


@dataclass(frozen=True)
class PullRequestTrigger:
    """The `on.github.pull_request` section: which pull requests get a preview run."""

    source: str
    branches: tuple[str, ...] | None
    branches_ignore: tuple[str, ...] | None
    paths: tuple[str, ...] | None
    paths_ignore: tuple[str, ...] | None

    def decide(self, base: str, changed: tuple[str, ...] | None) -> tuple[bool, str]:
        """Whether a pull request into `base` that changes `changed` gets a preview, and why."""
        if self.branches is not None and not matches_patterns(base, list(self.branches)):
            return False, (
                f"{self.source}: base branch {base!r} is not in pull_request.branches "
                f"{list(self.branches)}"
            )
        if self.branches_ignore is not None and matches_patterns(base, list(self.branches_ignore)):
            return False, (
                f"{self.source}: base branch {base!r} matches pull_request.branches-ignore "
                f"{list(self.branches_ignore)}"
            )
        if changed is not None and not changed:
            return False, f"{self.source}: the pull request changes no files"
        filters = WorkflowTrigger(self.source, (), self.paths, self.paths_ignore)
        run, reason = filters.decide(base, changed)
        reason = reason.replace("a push to", "a pull request into")
        return run, reason.replace("the push changed", "the pull request changes")


def _check_keys(value: dict[Any, Any], allowed: tuple[str, ...], where: str) -> None:
    """Refuse keys outside `allowed`, naming them and what is allowed."""
    if unknown := set(value) - set(allowed):
        raise SettingsError(
            f"{where} has unknown keys {sorted(unknown)}; allowed: {', '.join(allowed)}"
        )


def _pull_request(github: dict[Any, Any], source: str) -> PullRequestTrigger | None:
    """Parse `on.github.pull_request` (absent, null or a mapping of GitHub Actions filters)."""
    if "pull_request" not in github:
        return None
    where = f"{source}: on.github.pull_request"
    value = {} if github["pull_request"] is None else github["pull_request"]
    if not isinstance(value, dict):
        raise SettingsError(f"{where} must be a mapping (or empty), got {show(value)}")
    allowed = ("branches", "branches-ignore", "paths", "paths-ignore")
    _check_keys(value, allowed, where)
    for a, b in (("branches", "branches-ignore"), ("paths", "paths-ignore")):
        if a in value and b in value:
            raise SettingsError(f"{where} has both {a} and {b}; use one of them")

    def patterns(key: str) -> tuple[str, ...] | None:
        return tuple(pattern_list(value[key], f"{where}.{key}")) if key in value else None

    # The fields in the order of `allowed`.
    return PullRequestTrigger(source, *(patterns(key) for key in allowed))


def parse_workflow(text: bytes, source: str) -> WorkflowTrigger | None:
    """The trigger of one workflow file, or None when it has no `on.github` section."""
    doc = load_yaml(text, source)
    if not isinstance(doc, dict):
        return None
    # YAML 1.1 reads a bare `on:` key as the boolean True.
    on = doc.get("on", doc.get(True))
    if not isinstance(on, dict) or "github" not in on:
        return None
    github = on["github"] or {}
    if not isinstance(github, dict):
        raise SettingsError(f"{source}: on.github must be a mapping, got {show(github)}")
    branches_doc = github.get("branches")
    if isinstance(branches_doc, dict):
        _check_keys(branches_doc, ("only",), f"{source}: on.github.branches")
        branches = pattern_list(branches_doc.get("only"), f"{source}: on.github.branches.only")
    else:
        branches = pattern_list(branches_doc, f"{source}: on.github.branches")
    if github.get("paths") is not None and github.get("paths-ignore") is not None:
        raise SettingsError(f"{source}: on.github has both paths and paths-ignore; use one of them")
    allowed = ("branches", "paths", "paths-ignore", "pull_request")
    _check_keys(github, allowed, f"{source}: on.github")

    def patterns(key: str) -> tuple[str, ...] | None:
        value = github.get(key)
        return None if value is None else tuple(pattern_list(value, f"{source}: on.github.{key}"))

    paths, ignore = patterns("paths"), patterns("paths-ignore")
    return WorkflowTrigger(source, tuple(branches), paths, ignore, _pull_request(github, source))


def workflow_files(commit: CommitInfo) -> list[str]:
    """The workflow specs at the commit: `.gradient/workflows/*.yaml` (and `*.yml`)."""
    return [p for p in commit.list_files(WORKFLOWS_DIR) if p.endswith((".yaml", ".yml"))]


def load_triggers(commit: CommitInfo) -> list[WorkflowTrigger]:
    """Every `on.github` trigger in `.gradient/workflows/*.yaml` at the commit."""
    triggers = []
    for path in workflow_files(commit):
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
    return _any_selects([t.decide for t in triggers], branch, changed)


def _any_selects(rules: list[Any], ref: str, changed: tuple[str, ...] | None) -> tuple[bool, str]:
    """The first rule (a `decide` method) that runs it, with its reason; else every one's reason."""
    reasons = []
    for decide in rules:
        run, reason = decide(ref, changed)
        if run:
            return True, reason
        reasons.append(reason)
    return False, "; ".join(reasons)


def decide_preview(
    triggers: list[WorkflowTrigger], base: str, changed: tuple[str, ...] | None
) -> tuple[bool, str]:
    """A pull request gets a preview when a workflow's `on.github.pull_request` selects it."""
    sections = [t.pull_request for t in triggers if t.pull_request is not None]
    if not sections:
        return False, f"no workflow in {WORKFLOWS_DIR}/ has an on.github.pull_request trigger"
    return _any_selects([s.decide for s in sections], base, changed)


def changed_since(
    commit: CommitInfo, bases: list[str | None], reported: list[str] | None
) -> tuple[tuple[str, ...] | None, str]:
    """The files whose content differs between a base and `commit`, from the first base the
    mirror has (the last handled commit, then the push's `before`); else the paths the push
    reported, else unknown (None: the run goes ahead). Returns them and how they were found.

    The diff is between the two trees, whatever their ancestry: after a force-push it holds
    what the rewritten history changed and what it dropped, not only the new tip's own change."""
    for base in bases:
        if base and base != ZERO_SHA and base != commit.sha and has_commit(commit.mirror, base):
            how = f"git diff {base[:7]}..{commit.short_sha}"
            if not is_ancestor(commit.mirror, base, commit.sha):
                how += " (history rewritten)"
            return changed_between(commit.mirror, base, commit.sha), how
    if reported is not None:
        return tuple(sorted(set(reported))), "the push payload"
    return None, "no earlier commit to compare with"


def _listing(changed: tuple[str, ...] | None) -> str:
    """How many files changed, and the first ten, for the log."""
    return "unknown" if changed is None else f"{len(changed)}: {', '.join(changed[:10])}"


@task(name="filter-push", cache_policy=NO_CACHE)
def filter_push(
    commit: CommitInfo, last_handled: str | None, before: str | None, reported: list[str] | None
) -> tuple[bool, str, str]:
    """Whether an automatic run of `commit` goes ahead: (run, reason, kind of skip). A commit
    that is no longer the branch's tip is superseded (the newer push runs instead); otherwise
    the workflow specs at the commit decide, on the files changed since the last commit an
    automatic run handled (or since `before`)."""
    logger = get_run_logger()
    tip = commit.branch_tip
    if tip and tip != commit.sha:
        moved = is_ancestor(commit.mirror, commit.sha, tip)
        how = "moved on from it to" if moved else "been rewritten to"
        reason = f"superseded: {commit.branch} has {how} {tip[:7]}, whose push runs instead"
        logger.info("Skipping %s: %s", commit.short_sha, reason)
        return False, reason, "superseded"
    changed, how = changed_since(commit, [last_handled, before], reported)
    logger.info("Changed files (from %s): %s", how, _listing(changed))
    run, reason = decide_push(load_triggers(commit), commit.branch, changed)
    logger.info("%s %s: %s", "Running" if run else "Skipping", commit.short_sha, reason)
    return run, reason, "filtered"


@task(name="filter-preview", cache_policy=NO_CACHE)
def filter_preview(commit: CommitInfo, base: str, pull_ref: str) -> tuple[bool, str, str]:
    """Whether a pull request's preview of `commit` goes ahead: (run, reason, kind of skip). A
    head the pull request has since moved on from is superseded (its newer push previews
    instead); otherwise the workflow specs at the head decide, on the files the pull request
    changes (from the merge base with `base` to the head), as GitHub Actions does."""
    logger = get_run_logger()
    tip = commit.pull_tip
    if tip and tip != commit.sha:
        reason = f"superseded: {pull_ref} has moved on to {tip[:7]}, whose preview runs instead"
        logger.info("Skipping %s: %s", commit.short_sha, reason)
        return False, reason, "superseded"
    changed: tuple[str, ...] | None = None
    if commit.branch_tip and has_commit(commit.mirror, commit.branch_tip):
        base_sha = merge_base(commit.mirror, commit.branch_tip, commit.sha)
        if base_sha:
            changed = changed_between(commit.mirror, base_sha, commit.sha)
    logger.info("Files the pull request changes: %s", _listing(changed))
    run, reason = decide_preview(load_triggers(commit), base, changed)
    logger.info("%s preview of %s: %s", "Running" if run else "Skipping", commit.short_sha, reason)
    return run, reason, "filtered"
