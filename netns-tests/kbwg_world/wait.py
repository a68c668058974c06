"""Polling instead of fixed sleeps: tests wait for a condition, with a deadline and a reason."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """A condition did not become true in time (an AssertionError so pytest shows it plainly)."""


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Call `predicate` until it returns something truthy, and return that value.

    A predicate returning `X | None` gives an `X` (a value that is not None once truthy).

    Raises WaitTimeout naming `what`, the timeout and the last value or exception seen, so
    a failed wait explains itself.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
        except Exception as exc:  # a predicate may fail until the thing it probes exists
            last = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:.1f}s waiting for {what} (last: {last!r})")
        time.sleep(interval)
