"""`Negotiator`: two instances wired together in memory over a fake dev channel.

Each side's `post` turns the sealed text into a `ChatMessage` with the sender's Keybase
metadata and an increasing message id, and delivers it to the other side's `handle`
(in a task, as the listener would). Checkers are fakes that record what the session
tells them. Waiting is done by polling with a deadline or by letting every pending
delivery and negotiation task finish, never by a fixed sleep. The session's timers (offer
grace, answer timeout) run on a virtual clock (virtual_clock.py), so they are exact.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from nacl.public import PrivateKey
from virtual_clock import VIRTUAL_CLOCK, advance_until, now

from kbwg.agent.keybase import Channel, ChatMessage
from kbwg.core.identity import DeviceId
from kbwg.negotiation.session import (
    ANSWER_TIMEOUT_S,
    MAX_OFFERS,
    OFFER_GRACE_S,
    RETIRED_MAX_S,
    CheckerSpec,
    Negotiator,
)
from kbwg.negotiation.wire import (
    CandidateInfo,
    Offer,
    Trickle,
    WireMessage,
    key_hint,
    new_session_id,
    open_body,
    seal,
)

CHANNEL = Channel("t1", "kbwg", "dev")
ALICE = DeviceId("alice", "laptop")
BOB = DeviceId("bob", "desk")
LONG = 60.0  # a grace/timeout that never fires within a test

pytestmark = VIRTUAL_CLOCK


# ------------------------------------------------------------------ fakes


@dataclass(eq=False)
class FakeChecker:
    spec: CheckerSpec
    remote: list[tuple[str, str, list[CandidateInfo]]] = field(default_factory=list)
    closed: bool = False

    trickled: list[tuple[list[CandidateInfo], bool]] = field(default_factory=list)
    complete: bool | None = None
    snap: dict[str, Any] = field(default_factory=dict)  # what snapshot() says
    retired: bool = False
    ever_connected: bool = False  # had a path once, whatever snapshot() says now

    def set_remote(self, ufrag: str, pwd: str, candidates: list[CandidateInfo],
                   complete: bool = True) -> None:
        assert not self.closed, "set_remote on a closed checker"
        self.remote.append((ufrag, pwd, list(candidates)))
        self.complete = complete

    def add_remote(self, candidates: list[CandidateInfo], complete: bool) -> None:
        self.trickled.append((list(candidates), complete))

    def snapshot(self) -> dict[str, Any]:
        return dict(self.snap)

    @property
    def was_connected(self) -> bool:
        return self.snap.get("path", "none") != "none" or self.ever_connected

    def retire(self) -> None:
        self.retired = True

    def close(self) -> None:
        self.closed = True


class Bus:
    """The team's dev channel: ids, delivery tasks, and a pause for "at once"."""

    def __init__(self) -> None:
        self.next_id = 1
        self.log: list[ChatMessage] = []
        self.posted_at: list[float] = []  # loop time of each message in `log`
        self.tasks: set[asyncio.Task[None]] = set()
        self.paused = False
        self.held: list[tuple[Side, ChatMessage]] = []

    def message(self, sender: DeviceId, body: str) -> ChatMessage:
        msg = ChatMessage(
            id=self.next_id, conversation_id="conv-kbwg", channel=CHANNEL,
            sender_username=sender.username, sender_device=sender.device,
            sent_at=time.time(), body=body, content_type="text",
        )  # fmt: skip
        self.next_id += 1
        self.log.append(msg)
        self.posted_at.append(now())
        return msg

    def deliver(self, to: Side, msg: ChatMessage) -> None:
        if self.paused:
            self.held.append((to, msg))
            return
        task = asyncio.get_running_loop().create_task(to.negotiator.handle(msg))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def resume(self) -> None:
        self.paused = False
        held, self.held = self.held, []
        for to, msg in held:
            self.deliver(to, msg)


class Side:
    """One device: its key, negotiator, checkers made, and candidates offered."""

    def __init__(self, bus: Bus, me: DeviceId, key: PrivateKey, last_octet: int,
                 **negotiator_args: float) -> None:
        self.bus = bus
        self.me = me
        self.key = key
        self.peer: Side | None = None
        self.connected = True  # False: posts reach nobody (the peer has no agent)
        self.checkers: list[FakeChecker] = []
        self.candidates = [
            CandidateInfo("host", f"198.18.0.{last_octet}", 51820, 2130706431, "h1"),
            CandidateInfo("srflx", f"203.0.113.{last_octet}", 51820, 1694498815, "s1"),
        ]
        self.negotiator = Negotiator(me, key, self.post, self.make_checker,
                                     self.local_candidates, 51820, **negotiator_args)

    @property
    def public_b64(self) -> str:
        return base64.b64encode(bytes(self.key.public_key)).decode()

    async def post(self, text: str) -> None:
        msg = self.bus.message(self.me, text)
        if self.peer is not None and self.connected:
            self.bus.deliver(self.peer, msg)

    def make_checker(self, spec: CheckerSpec) -> FakeChecker:
        checker = FakeChecker(spec)
        self.checkers.append(checker)
        return checker

    async def local_candidates(self) -> list[CandidateInfo]:
        await asyncio.sleep(0)  # a real gatherer awaits
        return list(self.candidates)

    def live_checkers(self) -> list[FakeChecker]:
        return [c for c in self.checkers if not c.closed]

    def sent(self, recipient: Side) -> list[WireMessage]:
        """Every message this side posted, opened as `recipient` would (no replay check)."""
        out = []
        for msg in self.bus.log:
            if DeviceId(msg.sender_username, msg.sender_device) != self.me:
                continue
            assert msg.body is not None
            out.append(open_body(msg.body, sender=str(self.me),
                                 sender_public=self.key.public_key,
                                 my_private=recipient.key, me=str(recipient.me)))
        return out

    def sent_types(self, recipient: Side) -> list[str]:
        return [m.type for m in self.sent(recipient)]

    def chat_messages(self) -> list[ChatMessage]:
        return [m for m in self.bus.log
                if DeviceId(m.sender_username, m.sender_device) == self.me]

    def meet(self, they_joined_later: bool) -> None:
        """The peer's announcement reaches this side."""
        assert self.peer is not None
        self.negotiator.peer_key(self.peer.me, self.peer.public_b64, they_joined_later)


def pair(alice_key: PrivateKey | None = None, bob_key: PrivateKey | None = None,
         **negotiator_args: float) -> tuple[Bus, Side, Side]:
    bus = Bus()
    alice = Side(bus, ALICE, alice_key or PrivateKey.generate(), 1, **negotiator_args)
    bob = Side(bus, BOB, bob_key or PrivateKey.generate(), 2, **negotiator_args)
    alice.peer, bob.peer = bob, alice
    return bus, alice, bob


async def settle(bus: Bus, *sides: Side, timeout: float = 5.0) -> None:
    """Until no delivery or negotiation step is pending (timers aside)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        await asyncio.sleep(0)
        pending = [t for t in bus.tasks if not t.done()]
        for side in sides:
            pending += [t for t in side.negotiator._tasks if not t.done()]
        if not pending:
            return
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise AssertionError(f"{len(pending)} tasks still pending after {timeout}s")
        await asyncio.wait(pending, timeout=left)


async def negotiate(bus: Bus, alice: Side, bob: Side) -> None:
    """alice was there first: bob offers on learning of her; she answers."""
    alice.meet(they_joined_later=True)
    bob.meet(they_joined_later=False)
    await settle(bus, alice, bob)
    assert bob.sent_types(alice) == ["offer"]
    assert alice.sent_types(bob) == ["answer"]


def fresh_offer_from(side: Side, to: Side, session_id: bytes, *,
                     sealer: PrivateKey | None = None, forge_hint: bool = False) -> str:
    """A new (unreplayed) offer as `side` would send it, optionally sealed by another key."""
    body = Offer("abcd1234", "p" * 24, 7, list(side.candidates), 51820).to_wire()
    message = WireMessage.new("offer", side.me, to.me, side.negotiator.sender_session,
                              session_id, body)
    text = seal(message, sealer or side.key, to.key.public_key)
    if forge_hint:
        prefix, to_hint, _, box = text.split(" ")
        text = " ".join([prefix, to_hint, key_hint(side.key.public_key), box])
    return text


# ------------------------------------------------------------------ tests


async def test_offer_answer_sets_both_checkers() -> None:
    bus, alice, bob = pair(offer_grace_s=LONG, answer_timeout_s=LONG)
    await negotiate(bus, alice, bob)

    offerer = bob.negotiator.sessions[ALICE]
    answerer = alice.negotiator.sessions[BOB]
    assert offerer.state == answerer.state == "checking"
    assert offerer.session_id is not None
    assert offerer.session_id == answerer.session_id
    offer_msg, = bob.sent(alice)
    answer_msg, = alice.sent(bob)
    assert offer_msg.session_id == answer_msg.session_id == offerer.session_id

    b_checker, = bob.checkers
    a_checker, = alice.checkers
    assert not b_checker.closed and not a_checker.closed
    # The answerer controls the checks; the offerer's checker answers them.
    assert b_checker.spec.controlling is False
    assert a_checker.spec.controlling is True
    assert a_checker.spec.peer == BOB and b_checker.spec.peer == ALICE
    # Each checker got the other side's credentials and candidates, once.
    assert a_checker.remote == [(b_checker.spec.ufrag, b_checker.spec.pwd, bob.candidates)]
    assert b_checker.remote == [(a_checker.spec.ufrag, a_checker.spec.pwd, alice.candidates)]
    assert a_checker.spec.ufrag != b_checker.spec.ufrag
    # What went over the wire carries the same credentials.
    assert offer_msg.body["ufrag"] == b_checker.spec.ufrag
    assert answer_msg.body["pwd"] == a_checker.spec.pwd
    assert offer_msg.body["wg_port"] == 51820


async def test_offerer_checker_exists_before_the_answer() -> None:
    bus, _alice, bob = pair(offer_grace_s=LONG, answer_timeout_s=LONG)
    bob.connected = False  # nothing is delivered: bob's offer goes unanswered for now
    bob.meet(they_joined_later=False)
    await settle(bus, bob)
    checker, = bob.checkers
    assert checker.spec.controlling is False and checker.remote == [] and not checker.closed
    assert bob.negotiator.snapshot(ALICE)["negotiation"] == "offering"


@pytest.mark.parametrize("alice_higher", [True, False], ids=["alice-wins", "bob-wins"])
async def test_glare_is_resolved_by_key_order(alice_higher: bool) -> None:
    k1, k2 = PrivateKey.generate(), PrivateKey.generate()
    high, low = sorted([k1, k2], key=lambda k: bytes(k.public_key), reverse=True)
    bus, alice, bob = pair(high if alice_higher else low, low if alice_higher else high,
                           offer_grace_s=LONG, answer_timeout_s=LONG)
    winner, loser = (alice, bob) if alice_higher else (bob, alice)

    bus.paused = True  # both offer before either offer arrives
    alice.meet(they_joined_later=False)
    bob.meet(they_joined_later=False)
    await settle(bus, alice, bob)
    assert alice.sent_types(bob) == ["offer"] and bob.sent_types(alice) == ["offer"]
    assert alice.negotiator.sessions[BOB].state == "offering"
    assert bob.negotiator.sessions[ALICE].state == "offering"
    bus.resume()
    await settle(bus, alice, bob)

    # Exactly one offer was answered: the winner's.
    assert winner.sent_types(loser) == ["offer"]
    assert loser.sent_types(winner) == ["offer", "answer"]
    win_offer = winner.sent(loser)[0]
    answer = loser.sent(winner)[1]
    assert answer.session_id == win_offer.session_id
    for side in (winner, loser):
        session = side.negotiator.sessions[side.peer.me]  # type: ignore[union-attr]
        assert session.session_id == win_offer.session_id
        assert session.state == "checking"
        live, = side.live_checkers()
        assert len(live.remote) == 1
        assert session.checker is live
    # The winner keeps its offer's checker (not controlling); the loser's own offer
    # checker is closed and replaced by a controlling one for the winner's offer.
    assert winner.live_checkers()[0].spec.controlling is False
    assert winner.live_checkers()[0] is winner.checkers[0]
    assert loser.live_checkers()[0].spec.controlling is True
    assert loser.checkers[0].closed and len(loser.checkers) == 2
    w_check, l_check = winner.live_checkers()[0], loser.live_checkers()[0]
    assert w_check.remote[0][:2] == (l_check.spec.ufrag, l_check.spec.pwd)
    assert l_check.remote[0][:2] == (w_check.spec.ufrag, w_check.spec.pwd)


async def test_replayed_offer_is_not_answered_twice(caplog: pytest.LogCaptureFixture) -> None:
    bus, alice, bob = pair(offer_grace_s=LONG, answer_timeout_s=LONG)
    await negotiate(bus, alice, bob)
    offer_chat, = bob.chat_messages()
    checker = alice.live_checkers()[0]

    with caplog.at_level(logging.INFO, logger="kbwg.negotiation"):
        await alice.negotiator.handle(offer_chat)  # the same ChatMessage again
        await settle(bus, alice, bob)

    assert alice.sent_types(bob) == ["answer"], "the replayed offer was answered"
    assert alice.checkers == [checker] and not checker.closed
    assert alice.negotiator.sessions[BOB].state == "checking"
    assert any("already seen" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("forge_hint", [True, False], ids=["peer-hint", "own-hint"])
async def test_offer_sealed_with_a_wrong_key_is_ignored(
        caplog: pytest.LogCaptureFixture, forge_hint: bool) -> None:
    bus, alice, bob = pair(offer_grace_s=LONG, answer_timeout_s=LONG)
    alice.meet(they_joined_later=True)  # alice knows bob's key, waits for his offer
    await settle(bus, alice, bob)
    mallory = PrivateKey.generate()
    text = fresh_offer_from(bob, alice, new_session_id(), sealer=mallory,
                            forge_hint=forge_hint)
    forged = bus.message(BOB, text)  # Keybase says bob/desk sent it

    with caplog.at_level(logging.DEBUG, logger="kbwg.negotiation"):
        await alice.negotiator.handle(forged)
        await settle(bus, alice, bob)

    assert alice.sent_types(bob) == []
    assert alice.checkers == []
    assert alice.negotiator.sessions[BOB].state == "idle"
    assert alice.negotiator.sessions[BOB].session_id is None
    if forge_hint:
        # The box names bob's key but does not open with it: a forgery, worth a warning.
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings, "no warning for a forged offer"
        assert any(f"message {forged.id}" in r.getMessage() and "bob/desk" in r.getMessage()
                   for r in warnings), [r.getMessage() for r in warnings]

    # Not a dead end: bob's real offer is still answered.
    real = bus.message(BOB, fresh_offer_from(bob, alice, new_session_id()))
    await alice.negotiator.handle(real)
    await settle(bus, alice, bob)
    assert alice.sent_types(bob) == ["answer"]


async def test_offer_before_the_announcement_is_held_then_answered() -> None:
    bus, alice, bob = pair(offer_grace_s=LONG, answer_timeout_s=LONG)
    bob.meet(they_joined_later=False)  # bob offers; alice has not seen his announcement
    await settle(bus, alice, bob)
    assert bob.sent_types(alice) == ["offer"]
    assert alice.sent_types(bob) == [] and alice.checkers == []
    assert BOB not in alice.negotiator.sessions

    alice.meet(they_joined_later=True)  # the announcement arrives after the offer
    await settle(bus, alice, bob)
    assert alice.sent_types(bob) == ["answer"]
    a_session = alice.negotiator.sessions[BOB]
    assert a_session.state == "checking"
    assert a_session.session_id == bob.negotiator.sessions[ALICE].session_id
    checker, = alice.checkers
    assert checker.spec.controlling and checker.remote[0][2] == bob.candidates
    await advance_until(lambda: bob.checkers[0].remote, what="bob's checker to get the answer")


async def test_offer_for_a_superseded_session_is_ignored() -> None:
    bus, alice, bob = pair(offer_grace_s=LONG, answer_timeout_s=LONG)
    await negotiate(bus, alice, bob)
    old_sid = bob.negotiator.sessions[ALICE].session_id
    assert old_sid is not None

    await bob.negotiator.restart_all()  # bob's candidates changed
    await settle(bus, alice, bob)
    assert bob.sent_types(alice) == ["offer", "restart"]
    assert alice.sent_types(bob) == ["answer", "answer"]
    new_sid = bob.negotiator.sessions[ALICE].session_id
    assert new_sid != old_sid
    assert alice.negotiator.sessions[BOB].session_id == new_sid
    live = alice.live_checkers()
    assert len(live) == 1 and len(alice.checkers) == 2

    # A fresh message (new id, current time, bob's current run) in the old session:
    # a late retry of the first offer, say. It must not undo the restart.
    late = bus.message(BOB, fresh_offer_from(bob, alice, old_sid))
    await alice.negotiator.handle(late)
    await settle(bus, alice, bob)
    assert alice.sent_types(bob) == ["answer", "answer"]
    assert alice.negotiator.sessions[BOB].session_id == new_sid
    assert alice.live_checkers() == live and len(alice.checkers) == 2


async def test_unanswered_offers_are_retried_then_given_up() -> None:
    bus, alice, bob = pair(offer_grace_s=LONG)  # the real answer timeout
    bob.connected = False  # alice runs no negotiating agent: nothing reaches her
    start = now()
    bob.meet(they_joined_later=False)

    session = bob.negotiator.sessions[ALICE]
    # Each retry waits one answer timeout longer: offers at 0, T and 3T, given up at 6T.
    give_up = start + sum(range(MAX_OFFERS + 1)) * ANSWER_TIMEOUT_S
    await asyncio.sleep(give_up - 0.001 - now())
    assert session.state == "offering"
    await asyncio.sleep(0.002)
    assert session.state == "unanswered"
    waits = [ANSWER_TIMEOUT_S * n for n in range(MAX_OFFERS)]
    expected = [sum(waits[:i + 1]) for i in range(MAX_OFFERS)]
    assert [t - start for t in bus.posted_at] == pytest.approx(expected)
    offers = bob.sent(alice)
    assert MAX_OFFERS >= 2 and len(offers) >= 2, "the offer was never retried"
    assert [m.type for m in offers] == ["offer"] * MAX_OFFERS
    assert len({m.session_id for m in offers}) == 1, "retries keep the session"
    assert len({m.nonce for m in offers}) == MAX_OFFERS, "each retry is a new message"
    assert bob.negotiator.snapshot(ALICE)["negotiation"] == "unanswered"
    await settle(bus, bob)
    assert len(bob.chat_messages()) == MAX_OFFERS, "kept offering after giving up"


async def test_without_an_offer_within_the_grace_the_earlier_peer_offers() -> None:
    bus, alice, bob = pair(answer_timeout_s=LONG)  # the real offer grace
    start = now()
    alice.meet(they_joined_later=True)  # bob should offer; his agent never does
    await asyncio.sleep(OFFER_GRACE_S - 0.001)
    assert bus.log == []
    await asyncio.sleep(0.002)
    await settle(bus, alice, bob)
    assert alice.sent_types(bob) == ["offer"]
    assert bus.posted_at == [pytest.approx(start + OFFER_GRACE_S)]
    assert alice.negotiator.sessions[BOB].state == "offering"


async def test_an_answer_stops_the_retries() -> None:
    bus, alice, bob = pair(offer_grace_s=LONG)  # the real answer timeout
    await negotiate(bus, alice, bob)
    before = len(bus.log)
    # Well past every retry bob would have made without an answer (T * (1+2+3) s).
    await asyncio.sleep(ANSWER_TIMEOUT_S * 10)
    await settle(bus, alice, bob)
    assert len(bus.log) == before
    assert bob.negotiator.sessions[ALICE].state == "checking"


async def test_bye_closes_the_peer_checker() -> None:
    bus, alice, bob = pair(offer_grace_s=LONG, answer_timeout_s=LONG)
    await negotiate(bus, alice, bob)
    a_checker, = alice.checkers
    assert not a_checker.closed
    byes: list[DeviceId] = []
    alice.negotiator.on_bye = byes.append

    await bob.negotiator.close()  # bob's agent stops
    await settle(bus, alice, bob)
    assert bob.sent_types(alice)[-1] == "bye"
    assert all(c.closed for c in bob.checkers)
    assert a_checker.closed, "alice's checker outlived bob's bye"
    session = alice.negotiator.sessions[BOB]
    assert session.state == "idle" and session.checker is None
    assert alice.negotiator.snapshot(BOB)["negotiation"] == "idle"
    assert byes == [BOB]  # the agent is told (its early checks wake at once)


async def test_a_peers_new_run_is_told_to_the_agent_once() -> None:
    """A peer killed and started again (no bye) negotiates from a new run: the agent is
    told with its first message (WireGuard's session with the peer is stale), once."""
    bus, alice, bob = pair(offer_grace_s=LONG, answer_timeout_s=LONG)
    runs: list[DeviceId] = []
    alice.negotiator.on_new_run = runs.append
    await negotiate(bus, alice, bob)
    assert runs == []  # the first run heard of is no restart
    reborn = Side(bus, BOB, bob.key, 2, offer_grace_s=LONG, answer_timeout_s=LONG)
    alice.peer, reborn.peer = reborn, alice
    reborn.meet(they_joined_later=False)  # its history holds alice's announcement
    await settle(bus, alice, reborn)
    assert reborn.sent_types(alice)[-1] == "offer"
    assert runs == [BOB]
    # The old run's offer posted again (replayed by anyone who saw it): stale, not told.
    old_offer = next(m for m in bus.log if m.sender_username == BOB.username)
    bus.deliver(alice, replace(old_offer, id=bus.next_id))
    await settle(bus, alice, reborn)
    assert runs == [BOB]
    assert await reborn.negotiator.restart(ALICE)  # the same run again: nothing new
    await settle(bus, alice, reborn)
    assert runs == [BOB]


async def test_a_lost_path_restarts_the_negotiation_with_that_peer_only_once() -> None:
    bus, alice, bob = pair(offer_grace_s=LONG, answer_timeout_s=LONG)
    await negotiate(bus, alice, bob)
    old = alice.live_checkers()

    assert await alice.negotiator.restart(BOB)
    # An offer is out: a second loss before the answer sends nothing more.
    assert not await alice.negotiator.restart(BOB)
    await settle(bus, alice, bob)
    assert alice.sent_types(bob) == ["answer", "restart"]
    assert bob.sent_types(alice) == ["offer", "answer"]
    assert all(c.closed for c in old), "the old checker goes with the old session"
    assert alice.negotiator.sessions[BOB].state == "checking"
    assert not await alice.negotiator.restart(DeviceId("carol", "phone")), "unknown peer"


async def test_a_renegotiation_shows_the_path_wireguard_keeps_until_a_new_one() -> None:
    bus, alice, bob = pair(offer_grace_s=LONG, answer_timeout_s=LONG)
    await negotiate(bus, alice, bob)
    (first,) = alice.live_checkers()
    first.snap = {"state": "connected", "path": "direct", "reason": "through NAT (5 ms)",
                  "local_candidate": "host 198.18.0.1:51820", "rtt_ms": 5.0}
    assert await alice.negotiator.restart(BOB)  # e.g. a network change
    await settle(bus, alice, bob)
    second = alice.checkers[-1]
    second.snap = {"state": "checking", "path": "none", "reason": "checking 4 pairs"}
    shown = alice.negotiator.snapshot(BOB)
    assert (shown["path"], shown["local_candidate"], shown["rtt_ms"]) == (
        "direct", "host 198.18.0.1:51820", 5.0)
    assert shown["reason"] == "through NAT (5 ms) (kept while renegotiating)"
    assert shown["state"] == "checking"
    second.snap = {"state": "failed", "path": "none", "reason": "no pair answered"}
    assert alice.negotiator.snapshot(BOB)["path"] == "none"  # nothing works: not hidden
    second.snap = {"state": "connected", "path": "relay", "reason": "relayed"}
    assert alice.negotiator.snapshot(BOB)["reason"] == "relayed"


async def test_a_replaced_checker_with_a_path_goes_on_until_the_new_one_chooses() -> None:
    """A device that moved checks from its new address with the old session's
    credentials long before its restart crosses the chat: the old checkers must still
    answer and follow it, without reporting the loss the new session owns."""
    bus, alice, bob = pair(offer_grace_s=LONG, answer_timeout_s=LONG)
    await negotiate(bus, alice, bob)
    (a_first,) = alice.live_checkers()
    (b_first,) = bob.live_checkers()
    for checker in (a_first, b_first):
        checker.snap = {"state": "connected", "path": "direct", "reason": "through NAT"}
    assert await alice.negotiator.restart(BOB)
    await settle(bus, alice, bob)
    a_second, b_second = alice.checkers[-1], bob.checkers[-1]
    assert a_first.retired and not a_first.closed, "the restarting side's old checker"
    assert b_first.retired and not b_first.closed, "the answering side's old checker"
    assert not a_second.retired and not b_second.closed
    # It follows the peer meanwhile: what it chose is what is shown.
    a_first.snap = {"state": "connected", "path": "direct", "reason": "moved",
                    "local_candidate": "host 198.18.5.1:51820"}
    assert alice.negotiator.snapshot(BOB)["local_candidate"] == "host 198.18.5.1:51820"
    # The new session chose: the old checker goes.
    assert a_second.spec.on_outcome is not None
    a_second.spec.on_outcome(True)
    assert a_first.closed
    # A checker without a path is closed at once, and the retired one is not doubled.
    assert b_second.spec.on_outcome is not None
    assert await bob.negotiator.restart(ALICE)
    await settle(bus, alice, bob)
    assert b_second.closed and not b_second.retired, "it had no path"
    assert not b_first.closed, "the one with a path still answers"
    # Its time runs out: the path it had is still shown (WireGuard is on it).
    await asyncio.sleep(RETIRED_MAX_S + 1)
    assert b_first.closed
    assert bob.negotiator.snapshot(ALICE)["reason"] == "through NAT (kept while renegotiating)"
    # Forgetting the peer closes the retired checker too.
    bob.checkers[-1].snap = dict(b_first.snap)
    assert await bob.negotiator.restart(ALICE)
    await settle(bus, alice, bob)
    assert bob.checkers[-2].retired and not bob.checkers[-2].closed
    bob.negotiator.forget(ALICE)
    assert all(c.closed for c in bob.checkers)


async def test_a_checker_that_lost_its_path_to_a_move_is_retired_too() -> None:
    """Moving away fails the path before the new candidates are in: the checker of the
    session the peer still runs is what finds it again, so it is retired, not closed."""
    bus, alice, bob = pair(offer_grace_s=LONG, answer_timeout_s=LONG)
    await negotiate(bus, alice, bob)
    (first,) = alice.live_checkers()
    first.ever_connected = True
    first.snap = {"state": "failed", "path": "none", "reason": "stopped answering"}
    assert await alice.negotiator.restart(BOB)
    await settle(bus, alice, bob)
    assert first.retired and not first.closed
    assert alice.negotiator.snapshot(BOB).get("path", "none") == "none", "none is shown"


async def test_candidates_gathered_later_trickle_to_the_peer_once() -> None:
    bus, alice, bob = pair(offer_grace_s=LONG, answer_timeout_s=LONG)
    gathering = {"done": False}
    bob.negotiator._gathering_done = lambda: gathering["done"]
    host_only = bob.candidates[:1]
    bob.candidates = list(host_only)
    await negotiate(bus, alice, bob)
    offer, = bob.sent(alice)
    assert offer.body["eoc"] is False, "the offer says more candidates may follow"
    a_checker, = alice.checkers
    assert a_checker.complete is False

    srflx = CandidateInfo("srflx", "203.0.113.2", 51820, 1694498815, "s1")
    relay = CandidateInfo("relay", "203.0.113.99", 40000, 16777215, "r1")
    await bob.negotiator.trickle([*host_only, srflx], complete=False)
    gathering["done"] = True
    await bob.negotiator.trickle([*host_only, srflx, relay], complete=True)
    await bob.negotiator.trickle([*host_only, srflx, relay], complete=True)  # nothing new
    await settle(bus, alice, bob)
    assert bob.sent_types(alice) == ["offer", "candidates", "candidates"]
    # Only what the peer lacked, in order, the last one marked as the end.
    assert a_checker.trickled == [([srflx], False), ([relay], True)]
    # Alice's answer went out complete (her fake gatherer is done): nothing to trickle.
    assert alice.sent(bob)[0].body["eoc"] is True


async def test_trickled_candidates_of_another_session_are_ignored() -> None:
    bus, alice, bob = pair(offer_grace_s=LONG, answer_timeout_s=LONG)
    await negotiate(bus, alice, bob)
    a_checker, = alice.checkers
    stale = WireMessage.new("candidates", BOB, ALICE, bob.negotiator.sender_session,
                            new_session_id(), Trickle([], True).to_wire())
    await alice.negotiator.handle(bus.message(BOB, seal(stale, bob.key, alice.key.public_key)))
    assert a_checker.trickled == []


async def test_an_offer_answered_while_ours_gathers_is_not_replaced_by_ours() -> None:
    bus, alice, bob = pair(offer_grace_s=LONG, answer_timeout_s=LONG)
    await negotiate(bus, alice, bob)
    gate = asyncio.Event()
    gathered = alice.local_candidates

    async def slow_candidates() -> list[CandidateInfo]:
        await gate.wait()  # alice's gathering (STUN) is still under way
        return await gathered()

    alice.negotiator._local_candidates = slow_candidates
    restarting = asyncio.create_task(alice.negotiator.restart(BOB))
    await asyncio.sleep(0)
    # Meanwhile bob's restart arrives and alice answers it (her answer may not wait).
    alice.negotiator._local_candidates = gathered
    await bob.negotiator.restart(ALICE)
    await settle(bus, alice, bob)
    answered = alice.negotiator.sessions[BOB].session_id
    gate.set()
    await restarting
    await settle(bus, alice, bob)
    assert alice.negotiator.sessions[BOB].session_id == answered
    assert alice.sent_types(bob) == ["answer", "answer"], "no restart of her own"
