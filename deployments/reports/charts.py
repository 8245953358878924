"""Quality and speed across versions, as one self-contained SVG (`templates/chart.svg`).

MLflow's chart view draws one bar per run; this draws each metric as a line over the version
numbers, labelled with their commits, for `textgen history --plot` and the `--html` report.
Here is only the geometry: where each point, label and tick goes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from deployments.reports.render import render
from tasks import tags as T
from tasks import versions
from tasks.store import Experiment

CHART_METRICS = (
    ("distinct_2", "distinct-2 (higher: more varied)"),
    ("repetition_rate", "repetition rate (lower: less repeated)"),
    ("mean_log_likelihood", "mean log-likelihood (nats/token)"),
    ("tokens_per_second", "tokens per second"),
)
PANEL_WIDTH, PANEL_HEIGHT = 560, 170
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 64, 16, 28, 44


@dataclass(frozen=True)
class Point:
    """One version: its number, commit and recorded metrics."""

    version: int
    commit: str
    metrics: dict[str, float]


def version_points(experiment: Experiment, limit: int = 200) -> list[Point]:
    """The repository's numbered versions, oldest first (the newest `limit`, the only ones read)."""
    points = [
        Point(int(version), run.data.tags.get(T.COMMIT, "")[:7], dict(run.data.metrics))
        for run in versions.numbered(experiment, limit=limit)
        if (version := run.data.tags.get(T.VERSION, "")).isdigit()
    ]
    return sorted(points, key=lambda p: p.version)[-limit:]


def _panel(
    index: int, key: str, label: str, points: list[Point], highlight: tuple[int, ...]
) -> Any:
    top = 36 + index * (PANEL_HEIGHT + 12)
    plot_width = PANEL_WIDTH - PAD_LEFT - PAD_RIGHT
    plot_height = PANEL_HEIGHT - PAD_TOP - PAD_BOTTOM
    lo_v, hi_v = min(p.version for p in points), max(p.version for p in points)
    drawn = [(p, p.metrics[key]) for p in points if math.isfinite(p.metrics.get(key, math.nan))]
    finite = [v for _, v in drawn]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if hi == lo:
        lo, hi = lo - (abs(lo) * 0.05 or 0.5), hi + (abs(hi) * 0.05 or 0.5)

    def x(version: int) -> float:
        if hi_v == lo_v:
            return PAD_LEFT + plot_width / 2
        return PAD_LEFT + (version - lo_v) / max(1, hi_v - lo_v) * plot_width

    def y(value: float) -> float:
        return top + PAD_TOP + (hi - value) / (hi - lo) * plot_height

    step = max(1, math.ceil(len(points) / 12))
    shown = [
        (x(p.version), p.version, p.commit)
        for i, p in enumerate(points)
        if not (i % step and p.version not in highlight and p is not points[-1])
    ]
    return {
        "key": key,
        "label": label,
        "top": top,
        "left": PAD_LEFT,
        "plot_top": top + PAD_TOP,
        "plot_width": plot_width,
        "plot_height": plot_height,
        "base": top + PAD_TOP + plot_height,
        "ticks": [(y(v), f"{v:.3g}") for v in (hi, (hi + lo) / 2, lo)],
        "labels": shown,
        "line": " ".join(f"{x(p.version):.1f},{y(v):.1f}" for p, v in drawn),
        "dots": [
            {
                "x": x(p.version),
                "y": y(v),
                "marked": p.version in highlight,
                "version": p.version,
                "commit": p.commit,
                "value": v,
            }
            for p, v in drawn
        ],
    }


def render_svg(
    points: list[Point],
    title: str,
    highlight: tuple[int, ...] = (),
    metrics: tuple[tuple[str, str], ...] = CHART_METRICS,
) -> str:
    """One panel per metric (those any version recorded), x = version with its commit."""
    shown = [(key, label) for key, label in metrics if any(key in p.metrics for p in points)]
    panels = [_panel(i, key, label, points, highlight) for i, (key, label) in enumerate(shown)]
    height = 36 + max(1, len(shown)) * (PANEL_HEIGHT + 12)
    return render("chart.svg", title=title, width=PANEL_WIDTH, height=height, panels=panels)


def history_chart(repo_url: str, highlight: tuple[int, ...] = ()) -> str:
    """The SVG chart of a repository's versions."""
    experiment = Experiment.for_repo(repo_url, create=False)
    return render_svg(version_points(experiment), f"Versions of {experiment.name}", highlight)
