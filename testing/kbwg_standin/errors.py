"""How the stand-in fails: exit codes, the three kinds of error the real CLI has, and the
usage helpers that raise them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NoReturn

EXIT_OK = 0
# The real CLI exits with ExitCode_NOTOK (2) on any error it prints.
EXIT_NOTOK = 2


class RequestError(Exception):
    """A request the real CLI rejects in its decode loop: printed to stderr, exit 2."""


class ServiceError(Exception):
    """An error the service returns: `{"error": {"code": 0, "message": ...}}`, pipe lives on.
    `data` is the error's `data` (a rate limit's RateLimit), omitted when None."""

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.data = data


class UsageError(Exception):
    """Any other command failure: message on stderr, exit 2."""


def die(message: str) -> NoReturn:
    raise UsageError(message)


def next_arg(it: Iterator[str], flag: str) -> str:
    """The value of a flag that takes one, from the rest of the command line."""
    try:
        return next(it)
    except StopIteration:
        die(f"flag {flag} needs an argument")
