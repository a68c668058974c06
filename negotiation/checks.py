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
  TURN allocation. Checks only ever leave from host and relay candidates (candidate_pairs.py).
- `datagram_received(data, src, local)` takes every STUN datagram routed to this peer;
  `local` is the local candidate it arrived at (None when unknown). Never raises.
- `on_selected(pair, reason)`: the pair to use, or None with the reason when no pair
  works any more. The WireGuard endpoint is `pair.remote_address`; `pair.local`
  says which interface (or relay) the path leaves from.

This module answers checks, settles role conflicts and acts on outcomes: selection,
nomination, consent, keepalives and re-probes. The rest is in its own modules:
check_config.py (timers, counters), check_messages.py (building and vetting the STUN
messages), check_transactions.py (pacing, retransmits, timeouts), check_liveness.py
(consent, keepalives, re-probes) and pair_table.py (the pairs, and the peer-reflexive
candidates learned from checks).

How this differs from full ICE (one component, one stream, both ends are this agent):
- No frozen pairs or foundations: every pair starts Waiting and is checked in priority
  order, one new transaction every `pacing` (Ta). Triggered checks, nominations and
  consent checks go first; keepalives and re-probes last (check_transactions.py).
- Nomination: the controlling side selects a pair as soon as it has succeeded and the
  choice says so (choice.py), then sends USE-CANDIDATE on it. It nominates a same-LAN
  or a relayed pair at once (a relay is the fallback: a direct pair that answers later
  replaces it, as a better class always does, and the path works meanwhile); a path
  through NATs waits `settle` after the first success while a LAN pair is still being
  checked (or until every one failed), unless the LAN pair's peer address is off our
  interface's subnet (two NATs' private networks). Either way the first nomination
  also waits (at most `contend_max`) while a pair of the same class could still answer
  faster: one not checked yet, or checked less than the winner's RTT ago (a
  multi-homed host's fast uplink beside a slow default one; another uplink's pair to
  the same peer address, sent once and unanswered, also until its first retransmit
  could be answered), so the first choice is the right one. A check sent before the
  peer knew us (early checks: each side starts when it reads the other's key) may be
  dropped there: when the peer's own check arrives on that pair the check goes again
  at once (a triggered check, RFC 8445 section 7.3.1.4), and a pair answered only
  after a retransmit (its RTT only an upper bound) is checked once more, the first
  nomination waiting for that answer the same way. It renominates whenever choice
  switches; the controlled side follows the latest nomination. Every consent check of
  the controlling side carries USE-CANDIDATE too, so a lost or reordered nomination
  heals within one consent interval. A controlled side whose pairs work but that has no
  nomination after `nomination_wait` checks its best pair again (a few times, backing
  off): the controlling side may have stopped checking, as early checks do on the bye
  of a peer's previous run delivered after its new run's first checks, and a check
  wakes it (early.py).
- Keeping the path: single-shot consent checks on the selected pair every few of its
  RTTs (at most `consent_interval`, check_liveness.py) while traffic flows or the path
  is new, every `consent_idle_interval` while idle (`note_traffic`); keepalives on
  other valid pairs (so the alternatives and their RTTs stay known). A check is missed
  after the pair's RTO (RFC 6298, rtt_estimator.py); `consent_failures` misses in a
  row fail the pair (more on a lossy path); either side then moves to the best
  remaining valid pair at once (the controlled side too, so that a lost nomination
  cannot hold it on a dead path).
- Failed pairs are re-probed with backoff from `reprobe_min` doubling to `reprobe_max`
  (the timers of both are in check_liveness.py).
- RTT: single-shot transactions give exact samples; see `CandidatePair.add_rtt` for
  retransmitted ones.
- Unauthenticated or malformed requests are dropped and counted, not answered with
  400/401: only the peer, which knows the password, gets answers (check_messages.py).
- Role conflicts (both sides controlling after crossed offers) are settled by the
  tie-breaker with 487 as in RFC 8445 section 7.3.1.1.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aioice import stun

from kbwg.negotiation import check_messages as messages
from kbwg.negotiation.candidate_pairs import Address, CandidatePair, checkable, prflx_priority
from kbwg.negotiation.candidates import Candidate
from kbwg.negotiation.check_config import CheckCounters, CheckTimers, SendFn
from kbwg.negotiation.check_liveness import CheckLiveness
from kbwg.negotiation.check_transactions import CheckTransactions, Transaction
from kbwg.negotiation.choice import (
    CLASS_RANK,
    DEFAULT_HYSTERESIS_MS,
    DEFAULT_HYSTERESIS_RATIO,
    PairView,
    better_class_pending,
    choose,
    explain,
    format_rtt,
)
from kbwg.negotiation.pair_table import MAX_SENT, PairTable
from kbwg.negotiation.wire import CandidateInfo

__all__ = ["CheckCounters", "CheckTimers", "CheckerState", "LostCallback", "PeerChecker",
           "SelectedCallback", "SendFn"]

log = logging.getLogger(__name__)

SelectedCallback = Callable[[CandidatePair | None, str], None]
# The selected pair stopped answering: (that pair, whether another one took over).
LostCallback = Callable[[CandidatePair, bool], None]
CheckerState = Literal["checking", "connected", "failed", "closed"]

# Requests that arrive before the peer's answer, replayed once it is known.
MAX_EARLY = 16


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
        on_relay_quiet: Callable[[], None] | None = None,
    ) -> None:
        """`on_relay_quiet`: a relayed pair that worked stopped answering (the relay may
        have lost our allocation too)."""
        self._loop = asyncio.get_running_loop()
        self._ufrag = ufrag
        self._pwd = pwd.encode()
        self._controlling = controlling
        self._tie_breaker = tie_breaker
        self._send = send
        self.on_selected = on_selected
        # Told when the selected pair goes quiet (after the switch to another, if any),
        # so the agent can re-STUN and renegotiate at once.
        self.on_lost: LostCallback | None = None
        self.timers = timers or CheckTimers()
        self.hysteresis_ratio = hysteresis_ratio
        self.hysteresis_ms = hysteresis_ms
        self.name = name
        self.counters = CheckCounters()

        self._remote_ufrag: str | None = None
        self._remote_pwd: bytes | None = None
        # Trickle: candidates either side may still send. Failure is not declared while
        # more may come; trickled remotes wait here for the credentials.
        self._remote_complete = True
        self._local_complete = True
        self._trickled: list[CandidateInfo] = []
        self._trickle_ended = False
        self._table = PairTable(local_candidates, self.timers, self.counters, name)
        self._on_relay_quiet = on_relay_quiet
        self._early: list[_EarlyCheck] = []
        self._tx = CheckTransactions(
            self._loop, self.timers, self.counters, request=self._request,
            send=self._send_datagram, next_check=self._table.next_waiting,
            on_timeout=lambda tx: self._transaction_failed(tx, "no answer"))

        self._selected: CandidatePair | None = None
        self._nominated: CandidatePair | None = None  # the peer's latest (controlled)
        self._was_selected = False
        self._failed = False
        self._closed = False
        self._retired = False
        self._settle_expired = False
        self._reason = "waiting for the peer's candidates"
        self._connected_at: float | None = None
        self._selected_at: float | None = None

        self._settle: asyncio.TimerHandle | None = None
        self._contend: asyncio.TimerHandle | None = None
        self._recheck: asyncio.TimerHandle | None = None  # controlled: no nomination yet
        self._rechecks = 0
        self._selected_loop_at: float | None = None
        self._first_success_at: float | None = None
        # When the peer's first authentic check arrived: it knew our credentials then.
        self._heard_at: float | None = None
        # Checks ended by `_retrigger` (at most one per pair): their answers still count.
        self._retriggered: set[bytes] = set()
        # Pairs checked once more because their first answer came after a retransmit.
        self._remeasured: set[str] = set()
        self._upkeep = CheckLiveness(self._loop, self.timers, self._table, self._tx,
                                     lambda: self._selected, name)

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
    def was_connected(self) -> bool:
        return self._was_selected

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def pairs(self) -> list[CandidatePair]:
        return list(self._table.pairs)

    @property
    def valid_pairs(self) -> list[CandidatePair]:
        """Succeeded pairs, best first by tier (choice.py) then RTT."""
        valid = [p for p in self._table.pairs if p.state == "succeeded"]
        return sorted(valid, key=lambda p: (p.view().tier,
                                            p.rtt_ms if p.rtt_ms is not None else 1e12))

    def note_traffic(self) -> None:
        """Traffic flows to or from this peer (the agent saw WireGuard's counters move):
        the path is active for `active_window` more; an idle one is checked at once."""
        self._upkeep.note_traffic()

    @property
    def active(self) -> bool:
        """Whether consent goes at the RTT pace (traffic or a new path lately)."""
        return self._upkeep.active

    def has_transaction(self, transaction_id: bytes) -> bool:
        """Whether an answer with this id is ours (the mux routes responses by it)."""
        return self._tx.owns(transaction_id)

    def snapshot(self) -> dict[str, Any]:
        """The fields `status` shows for this peer.

        `path` is "direct-lan", "direct", "relay" or "none"; candidates read
        "type ip:port" (the local one as the peer sees it); `connected_at` is the unix
        time the peer got a path, kept across switches and cleared when no pair works;
        `selected_at` is when the current pair was chosen; `rtt_ms` is the median of
        recent checks, `base_rtt_ms` the lowest of the last `BASE_RTT_WINDOW_S` (what
        choice compares); `alternatives` lists every other pair with its state and
        both RTTs.
        """
        pair = self._selected
        rtt = pair.rtt_ms if pair is not None else None
        base = pair.base_rtt.value_ms if pair is not None else None
        return {
            "state": self.state,
            "role": "controlling" if self._controlling else "controlled",
            "path": pair.path if pair is not None else "none",
            "local_candidate": pair.local_label() if pair is not None else None,
            "remote_candidate": pair.remote_label() if pair is not None else None,
            "interface": pair.local.interface if pair is not None else None,
            "rtt_ms": None if rtt is None else round(rtt, 3),
            "base_rtt_ms": None if base is None else round(base, 3),
            "consent_pace": "active" if self._upkeep.active else "idle",
            "reason": self._reason,
            "connected_at": self._connected_at,
            "selected_at": self._selected_at,
            "alternatives": [p.to_json() for p in self._table.pairs if p is not pair],
            "counters": self.counters.to_json(),
        }

    # -- setup and teardown -----------------------------------------------------------

    def set_remote(self, ufrag: str, pwd: str, candidates: Sequence[CandidateInfo],
                   complete: bool = True) -> None:
        """The peer's credentials and candidates: forms the pairs and starts checking.
        `complete` False: more candidates may trickle in (`add_remote`)."""
        if self._closed:
            return
        if self._remote_pwd is not None:
            raise RuntimeError("set_remote called twice; a restart needs a new checker")
        self._remote_ufrag = ufrag
        self._remote_pwd = pwd.encode()
        self._remote_complete = complete or self._trickle_ended
        self._table.form([*candidates, *self._trickled], self._controlling)
        self._trickled = []
        pairs = self._table.pairs
        self._reason = f"checking {len(pairs)} candidate pairs"
        log.debug("%s: checking %d pairs", self.name, len(pairs))
        early, self._early = self._early, []
        for check in early:
            self._incoming_check(check.src, check.base, check.use_candidate, check.priority)
        self._upkeep.start_keepalives()
        self._tx.activate()
        self._evaluate()

    def add_remote(self, candidates: Sequence[CandidateInfo], complete: bool,
                   replace: bool = False) -> None:
        """Candidates the peer trickled after its offer or answer; `complete`: the last.
        `replace`: they correct the type of candidates already known at their addresses
        (PairTable.add_remotes)."""
        if self._closed:
            return
        if self._remote_pwd is None:  # the answer is still on its way
            self._trickled += candidates
            # A peer that never answers may trickle without end: keep the newest only
            # (the pair table keeps no more than that either).
            del self._trickled[:-MAX_SENT]
            self._trickle_ended = self._trickle_ended or complete
            return
        self._remote_complete = self._remote_complete or complete
        added, retyped = self._table.add_remotes(candidates, self._controlling, replace)
        if self._selected in retyped:
            self._relabel(self._selected)
        self._grown(added, "peer")

    def add_local(self, candidates: Sequence[Candidate], complete: bool) -> None:
        """Our candidates gathered after this checker started (a relay allocation is a
        new base); `complete`: gathering is over."""
        if self._closed:
            return
        added = self._table.add_locals(candidates, self._controlling)
        self._local_complete = complete
        if self._remote_pwd is not None:
            self._grown(added, "local")

    def _relabel(self, pair: CandidatePair) -> None:
        """The selected pair's remote is now known as another type (a LAN address first
        known as the peer's announced endpoint): the same path, told again in its class."""
        why = explain(pair.view(), [p.view() for p in self._table.pairs])
        self._tell(pair, why if self._controlling else f"nominated by the peer: {why}")

    def _grown(self, added: list[CandidatePair], whose: str) -> None:
        if added:
            log.debug("%s: %d more pairs (%s candidates trickled)", self.name, len(added),
                      whose)
            self._tx.activate()
        self._evaluate()

    def retire(self) -> None:
        """A newer session's checker took over from this one: go on answering the peer's
        checks, checking and following its path (WireGuard stays on it until the newer
        one chooses), but report neither its loss nor a failure, which the newer one
        now owns."""
        self.on_lost = None
        self._retired = True
        self.name = f"{self.name} (previous session)"

    def close(self) -> None:
        """Stop every timer; later datagrams are ignored."""
        self._closed = True
        self._tx.close()
        self._upkeep.close()
        for handle in (self._settle, self._contend, self._recheck):
            if handle is not None:
                handle.cancel()
        self._settle = self._contend = self._recheck = None

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
        message = messages.parse_check(data, self.counters)
        if message is None:
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
        if not messages.authentic_request(message, self._ufrag, self._remote_ufrag,
                                          self._pwd, self.counters):
            return False
        base = self._table.base_for(local, src, self._selected)
        if base is None or not checkable(src[0]) or not 0 < src[1] < 65536:
            self.counters.unusable_source += 1
            return False
        self.counters.requests += 1
        if self._heard_at is None:
            self._heard_at = self._loop.time()
        if not self._resolve_role(message, src, base):
            return True
        self._send_datagram(messages.success_response(message, src, self._pwd), src, base)
        self.counters.answered += 1
        attrs = message.attributes
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
                self._respond_role_conflict(message, src, base)
                return False
            self._switch_role(controlling=False)
        elif not self._controlling and "ICE-CONTROLLED" in attrs:
            if self._tie_breaker < attrs["ICE-CONTROLLED"]:
                self._respond_role_conflict(message, src, base)
                return False
            self._switch_role(controlling=True)
        return True

    def _respond_role_conflict(self, request: stun.Message, src: Address,
                               base: Candidate) -> None:
        self.counters.role_conflicts += 1
        response = messages.error_response(
            request, messages.ROLE_CONFLICT, "Role Conflict", self._pwd)
        self._send_datagram(response, src, base)

    def _switch_role(self, controlling: bool) -> None:
        log.info("%s: role conflict, now %s", self.name,
                 "controlling" if controlling else "controlled")
        self._controlling = controlling
        self._table.reprioritize(controlling)
        self._evaluate()

    def _incoming_check(self, src: Address, base: Candidate, use_candidate: bool,
                        priority: object) -> None:
        remote = self._table.remote_for(src, priority)
        pair = (self._table.pair_for(base, remote, self._controlling)
                if remote is not None else None)
        if pair is None:
            self.counters.dropped += 1
            return
        # Triggered check (RFC 8445 section 7.3.1.4): also how a failed pair comes back
        # as soon as the peer's re-probes get through.
        if pair.state in ("waiting", "failed"):
            pair.state = "waiting"
            self._tx.enqueue(pair, "check", urgent=True)
        elif pair.state == "in-progress":
            self._retrigger(pair)
        if use_candidate and not self._controlling and self._nominated is not pair:
            self._nominated = pair
            self._evaluate()

    def _retrigger(self, pair: CandidatePair) -> None:
        """The peer checks a pair whose own check left before we had heard from the
        peer at all: that copy may have reached it before it knew our credentials
        (early checks start on each side when the other's key is read) and been
        dropped, so its retransmit would come an RTO late and answer with only an upper
        bound for the RTT, and a slower pair would win the first choice. As RFC 8445
        section 7.3.1.4 does for an in-progress pair: that transaction is not resent
        (an answer to it still counts) and a new check goes at once; its single copy is
        answered at the path's RTT."""
        tx_id = pair.in_flight.get("check")
        tx = self._tx.get(tx_id) if tx_id is not None else None
        if (tx is None or not tx.sent_at or self._heard_at is None
                or tx.sent_at[0] >= self._heard_at):
            return
        log.debug("%s: pair %s checked by the peer: checking it again", self.name,
                  pair.describe())
        self._tx.finish(tx)
        self._retriggered.add(tx.id)  # its answer still counts (`_cancelled_answer`)
        self._tx.enqueue(pair, "check", urgent=True)

    def _on_response(self, message: stun.Message, src: Address) -> bool:
        tx = self._tx.get(message.transaction_id)
        if tx is None:
            late = self._tx.recent(message.transaction_id)
            if late is not None and late.id in self._retriggered:
                return self._cancelled_answer(late, message, src)
            if late is not None:
                self.counters.late_responses += 1
                self._late_answer(late, message, src)
                return True
            self.counters.unknown_transaction += 1
            return False
        if self._remote_pwd is None or not message.check_message_integrity(self._remote_pwd):
            # Not from the peer: keep waiting (retransmits go on), RFC 8489 section 9.1.4.
            self.counters.bad_integrity += 1
            return False
        now = self._loop.time()
        self._tx.finish(tx)
        pair = tx.pair
        if message.message_class == stun.Class.ERROR:
            self.counters.error_responses += 1
            if message.error_code == messages.ROLE_CONFLICT:
                self.counters.role_conflicts += 1
                self._switch_role(controlling=not tx.controlling)
                self._tx.enqueue(pair, tx.kind, urgent=True)
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
        self._succeeded(pair, (now - tx.sent_at[0]) * 1000.0, exact, mapped,
                        live=tx.kind == "live")
        return True

    def _cancelled_answer(self, tx: Transaction, message: stun.Message,
                          src: Address) -> bool:
        """An answer to a check `_retrigger` ended: it counts as RFC 8445 section
        7.3.1.4 says (its copy was not dropped after all, only slow)."""
        self._retriggered.discard(tx.id)
        if (message.message_class != stun.Class.RESPONSE or src != tx.pair.remote_address
                or self._remote_pwd is None
                or not message.check_message_integrity(self._remote_pwd)):
            self.counters.late_responses += 1
            return True
        self.counters.responses += 1
        self._succeeded(tx.pair, (self._loop.time() - tx.sent_at[0]) * 1000.0,
                        len(tx.sent_at) == 1, message.attributes.get("XOR-MAPPED-ADDRESS"))
        return True

    def _late_answer(self, tx: Transaction, message: stun.Message, src: Address) -> None:
        """An authentic answer to a liveness check already counted as missed: the path
        is slower than its timeout, not dead. Its RTT is exact (a single copy was sent)
        and must reach the estimator, or the RTO would only ever learn of the answers
        fast enough to beat it; and the pair's misses in a row end here."""
        pair = tx.pair
        if (tx.kind != "live" or len(tx.sent_at) != 1 or pair.state != "succeeded"
                or message.message_class != stun.Class.RESPONSE or src != pair.remote_address
                or self._remote_pwd is None
                or not message.check_message_integrity(self._remote_pwd)):
            return
        now = self._loop.time()
        pair.add_rtt((now - tx.sent_at[0]) * 1000.0, exact=True, at=now)
        pair.answered(live=True)

    # -- sending ----------------------------------------------------------------------

    def _request(self, pair: CandidatePair) -> stun.Message:
        """A signed check of `pair`; the controlling side nominates the selected pair."""
        assert self._remote_ufrag is not None and self._remote_pwd is not None
        return messages.binding_request(
            username=f"{self._remote_ufrag}:{self._ufrag}",
            priority=prflx_priority(pair.local), controlling=self._controlling,
            tie_breaker=self._tie_breaker, use_candidate=pair is self._selected,
            key=self._remote_pwd)

    def _send_datagram(self, data: bytes, dest: Address, local: Candidate) -> None:
        try:
            self._send(data, dest, local)
        except Exception as exc:  # a lost datagram to the retransmit timer
            self.counters.send_errors += 1
            log.debug("%s: sending to %s:%d failed: %s", self.name, dest[0], dest[1], exc)

    # -- outcomes ---------------------------------------------------------------------

    def _succeeded(self, pair: CandidatePair, rtt_ms: float, exact: bool,
                   mapped: object, live: bool = False) -> None:
        first = pair.state != "succeeded"
        pair.state = "succeeded"
        pair.tried = True
        pair.answers += 1
        pair.answered(live)
        pair.add_rtt(rtt_ms, exact, at=self._loop.time())
        pair.local_seen = self._table.local_seen(pair, mapped)
        pair.probe_delay = self.timers.reprobe_min
        pair.probe_at = None
        if first:
            pair.succeeded_at = self._loop.time()
            log.debug("%s: pair %s works (%s)", self.name, pair.describe(),
                      format_rtt(rtt_ms, bound=not exact))
        elif not self._was_selected:
            log.debug("%s: pair %s answered again (%s)", self.name, pair.describe(),
                      format_rtt(rtt_ms, bound=not exact))
        if (not exact and not self._was_selected and pair.view().rtt_bound
                and pair.key not in self._remeasured):
            # Only the retransmit may have been answered (the peer learned our
            # credentials meanwhile): timed from the first copy, a fast uplink's pair
            # would lose the first choice to a slower one answered at once. One more
            # check, answered exactly, says what it is worth (`_contenders_wait`).
            self._remeasured.add(pair.key)
            self._tx.enqueue(pair, "check", urgent=True)
        self._evaluate()

    def _transaction_failed(self, tx: Transaction, why: str) -> None:
        pair = tx.pair
        if tx.kind == "live":
            pair.misses += 1
            if pair.misses < self.timers.consent_failures_for(pair.loss):
                if pair is self._selected:
                    self._upkeep.missed()  # an idle path's next check at RTT pace
                    self._evaluate()  # the peer may already answer from a new address
                return
            why = f"{pair.misses} consent checks unanswered"
        elif pair.state == "succeeded" and tx.kind == "check" and pair is not self._selected:
            # A check of a working pair (triggered by the peer) going unanswered is one
            # miss, not proof: liveness decides.
            pair.misses += 1
            if pair.misses < self.timers.consent_failures_for(pair.loss):
                return
        self._pair_failed(pair, why)

    def _pair_failed(self, pair: CandidatePair, why: str) -> None:
        was = pair.state
        lost = pair is self._selected
        pair.state = "failed"
        pair.tried = True
        pair.misses = 0
        if self._nominated is pair:
            self._nominated = None
        self._upkeep.reprobe_later(pair)
        if was == "succeeded":
            log.info("%s: pair %s failed: %s", self.name, pair.describe(), why)
            if pair.path == "relay" and self._on_relay_quiet is not None:
                self._on_relay_quiet()
        else:
            log.debug("%s: pair %s failed: %s", self.name, pair.describe(), why)
        self._evaluate()
        if lost and self.on_lost is not None and not self._closed:
            try:
                self.on_lost(pair, self._selected is not None)
            except Exception:
                log.exception("%s: on_lost callback failed", self.name)

    def _evaluate(self) -> None:
        """Act on the choice: select, renominate, fall back, or declare failure."""
        if self._closed or self._remote_pwd is None:
            return
        views = [p.view() for p in self._table.pairs]
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
                self._await_nomination()
                self._maybe_failed(None)
                return
            # Our path stopped answering: move on without waiting for a nomination.
        best_view, reason = choose(
            current.view() if current is not None else None, views,
            hysteresis_ratio=self.hysteresis_ratio, hysteresis_ms=self.hysteresis_ms)
        if best_view is None:
            self._maybe_failed(reason)
            return
        best = next(p for p in self._table.pairs if p.key == best_view.key)
        if best is current:
            moved = self._peer_moved(current, views)
            if moved is None:
                return
            best, reason = moved
        # Only a NAT path waits for a LAN one: a relayed path works now and any direct
        # pair replaces it the moment it answers.
        if (current is None and not self._was_selected and best_view.path == "direct"
                and not self._settle_expired
                and better_class_pending(best_view, self._lan_candidates(views))):
            if self._settle is None:
                self._settle = self._loop.call_later(self.timers.settle, self._settled)
            return
        if current is None and not self._was_selected and self._contenders_wait(best):
            return
        self._select(best, reason)

    def _lan_candidates(self, views: list[PairView]) -> list[PairView]:
        """`views` without the host pairs whose peer address is off our interface's
        subnet. Between two NATs' private networks such a pair answers only across a
        routed private network: the NAT path does not wait for it (`settle`), and it
        replaces that path at once if it ever answers."""
        off_link = {p.key for p in self._table.pairs
                    if p.path == "direct-lan" and p.local.on_link(p.remote.ip) is False}
        return [v for v in views if v.key not in off_link] if off_link else views

    def _peer_moved(self, current: CandidatePair | None,
                    views: list[PairView]) -> tuple[CandidatePair, str] | None:
        """The peer's checks come from a new address (its NAT moved) and work, while our
        path to its old one missed its last consent check: follow it at once rather
        than after `consent_failures` misses."""
        if current is None or current.misses == 0 or self._selected_loop_at is None:
            return None
        best = self._best_of(
            p for p in self._table.pairs
            if p is not current and p.state == "succeeded" and p.remote.type == "prflx"
            and p.succeeded_at is not None and p.succeeded_at > self._selected_loop_at)
        if best is None:
            return None
        return best, (f"{current.describe()} missed its last consent check and the peer "
                      f"now checks from {best.remote_label()}: {explain(best.view(), views)}")

    def _best_of(self, pairs: Iterable[CandidatePair]) -> CandidatePair | None:
        """The best of `pairs` by choice's rules, none being current."""
        among = list(pairs)
        best_view, _ = choose(None, [p.view() for p in among],
                              hysteresis_ratio=self.hysteresis_ratio,
                              hysteresis_ms=self.hysteresis_ms)
        return None if best_view is None else next(p for p in among if p.key == best_view.key)

    def _contenders_wait(self, best: CandidatePair) -> bool:
        """Whether to hold the first nomination for pairs that could still beat `best`:
        of its class or better, still being checked (or checked again because only a
        retransmit was answered, so their RTT is only an upper bound), and either not
        sent yet or last sent less than `best`'s RTT ago (a faster answer is still
        possible), or, from another interface to the same peer address, sent once and
        due for its first retransmit (that copy too). At most `contend_max` after the
        first success; re-evaluated when the next one is out."""
        now = self._loop.time()
        if self._first_success_at is None:
            self._first_success_at = now
        left = self._first_success_at + self.timers.contend_max - now
        rtt = best.rtt_ms
        if left <= 0 or rtt is None:
            return False
        rank = CLASS_RANK[best.path]
        wait: float | None = None
        for pair in self._table.pairs:
            if pair is best or CLASS_RANK[pair.path] > rank:
                continue
            remeasuring = (pair.state == "succeeded" and pair.key in self._remeasured
                           and pair.view().rtt_bound)
            if pair.state not in ("waiting", "in-progress") and not remeasuring:
                continue
            tx_id = pair.in_flight.get("check")
            tx = self._tx.get(tx_id) if tx_id is not None else None
            if tx is None or not tx.sent_at:
                out = self.timers.pacing  # its check has not left yet: look again soon
            else:
                out = tx.sent_at[-1] + rtt / 1000.0 - now
                if (out <= 0 and len(tx.sent_at) == 1 and tx.timer is not None
                        and best.path != "relay" and pair.remote_address == best.remote_address
                        and pair.local.interface is not None
                        and pair.local.interface != best.local.interface):
                    # Another uplink's first check to the same peer address may have
                    # reached the peer before it knew us (early checks) and been dropped
                    # there, while `best`'s, slower on the way, came after: its
                    # retransmit could still answer faster. Only the first: a second
                    # copy unanswered is no such case.
                    out = tx.timer.when() + rtt / 1000.0 - now
            if out > 0:
                wait = out if wait is None else min(wait, out)
        if wait is None:
            return False
        if self._contend is None:
            log.debug("%s: %s works; waiting up to %.0f ms for pairs that may be faster",
                      self.name, best.describe(), min(wait, left) * 1000)
            self._contend = self._loop.call_later(min(wait, left), self._contended)
        return True

    def _await_nomination(self) -> None:
        """Controlled, with pairs that work and none nominated: check the best of them
        again if the nomination is long in coming (`CheckTimers.nomination_wait`)."""
        if (self._recheck is None and self._rechecks < self.timers.nomination_rechecks
                and any(p.state == "succeeded" for p in self._table.pairs)):
            self._recheck = self._loop.call_later(
                self.timers.nomination_wait * 2 ** self._rechecks, self._recheck_best)

    def _recheck_best(self) -> None:
        self._recheck = None
        if (self._closed or self._controlling or self._was_selected
                or self._nominated is not None):
            return
        best = self._best_of(p for p in self._table.pairs if p.state == "succeeded")
        if best is None:
            return
        self._rechecks += 1
        log.debug("%s: %s works but the peer nominated nothing; checking it again",
                  self.name, best.describe())
        if "check" not in best.in_flight:
            self._tx.enqueue(best, "check", urgent=True)
        self._await_nomination()

    def _contended(self) -> None:
        self._contend = None
        self._evaluate()

    def _settled(self) -> None:
        self._settle = None
        self._settle_expired = True
        self._evaluate()

    def _select(self, pair: CandidatePair, reason: str) -> None:
        self._selected = pair
        self._selected_loop_at = self._loop.time()
        self._was_selected = True
        self._failed = False
        wall = time.time()
        if self._connected_at is None:
            self._connected_at = wall
        self._selected_at = wall
        if self._controlling:
            self._tx.enqueue(pair, "nominate", urgent=True)
        self._upkeep.path_selected()
        self._tell(pair, reason)

    def _tell(self, pair: CandidatePair, reason: str) -> None:
        """The selected path and why: in the log, in the snapshot and to the owner of
        this checker."""
        self._reason = reason
        log.info("%s: path %s: %s", self.name, pair.describe(), reason)
        self._notify(pair, reason)

    def _maybe_failed(self, reason: str | None) -> None:
        if self._selected is not None:
            self._selected = None
        elif self._failed:
            return
        elif any(not p.tried or (p.state == "succeeded" and not self._controlling)
                 for p in self._table.pairs):
            return  # still checking, or (controlled) waiting for the peer's nomination
        elif not (self._remote_complete and self._local_complete):
            return  # candidates still trickling in may work
        if reason is None:
            pairs = self._table.pairs
            reason = (f"no pair answered (tried {len(pairs)})" if pairs
                      else "no candidate pairs to check")
        self._failed = True
        self._connected_at = None
        self._reason = reason
        log.info("%s: no path: %s", self.name, reason)
        self._notify(None, reason)

    def _notify(self, pair: CandidatePair | None, reason: str) -> None:
        if self.on_selected is None or (pair is None and self._retired):
            return
        try:
            self.on_selected(pair, reason)
        except Exception:
            log.exception("%s: on_selected callback failed", self.name)
