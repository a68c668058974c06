"""The candidate pairs of one peer checker, and which pair a datagram belongs to.

`PairTable` holds the pairs in priority order (forming them is candidate_pairs.py's job) and
grows them as candidates trickle in on either side (`add_remotes`, `add_locals`) and as
checks arrive: a request from an address the peer never listed is a
peer-reflexive candidate (RFC 8445 section 7.3.1.3), at most `MAX_PRFLX` of them, and
a new pair with it, at most `candidate_pairs.MAX_PAIRS` in all. One learned from a check
the peer sent through its relay (PRIORITY of the relay type, see
`candidate_pairs.prflx_priority`) counts as relayed, whatever its port. It also tells
what the peer sees of us on a pair, from the XOR-MAPPED-ADDRESS of an answer (section 7.2.5.3.1).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from kbwg.negotiation.candidate_pairs import (
    MAX_PAIRS,
    Address,
    CandidatePair,
    check_bases,
    checkable,
    form_pairs,
    pair_priority,
    parse_address,
    prflx_priority,
    same_family,
    unique_remotes,
)
from kbwg.negotiation.candidates import TYPE_PREFERENCE, Candidate, candidate_priority
from kbwg.negotiation.check_config import CheckCounters, CheckTimers
from kbwg.negotiation.choice import path_class
from kbwg.negotiation.wire import MAX_CANDIDATES, CandidateInfo

log = logging.getLogger(__name__)

# Peer-reflexive remotes learned from requests: bounded, each costs a pair per base.
MAX_PRFLX = 16
# The peer's signalled candidates kept, newest last: an offer carries at most
# MAX_CANDIDATES and a few more trickle in. A peer may trickle without end, and every
# trickle pairs all that are kept again, so past this the oldest are forgotten (their
# pairs stay).
MAX_SENT = 2 * MAX_CANDIDATES


class PairTable:
    """Pairs of our bases with the peer's candidates, highest priority first."""

    def __init__(self, local_candidates: Sequence[Candidate], timers: CheckTimers,
                 counters: CheckCounters, name: str) -> None:
        self._locals = list(local_candidates)
        self._bases = check_bases(self._locals)
        self._timers = timers
        self._counters = counters
        self._name = name
        self._remotes: list[CandidateInfo] = []
        self._sent: list[CandidateInfo] = []  # every candidate the peer sent, in order
        self._learned: list[CandidateInfo] = []  # from requests, in order
        self._by_addr: dict[tuple[Address, Address], CandidatePair] = {}
        self.pairs: list[CandidatePair] = []

    def form(self, candidates: Sequence[CandidateInfo], controlling: bool) -> None:
        """Pairs with the candidates the peer sent in its offer or answer."""
        self.add_remotes(candidates, controlling)

    def add_remotes(self, candidates: Sequence[CandidateInfo], controlling: bool,
                    replace: bool = False) -> tuple[list[CandidatePair], list[CandidatePair]]:
        """More of the peer's candidates (trickled): the new pairs they make, and the
        pairs whose remote the peer now lists as another candidate (`_retype`).
        `replace`: these say what the peer's candidates at their addresses are, and
        what was known there before was only a guess (its announced endpoint's type)."""
        if replace:
            addresses = {(c.ip, c.port) for c in candidates}
            self._sent = [c for c in self._sent if (c.ip, c.port) not in addresses]
        known = {(c.type, c.ip, c.port) for c in self._sent}
        self._sent += [c for c in candidates if (c.type, c.ip, c.port) not in known]
        del self._sent[:-MAX_SENT]
        self._remotes = unique_remotes(self._sent)
        listed = {(r.ip, r.port) for r in self._remotes}
        self._remotes += [r for r in self._learned if (r.ip, r.port) not in listed]
        retyped = self._retype(controlling)
        return self._grow(controlling), retyped

    def _retype(self, controlling: bool) -> list[CandidatePair]:
        """Pairs whose remote address the peer now lists as a candidate of another class
        take the listed candidate, state and RTT kept: a peer-reflexive candidate the
        peer then signals becomes the signalled one (RFC 8838 section 11), and so does
        an address first known only as the peer's announced endpoint. The class is what
        matters: a LAN peer checked before its CANDIDATES line arrived is then seen as on
        the LAN at once, with no checks started over. Within a class the learned type
        stays (a peer-reflexive remote is how `PeerChecker` tells that the peer's checks
        come from a new address)."""
        current = {(r.ip, r.port): r for r in self._remotes}
        retyped = []
        for pair in self.pairs:
            listed = current.get(pair.remote_address)
            if listed is None or listed is pair.remote:
                continue
            local = pair.shown_local
            if path_class(local.type, listed.type, local.address, listed.ip) == pair.path:
                continue
            pair.remote = listed
            pair.priority = pair_priority(pair.local.priority, listed.priority, controlling)
            retyped.append(pair)
        if retyped:
            self.pairs.sort(key=lambda p: p.priority, reverse=True)
        return retyped

    def add_locals(self, candidates: Sequence[Candidate], controlling: bool) -> list[CandidatePair]:
        """More of our candidates (gathered after the checker started): new bases are
        paired with what the peer sent."""
        known = {(c.type, c.address, c.port) for c in self._locals}
        self._locals += [c for c in candidates if (c.type, c.address, c.port) not in known]
        self._bases = check_bases(self._locals)
        return self._grow(controlling)

    def _grow(self, controlling: bool) -> list[CandidatePair]:
        added = []
        for pair in form_pairs(self._bases, self._sent, controlling):
            key = (pair.local_address, pair.remote_address)
            if key in self._by_addr or len(self.pairs) >= MAX_PAIRS:
                continue
            pair.probe_delay = self._timers.reprobe_min
            self._by_addr[key] = pair
            self.pairs.append(pair)
            added.append(pair)
        self.pairs.sort(key=lambda p: p.priority, reverse=True)
        return added

    def reprioritize(self, controlling: bool) -> None:
        """After a role switch: pair priority depends on which side controls."""
        for pair in self.pairs:
            pair.priority = pair_priority(pair.local.priority, pair.remote.priority,
                                          controlling)
        self.pairs.sort(key=lambda p: p.priority, reverse=True)

    def next_waiting(self) -> CandidatePair | None:
        """The best pair still to be checked, with no check of it in flight."""
        for pair in self.pairs:
            if pair.state == "waiting" and "check" not in pair.in_flight:
                return pair
        return None

    def base_for(self, local: Candidate | None, src: Address,
                 selected: CandidatePair | None) -> Candidate | None:
        """The base a datagram arrived at: its local candidate's, else a guess by `src`."""
        if local is not None:
            addr: Address | None = (local.address, local.port)
            if local.type in ("srflx", "prflx", "mapped"):
                addr = parse_address(local.base)
            for base in self._bases:
                if (base.address, base.port) == addr:
                    return base
        for pair in ([selected] if selected else []) + self.pairs:
            if pair.remote_address == src:
                return pair.local
        return next((b for b in self._bases if same_family(b.address, src[0])), None)

    def remote_for(self, src: Address, priority: object) -> CandidateInfo | None:
        """The peer's candidate at `src`, learned as peer-reflexive if new; None when
        no more may be learned. `priority` is the request's PRIORITY, unchecked."""
        for remote in self._remotes:
            if (remote.ip, remote.port) == src:
                return remote
        if len(self._learned) >= MAX_PRFLX:
            return None
        if not isinstance(priority, int) or not 0 <= priority < 2**32:
            priority = candidate_priority("prflx")
        # A check from the peer's relayed candidate whose port a NAT on our side changed
        # (Linux conntrack does on a tuple clash with our own checks to that relay port):
        # still the relay, never a direct path that merely answers faster.
        relayed = priority >> 24 == TYPE_PREFERENCE["relay"]
        remote = CandidateInfo("relay" if relayed else "prflx", src[0], src[1], priority,
                               f"prflx{len(self._learned) + 1}")
        self._learned.append(remote)
        self._remotes.append(remote)
        self._counters.prflx_learned += 1
        log.debug("%s: peer-reflexive candidate %s:%d%s", self._name, src[0], src[1],
                  " (through the peer's relay)" if relayed else "")
        return remote

    def pair_for(self, base: Candidate, remote: CandidateInfo,
                 controlling: bool) -> CandidatePair | None:
        """The pair of `base` and `remote`, added if new; None when the table is full."""
        key = ((base.address, base.port), (remote.ip, remote.port))
        pair = self._by_addr.get(key)
        if pair is None:
            if len(self.pairs) >= MAX_PAIRS:
                return None
            pair = CandidatePair(base, remote, pair_priority(
                base.priority, remote.priority, controlling))
            pair.probe_delay = self._timers.reprobe_min
            self._by_addr[key] = pair
            self.pairs.append(pair)
            self.pairs.sort(key=lambda p: p.priority, reverse=True)
        return pair

    def local_seen(self, pair: CandidatePair, mapped: object) -> Candidate:
        """Our candidate as the peer sees it on this pair (RFC 8445 section 7.2.5.3.1)."""
        if not (isinstance(mapped, tuple) and len(mapped) == 2 and isinstance(mapped[0], str)
                and isinstance(mapped[1], int) and checkable(mapped[0])):
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
