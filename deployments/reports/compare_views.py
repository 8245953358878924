"""The views of a comparison (`deployments.reports.compare`): for a terminal, as Markdown for a
pull request comment, and as a self-contained HTML page."""

from __future__ import annotations

import itertools
import re
import shutil
import textwrap

from deployments.reports.compare import Comparison, Pieces, Side, _change, _same, _text
from deployments.reports.render import md_piece, render
from deployments.reports.tables import render_table

ANSI = re.compile(r"\033\[\d+m")


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
        "same": ("", ""),
        "del": ("\033[31m[-", "-]\033[0m") if color else ("[-", "-]"),
        "ins": ("\033[32m{+", "+}\033[0m") if color else ("{+", "+}"),
    }

    def side(s: Side) -> str:
        return f"{s.label} (commit {s.sha[:7]}, {s.started})"

    where = f"{c.repo} (reached from {c.reached_from})" if c.reached_from else c.repo
    lines = [f"Comparing {side(c.a)} with {side(c.b)} of {where}", "", "Settings that differ:"]
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
    if c.cell_metrics:
        lines += ["", "Cells:"]
        header = ["cell", "metric", c.a.label, c.b.label, "delta"]
        lines += render_table(header, _cell_rows(c), indent=2)
    column = max(20, (width - 5) // 2)

    def marked(pieces: Pieces) -> list[str]:
        return _wrap("".join(marks[k][0] + p + marks[k][1] for k, p in pieces), column, color)

    for section in c.shown:
        if section.title and c.evaluation:
            lines += ["", f"== {section.title}"]
        for index, (left, right) in enumerate(section.pairs, start=1):
            lines += ["", f"Output {index} of {len(section.pairs)}:"]
            if _same(left, right):
                wrapped = textwrap.wrap("".join(p for _, p in left), width - 14)
                lines += [f"  (identical) {line}" for line in wrapped]
                continue
            lines.append(f"  {c.a.label.ljust(column)} | {c.b.label}")
            for l_line, r_line in itertools.zip_longest(marked(left), marked(right), fillvalue=""):
                pad = column - len(ANSI.sub("", l_line))
                lines.append(f"  {l_line}{' ' * max(0, pad)} | {r_line}")
    if summary := _unchanged_note(c):
        lines += ["", summary]
    return "\n".join(lines) + "\n"


def _unchanged_note(c: Comparison) -> str:
    """For an evaluation set: how many prompts' texts are the same, when they are not shown."""
    hidden = len(c.sections) - len(c.shown)
    return f"{hidden} unchanged (cell, prompt) texts not shown; --all shows them" if hidden else ""


def _cell_rows(c: Comparison) -> list[list[str]]:
    return [
        [cell or "-", name, _fmt(x), _fmt(y), _delta(x, y)] for cell, name, x, y in c.cell_metrics
    ]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


MARKDOWN_CHARS = 60_000
"""GitHub keeps comments up to 65,536 characters; the report stays under that."""


def _metric_rows(c: Comparison) -> list[list[str]]:
    fmt = _fmt

    def delta(key: str, x: float | None, y: float | None) -> str:
        note = c.speed_note(key, x, y)
        return f"{_delta(x, y)}, {note}" if note else _delta(x, y)

    return [[k, fmt(x), fmt(y), delta(k, x, y)] for k, x, y in c.metrics]


def render_markdown(c: Comparison, title: str | None = None) -> str:
    """The report as Markdown for a pull request comment: settings, commits, metrics, and each
    text as a diff (`-` the first's, `+` the second's) with the changed words in bold."""
    fence = "`\u200b``"  # a text cannot end the code block

    def marked(pieces: Pieces, kind: str, mark: str) -> str:
        return "".join(
            f"{mark}{md_piece(p)}{mark}" if k == kind else md_piece(p) for k, p in pieces
        )

    sections = []
    for section in c.shown:
        pairs = []
        for left, right in section.pairs:
            same = _same(left, right)
            old = " ".join(_text(left, "ins").split()).replace("```", fence)
            new = " ".join(_text(right, "del").split()).replace("```", fence)
            diff = [f"  {old}"] if same else [f"- {old}", f"+ {new}"]
            texts = {"old": marked(left, "del", "~~"), "new": marked(right, "ins", "**")}
            pairs.append({"same": same, "diff": diff, **texts})
        title_text = section.title if c.evaluation else ""
        sections.append({"title": title_text, "pairs": pairs})
    context = {"title": title or f"{c.a.label} → {c.b.label}", "a": c.a.label, "b": c.b.label}
    text = render(
        "compare.md",
        c=c,
        metrics=_metric_rows(c),
        cells=_cell_rows(c),
        changed=c.changed,
        total=len(c.pairs),
        sections=sections,
        unchanged=_unchanged_note(c),
        **context,
    )
    if len(text) > MARKDOWN_CHARS:
        text = text[: MARKDOWN_CHARS - 80] + "\n\n… (cut: the full report is `textgen compare`)\n"
    return text


def _wrap(text: str, width: int, color: bool) -> list[str]:
    if not color:
        return textwrap.wrap(text, width) or [""]
    # Wrap on the visible text; colour codes take no columns.
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        if current and len(ANSI.sub("", current + " " + word)) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    return lines


def render_html(c: Comparison) -> str:
    """The same report as a self-contained HTML page (no scripts, no remote assets)."""
    from markupsafe import Markup

    sections = [
        {
            "title": s.title if c.evaluation else "",
            "pairs": [(left, right, _same(left, right)) for left, right in s.pairs],
        }
        for s in c.shown
    ]
    return render(
        "compare.html",
        c=c,
        metrics=_metric_rows(c),
        cells=_cell_rows(c),
        chart=Markup(c.chart),
        sections=sections,
        unchanged=_unchanged_note(c),
    )
