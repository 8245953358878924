"""The project's exceptions and their exit codes (`exit_code`): each message is written for the
person reading it, and each code means one thing: 1 any other failure the user can act on,
2 settings (or the command line), 3 repository, 4 model, 5 MLflow store, 6 service, 7 git hook,
8 run deadline, 9 `textgen status --wait` gave up.
"""

from __future__ import annotations


class TextgenError(Exception):
    """Base class: a failure the user can act on. `exit_code` is what the command exits with."""

    exit_code = 1

    def __repr__(self) -> str:
        # What logs that format exceptions with %r (Prefect's retry lines) show: one line.
        return f"{type(self).__name__}: {' '.join(str(self).split())}"


class SettingsError(TextgenError):
    """A settings file, override or operator limit is invalid."""

    exit_code = 2


class UsageError(SettingsError):
    """The command line names something that does not exist (a version, commit or run)."""


class RepositoryError(TextgenError):
    """A repository, branch or commit cannot be reached or resolved."""

    exit_code = 3


class TransientRepositoryError(RepositoryError):
    """The remote could not be reached; trying again later may work."""


class ModelError(TextgenError):
    """A model cannot be found, allowed or loaded."""

    exit_code = 4


class TrackingError(TextgenError):
    """The MLflow store cannot be used, or a reference to a version cannot be resolved."""

    exit_code = 5


class NoExperimentError(TrackingError):
    """Nothing has run for the repository yet: it has no MLflow experiment."""


class ServeError(TextgenError):
    """A service (serve, receive, the team, the MLflow UI) cannot start as asked."""

    exit_code = 6


class PortInUseError(ServeError):
    """A port the command must listen on is taken."""


class HookError(TextgenError):
    """A git hook cannot be installed as asked."""

    exit_code = 7


class RunTimeoutError(TextgenError, TimeoutError):
    """A run went past its deadline (the operator's run timeout)."""

    exit_code = 8


class WaitTimeout(TextgenError):
    """`textgen status --wait` gave up."""

    exit_code = 9


EXTRAS = {"psycopg2": "team", "gguf": "gguf", "accelerate": "gguf"}
"""The optional dependencies, and the extra of `nlp-text-generation` that installs each."""


def require(module: str, what: str, error: type[TextgenError] = TextgenError) -> None:
    """Raise `error`, saying in one line what to install, when the optional `module` (one of
    `EXTRAS`) is missing: `what` is what needs it."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise error(
            f"{what} needs the Python package {module}, which is not installed: "
            f"pip install 'nlp-text-generation[{EXTRAS[module]}]'"
        )
