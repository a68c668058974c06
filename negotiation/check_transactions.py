"""The STUN transactions of one peer checker: paced starts, retransmits, recent ids.

`CheckTransactions` decides when a check leaves and when it is given up; the checker
decides what a check says (`request`) and what an answer or a timeout means.

- Pacing: one new transaction every `CheckTimers.pacing` (Ta), whatever its kind.
  Urgent work goes first (triggered checks, nominations, consent checks), then the
  first Waiting pair in priority order (`next_check`), then background work
  (keepalives, re-probes). A pair has at most one transaction of each kind in flight
  (`CandidatePair.in_flight`): a queued entry whose kind is already in flight is
  dropped when its turn comes, a background liveness check also when anything is.
- Retransmits: checks and nominations are resent after `rto`, doubling up to
  `max_rto`, `max_transmissions` copies in all (RFC 8489 section 6.2.1). Liveness
  checks ("live") are single-shot (RFC 7675): missed after the pair's RTO
  (`CheckTimers.consent_timeout_for`), and the checker counts misses. Either way the
  timeout goes to `on_timeout`.
- Finished transactions are remembered (`RECENT_TRANSACTIONS`): an answer to an
  earlier copy arriving after the transaction ended is ours, not garbage; a late answer
  to a liveness check still tells that pair's RTT (the checker's business).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from aioice import stun

from kbwg.negotiation.candidate_pairs import CandidatePair, TxKind
from kbwg.negotiation.check_config import CheckCounters, CheckTimers, SendFn

# Transaction ids answered lately: a late answer to a retransmit is ours, not garbage.
RECENT_TRANSACTIONS = 128


@dataclass(eq=False)
class Transaction:
    id: bytes
    pair: CandidatePair
    kind: TxKind
    data: bytes
    controlling: bool  # the role claimed in the request (for 487)
    sent_at: list[float] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


RequestFn = Callable[[CandidatePair], stun.Message]
NextCheckFn = Callable[[], CandidatePair | None]
TimeoutFn = Callable[[Transaction], None]


class CheckTransactions:
    """Starts, retransmits and times out the checks of one peer.

    `request(pair)` builds a signed Binding request for the pair; `send` must not raise
    (a lost datagram is left to the retransmit timer); `next_check()` is the next
    Waiting pair to check, if any; `on_timeout(tx)` runs after `tx` was given up.
    Nothing leaves before `activate` (the peer's credentials are needed to sign).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        timers: CheckTimers,
        counters: CheckCounters,
        *,
        request: RequestFn,
        send: SendFn,
        next_check: NextCheckFn,
        on_timeout: TimeoutFn,
    ) -> None:
        self._loop = loop
        self._timers = timers
        self._counters = counters
        self._request = request
        self._send = send
        self._next_check = next_check
        self._on_timeout = on_timeout
        self._active = False
        self._closed = False
        self._transactions: dict[bytes, Transaction] = {}
        self._recent: OrderedDict[bytes, Transaction] = OrderedDict()
        self._urgent: deque[tuple[CandidatePair, TxKind]] = deque()
        self._background: deque[tuple[CandidatePair, TxKind]] = deque()
        self._last_start = -1e9
        self._pacer: asyncio.TimerHandle | None = None

    def activate(self) -> None:
        """Start sending what is queued, and whatever comes later."""
        self._active = True
        self._kick()

    def close(self) -> None:
        """Stop every timer and forget what is queued and in flight."""
        self._closed = True
        for tx in self._transactions.values():
            if tx.timer is not None:
                tx.timer.cancel()
        self._transactions.clear()
        if self._pacer is not None:
            self._pacer.cancel()
            self._pacer = None
        self._urgent.clear()
        self._background.clear()

    def get(self, transaction_id: bytes) -> Transaction | None:
        """The transaction in flight with this id."""
        return self._transactions.get(transaction_id)

    def recent(self, transaction_id: bytes) -> Transaction | None:
        """The transaction with this id that ended lately, if any."""
        return self._recent.get(transaction_id)

    def owns(self, transaction_id: bytes) -> bool:
        return transaction_id in self._transactions or transaction_id in self._recent

    def enqueue(self, pair: CandidatePair, kind: TxKind, *, urgent: bool) -> None:
        (self._urgent if urgent else self._background).append((pair, kind))
        self._kick()

    def finish(self, tx: Transaction) -> None:
        """End `tx`: no more retransmits; its id stays known for late answers."""
        if tx.timer is not None:
            tx.timer.cancel()
            tx.timer = None
        self._transactions.pop(tx.id, None)
        if tx.pair.in_flight.get(tx.kind) == tx.id:
            del tx.pair.in_flight[tx.kind]
        self._recent[tx.id] = tx
        while len(self._recent) > RECENT_TRANSACTIONS:
            self._recent.popitem(last=False)

    def _kick(self) -> None:
        if self._pacer is not None or self._closed or not self._active:
            return
        delay = max(0.0, self._last_start + self._timers.pacing - self._loop.time())
        self._pacer = self._loop.call_later(delay, self._pace)

    def _pace(self) -> None:
        self._pacer = None
        work = self._next_work()
        if work is None:
            return
        self._last_start = self._loop.time()
        self._start(*work)
        self._kick()

    def _next_work(self) -> tuple[CandidatePair, TxKind] | None:
        while self._urgent:
            pair, kind = self._urgent.popleft()
            if kind not in pair.in_flight:
                return pair, kind
        waiting = self._next_check()
        if waiting is not None:
            return waiting, "check"
        while self._background:
            pair, kind = self._background.popleft()
            # Liveness is only asked of a pair with nothing else in flight.
            if not pair.in_flight or (kind != "live" and kind not in pair.in_flight):
                return pair, kind
        return None

    def _start(self, pair: CandidatePair, kind: TxKind) -> None:
        request = self._request(pair)
        tx = Transaction(request.transaction_id, pair, kind, bytes(request),
                         "ICE-CONTROLLING" in request.attributes)
        self._transactions[tx.id] = tx
        pair.in_flight[kind] = tx.id
        if kind != "live" and pair.state in ("waiting", "failed"):
            pair.state = "in-progress"
        pair.checks += 1
        self._counters.checks += 1
        self._transmit(tx)

    def _transmit(self, tx: Transaction) -> None:
        if tx.sent_at:
            self._counters.retransmits += 1
        tx.sent_at.append(self._loop.time())
        self._send(tx.data, tx.pair.remote_address, tx.pair.local)
        timers = self._timers
        if tx.kind == "live":
            delay = timers.consent_timeout_for(
                tx.pair.rto_ms(timers.consent_granularity * 1000.0), tx.pair.rtt_ms)
        else:
            delay = min(timers.rto * 2 ** (len(tx.sent_at) - 1), timers.max_rto)
        tx.timer = self._loop.call_later(delay, self._on_timer, tx)

    def _on_timer(self, tx: Transaction) -> None:
        tx.timer = None
        if self._closed or tx.id not in self._transactions:
            return
        if tx.kind != "live" and len(tx.sent_at) < self._timers.max_transmissions:
            self._transmit(tx)
            return
        self._counters.timeouts += 1
        self.finish(tx)
        self._on_timeout(tx)
