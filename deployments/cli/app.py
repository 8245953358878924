"""The `textgen` application (typer, as Prefect's own CLI was): the command groups, the options
several commands share (declared once, as annotated types), and the edge where what a user
typed becomes typed values.

Heavy libraries (torch, transformers, mlflow, prefect) are imported inside the commands that
need them, so `textgen --help`, completion and `textgen offline-model` (once converted) start
fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml

from tasks import config
from tasks.errors import SettingsError

if TYPE_CHECKING:
    from tasks.repo import RepoLocation

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

Repo = Annotated[
    str | None,
    typer.Option("--repo", help="URL or local path of the repository (default: this checkout)."),
]
Branch = Annotated[str, typer.Option("--branch", help="Branch to run, or whose pushes run.")]
Json = Annotated[bool, typer.Option("--json", help="Print it as JSON, for scripts.")]
Links = Annotated[
    str | None,
    typer.Option(
        "--links", help=f"The links file (default: ${config.LINKS.name} or the data folder)."
    ),
]
NotifyUrl = Annotated[
    str | None,
    typer.Option(
        "--notify-url", help="Webhook URL notified of failed and crashed runs (a Prefect block)."
    ),
]
SecretFile = Annotated[
    str | None,
    typer.Option(
        "--secret-file",
        help=f"File holding the webhook secret (default: ${config.WEBHOOK_SECRET.name}).",
    ),
]


def verbose(ctx: typer.Context) -> bool:
    """Whether `-v` was given (kept by the callback in the root context)."""
    return bool((ctx.find_root().obj or {}).get("verbose"))


def version() -> str:
    """This package's version, and the stack's."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as of_package

    def of(name: str) -> str:
        try:
            return of_package(name)
        except PackageNotFoundError:
            return "not installed"

    stack = ", ".join(f"{n} {of(n)}" for n in ("prefect", "mlflow", "transformers", "torch"))
    return f"{of('nlp-text-generation')} ({stack})"


def _print_version(value: bool) -> None:
    if value:
        print(f"textgen {version()}")
        raise typer.Exit()


@app.callback()
def _options(
    ctx: typer.Context,
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
    ctx.obj = {"verbose": verbose}
    # A bad TEXTGEN_* value fails here, naming it, before anything runs; not while completing a
    # command line, showing help, or listing the settings (where it is shown as invalid).
    helping = any(arg in ("-h", "--help") for arg in ctx.args)
    if not (ctx.resilient_parsing or helping or ctx.invoked_subcommand == "config"):
        config.check()
    from deployments.cli.console import configure

    configure(verbose)


# ---------------------------------------------------------------------------------------------
# The edge: what was typed, parsed once into the values the commands pass on.


def location(value: str | None) -> RepoLocation:
    """`--repo`, or this checkout (or the operator's default) when it is not given."""
    from tasks.repo import RepoLocation

    return RepoLocation.parse(value if value else config.default_repo())


def typed_credentials(repo: RepoLocation) -> dict[str, str]:
    """Credentials typed in a `--repo` URL, as the setting git commands read (unless the
    environment names its own): a run's override, or a service's runs' environment."""
    if repo.secret and not config.GIT_CREDENTIALS.is_set():
        return {config.GIT_CREDENTIALS.name: repo.secret}
    return {}


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
