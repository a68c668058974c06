"""Freshness of authentic negotiation messages: stale and replayed ones are refused.

Keybase redelivers history on every reconnect and a team member can repost old bodies,
so an opened box proves who wrote a message, not that it is new. A message is used
only if:

- its timestamp is within `window_s` of our clock (either way: that also absorbs
  clock skew between devices, which eats into the window);
- it is from the sender's current agent run: the sender session (`fs`) first seen
  latest wins, and a run once replaced is never accepted again;
- its negotiation session was not `supersede`d;
- its message id (`n`) was not seen from that sender within the window.

Memory is bounded: ids leave after the window (an older message fails the timestamp
check anyway), and past `max_nonces` per sender the oldest are dropped while
raising a floor below which that sender's messages count as stale, so dropping never
opens a replay hole. Senders are authenticated peers.json devices, so their number is
the team's size.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kbwg.negotiation.wire import WireError, WireMessage

log = logging.getLogger(__name__)

DEFAULT_WINDOW_S = 120.0


class Replayed(WireError):
    pass


class Stale(WireError):
    pass


@dataclass
class _Sender:
    session: bytes | None = None
    # Earliest timestamp seen in `session`: a run starting before it is an older run.
    session_start: float = math.inf
    retired: dict[bytes, None] = field(default_factory=dict)  # ordered set
    superseded: dict[bytes, None] = field(default_factory=dict)
    seen: set[bytes] = field(default_factory=set)
    by_time: list[tuple[float, bytes]] = field(default_factory=list)  # heap over `seen`
    floor: float = -math.inf


def _remember(ordered: dict[bytes, None], key: bytes, cap: int) -> None:
    ordered[key] = None
    while len(ordered) > cap:
        del ordered[next(iter(ordered))]


class ReplayGuard:
    def __init__(self, window_s: float = DEFAULT_WINDOW_S,
                 clock: Callable[[], float] = time.time, *, max_nonces: int = 1024,
                 max_retired: int = 16, max_superseded: int = 64) -> None:
        self.window_s = window_s
        self._clock = clock
        self._max_nonces = max_nonces
        self._max_retired = max_retired
        self._max_superseded = max_superseded
        self._senders: dict[str, _Sender] = {}

    def check(self, msg: WireMessage) -> bool:
        """Raise Stale or Replayed, or record `msg` as seen; whether it is the first of a
        new run of a sender heard from before (its agent started again)."""
        now = self._clock()
        self._prune(now)
        age = now - msg.timestamp
        if age > self.window_s:
            raise Stale(f"sent {age:.0f}s ago, beyond the {self.window_s:.0f}s window")
        if -age > self.window_s:
            raise Stale(f"timestamped {-age:.0f}s in the future")
        state = self._senders.setdefault(msg.sender, _Sender())
        new_run = msg.sender_session != state.session
        if new_run and state.session is not None and (
                msg.sender_session in state.retired or msg.timestamp < state.session_start):
            raise Stale("from an earlier run of the sender's agent")
        if msg.session_id in state.superseded:
            raise Stale(f"negotiation session {msg.session_id.hex()} was superseded")
        if msg.timestamp <= state.floor:
            raise Stale("older than the replay memory of a busy sender")
        if msg.nonce in state.seen:
            raise Replayed(f"message id {msg.nonce.hex()} already seen")

        restarted = new_run and state.session is not None
        if new_run:
            if state.session is not None:
                log.info("%s started a new agent run", msg.sender)
                _remember(state.retired, state.session, self._max_retired)
            state.session, state.session_start = msg.sender_session, msg.timestamp
        else:
            state.session_start = min(state.session_start, msg.timestamp)
        state.seen.add(msg.nonce)
        heapq.heappush(state.by_time, (msg.timestamp, msg.nonce))
        while len(state.seen) > self._max_nonces:
            ts, nonce = heapq.heappop(state.by_time)
            state.seen.discard(nonce)
            state.floor = max(state.floor, ts)
        return restarted

    def supersede(self, sender: str, session_id: bytes) -> None:
        """Refuse `sender`'s further messages in negotiation session `session_id`."""
        state = self._senders.setdefault(sender, _Sender())
        _remember(state.superseded, session_id, self._max_superseded)

    def remembered(self) -> int:
        """How many message ids are held, over all senders."""
        return sum(len(state.seen) for state in self._senders.values())

    def _prune(self, now: float) -> None:
        cutoff = now - self.window_s
        for state in self._senders.values():
            while state.by_time and state.by_time[0][0] < cutoff:
                state.seen.discard(heapq.heappop(state.by_time)[1])
