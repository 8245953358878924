"""`textgen run`, `history`, `compare`: make a version, list them, compare two."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from deployments.cli.app import (
    Branch,
    Json,
    Repo,
    app,
    location,
    parse_assignments,
    typed_credentials,
    verbose,
)
from tasks import config
from tasks import tags as T
from tasks.names import MANUAL


@app.command()
def run(
    ctx: typer.Context,
    repo: Repo = None,
    branch: Branch = "main",
    commit: Annotated[
        str | None,
        typer.Option(help="Commit to run, full or short SHA (default: tip of the branch)."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help="Override a setting for this run only (repeatable), e.g. --set random_seed=7.",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Make a new version even if one exists.")
    ] = False,
    json_: Json = False,
    trigger: Annotated[str, typer.Option(hidden=True)] = MANUAL,
) -> int:
    """Run the flow once and print the new version, with links to it."""
    from deployments.cli.console import quiet_expected_errors
    from deployments.ops.prefect_server import use_command_api
    from deployments.service.record import running_service
    from tasks.repo import uncommitted_changes

    where = location(repo)
    warnings = []
    pending = [] if commit else uncommitted_changes(where.url, branch)
    if pending:
        more = f" and {len(pending) - 8} more" if len(pending) > 8 else ""
        shown = ", ".join(pending[:8]) + more
        warnings.append(
            f"uncommitted changes in {where.url} are not part of this run: {shown}. Runs read "
            f"the files committed on {branch}; commit them to run them"
        )
    for warning in warnings:
        print(f"textgen: warning: {warning}", file=sys.stderr)
    use_command_api()
    from flows.text_generation import nlp_text_generation

    # Credentials typed in --repo reach the run's git commands, and nothing else.
    typed = typed_credentials(where)
    # With --json, stdout holds the JSON alone (MLflow's client prints "View run" lines).
    stdout = contextlib.redirect_stdout(sys.stderr) if json_ else contextlib.nullcontext()
    with quiet_expected_errors(enabled=not verbose(ctx)), stdout, config.overrides(typed):
        record = nlp_text_generation(
            repo_url=where.url if repo else None,
            branch=branch,
            commit_sha=commit,
            overrides=parse_assignments(set_ or []) or None,
            trigger=trigger,
            force=force,
        )
    if json_:
        print(json.dumps(record.as_dict() | {"warnings": warnings}, indent=2))
        return 0
    print(record.summary())
    if record.outcome in {T.NEW, T.REUSED}:
        print(f"output.txt: {record.output_url or record.url}")
    if not config.tracking_server() and not (running_service() or {}).get("serves_ui"):
        print("the links open in the MLflow UI that `textgen serve` or `textgen ui` serves")
    return 0


@app.command()
def history(
    repo: Repo = None,
    limit: Annotated[int, typer.Option(min=1, help="Most recent runs to show.")] = 20,
    all_: Annotated[
        bool, typer.Option("--all", help="Show every run, not the latest page.")
    ] = False,
    since: Annotated[
        str | None, typer.Option(help="Runs started since a date (2026-11-01) or an age (3d, 12h).")
    ] = None,
    commit: Annotated[
        str | None, typer.Option(help="Runs of commits starting with this SHA.")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Runs whose model contains this text (or a LIKE pattern with %)."),
    ] = None,
    plot: Annotated[
        str | None,
        typer.Option(
            metavar="FILE",
            help="Also write a chart of quality and speed across versions (self-contained SVG).",
        ),
    ] = None,
    json_: Json = False,
) -> int:
    """List the runs and output versions of a repository."""
    from deployments.reports.charts import history_chart
    from deployments.reports.history import history_rows
    from deployments.reports.tables import render_rows
    from tasks.bounded import shorten

    where = location(repo).url
    # One run past the page says whether there are more; only what is shown is read.
    rows = history_rows(where, None if all_ else limit + 1, since, commit, model)
    more = not all_ and len(rows) > limit
    rows = rows[:limit] if more else rows
    if plot:
        Path(plot).write_text(history_chart(where), encoding="utf-8")
        print(f"wrote {plot}", file=sys.stderr)
    if json_:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no runs yet")
        return 0
    gates = any(row["gates"] for row in rows)  # a column only for repositories with gates
    shown = [
        {k: v for k, v in row.items() if gates or k != "gates"}
        | {"reason": shorten(row["reason"], 72, one_line=True)}
        for row in rows
    ]
    print(render_rows(shown))
    if more:
        print(f"the latest {limit} runs; --limit N or --all for more", file=sys.stderr)
    return 0


@app.command()
def compare(
    a: Annotated[str, typer.Argument(help="A version (3, v3), a commit SHA or an MLflow run id.")],
    b: Annotated[str, typer.Argument(help="The other one.")],
    repo: Repo = None,
    html: Annotated[
        str | None,
        typer.Option(metavar="FILE", help="Also write the report as a self-contained page."),
    ] = None,
    no_color: Annotated[
        bool, typer.Option("--no-color", help="Mark changes without colours.")
    ] = False,
    markdown: Annotated[
        bool,
        typer.Option(
            "--markdown", help="Print the report as Markdown (what a pull request comment shows)."
        ),
    ] = False,
    all_: Annotated[
        bool,
        typer.Option("--all", help="For evaluation sets: the texts of unchanged prompts too."),
    ] = False,
    json_: Json = False,
) -> int:
    """Compare two versions (or a pull request's preview run): settings, commits, metrics
    and texts side by side; for evaluation sets, per cell and prompt."""
    from deployments.reports.compare import compare as compare_versions
    from deployments.reports.compare_views import render_html, render_markdown, render_text

    comparison = compare_versions(location(repo).url, a, b, chart=bool(html), show_all=all_)
    if html:
        Path(html).write_text(render_html(comparison), encoding="utf-8")
        print(f"wrote {html}", file=sys.stderr)
    if json_:
        print(json.dumps(comparison.as_dict(), indent=2))
    elif markdown:
        sys.stdout.write(render_markdown(comparison))
    else:
        sys.stdout.write(render_text(comparison, color=sys.stdout.isatty() and not no_color))
    return 0
