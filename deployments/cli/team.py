"""`textgen team apply | up | down`: the team service's Prefect set-up and its processes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from deployments.cli.app import Links, NotifyUrl, team_app
from tasks.errors import SettingsError


@team_app.command("apply")
def team_apply(
    links: Links = None,
    notify_url: NotifyUrl = None,
    pool: Annotated[str, typer.Option(help="Work pool.")] = "textgen",
    zombie_seconds: Annotated[
        float,
        typer.Option(help="Mark a run Crashed when its heartbeats stop for this long."),
    ] = 60,
) -> int:
    """Create the work pool (of warm workers), a deployment per link and the automations."""
    from deployments.orchestration.deployments import apply_links
    from deployments.service.worker import WarmWorker
    from tasks.links import links_path, load_links
    from tasks.store import ui_base_url

    if not os.environ.get("PREFECT_API_URL"):
        raise SettingsError("set PREFECT_API_URL to the team's Prefect server first")
    found = load_links(links_path(links))
    template = WarmWorker.get_default_base_job_template()
    ids = apply_links(
        found, pool, zombie_seconds, notify_url, ui_base_url(), WarmWorker.type, template
    )
    for link in found:
        print(f"deployment {link.name}: {link.url}@{link.branch}", file=sys.stderr)
    print(json.dumps({name: str(value) for name, value in ids.items()}))
    return 0


@team_app.command("up")
def team_up(
    links: Links = None,
    notify_url: NotifyUrl = None,
    home: Annotated[str, typer.Option(help="Folder for data and logs.")] = "team",
    workers: Annotated[int, typer.Option(help="Warm workers.")] = 2,
    port: Annotated[int, typer.Option(help="Receiver port.")] = 8787,
    prefect_port: Annotated[int, typer.Option(help="Prefect server port.")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="MLflow server port.")] = 5000,
    postgres_port: Annotated[int, typer.Option(help="PostgreSQL port.")] = 5432,
) -> int:
    """Start PostgreSQL, Prefect, MLflow, the receiver and workers under supervisord (until
    Ctrl-C)."""
    import signal
    import threading

    from deployments.ops.team import Ports, Team
    from tasks.errors import ServeError, require
    from tasks.links import links_path, load_links

    require("psycopg2", "the team service (PostgreSQL-backed MLflow)", ServeError)
    require("supervisor", "the team service (its processes under supervisord)", ServeError)
    folder = Path(home).expanduser().resolve()
    links_file = links_path(links).resolve()
    if not load_links(links_file):
        raise SettingsError(
            f"no linked repositories in {links_file}: link one first with `textgen link add "
            f"URL --secret env:NAME` (see `textgen link --help`)"
        )
    ports = Ports(postgres=postgres_port, prefect=prefect_port, mlflow=mlflow_port, receiver=port)
    team = Team(folder, links_file, workers=workers, ports=ports, notify_url=notify_url)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    team.start()
    print(f"Prefect UI and API: http://127.0.0.1:{ports.prefect} ({team.prefect_api})")
    print(f"MLflow UI and tracking: {team.mlflow_uri}")
    print(f"Receiver: {team.receiver_url}/webhooks/github (also gitea, gitlab)")
    print(
        f"{workers} worker(s), every process supervised (restarted when it dies); logs in "
        f"{folder / 'logs'}. Ctrl-C stops everything.",
        flush=True,
    )
    code = 0
    try:
        code = _watch(team, stop)
    except KeyboardInterrupt:
        pass
    finally:
        team.stop()
    return code


def _watch(team: Any, stop: Any, seconds: float = 2.0) -> int:
    """Say each change of a process's state (a death, a restart) until `stop`; 1 when the
    supervisor itself is gone."""
    last: dict[str, str] = {}
    while not stop.wait(seconds):
        try:
            states = team.states()
        except OSError as exc:
            print(f"supervisord stopped answering ({exc}): stopping the team", file=sys.stderr)
            return 1
        for name, state in states.items():
            if last and state != last.get(name):
                print(f"{name}: {last.get(name)} -> {state}", file=sys.stderr, flush=True)
        last = states
    return 0


@team_app.command("down")
def team_down(
    home: Annotated[str, typer.Option(help="The folder given to `team up`.")] = "team",
) -> int:
    """Stop a team whose `team up` was killed: every process still alive, whatever died."""
    from deployments.ops.team import stop_recorded

    for name in stop_recorded(Path(home).expanduser().resolve()):
        print(f"stopped {name}")
    return 0
