"""Quality and speed across versions, as one self-contained SVG (no scripts, no fonts to fetch).

MLflow's chart view draws one bar per run; this draws each metric as a line over the version
numbers, labelled with their commits, for `textgen history --plot` and the `--html` report.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

from tasks.tracking import TAG_COMMIT, TAG_OUTCOME, TAG_VERSION, Tracker

CHART_METRICS = (
    ("distinct_2", "distinct-2 (higher: more varied)"),
    ("repetition_rate", "repetition rate (lower: less repeated)"),
    ("mean_log_likelihood", "mean log-likelihood (nats/token)"),
    ("tokens_per_second", "tokens per second"),
)


@dataclass(frozen=True)
class Point:
    """One version: its number, commit and recorded metrics."""

    version: int
    commit: str
    metrics: dict[str, float]


def version_points(tracker: Tracker, limit: int = 200) -> list[Point]:
    """The repository's numbered versions, oldest first (the newest `limit`)."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        f"tags.`{TAG_OUTCOME}` = 'new' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=5000,
    )
    points = []
    for run in runs:
        version = run.data.tags.get(TAG_VERSION, "")
        if version.isdigit():
            points.append(
                Point(int(version), run.data.tags.get(TAG_COMMIT, "")[:7], dict(run.data.metrics))
            )
    points.sort(key=lambda p: p.version)
    return points[-limit:]


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def render_svg(
    points: list[Point],
    title: str,
    highlight: tuple[int, ...] = (),
    metrics: tuple[tuple[str, str], ...] = CHART_METRICS,
) -> str:
    """One panel per metric (those any version recorded), x = version with its commit."""
    e = html.escape
    shown = [(key, label) for key, label in metrics if any(key in p.metrics for p in points)]
    panel_w, panel_h, pad_l, pad_r, pad_t, pad_b = 560, 170, 64, 16, 28, 44
    width = panel_w
    height = 36 + max(1, len(shown)) * (panel_h + 12)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="system-ui, sans-serif" font-size="11" '
        f'role="img" aria-label="{e(title)}">',
        f"<title>{e(title)}</title>",
        '<rect width="100%" height="100%" fill="#ffffff"/>',
        f'<text x="8" y="20" font-size="14" font-weight="600">{e(title)}</text>',
    ]
    if not shown:
        out.append('<text x="8" y="44">no versions with metrics yet</text></svg>')
        return "\n".join(out) + "\n"
    versions = [p.version for p in points]
    lo_v, hi_v = min(versions), max(versions)
    span_v = max(1, hi_v - lo_v)
    plot_w = panel_w - pad_l - pad_r
    plot_h = panel_h - pad_t - pad_b
    for index, (key, label) in enumerate(shown):
        top = 36 + index * (panel_h + 12)
        values = [(p, p.metrics[key]) for p in points if key in p.metrics]
        finite = [v for _, v in values if math.isfinite(v)]
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
        if hi == lo:
            lo, hi = lo - (abs(lo) * 0.05 or 0.5), hi + (abs(hi) * 0.05 or 0.5)

        def x(version: int) -> float:
            if hi_v == lo_v:
                return pad_l + plot_w / 2
            return pad_l + (version - lo_v) / span_v * plot_w

        def y(value: float, top: float = top, lo: float = lo, hi: float = hi) -> float:
            return top + pad_t + (hi - value) / (hi - lo) * plot_h

        out.append(f'<g class="panel" data-metric="{e(key)}">')
        out.append(f'<text x="{pad_l}" y="{top + 16}" font-weight="600">{e(label)}</text>')
        base = top + pad_t + plot_h
        out.append(
            f'<rect x="{pad_l}" y="{top + pad_t}" width="{plot_w}" height="{plot_h}" '
            'fill="none" stroke="#d0d7de"/>'
        )
        for value in (hi, (hi + lo) / 2, lo):
            out.append(
                f'<text x="{pad_l - 6}" y="{y(value) + 4:.1f}" text-anchor="end" '
                f'fill="#57606a">{e(_fmt(value))}</text>'
            )
        step = max(1, math.ceil(len(points) / 12))
        for i, point in enumerate(points):
            if i % step and point.version not in highlight and point is not points[-1]:
                continue
            out.append(
                f'<text x="{x(point.version):.1f}" y="{base + 14}" text-anchor="middle">'
                f"v{point.version}</text>"
                f'<text x="{x(point.version):.1f}" y="{base + 27}" text-anchor="middle" '
                f'fill="#57606a" font-family="ui-monospace, monospace" font-size="9">'
                f"{e(point.commit)}</text>"
            )
        line = " ".join(f"{x(p.version):.1f},{y(v):.1f}" for p, v in values if math.isfinite(v))
        if line:
            out.append(f'<polyline points="{line}" fill="none" stroke="#0969da" stroke-width="2"/>')
        for point, value in values:
            if not math.isfinite(value):
                continue
            marked = point.version in highlight
            out.append(
                f'<circle cx="{x(point.version):.1f}" cy="{y(value):.1f}" '
                f'r="{5 if marked else 3}" fill="{"#cf222e" if marked else "#0969da"}">'
                f"<title>v{point.version} ({e(point.commit)}): {key} = {value:.6g}</title>"
                "</circle>"
            )
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def history_chart(repo_url: str, highlight: tuple[int, ...] = ()) -> str:
    """The SVG chart of a repository's versions."""
    tracker = Tracker.for_repo(repo_url, create=False)
    return render_svg(version_points(tracker), f"Versions of {tracker.repo_url}", highlight)
