"""Errors that end a data_prep command with a clear message and exit code 2 (bad input or flags:
rerunning unchanged will fail the same way, so batch scripts must not requeue)."""

from __future__ import annotations

EXIT_BAD_INPUT = 2


class DataPrepError(Exception):
    """A problem with the input, the flags or the output location; the message names the culprit."""

    exit_code = EXIT_BAD_INPUT


class TooManyBadInputs(DataPrepError):
    """More inputs could not be decoded than --max-bad-fraction allows."""
