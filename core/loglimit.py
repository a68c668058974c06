"""Log lines that anyone who can open a connection or send a packet can cause.

One line per refused or misbehaving sender is what an operator wants to see, but a
sender that repeats itself (a connection loop, a flood of garbage) would write the log
as fast as it can send: a disk filled, the lines that matter scrolled away. `LimitedLog`
lets a burst through, then a steady trickle, and says how many lines it left out in the
next line it writes; the counters the caller keeps still count every event.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kbwg.core.ratelimit import TokenBucket

LINES_PER_SECOND = 1.0
BURST = 20


class LimitedLog:
    """At most `burst` lines at once, then `rate` per second, into `logger`.

    Debug lines pass unlimited and spend nothing: they are written only when the
    operator asked for them, and the everyday ones (other pairs' traffic, messages
    read again) must not crowd out the warnings that share the budget."""

    def __init__(self, logger: logging.Logger, rate: float = LINES_PER_SECOND,
                 burst: float = BURST, clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._bucket = TokenBucket(rate, burst, clock)
        self.left_out = 0  # since the last line written

    def log(self, level: int, msg: str, *args: object, exc_info: bool = False) -> None:
        """`exc_info`: with the traceback of the exception being handled, as
        `Logger.exception` does (a line left out leaves its traceback out too)."""
        if not self._logger.isEnabledFor(level):
            return
        if level < logging.INFO:
            self._logger.log(level, msg, *args, exc_info=exc_info, stacklevel=2)
            return
        if not self._bucket.take():
            self.left_out += 1
            return
        if self.left_out:
            msg = f"{msg} (%d lines before it left out: too many at once)"
            args = (*args, self.left_out)
            self.left_out = 0
        # stacklevel: the record names the line that called us, not this one.
        self._logger.log(level, msg, *args, exc_info=exc_info, stacklevel=2)
