"""The periodic work of one peer checker: consent, keepalives and re-probes.

- Consent (RFC 7675): a single-shot liveness check of the selected pair every few
  RTTs of it (`CheckTimers.consent_interval_for`: 0.25 s on a LAN, at most
  `consent_interval`), urgent, so that a dead path is noticed within about a second.
  The same checks keep our NAT's mapping towards the peer open: a NAT that forgot it
  while only the peer sends is repaired by the next one.
- Keepalives: a liveness check of every other valid pair every `keepalive_interval`,
  in the background, so that the alternatives and their RTTs stay known.
- Re-probes: a failed pair is checked again after `reprobe_min`, the wait doubling on
  every failure up to `reprobe_max` (`reprobe_idle_max` while idle); one timer serves
  the pair due first.

Consent and keepalives go at those paces only while the path is active: for
`active_window` after a pair was selected and after the agent last saw traffic on it
(`note_traffic`, from WireGuard's byte counters, receiving or sending). An idle path is
checked every `consent_idle_interval` (15 s; WireGuard's keepalives hold the NAT's
mapping) and its alternatives every `keepalive_idle_interval`: RTT-paced checks of idle
peers were most of an idle host's CPU. Traffic on an idle path sends a consent check at
once (a path that died while idle is noticed about a second after traffic starts, and
the check reopens our NAT's mapping) and brings back the RTT pace; a missed check
brings it back too, until an answer, so a path lost while idle fails about a second
after its first miss.

Consent and keepalive intervals are jittered by +-`jitter` (RFC 7675 section 5.1), so
that peers started together do not send in step. What a missed answer means is the
checker's business: this only queues the checks (`CheckTransactions.enqueue`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable

from kbwg.negotiation.candidate_pairs import CandidatePair
from kbwg.negotiation.check_config import CheckTimers
from kbwg.negotiation.check_transactions import CheckTransactions
from kbwg.negotiation.pair_table import PairTable

SelectedFn = Callable[[], CandidatePair | None]

log = logging.getLogger(__name__)


class CheckLiveness:
    """Queues consent checks, keepalives and re-probes as they fall due.

    `selected()` is the checker's current pair (consent goes to it, keepalives to the
    others). Consent starts with `start_consent`, keepalives with `start_keepalives`;
    each keeps rescheduling itself until `close`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timers: CheckTimers,
                 table: PairTable, transactions: CheckTransactions,
                 selected: SelectedFn, name: str = "peer") -> None:
        self._loop = loop
        self._name = name
        self._timers = timers
        self._table = table
        self._tx = transactions
        self._selected = selected
        self._closed = False
        self._consent: asyncio.TimerHandle | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._probe: asyncio.TimerHandle | None = None
        self._probe_due: float | None = None
        self._active_until = -math.inf  # loop time

    @property
    def active(self) -> bool:
        return self._loop.time() < self._active_until

    def path_selected(self) -> None:
        """A pair was just selected: active for a window (fresh NAT state, and traffic
        usually follows), consent at its RTT pace from now."""
        self._active_until = self._loop.time() + self._timers.active_window
        self._speed_up(check_now=False)

    def note_traffic(self) -> None:
        """Traffic flows on the path: active for a window more. An idle path is checked
        at once rather than at its next idle tick."""
        was = self.active
        self._active_until = self._loop.time() + self._timers.active_window
        if not was and not self._closed:
            log.debug("%s: traffic: consent at RTT pace, checking now", self._name)
            self._speed_up(check_now=True)

    def missed(self) -> None:
        """The selected pair missed a consent check: the next one goes at once (a
        timeout longer than the interval would otherwise skip a tick), then at the RTT
        pace until an answer, idle or not (start_consent sees the misses)."""
        self._speed_up(check_now=True)

    def _speed_up(self, check_now: bool) -> None:
        if self._closed:
            return
        pair = self._selected()
        if self._consent is not None:
            self._consent.cancel()
            self._consent = None
        if check_now and pair is not None and "live" not in pair.in_flight:
            self._tx.enqueue(pair, "live", urgent=True)
        # Re-probes spaced for an idle path come within the active cap again.
        latest = self._loop.time() + self._timers.reprobe_max
        for failed in self._table.pairs:
            if failed.probe_at is not None and failed.probe_at > latest:
                failed.probe_at = latest
            failed.probe_delay = min(failed.probe_delay, self._timers.reprobe_max)
        self._schedule_probe()
        if pair is not None:
            self.start_consent()
        keepalive = self._keepalive
        if keepalive is not None and (keepalive.when() - self._loop.time()
                                      > self._timers.keepalive_interval):
            keepalive.cancel()
            self._keepalive = None
            self.start_keepalives()

    def close(self) -> None:
        self._closed = True
        for handle in (self._consent, self._keepalive, self._probe):
            if handle is not None:
                handle.cancel()
        self._consent = self._keepalive = self._probe = None

    def start_consent(self) -> None:
        """Consent checks of the selected pair, until none is selected."""
        if self._consent is None and not self._closed:
            pair = self._selected()
            interval = self._timers.consent_interval_for(pair.rtt_ms if pair else None)
            if not self.active and (pair is None or pair.misses == 0):
                interval = max(interval, self._timers.consent_idle_interval)
            self._consent = self._loop.call_later(self._jittered(interval), self._consent_tick)

    def start_keepalives(self) -> None:
        if self._keepalive is None and not self._closed:
            interval = (self._timers.keepalive_interval if self.active
                        else self._timers.keepalive_idle_interval)
            self._keepalive = self._loop.call_later(self._jittered(interval),
                                                    self._keepalive_tick)

    def reprobe_later(self, pair: CandidatePair) -> None:
        """`pair` just failed: check it again after its backoff, and double that."""
        pair.probe_at = self._loop.time() + pair.probe_delay
        cap = self._timers.reprobe_max if self.active else self._timers.reprobe_idle_max
        pair.probe_delay = min(pair.probe_delay * 2, cap)
        self._schedule_probe()

    def _jittered(self, interval: float) -> float:
        jitter = self._timers.jitter
        return interval * (1 + random.uniform(-jitter, jitter))

    def _consent_tick(self) -> None:
        self._consent = None
        pair = self._selected()
        if pair is None or self._closed:
            return
        if "live" not in pair.in_flight:
            self._tx.enqueue(pair, "live", urgent=True)
        self.start_consent()

    def _keepalive_tick(self) -> None:
        self._keepalive = None
        selected = self._selected()
        for pair in self._table.pairs:
            if pair.state == "succeeded" and pair is not selected and not pair.in_flight:
                self._tx.enqueue(pair, "live", urgent=False)
        self.start_keepalives()

    def _schedule_probe(self) -> None:
        due = [p.probe_at for p in self._table.pairs if p.state == "failed" and p.probe_at]
        if not due or self._closed:
            return
        when = min(due)
        if self._probe is not None and self._probe_due is not None and self._probe_due <= when:
            return
        if self._probe is not None:
            self._probe.cancel()
        self._probe_due = when
        self._probe = self._loop.call_at(when, self._probe_tick)

    def _probe_tick(self) -> None:
        self._probe = None
        self._probe_due = None
        now = self._loop.time()
        for pair in self._table.pairs:
            if pair.state == "failed" and pair.probe_at is not None and pair.probe_at <= now:
                pair.probe_at = None
                self._tx.enqueue(pair, "check", urgent=False)
        self._schedule_probe()
