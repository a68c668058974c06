"""Token buckets: `rate` events per second with bursts of `burst`, the one rate limiter
the owner's shared port and the relay's unauthenticated answers both use."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """Refilled from `clock` (or from the `now` a caller that already read the clock
    passes in: per-packet paths read it once per batch)."""

    __slots__ = ("_clock", "_tokens", "burst", "last", "rate")

    def __init__(self, rate: float, burst: float,
                 clock: Callable[[], float] = time.monotonic, now: float | None = None) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens = float(burst)
        self.last = clock() if now is None else now

    def take(self, now: float | None = None, cost: float = 1.0) -> bool:
        """Spend `cost` tokens if there are that many; False (nothing spent) if not."""
        if now is None:
            now = self._clock()
        elapsed = now - self.last
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self.last = now
        if self._tokens < cost:
            return False
        self._tokens -= cost
        return True
