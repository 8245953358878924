"""The project's exceptions: each message is written for the person reading it."""

from __future__ import annotations


class TextgenError(Exception):
    """Base class: a failure the user can act on. `exit_code` is what the command exits with."""

    exit_code = 1


class SettingsError(TextgenError):
    """A settings file, override or operator limit is invalid."""

    exit_code = 2


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


class RunTimeoutError(TextgenError, TimeoutError):
    """A run went past its deadline (`TEXTGEN_RUN_TIMEOUT`)."""

    exit_code = 8
