"""Polling instead of fixed sleeps: tests wait for a condition, with a deadline and a reason.

`wait_until` blocks (threads, subprocesses, netns worlds); `wait_for` is its asyncio
twin, which yields to the loop between looks so the code under test keeps running.
Both measure real time; a test on the virtual clock (tests/virtual_clock.py) uses that
module's `advance_until` instead, whose deadline is in virtual seconds.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """A condition did not become true in time (an AssertionError so pytest shows it plainly)."""


def _timed_out(what: str, timeout: float, last: object) -> WaitTimeout:
    return WaitTimeout(f"timed out after {timeout:.1f}s waiting for {what} (last: {last!r})")


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
            raise _timed_out(what, timeout, last)
        time.sleep(interval)


async def wait_for(
    predicate: Callable[[], T | None] | Callable[[], Awaitable[T | None]],
    what: str,
    timeout: float = 10.0,
    interval: float = 0.02,
) -> T:
    """The asyncio `wait_until`: the first truthy value of `predicate`, polled every
    `interval` seconds of real time while the loop runs everything else.

    `predicate` may be a plain function or a coroutine function (a probe that itself
    awaits, such as a status query). An exception from it counts as "not yet" and is
    shown in the WaitTimeout if the deadline passes, as in `wait_until`.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
        except Exception as exc:  # a predicate may fail until the thing it probes exists
            last = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, last)
        await asyncio.sleep(interval)
