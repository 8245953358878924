"""The `textgen` command: one module per command group, one error-and-exit handler (`main`).

versions.py   run, history, compare
service.py    serve, receive, status, ui
links.py      link add | list | remove
team.py       team apply | up | down
setup.py      hook install, offline-model, config
app.py        the application, the options commands share, the edge where input is parsed
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperGroup

# The command groups register themselves on import, in the order `--help` lists them.
# isort: off
from deployments.cli import versions, service, links, team, setup  # noqa: F401

# isort: on
from deployments.cli.app import app
from tasks import config
from tasks.errors import TextgenError


def parse_command(words: Sequence[str]) -> list[str]:
    """Parse a `textgen` command line without running it (as `compose.yaml` writes them);
    returns the command's path (`["team", "apply"]`). Raises on what `textgen` would refuse."""
    command: Any = typer.main.get_command(app)
    name: str | None = "textgen"
    args, parent = list(words), None
    path: list[str] = []
    while isinstance(command, TyperGroup):
        ctx = typer.Context(command, info_name=name, parent=parent, **command.context_settings)
        # The group's own options, as a command's: what is left names its subcommand (the
        # group's own parsing would set that aside where only the library reads it).
        rest = super(TyperGroup, command).parse_args(ctx, args)
        if not rest:
            ctx.fail("Missing command.")
        name, command, args = command.resolve_command(ctx, rest)
        path.append(str(name))
        parent = ctx
    command.make_context(name, args, parent=parent)
    return path


READ_ONLY = frozenset({"history", "compare", "status", "config", "link"})
"""Commands that read, print and end: no cyclic garbage collection while they run."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `textgen`: the exit status of the command, or of its error."""
    args = list(sys.argv[1:] if argv is None else argv)
    # The stack's imports are some hundred thousand objects and no garbage: the cyclic
    # collector walks them several times while they load and once more as the interpreter
    # exits, a third of a read-only command's time. As the process's own command (not called
    # from Python), those commands run without it, and every command's objects are set aside
    # (frozen) before the process exits.
    own_process = argv is None
    if own_process and READ_ONLY.intersection(arg for arg in args if not arg.startswith("-")):
        gc.disable()
    try:
        return _run(args)
    finally:
        if own_process:
            gc.freeze()
        gc.enable()


def _run(args: list[str]) -> int:
    from deployments.service.record import served_ui

    # A local Prefect server has no network to send usage statistics to.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        # The links a command prints and records open the MLflow UI that serve serves.
        with config.overrides(served_ui()):
            result = app(args=args, prog_name="textgen", standalone_mode=False)
    except TextgenError as exc:
        print(f"textgen: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except typer.Exit as exc:
        return int(getattr(exc, "exit_code", 0))
    except (KeyboardInterrupt, typer.Abort):
        return 130
    except typer.TyperException as exc:  # a usage error: the message and the usage line
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            print(f"textgen: error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    return int(result or 0)
