"""Checks before the offer/answer round trip: credentials both devices derive from their
WireGuard keys, and one peer's early checks with their lifecycle.

Credentials: `Box(my_private, peer_public).shared_key()` is the same on both sides and
known to no one else. Keyed BLAKE2b of it, over each side's own public key, gives that
side's ufrag (48 bits) and password (144 bits) in ICE characters (RFC 8445: at least 24
and 128 bits), and its tie-breaker: the two directions differ, and new keys give new
credentials. Roles need no round trip either: the side with the higher public key
controls (the same order that settles glare in session.py).

An `EarlyPeer` is registered with the check mux under our derived ufrag for as long as
the peer's key is known, and runs a checker (`EarlyChecker`, a `PeerChecker` made by the
agent) against the peer's announced endpoint and the candidates it published:

- it starts as soon as the key is known; its selections go to the agent like a
  negotiated session's (`on_selected`), with a reason that says they came early;
- when the negotiated session's checker selects a pair, the session takes over: its
  selections are no longer taken, and after `TAKEOVER_LINGER_S` (the peer's own session
  may connect only when our answer reaches it, one chat delivery later, and until then
  its path may be the early one) the early checker rests: closed, so its checks stop,
  and for `TAKEOVER_QUIET_S` deaf to the peer's early checks, which stop too once the
  peer's session connects (or once we no longer answer them);
- while resting it still answers for the ufrag: an authenticated check of the peer
  (its early checker runs again: it restarted with the same key, or lost our session)
  wakes it, and the agent is told (`on_rewoken`: WireGuard's session with the peer is
  likely stale too). A session checker connected at that moment is *stale* (the peer
  no longer knows its credentials): its selections then never override a connected
  early path, and an early path is taken even though that stale session still looks
  connected;
- a checker that finds no pair (an old agent never answers early checks) rests quietly;
  it tries again when the peer's candidates change or its checks arrive.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from aioice import stun
from nacl.encoding import RawEncoder
from nacl.hash import blake2b
from nacl.public import Box, PrivateKey, PublicKey

from kbwg.core.addresses import Address
from kbwg.negotiation import check_messages as messages
from kbwg.negotiation.candidate_pairs import GUESSED_FOUNDATION, CandidatePair
from kbwg.negotiation.candidates import Candidate
from kbwg.negotiation.check_config import CheckCounters
from kbwg.negotiation.pair_table import MAX_SENT
from kbwg.negotiation.priority import TYPE_PREFERENCE
from kbwg.negotiation.wire import CandidateInfo

log = logging.getLogger(__name__)

# BLAKE2b personalisations (at most 16 bytes): one per derived value.
_PERSON_UFRAG = b"kbwg-early-ufrag"
_PERSON_PWD = b"kbwg-early-pwd"
_PERSON_TIE = b"kbwg-early-tie"

# How long the early checker still runs (answers, consent) once our session took over.
TAKEOVER_LINGER_S = 5.0
# After the negotiated session took over, the peer's early checks (its checker stops
# once its own session connects, about a round trip later, or once its consent to us
# fails) do not wake ours again for this long.
TAKEOVER_QUIET_S = 10.0
# A checker that found no pair is woken again by the peer's checks after this (they
# mean the peer learned our key meanwhile: answering at once gives the path).
FAILED_QUIET_S = 1.0
# What an early path's reason says, after the checker's own reason.
EARLY_REASON = "early check, before the answer"

EarlyState = Literal["checking", "connected", "resting", "closed"]


@dataclass(frozen=True)
class EarlyCredentials:
    """Our side's and the peer's derived check credentials, and our role."""

    local_ufrag: str
    local_pwd: str
    remote_ufrag: str
    remote_pwd: str
    controlling: bool
    tie_breaker: int


def _derive(shared: bytes, owner: bytes, person: bytes, size: int) -> bytes:
    return blake2b(owner, digest_size=size, key=shared, person=person, encoder=RawEncoder)


def _ice(raw: bytes) -> str:
    # Standard base64 of a multiple of 3 bytes: A-Z a-z 0-9 + /, the ICE characters.
    return base64.b64encode(raw).decode()


def derive_credentials(my_private: PrivateKey, peer_public: PublicKey) -> EarlyCredentials:
    """Both sides' early check credentials; the peer derives the same, mirrored."""
    mine, theirs = bytes(my_private.public_key), bytes(peer_public)
    if mine == theirs:
        raise ValueError("early checks need two different keys")
    shared = Box(my_private, peer_public).shared_key()

    def ufrag(owner: bytes) -> str:
        return _ice(_derive(shared, owner, _PERSON_UFRAG, 6))

    def pwd(owner: bytes) -> str:
        return _ice(_derive(shared, owner, _PERSON_PWD, 18))

    tie = int.from_bytes(_derive(shared, mine, _PERSON_TIE, 8), "big")
    return EarlyCredentials(ufrag(mine), pwd(mine), ufrag(theirs), pwd(theirs),
                            controlling=mine > theirs, tie_breaker=tie)


class EarlyChecker(Protocol):
    """What an `EarlyPeer` needs of its checker (`checks.PeerChecker`)."""

    @property
    def state(self) -> str: ...

    @property
    def selected(self) -> CandidatePair | None: ...

    @property
    def reason(self) -> str: ...

    def set_remote(self, ufrag: str, pwd: str, candidates: Sequence[CandidateInfo],
                   complete: bool = True) -> None: ...

    def add_remote(self, candidates: Sequence[CandidateInfo], complete: bool,
                   replace: bool = False) -> None: ...

    def datagram_received(self, data: bytes, src: Address,
                          local: Candidate | None = None) -> bool: ...

    def has_transaction(self, transaction_id: bytes) -> bool: ...

    def snapshot(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


SelectedFn = Callable[[CandidatePair | None, str], None]
# A new checker with these credentials, reporting to the given callback.
CheckerMaker = Callable[[EarlyCredentials, SelectedFn], EarlyChecker]
# The negotiated session's current checker (any object; compared by identity) and
# whether it is connected; (None, False) without one.
SessionFn = Callable[[], tuple[object | None, bool]]


def _key(c: CandidateInfo) -> tuple[str, int]:
    return (c.ip, c.port)


def _per_address(candidates: Sequence[CandidateInfo]) -> list[CandidateInfo]:
    """One candidate per address, of the best type (then told over guessed), in first-
    seen order: a peer with no NAT lists its address as both host and srflx, and
    keeping both made every line of it retype the one to the other and back."""
    best: dict[tuple[str, int], CandidateInfo] = {}
    for cand in candidates:
        known = best.get(_key(cand))
        if known is None or _rank(cand) > _rank(known):
            best[_key(cand)] = cand
    return list(best.values())


def _rank(c: CandidateInfo) -> tuple[int, bool]:
    return TYPE_PREFERENCE.get(c.type, -1), c.foundation != GUESSED_FOUNDATION


def _told(reason: str) -> str:
    """A path's reason as early checks tell it (the agent shows where it came from)."""
    return f"{reason}; {EARLY_REASON}"


def _corrects(told: CandidateInfo, known: CandidateInfo) -> bool:
    """`told` says what `known`, at the same address, is: another type, or the type
    `known` only guessed (a relay is then paired with it, see relay_reaches)."""
    return told.type != known.type or (known.foundation == GUESSED_FOUNDATION
                                       and told.foundation != GUESSED_FOUNDATION)


class EarlyPeer:
    """One peer's early checks; registered with the mux as its `CheckReceiver`."""

    def __init__(self, name: str, creds: EarlyCredentials, make: CheckerMaker,
                 on_selected: Callable[[CandidatePair, str], None], session: SessionFn,
                 remote: Sequence[CandidateInfo] = (),
                 on_rewoken: Callable[[], None] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self.name = name
        self.creds = creds
        self._make = make
        self._on_selected = on_selected
        self._session = session
        # Told when the peer's checks wake us after we had checked it before: it
        # restarted (with the same key) or lost our session.
        self._on_rewoken = on_rewoken
        self.remote: list[CandidateInfo] = _per_address(remote)
        self.checker: EarlyChecker | None = None
        # The session checker that was current when the peer's checks woke us.
        self._stale: object | None = None
        # Whether the peer's current path is the one our early checker chose.
        self.in_use = False
        self._quiet_until = -math.inf
        self._rest_why: str | None = None
        self._taken_over = False
        self._linger: asyncio.TimerHandle | None = None
        self._closed = False
        self._started = False
        self.wakes = 0
        self.counters = CheckCounters()  # of checks vetted while resting

    # -- lifecycle --------------------------------------------------------------------

    @property
    def state(self) -> EarlyState:
        if self._closed:
            return "closed"
        if self.checker is None:
            return "resting"
        return "connected" if self.checker.selected is not None else "checking"

    def start(self) -> None:
        """Check the peer's known candidates (unless a checker already runs)."""
        if self._closed or self.checker is not None:
            return
        self._rest_why = None
        self._taken_over = False
        self._started = True
        checker: EarlyChecker | None = None

        def selected(pair: CandidatePair | None, reason: str) -> None:
            if checker is not None and checker is self.checker:
                self._selected(checker, pair, reason)

        checker = self.checker = self._make(self.creds, selected)
        log.debug("%s: early checks of %d candidates", self.name, len(self.remote))
        checker.set_remote(self.creds.remote_ufrag, self.creds.remote_pwd, self.remote,
                           complete=True)

    def set_candidates(self, candidates: Sequence[CandidateInfo]) -> None:
        """The peer's candidates as now known (announcement and published ones); the
        new ones are checked. A checker that found no pair tries again with them.

        A known address whose type changed (the announced endpoint was a host address,
        as the peer's CANDIDATES line now says) is retyped in the running checker's
        pairs (PairTable): the type makes the pair's class ("same LAN" beats "through
        NAT"), and the pair keeps its state, so a path it carries is told again in its
        class without being checked over. One whose type was a guess and is now told
        is taken as told even with the same type: only then is it paired with our
        relay candidates."""
        candidates = _per_address(candidates)
        known = {_key(c): c for c in self.remote}
        new = [c for c in candidates if _key(c) not in known]
        retyped = {_key(c): c for c in candidates
                   if _key(c) in known and _corrects(c, known[_key(c)])}
        if not new and not retyped:
            return
        self.remote = [retyped.get(_key(c), c) for c in self.remote] + new
        # Every CANDIDATES line may bring new addresses for the same key: the newest
        # are kept, as the checker's pair table keeps them (a peer that moved is where
        # it says now; one posting without end must not grow this).
        del self.remote[:-MAX_SENT]
        if self._taken_over:
            return  # the session's checks know better; only remembered for a wake
        if self.checker is not None:
            self.checker.add_remote([*retyped.values(), *new], complete=True, replace=True)
        elif self._rest_why == "found no pair":
            self.start()

    def rest(self, why: str, quiet_s: float) -> None:
        """Stop checking; the peer's checks wake us again only after `quiet_s`."""
        self._quiet_until = max(self._quiet_until, self._loop.time() + quiet_s)
        self._rest_why = why
        self.in_use = False
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        checker, self.checker = self.checker, None
        if checker is not None:
            checker.close()
            log.debug("%s: early checks rest (%s)", self.name, why)

    def close(self) -> None:
        self.rest("closed", math.inf)
        self._closed = True

    def peer_left(self) -> None:
        """The peer's agent stopped (it said bye): rest, and let its next run's first
        check wake us at once (no quiet time: its old checks are gone with it)."""
        if self._closed:
            return
        self.rest("the peer said bye", 0.0)
        self._quiet_until = -math.inf
        self._taken_over = False

    def _selected(self, checker: EarlyChecker, pair: CandidatePair | None,
                  reason: str) -> None:
        if pair is not None:
            self._on_selected(pair, _told(reason))
        elif checker.state == "failed":
            # Quietly: an old agent never answers these, and the offer/answer goes on.
            # Not from inside the checker's callback: it is still running.
            self._loop.call_soon(self._failed, checker)

    def current(self) -> tuple[CandidatePair, str] | None:
        """The path our checker holds now, with its reason as `on_selected` told it."""
        checker = self.checker
        if checker is None or checker.selected is None:
            return None
        return checker.selected, _told(checker.reason)

    def _failed(self, checker: EarlyChecker) -> None:
        if checker is self.checker and checker.state == "failed":
            if self._taken_over:  # the peer's session connected too: its checks stopped
                self.rest("the negotiated session took over", TAKEOVER_QUIET_S)
            else:
                self.rest("found no pair", FAILED_QUIET_S)

    def _linger_over(self, checker: EarlyChecker) -> None:
        self._linger = None
        if checker is self.checker:
            self.rest("the negotiated session took over", TAKEOVER_QUIET_S)

    # -- who sets the path ------------------------------------------------------------

    def accept_early(self) -> bool:
        """Whether our early checker's selection may become the peer's path: not while
        a (not stale) negotiated session is connected."""
        current, connected = self._session()
        if self.checker is None or (connected and current is not None
                                    and current is not self._stale):
            return False
        self.in_use = True
        return True

    def accept_session(self) -> bool:
        """Whether the negotiated session's selection may become the path; a fresh
        session takes over from the early checks."""
        current, _ = self._session()
        if current is not None and current is self._stale:
            # Its credentials are gone from the peer: a connected early path is fresher.
            return self.state != "connected"
        self._stale = None
        self.in_use = False
        if self._taken_over:
            # Only the first selection of the session counts: its later ones (a switch
            # of pair) must not keep a peer that restarted from waking us.
            return True
        self._taken_over = True
        checker = self.checker
        if checker is None:
            self.rest("the negotiated session took over", TAKEOVER_QUIET_S)
        else:
            self._linger = self._loop.call_later(TAKEOVER_LINGER_S, self._linger_over,
                                                 checker)
        return True

    # -- CheckReceiver (the mux) -------------------------------------------------------

    def datagram_received(self, data: bytes, src: Address,
                          local: Candidate | None = None) -> bool:
        if self.checker is None and not self._may_wake(data):
            return False
        if self.checker is None:
            self.wakes += self._started  # else the peer's checks came first: a start
            # A connected session of a peer that checks us early again is one it lost;
            # one still under way (a restart we offered) may yet connect, and take over.
            current, connected = self._session()
            self._stale = current if connected else None
            log.info("%s: early checks from the peer at %s:%s; checking again",
                     self.name, *src)
            rewoken = self._started
            self.start()
            if rewoken and self._on_rewoken is not None:
                self._on_rewoken()
        assert self.checker is not None
        return self.checker.datagram_received(data, src, local)

    def has_transaction(self, transaction_id: bytes) -> bool:
        return self.checker is not None and self.checker.has_transaction(transaction_id)

    def _may_wake(self, data: bytes) -> bool:
        """Only an authenticated early check of the peer wakes a resting checker."""
        if self._closed or self._loop.time() < self._quiet_until:
            return False
        message = messages.parse_check(data, self.counters)
        return (message is not None and message.message_class == stun.Class.REQUEST
                and messages.authentic_request(message, self.creds.local_ufrag,
                                               self.creds.remote_ufrag,
                                               self.creds.local_pwd.encode(),
                                               self.counters))

    # -- status -----------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "role": "controlling" if self.creds.controlling
                else "controlled", "ufrag": self.creds.local_ufrag, "in_use": self.in_use,
                "wakes": self.wakes, "candidates": len(self.remote)}

    def merge_status(self, negotiation: dict[str, Any]) -> dict[str, Any]:
        """The session's status fields, with the early path's in front while it is the
        one in use; and `early_checks` (`to_json`)."""
        view = {**negotiation, "early_checks": self.to_json()}
        checker = self.checker
        if self.in_use and checker is not None and checker.selected is not None:
            snap = checker.snapshot()
            for key in ("path", "local_candidate", "remote_candidate", "interface",
                        "rtt_ms", "reason", "connected_at", "selected_at"):
                view[key] = snap.get(key)
            view["reason"] = f"{snap.get('reason')}; {EARLY_REASON}"
        return view
