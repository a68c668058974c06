"""`Negotiator` under the races a busy dev channel makes: offers that cross (glare), a
loser's offer that arrives after its answer, offers resent before the answer arrived,
resend timers of replaced offers, a peer's messages handled concurrently (the listener
and a re-read of the channel's history), an old restart brought back by a re-read, and
a restart answered while our NAT has moved unnoticed.

Each test drives the two sides (test_session.py's fakes: an in-memory dev channel, fake
checkers) into one order of events and asserts that both end in the same session with
matching credentials; without the rules in session.py's docstring each of them ends
with two sessions that cannot check each other (nothing would ever repair that).
Timers run on the virtual clock.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from nacl.public import PrivateKey
from test_session import ALICE, BOB, LONG, Bus, FakeChecker, Side, pair, settle
from virtual_clock import VIRTUAL_CLOCK, now

from kbwg.agent.keybase import ChatMessage
from kbwg.core.identity import DeviceId
from kbwg.negotiation.session import (
    MAX_OFFERS,
    RECHECK_FRESH_S,
    RECHECK_S,
    RETRY_MAX_S,
    RETRY_MIN_S,
)
from kbwg.negotiation.wire import CandidateInfo, WireError, WireMessage, open_body

pytestmark = VIRTUAL_CLOCK


def keys(alice_wins: bool) -> tuple[PrivateKey, PrivateKey]:
    """alice's and bob's keys, so that the named side wins glare."""
    high, low = sorted([PrivateKey.generate(), PrivateKey.generate()],
                       key=lambda k: bytes(k.public_key), reverse=True)
    return (high, low) if alice_wins else (low, high)


def opened(to: Side, msg: ChatMessage) -> WireMessage:
    sender = to.peer
    assert sender is not None and msg.body is not None
    return open_body(msg.body, sender=str(sender.me), sender_public=sender.key.public_key,
                     my_private=to.key, me=str(to.me))


def release(bus: Bus, to: Side, kind: str) -> None:
    """Deliver the held messages of type `kind` addressed to `to`, oldest first; the
    rest stay held."""
    keep = []
    for target, msg in bus.held:
        if target is to and opened(to, msg).type == kind:
            task = asyncio.get_running_loop().create_task(to.negotiator.handle(msg))
            bus.tasks.add(task)
            task.add_done_callback(bus.tasks.discard)
        else:
            keep.append((target, msg))
    bus.held = keep


def sent_to(side: Side, *recipients: Side) -> list[tuple[str, DeviceId]]:
    """(type, recipient) of every message `side` posted to one of `recipients`."""
    out = []
    for msg in side.chat_messages():
        for to in recipients:
            with contextlib.suppress(WireError):
                out.append((opened(to, msg).type, to.me))
    return out


def held_types(bus: Bus, to: Side) -> list[str]:
    return [opened(to, msg).type for target, msg in bus.held if target is to]


def live(side: Side) -> FakeChecker:
    checker, = side.live_checkers()
    return checker


def assert_glare_settled(alice: Side, bob: Side, alice_wins: bool) -> None:
    """Both restarted; only the loser answered the winner's, and one session is left."""
    restarts = {"alice": alice.sent_types(bob)[1:], "bob": bob.sent_types(alice)[1:]}
    if alice_wins:
        assert restarts == {"alice": ["restart"], "bob": ["restart", "answer"]}, restarts
    else:
        assert restarts == {"alice": ["restart", "answer"], "bob": ["restart"]}, restarts
    assert_one_session(alice, bob)


def assert_one_session(a: Side, b: Side) -> None:
    """Both sides in the same session, each checker holding the other's credentials."""
    sa = a.negotiator.sessions[b.me]
    sb = b.negotiator.sessions[a.me]
    assert sa.session_id == sb.session_id, "the two sides ended in different sessions"
    assert sa.state == sb.state == "checking"
    ca, cb = live(a), live(b)
    assert ca.spec.controlling != cb.spec.controlling
    assert ca.remote and cb.remote
    assert ca.remote[-1][:2] == (cb.spec.ufrag, cb.spec.pwd)
    assert cb.remote[-1][:2] == (ca.spec.ufrag, ca.spec.pwd)


async def connected(**negotiator_args: float) -> tuple[Bus, Side, Side]:
    """alice and bob with a negotiated session (bob offered), any key order."""
    bus, alice, bob = pair(**negotiator_args)
    alice.meet(they_joined_later=True)
    bob.meet(they_joined_later=False)
    await settle(bus, alice, bob)
    assert_one_session(alice, bob)
    return bus, alice, bob


async def connected_with(a_key: PrivateKey, b_key: PrivateKey
                         ) -> tuple[Bus, Side, Side]:
    bus, alice, bob = pair(a_key, b_key, offer_grace_s=LONG, answer_timeout_s=LONG)
    alice.meet(they_joined_later=True)
    bob.meet(they_joined_later=False)
    await settle(bus, alice, bob)
    assert_one_session(alice, bob)
    return bus, alice, bob


def gate_calls(side: Side, gated: set[int]) -> asyncio.Event:
    """Make the side's candidate gathering wait on the returned event for the calls
    numbered in `gated` (0 = the next call); the others return at once."""
    gate = asyncio.Event()
    gathered = side.local_candidates
    calls = {"n": 0}

    async def candidates() -> list[CandidateInfo]:
        n = calls["n"]
        calls["n"] += 1
        if n in gated:
            await gate.wait()
        return await gathered()

    side.negotiator._local_candidates = candidates
    return gate


# ------------------------------------------------------------------ glare


@pytest.mark.parametrize("alice_wins", [True, False], ids=["alice-wins", "bob-wins"])
async def test_a_losers_offer_reaching_the_winner_after_its_answer_is_ignored(
        alice_wins: bool) -> None:
    a_key, b_key = keys(alice_wins)
    bus, alice, bob = pair(a_key, b_key, offer_grace_s=LONG, answer_timeout_s=LONG)
    winner, loser = (alice, bob) if alice_wins else (bob, alice)
    bus.paused = True  # both offer before either offer arrives
    alice.meet(they_joined_later=False)
    bob.meet(they_joined_later=False)
    await settle(bus, alice, bob)

    # The winner's offer reaches the loser, which answers it ...
    release(bus, loser, "offer")
    await settle(bus, alice, bob)
    assert held_types(bus, winner) == ["offer", "answer"]
    # ... and the answer reaches the winner before the loser's crossed offer does (the
    # offer's push was lost and a re-read of the history brought it back, say).
    release(bus, winner, "answer")
    await settle(bus, alice, bob)
    release(bus, winner, "offer")
    await settle(bus, alice, bob)

    assert winner.sent_types(loser) == ["offer"], "the winner answered an abandoned offer"
    assert_one_session(alice, bob)


@pytest.mark.parametrize("alice_wins", [True, False], ids=["alice-wins", "bob-wins"])
async def test_an_offer_of_ours_that_went_out_while_we_gathered_settles_glare(
        alice_wins: bool) -> None:
    a_key, b_key = keys(alice_wins)
    bus, alice, bob = await connected_with(a_key, b_key)
    # bob's restart reaches alice while her own restart is being gathered; hers goes
    # out first, then she finishes with his.
    gate = gate_calls(alice, {0})
    await bob.negotiator.restart(ALICE)
    await asyncio.sleep(0.01)  # alice is gathering for bob's restart (gated)
    assert alice.sent_types(bob) == ["answer"]
    bus.paused = True
    await alice.negotiator.restart(BOB)  # not gated: her restart leaves
    gate.set()
    await settle(bus, alice, bob)
    bus.resume()
    await settle(bus, alice, bob)

    assert_glare_settled(alice, bob, alice_wins)


@pytest.mark.parametrize("alice_wins", [True, False], ids=["alice-wins", "bob-wins"])
async def test_our_restart_to_everyone_while_we_recheck_settles_glare(alice_wins: bool) -> None:
    a_key, b_key = keys(alice_wins)
    bus, alice, bob = await connected_with(a_key, b_key)

    async def recheck(_peer: DeviceId) -> None:
        # STUN found a new address: the agent renegotiates with everyone, bob included.
        await alice.negotiator.restart_all()

    alice.negotiator.on_restart = recheck
    bus.paused = True
    await bob.negotiator.restart(ALICE)
    release(bus, alice, "restart")  # bob's restart reaches alice; hers crosses it
    await settle(bus, alice, bob)
    bus.resume()
    await settle(bus, alice, bob)

    assert_glare_settled(alice, bob, alice_wins)


# ------------------------------------------------------------------ resends


async def test_an_offer_resent_before_our_answer_arrived_gets_the_same_answer() -> None:
    bus, alice, bob = pair(offer_grace_s=LONG, answer_timeout_s=1.0)
    alice.meet(they_joined_later=True)
    bus.paused = True
    bob.meet(they_joined_later=False)
    await settle(bus, alice, bob)
    release(bus, alice, "offer")
    await settle(bus, alice, bob)
    assert alice.sent_types(bob) == ["answer"]
    # The answer is slow: bob's offer goes out again before it reaches him.
    await asyncio.sleep(1.5)
    assert bob.sent_types(alice) == ["offer", "offer"]
    release(bus, alice, "offer")
    await settle(bus, alice, bob)
    bus.resume()
    await settle(bus, alice, bob)

    first, second = alice.sent(bob)
    assert first.body == second.body, "the resent offer got other credentials"
    assert len(alice.checkers) == 1, "a new checker for the same session"
    assert_one_session(alice, bob)


async def test_a_replaced_offers_resend_timer_never_sends_its_old_credentials() -> None:
    bus, alice, bob = pair(offer_grace_s=LONG, answer_timeout_s=1.0)
    bob.connected = False  # no answers: the resend timers fire
    posted = bob.post
    slow = asyncio.Event()
    posts = {"n": 0}

    async def post(text: str) -> None:
        posts["n"] += 1
        if posts["n"] == 1:
            await slow.wait()  # Keybase takes its time with the first offer
        await posted(text)

    bob.negotiator._post = post
    bob.meet(they_joined_later=False)  # offer 1: its post hangs
    await asyncio.sleep(0.01)
    await bob.negotiator.restart_all()  # our candidates changed: offer 2
    slow.set()
    await asyncio.sleep(5.0)  # every resend of both
    await settle(bus, bob)

    sid = bob.negotiator.sessions[ALICE].session_id
    ufrag = bob.negotiator.sessions[ALICE].checker.spec.ufrag  # type: ignore[union-attr]
    current = [m for m in bob.sent(alice) if m.session_id == sid]
    assert current and {m.body["ufrag"] for m in current} == {ufrag}, \
        "an old offer's credentials were sent in the new session"
    assert len(current) == MAX_OFFERS


async def test_an_answer_after_we_stopped_resending_is_still_taken() -> None:
    bus, alice, bob = pair(offer_grace_s=LONG, answer_timeout_s=1.0)
    alice.meet(they_joined_later=True)
    bus.paused = True
    bob.meet(they_joined_later=False)
    await asyncio.sleep(10.0)
    assert bob.negotiator.sessions[ALICE].state == "unanswered"
    bus.resume()  # the channel was slow, not gone
    await settle(bus, alice, bob)
    assert_one_session(alice, bob)


# ------------------------------------------------------------------ ordering


async def test_a_peers_messages_are_handled_one_at_a_time() -> None:
    bus, alice, bob = await connected(offer_grace_s=LONG, answer_timeout_s=LONG)
    bus.paused = True
    await bob.negotiator.restart(ALICE)  # a restart ...
    bob.negotiator.sessions[ALICE].state = "checking"  # (lost: say a path died again)
    await bob.negotiator.restart(ALICE)  # ... and a newer one
    assert held_types(bus, alice) == ["restart", "restart"]
    # The listener takes the first while a re-read takes the second; the first one's
    # gathering is the slower.
    gate = gate_calls(alice, {0})
    release(bus, alice, "restart")
    await asyncio.sleep(0.5)
    gate.set()
    await settle(bus, alice, bob)
    bus.resume()
    await settle(bus, alice, bob)
    assert_one_session(alice, bob)


async def test_an_older_restart_brought_back_by_a_reread_is_ignored() -> None:
    bus, alice, bob = await connected(offer_grace_s=LONG, answer_timeout_s=LONG)
    bus.paused = True
    await bob.negotiator.restart(ALICE)
    bob.negotiator.sessions[ALICE].state = "checking"
    await asyncio.sleep(0.1)
    await bob.negotiator.restart(ALICE)
    older, newer = (m for _, m in bus.held)
    bus.held = []
    bus.paused = False
    await alice.negotiator.handle(newer)  # pushed
    await settle(bus, alice, bob)
    await alice.negotiator.handle(older)  # its push was lost; the re-read found it
    await settle(bus, alice, bob)
    assert alice.sent_types(bob) == ["answer", "answer"]
    assert_one_session(alice, bob)


# ------------------------------------------------------------------ our NAT moved


async def test_a_restart_is_answered_with_candidates_checked_again() -> None:
    bus, alice, bob = await connected(offer_grace_s=LONG, answer_timeout_s=LONG)
    moved = CandidateInfo("srflx", "203.0.113.77", 51820, 1694498815, "s1")
    rechecked: list[DeviceId] = []

    async def recheck(peer: DeviceId) -> None:
        # What the agent does: STUN again, which finds the NAT's new address.
        await asyncio.sleep(0.05)
        rechecked.append(peer)
        alice.candidates = [alice.candidates[0], moved]

    alice.negotiator.on_restart = recheck
    await bob.negotiator.restart(ALICE)  # bob's path died; alice's checks had not noticed
    await settle(bus, alice, bob)

    assert rechecked == [BOB]
    answer = alice.sent(bob)[-1]
    assert answer.type == "answer"
    assert bob.checkers[-1].remote[-1][2] == alice.candidates, \
        "the answer carried the address the NAT no longer has"
    assert_one_session(alice, bob)


async def test_a_recheck_that_hangs_delays_the_answer_by_the_bound_only() -> None:
    bus, alice, bob = await connected(offer_grace_s=LONG, answer_timeout_s=LONG)
    forever = asyncio.Event()

    async def recheck(_peer: DeviceId) -> None:
        await forever.wait()

    alice.negotiator.on_restart = recheck
    before = len(bus.log)
    await bob.negotiator.restart(ALICE)
    start = now()
    await settle(bus, bob)
    while len(alice.sent_types(bob)) < 2:
        await asyncio.sleep(0.001)
    assert now() - start == pytest.approx(RECHECK_S, abs=0.01)
    assert len(bus.log) == before + 2
    await settle(bus, bob)
    forever.set()
    await settle(bus, alice, bob)
    assert_one_session(alice, bob)


async def test_the_agent_stuns_again_on_a_peers_restart_without_restarting_it() -> None:
    from test_upkeep import FakeNegotiator, FakePaths, FakePresence, upkeep

    paths, negotiator, presence = FakePaths([False, True]), FakeNegotiator(), FakePresence()
    keeper = upkeep(paths, negotiator, presence)
    on_restart = negotiator.on_restart  # type: ignore[attr-defined]
    assert on_restart == keeper.on_peer_restart
    await on_restart(BOB)
    # Unchanged: the restart being answered is the renegotiation; no second one.
    assert paths.regathers == 1 and negotiator.restarted == []
    assert negotiator.restarted_all == 0
    await on_restart(BOB)  # within the lost-path spacing: no STUN storm
    assert paths.regathers == 1
    await asyncio.sleep(2.0)
    await on_restart(BOB)  # our NAT moved: everyone renegotiates (glare settles bob's)
    assert paths.regathers == 2 and negotiator.restarted_all == 1


# ------------------------------------------------------------------ checks that found nothing


async def fail_and_wait(side: Side, expected: float) -> None:
    """The side's checks find no path: a new session exactly `expected` s later."""
    checker = live(side)
    assert checker.spec.on_outcome is not None
    checker.spec.on_outcome(False)  # every pair failed: nothing else would retry
    await asyncio.sleep(expected - 0.001)
    assert live(side) is checker, "renegotiated too early"
    await asyncio.sleep(0.002)
    assert live(side) is not checker, "not renegotiated in time"


async def test_a_session_whose_checks_found_no_path_is_negotiated_again() -> None:
    bus, alice, bob = await connected(offer_grace_s=LONG, answer_timeout_s=LONG)
    rechecks: list[float] = []

    async def recheck(_peer: DeviceId) -> None:
        rechecks.append(now())

    alice.negotiator.on_restart = recheck
    for wait in (RETRY_MIN_S, 2 * RETRY_MIN_S, 4 * RETRY_MIN_S):
        await fail_and_wait(alice, wait)
        assert rechecks[-1] == pytest.approx(now(), abs=0.01), "no STUN before the restart"
        await settle(bus, alice, bob)
        assert alice.sent_types(bob)[-1] == "restart"
        assert_one_session(alice, bob)

    # A path found resets the backoff; an outcome of a replaced session is ignored.
    old = live(alice)
    assert old.spec.on_outcome is not None
    old.spec.on_outcome(True)
    await bob.negotiator.restart(ALICE)
    await settle(bus, alice, bob)
    old.spec.on_outcome(False)
    await asyncio.sleep(RETRY_MAX_S)
    assert alice.sent_types(bob)[-1] == "answer", "a replaced session was retried"
    await fail_and_wait(alice, RETRY_MIN_S)


async def test_a_failed_session_renegotiated_meanwhile_is_not_retried() -> None:
    bus, alice, bob = await connected(offer_grace_s=LONG, answer_timeout_s=LONG)
    checker = live(alice)
    assert checker.spec.on_outcome is not None
    checker.spec.on_outcome(False)
    await bob.negotiator.restart(ALICE)  # bob renegotiates first
    await settle(bus, alice, bob)
    sent = alice.sent_types(bob)
    await asyncio.sleep(RETRY_MIN_S * 2)
    await settle(bus, alice, bob)
    assert alice.sent_types(bob) == sent == ["answer", "answer"]
    assert_one_session(alice, bob)


async def test_no_retry_after_the_peer_said_bye() -> None:
    bus, alice, bob = await connected(offer_grace_s=LONG, answer_timeout_s=LONG)
    checker = live(alice)
    assert checker.spec.on_outcome is not None
    checker.spec.on_outcome(False)  # bob's agent stopped: the checks fail ...
    await bob.negotiator.close()  # ... and its bye arrives
    await settle(bus, alice, bob)
    await asyncio.sleep(RETRY_MIN_S * 2)
    await settle(bus, alice)
    assert alice.sent_types(bob) == ["answer"], "offered to a peer that said bye"
    assert alice.negotiator.sessions[BOB].state == "idle"


async def test_one_recheck_serves_every_peer_restarting_at_once() -> None:
    bus, alice, bob = await connected(offer_grace_s=LONG, answer_timeout_s=LONG)
    carol = Side(bus, DeviceId("carol", "phone"), PrivateKey.generate(), 3,
                 offer_grace_s=LONG, answer_timeout_s=LONG)
    carol.peer = alice

    async def post(text: str) -> None:  # alice's posts reach both (each opens its own)
        msg = bus.message(alice.me, text)
        bus.deliver(bob, msg)
        bus.deliver(carol, msg)

    alice.negotiator._post = post
    alice.negotiator.peer_key(carol.me, carol.public_b64, they_joined_later=True)
    carol.meet(they_joined_later=False)
    await settle(bus, alice, bob, carol)
    rechecks: list[tuple[DeviceId, float]] = []

    async def recheck(peer: DeviceId) -> None:
        rechecks.append((peer, now()))
        await asyncio.sleep(0.5)  # STUN under load

    alice.negotiator.on_restart = recheck
    answers = len(alice.chat_messages())
    start = now()
    # alice's NAT moved: both peers lose their paths and restart together.
    await bob.negotiator.restart(ALICE)
    await carol.negotiator.restart(ALICE)
    await settle(bus, alice, bob, carol)
    assert [peer for peer, _ in rechecks] == [BOB], "one re-check for both restarts"
    assert len(alice.chat_messages()) == answers + 2, sent_to(alice, bob, carol)
    assert now() - start == pytest.approx(0.5, abs=0.01), "the answers waited for it"
    # Right after it, a restart needs none; later, it gets its own.
    await bob.negotiator.restart(ALICE)
    await settle(bus, alice, bob)
    assert len(rechecks) == 1
    await asyncio.sleep(RECHECK_FRESH_S)
    await carol.negotiator.restart(ALICE)
    await settle(bus, alice, carol)
    assert [peer for peer, _ in rechecks] == [BOB, carol.me]
