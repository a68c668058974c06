"""Hostile team members and strangers, second round: inputs that a sender can repeat
without end must cost bounded memory and bounded work per message.

Each case is one sender's lever found in an audit of the agent's inputs (chat lines,
sealed negotiation messages, STUN at the shared port)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, cast

import pytest
from virtual_clock import VIRTUAL_CLOCK

from kbwg.agent.announce import AnnounceBook, AnnounceError, parse_announce
from kbwg.agent.announce_candidates import CandidateBook, parse_candidates
from kbwg.agent.announce_feed import take_announce_message
from kbwg.agent.claims import ClaimBook, ClaimError, parse_claim
from kbwg.agent.keybase import Channel, ChatMessage
from kbwg.agent.keyowners import KeyBook
from kbwg.core.identity import DeviceId
from kbwg.negotiation import pair_table
from kbwg.negotiation.candidate_pairs import CandidatePair
from kbwg.negotiation.candidates import Candidate, candidate_priority
from kbwg.negotiation.check_config import CheckCounters, CheckTimers
from kbwg.negotiation.checks import PeerChecker
from kbwg.negotiation.early import EarlyPeer, derive_credentials
from kbwg.negotiation.pair_table import PairTable
from kbwg.negotiation.wire import MAX_CANDIDATES, CandidateInfo

HOSTS = [Candidate("host", f"198.18.1.{i}", 51820, "eth0", candidate_priority("host"), "eth0")
         for i in range(1, 4)]


def fresh_candidates(count: int, start: int = 0) -> Iterator[list[CandidateInfo]]:
    """Batches of `MAX_CANDIDATES` server-reflexive candidates never sent before."""
    n = start
    for _ in range(count):
        batch = []
        for _ in range(MAX_CANDIDATES):
            n += 1
            batch.append(CandidateInfo("srflx", f"203.0.113.{n % 250 + 1}", 1024 + n,
                                       candidate_priority("srflx"), "srflx1"))
        yield batch


class FormCounter:
    """Wraps pair_table.form_pairs: how many remotes each call had to pair."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        real = pair_table.form_pairs

        def counting(bases: Sequence[Candidate], candidates: Sequence[CandidateInfo],
                     controlling: bool) -> list[CandidatePair]:
            self.sizes.append(len(candidates))
            return real(bases, candidates, controlling)

        monkeypatch.setattr(pair_table, "form_pairs", counting)


# -- trickled candidates: one session's "candidates" messages ----------------------------


def test_endless_trickles_cost_bounded_work_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer may send "candidates" messages in its session without end, each with 64
    new addresses. Every trickle paired all of them again (bases x all, then cut to 100
    pairs): after 300 messages one took 1.4 s of the event loop, and memory grew with
    each. What a trickle costs must not grow with what came before."""
    counter = FormCounter(monkeypatch)
    table = PairTable(HOSTS, CheckTimers(), CheckCounters(), "mallory/box")
    table.form([], controlling=True)
    batches = list(fresh_candidates(300))
    for batch in batches:
        table.add_remotes(batch, controlling=True)
    assert max(counter.sizes) <= 4 * MAX_CANDIDATES
    assert len(table.pairs) <= pair_table.MAX_PAIRS
    # The newest candidates are the ones kept: a peer that moved is checked where it is.
    newest = batches[-1][-1]
    assert any(r.ip == newest.ip and r.port == newest.port for r in table._remotes)


@VIRTUAL_CLOCK
async def test_trickles_before_the_answer_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The offerer's checker keeps trickled candidates until the answer comes; a peer
    that never answers but keeps trickling (its "unanswered" session's checker stays)
    must not grow that list without bound."""
    counter = FormCounter(monkeypatch)
    checker = PeerChecker(HOSTS, "abcd", "p" * 22, controlling=False, tie_breaker=1,
                          send=lambda data, dest, local: None)
    try:
        for batch in fresh_candidates(200):
            checker.add_remote(batch, complete=False)
        checker.set_remote("efgh", "q" * 22, [], complete=True)
        assert max(counter.sizes) <= 4 * MAX_CANDIDATES
        assert len(checker.pairs) <= pair_table.MAX_PAIRS
    finally:
        checker.close()


# -- published candidates: CANDIDATES lines in #announce for early checks --------------


class _IdleChecker:
    """An early checker that records what it is given."""

    state = "checking"
    selected = None

    def __init__(self) -> None:
        self.remote: list[CandidateInfo] = []

    def set_remote(self, ufrag: str, pwd: str, candidates: Sequence[CandidateInfo],
                   complete: bool = True) -> None:
        self.remote = list(candidates)

    def add_remote(self, candidates: Sequence[CandidateInfo], complete: bool,
                   replace: bool = False) -> None:
        self.remote += candidates

    def datagram_received(self, data: bytes, src: Any, local: Any = None) -> bool:
        return False

    def has_transaction(self, transaction_id: bytes) -> bool:
        return False

    def snapshot(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


@VIRTUAL_CLOCK
async def test_a_peer_republishing_new_candidates_does_not_grow_its_early_peer() -> None:
    """Each CANDIDATES line (up to 16 addresses) with addresses not seen before added
    them to the early peer's list for good, while its key stayed the same: a member
    posting such lines grew it (and `status`'s early_checks.candidates, and the work
    of every sync) without bound. Addresses the peer no longer publishes are dead."""
    from nacl.public import PrivateKey

    ours, theirs = PrivateKey.generate(), PrivateKey.generate()
    creds = derive_credentials(ours, theirs.public_key)
    early = EarlyPeer("mallory/box (early)", creds, lambda c, cb: _IdleChecker(),
                      lambda pair, reason: None, lambda: (None, False))
    early.start()
    lines = [batch[:16] for batch in fresh_candidates(500)]
    for line in lines:
        early.set_candidates(line)
    assert early.to_json()["candidates"] <= 4 * MAX_CANDIDATES
    newest = lines[-1]
    assert all(c in early.remote for c in newest)
    await asyncio.sleep(0)


# -- CANDIDATES lines: every line is judged, none may raise -----------------------------


def _announce_message(body: str, msg_id: int = 7) -> ChatMessage:
    return ChatMessage(msg_id, "conv", Channel("team", "announce"), "mallory", "box",
                       time.time(), body, "text")


def _books() -> tuple[AnnounceBook, ClaimBook, KeyBook, CandidateBook]:
    return AnnounceBook(), ClaimBook(), KeyBook(), CandidateBook()


KEY = base64.b64encode(bytes(range(32))).decode()


@pytest.mark.parametrize("item", [
    # A scope id passes ipaddress, is no link-local address, and made the candidate
    # longer than a wire candidate may be: InvalidField (no AnnounceError) escaped.
    "host:2001:db8::1%" + "a" * 40 + ":51820",
    "srflx:2001:db8::1%eth0:51820",  # a scope means nothing on another host
    # str.isdigit() passes a superscript digit, which int() refuses: ValueError.
    "host:198.51.100.1:5\u00b2",
])
def test_a_bad_candidates_line_is_refused_not_raised(item: str) -> None:
    """One such line in #announce raised out of the books: the history read at start-up
    (two hours of it) stopped every agent of the team from joining, and the refresh loop
    (which reads the history again) ended, stopping every running agent."""
    announcements, claims, keys, published = _books()
    taken = take_announce_message(_announce_message(f"CANDIDATES {KEY} {item}"),
                                  DeviceId("me", "laptop"), announcements, claims, [],
                                  None, time.time(), keys, published)
    assert taken is False
    assert published.latest == {}
    with pytest.raises(AnnounceError):
        parse_candidates(f"CANDIDATES {KEY} {item}", DeviceId("mallory", "box"), 7, 0.0)


def test_a_history_line_the_books_cannot_take_does_not_stop_the_rest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Start-up and every refresh take #announce's history in one go: whatever one line
    raises (the case above, or the next such bug) must not end them, nor keep the lines
    after it out of the books."""
    from kbwg.agent import team_view
    from kbwg.agent.teamconfig import TeamConfig

    real = team_view.take_announce_message

    def fragile(msg: ChatMessage, *args: Any, **kwargs: Any) -> bool:
        if msg.body == "BOOM":
            raise RuntimeError("a line no book expected")
        return real(msg, *args, **kwargs)

    monkeypatch.setattr(team_view, "take_announce_message", fragile)
    team = team_view.TeamView(keybase=None, team="team", config=TeamConfig())  # type: ignore[arg-type]
    good = _announce_message(f"ANNOUNCE 203.0.113.9:51820 {KEY}", msg_id=9)
    team.take_history([_announce_message("BOOM", msg_id=8), good], DeviceId("me", "laptop"))
    assert team.announcements.latest[DeviceId("mallory", "box")].msg_id == 9


# -- checkers made per offer -------------------------------------------------------------


class _Port:
    local_receiver: Any = None
    receiver: Any = None

    def from_source(self, _source: str) -> _Port:
        return self

    def add_ufrag(self, _ufrag: str) -> None:
        pass

    def remove_ufrag(self, _ufrag: str) -> None:
        pass


@VIRTUAL_CLOCK
async def test_closed_checkers_are_not_kept_until_the_next_gathering() -> None:
    """Every offer (and restart, and retry after a failed session) a peer makes gets a
    new checker, and the one before is closed. Connectivity keeps every checker it made
    in a set it prunes only when a gathering step publishes candidates, which a stable
    host may not do for days: a member posting offers (or a peer whose session keeps
    failing, retried every 5 min) grows it, each with up to 100 pairs."""
    from test_relay_trickle import FakeOwner

    from kbwg.agent.connectivity import Connectivity
    from kbwg.agent.owner_calls import OwnerCalls
    from kbwg.agent.owner_stun import OwnerStunTransport
    from kbwg.agent.teamconfig import TeamConfig
    from kbwg.negotiation.session import CheckerSpec

    paths = Connectivity(cast(OwnerCalls, FakeOwner()), cast(OwnerStunTransport, _Port()),
                         51820, "alice", TeamConfig(), lambda _a: None)
    peer = DeviceId("mallory", "box")
    for i in range(200):
        registered = paths.make_checker(
            CheckerSpec(peer, f"uf{i:04d}", "p" * 22, True, i), lambda pair, why: None)
        registered.close()
    assert len(paths._checkers) <= 1


# -- WireGuard keys that are no key: low-order points -------------------------------------

# Curve25519 points of small order: X25519 with any of them gives all zeros, so libsodium
# (and with it every Box and early-check credential) refuses them.
LOW_ORDER_KEYS = [base64.b64encode(bytes.fromhex(h)).decode() for h in (
    "00" * 32,
    "01" + "00" * 31,
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
)]


@pytest.mark.parametrize("key", LOW_ORDER_KEYS)
def test_a_low_order_key_is_no_devices_key(key: str) -> None:
    """A member announcing (and claiming with) such a key became a peer like any other;
    the early checks' credentials for it (a Box with it) then raised nacl's
    RuntimeError out of every peer sync, ending the refresh loop and so every agent of
    the team, again at each start while the line was live. Such a line is refused
    where lines are read."""
    me = DeviceId("me", "laptop")
    sender = DeviceId("mallory", "box")
    with pytest.raises(AnnounceError):
        parse_announce(f"ANNOUNCE 203.0.113.9:51820 {key}", sender, 7, time.time())
    with pytest.raises(ClaimError):
        parse_claim(f"CLAIM 100.64.200.9 {key}", sender, 7, time.time())
    announcements, claims, keys, published = _books()
    for body in (f"ANNOUNCE 203.0.113.9:51820 {key}", f"CLAIM 100.64.200.9 {key}",
                 f"CANDIDATES {key} host:198.18.0.9:51820"):
        assert not take_announce_message(_announce_message(body), me, announcements, claims,
                                         [], IPv4Network("100.64.128.0/17"), time.time(),
                                         keys, published)
    assert announcements.latest == {} and published.latest == {}


@VIRTUAL_CLOCK
async def test_early_checks_skip_a_peer_whose_key_gives_no_credentials() -> None:
    """Behind the parse check: a peer configured with a key the early checks cannot
    derive credentials from gets none (logged), and the sync goes on for the others."""
    from nacl.public import PrivateKey

    from kbwg.agent.announce import Announcement
    from kbwg.agent.connectivity import Connectivity
    from kbwg.agent.early_checks import EarlyChecks
    from kbwg.agent.peer_selection import PeerSpec
    from kbwg.agent.runtime_state import PeerState

    device = DeviceId("mallory", "box")
    key = LOW_ORDER_KEYS[0]
    ann = Announcement(device, "203.0.113.9", 51820, key, 7, time.time())
    peer = PeerState(PeerSpec(device, IPv4Address("100.64.0.9"), ann), configured_key=key)
    early = EarlyChecks(cast(Connectivity, None), PrivateKey.generate(), CandidateBook(),
                        lambda _d: (None, False), lambda *_: None)
    early.sync([peer])
    assert early.peers == {}


# -- the control socket --------------------------------------------------------------------


async def test_an_oversized_control_request_gets_an_error_reply(tmp_path: Path) -> None:
    """StreamReader.readline refuses a line over its 64 KiB limit with ValueError, which
    the server did not catch: the client saw the connection drop with no answer (the
    MAX_REQUEST check behind it never ran) and the agent logged an unhandled error."""
    from kbwg.agent.control import MAX_REQUEST, ControlServer, call, socket_path

    async def status(_request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    server = ControlServer(tmp_path, {"status": status})
    await server.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(socket_path(tmp_path)))
        writer.write(b'{"cmd": "status", "pad": "' + b"x" * (MAX_REQUEST + 10) + b'"}\n')
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        assert json.loads(line) == {"error": "request too large"}
        assert (await call(tmp_path, "status"))["ok"] is True
    finally:
        await server.close()


@pytest.mark.parametrize(("value", "used"), [
    (3, 3.0), (2.5, 2.5), (float("nan"), 5.0), (float("inf"), 60.0), (1e12, 60.0),
    (0, 5.0), (-1, 5.0), (True, 5.0), ("10", 5.0), (None, 5.0),
])
def test_a_diag_timeout_from_the_control_socket_is_bounded(value: Any, used: float) -> None:
    from kbwg.agent.reports import diag_timeout

    assert diag_timeout({"diag_timeout": value}) == used
    assert diag_timeout({}) == 5.0
