"""`textgen compare A B`: what changed between two output versions, texts included.

A and B are versions (`3`, `v3`), commits (full or short SHA) or MLflow run ids. The report
shows the settings that differ, the commits between the two, the metric deltas, and the texts
side by side with the changed words marked; `--html` writes it as a self-contained page.
"""

from __future__ import annotations

import difflib
import html
import json
import re
import shutil
import textwrap
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import git

from deployments.charts import render_svg, version_points
from tasks.errors import TrackingError
from tasks.repo import RepoLocation, is_ancestor, resolve_commit
from tasks.settings import GenerationSettings
from tasks.tracking import TAG_COMMIT, TAG_OUTCOME, TAG_PREVIEW, TAG_VERSION, Tracker

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


def _versioned_runs(tracker: Tracker) -> list[Any]:
    return list(
        tracker.client.search_runs(
            [tracker.experiment_id],
            f"tags.`{TAG_OUTCOME}` = 'new'",
            order_by=["attributes.start_time DESC"],
            max_results=5000,
        )
    )


def _label(run: Any) -> str:
    version = run.data.tags.get(TAG_VERSION, "?")
    return f"v{version} ({run.data.tags.get(TAG_COMMIT, '')[:7]})"


def resolve_reference(tracker: Tracker, ref: str) -> Any:
    """The version run a reference names; a clear error with the closest matches otherwise."""
    text = ref.strip()
    versions = _versioned_runs(tracker)
    if not versions:
        raise TrackingError(f"repository {tracker.repo_url} has no output versions yet")
    by_version = {r.data.tags.get(TAG_VERSION): r for r in versions}
    match = re.fullmatch(r"[vV]?(\d{1,6})", text)
    if match and (text[0] in "vV" or len(text) < 7):
        found = by_version.get(str(int(match.group(1))))
        if found is not None:
            return found
        raise TrackingError(_unknown(text, f"no version {int(match.group(1))}", versions))
    lowered = text.lower()
    if re.fullmatch(r"[0-9a-f]{32}", lowered):
        try:
            run = tracker.client.get_run(lowered)
        except Exception:
            run = None
        if run is not None and run.info.experiment_id == tracker.experiment_id:
            tags = run.data.tags
            if tags.get(TAG_OUTCOME) in {"new", "preview"}:
                return run
            if tags.get(TAG_OUTCOME) == "reused":
                return tracker.client.get_run(tags["textgen.reused_run_id"])
            reason = (
                tags.get("textgen.skip_reason") or tags.get("textgen.failure") or run.info.status
            )
            raise TrackingError(f"run {lowered} made no output ({tags.get(TAG_OUTCOME)}: {reason})")
    if re.fullmatch(r"[0-9a-f]{4,40}", lowered):
        hits = [r for r in versions if r.data.tags.get(TAG_COMMIT, "").startswith(lowered)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            listed = ", ".join(_label(r) for r in hits[:10])
            raise TrackingError(
                f"reference {text!r} is ambiguous: commit {lowered} has {len(hits)} versions "
                f"(different settings): {listed}; name the version instead"
            )
        raise TrackingError(_unknown(text, "no version of a commit starting with it", versions))
    raise TrackingError(
        _unknown(text, "not a version (3, v3), a commit SHA or an MLflow run id", versions)
    )


def _unknown(ref: str, why: str, versions: list[Any]) -> str:
    candidates: dict[str, Any] = {}
    for run in versions:
        candidates[f"v{run.data.tags.get(TAG_VERSION)}"] = run
        candidates[run.data.tags.get(TAG_COMMIT, "")[:7]] = run
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


def _texts(tracker: Tracker, run: Any) -> list[str]:
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
    version = run.data.tags.get(TAG_VERSION)
    if version:
        return f"v{version}"
    if run.data.tags.get(TAG_PREVIEW):
        return f"PR #{run.data.tags[TAG_PREVIEW]}"
    return str(run.info.run_id[:8])


def _side(tracker: Tracker, run: Any) -> Side:
    version = run.data.tags.get(TAG_VERSION)
    return Side(
        run=run,
        label=_label_of(run),
        version=int(version) if version else None,
        sha=run.data.tags.get(TAG_COMMIT, ""),
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
        resolve_commit(location, b.run.data.tags.get("mlflow.source.git.branch", "main"), b.sha)
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
    tracker = Tracker.for_repo(repo_url, create=False)
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


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]


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
        lines += _table([["setting", c.a.label, c.b.label]] + [[k, x, y] for k, x, y in c.settings])
    else:
        lines.append("  none: the same settings")
    if c.environment:
        lines += ["", "Model and environment differences:"]
        lines += _table(
            [["param", c.a.label, c.b.label]] + [[k, x, y] for k, x, y in c.environment]
        )
    lines += ["", f"Commits ({c.commits_note}):"]
    lines += [f"  {line}" for line in c.commits] or ["  none"]
    lines += ["", "Metrics:"]
    lines += _table(
        [["metric", c.a.label, c.b.label, "delta"]]
        + [[k, _fmt(x), _fmt(y), _delta(x, y)] for k, x, y in c.metrics]
    )
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


def _md(text: str) -> str:
    """Text safe inside a Markdown table cell or line: no pipes, no HTML, one line."""
    return _md_piece(text).strip()


def _md_piece(text: str) -> str:
    """A piece of a line, its spaces kept (collapsed), Markdown and HTML escaped."""
    escaped = html.escape(re.sub(r"\s+", " ", text), quote=False)
    return re.sub(r"([\\`*_~|\[\]#])", r"\\\1", escaped)


def render_markdown(c: Comparison, title: str | None = None) -> str:
    """The report as Markdown for a pull request comment: settings, commits, metrics, and each
    text as a diff (`-` the first's, `+` the second's) with the changed words in bold."""
    lines = [
        f"### {title or f'{c.a.label} → {c.b.label}'}",
        "",
        f"Comparing **{c.a.label}** (commit `{c.a.sha[:7]}`) with **{c.b.label}** "
        f"(commit `{c.b.sha[:7]}`) of `{_md(c.repo)}`.",
        "",
    ]
    if c.settings:
        lines += ["| setting | " + _md(c.a.label) + " | " + _md(c.b.label) + " |", "|---|---|---|"]
        lines += [f"| `{k}` | {_md(x)} | {_md(y)} |" for k, x, y in c.settings]
    else:
        lines.append("Settings: the same.")
    if c.environment:
        lines += ["", "<details><summary>Model and environment differences</summary>", ""]
        lines += ["| param | " + _md(c.a.label) + " | " + _md(c.b.label) + " |", "|---|---|---|"]
        lines += [f"| `{k}` | {_md(x)} | {_md(y)} |" for k, x, y in c.environment]
        lines += ["", "</details>"]
    lines += ["", f"Commits ({_md(c.commits_note)}):", ""]
    lines += [f"- {_md(line)}" for line in c.commits[:20]] or ["- none"]
    lines += ["", "| metric | " + _md(c.a.label) + " | " + _md(c.b.label) + " | change |"]
    lines.append("|---|---:|---:|---:|")
    lines += [f"| `{k}` | {_fmt(x)} | {_fmt(y)} | {_delta(x, y)} |" for k, x, y in c.metrics]
    changed = sum(1 for left, right in c.pairs if any(k != "same" for k, _ in left + right))
    lines += ["", f"**Texts:** {changed} of {len(c.pairs)} differ.", ""]
    for index, (left, right) in enumerate(c.pairs, start=1):
        same = all(kind == "same" for kind, _ in left + right)
        old = "".join(p for k, p in left if k != "ins")
        new = "".join(p for k, p in right if k != "del")
        lines.append(
            f"<details{'' if same else ' open'}><summary>Output {index} of "
            f"{len(c.pairs)}{' (identical)' if same else ''}</summary>"
        )
        lines += ["", "```diff"]
        fence = "`\u200b``"  # a text cannot end the code block
        if same:
            lines.append("  " + " ".join(old.split()).replace("```", fence))
        else:
            lines.append("- " + " ".join(old.split()).replace("```", fence))
            lines.append("+ " + " ".join(new.split()).replace("```", fence))
        lines += ["```", ""]
        if not same:
            for label, pieces, kind, mark in (
                (c.a.label, left, "del", "~~"),
                (c.b.label, right, "ins", "**"),
            ):
                text = "".join(
                    f"{mark}{_md_piece(p)}{mark}" if k == kind else _md_piece(p) for k, p in pieces
                )
                lines += [f"> **{_md(label)}:** {text}", ">"]
            lines[-1] = ""
        lines.append("</details>")
    text = "\n".join(lines) + "\n"
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


_CSS = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem;color:#1f2328}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:2rem;border-bottom:1px solid #d0d7de}
table{border-collapse:collapse}td,th{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:left;
vertical-align:top}th{background:#f6f8fa}.num{text-align:right;font-variant-numeric:tabular-nums}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:1rem;margin:.5rem 0 1.5rem}
.pair div{border:1px solid #d0d7de;border-radius:6px;padding:.6rem;white-space:pre-wrap}
del{background:#ffebe9;color:#82071e;text-decoration:line-through}ins{background:#dafbe1;
color:#116329;text-decoration:none}code{font-family:ui-monospace,monospace}.same{color:#57606a}
"""


def render_html(c: Comparison) -> str:
    """The same report as a self-contained HTML page (no scripts, no remote assets)."""
    e = html.escape

    def table(header: list[str], rows: list[list[str]], numeric: set[int] | None = None) -> str:
        numeric = numeric or set()
        head = "".join(f"<th>{e(h)}</th>" for h in header)
        body = "".join(
            "<tr>"
            + "".join(
                f'<td class="num">{e(v)}</td>' if i in numeric else f"<td>{e(v)}</td>"
                for i, v in enumerate(row)
            )
            + "</tr>"
            for row in rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def runs(pieces: list[tuple[str, str]]) -> str:
        out = []
        for kind, piece in pieces:
            if kind == "del":
                out.append(f"<del>{e(piece)}</del>")
            elif kind == "ins":
                out.append(f"<ins>{e(piece)}</ins>")
            else:
                out.append(e(piece))
        return "".join(out)

    parts = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(c.a.label)} vs {e(c.b.label)} — textgen compare</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{e(c.a.label)} vs {e(c.b.label)}</h1>",
        f"<p>Repository <code>{e(c.repo)}</code>: {e(c.a.label)} is commit "
        f"<code>{e(c.a.sha[:7])}</code> ({e(c.a.started)}), {e(c.b.label)} is commit "
        f"<code>{e(c.b.sha[:7])}</code> ({e(c.b.started)}).</p>",
        "<h2>Settings that differ</h2>",
        table(["setting", c.a.label, c.b.label], [list(r) for r in c.settings])
        if c.settings
        else "<p>None: the same settings.</p>",
    ]
    if c.environment:
        parts += [
            "<h2>Model and environment differences</h2>",
            table(["param", c.a.label, c.b.label], [list(r) for r in c.environment]),
        ]
    parts += [f"<h2>Commits ({e(c.commits_note)})</h2>"]
    parts += (
        ["<ul>" + "".join(f"<li><code>{e(x)}</code></li>" for x in c.commits) + "</ul>"]
        if c.commits
        else ["<p>None.</p>"]
    )
    parts += [
        "<h2>Metrics</h2>",
        table(
            ["metric", c.a.label, c.b.label, "delta"],
            [[k, _fmt(x), _fmt(y), _delta(x, y)] for k, x, y in c.metrics],
            numeric={1, 2, 3},
        ),
    ]
    if c.chart:
        parts += [
            "<h2>Across versions</h2>",
            f"<p>Every version's metrics; {e(c.a.label)} and {e(c.b.label)} are marked.</p>",
            f'<figure class="chart">{c.chart}</figure>',
        ]
    parts += ["<h2>Texts</h2>"]
    for index, (left, right) in enumerate(c.pairs, start=1):
        same = all(kind == "same" for kind, _ in left + right)
        parts.append(f"<h3>Output {index} of {len(c.pairs)}{' (identical)' if same else ''}</h3>")
        parts.append(
            f'<div class="pair"><div><strong>{e(c.a.label)}</strong><br>{runs(left)}</div>'
            f"<div><strong>{e(c.b.label)}</strong><br>{runs(right)}</div></div>"
        )
    parts.append("</body></html>\n")
    return "".join(parts)
