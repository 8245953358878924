"""The project's exceptions and their exit codes (`exit_code`): each message is written for the
person reading it, and each code means one thing: 1 any other failure the user can act on,
2 settings (or the command line), 3 repository, 4 model, 5 MLflow store, 6 service, 7 git hook,
8 run deadline, 9 `textgen status --wait` gave up.
"""

from __future__ import annotations


class TextgenError(Exception):
    """Base class: a failure the user can act on. `exit_code` is what the command exits with."""

    exit_code = 1


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
