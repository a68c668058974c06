"""Early checks (negotiation/early.py): credentials derived from the two WireGuard keys,
and one peer's early checks from start to takeover, rest and wake, on the in-memory
network of test_checks.py (virtual clock)."""

from __future__ import annotations

import asyncio
import base64
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import cast

import pytest
from nacl.public import PrivateKey
from test_checks import FAST, PORT, Node, SimNet, infos
from virtual_clock import VIRTUAL_CLOCK, advance_until, now

from kbwg.agent.announce import _ANNOUNCE_RE, AnnounceBook, AnnounceError, Announcement
from kbwg.agent.announce_candidates import (
    CandidateBook,
    format_candidates,
    parse_candidates,
)
from kbwg.agent.announce_feed import take_announce_message
from kbwg.agent.claims import ClaimBook
from kbwg.agent.connectivity import Connectivity
from kbwg.agent.early_checks import CANDIDATES_WAIT_S, EarlyChecks
from kbwg.agent.keybase import Channel, ChatMessage
from kbwg.agent.peer_selection import PeerSpec
from kbwg.agent.runtime_state import PeerState
from kbwg.core.identity import DeviceId
from kbwg.negotiation import check_messages as messages
from kbwg.negotiation.candidate_pairs import GUESSED_FOUNDATION, CandidatePair
from kbwg.negotiation.checks import PeerChecker
from kbwg.negotiation.early import (
    EARLY_REASON,
    FAILED_QUIET_S,
    TAKEOVER_LINGER_S,
    TAKEOVER_QUIET_S,
    EarlyCredentials,
    EarlyPeer,
    SelectedFn,
    derive_credentials,
)
from kbwg.negotiation.mux import CheckMux
from kbwg.negotiation.wire import CandidateInfo

pytestmark = VIRTUAL_CLOCK

ICE_CHARS = re.compile(r"^[A-Za-z0-9+/]+$")


# -- derivation -------------------------------------------------------------------------


def test_both_sides_derive_mirrored_credentials() -> None:
    a, b = PrivateKey.generate(), PrivateKey.generate()
    ab = derive_credentials(a, b.public_key)
    ba = derive_credentials(b, a.public_key)
    assert (ab.local_ufrag, ab.local_pwd) == (ba.remote_ufrag, ba.remote_pwd)
    assert (ab.remote_ufrag, ab.remote_pwd) == (ba.local_ufrag, ba.local_pwd)
    # The two directions differ, and exactly one side controls.
    assert ab.local_ufrag != ab.remote_ufrag and ab.local_pwd != ab.remote_pwd
    assert ab.controlling != ba.controlling
    assert ab.controlling == (bytes(a.public_key) > bytes(b.public_key))
    assert ab.tie_breaker != ba.tie_breaker
    # Deterministic: the same keys give the same credentials after a restart.
    assert derive_credentials(a, b.public_key) == ab


def test_credentials_are_ice_sized_and_ice_chars() -> None:
    a, b = PrivateKey.generate(), PrivateKey.generate()
    creds = derive_credentials(a, b.public_key)
    for ufrag in (creds.local_ufrag, creds.remote_ufrag):
        assert ICE_CHARS.match(ufrag) and len(ufrag) * 6 >= 24 and ":" not in ufrag
    for pwd in (creds.local_pwd, creds.remote_pwd):
        assert ICE_CHARS.match(pwd) and len(pwd) * 6 >= 128 and len(pwd) >= 22
    assert 0 <= creds.tie_breaker < 2**64


def test_another_key_gets_other_credentials() -> None:
    a, b, c = (PrivateKey.generate() for _ in range(3))
    ab, ac = derive_credentials(a, b.public_key), derive_credentials(a, c.public_key)
    cb = derive_credentials(c, b.public_key)
    assert {ab.local_ufrag, ab.local_pwd}.isdisjoint({ac.local_ufrag, ac.local_pwd})
    # What b expects from a is not what it expects from c: c cannot pass for a.
    assert (ab.local_ufrag, ab.local_pwd) != (cb.local_ufrag, cb.local_pwd)
    # A new key for b means new credentials with it.
    b2 = PrivateKey.generate()
    assert derive_credentials(a, b2.public_key).local_pwd != ab.local_pwd


def test_same_key_on_both_ends_is_refused() -> None:
    a = PrivateKey.generate()
    with pytest.raises(ValueError):
        derive_credentials(a, a.public_key)


# -- CANDIDATES lines -------------------------------------------------------------------

KEY = base64.b64encode(bytes(range(32))).decode()
ALICE = DeviceId("alice", "laptop")


def chat(body: str, msg_id: int, sender: DeviceId = ALICE, sent_at: float = 1000.0
         ) -> ChatMessage:
    return ChatMessage(id=msg_id, channel=Channel("team", "announce", "chat"),
                       sender_username=sender.username, sender_device=sender.device,
                       body=body, sent_at=sent_at, conversation_id="c", content_type="text")


def test_candidates_line_round_trip_and_old_parsers() -> None:
    cands = [CandidateInfo("host", "198.18.0.2", PORT, 1, "h"),
             CandidateInfo("host", "2001:db8::2", PORT, 1, "h6"),
             CandidateInfo("srflx", "203.0.113.7", 40001, 1, "s"),
             CandidateInfo("relay", "192.0.2.9", 50000, 1, "r")]
    line = format_candidates(KEY, cands)
    assert line is not None
    parsed = parse_candidates(line, ALICE, 5, 1000.0)
    assert [(c.type, c.ip, c.port) for c in parsed.candidates] == [
        ("host", "198.18.0.2", PORT), ("host", "2001:db8::2", PORT),
        ("srflx", "203.0.113.7", 40001), ("relay", "192.0.2.9", 50000)]
    assert parsed.candidates[0].priority > parsed.candidates[1].priority
    # Its own message: the prototype's pattern matches no CANDIDATES line, and the
    # ANNOUNCE message is the unchanged single line.
    assert _ANNOUNCE_RE.match(line) is None
    # Peer-reflexive candidates are learned from checks, not published.
    assert format_candidates(KEY, [CandidateInfo("prflx", "203.0.113.8", 1, 1, "p")]) is None


def test_an_item_of_an_unknown_type_is_skipped_not_the_whole_line() -> None:
    parsed = parse_candidates(f"CANDIDATES {KEY} quic:203.0.113.9:443 host:198.18.0.2:51820",
                              ALICE, 5, 1000.0)
    assert [(c.type, c.ip) for c in parsed.candidates] == [("host", "198.18.0.2")]


@pytest.mark.parametrize("body", [
    "CANDIDATES",
    f"CANDIDATES {KEY}",
    "CANDIDATES notakey host:198.18.0.2:51820",
    f"CANDIDATES {KEY} prflx:198.18.0.2:51820",  # no item of a known type left
    f"CANDIDATES {KEY} host:127.0.0.1:51820",
    f"CANDIDATES {KEY} relay:127.0.0.1:3478",  # relayed items are checked alike
    f"CANDIDATES {KEY} relay:224.0.0.1:3478 srflx:203.0.113.7:40001",
    f"CANDIDATES {KEY} host:fe80::1:51820",
    f"CANDIDATES {KEY} host:198.18.0.2:0",
    f"CANDIDATES {KEY} host:198.18.0.2:x",
    f"CANDIDATES {KEY} host:198.18.0.2",
    f"CANDIDATES {KEY} host:not-an-ip:51820",
    f"CANDIDATES {KEY} " + " ".join(f"host:198.18.0.{i}:51820" for i in range(1, 18)),
])
def test_bad_candidates_lines_are_refused(body: str) -> None:
    with pytest.raises(AnnounceError):
        parse_candidates(body, ALICE, 5, 1000.0)


def test_candidates_book_by_key_and_message_id() -> None:
    book, announcements, claims = CandidateBook(), AnnounceBook(), ClaimBook()
    line = format_candidates(KEY, [CandidateInfo("host", "198.18.0.2", PORT, 1, "h")])
    assert line is not None

    def take(msg: ChatMessage) -> bool:
        return take_announce_message(msg, DeviceId("bob", "pc"), announcements, claims,
                                     [], None, 1100.0, published=book)

    assert take(chat(line, 7))
    assert not take(chat(line, 6))  # older
    assert not take(chat("CANDIDATES junk", 8))  # logged and ignored
    assert [c.ip for c in book.of(ALICE, KEY, 1100.0)] == ["198.18.0.2"]
    other_key = base64.b64encode(bytes(32)).decode()
    assert book.of(ALICE, other_key, 1100.0) == ()  # another key: not for it
    assert book.of(ALICE, KEY, 1000.0 + 7200) == ()  # expired with announcements
    assert not announcements.latest  # not an announcement


# -- one peer's early checks ------------------------------------------------------------


@dataclass
class Side:
    node: Node
    keys: PrivateKey
    early: EarlyPeer | None = None
    chosen: list[tuple[CandidatePair, str]] = field(default_factory=list)
    checkers: list[PeerChecker] = field(default_factory=list)
    # The negotiated session's checker as the agent would report it.
    session: object | None = None
    session_connected: bool = False
    rewoken: int = 0  # times on_rewoken was called

    def open(self, peer: Side, remote: Sequence[CandidateInfo]) -> EarlyPeer:
        creds = derive_credentials(self.keys, peer.keys.public_key)

        def make(creds: EarlyCredentials, on_selected: SelectedFn) -> PeerChecker:
            checker = PeerChecker(self.node.candidates, creds.local_ufrag, creds.local_pwd,
                                  controlling=creds.controlling,
                                  tie_breaker=creds.tie_breaker, send=self.node.send,
                                  on_selected=on_selected, timers=FAST, name=self.node.name)
            self.checkers.append(checker)
            return checker

        early = self.early = EarlyPeer(
            self.node.name, creds, make, lambda pair, why: self.chosen.append((pair, why)),
            lambda: (self.session, self.session_connected), remote,
            on_rewoken=self._rewoken)
        self.node.mux.register(creds.local_ufrag, early)
        early.start()
        return early

    def _rewoken(self) -> None:
        self.rewoken += 1

    def close(self) -> None:
        if self.early is not None:
            self.node.mux.unregister(self.early.creds.local_ufrag)
            self.early.close()

    @property
    def e(self) -> EarlyPeer:
        assert self.early is not None
        return self.early


def lan_pair() -> tuple[SimNet, Side, Side]:
    net = SimNet()
    nat = net.nat("203.0.113.1")
    a, b = Side(net.node("a"), PrivateKey.generate()), Side(net.node("b"), PrivateKey.generate())
    a.node.host("198.18.1.10", lan="lan1", nat=nat, delay=0.002)
    b.node.host("198.18.1.20", lan="lan1", nat=nat, delay=0.002)
    return net, a, b


def sent_by(side: Side) -> int:
    return sum(c.counters.checks + c.counters.retransmits for c in side.checkers)


async def both_chose(a: Side, b: Side) -> None:
    """Each side opens early checks with the other's candidates, until both chose."""
    a.open(b, infos(b.node.candidates))
    b.open(a, infos(a.node.candidates))
    await advance_until(lambda: a.chosen and b.chosen, timeout=1.0)


async def test_early_checks_find_the_lan_path_without_any_exchange() -> None:
    _net, a, b = lan_pair()
    try:
        # Each side knows only the other's key and published host candidate.
        await both_chose(a, b)
        for side in (a, b):
            pair, reason = side.chosen[-1]
            assert pair.path == "direct-lan"
            assert reason.endswith(EARLY_REASON)
            assert side.e.state == "connected"
            assert side.e.accept_early()  # no session yet: the early path is taken
        assert a.e.in_use and a.e.merge_status({"negotiation": "offering"})["path"] == \
            "direct-lan"
        assert a.e.creds.controlling != b.e.creds.controlling
    finally:
        a.close()
        b.close()


async def test_session_takes_over_and_early_checks_stop() -> None:
    _net, a, b = lan_pair()
    try:
        await both_chose(a, b)
        assert a.e.accept_early() and b.e.accept_early()
        # A's negotiated session connects first (A answered B's offer): its selection
        # is taken. A's early checker still answers B's for a while: B's session
        # connects only once A's answer reaches it, and until then B's path is the
        # early one.
        a.session, a.session_connected = object(), True
        assert a.e.accept_session()
        assert not a.e.in_use and a.e.state == "connected"
        assert not a.e.accept_early()  # A's early choices are no longer taken
        await asyncio.sleep(TAKEOVER_LINGER_S / 2)
        assert b.e.state == "connected"  # B's early path kept working
        b.session, b.session_connected = object(), True
        assert not b.e.accept_early()
        assert b.e.accept_session()
        await asyncio.sleep(TAKEOVER_LINGER_S)
        assert a.e.state == "resting" and b.e.state == "resting"
        assert a.checkers[-1].state == "closed" and b.checkers[-1].state == "closed"
        assert a.e.wakes == 0 and b.e.wakes == 0
        quiet = sent_by(a) + sent_by(b)
        await asyncio.sleep(TAKEOVER_QUIET_S + 1)
        assert sent_by(a) + sent_by(b) == quiet  # nothing more is sent
        assert len(a.checkers) == 1 and len(b.checkers) == 1
    finally:
        a.close()
        b.close()


async def test_a_restarted_peer_wakes_the_resting_side() -> None:
    _net, a, b = lan_pair()
    try:
        await both_chose(a, b)
        stale = object()
        a.session, a.session_connected = stale, True
        assert a.e.accept_session()
        b.session, b.session_connected = object(), True
        assert b.e.accept_session()
        await asyncio.sleep(TAKEOVER_LINGER_S + TAKEOVER_QUIET_S + 1)
        assert a.e.state == "resting"
        # A's session switching pairs (its consent failing, B gone) is no new takeover:
        # it must not keep B's checks from waking A.
        assert a.e.accept_session()
        # B restarts with the same key: a fresh early peer, nothing exchanged. A's
        # session still looks connected, but its peer forgot it.
        b.close()
        b.chosen.clear()
        a.chosen.clear()
        b.open(a, infos(a.node.candidates))
        await advance_until(lambda: a.chosen and b.chosen, timeout=1.0)
        assert a.e.wakes == 1 and a.e.state == "connected"
        assert a.rewoken == 1 and b.rewoken == 0  # the agent renews WireGuard's session
        assert a.chosen[-1][0].path == "direct-lan"
        # The stale session's later choices (its consent failing over to another
        # pair) do not override the fresh early path; the early one is taken.
        assert a.e.accept_early()
        assert not a.e.accept_session()
        assert a.e.state == "connected"
        # A renegotiated session (a new checker) takes over again.
        a.session = object()
        assert a.e.accept_session()
        assert not a.e.accept_early()
        await asyncio.sleep(TAKEOVER_LINGER_S + 0.1)
        assert a.e.state == "resting"
    finally:
        a.close()
        b.close()


async def test_a_peer_that_said_bye_wakes_us_at_once_when_it_is_back() -> None:
    _net, a, b = lan_pair()
    try:
        await both_chose(a, b)
        for side in (a, b):
            side.session, side.session_connected = object(), True
            assert side.e.accept_session()
        await asyncio.sleep(TAKEOVER_LINGER_S + 0.1)
        assert a.e.state == "resting"  # and deaf to B's early checks for a while
        # B's agent stops (bye) and starts again at once with the same key: its checks
        # wake A at once, not after the quiet time, and A's agent is told.
        a.e.peer_left()
        b.close()
        a.chosen.clear()
        b.chosen.clear()
        start = now()
        b.open(a, infos(a.node.candidates))
        await advance_until(lambda: a.chosen and b.chosen, timeout=1.0)
        assert now() - start < 1.0 < TAKEOVER_QUIET_S
        assert a.e.wakes == 1 and a.rewoken == 1
    finally:
        a.close()
        b.close()


async def controlled_end_restarts(a: Side, b: Side) -> tuple[Side, Side, PeerChecker]:
    """A and B connected; the controlled end restarts with its key (a fresh early peer,
    its choices forgotten on both sides) until its first pair works: (the controlling
    end, the controlled one, the new run's checker)."""
    await both_chose(a, b)
    ctl, ctd = (a, b) if a.e.creds.controlling else (b, a)
    ctd.close()
    ctl.chosen.clear()
    ctd.chosen.clear()
    ctd.open(ctl, infos(ctl.node.candidates))
    new_run = ctd.checkers[-1]
    await advance_until(lambda: any(p.state == "succeeded" for p in new_run.pairs),
                        timeout=1.0)
    return ctl, ctd, new_run


async def test_a_bye_delivered_after_the_new_runs_first_checks_does_not_strand_it() -> None:
    """The bye of a peer's previous run can arrive (one chat delivery late) after its
    new run's first early checks worked and before our nomination went out: we rest,
    and the new run, controlled, would wait for a nomination that never comes. Its
    check of the working pair, again after `nomination_wait`, wakes us."""
    _net, a, b = lan_pair()
    try:
        ctl, ctd, new_run = await controlled_end_restarts(a, b)
        # The instant the new run's first pair works, the old run's bye is taken.
        assert not ctd.chosen
        ctl.e.peer_left()
        assert ctl.e.state == "resting"
        took = await advance_until(lambda: ctd.chosen, timeout=10.0,
                                   what="the new run to be nominated")
        assert FAST.nomination_wait <= took < FAST.nomination_wait + 1.0
        assert ctd.chosen[-1][0].path == "direct-lan"
        assert ctl.e.wakes == 1 and ctl.rewoken == 1  # its WireGuard session renewed
        assert new_run.counters.checks > 0
    finally:
        a.close()
        b.close()


async def test_a_controlled_side_without_a_nomination_rechecks_only_a_few_times() -> None:
    _net, a, b = lan_pair()
    try:
        ctl, _ctd, new_run = await controlled_end_restarts(a, b)
        ctl.close()  # the controlling side is gone for good: nothing answers
        sent = new_run.counters.checks
        waits = sum(FAST.nomination_wait * 2 ** i for i in range(FAST.nomination_rechecks))
        await asyncio.sleep(waits + 1.0)
        assert new_run.counters.checks - sent == FAST.nomination_rechecks
        await asyncio.sleep(waits * 4)
        assert new_run.counters.checks - sent == FAST.nomination_rechecks
    finally:
        a.close()
        b.close()


async def test_without_a_bye_the_quiet_time_after_a_takeover_holds() -> None:
    _net, a, b = lan_pair()
    try:
        await both_chose(a, b)
        a.session, a.session_connected = object(), True
        assert a.e.accept_session()
        await asyncio.sleep(TAKEOVER_LINGER_S + 0.1)
        assert a.e.state == "resting"
        b.close()
        b.open(a, infos(a.node.candidates))
        await asyncio.sleep(1.0)
        assert a.e.wakes == 0 and a.rewoken == 0 and a.e.state == "resting"
    finally:
        a.close()
        b.close()


async def test_a_session_under_way_at_a_wake_still_takes_over() -> None:
    _net, a, b = lan_pair()
    try:
        await both_chose(a, b)
        for side in (a, b):
            side.session, side.session_connected = object(), True
            assert side.e.accept_session()
        await asyncio.sleep(TAKEOVER_LINGER_S + TAKEOVER_QUIET_S + 1)
        # A's path went quiet and A offered a restart (a new session, not connected)
        # when B came back with its key: B's checks wake A.
        a.session, a.session_connected = object(), False
        b.close()
        b.open(a, infos(a.node.candidates))
        await advance_until(lambda: a.e.state == "connected", timeout=1.0)
        assert a.e.accept_early()
        # The restart's session connects: it is not stale, it takes over.
        a.session_connected = True
        assert a.e.accept_session() and not a.e.in_use
        assert not a.e.accept_early()
    finally:
        a.close()
        b.close()


async def test_an_old_peer_never_answers_and_early_checks_rest_quietly() -> None:
    _net, a, b = lan_pair()
    try:
        a.open(b, infos(b.node.candidates))  # b runs no early checks: an old agent
        await advance_until(lambda: a.e.state == "resting", timeout=10.0)
        assert a.chosen == []  # no path, and no "no path" either: quietly
        assert a.checkers[-1].state == "closed"
        sent = sent_by(a)
        await asyncio.sleep(FAILED_QUIET_S * 4)
        assert sent_by(a) == sent and len(a.checkers) == 1
        # New candidates of the peer: it tries again.
        a.e.set_candidates([CandidateInfo("srflx", "203.0.113.1", 40001, 1, "s")])
        assert a.e.state == "checking" and len(a.checkers) == 2
    finally:
        a.close()


async def test_only_an_authenticated_check_wakes_a_resting_peer() -> None:
    _net, a, b = lan_pair()
    try:
        early = a.open(b, [])  # nothing to check: rests at once
        await advance_until(lambda: early.state == "resting", timeout=1.0)
        await asyncio.sleep(FAILED_QUIET_S + 0.1)
        creds = early.creds
        # Someone who saw the ufrag on the wire but has no password.
        forged = messages.binding_request(
            username=f"{creds.local_ufrag}:{creds.remote_ufrag}", priority=1,
            controlling=False, tie_breaker=1, use_candidate=False, key=b"guess")
        assert not a.node.mux.datagram_received(bytes(forged), ("198.18.1.20", PORT),
                                                a.node.candidates[0])
        assert early.state == "resting" and early.wakes == 0
        real = messages.binding_request(
            username=f"{creds.local_ufrag}:{creds.remote_ufrag}", priority=1,
            controlling=not creds.controlling, tie_breaker=1, use_candidate=False,
            key=creds.local_pwd.encode())
        assert a.node.mux.datagram_received(bytes(real), ("198.18.1.20", PORT),
                                            a.node.candidates[0])
        assert early.wakes == 1 and early.state == "checking"
    finally:
        a.close()


async def test_an_announced_host_address_is_retyped_as_host_in_place() -> None:
    _net, a, b = lan_pair()
    try:
        host = infos(b.node.candidates)[0]
        # B announced its host address (STUN had not answered yet): taken as
        # server-reflexive until B's CANDIDATES line says what it is.
        a.open(b, [CandidateInfo("srflx", host.ip, host.port, 1, "announced")])
        b.open(a, infos(a.node.candidates))
        await advance_until(lambda: a.chosen, timeout=1.0)
        assert a.chosen[-1][0].path != "direct-lan"
        first = a.chosen[-1][0]
        a.e.set_candidates([host])
        # The same pair, told again at once in its class: no checks started over.
        assert a.chosen[-1][0] is first and first.path == "direct-lan"
        assert "same LAN" in a.chosen[-1][1]
        assert len(a.checkers) == 1 and a.checkers[0].state == "connected"
        assert [c.type for c in a.e.remote] == ["host"]
    finally:
        a.close()
        b.close()


async def test_a_peer_listing_one_address_as_host_and_srflx_keeps_its_class() -> None:
    """A peer with no NAT lists its address twice, host and server-reflexive (its STUN
    server saw it as it is). Each CANDIDATES line or announcement of it used to flip
    the known candidate between the two, and the path's class with it (seen in random
    world 744: a public peer reported "direct through NAT" every other time)."""
    _net, a, b = lan_pair()
    try:
        host = infos(b.node.candidates)[0]
        public = [host, CandidateInfo("srflx", host.ip, host.port, 1, "srflx0")]
        a.open(b, public)
        b.open(a, infos(a.node.candidates))
        await advance_until(lambda: a.chosen, timeout=1.0)
        first = a.chosen[-1][0]
        assert first.path == "direct-lan"
        told = len(a.chosen)
        for _ in range(3):  # every line from B repeats both
            a.e.set_candidates(public)
            await asyncio.sleep(0.1)
        assert [c.type for c in a.e.remote] == ["host"]
        assert len(a.chosen) == told and a.chosen[-1][0].path == "direct-lan"
        assert a.checkers[-1].snapshot()["path"] == "direct-lan"
    finally:
        a.close()
        b.close()


async def test_an_announced_guess_told_with_the_same_type_is_taken_as_told() -> None:
    _net, a, b = lan_pair()
    try:
        guess = CandidateInfo("srflx", "203.0.113.1", 40001, 1, GUESSED_FOUNDATION)
        a.open(b, [guess])
        told = CandidateInfo("srflx", "203.0.113.1", 40001, 1, "s")
        a.e.set_candidates([told])
        # No longer a guess: a relay candidate may now be paired with it (relay_reaches,
        # test_checks.py).
        assert a.e.remote == [told]
    finally:
        a.close()


# -- the agent's manager: one early peer per announced key ------------------------------


@dataclass
class FakePort:
    ufrags: set[str] = field(default_factory=set)

    def add_ufrag(self, ufrag: str) -> None:
        self.ufrags.add(ufrag)

    def remove_ufrag(self, ufrag: str) -> None:
        self.ufrags.discard(ufrag)


@dataclass
class FakePaths:
    """What EarlyChecks uses of Connectivity."""

    mux: CheckMux = field(default_factory=CheckMux)
    shared_port: FakePort = field(default_factory=FakePort)
    made: list[PeerChecker] = field(default_factory=list)

    def early_checker(self, ufrag: str, pwd: str, controlling: bool, tie_breaker: int,
                      on_selected: SelectedFn, name: str) -> PeerChecker:
        checker = PeerChecker([], ufrag, pwd, controlling=controlling,
                              tie_breaker=tie_breaker, send=lambda *_: None,
                              on_selected=on_selected, timers=FAST, name=name)
        self.made.append(checker)
        return checker


def peer_state(device: DeviceId, key: PrivateKey, endpoint: str = "198.18.0.6:51820",
               msg_id: int = 1, configured: bool = True) -> PeerState:
    ip, _, port = endpoint.rpartition(":")
    b64 = base64.b64encode(bytes(key.public_key)).decode()
    ann = Announcement(device, ip, int(port), b64, msg_id, 1000.0)
    return PeerState(PeerSpec(device, IPv4Address("100.64.0.2"), ann),
                     configured_key=b64 if configured else None)


async def test_manager_follows_peers_and_their_keys() -> None:
    me, bob_key, bob_new_key = (PrivateKey.generate() for _ in range(3))
    bob = DeviceId("bob", "desk")
    paths, book = FakePaths(), CandidateBook()
    early = EarlyChecks(cast(Connectivity, paths), me, book, lambda _d: (None, False),
                        lambda *_: None)
    try:
        early.sync([peer_state(bob, bob_key, configured=False)])
        assert early.peers == {}  # no key configured yet: nothing runs
        early.sync([peer_state(bob, bob_key)])
        first = early.peers[bob]
        ufrag = first.creds.local_ufrag
        assert paths.mux.checker(ufrag) is first and paths.shared_port.ufrags == {ufrag}
        # Registered at once (bob's checks are answered), but our own checks wait a
        # moment for bob's CANDIDATES line, sent at the same time as its ANNOUNCE.
        assert first.state == "resting" and paths.made == []
        await asyncio.sleep(CANDIDATES_WAIT_S + 0.01)
        assert len(paths.made) == 1 and first.wakes == 0  # started (no local bases here)
        assert [(c.type, c.ip) for c in first.remote] == [("srflx", "198.18.0.6")]
        # The same key again: the same early peer (at most one per peer).
        early.sync([peer_state(bob, bob_key, msg_id=2)])
        assert early.peers[bob] is first and len(paths.made) == 1
        # Bob's CANDIDATES line for this key: its host address is checked too.
        b64 = base64.b64encode(bytes(bob_key.public_key)).decode()
        line = format_candidates(b64, [CandidateInfo("host", "192.0.2.6", PORT, 1, "h")])
        assert line is not None
        book.offer(parse_candidates(line, bob, 3, time.time()))
        early.sync([peer_state(bob, bob_key, msg_id=2)])
        assert {c.ip for c in first.remote} == {"198.18.0.6", "192.0.2.6"}
        # A new key: new credentials, the old ufrag no longer answers.
        early.sync([peer_state(bob, bob_new_key, msg_id=4)])
        second = early.peers[bob]
        await asyncio.sleep(CANDIDATES_WAIT_S + 0.01)
        assert second is not first and first.state == "closed"
        assert paths.mux.checker(ufrag) is None
        assert paths.shared_port.ufrags == {second.creds.local_ufrag}
        # The CANDIDATES line was for the old key: not used with the new one.
        assert [c.ip for c in second.remote] == ["198.18.0.6"]
        # Bob is no longer a peer.
        early.sync([])
        assert early.peers == {} and paths.shared_port.ufrags == set()
        assert paths.mux.checker(second.creds.local_ufrag) is None
        # Without early checks for a peer, only the session sets its path.
        assert early.accepts(bob, early=False) and not early.accepts(bob, early=True)
    finally:
        early.close()


async def test_manager_checks_at_once_with_the_candidates_line() -> None:
    me, bob_key = PrivateKey.generate(), PrivateKey.generate()
    bob = DeviceId("bob", "desk")
    paths, book = FakePaths(), CandidateBook()
    early = EarlyChecks(cast(Connectivity, paths), me, book, lambda _d: (None, False),
                        lambda *_: None)
    try:
        b64 = base64.b64encode(bytes(bob_key.public_key)).decode()
        line = format_candidates(b64, [CandidateInfo("host", "192.0.2.6", PORT, 1, "h")])
        assert line is not None
        # The line came first (or with the announcement): no wait.
        book.offer(parse_candidates(line, bob, 3, time.time()))
        early.sync([peer_state(bob, bob_key)])
        assert len(paths.made) == 1
        early.forget(bob)
        # The announcement first, the line a moment later: checks start with it.
        book2 = CandidateBook()
        early2 = EarlyChecks(cast(Connectivity, paths), me, book2,
                             lambda _d: (None, False), lambda *_: None)
        early2.sync([peer_state(bob, bob_key)])
        assert len(paths.made) == 1
        book2.offer(parse_candidates(line, bob, 3, time.time()))
        early2.sync([peer_state(bob, bob_key)])
        assert len(paths.made) == 2
        assert {c.type for c in early2.peers[bob].remote} == {"host", "srflx"}
        early2.close()
    finally:
        early.close()


@dataclass
class SimPaths:
    """What EarlyChecks uses of Connectivity, on a node of the in-memory network."""

    node: Node
    shared_port: FakePort = field(default_factory=FakePort)

    @property
    def mux(self) -> CheckMux:
        return self.node.mux

    def early_checker(self, ufrag: str, pwd: str, controlling: bool, tie_breaker: int,
                      on_selected: SelectedFn, name: str) -> PeerChecker:
        return PeerChecker(self.node.candidates, ufrag, pwd, controlling=controlling,
                           tie_breaker=tie_breaker, send=self.node.send,
                           on_selected=on_selected, timers=FAST, name=name)


@pytest.mark.parametrize("line_arrives", [True, False])
async def test_a_path_through_the_announced_guess_waits_for_the_candidates_line(
        line_arrives: bool) -> None:
    """Alice reads Bob's ANNOUNCE (his host address: STUN had not answered) before his
    CANDIDATES line; Bob has both of hers and checks at once. The path his checks
    find is only told once the line says the address is his host's: same LAN, the
    first time. Without the line, it is told when the wait for it ends."""
    _net, a, b = lan_pair()
    alice, bob = DeviceId("alice", "laptop"), DeviceId("bob", "desk")
    a_chosen: list[tuple[CandidatePair, str]] = []
    a_book, b_book = CandidateBook(), CandidateBook()
    a_early = EarlyChecks(cast(Connectivity, SimPaths(a.node)), a.keys, a_book,
                          lambda _d: (None, False), lambda _d, p, r: a_chosen.append((p, r)))
    b_early = EarlyChecks(cast(Connectivity, SimPaths(b.node)), b.keys, b_book,
                          lambda _d: (None, False), lambda *_: None)
    a_host, b_host = infos(a.node.candidates)[0], infos(b.node.candidates)[0]
    b_line = format_candidates(base64.b64encode(bytes(b.keys.public_key)).decode(), [b_host])
    a_line = format_candidates(base64.b64encode(bytes(a.keys.public_key)).decode(), [a_host])
    assert a_line is not None and b_line is not None
    try:
        a_early.sync([peer_state(bob, b.keys, f"{b_host.ip}:{b_host.port}")])
        b_book.offer(parse_candidates(a_line, alice, 3, time.time()))
        b_early.sync([peer_state(alice, a.keys, f"{a_host.ip}:{a_host.port}")])
        # Bob's checks wake Alice's early peer; a path is found through the guess.
        early = a_early.peers[bob]
        await advance_until(lambda: early.checker is not None
                            and early.checker.selected is not None, timeout=CANDIDATES_WAIT_S)
        assert early.checker is not None and early.checker.selected is not None
        assert early.checker.selected.path == "direct"
        assert a_chosen == []
        if line_arrives:
            a_book.offer(parse_candidates(b_line, bob, 4, time.time()))
            a_early.sync([peer_state(bob, b.keys, f"{b_host.ip}:{b_host.port}")])
            assert [p.path for p, _ in a_chosen] == ["direct-lan"]
            assert "same LAN" in a_chosen[0][1] and a_chosen[0][0] is early.checker.selected
        else:
            await advance_until(lambda: a_chosen, timeout=CANDIDATES_WAIT_S)
            assert [p.path for p, _ in a_chosen] == ["direct"]
    finally:
        a_early.close()
        b_early.close()


async def test_a_session_that_loses_its_path_gives_it_back_to_the_early_checks() -> None:
    """A session can look connected on a dying pair (an address the peer just left) while
    the early checks already follow the peer to its new one: their path was refused
    then. When the session finds no path, theirs is the peer's again."""
    _net, a, b = lan_pair()
    alice, bob = DeviceId("alice", "laptop"), DeviceId("bob", "desk")
    a_chosen: list[tuple[DeviceId, CandidatePair, str]] = []
    a_book, b_book = CandidateBook(), CandidateBook()
    a_early = EarlyChecks(cast(Connectivity, SimPaths(a.node)), a.keys, a_book,
                          lambda _d: (None, False),
                          lambda d, p, r: a_chosen.append((d, p, r)))
    b_early = EarlyChecks(cast(Connectivity, SimPaths(b.node)), b.keys, b_book,
                          lambda _d: (None, False), lambda *_: None)
    a_host, b_host = infos(a.node.candidates)[0], infos(b.node.candidates)[0]
    for book, host, key, sender in ((a_book, b_host, b.keys, bob),
                                    (b_book, a_host, a.keys, alice)):
        line = format_candidates(base64.b64encode(bytes(key.public_key)).decode(), [host])
        assert line is not None
        book.offer(parse_candidates(line, sender, 3, time.time()))
    try:
        a_early.sync([peer_state(bob, b.keys, f"{b_host.ip}:{b_host.port}")])
        b_early.sync([peer_state(alice, a.keys, f"{a_host.ip}:{a_host.port}")])
        await advance_until(lambda: a_chosen, timeout=1.0)
        a_chosen.clear()
        a_early.session_lost(bob)
        ((device, pair, reason),) = a_chosen
        checker = a_early.peers[bob].checker
        assert device == bob and checker is not None and pair is checker.selected
        assert reason.endswith(EARLY_REASON) and "same LAN" in reason
        # Nothing to give for a peer without early checks.
        a_early.session_lost(DeviceId("carol", "phone"))
        assert len(a_chosen) == 1
    finally:
        a_early.close()
        b_early.close()
