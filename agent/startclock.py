"""Seconds since this process started, for start-up milestones in the log.

Issue 13's goals are measured from the moment `join`'s process starts, which includes
the interpreter and imports that no timer inside the program sees. The kernel records
the start (field 22 of /proc/self/stat, clock ticks since boot); CLOCK_BOOTTIME is the
same clock, so their difference is the process's age. Without /proc the age is counted
from this module's import instead (an under-estimate, said in the log line).

`milestone(log, what)` logs `start-up +1.234s (cpu 0.567s): what` at debug;
bench/startup.py reads these lines (and a few others) back into a per-step breakdown.
"""

from __future__ import annotations

import logging
import os
import time

_IMPORTED_AT = time.monotonic()
# Field 22 of /proc/PID/stat; the split below starts at field 3 (after "pid (comm) ").
_STARTTIME_INDEX = 22 - 3


def process_age(stat_path: str = "/proc/self/stat") -> float | None:
    """Seconds since the process started, from the kernel's record; None without one."""
    try:
        with open(stat_path, "rb") as stat:
            text = stat.read()
        # The command name (field 2) may hold spaces and parentheses; it ends at the last ")".
        fields = text[text.rindex(b")") + 2:].split()
        ticks = int(fields[_STARTTIME_INDEX])
        started = ticks / os.sysconf("SC_CLK_TCK")
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError):
        return None


def since_start() -> float:
    """The process's age, or the time since this module was imported when it is unknown."""
    age = process_age()
    return age if age is not None else time.monotonic() - _IMPORTED_AT


def milestone(log: logging.Logger, what: str) -> None:
    """`start-up +AGE (cpu CPU): what`: CPU is this process's own (all its threads): on
    a busy machine the gap between the two is time spent waiting for a core."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("start-up +%.3fs (cpu %.3fs): %s", since_start(), time.process_time(), what)
