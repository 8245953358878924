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

Patterns follow GitHub's filter cheat sheet: `*` matches any characters but `/`, `**` any
characters, `?` makes the preceding character optional, `+` repeats it, `[...]` is a class,
`\\` escapes, and a leading `!` negates the patterns before it. A pattern matches the whole path.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.bounded import load_yaml, show
from tasks.errors import SettingsError
from tasks.repo import (
    ZERO_SHA,
    CommitInfo,
    changed_between,
    has_commit,
    is_ancestor,
    merge_base,
)

WORKFLOWS_DIR = ".gradient/workflows"
AUTOMATIC_TRIGGERS = frozenset({"push", "poll"})
PREVIEW_TRIGGER = "preview"
"""The trigger of a pull request's preview run: recorded, compared, never a numbered version."""
SUPERSEDED = "Superseded"
SKIPPED = "Skipped"
"""How the message of a flow run's state starts when a push made no run: it names no state
(Prefect's deployment page hides states of custom names), so the message says it."""


def is_superseded(message: str | None) -> bool:
    """Whether a flow run's state message says a newer push superseded it."""
    return (message or "").startswith(SUPERSEDED)


MAX_PATTERN_CHARS = 256
MAX_PATTERNS = 200
MAX_FILTERED_PATHS = 5000
"""A push that changed more files than this runs without path filtering (it cannot be skipped
wrongly by running; matching stays bounded)."""


@dataclass(frozen=True)
class _Atom:
    """One piece of a filter pattern: a character, a class, or a wildcard."""

    kind: str  # "char", "class", "star" (no /), "any" (anything), "dirs" (empty or ".../")
    char: str = ""
    ranges: tuple[tuple[str, str], ...] = ()
    negated: bool = False
    quant: str = ""  # "", "?" (optional) or "+" (one or more)

    def accepts(self, c: str) -> bool:
        if self.kind == "char":
            return c == self.char
        inside = any(lo <= c <= hi for lo, hi in self.ranges)
        return inside != self.negated


def _parse_class(body: str, pattern: str) -> _Atom:
    negated = body.startswith("^")
    items = body[1:] if negated else body
    if not items:
        raise SettingsError(
            f"pattern {show(pattern)}: the class [{body}] is empty; list characters or ranges"
        )
    ranges: list[tuple[str, str]] = []
    i = 0
    while i < len(items):
        if i + 2 < len(items) and items[i + 1] == "-":
            lo, hi = items[i], items[i + 2]
            if lo > hi:
                raise SettingsError(
                    f"pattern {show(pattern)}: the class range {lo}-{hi} is reversed; "
                    f"write the lower character first ({hi}-{lo})"
                )
            ranges.append((lo, hi))
            i += 3
        else:
            ranges.append((items[i], items[i]))
            i += 1
    return _Atom("class", ranges=tuple(ranges), negated=negated)


@lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> tuple[_Atom, ...]:
    """Parse one filter pattern (without its leading `!`) into atoms; refuses what is too long
    or malformed with a message naming the pattern."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise SettingsError(
            f"pattern {show(pattern)} has {len(pattern)} characters; "
            f"allowed: at most {MAX_PATTERN_CHARS}"
        )
    atoms: list[_Atom] = []
    i = 0
    n = len(pattern)
    while i < n:
        char = pattern[i]
        if char == "\\" and i + 1 < n:
            atoms.append(_Atom("char", char=pattern[i + 1]))
            i += 2
            continue
        if char == "*":
            if pattern.startswith("**", i):
                i += 2
                if i < n and pattern[i] == "/":
                    atoms.append(_Atom("dirs"))  # `**/` also matches no folder at all
                    i += 1
                else:
                    atoms.append(_Atom("any"))
                continue
            atoms.append(_Atom("star"))
        elif char in "?+":
            last = atoms[-1] if atoms else None
            if (
                last is not None
                and last.kind in {"char", "class"}
                and not last.quant
                and not (last.kind == "char" and last.char in "*?+")
            ):
                atoms[-1] = _Atom(last.kind, last.char, last.ranges, last.negated, char)
            else:
                atoms.append(_Atom("char", char=char))
        elif char == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                atoms.append(_Atom("char", char=char))
            else:
                atoms.append(_parse_class(pattern[i + 1 : end], pattern))
                i = end
        else:
            atoms.append(_Atom("char", char=char))
        i += 1
    return tuple(atoms)


def _closure(atoms: tuple[_Atom, ...], states: set[tuple[int, bool]]) -> set[tuple[int, bool]]:
    """Add the states reachable without reading a character (skipping optional atoms)."""
    todo = list(states)
    while todo:
        index, inside = todo.pop()
        if inside or index >= len(atoms):
            continue
        atom = atoms[index]
        if atom.quant == "?" or atom.kind in {"star", "any", "dirs"}:
            nxt = (index + 1, False)
            if nxt not in states:
                states.add(nxt)
                todo.append(nxt)
    return states


def glob_match(pattern: str, path: str) -> bool:
    """Whether the pattern matches the whole path, in time linear in the path's length.

    The pattern is run as a set of positions (an NFA), never by backtracking: a pattern
    of many wildcards against a long name costs length x atoms steps, not exponential time.
    """
    atoms = compile_pattern(pattern)
    end = len(atoms)
    states = _closure(atoms, {(0, False)})
    for c in path:
        nxt: set[tuple[int, bool]] = set()
        for index, _inside in states:
            if index >= end:
                continue
            atom = atoms[index]
            if atom.kind == "dirs":
                # Inside `(.*/)`: any character stays inside; a slash may also end it.
                nxt.add((index, True))
                if c == "/":
                    nxt.add((index + 1, False))
            elif atom.kind == "any":
                nxt.add((index, False))
            elif atom.kind == "star":
                if c != "/":
                    nxt.add((index, False))
            elif atom.accepts(c):
                nxt.add((index + 1, False))
                if atom.quant == "+":
                    nxt.add((index, False))
        if not nxt:
            return False
        states = _closure(atoms, nxt)
    return (end, False) in states


def _as_list(value: Any, where: str) -> list[str]:
    """A pattern or list of patterns, each checked to compile (bounded in count and length)."""
    if value is None:
        return []
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, list) or not all(isinstance(v, str) for v in patterns):
        raise SettingsError(f"{where}: expected a pattern or a list of patterns, got {show(value)}")
    if len(patterns) > MAX_PATTERNS:
        raise SettingsError(f"{where}: {len(patterns)} patterns; allowed: at most {MAX_PATTERNS}")
    for pattern in patterns:
        try:
            compile_pattern(pattern.removeprefix("!"))
        except SettingsError as exc:
            raise SettingsError(f"{where}: {exc}") from None
    return list(patterns)


def matches_patterns(path: str, patterns: list[str]) -> bool:
    """Whether `path` is selected by the list: the last pattern that matches it decides."""
    selected = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if glob_match(pattern[1:] if negated else pattern, path):
            selected = not negated
    return selected


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
        filters = WorkflowTrigger(self.source, (), self.paths, self.paths_ignore)
        if changed is not None and not changed:
            return False, f"{self.source}: the pull request changes no files"
        run, reason = filters.decide(base, changed)
        return run, reason.replace("a push to", "a pull request into").replace(
            "the push changed", "the pull request changes"
        )


def _pull_request_trigger(value: Any, source: str) -> PullRequestTrigger:
    """Parse `on.github.pull_request` (null or a mapping of GitHub Actions filters)."""
    where = f"{source}: on.github.pull_request"
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise SettingsError(f"{where} must be a mapping (or empty), got {show(value)}")
    allowed = ("branches", "branches-ignore", "paths", "paths-ignore")
    unknown = set(value) - set(allowed)
    if unknown:
        raise SettingsError(
            f"{where} has unknown keys {sorted(unknown)}; allowed: {', '.join(allowed)}"
        )
    for a, b in (("branches", "branches-ignore"), ("paths", "paths-ignore")):
        if a in value and b in value:
            raise SettingsError(f"{where} has both {a} and {b}; use one of them")

    def patterns(key: str) -> tuple[str, ...] | None:
        return tuple(_as_list(value[key], f"{where}.{key}")) if key in value else None

    return PullRequestTrigger(
        source,
        patterns("branches"),
        patterns("branches-ignore"),
        patterns("paths"),
        patterns("paths-ignore"),
    )


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
    unknown_keys = set(github) - {"branches", "paths", "paths-ignore", "pull_request"}
    if unknown_keys:
        raise SettingsError(
            f"{source}: on.github has unknown keys {sorted(unknown_keys)}; "
            f"allowed: branches, paths, paths-ignore, pull_request"
        )
    return WorkflowTrigger(
        source=source,
        branches=tuple(branches),
        paths=None if paths is None else tuple(_as_list(paths, f"{source}: on.github.paths")),
        paths_ignore=None
        if ignore is None
        else tuple(_as_list(ignore, f"{source}: on.github.paths-ignore")),
        pull_request=_pull_request_trigger(github["pull_request"], source)
        if "pull_request" in github
        else None,
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
    return _any_selects([t.decide for t in triggers], branch, changed)


def _any_selects(
    deciders: list[Any], branch: str, changed: tuple[str, ...] | None
) -> tuple[bool, str]:
    """The first decider that runs it, with its reason; else every one's reason."""
    reasons = []
    for decide in deciders:
        run, reason = decide(branch, changed)
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
    commit: CommitInfo,
    bases: list[str | None],
    reported: list[str] | None,
) -> tuple[tuple[str, ...] | None, str]:
    """The files whose content differs between a base and `commit`, from the first base the
    mirror has (the last handled commit, then the push's `before`); else the paths the push
    reported, else unknown (None: the run goes ahead). Returns them and how they were found.

    The diff is between the two trees, whatever their ancestry: after a force-push it holds
    what the rewritten history changed and what it dropped, not only the new tip's own change.
    """
    for base in bases:
        if base and base != ZERO_SHA and base != commit.sha and has_commit(commit.mirror, base):
            relation = (
                "" if is_ancestor(commit.mirror, base, commit.sha) else " (history rewritten)"
            )
            return (
                changed_between(commit.mirror, base, commit.sha),
                f"git diff {base[:7]}..{commit.short_sha}{relation}",
            )
    if reported is not None:
        return tuple(sorted(set(reported))), "the push payload"
    return None, "no earlier commit to compare with"


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


@task(name="filter-preview", cache_policy=NO_CACHE)
def filter_preview(commit: CommitInfo, base: str, pull_ref: str) -> tuple[bool, str, str]:
    """Whether a pull request's preview of `commit` goes ahead: (run, reason, kind of skip).

    A head the pull request has since moved on from is superseded (its newer push previews
    instead); otherwise the workflow specs at the head decide, on the files the pull request
    changes (from the merge base with `base` to the head), as GitHub Actions does.
    """
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
    logger.info(
        "Files the pull request changes: %s",
        "unknown" if changed is None else f"{len(changed)}: {', '.join(changed[:10])}",
    )
    run, reason = decide_preview(load_triggers(commit), base, changed)
    logger.info("%s preview of %s: %s", "Running" if run else "Skipping", commit.short_sha, reason)
    return run, reason, "filtered"
