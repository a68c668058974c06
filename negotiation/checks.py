"""Connectivity checks with one peer: ICE-style (RFC 8445) from the shared WireGuard port.

One `PeerChecker` per peer per negotiation session. It never owns a socket:

    checker = PeerChecker(local_candidates, ufrag, pwd, controlling=True,
                          tie_breaker=offer.tie_breaker, send=send, on_selected=cb)
    mux.register(checker.ufrag, checker)      # incoming STUN reaches datagram_received
    checker.set_remote(answer.ufrag, answer.pwd, answer.candidates)
    ...                                       # cb(pair, reason) on every change of path
    checker.close(); mux.unregister(checker.ufrag)

- `send(data, dest, local)` (`SendFn`) sends from local candidate `local`: for host
  candidates from its address on the WireGuard port; for a relay candidate through its
  TURN allocation. Checks only ever leave from host and relay candidates (pairs.py).
- `datagram_received(data, src, local)` takes every STUN datagram routed to this peer;
  `local` is the local candidate it arrived at (None when unknown). Never raises.
- `on_selected(pair, reason)`: the pair to use, or None with the reason when no pair
  works any more. The WireGuard endpoint is `pair.remote_address`; `pair.local`
  says which interface (or relay) the path leaves from.

How this differs from full ICE (one component, one stream, both ends are this agent):
- No frozen pairs or foundations: every pair starts Waiting and is checked in priority
  order, one new transaction every `pacing` (Ta). Triggered checks, nominations and
  consent checks go first; keepalives and re-probes last.
- Nomination: the controlling side selects a pair as soon as it has succeeded and the
  choice says so (choice.py), then sends USE-CANDIDATE on it. It nominates a host-host
  pair at once; otherwise it waits `settle` after the first success (or until every
  pair of a better class failed). It renominates whenever choice switches; the controlled
  side follows the latest nomination. Every consent check of the controlling side
  carries USE-CANDIDATE too, so a lost or reordered nomination heals within one consent
  interval.
- Keeping the path: single-shot consent checks on the selected pair every
  `consent_interval`, keepalives on other valid pairs every `keepalive_interval` (so the
  alternatives and their RTTs stay known). `consent_failures` misses in a row fail the
  pair; either side then moves to the best remaining valid pair at once (the
  controlled side too, so that a lost nomination cannot hold it on a dead path).
- Failed pairs are re-probed with backoff from `reprobe_min` doubling to `reprobe_max`.
- RTT: single-shot transactions give exact samples; see `CandidatePair.add_rtt` for
  retransmitted ones.
- Unauthenticated or malformed requests are dropped and counted, not answered with
  400/401: only the peer, which knows the password, gets answers.
- Role conflicts (both sides controlling after crossed offers) are settled by the
  tie-breaker with 487 as in RFC 8445 section 7.3.1.1.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from aioice import stun

from kbwg.negotiation.candidates import Candidate, candidate_priority
from kbwg.negotiation.choice import (
    CLASS_RANK,
    DEFAULT_HYSTERESIS_MS,
    DEFAULT_HYSTERESIS_RATIO,
    better_class_pending,
    choose,
    explain,
)
from kbwg.negotiation.pairs import (
    MAX_PAIRS,
    Address,
    CandidatePair,
    TxKind,
    check_bases,
    form_pairs,
    ipv4,
    pair_priority,
    parse_address,
    prflx_priority,
    unique_remotes,
)
from kbwg.negotiation.wire import CandidateInfo

log = logging.getLogger(__name__)

SendFn = Callable[[bytes, Address, Candidate], None]
SelectedCallback = Callable[[CandidatePair | None, str], None]
CheckerState = Literal["checking", "connected", "failed", "closed"]

MAX_DATAGRAM = 1500
# Peer-reflexive remotes learned from requests: bounded, each costs a pair per base.
MAX_PRFLX = 16
# Requests that arrive before the peer's answer, replayed once it is known.
MAX_EARLY = 16
# Transaction ids answered lately: a late answer to a retransmit is ours, not garbage.
RECENT_TRANSACTIONS = 128
_ROLE_CONFLICT = 487


@dataclass(frozen=True)
class CheckTimers:
    """Timer parameters in seconds; tests shrink them."""

    pacing: float = 0.010  # Ta: one new transaction per interval
    rto: float = 0.100  # first retransmit of a check, doubling ...
    max_rto: float = 1.6  # ... up to this
    max_transmissions: int = 6  # a check fails ~4.7 s after its first copy
    settle: float = 0.150  # wait for better-class pairs after the first success
    consent_interval: float = 2.0
    consent_timeout: float = 1.0  # a single-shot liveness check is missed after this
    consent_failures: int = 3  # misses in a row that fail a pair (~6 s)
    keepalive_interval: float = 5.0
    reprobe_min: float = 2.0
    reprobe_max: float = 30.0
    jitter: float = 0.2  # +-fraction on consent/keepalive intervals (RFC 7675)


@dataclass
class CheckCounters:
    """What was sent and received; bad input is counted, never raised."""

    checks: int = 0
    retransmits: int = 0
    timeouts: int = 0
    requests: int = 0
    answered: int = 0
    responses: int = 0
    error_responses: int = 0
    late_responses: int = 0
    role_conflicts: int = 0
    prflx_learned: int = 0
    send_errors: int = 0
    oversized: int = 0
    malformed: int = 0
    wrong_method: int = 0
    bad_request: int = 0
    bad_username: int = 0
    bad_integrity: int = 0
    unknown_transaction: int = 0
    address_mismatch: int = 0
    unusable_source: int = 0
    dropped: int = 0
    errors: int = 0

    @property
    def ignored(self) -> int:
        return (self.oversized + self.malformed + self.wrong_method + self.bad_request
                + self.bad_username + self.bad_integrity + self.unknown_transaction
                + self.unusable_source + self.dropped + self.errors)

    def to_json(self) -> dict[str, int]:
        return {**asdict(self), "ignored": self.ignored}


@dataclass(eq=False)
class _Transaction:
    id: bytes
    pair: CandidatePair
    kind: TxKind
    data: bytes
    controlling: bool  # the role claimed in the request (for 487)
    sent_at: list[float] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


@dataclass(frozen=True)
class _EarlyCheck:
    src: Address
    base: Candidate
    use_candidate: bool
    priority: object


class PeerChecker:
    def __init__(
        self,
        local_candidates: Sequence[Candidate],
        ufrag: str,
        pwd: str,
        *,
        controlling: bool,
        tie_breaker: int,
        send: SendFn,
        on_selected: SelectedCallback | None = None,
        timers: CheckTimers | None = None,
        hysteresis_ratio: float = DEFAULT_HYSTERESIS_RATIO,
        hysteresis_ms: float = DEFAULT_HYSTERESIS_MS,
        name: str = "peer",
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._locals = list(local_candidates)
        self._bases = check_bases(self._locals)
        self._ufrag = ufrag
        self._pwd = pwd.encode()
        self._controlling = controlling
        self._tie_breaker = tie_breaker
        self._send = send
        self.on_selected = on_selected
        self.timers = timers or CheckTimers()
        self.hysteresis_ratio = hysteresis_ratio
        self.hysteresis_ms = hysteresis_ms
        self.name = name
        self.counters = CheckCounters()

        self._remote_ufrag: str | None = None
        self._remote_pwd: bytes | None = None
        self._remotes: list[CandidateInfo] = []
        self._prflx = 0
        self._pairs: list[CandidatePair] = []
        self._by_addr: dict[tuple[Address, Address], CandidatePair] = {}
        self._early: list[_EarlyCheck] = []

        self._transactions: dict[bytes, _Transaction] = {}
        self._recent: OrderedDict[bytes, None] = OrderedDict()
        self._urgent: deque[tuple[CandidatePair, TxKind]] = deque()
        self._background: deque[tuple[CandidatePair, TxKind]] = deque()
        self._last_start = -1e9

        self._selected: CandidatePair | None = None
        self._nominated: CandidatePair | None = None  # the peer's latest (controlled)
        self._was_selected = False
        self._failed = False
        self._closed = False
        self._settle_expired = False
        self._reason = "waiting for the peer's candidates"
        self._connected_at: float | None = None
        self._selected_at: float | None = None

        self._pacer: asyncio.TimerHandle | None = None
        self._settle: asyncio.TimerHandle | None = None
        self._consent: asyncio.TimerHandle | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._probe: asyncio.TimerHandle | None = None
        self._probe_due: float | None = None

    # -- public view ------------------------------------------------------------------

    @property
    def ufrag(self) -> str:
        return self._ufrag

    @property
    def controlling(self) -> bool:
        return self._controlling

    @property
    def state(self) -> CheckerState:
        if self._closed:
            return "closed"
        if self._selected is not None:
            return "connected"
        return "failed" if self._failed else "checking"

    @property
    def selected(self) -> CandidatePair | None:
        return self._selected

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def pairs(self) -> list[CandidatePair]:
        return list(self._pairs)

    @property
    def valid_pairs(self) -> list[CandidatePair]:
        """Succeeded pairs, best first by class then RTT."""
        valid = [p for p in self._pairs if p.state == "succeeded"]
        return sorted(valid, key=lambda p: (CLASS_RANK[p.path],
                                            p.rtt_ms if p.rtt_ms is not None else 1e12))

    def has_transaction(self, transaction_id: bytes) -> bool:
        """Whether an answer with this id is ours (the mux routes responses by it)."""
        return transaction_id in self._transactions or transaction_id in self._recent

    def snapshot(self) -> dict[str, Any]:
        """The fields `status` shows for this peer.

        `path` is "direct-lan", "direct", "relay" or "none"; candidates read
        "type ip:port" (the local one as the peer sees it); `connected_at` is the unix
        time the peer got a path, kept across switches and cleared when no pair works;
        `selected_at` is when the current pair was chosen; `alternatives` lists every
        other pair with its state and RTT.
        """
        pair = self._selected
        rtt = pair.rtt_ms if pair is not None else None
        return {
            "state": self.state,
            "role": "controlling" if self._controlling else "controlled",
            "path": pair.path if pair is not None else "none",
            "local_candidate": pair.local_label() if pair is not None else None,
            "remote_candidate": pair.remote_label() if pair is not None else None,
            "interface": pair.local.interface if pair is not None else None,
            "rtt_ms": None if rtt is None else round(rtt, 3),
            "reason": self._reason,
            "connected_at": self._connected_at,
            "selected_at": self._selected_at,
            "alternatives": [p.to_json() for p in self._pairs if p is not pair],
            "counters": self.counters.to_json(),
        }

    # -- setup and teardown -----------------------------------------------------------

    def set_remote(self, ufrag: str, pwd: str, candidates: Sequence[CandidateInfo]) -> None:
        """The peer's credentials and candidates: forms the pairs and starts checking."""
        if self._closed:
            return
        if self._remote_pwd is not None:
            raise RuntimeError("set_remote called twice; a restart needs a new checker")
        self._remote_ufrag = ufrag
        self._remote_pwd = pwd.encode()
        self._remotes = unique_remotes(candidates)
        for pair in form_pairs(self._bases, candidates, self._controlling):
            pair.probe_delay = self.timers.reprobe_min
            self._by_addr[(pair.local_address, pair.remote_address)] = pair
            self._pairs.append(pair)
        self._reason = f"checking {len(self._pairs)} candidate pairs"
        log.debug("%s: checking %d pairs", self.name, len(self._pairs))
        early, self._early = self._early, []
        for check in early:
            self._incoming_check(check.src, check.base, check.use_candidate, check.priority)
        self._schedule_keepalive()
        self._kick()
        self._evaluate()

    def close(self) -> None:
        """Stop every timer; later datagrams are ignored."""
        self._closed = True
        for tx in self._transactions.values():
            if tx.timer is not None:
                tx.timer.cancel()
        self._transactions.clear()
        for handle in (self._pacer, self._settle, self._consent, self._keepalive,
                       self._probe):
            if handle is not None:
                handle.cancel()
        self._pacer = self._settle = self._consent = self._keepalive = self._probe = None
        self._urgent.clear()
        self._background.clear()

    # -- receiving --------------------------------------------------------------------

    def datagram_received(self, data: bytes, src: Address,
                          local: Candidate | None = None) -> bool:
        """Feed one datagram; True when it was a check or an answer of this peer."""
        try:
            return self._receive(data, src, local)
        except Exception:  # the receive path must outlive any bug or hostile input
            self.counters.errors += 1
            log.debug("%s: error handling a datagram from %s", self.name, src, exc_info=True)
            return False

    def _receive(self, data: bytes, src: Address, local: Candidate | None) -> bool:
        if self._closed:
            return False
        if len(data) > MAX_DATAGRAM:
            self.counters.oversized += 1
            return False
        try:
            message = stun.parse_message(data)
        except Exception:  # aioice raises ValueError, struct.error, UnicodeDecodeError...
            self.counters.malformed += 1
            return False
        if "FINGERPRINT" not in message.attributes:
            self.counters.malformed += 1  # RFC 8445 section 7.1: checks carry one
            return False
        if message.message_method != stun.Method.BINDING:
            self.counters.wrong_method += 1
            return False
        src = (str(src[0]), int(src[1]))
        if message.message_class == stun.Class.REQUEST:
            return self._on_request(message, src, local)
        if message.message_class in (stun.Class.RESPONSE, stun.Class.ERROR):
            return self._on_response(message, src)
        self.counters.dropped += 1  # indications: nothing to do
        return False

    def _on_request(self, message: stun.Message, src: Address,
                    local: Candidate | None) -> bool:
        attrs = message.attributes
        username = attrs.get("USERNAME")
        if not isinstance(username, str) or "MESSAGE-INTEGRITY" not in attrs:
            self.counters.bad_request += 1
            return False
        ours, colon, theirs = username.partition(":")
        if colon != ":" or ours != self._ufrag or (
                self._remote_ufrag is not None and theirs != self._remote_ufrag):
            self.counters.bad_username += 1
            return False
        if not message.check_message_integrity(self._pwd):
            self.counters.bad_integrity += 1
            return False
        base = self._base_for(local, src)
        if base is None or not ipv4(src[0]) or not 0 < src[1] < 65536:
            self.counters.unusable_source += 1
            return False
        self.counters.requests += 1
        if not self._resolve_role(message, src, base):
            return True
        response = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE,
                                transaction_id=message.transaction_id)
        response.attributes["XOR-MAPPED-ADDRESS"] = src
        response.add_message_integrity(self._pwd)
        self._transmit_raw(bytes(response), src, base)
        self.counters.answered += 1
        use_candidate = "USE-CANDIDATE" in attrs
        priority = attrs.get("PRIORITY")
        if self._remote_pwd is None:
            if len(self._early) < MAX_EARLY:
                self._early.append(_EarlyCheck(src, base, use_candidate, priority))
            return True
        self._incoming_check(src, base, use_candidate, priority)
        return True

    def _resolve_role(self, message: stun.Message, src: Address, base: Candidate) -> bool:
        """RFC 8445 section 7.3.1.1; False when we answered 487 and keep our role."""
        attrs = message.attributes
        if self._controlling and "ICE-CONTROLLING" in attrs:
            if self._tie_breaker >= attrs["ICE-CONTROLLING"]:
                self._respond_error(message, src, base, _ROLE_CONFLICT, "Role Conflict")
                return False
            self._switch_role(controlling=False)
        elif not self._controlling and "ICE-CONTROLLED" in attrs:
            if self._tie_breaker < attrs["ICE-CONTROLLED"]:
                self._respond_error(message, src, base, _ROLE_CONFLICT, "Role Conflict")
                return False
            self._switch_role(controlling=True)
        return True

    def _respond_error(self, request: stun.Message, src: Address, base: Candidate,
                       code: int, reason: str) -> None:
        self.counters.role_conflicts += 1
        response = stun.Message(stun.Method.BINDING, stun.Class.ERROR,
                                transaction_id=request.transaction_id)
        response.attributes["ERROR-CODE"] = (code, reason)
        response.add_message_integrity(self._pwd)
        self._transmit_raw(bytes(response), src, base)

    def _switch_role(self, controlling: bool) -> None:
        log.info("%s: role conflict, now %s", self.name,
                 "controlling" if controlling else "controlled")
        self._controlling = controlling
        for pair in self._pairs:
            pair.priority = pair_priority(pair.local.priority, pair.remote.priority,
                                          controlling)
        self._pairs.sort(key=lambda p: p.priority, reverse=True)
        self._evaluate()

    def _incoming_check(self, src: Address, base: Candidate, use_candidate: bool,
                        priority: object) -> None:
        remote = self._remote_for(src, priority)
        pair = self._pair_for(base, remote) if remote is not None else None
        if pair is None:
            self.counters.dropped += 1
            return
        # Triggered check (RFC 8445 section 7.3.1.4): also how a failed pair comes back
        # as soon as the peer's re-probes get through.
        if pair.state in ("waiting", "failed"):
            pair.state = "waiting"
            self._enqueue(pair, "check", urgent=True)
        if use_candidate and not self._controlling and self._nominated is not pair:
            self._nominated = pair
            self._evaluate()

    def _on_response(self, message: stun.Message, src: Address) -> bool:
        tx = self._transactions.get(message.transaction_id)
        if tx is None:
            if message.transaction_id in self._recent:
                self.counters.late_responses += 1
                return True
            self.counters.unknown_transaction += 1
            return False
        if self._remote_pwd is None or not message.check_message_integrity(self._remote_pwd):
            # Not from the peer: keep waiting (retransmits go on), RFC 8489 section 9.1.4.
            self.counters.bad_integrity += 1
            return False
        now = self._loop.time()
        self._finish(tx)
        pair = tx.pair
        if message.message_class == stun.Class.ERROR:
            self.counters.error_responses += 1
            if message.error_code == _ROLE_CONFLICT:
                self.counters.role_conflicts += 1
                self._switch_role(controlling=not tx.controlling)
                self._enqueue(pair, tx.kind, urgent=True)
            else:
                self._transaction_failed(tx, f"error {message.error_code}")
            return True
        # RFC 8445 section 7.2.5.2.1: an answer from elsewhere is not this pair working.
        if src != pair.remote_address:
            self.counters.address_mismatch += 1
            self._transaction_failed(tx, f"answer from {src[0]}:{src[1]}")
            return True
        self.counters.responses += 1
        mapped = message.attributes.get("XOR-MAPPED-ADDRESS")
        exact = len(tx.sent_at) == 1
        self._succeeded(pair, (now - tx.sent_at[0]) * 1000.0, exact, mapped)
        return True

    # -- candidates and pairs ---------------------------------------------------------

    def _base_for(self, local: Candidate | None, src: Address) -> Candidate | None:
        """The base a datagram arrived at: its local candidate's, else a guess by `src`."""
        if local is not None:
            addr: Address | None = (local.address, local.port)
            if local.type in ("srflx", "prflx"):
                addr = parse_address(local.base)
            for base in self._bases:
                if (base.address, base.port) == addr:
                    return base
        for pair in ([self._selected] if self._selected else []) + self._pairs:
            if pair.remote_address == src:
                return pair.local
        return self._bases[0] if self._bases else None

    def _remote_for(self, src: Address, priority: object) -> CandidateInfo | None:
        for remote in self._remotes:
            if (remote.ip, remote.port) == src:
                return remote
        if self._prflx >= MAX_PRFLX:
            return None
        # Learning a peer-reflexive candidate (RFC 8445 section 7.3.1.3).
        if not isinstance(priority, int) or not 0 <= priority < 2**32:
            priority = candidate_priority("prflx")
        self._prflx += 1
        remote = CandidateInfo("prflx", src[0], src[1], priority, f"prflx{self._prflx}")
        self._remotes.append(remote)
        self.counters.prflx_learned += 1
        log.debug("%s: peer-reflexive candidate %s:%d", self.name, src[0], src[1])
        return remote

    def _pair_for(self, base: Candidate, remote: CandidateInfo) -> CandidatePair | None:
        key = ((base.address, base.port), (remote.ip, remote.port))
        pair = self._by_addr.get(key)
        if pair is None:
            if len(self._pairs) >= MAX_PAIRS:
                return None
            pair = CandidatePair(base, remote, pair_priority(
                base.priority, remote.priority, self._controlling))
            pair.probe_delay = self.timers.reprobe_min
            self._by_addr[key] = pair
            self._pairs.append(pair)
            self._pairs.sort(key=lambda p: p.priority, reverse=True)
        return pair

    def _local_seen(self, pair: CandidatePair, mapped: object) -> Candidate:
        """Our candidate as the peer sees it on this pair (RFC 8445 section 7.2.5.3.1)."""
        if not (isinstance(mapped, tuple) and len(mapped) == 2 and isinstance(mapped[0], str)
                and isinstance(mapped[1], int) and ipv4(mapped[0])):
            return pair.local
        if pair.local.type == "relay":
            return pair.local
        for cand in self._locals:
            if (cand.address, cand.port) == mapped:
                return cand
        known = pair.local_seen
        if known is not None and (known.address, known.port) == mapped:
            return known
        return Candidate(
            type="prflx", address=mapped[0], port=mapped[1], interface=pair.local.interface,
            priority=prflx_priority(pair.local), source="peer-reflexive (seen by the peer)",
            base=f"{pair.local.address}:{pair.local.port}",
        )

    # -- sending ----------------------------------------------------------------------

    def _enqueue(self, pair: CandidatePair, kind: TxKind, *, urgent: bool) -> None:
        (self._urgent if urgent else self._background).append((pair, kind))
        self._kick()

    def _kick(self) -> None:
        if self._pacer is not None or self._closed or self._remote_pwd is None:
            return
        delay = max(0.0, self._last_start + self.timers.pacing - self._loop.time())
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
        for pair in self._pairs:
            if pair.state == "waiting" and "check" not in pair.in_flight:
                return pair, "check"
        while self._background:
            pair, kind = self._background.popleft()
            # Liveness is only asked of a pair with nothing else in flight.
            if not pair.in_flight or (kind != "live" and kind not in pair.in_flight):
                return pair, kind
        return None

    def _start(self, pair: CandidatePair, kind: TxKind) -> None:
        assert self._remote_ufrag is not None and self._remote_pwd is not None
        request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
        attrs = request.attributes
        attrs["USERNAME"] = f"{self._remote_ufrag}:{self._ufrag}"
        attrs["PRIORITY"] = prflx_priority(pair.local)
        if self._controlling:
            attrs["ICE-CONTROLLING"] = self._tie_breaker
            if pair is self._selected:
                attrs["USE-CANDIDATE"] = None
        else:
            attrs["ICE-CONTROLLED"] = self._tie_breaker
        request.add_message_integrity(self._remote_pwd)
        tx = _Transaction(request.transaction_id, pair, kind, bytes(request),
                          self._controlling)
        self._transactions[tx.id] = tx
        pair.in_flight[kind] = tx.id
        if kind != "live" and pair.state in ("waiting", "failed"):
            pair.state = "in-progress"
        pair.checks += 1
        self.counters.checks += 1
        self._transmit(tx)

    def _transmit(self, tx: _Transaction) -> None:
        if tx.sent_at:
            self.counters.retransmits += 1
        tx.sent_at.append(self._loop.time())
        self._transmit_raw(tx.data, tx.pair.remote_address, tx.pair.local)
        timers = self.timers
        if tx.kind == "live":
            delay = timers.consent_timeout
        else:
            delay = min(timers.rto * 2 ** (len(tx.sent_at) - 1), timers.max_rto)
        tx.timer = self._loop.call_later(delay, self._on_timer, tx)

    def _transmit_raw(self, data: bytes, dest: Address, local: Candidate) -> None:
        try:
            self._send(data, dest, local)
        except Exception as exc:  # a lost datagram to the retransmit timer
            self.counters.send_errors += 1
            log.debug("%s: sending to %s:%d failed: %s", self.name, dest[0], dest[1], exc)

    def _on_timer(self, tx: _Transaction) -> None:
        tx.timer = None
        if self._closed or tx.id not in self._transactions:
            return
        if tx.kind != "live" and len(tx.sent_at) < self.timers.max_transmissions:
            self._transmit(tx)
            return
        self.counters.timeouts += 1
        self._finish(tx)
        self._transaction_failed(tx, "no answer")

    def _finish(self, tx: _Transaction) -> None:
        if tx.timer is not None:
            tx.timer.cancel()
            tx.timer = None
        self._transactions.pop(tx.id, None)
        if tx.pair.in_flight.get(tx.kind) == tx.id:
            del tx.pair.in_flight[tx.kind]
        self._recent[tx.id] = None
        while len(self._recent) > RECENT_TRANSACTIONS:
            self._recent.popitem(last=False)

    # -- outcomes ---------------------------------------------------------------------

    def _succeeded(self, pair: CandidatePair, rtt_ms: float, exact: bool,
                   mapped: object) -> None:
        first = pair.state != "succeeded"
        pair.state = "succeeded"
        pair.tried = True
        pair.answers += 1
        pair.misses = 0
        pair.add_rtt(rtt_ms, exact)
        pair.local_seen = self._local_seen(pair, mapped)
        pair.probe_delay = self.timers.reprobe_min
        pair.probe_at = None
        if first:
            pair.succeeded_at = self._loop.time()
            log.debug("%s: pair %s works (%.1f ms)", self.name, pair.describe(), rtt_ms)
        self._evaluate()

    def _transaction_failed(self, tx: _Transaction, why: str) -> None:
        pair = tx.pair
        if tx.kind == "live":
            pair.misses += 1
            if pair.misses < self.timers.consent_failures:
                return
            why = f"{pair.misses} consent checks unanswered"
        elif pair.state == "succeeded" and tx.kind == "check" and pair is not self._selected:
            # A check of a working pair (triggered by the peer) going unanswered is one
            # miss, not proof: liveness decides.
            pair.misses += 1
            if pair.misses < self.timers.consent_failures:
                return
        self._pair_failed(pair, why)

    def _pair_failed(self, pair: CandidatePair, why: str) -> None:
        was = pair.state
        pair.state = "failed"
        pair.tried = True
        pair.misses = 0
        if self._nominated is pair:
            self._nominated = None
        now = self._loop.time()
        pair.probe_at = now + pair.probe_delay
        pair.probe_delay = min(pair.probe_delay * 2, self.timers.reprobe_max)
        self._schedule_probe()
        if was == "succeeded":
            log.info("%s: pair %s failed: %s", self.name, pair.describe(), why)
        else:
            log.debug("%s: pair %s failed: %s", self.name, pair.describe(), why)
        self._evaluate()

    def _evaluate(self) -> None:
        """Act on the choice: select, renominate, fall back, or declare failure."""
        if self._closed or self._remote_pwd is None:
            return
        views = [p.view() for p in self._pairs]
        current = self._selected
        if not self._controlling:
            nominated = self._nominated
            if nominated is not None and nominated.state == "succeeded":
                if nominated is not current:
                    self._select(nominated, "nominated by the peer: "
                                 + explain(nominated.view(), views))
                return
            if current is not None and current.state == "succeeded":
                return  # the peer decides while the path works
            if current is None and not self._was_selected:
                self._maybe_failed(None)
                return
            # Our path stopped answering: move on without waiting for a nomination.
        best_view, reason = choose(
            current.view() if current is not None else None, views,
            hysteresis_ratio=self.hysteresis_ratio, hysteresis_ms=self.hysteresis_ms)
        if best_view is None:
            self._maybe_failed(reason)
            return
        best = next(p for p in self._pairs if p.key == best_view.key)
        if best is current:
            return
        if (current is None and not self._was_selected and best_view.path != "direct-lan"
                and not self._settle_expired and better_class_pending(best_view, views)):
            if self._settle is None:
                self._settle = self._loop.call_later(self.timers.settle, self._settled)
            return
        self._select(best, reason)

    def _settled(self) -> None:
        self._settle = None
        self._settle_expired = True
        self._evaluate()

    def _select(self, pair: CandidatePair, reason: str) -> None:
        self._selected = pair
        self._was_selected = True
        self._failed = False
        self._reason = reason
        wall = time.time()
        if self._connected_at is None:
            self._connected_at = wall
        self._selected_at = wall
        if self._controlling:
            self._enqueue(pair, "nominate", urgent=True)
        self._schedule_consent()
        log.info("%s: path %s: %s", self.name, pair.describe(), reason)
        self._notify(pair, reason)

    def _maybe_failed(self, reason: str | None) -> None:
        if self._selected is not None:
            self._selected = None
        elif self._failed:
            return
        elif any(not p.tried or (p.state == "succeeded" and not self._controlling)
                 for p in self._pairs):
            return  # still checking, or (controlled) waiting for the peer's nomination
        if reason is None:
            reason = (f"no pair answered (tried {len(self._pairs)})" if self._pairs
                      else "no candidate pairs to check")
        self._failed = True
        self._connected_at = None
        self._reason = reason
        log.info("%s: no path: %s", self.name, reason)
        self._notify(None, reason)

    def _notify(self, pair: CandidatePair | None, reason: str) -> None:
        if self.on_selected is None:
            return
        try:
            self.on_selected(pair, reason)
        except Exception:
            log.exception("%s: on_selected callback failed", self.name)

    # -- periodic work ----------------------------------------------------------------

    def _jittered(self, interval: float) -> float:
        jitter = self.timers.jitter
        return interval * (1 + random.uniform(-jitter, jitter))

    def _schedule_consent(self) -> None:
        if self._consent is None and not self._closed:
            self._consent = self._loop.call_later(
                self._jittered(self.timers.consent_interval), self._consent_tick)

    def _consent_tick(self) -> None:
        self._consent = None
        pair = self._selected
        if pair is None or self._closed:
            return
        if "live" not in pair.in_flight:
            self._enqueue(pair, "live", urgent=True)
        self._schedule_consent()

    def _schedule_keepalive(self) -> None:
        if self._keepalive is None and not self._closed:
            self._keepalive = self._loop.call_later(
                self._jittered(self.timers.keepalive_interval), self._keepalive_tick)

    def _keepalive_tick(self) -> None:
        self._keepalive = None
        for pair in self._pairs:
            if pair.state == "succeeded" and pair is not self._selected and not pair.in_flight:
                self._enqueue(pair, "live", urgent=False)
        self._schedule_keepalive()

    def _schedule_probe(self) -> None:
        due = [p.probe_at for p in self._pairs if p.state == "failed" and p.probe_at]
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
        for pair in self._pairs:
            if pair.state == "failed" and pair.probe_at is not None and pair.probe_at <= now:
                pair.probe_at = None
                self._enqueue(pair, "check", urgent=False)
        self._schedule_probe()
