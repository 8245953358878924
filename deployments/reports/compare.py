"""`textgen compare A B`: what changed between two output versions, texts included.

A and B are versions (`3`, `v3`), commits (full or short SHA) or MLflow run ids. The report
shows the settings that differ, the commits between the two, the metric deltas, and the texts
side by side with the changed words marked; `--html` writes it as a self-contained page.

For evaluation sets (`tasks.evalset`) it shows a cell x metric table, then the texts per cell
and prompt: the prompts whose texts changed, were added or were removed (`show_all`: every
one), each saying where its texts came from when they were reused.
"""

from __future__ import annotations

import difflib
import itertools
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import git

from deployments.reports.charts import render_svg, version_points
from tasks import tags as T
from tasks import versions
from tasks.errors import TrackingError, UsageError
from tasks.evalset import prompt_id
from tasks.evaluation import QUALITY, Row
from tasks.machine import shared as is_shared
from tasks.repo import RepoLocation, is_ancestor, resolve_commit
from tasks.settings import GenerationSettings
from tasks.store import Experiment

SETTING_KEYS = tuple(GenerationSettings.model_fields)
TIMINGS = {
    "tokens_per_second": "shared_cores",
    "generation_seconds": "shared_cores",
    "load_seconds": "load_shared_cores",
}
"""Timing metrics, and the metric that says how busy the cores were while each was measured."""
NOISE_FLOOR = 0.05
"""A timing change this small (5%) is within any machine's noise."""
SUGGESTED_FROM = 200
"""An unknown reference is matched against this many of the latest versions."""
Pieces = list[tuple[str, str]]
"""A text as (kind, piece) runs, kind `same`, `del` or `ins` (see `_word_diff`)."""
Difference = tuple[str, str, str]


@dataclass
class Side:
    """One of the two versions being compared."""

    run: Any
    label: str
    version: int | None
    sha: str
    texts: list[str]
    rows: dict[tuple[str, str], Row] = field(default_factory=dict)
    """The texts per (cell, prompt id); a one-prompt version has one row, cell `""`."""
    cells: dict[str, dict[str, float]] = field(default_factory=dict)
    evaluation: bool = False

    @property
    def started(self) -> str:
        started = datetime.fromtimestamp(self.run.info.start_time / 1000, UTC)
        return started.strftime("%Y-%m-%d %H:%M")


@dataclass
class Section:
    """The texts of one prompt in one cell, on both sides."""

    cell: str
    prompt_id: str
    prompt: str
    status: str
    """`same`, `changed`, `new` (only in the second) or `removed` (only in the first)."""
    note: str
    """Where the second's texts came from when they were reused (`reused from v2`)."""
    pairs: list[tuple[Pieces, Pieces]]

    @property
    def title(self) -> str:
        """`cell random_seed=7 | prompt q1 (changed, reused from v2): Hello, I'm`."""
        where = f"cell {self.cell} | " if self.cell else ""
        status = ", ".join(x for x in (self.status, self.note) if x)
        first = self.prompt.splitlines()[0] if self.prompt else ""
        return f"{where}prompt {self.prompt_id} ({status}): {first}"


CELL_METRICS = (*QUALITY, "tokens_per_second", "new_tokens", "prompts_generated")
"""What the cell x metric table of an evaluation set shows."""


@dataclass
class Comparison:
    """Everything the text and HTML reports show."""

    repo: str
    """The repository's one name (its experiment's)."""
    a: Side
    b: Side
    settings: list[Difference]
    environment: list[Difference]
    commits: list[str]
    commits_note: str
    metrics: list[tuple[str, float | None, float | None]]
    pairs: list[tuple[Pieces, Pieces]] = field(default_factory=list)
    reached_from: str = ""
    """Where the repository was reached from, when that is not its name (a checkout)."""
    chart: str = ""
    """The SVG chart of every version's metrics, with the two compared marked."""
    sections: list[Section] = field(default_factory=list)
    cell_metrics: list[tuple[str, str, float | None, float | None]] = field(default_factory=list)
    """(cell, metric, first, second) for evaluation sets; empty for two one-prompt versions."""
    show_all: bool = False
    """Whether the texts of unchanged prompts are shown too (evaluation sets)."""

    @property
    def evaluation(self) -> bool:
        """Whether either side is an evaluation set."""
        return self.a.evaluation or self.b.evaluation

    @property
    def shown(self) -> list[Section]:
        """The sections the report prints: for evaluation sets, those that changed (all of them
        with `show_all`); for two one-prompt versions, the one section."""
        if not self.evaluation or self.show_all:
            return self.sections
        return [s for s in self.sections if s.status != "same"]

    def speed_note(self, key: str, x: float | None, y: float | None) -> str:
        """For a timing: why its change says nothing about the change between the two (the
        cores were shared with other work while one of them ran, or the change is within the
        noise of the machine's decoding steps); empty when it does, and for other metrics."""
        if key not in TIMINGS or x is None or y is None:
            return ""
        share_key = TIMINGS[key]
        shared = [
            f"{s.label} {found:.1f}"
            for s in (self.a, self.b)
            if is_shared(found := s.run.data.metrics.get(share_key))
        ]
        if shared:
            return f"not comparable: cores busy elsewhere ({', '.join(shared)})"
        if share_key != "shared_cores":  # loading has no steps to measure noise by
            return ""
        spreads = [s.run.data.metrics.get("step_time_spread") for s in (self.a, self.b)]
        known = [v for v in spreads if v is not None]
        noise = max(NOISE_FLOOR, *known) if known else None
        change = _change(x, y)
        if noise is not None and change is not None and abs(change) <= noise:
            return f"within noise (steps vary {noise:.0%})"
        return ""

    @property
    def changed(self) -> int:
        """How many of the texts differ."""
        return sum(1 for left, right in self.pairs if not _same(left, right))

    def as_dict(self) -> dict[str, Any]:
        """The report for machines (`textgen compare --json`)."""

        def side(s: Side) -> dict[str, Any]:
            return {
                "label": s.label,
                "version": s.version,
                "commit": s.sha,
                "mlflow_run_id": s.run.info.run_id,
                "started": s.started,
            }

        return {
            "repository": self.repo,
            "reached_from": self.reached_from or self.repo,
            "a": side(self.a),
            "b": side(self.b),
            "settings": [{"key": k, "a": x, "b": y} for k, x, y in self.settings],
            "environment": [{"key": k, "a": x, "b": y} for k, x, y in self.environment],
            "commits": self.commits,
            "commits_note": self.commits_note,
            "metrics": [
                {"metric": k, "a": x, "b": y, "delta": None if x is None or y is None else y - x}
                | {"change": _change(x, y), "note": self.speed_note(k, x, y)}
                for k, x, y in self.metrics
            ],
            "texts": [_pair_dict(pair) for pair in self.pairs],
            "cells": [
                {"cell": cell, "metric": k, "a": x, "b": y, "change": _change(x, y)}
                for cell, k, x, y in self.cell_metrics
            ],
            "sections": [
                {
                    "cell": s.cell,
                    "prompt_id": s.prompt_id,
                    "prompt": s.prompt,
                    "status": s.status,
                    "note": s.note,
                    "texts": [_pair_dict(pair) for pair in s.pairs],
                }
                for s in self.sections
            ],
        }


def _pair_dict(pair: tuple[Pieces, Pieces]) -> dict[str, Any]:
    left, right = pair
    return {"a": _text(left, "ins"), "b": _text(right, "del"), "identical": _same(left, right)}


def _same(left: Pieces, right: Pieces) -> bool:
    return all(kind == "same" for kind, _ in left + right)


def _text(pieces: Pieces, dropped: str) -> str:
    return "".join(p for k, p in pieces if k != dropped)


def _label(run: Any) -> str:
    return f"v{run.data.tags.get(T.VERSION, '?')} ({run.data.tags.get(T.COMMIT, '')[:7]})"


def resolve_reference(tracker: Experiment, ref: str) -> Any:
    """The version run a reference names; a clear error with the closest matches otherwise.
    Only the runs a reference can name are read, however many versions the repository has."""
    text = ref.strip()
    match = re.fullmatch(r"[vV]?(\d{1,6})", text)
    if match and (text[0] in "vV" or len(text) < 7):
        if (found := versions.version_number(tracker, int(match.group(1)))) is not None:
            return found
        raise _unknown(tracker, text, f"no version {int(match.group(1))}")
    lowered = text.lower()
    if re.fullmatch(r"[0-9a-f]{32}", lowered):
        from mlflow.exceptions import MlflowException

        try:
            run = tracker.client.get_run(lowered)
        except MlflowException:  # no such run: the reference may be a commit instead
            run = None
        if run is not None and run.info.experiment_id == tracker.experiment_id:
            tags = run.data.tags
            if tags.get(T.OUTCOME) in {T.NEW, T.PREVIEW}:
                return run
            if tags.get(T.OUTCOME) == T.REUSED:
                return tracker.client.get_run(tags[T.REUSED_RUN_ID])
            reason = tags.get(T.SKIP_REASON) or tags.get(T.FAILURE) or run.info.status
            raise UsageError(f"run {lowered} made no output ({tags.get(T.OUTCOME)}: {reason})")
    if re.fullmatch(r"[0-9a-f]{4,40}", lowered):
        hits = versions.versions_of_commit(tracker, lowered)
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            listed = ", ".join(_label(r) for r in hits[:10])
            many = f"{len(hits) - 1}+" if len(hits) > 10 else str(len(hits))
            raise UsageError(
                f"reference {text!r} is ambiguous: commit {lowered} has {many} versions "
                f"(different settings): {listed}; name the version instead"
            )
        raise _unknown(tracker, text, "no version of a commit starting with it")
    raise _unknown(tracker, text, "not a version (3, v3), a commit SHA or an MLflow run id")


def _unknown(tracker: Experiment, ref: str, why: str) -> UsageError:
    """The error for a reference that names nothing, with the closest of the latest versions."""
    latest = versions.numbered(tracker, finished=False, limit=SUGGESTED_FROM)
    if not latest:
        return UsageError(f"repository {tracker.name} has no output versions yet")
    candidates: dict[str, Any] = {}
    for run in latest:
        candidates[f"v{run.data.tags.get(T.VERSION)}"] = run
        candidates[run.data.tags.get(T.COMMIT, "")[:7]] = run
        candidates[run.info.run_id] = run
    close = difflib.get_close_matches(ref.lower(), list(candidates), n=5, cutoff=0.3)
    labels = dict.fromkeys(_label(run) for run in [candidates[c] for c in close] or latest[:5])
    title = "closest matches" if close else "latest versions"
    return UsageError(f"unknown reference {ref!r}: {why}; {title}: {', '.join(labels)}")


def _side(tracker: Experiment, run: Any) -> Side:
    tags = run.data.tags
    version = tags.get(T.VERSION)
    if version:
        label = f"v{version}"
    elif tags.get(T.PREVIEW_PR):
        label = f"PR #{tags[T.PREVIEW_PR]}"
    else:
        label = str(run.info.run_id[:8])
    evaluation = T.CELLS in tags
    try:
        if evaluation:
            rows = {(r.cell, r.prompt_id): r for r in versions.rows_of(tracker, run)}
            texts = [text for row in rows.values() for text in row.texts]
            cells = versions.cell_metrics_of(tracker, run)
        else:
            texts = versions.texts_of(tracker, run.info.run_id)
            prompt = run.data.params.get("initial_sentence", "")
            one = Row("", prompt_id(prompt), prompt, "", texts, [], {})
            rows, cells = {("", one.prompt_id): one}, {"": dict(run.data.metrics)}
    except Exception as exc:
        raise TrackingError(
            f"cannot read the texts of {_label(run)} (run {run.info.run_id}): {exc}"
        ) from exc
    number = int(version) if version else None
    return Side(run, label, number, tags.get(T.COMMIT, ""), texts, rows, cells, evaluation)


def _pairs(left: list[str], right: list[str]) -> list[tuple[Pieces, Pieces]]:
    return [_word_diff(x, y) for x, y in itertools.zip_longest(left, right, fillvalue="")]


def _sections(a: Side, b: Side) -> list[Section]:
    """The texts per (cell, prompt), in the second's order, then those only the first has."""
    if not (a.evaluation or b.evaluation):
        (left,), (right,) = a.rows.values(), b.rows.values()
        pairs = _pairs(left.texts, right.texts)
        status = "same" if all(_same(x, y) for x, y in pairs) else "changed"
        return [Section("", right.prompt_id, right.prompt, status, "", pairs)]
    sections = []
    for key in [*b.rows, *(k for k in a.rows if k not in b.rows)]:
        old, new = a.rows.get(key), b.rows.get(key)
        row = new or old
        assert row is not None
        note = ""
        if new is not None and not new.generated and new.from_version is not None:
            note = f"reused from v{new.from_version}"
        pairs = _pairs(old.texts if old else [], new.texts if new else [])
        if old is None:
            status = "new"
        elif new is None:
            status = "removed"
        else:
            status = "same" if all(_same(x, y) for x, y in pairs) else "changed"
        sections.append(Section(row.cell, row.prompt_id, row.prompt, status, note, pairs))
    return sections


def _cell_metrics(a: Side, b: Side) -> list[tuple[str, str, float | None, float | None]]:
    if not (a.evaluation or b.evaluation):
        return []
    cells = [*b.cells, *(c for c in a.cells if c not in b.cells)]
    return [
        (cell, name, a.cells.get(cell, {}).get(name), b.cells.get(cell, {}).get(name))
        for cell in cells
        for name in CELL_METRICS
        if name in a.cells.get(cell, {}) or name in b.cells.get(cell, {})
    ]


def _differences(a: dict[str, str], b: dict[str, str], keys: list[str]) -> list[Difference]:
    return [(k, a.get(k, "-"), b.get(k, "-")) for k in keys if a.get(k) != b.get(k)]


def _commits(repo: str, a: Side, b: Side) -> tuple[list[str], str]:
    if a.sha == b.sha:
        return [], "the same commit"
    location = RepoLocation.parse(repo)
    try:
        commit = resolve_commit(location, a.run.data.tags.get(T.BRANCH, "main"), a.sha)
        resolve_commit(location, b.run.data.tags.get(T.BRANCH, "main"), b.sha)
    except Exception as exc:
        return [], f"commits unavailable: {exc}"
    repo_git = git.Repo(commit.mirror)

    def log(base: str, tip: str) -> list[str]:
        out = repo_git.git.log("--format=%h %an: %s", "--max-count=50", f"{base}..{tip}")
        return [line for line in str(out).splitlines() if line]

    if is_ancestor(commit.mirror, a.sha, b.sha):
        return log(a.sha, b.sha), f"{a.sha[:7]}..{b.sha[:7]}"
    if is_ancestor(commit.mirror, b.sha, a.sha):
        return log(b.sha, a.sha), f"{b.sha[:7]}..{a.sha[:7]}, {b.label} is the older"
    base = str(repo_git.git.merge_base(a.sha, b.sha)).strip()
    return log(base, b.sha), f"diverged at {base[:7]}; the commits on {b.label}'s side"


def _word_diff(left: str, right: str) -> tuple[Pieces, Pieces]:
    """Both texts as (kind, piece) runs: kind is `same`, `del` (left only) or `ins` (right only).

    Words are compared with the whitespace after them, so a run of changed words is one piece
    (`[-a b c-]`, not `[-a-] [-b-] [-c-]`); a changed piece's trailing space stays outside it.
    """
    a = re.findall(r"\S+\s*|\s+", left)
    b = re.findall(r"\S+\s*|\s+", right)
    out_a: Pieces = []
    out_b: Pieces = []

    def add(out: Pieces, kind: str, text: str) -> None:
        core = text if kind == "same" else text.rstrip()
        for piece_kind, piece in ((kind, core), ("same", text[len(core) :])):
            if piece and out and out[-1][0] == piece_kind:
                out[-1] = (piece_kind, out[-1][1] + piece)
            elif piece:
                out.append((piece_kind, piece))

    words_a, words_b = [w.rstrip() for w in a], [w.rstrip() for w in b]
    matcher = difflib.SequenceMatcher(None, words_a, words_b, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        add(out_a, "same" if op == "equal" else "del", "".join(a[i1:i2]))
        add(out_b, "same" if op == "equal" else "ins", "".join(b[j1:j2]))
    return out_a, out_b


def compare(
    repo_url: str, ref_a: str, ref_b: str, chart: bool = False, show_all: bool = False
) -> Comparison:
    """Resolve both references in the repository's experiment and gather the report (`chart`:
    with the chart of the latest versions, which only the HTML report shows; `show_all`: with
    the texts of an evaluation set's unchanged prompts too)."""
    tracker = Experiment.for_repo(repo_url, create=False)
    a = _side(tracker, resolve_reference(tracker, ref_a))
    b = _side(tracker, resolve_reference(tracker, ref_b))
    pa, pb = a.run.data.params, b.run.data.params
    ma, mb = a.run.data.metrics, b.run.data.metrics
    setting_keys = [k for k in SETTING_KEYS if k in pa or k in pb]
    other_keys = sorted((set(pa) | set(pb)) - set(setting_keys))
    commits, note = _commits(tracker.repo_url, a, b)
    reached = tracker.repo_url if tracker.repo_url != tracker.name else ""
    marked = tuple(v for v in (a.version, b.version) if v is not None)
    sections = _sections(a, b)
    return Comparison(
        repo=tracker.name,
        reached_from=reached,
        a=a,
        b=b,
        settings=_differences(pa, pb, setting_keys),
        environment=_differences(pa, pb, other_keys),
        commits=commits,
        commits_note=note,
        metrics=[(k, ma.get(k), mb.get(k)) for k in sorted(set(ma) | set(mb))],
        pairs=[pair for section in sections for pair in section.pairs],
        sections=sections,
        cell_metrics=_cell_metrics(a, b),
        show_all=show_all,
        chart=(
            render_svg(version_points(tracker), f"Versions of {tracker.name}", marked)
            if chart
            else ""
        ),
    )


def _change(a: float | None, b: float | None) -> float | None:
    """The relative change from a to b, signed as the delta is: -1.463 → -1.601 is -9.4%."""
    if a is None or b is None or not a:
        return None
    return (b - a) / abs(a)
