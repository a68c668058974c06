"""Timer tests on a virtual clock (looptime): the loop's time() only moves when nothing is
ready to run, and then straight to the next timer.

A module opts in with `pytestmark = VIRTUAL_CLOCK`. Its tests then see exact times
(a 2 s timeout fires at exactly +2 s, however loaded the machine is) and take
milliseconds of real time for seconds of loop time. Only code that times itself with
`loop.time()`, `call_later`/`call_at`, `asyncio.sleep` or `wait_for` is compressed;
`time.monotonic()` and threads keep real time, so tests that need those stay off it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

# end: a bug that keeps a test waiting fails it at 10 virtual minutes (~instantly)
# instead of spinning through virtual time until pytest-timeout.
VIRTUAL_CLOCK = pytest.mark.looptime(end=600.0)
# For a test in a VIRTUAL_CLOCK module that waits on real sockets or threads.
REAL_CLOCK = pytest.mark.looptime(False)

POLL = 0.001  # virtual seconds between looks at a condition: free, and 1 ms exact


def now() -> float:
    return asyncio.get_running_loop().time()


async def advance_until(predicate: Callable[[], object], timeout: float = 3.0,
                        what: str = "condition") -> float:
    """Let virtual time run until `predicate` holds; the virtual seconds it took (to
    within POLL).

    Only for tests on VIRTUAL_CLOCK: `timeout` is in virtual seconds and the result is a
    measurement of the code's timers. Tests on real time use kbwg_testing's `wait_for`
    (async) or `wait_until` (blocking), whose deadlines are wall-clock.

    Polling is the waiting here, not a guess at how long something takes: the clock only
    moves while the code under test is idle, so no step is ever skipped or raced.
    """
    start = now()
    while not predicate():
        if now() - start > timeout:
            raise AssertionError(f"{what} not met within {timeout}s (virtual)")
        await asyncio.sleep(POLL)
    return now() - start
