"""What a hostile team member (posting in #announce or the dev channel without end) can
make an agent keep or do is bounded: expired lines leave the books without reopening a
replay, a device's claims and one history read are capped (the newest kept), messages
held for a peer not announced yet expire, and the log lines about refused messages are
limited (core.loglimit)."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv4Network
from types import SimpleNamespace
from typing import Any, cast

import pytest
from nacl.public import PrivateKey
from test_claims import IP_A, T0, claim, offer
from test_session import ALICE, BOB, LONG, pair, settle
from test_upkeep import FakeNegotiator, FakePaths, FakePresence, upkeep
from virtual_clock import VIRTUAL_CLOCK

from kbwg.agent.announce import ANNOUNCE_TTL_S
from kbwg.agent.announce_feed import take_announce_message
from kbwg.agent.chat_dispatch import ChatDispatch
from kbwg.agent.claims import MAX_CLAIMS_PER_DEVICE, ClaimBook
from kbwg.agent.keybase import Channel, ChatMessage
from kbwg.agent.peer_selection import desired_peers
from kbwg.agent.peers_file import PeerEntry
from kbwg.agent.team_view import HISTORY_MAX_MESSAGES, TeamView
from kbwg.agent.teamconfig import TeamConfig
from kbwg.agent.upkeep import LOST_PATH_SPACING_S
from kbwg.core.identity import DeviceId
from kbwg.core.loglimit import BURST, LINES_PER_SECOND
from kbwg.negotiation.session import PENDING_TTL_S
from kbwg.negotiation.wire import MAX_TEXT, BadBox, NotForUs, ignored_notes, log_ignored

TEAM = "t1"
ANNOUNCE = Channel(TEAM, "announce", "chat")
DEV = Channel(TEAM, "kbwg", "dev")
ME = DeviceId("me", "box")
LISTED = DeviceId("alice", "laptop")
CLAIMANT = DeviceId("carol", "phone")
RANGE = IPv4Network("100.64.128.0/17")
FLOOD = 300


def new_key() -> str:
    return base64.b64encode(bytes(PrivateKey.generate().public_key)).decode()


def post(msg_id: int, sender: DeviceId, body: str, sent_at: float,
         channel: Channel = ANNOUNCE) -> ChatMessage:
    return ChatMessage(msg_id, f"conv-{channel.topic_name}", channel, sender.username,
                       sender.device, sent_at, body, "text")


def bound(started: float) -> int:
    """The most lines a LimitedLog lets through since `started` (monotonic)."""
    return BURST + int((time.monotonic() - started) * LINES_PER_SECOND) + 1


def lines(caplog: pytest.LogCaptureFixture, logger: str, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == logger and text in r.getMessage()]


def team(keybase: object = None) -> TeamView:
    view = TeamView(keybase=cast(Any, keybase), team=TEAM,
                    config=TeamConfig(dynamic_range=RANGE))
    view.entries = [PeerEntry("me", "box", IPv4Address("100.64.0.1")),
                    PeerEntry("alice", "laptop", IPv4Address("100.64.0.2"))]
    return view


def take(view: TeamView, msg: ChatMessage, now: float) -> bool:
    """As `TeamView.take_announce`, at `now` instead of the wall clock."""
    return take_announce_message(msg, ME, view.announcements, view.claims, view.entries,
                                 view.config.dynamic_range, now, view.keys, view.published,
                                 view.notes)


# -- #announce: the books ------------------------------------------------------------


def test_expired_lines_of_devices_that_make_no_peer_are_forgotten_and_stay_refused() -> None:
    """A member posting as many devices (or one device's lines that expired) grew the
    announcement and CANDIDATES books for good. Pruned: what a listed peer or a live
    claimant still needs stays (the desired peers are the same), and a forgotten line
    posted again, or an older one, is refused as expired: no replay."""
    view = team()
    t0 = T0
    take(view, post(1, LISTED, f"ANNOUNCE 203.0.113.2:51820 {new_key()}", t0), t0)
    carol_key = new_key()
    take(view, post(2, CLAIMANT, f"ANNOUNCE 203.0.113.3:51820 {carol_key}", t0), t0)
    # Carol's claim comes later: it is still live when her announcement has expired.
    assert take(view, post(3, CLAIMANT, f"CLAIM 100.64.130.7 {carol_key}", t0 + 100), t0 + 100)
    strangers = [DeviceId("mallory", f"dev{i}") for i in range(FLOOD)]
    lines_of: dict[DeviceId, ChatMessage] = {}
    for i, device in enumerate(strangers):
        key = new_key()
        lines_of[device] = post(100 + i, device, f"ANNOUNCE 198.51.100.9:51820 {key}", t0)
        assert take(view, lines_of[device], t0)
        assert take(view, post(1000 + i, device, f"CANDIDATES {key} host:198.51.100.9:51820",
                               t0), t0)
    fresh_key = new_key()
    assert take(view, post(5000, LISTED, f"CANDIDATES {fresh_key} host:198.18.0.2:51820",
                           t0 + ANNOUNCE_TTL_S), t0 + ANNOUNCE_TTL_S)

    later = t0 + ANNOUNCE_TTL_S + 50
    before = desired_peers(ME, view.entries, view.announcements, view.claims,
                           view.config.policy, later, view.keys, None)
    view.prune(later)
    after = desired_peers(ME, view.entries, view.announcements, view.claims,
                          view.config.policy, later, view.keys, None)

    assert set(view.announcements.latest) == {LISTED, CLAIMANT}
    assert set(view.published.latest) == {LISTED}
    assert after.peers == before.peers and set(after.peers) == {LISTED, CLAIMANT}
    assert after.peers[CLAIMANT].announcement is not None
    # A forgotten line again, or an older one of that device: refused, not taken.
    stranger = strangers[0]
    assert not take(view, lines_of[stranger], later)
    older = post(50, stranger, f"ANNOUNCE 198.51.100.9:51820 {new_key()}", t0 - 10)
    assert not take(view, older, later)
    assert stranger not in view.announcements.latest


def test_a_device_claiming_without_end_keeps_a_bounded_history_and_its_rank() -> None:
    """Every claim of a device is kept for an hour (its seniority): a member claiming
    without end made each claim, sync and status walk all of them. Past the cap the
    oldest go as expired ones do, their run's rank carried."""
    book = ClaimBook()
    count = MAX_CLAIMS_PER_DEVICE + 200
    now = T0 + count + 1
    alice = DeviceId("alice", "laptop")
    for msg_id in range(1, count + 1):
        assert offer(book, claim(alice, IP_A, msg_id, T0 + msg_id), now)
    assert len(book._devices[alice].claims) <= MAX_CLAIMS_PER_DEVICE
    assert book.seniority(alice) == 1
    # Its first claim still ranks it: a rival claiming the address now loses to it.
    rival = claim(DeviceId("bob", "desk"), IP_A, count + 1, now)
    assert offer(book, rival, now)
    holder = book.owner_of(IP_A, now)
    assert holder is not None and holder.sender == alice
    # A claim older than the ones kept is not taken again.
    assert not offer(book, claim(alice, IP_A, 5, T0 + 5), now)


# -- #announce: one history read -----------------------------------------------------


class FloodedHistory:
    """#announce after a member posted far more than one read takes: newest first."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.yielded = 0
        self.closed = False

    async def read_history(self, channel: Channel, since: float) -> AsyncIterator[ChatMessage]:
        try:
            for msg_id in range(self.count, 0, -1):
                self.yielded += 1
                yield post(msg_id, DeviceId("mallory", "box"), f"junk {msg_id}", time.time())
        finally:
            self.closed = True


async def test_one_history_read_takes_the_newest_messages_only(
        caplog: pytest.LogCaptureFixture) -> None:
    history = FloodedHistory(3 * HISTORY_MAX_MESSAGES)
    with caplog.at_level(logging.WARNING, logger="kbwg.agent.team_view"):
        messages = await team(history).fetch_history(first=True)
    assert [m.id for m in messages] == list(range(history.count, history.count
                                                  - HISTORY_MAX_MESSAGES, -1))
    assert history.yielded <= HISTORY_MAX_MESSAGES + 1 and history.closed
    assert lines(caplog, "kbwg.agent.team_view", "newest")


def test_refused_announce_lines_write_a_bounded_log(caplog: pytest.LogCaptureFixture) -> None:
    """Every history read meets the refused lines again: one warning each, each time."""
    view = team()
    junk = [post(i, DeviceId("mallory", "box"), f"ANNOUNCE nowhere {i}", time.time())
            for i in range(1, FLOOD + 1)]
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="kbwg.agent.announce_feed"):
        view.take_history(junk, ME)
    refused = lines(caplog, "kbwg.agent.announce_feed", "ignoring message")
    assert 1 <= len(refused) <= bound(started)


# -- the dev channel -----------------------------------------------------------------


class FakeState:
    def __init__(self) -> None:
        self.me = ME
        self.peers: dict[DeviceId, object] = {}  # nobody: every sender is a non-peer


class RecordingNegotiator:
    def __init__(self) -> None:
        self.handled: list[ChatMessage] = []

    async def handle(self, msg: ChatMessage) -> None:
        self.handled.append(msg)


async def test_negotiation_messages_of_non_peers_write_a_bounded_log(
        caplog: pytest.LogCaptureFixture) -> None:
    negotiator = RecordingNegotiator()
    dispatch = ChatDispatch(team(), cast(Any, FakeState()), cast(Any, None), cast(Any, None),
                            cast(Any, negotiator))
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="kbwg.agent.chat_dispatch"):
        for i in range(1, FLOOD + 1):
            await dispatch.on_message(post(i, DeviceId("mallory", "box"), "x", time.time(),
                                           DEV))
    ignored = lines(caplog, "kbwg.agent.chat_dispatch", "not a peer")
    assert 1 <= len(ignored) <= bound(started)
    assert negotiator.handled == []


@VIRTUAL_CLOCK
async def test_refused_negotiation_messages_of_a_peer_write_a_bounded_log(
        caplog: pytest.LogCaptureFixture) -> None:
    bus, alice, bob = pair(offer_grace_s=LONG, answer_timeout_s=LONG)
    alice.meet(they_joined_later=True)  # a session with bob: his posts are opened
    await settle(bus, alice, bob)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="kbwg.negotiation.wire"):
        for i in range(FLOOD):
            await alice.negotiator.handle(bus.message(BOB, f"not a sealed message {i}"))
    ignored = lines(caplog, "kbwg.negotiation.wire", "ignoring negotiation message")
    assert 1 <= len(ignored) <= bound(started)


@VIRTUAL_CLOCK
async def test_a_peer_offering_without_end_writes_a_bounded_log(
        caplog: pytest.LogCaptureFixture) -> None:
    """A peer's offers are authentic (sealed by its key), yet it can post them without
    end: each is answered, and only the first lines (then a trickle) are logged."""
    bus, alice, bob = pair(offer_grace_s=LONG, answer_timeout_s=LONG)
    alice.meet(they_joined_later=True)
    bob.meet(they_joined_later=False)
    await settle(bus, alice, bob)
    started = time.monotonic()
    offers = 100
    with caplog.at_level(logging.INFO, logger="kbwg.negotiation.session"):
        for _ in range(offers):
            await bob.negotiator.offer(bob.negotiator.sessions[ALICE], kind="restart")
            await settle(bus, alice, bob)
    answering = lines(caplog, "kbwg.negotiation.session", "; answering")
    assert len(alice.checkers) > offers  # every offer was taken
    assert 1 <= len(answering) <= bound(started)


def test_other_pairs_traffic_does_not_spend_the_budget_of_possible_forgeries(
        caplog: pytest.LogCaptureFixture) -> None:
    """With debugging on, every post between two other devices is a "not for us" line:
    limited alongside the warnings, everyday traffic would crowd out a forgery's."""
    notes = ignored_notes()
    chat = SimpleNamespace(id=7, sender_username="carol", sender_device="nas", body="x")
    with caplog.at_level(logging.DEBUG, logger="kbwg.negotiation.wire"):
        for _ in range(BURST * 5):
            log_ignored(chat, NotForUs("sealed to another key"), notes)
        log_ignored(chat, BadBox("does not open"), notes)
    assert lines(caplog, "kbwg.negotiation.wire", "not for us")
    assert lines(caplog, "kbwg.negotiation.wire", "ignoring negotiation message 7")


@VIRTUAL_CLOCK
async def test_messages_held_for_peers_that_never_announce_expire() -> None:
    """A peer's posts wait for its announcement (another channel) a few seconds: held
    for good when it never came, every such peer's last few."""
    bus, alice, _bob = pair()
    silent = [DeviceId("dave", f"dev{i}") for i in range(20)]
    for device in silent:
        await alice.negotiator.handle(bus.message(device, "KBWG1 early offer"))
    assert set(alice.negotiator._pending) == set(silent)
    await asyncio.sleep(PENDING_TTL_S + 1)
    await alice.negotiator.handle(bus.message(BOB, "KBWG1 early offer"))
    assert set(alice.negotiator._pending) == {BOB}


@VIRTUAL_CLOCK
async def test_an_oversized_post_is_not_held() -> None:
    """A dev body may be 1,000,000 bytes: opening it is refused at once, holding it
    (8 per peer) kept megabytes."""
    bus, alice, _bob = pair()
    await alice.negotiator.handle(bus.message(BOB, "K" * (MAX_TEXT + 1)))
    assert BOB not in alice.negotiator._pending
    await alice.negotiator.handle(bus.message(BOB, "K" * MAX_TEXT))
    assert len(alice.negotiator._pending[BOB]) == 1
    assert ALICE not in alice.negotiator._pending


# -- lost paths ----------------------------------------------------------------------


@VIRTUAL_CLOCK
async def test_lost_paths_of_peers_that_came_and_went_are_not_kept() -> None:
    """Peers come and go (claimed devices): each lost path's time stays only as long as
    its spacing matters."""
    peers = [DeviceId("eve", f"dev{i}") for i in range(50)]
    paths, negotiator = FakePaths([False] * len(peers)), FakeNegotiator()
    keeper = upkeep(paths, negotiator, FakePresence())
    for peer in peers:
        await keeper.on_path_lost(peer, fell_back=False)
        await asyncio.sleep(LOST_PATH_SPACING_S)
    assert negotiator.restarted == peers
    assert len(keeper._lost_at) <= 1
