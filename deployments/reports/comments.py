"""The pull request comment of a preview: the comparison with the base branch's latest version
(`textgen compare`'s Markdown report), the quality gates, and a link to the preview run."""

from __future__ import annotations

import json
from typing import Any

from deployments.reports.compare import compare
from deployments.reports.compare_views import render_markdown
from tasks import tags as T


def gates_table(found: dict[str, str]) -> str:
    """The gates a run's tags report, as a Markdown table (empty without gates)."""
    try:
        results = json.loads(found.get(T.GATES_REPORT) or "")
    except ValueError:  # no report ("" is no JSON either), or a broken one
        return ""
    lines = ["| gate | result |", "|---|---|"]
    for item in results:
        mark = "passed" if item.get("passed") else "**failed**"
        if not item.get("checked", True):
            mark = "not checked"
        lines.append(f"| `{item.get('gate', '')}` | {mark}: {item.get('note', '')} |")
    return "\n".join(lines) + "\n\n"


def preview_comment(
    repo_url: str,
    branch: str,
    pr: int,
    sha: str,
    record: Any,
    base: Any | None,
    url: str,
    gated: str | None,
) -> tuple[str, str]:
    """The comment of pull request `pr`'s preview run `record`, compared with `base` (the
    branch's latest version, if there is one); and a one-line summary for the status."""
    head = f"### textgen preview of PR #{pr} at `{sha[:7]}`"
    gates = gates_table(record.data.tags)
    link = f"[Preview run]({url})\n"
    if base is None:
        body = f"{head}\n\n{branch} has no version yet to compare with.\n\n{gates}{link}"
        return body, f"no version of {branch} to compare with yet"
    comparison = compare(repo_url, base.info.run_id, record.info.run_id)
    version = base.data.tags.get(T.VERSION)
    summary = f"{comparison.changed} of {len(comparison.pairs)} texts differ from v{version}"
    verdict = f"**Gated:** {gated}\n\n" if gated else ""
    title = f"PR #{pr} (`{sha[:7]}`) against {branch}'s latest version, {comparison.a.label}"
    return f"{head}\n\n{verdict}{gates}{render_markdown(comparison, title)}\n{link}", summary


def failed_preview_comment(sha: str, reason: str, url: str) -> str:
    """The comment of a preview run that failed, with its reason."""
    quoted = "\n".join(f"> {line}" for line in reason.splitlines()[:40])
    return f"### textgen preview of `{sha[:7]}` failed\n\n{quoted}\n\n[MLflow run]({url})\n"
