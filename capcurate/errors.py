"""User-facing errors: one line naming what was expected and what was found.

The CLI prints these without a traceback and exits with the code each class carries; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class CapcurateError(Exception):
    """A problem with the user's input or environment, reported as one line."""

    exit_code = 2


class InputError(CapcurateError):
    """Bad input: a missing column, an empty file, a malformed option."""

    exit_code = 2


class DatasetError(CapcurateError):
    """The dataset directory is missing, foreign, or in a state the stage cannot work on."""

    exit_code = 2


class OutputExistsError(CapcurateError):
    """An output that exists (with other parameters) would be overwritten without --overwrite/--force."""

    exit_code = 3


class ModelLoadError(CapcurateError):
    """A model reference could not be resolved or loaded (offline, not found, unknown architecture)."""

    exit_code = 4


class StageFailed(CapcurateError):
    """A stage ran but could not finish its work (e.g. every shard failed)."""

    exit_code = 1
