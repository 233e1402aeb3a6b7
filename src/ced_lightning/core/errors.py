"""The errors the project raises on purpose: bad config values, unusable inputs, missing files, outputs that
are in the way, locks held by another run, damaged stores, checkpoints that do not load, failed checks.

Every command catches `CedError` alone and prints its message as one line with the exit status
`exit_code` (`launch.command_errors`, `cli.predict_main`); anything else is a bug and keeps its traceback.
A new error derives from `CedError` and from the built-in exception that callers already catch, so that
`except ValueError` around a call keeps working::

    class DamagedChunkError(CedError, OSError):
        '''A chunk file of a store is missing or fails its checksum.'''

`ConfigError` (exit 2) is a config key or command-line argument with a value the command cannot use;
the others exit 1. Messages name the file, field or config key and say what to do; they may span lines
(the command joins them into one). Nothing here imports the rest of the project.
"""

from __future__ import annotations


class CedError(Exception):
    """Base of every error raised on purpose: a command prints its message in one line and exits with
    `exit_code`, without a traceback (HYDRA_FULL_ERROR=1 shows it)."""

    exit_code: int = 1


class ConfigError(CedError, ValueError):
    """A config key or argument has a value the command cannot use (wrong type, out of range, missing)."""

    exit_code = 2


class InputError(CedError, ValueError):
    """An input's content cannot be used: a file list, a store, class lists that disagree."""


class MissingInputError(CedError, FileNotFoundError):
    """A file, folder or store the command reads does not exist."""


class OutputExistsError(CedError, FileExistsError):
    """Something that the command did not write is where its output goes."""


class MissingDependencyError(CedError, ImportError):
    """An optional package the command needs is not installed (the message says what to install)."""


class CheckFailedError(CedError, RuntimeError):
    """A check of finished work failed (a store still incomplete after its writer ended)."""
