"""Early checks for every peer with an announced key (negotiation/early.py), kept in step
with the peers PeerSync configured: one `EarlyPeer` per peer, registered with the check
mux and the device owner under our derived ufrag while the peer's key stays the same.

A peer's early candidates are its announced endpoint and what it published in a
CANDIDATES line for that key (announce_candidates.py). The offer's candidates are not
added: by the time an offer arrives, the session's own checks start at once anyway.

The two lines are sent at once, so either may arrive first. Our checks wait for the
CANDIDATES line (at most `CANDIDATES_WAIT_S`; the peer's own checks start ours at
once): with the announced endpoint alone, a LAN peer's path would first be found
through the router (a NAT that hairpins), and WireGuard's endpoint then moved to the
LAN address a moment later, restarting its handshake.

The announced endpoint's type is a guess (server-reflexive) until that line says what
it is: a LAN peer announces its host address before STUN answers. A path the peer's
checks find through the guess during that wait is held back until the line arrives
(and retypes it: "same LAN") or the wait ends, so that the first path a peer gets is
told in its true class. WireGuard already sends to the announced endpoint meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey

from kbwg.agent.announce import Announcement
from kbwg.agent.announce_candidates import CandidateBook
from kbwg.agent.connectivity import Connectivity
from kbwg.agent.runtime_state import PeerState
from kbwg.core.identity import DeviceId
from kbwg.negotiation.candidate_pairs import GUESSED_FOUNDATION, CandidatePair
from kbwg.negotiation.candidates import candidate_priority
from kbwg.negotiation.early import (
    EarlyChecker,
    EarlyCredentials,
    EarlyPeer,
    SelectedFn,
    derive_credentials,
)
from kbwg.negotiation.wire import CandidateInfo

log = logging.getLogger(__name__)

# The session's current checker (compared by identity) and whether it is connected.
SessionOf = Callable[[DeviceId], tuple[object | None, bool]]
ChosenFn = Callable[[DeviceId, CandidatePair, str], None]

# How long our early checks of a peer wait for its CANDIDATES line after its ANNOUNCE.
CANDIDATES_WAIT_S = 0.3


def early_candidates(ann: Announcement, published: Iterable[CandidateInfo]
                     ) -> list[CandidateInfo]:
    """What a peer published, then its announced endpoint unless published already (as
    server-reflexive: usually its NAT's mapping, else its default address)."""
    found = list(published)
    if not any((c.ip, c.port) == (ann.endpoint_ip, ann.endpoint_port) for c in found):
        found.append(CandidateInfo("srflx", ann.endpoint_ip, ann.endpoint_port,
                                   candidate_priority("srflx"), GUESSED_FOUNDATION))
    return found


class EarlyChecks:
    def __init__(self, paths: Connectivity, private_key: PrivateKey,
                 published: CandidateBook, session_of: SessionOf, chosen: ChosenFn,
                 rewoken: Callable[[DeviceId], None] | None = None) -> None:
        self._paths = paths
        self._rewoken = rewoken
        self._private = private_key
        self._published = published
        self._session_of = session_of
        self._chosen = chosen
        self.peers: dict[DeviceId, EarlyPeer] = {}
        self._keys: dict[DeviceId, str] = {}
        # Peers whose checks wait for their CANDIDATES line.
        self._waiting: dict[DeviceId, asyncio.TimerHandle] = {}
        # A path through a guessed type, held while its peer is in `_waiting`.
        self._held: dict[DeviceId, tuple[CandidatePair, str]] = {}

    def sync(self, peers: Iterable[PeerState]) -> None:
        """Early checks for each configured peer's announced key; gone for the rest."""
        now = time.time()
        wanted: set[DeviceId] = set()
        for peer in peers:
            ann, key = peer.spec.announcement, peer.configured_key
            if ann is None or key is None or ann.public_key != key:
                continue
            device = peer.spec.device
            wanted.add(device)
            published = self._published.of(device, key, now)
            candidates = early_candidates(ann, published)
            current = self.peers.get(device)
            if current is not None and self._keys.get(device) == key:
                current.set_candidates(candidates)
                if published and device in self._waiting:
                    self._start(device)
                continue
            self.forget(device)
            early = self._open(device, key, candidates)
            if early is None:
                continue
            if published:
                early.start()
            else:
                self._waiting[device] = asyncio.get_running_loop().call_later(
                    CANDIDATES_WAIT_S, self._start, device)
        for device in [d for d in self.peers if d not in wanted]:
            self.forget(device)

    def _open(self, device: DeviceId, key: str,
              candidates: list[CandidateInfo]) -> EarlyPeer | None:
        """A registered early peer, not checking yet (see `_start`)."""
        try:
            creds = derive_credentials(self._private, PublicKey(base64.b64decode(key)))
        # Our own key (PeerSync never configures it), junk, or a low-order point
        # (libsodium's CryptoError; announce.py refuses those lines already).
        except (ValueError, CryptoError) as exc:
            log.warning("no early checks with %s: %s", device, exc)
            return None
        name = f"{device} (early)"

        def make(creds: EarlyCredentials, on_selected: SelectedFn) -> EarlyChecker:
            return self._paths.early_checker(creds.local_ufrag, creds.local_pwd,
                                             creds.controlling, creds.tie_breaker,
                                             on_selected, name)

        rewoken = self._rewoken
        early = EarlyPeer(name, creds, make,
                          lambda pair, reason: self._selected(device, pair, reason),
                          lambda: self._session_of(device), candidates,
                          on_rewoken=None if rewoken is None else lambda: rewoken(device))
        try:
            self._paths.mux.register(creds.local_ufrag, early)
        except ValueError as exc:  # a session's random ufrag took it: 2^-48
            log.warning("no early checks with %s: %s", device, exc)
            return None
        self._paths.shared_port.add_ufrag(creds.local_ufrag)
        self.peers[device], self._keys[device] = early, key
        log.debug("%s: early checks, %s, ufrag %s", device,
                  "controlling" if creds.controlling else "controlled", creds.local_ufrag)
        return early

    def _selected(self, device: DeviceId, pair: CandidatePair, reason: str) -> None:
        """The early checks found a path: it goes to the agent, unless it runs through
        the announced endpoint's guessed type while the peer's CANDIDATES line may
        still say otherwise (see the module docstring)."""
        if device in self._waiting and pair.remote.foundation == GUESSED_FOUNDATION:
            log.debug("%s: path through the announced endpoint held until the peer's "
                      "candidates are known", device)
            self._held[device] = (pair, reason)
            return
        self._held.pop(device, None)
        self._chosen(device, pair, reason)

    def _start(self, device: DeviceId) -> None:
        """The wait for `device`'s CANDIDATES line is over: our checks begin, and a path
        held meanwhile goes to the agent if it is still the one selected."""
        waiting = self._waiting.pop(device, None)
        if waiting is not None:
            waiting.cancel()
        early = self.peers.get(device)
        if early is not None:
            early.start()
        held = self._held.pop(device, None)
        if (held is not None and early is not None and early.checker is not None
                and early.checker.selected is held[0]):
            self._chosen(device, *held)

    def peer_left(self, device: DeviceId) -> None:
        """`device`'s agent said bye: its next run (with the same key) wakes our early
        checks at once, which renews WireGuard's session with it (`rewoken`)."""
        early = self.peers.get(device)
        if early is not None:
            early.peer_left()

    def forget(self, device: DeviceId) -> None:
        waiting = self._waiting.pop(device, None)
        if waiting is not None:
            waiting.cancel()
        self._held.pop(device, None)
        early = self.peers.pop(device, None)
        self._keys.pop(device, None)
        if early is None:
            return
        early.close()
        self._paths.mux.unregister(early.creds.local_ufrag)
        self._paths.shared_port.remove_ufrag(early.creds.local_ufrag)

    def accepts(self, device: DeviceId, early: bool) -> bool:
        """Whether a pair chosen by the early checks (`early`) or by the session may
        become the peer's path (EarlyPeer.accept_early / accept_session)."""
        peer = self.peers.get(device)
        if peer is None:
            return not early
        return peer.accept_early() if early else peer.accept_session()

    def session_lost(self, device: DeviceId) -> None:
        """The negotiated session has no path to `device` any more: a path our early
        checks hold (refused while that session looked connected: it may have been dying,
        on an address the peer left) becomes the peer's again."""
        early = self.peers.get(device)
        held = early.current() if early is not None else None
        if held is not None:
            log.info("%s: the session has no path; taking the early checks' again", device)
            self._selected(device, *held)

    def status(self, device: DeviceId, negotiation: dict[str, Any]) -> dict[str, Any]:
        peer = self.peers.get(device)
        return negotiation if peer is None else peer.merge_status(negotiation)

    def close(self) -> None:
        for device in list(self.peers):
            self.forget(device)
