"""Errors a user can act on: each carries a one-line message and the process exit code."""
from __future__ import annotations


class MedcycleError(Exception):
    """An error reported to the user as one line, ending the command with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(MedcycleError):
    """The command line or configuration is wrong (exit code 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=2)


class InputError(MedcycleError):
    """An input file or folder cannot be used (exit code 1); the message names the file."""
