"""`textgen compare A B`: what changed between two output versions, texts included.

A and B are versions (`3`, `v3`), commits (full or short SHA) or MLflow run ids. The report
shows the settings that differ, the commits between the two, the metric deltas, and the texts
side by side with the changed words marked; `--html` writes it as a self-contained page.
"""

from __future__ import annotations

import difflib
import json
import re
import shutil
import textwrap
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import git

from deployments.reports.charts import render_svg, version_points
from deployments.reports.render import md_piece, render
from deployments.reports.tables import render_table
from tasks import tags as T
from tasks import versions
from tasks.errors import TrackingError
from tasks.repo import RepoLocation, is_ancestor, resolve_commit
from tasks.settings import GenerationSettings
from tasks.store import Experiment

SETTING_KEYS = tuple(GenerationSettings.model_fields)


@dataclass
class Side:
    """One of the two versions being compared."""

    run: Any
    label: str
    version: int | None
    sha: str
    texts: list[str]

    @property
    def params(self) -> dict[str, str]:
        return dict(self.run.data.params)

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.run.data.metrics)

    @property
    def started(self) -> str:
        return datetime.fromtimestamp(self.run.info.start_time / 1000, UTC).strftime(
            "%Y-%m-%d %H:%M"
        )


@dataclass
class Comparison:
    """Everything the text and HTML reports show."""

    repo: str
    a: Side
    b: Side
    settings: list[tuple[str, str, str]]
    environment: list[tuple[str, str, str]]
    commits: list[str]
    commits_note: str
    metrics: list[tuple[str, float | None, float | None]]
    pairs: list[tuple[list[tuple[str, str]], list[tuple[str, str]]]] = field(default_factory=list)
    chart: str = ""
    """The SVG chart of every version's metrics, with the two compared marked."""

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
            "a": side(self.a),
            "b": side(self.b),
            "settings": [{"key": k, "a": x, "b": y} for k, x, y in self.settings],
            "environment": [{"key": k, "a": x, "b": y} for k, x, y in self.environment],
            "commits": self.commits,
            "commits_note": self.commits_note,
            "metrics": [
                {"metric": k, "a": x, "b": y, "delta": None if x is None or y is None else y - x}
                | {"change": _change(x, y)}
                for k, x, y in self.metrics
            ],
            "texts": [
                {
                    "a": "".join(p for k, p in left if k != "ins"),
                    "b": "".join(p for k, p in right if k != "del"),
                    "identical": all(k == "same" for k, _ in left + right),
                }
                for left, right in self.pairs
            ],
        }


def _label(run: Any) -> str:
    version = run.data.tags.get(T.VERSION, "?")
    return f"v{version} ({run.data.tags.get(T.COMMIT, '')[:7]})"


def resolve_reference(tracker: Experiment, ref: str) -> Any:
    """The version run a reference names; a clear error with the closest matches otherwise."""
    text = ref.strip()
    numbered = versions.numbered(tracker, finished=False)
    if not numbered:
        raise TrackingError(f"repository {tracker.repo_url} has no output versions yet")
    by_version = {r.data.tags.get(T.VERSION): r for r in numbered}
    match = re.fullmatch(r"[vV]?(\d{1,6})", text)
    if match and (text[0] in "vV" or len(text) < 7):
        found = by_version.get(str(int(match.group(1))))
        if found is not None:
            return found
        raise TrackingError(_unknown(text, f"no version {int(match.group(1))}", numbered))
    lowered = text.lower()
    if re.fullmatch(r"[0-9a-f]{32}", lowered):
        try:
            run = tracker.client.get_run(lowered)
        except Exception:
            run = None
        if run is not None and run.info.experiment_id == tracker.experiment_id:
            tags = run.data.tags
            if tags.get(T.OUTCOME) in {T.NEW, T.PREVIEW}:
                return run
            if tags.get(T.OUTCOME) == T.REUSED:
                return tracker.client.get_run(tags[T.REUSED_RUN_ID])
            reason = tags.get(T.SKIP_REASON) or tags.get(T.FAILURE) or run.info.status
            raise TrackingError(f"run {lowered} made no output ({tags.get(T.OUTCOME)}: {reason})")
    if re.fullmatch(r"[0-9a-f]{4,40}", lowered):
        hits = [r for r in numbered if r.data.tags.get(T.COMMIT, "").startswith(lowered)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            listed = ", ".join(_label(r) for r in hits[:10])
            raise TrackingError(
                f"reference {text!r} is ambiguous: commit {lowered} has {len(hits)} versions "
                f"(different settings): {listed}; name the version instead"
            )
        raise TrackingError(_unknown(text, "no version of a commit starting with it", numbered))
    raise TrackingError(
        _unknown(text, "not a version (3, v3), a commit SHA or an MLflow run id", numbered)
    )


def _unknown(ref: str, why: str, versions: list[Any]) -> str:
    candidates: dict[str, Any] = {}
    for run in versions:
        candidates[f"v{run.data.tags.get(T.VERSION)}"] = run
        candidates[run.data.tags.get(T.COMMIT, "")[:7]] = run
        candidates[run.info.run_id] = run
    close = difflib.get_close_matches(ref.lower(), list(candidates), n=5, cutoff=0.3)
    picks = [candidates[c] for c in close] or versions[:5]
    seen: list[str] = []
    for run in picks:
        label = _label(run)
        if label not in seen:
            seen.append(label)
    title = "closest matches" if close else "latest versions"
    return f"unknown reference {ref!r}: {why}; {title}: {', '.join(seen)}"


def _texts(tracker: Experiment, run: Any) -> list[str]:
    try:
        path = tracker.client.download_artifacts(run.info.run_id, "generations.json")
        table = json.loads(Path(path).read_text())
        column = table["columns"].index("generated_text")
        return [str(row[column]) for row in table["data"]]
    except Exception as exc:
        raise TrackingError(
            f"cannot read the texts of {_label(run)} (run {run.info.run_id}): {exc}"
        ) from exc


def _label_of(run: Any) -> str:
    version = run.data.tags.get(T.VERSION)
    if version:
        return f"v{version}"
    if run.data.tags.get(T.PREVIEW_PR):
        return f"PR #{run.data.tags[T.PREVIEW_PR]}"
    return str(run.info.run_id[:8])


def _side(tracker: Experiment, run: Any) -> Side:
    version = run.data.tags.get(T.VERSION)
    return Side(
        run=run,
        label=_label_of(run),
        version=int(version) if version else None,
        sha=run.data.tags.get(T.COMMIT, ""),
        texts=_texts(tracker, run),
    )


def _differences(
    a: dict[str, str], b: dict[str, str], keys: list[str]
) -> list[tuple[str, str, str]]:
    return [(k, a.get(k, "-"), b.get(k, "-")) for k in keys if a.get(k) != b.get(k)]


def _commits(repo: str, a: Side, b: Side) -> tuple[list[str], str]:
    if a.sha == b.sha:
        return [], "the same commit"
    location = RepoLocation.parse(repo)
    try:
        commit = resolve_commit(
            location, a.run.data.tags.get("mlflow.source.git.branch", "main"), a.sha
        )
        resolve_commit(location, b.run.data.tags.get(T.BRANCH, "main"), b.sha)
    except Exception as exc:
        return [], f"commits unavailable: {exc}"
    repo_git = git.Repo(commit.mirror)
    sha_a, sha_b = a.sha, b.sha

    def log(base: str, tip: str) -> list[str]:
        out = repo_git.git.log("--format=%h %an: %s", "--max-count=50", f"{base}..{tip}")
        return [line for line in str(out).splitlines() if line]

    if is_ancestor(commit.mirror, sha_a, sha_b):
        return log(sha_a, sha_b), f"{sha_a[:7]}..{sha_b[:7]}"
    if is_ancestor(commit.mirror, sha_b, sha_a):
        return log(sha_b, sha_a), f"{sha_b[:7]}..{sha_a[:7]}, {b.label} is the older"
    base = str(repo_git.git.merge_base(sha_a, sha_b)).strip()
    return log(base, sha_b), f"diverged at {base[:7]}; the commits on {b.label}'s side"


def _word_diff(left: str, right: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Both texts as (kind, piece) runs: kind is `same`, `del` (left only) or `ins` (right only).

    Words are compared with the whitespace after them, so a run of changed words is one piece
    (`[-a b c-]`, not `[-a-] [-b-] [-c-]`); a changed piece's trailing space stays outside it.
    """
    a = re.findall(r"\S+\s*|\s+", left)
    b = re.findall(r"\S+\s*|\s+", right)
    words_a = [w.rstrip() for w in a]
    words_b = [w.rstrip() for w in b]
    out_a: list[tuple[str, str]] = []
    out_b: list[tuple[str, str]] = []

    def add(out: list[tuple[str, str]], kind: str, text: str) -> None:
        if kind != "same":
            core = text.rstrip()
            tail = text[len(core) :]
            if core:
                if out and out[-1][0] == kind:
                    out[-1] = (kind, out[-1][1] + core)
                else:
                    out.append((kind, core))
            kind, text = "same", tail
        if not text:
            return
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))

    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(
        None, words_a, words_b, autojunk=False
    ).get_opcodes():
        if op == "equal":
            add(out_a, "same", "".join(a[i1:i2]))
            add(out_b, "same", "".join(b[j1:j2]))
            continue
        if i2 > i1:
            add(out_a, "del", "".join(a[i1:i2]))
        if j2 > j1:
            add(out_b, "ins", "".join(b[j1:j2]))
    return out_a, out_b


def compare(repo_url: str, ref_a: str, ref_b: str) -> Comparison:
    """Resolve both references in the repository's experiment and gather the report."""
    tracker = Experiment.for_repo(repo_url, create=False)
    a = _side(tracker, resolve_reference(tracker, ref_a))
    b = _side(tracker, resolve_reference(tracker, ref_b))
    pa, pb = a.params, b.params
    setting_keys = [k for k in SETTING_KEYS if k in pa or k in pb]
    other_keys = sorted((set(pa) | set(pb)) - set(setting_keys))
    commits, note = _commits(tracker.repo_url, a, b)
    metric_keys = sorted(set(a.metrics) | set(b.metrics))
    comparison = Comparison(
        repo=tracker.repo_url,
        a=a,
        b=b,
        settings=_differences(pa, pb, setting_keys),
        environment=_differences(pa, pb, other_keys),
        commits=commits,
        commits_note=note,
        metrics=[(k, a.metrics.get(k), b.metrics.get(k)) for k in metric_keys],
        chart=render_svg(
            version_points(tracker),
            f"Versions of {tracker.repo_url}",
            highlight=tuple(v for v in (a.version, b.version) if v is not None),
        ),
    )
    count = max(len(a.texts), len(b.texts))
    for index in range(count):
        left = a.texts[index] if index < len(a.texts) else ""
        right = b.texts[index] if index < len(b.texts) else ""
        comparison.pairs.append(_word_diff(left, right))
    return comparison


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}"


def _change(a: float | None, b: float | None) -> float | None:
    """The relative change from a to b, signed as the delta is: -1.463 → -1.601 is -9.4%."""
    if a is None or b is None or not a:
        return None
    return (b - a) / abs(a)


def _delta(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return ""
    change = _change(a, b)
    pct = f" ({change:+.1%})" if change is not None else ""
    return f"{b - a:+.4g}{pct}"


def render_text(c: Comparison, width: int | None = None, color: bool = False) -> str:
    """The report for a terminal: removed words `[-like this-]`, added ones `{+like this+}`."""
    width = width or shutil.get_terminal_size((120, 40)).columns
    marks = {
        "del": ("\033[31m[-", "-]\033[0m") if color else ("[-", "-]"),
        "ins": ("\033[32m{+", "+}\033[0m") if color else ("{+", "+}"),
    }
    lines = [
        f"Comparing {c.a.label} (commit {c.a.sha[:7]}, {c.a.started}) with "
        f"{c.b.label} (commit {c.b.sha[:7]}, {c.b.started}) of {c.repo}",
        "",
        "Settings that differ:",
    ]
    if c.settings:
        lines += render_table(["setting", c.a.label, c.b.label], c.settings, indent=2)
    else:
        lines.append("  none: the same settings")
    if c.environment:
        lines += ["", "Model and environment differences:"]
        lines += render_table(["param", c.a.label, c.b.label], c.environment, indent=2)
    lines += ["", f"Commits ({c.commits_note}):"]
    lines += [f"  {line}" for line in c.commits] or ["  none"]
    lines += ["", "Metrics:"]
    lines += render_table(["metric", c.a.label, c.b.label, "delta"], _metric_rows(c), indent=2)
    column = max(20, (width - 5) // 2)
    for index, (left, right) in enumerate(c.pairs, start=1):
        lines += ["", f"Output {index} of {len(c.pairs)}:"]
        if all(kind == "same" for kind, _ in left + right):
            lines += [
                f"  (identical) {line}"
                for line in textwrap.wrap("".join(p for _, p in left), width - 14)
            ]
            continue
        left_text = "".join(marks[k][0] + p + marks[k][1] if k != "same" else p for k, p in left)
        right_text = "".join(marks[k][0] + p + marks[k][1] if k != "same" else p for k, p in right)
        left_lines = _wrap(left_text, column, color)
        right_lines = _wrap(right_text, column, color)
        lines.append(f"  {c.a.label.ljust(column)} | {c.b.label}")
        for i in range(max(len(left_lines), len(right_lines))):
            l_line = left_lines[i] if i < len(left_lines) else ""
            r_line = right_lines[i] if i < len(right_lines) else ""
            pad = column - len(re.sub(r"\033\[\d+m", "", l_line))
            lines.append(f"  {l_line}{' ' * max(0, pad)} | {r_line}")
    return "\n".join(lines) + "\n"


MARKDOWN_CHARS = 60_000
"""GitHub keeps comments up to 65,536 characters; the report stays under that."""


def _metric_rows(c: Comparison) -> list[list[str]]:
    return [[k, _fmt(x), _fmt(y), _delta(x, y)] for k, x, y in c.metrics]


def _texts_of(pieces: list[tuple[str, str]], dropped: str) -> str:
    return "".join(p for k, p in pieces if k != dropped)


def render_markdown(c: Comparison, title: str | None = None) -> str:
    """The report as Markdown for a pull request comment: settings, commits, metrics, and each
    text as a diff (`-` the first's, `+` the second's) with the changed words in bold."""
    fence = "`\u200b``"  # a text cannot end the code block
    pairs = []
    for left, right in c.pairs:
        same = all(kind == "same" for kind, _ in left + right)
        old = " ".join(_texts_of(left, "ins").split()).replace("```", fence)
        new = " ".join(_texts_of(right, "del").split()).replace("```", fence)
        marked = {
            kind: "".join(
                f"{mark}{md_piece(p)}{mark}" if k == kind else md_piece(p) for k, p in pieces
            )
            for pieces, kind, mark in ((left, "del", "~~"), (right, "ins", "**"))
        }
        pairs.append(
            {
                "same": same,
                "diff": [f"  {old}"] if same else [f"- {old}", f"+ {new}"],
                "old": marked["del"],
                "new": marked["ins"],
            }
        )
    text = render(
        "compare.md",
        c=c,
        title=title or f"{c.a.label} → {c.b.label}",
        a=c.a.label,
        b=c.b.label,
        metrics=_metric_rows(c),
        changed=sum(1 for p in pairs if not p["same"]),
        pairs=pairs,
    )
    if len(text) > MARKDOWN_CHARS:
        text = text[: MARKDOWN_CHARS - 80] + "\n\n… (cut: the full report is `textgen compare`)\n"
    return text


def _wrap(text: str, width: int, color: bool) -> list[str]:
    if not color:
        return textwrap.wrap(text, width) or [""]
    # Wrap on the visible text; colour codes take no columns.
    words = text.split(" ")
    lines: list[str] = []
    current = ""
    for word in words:
        visible = len(re.sub(r"\033\[\d+m", "", current + " " + word))
        if current and visible > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    return lines


def render_html(c: Comparison) -> str:
    """The same report as a self-contained HTML page (no scripts, no remote assets)."""
    from markupsafe import Markup

    pairs = [(left, right, all(k == "same" for k, _ in left + right)) for left, right in c.pairs]
    return render(
        "compare.html",
        c=c,
        metrics=_metric_rows(c),
        chart=Markup(c.chart),
        pairs=pairs,
    )
