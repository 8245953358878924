"""`textgen serve`, `receive`, `status`, `ui`: the services, and what they are doing."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated, Any

import typer

from deployments.cli.app import Branch, Json, Repo, SecretFile, app, location, typed_credentials
from tasks.errors import ServeError, SettingsError
from tasks.names import DEFAULT_DEPLOYMENT, FLOW_NAME

# The options serve and receive share.
Host = Annotated[str, typer.Option("--host", help="Receiver address.")]
Port = Annotated[int, typer.Option("--port", help="Receiver port.")]
Poll = Annotated[
    float | None,
    typer.Option(
        "--poll",
        metavar="SECONDS",
        help="Also poll the remote every SECONDS, for remotes that send no webhook.",
    ),
]
Insecure = Annotated[
    bool,
    typer.Option(
        "--insecure", help="Accept unsigned deliveries when no secret is set (local use only)."
    ),
]
PrefectPort = Annotated[
    int,
    typer.Option(
        "--prefect-port",
        help="Port of the local Prefect server started when PREFECT_API_URL is unset.",
    ),
]
ServedLinks = Annotated[
    str | None,
    typer.Option(
        "--links",
        help="Serve every repository of this links file (default: the links file in the data "
        "folder, when --repo is not given and it links any).",
    ),
]


def _served(
    repo: str | None,
    branch: str,
    links_file: str | None,
    insecure: bool,
    secret_file: str | None,
    poll_seconds: float | None,
    name: str,
) -> tuple[list[Any], dict[str, float], dict[str, str]]:
    """What serve or receive takes pushes for: the links (`--links`, or the links file when no
    `--repo` is given and it has any), else the one repository of `--repo`. Returns the served
    targets, their poll intervals and their deployment names."""
    from deployments.service.receiver import Served, read_secret
    from tasks.links import links_path, load_links

    links = []
    if links_file or not repo:
        path = links_path(links_file)
        if links_file and not path.exists():
            raise SettingsError(f"--links {links_file}: no such file")
        links = load_links(path)
        if links_file and not links:
            raise SettingsError(f"--links {links_file}: the file links no repository")
    if links:
        unsigned = [link.name for link in links if link.secret is None]
        if unsigned and not insecure:
            raise SettingsError(
                f"link {unsigned[0]!r} has no webhook secret: give it one "
                f"(`textgen link add URL --name {unsigned[0]} --secret env:NAME`), or pass "
                f"--insecure to accept its unsigned deliveries (local use only)"
            )
        poll = {
            link.name: link.poll or (60.0 if link.provider == "poll" else 0.0) for link in links
        }
        return [Served.of(link) for link in links], poll, {link.name: link.name for link in links}
    secret = read_secret(secret_file, insecure)
    where = location(repo)
    os.environ.update(typed_credentials(where))  # for the runs the service starts
    target = Served(where.key, where, branch, secret)
    return [target], {target.name: poll_seconds or 0.0}, {target.name: name}


@app.command()
def status(
    json_: Json = False,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="First wait until serve takes pushes, every push received has been handled "
            "and no run is queued.",
        ),
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits at most.")] = 600,
    env: Annotated[
        bool,
        typer.Option(
            "--env",
            help="Print `export PREFECT_API_URL=...` for the Prefect CLI (eval it in a shell).",
        ),
    ] = False,
) -> int:
    """What serve is doing: pushes, runs queued or running, last versions, with links."""
    from deployments.ops.prefect_server import known_api
    from deployments.service.status import look, render, wait_until_idle

    if env:
        if not (api := known_api()):
            raise SettingsError(
                "no Prefect server of `textgen serve` is running here, and PREFECT_API_URL is "
                "unset: start `textgen serve` first"
            )
        print(f"export PREFECT_API_URL={api}")
        return 0
    found = wait_until_idle(timeout) if wait else look()
    if json_:
        print(json.dumps(found.as_dict(), indent=2))
    else:
        sys.stdout.write(render(found))
    return 0


@app.command()
def ui(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5000,
) -> int:
    """Serve the MLflow UI on the store the runs are recorded in (serve runs one too)."""
    import signal
    import threading

    from deployments.ops.mlflow_ui import MlflowUI
    from tasks.config import tracking_server, tracking_uri

    uri = tracking_uri()
    if tracking_server():
        print(f"runs are recorded on the tracking server {uri}: open it in a browser")
        return 0
    ui = MlflowUI(host, port, option="--port")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ui.start()  # a busy port is an error here, with the reason
    print(f"MLflow UI on {ui.url} for {uri} (its log: {ui.child.log}); Ctrl-C stops it", flush=True)
    try:
        while not stop.wait(1.0) and ui.child.alive():
            pass
    except KeyboardInterrupt:
        pass
    finally:
        exited = ui.child.returncode
        ui.stop()  # the server and every process it started
    if exited is not None:
        raise ServeError(f"the MLflow UI exited ({exited}); see {ui.child.log}:\n{ui.child.tail()}")
    return 0


@app.command()
def serve(
    repo: Repo = None,
    branch: Branch = "main",
    host: Host = "127.0.0.1",
    port: Port = 8787,
    poll: Poll = None,
    secret_file: SecretFile = None,
    insecure: Insecure = False,
    prefect_port: PrefectPort = 4200,
    links: ServedLinks = None,
    name: Annotated[str, typer.Option(help="Deployment name of --repo.")] = DEFAULT_DEPLOYMENT,
    runs: Annotated[int, typer.Option(help="Flow runs at once, across links.")] = 1,
    ui_port: Annotated[
        int,
        typer.Option(
            help="Serve the MLflow UI, where the printed links go, on this port (0: none)."
        ),
    ] = 5000,
) -> int:
    """Serve the on-push deployments, the push receiver and the MLflow UI (until Ctrl-C)."""
    from deployments.service.serve import run_service

    targets, intervals, names = _served(repo, branch, links, insecure, secret_file, poll, name)
    return run_service(targets, host, port, intervals, names, prefect_port, runs, ui_port)


@app.command()
def receive(
    repo: Repo = None,
    branch: Branch = "main",
    host: Host = "127.0.0.1",
    port: Port = 8787,
    poll: Poll = None,
    secret_file: SecretFile = None,
    insecure: Insecure = False,
    prefect_port: PrefectPort = 4200,
    links: ServedLinks = None,
    deployment: Annotated[
        str,
        typer.Option(
            help="With --repo: the deployment whose queued runs newer pushes supersede ('' for "
            "none); with links, each link's deployment is named after it."
        ),
    ] = f"{FLOW_NAME}/{DEFAULT_DEPLOYMENT}",
    reap: Annotated[
        bool,
        typer.Option(
            "--reap", help="End the MLflow runs of crashed flow runs and retry crashed pushes once."
        ),
    ] = False,
) -> int:
    """Run only the push receiver, for deployments served by a work pool's workers."""
    from deployments.service.serve import run_receiver

    served = _served(repo, branch, links, insecure, secret_file, poll, DEFAULT_DEPLOYMENT)
    targets, intervals, names = served
    if len(names) == 1 and targets[0].name == targets[0].repo.key:  # --repo
        wanted_name = deployment.split("/", 1)[-1]
        wanted = {targets[0].name: wanted_name} if wanted_name else {}
    else:
        wanted = names
    return run_receiver(targets, host, port, intervals, wanted, reap, prefect_port)
