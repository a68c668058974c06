"""Whether Keybase answers: the agent's view of its link to the local Keybase service,
and the backoff used to try again.

When the service stops or restarts, `chat api-listen` and the `chat api` pipe die and
every CLI call fails. The link says so once in the log when it goes (with the reason)
and once when it is back (with how long it was away), counts reconnections, and wakes
whoever waits to catch up. `status --json` shows it under `keybase`.

A chat rate-limit error (the service's ChatRateLimitError: its RateLimit, with
`windowReset` in seconds, in the error's `data`) holds further calls until the window
resets, said once per episode too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 30.0
# Each delay is drawn from [(1 - JITTER) * d, d]: agents that lost the same service at
# the same moment do not all come back in step.
JITTER = 0.2


def _now() -> float:
    """Monotonic seconds, from the running loop when there is one (so virtual clocks in
    tests measure it too)."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


@dataclass
class Backoff:
    """1 s doubling to 30 s, jittered downwards; `reset` after a success."""

    initial: float = BACKOFF_INITIAL_S
    maximum: float = BACKOFF_MAX_S
    jitter: float = JITTER
    rng: random.Random = field(default_factory=random.Random)
    _nominal: float | None = None

    def next(self) -> float:
        nominal = self.initial if self._nominal is None else min(self._nominal * 2,
                                                                 self.maximum)
        self._nominal = nominal
        return nominal * (1.0 - self.jitter * self.rng.random())

    def reset(self) -> None:
        self._nominal = None


@dataclass
class KeybaseLink:
    connected: bool = True
    down_since: float | None = None  # Unix time, for status
    reconnects: int = 0
    last_error: str | None = None
    rate_limited_until: float | None = None  # Unix time, for status
    rate_limits: int = 0
    # Set by `join` until it has joined: then there are no tunnels to keep and nothing
    # to catch up with, and a wait is start-up's, not a reconnection.
    joining: bool = False
    _down_at: float | None = None  # monotonic
    _hold_until: float = 0.0  # monotonic
    _back: asyncio.Event | None = None
    _answered: asyncio.Event | None = None

    def lost(self, why: str) -> None:
        """A call or the listener found Keybase away: said once until it is back."""
        self.last_error = why
        if not self.connected:
            log.debug("Keybase still unreachable: %s", why)
            return
        self.connected = False
        self.down_since = time.time()
        self._down_at = _now()
        if self._answered is not None:
            self._answered.clear()
        if self.joining:
            log.warning("Keybase is not answering (%s)", why)
            return
        log.warning("Keybase is unreachable (%s); every tunnel stays up, reconnecting with "
                    "backoff (%.0fs to %.0fs); history is read again once it is back",
                    why, BACKOFF_INITIAL_S, BACKOFF_MAX_S)

    def ok(self) -> None:
        """Keybase answered."""
        if self.connected:
            return
        away = _now() - (self._down_at if self._down_at is not None else _now())
        self.connected = True
        self.down_since = self._down_at = None
        if self._answered is not None:
            self._answered.set()
        if self.joining:
            log.warning("Keybase answers after %.0fs; joining", away)
            return
        self.reconnects += 1
        log.warning("Keybase is back after %.0fs; catching up (history, peers.json, "
                    "kbwg.json)", away)
        if self._back is not None:
            self._back.set()

    async def until_back(self, timeout: float) -> None:
        """Sleep up to `timeout`: less if Keybase answers a call meanwhile (at once when
        it already does), so a retry waiting out a backoff goes when the service is back."""
        if self.connected:
            return
        if self._answered is None:
            self._answered = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._answered.wait(), timeout)

    async def wait_back(self) -> None:
        """Return at the next reconnection (one that happened since the last return too)."""
        if self._back is None:
            self._back = asyncio.Event()
        await self._back.wait()
        self._back.clear()

    # ----- rate limits

    def rate_limited(self, data: Any, backoff: Backoff) -> float:
        """A rate-limit error: how long to hold calls (the window's reset when the
        service says, else the backoff's next delay)."""
        reset = data.get("windowReset") if isinstance(data, dict) else None
        if isinstance(reset, (int, float)) and not isinstance(reset, bool) and reset > 0:
            delay = min(float(reset), backoff.maximum * 4)
        else:
            delay = backoff.next()
        self._hold_until = max(self._hold_until, _now() + delay)
        if self.rate_limited_until is None:
            tank = data.get("name") if isinstance(data, dict) else None
            log.warning("Keybase rate limit reached%s; holding chat calls for %.0fs",
                        f" (tank {tank})" if tank else "", delay)
            self.rate_limits += 1
        self.rate_limited_until = time.time() + delay
        return delay

    def rate_ok(self) -> None:
        if self.rate_limited_until is not None:
            self.rate_limited_until = None
            log.info("Keybase rate limit over; chat calls go through again")

    async def wait_rate(self) -> None:
        """Hold a call while a rate limit is in force."""
        while (left := self._hold_until - _now()) > 0:
            await asyncio.sleep(left)

    def to_json(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "down_since": self.down_since,
            "reconnects": self.reconnects,
            "last_error": self.last_error,
            "rate_limited_until": self.rate_limited_until,
            "rate_limits": self.rate_limits,
        }
