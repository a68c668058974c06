import base64
import json
import logging
import random
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from kbwg.agent.announce import ANNOUNCE_TTL_S
from kbwg.agent.claims import (
    Claim,
    ClaimBook,
    ClaimError,
    Policy,
    Rejection,
    check_range_against_peers,
    format_claim,
    is_claim,
    load_previous,
    may_peer,
    parse_claim,
    pick_free_address,
    save_previous,
)
from kbwg.agent.peers_file import PeerEntry
from kbwg.core.identity import DeviceId

KEY = base64.b64encode(bytes(range(32))).decode()
KEY2 = base64.b64encode(bytes(range(1, 33))).decode()
RANGE = IPv4Network("100.64.128.0/17")
SERVER = PeerEntry("ops", "server1", IPv4Address("100.64.0.1"))
STRAY = PeerEntry("ops", "server2", IPv4Address("100.64.200.9"))  # listed inside the range
LISTED = [SERVER, STRAY]
ALICE = DeviceId("alice", "laptop")
BOB = DeviceId("bob", "desk")
CAROL = DeviceId("carol", "phone")
IP_A = IPv4Address("100.64.130.7")
IP_B = IPv4Address("100.64.140.9")
T0 = 1_000_000.0


def claim(sender: DeviceId, ip: IPv4Address, msg_id: int, sent_at: float = T0,
          key: str = KEY) -> Claim:
    return Claim(sender, ip, key, msg_id, sent_at)


def offer(book: ClaimBook, c: Claim, now: float = T0 + 1) -> bool:
    verdict = book.offer(c, listed=LISTED, dynamic_range=RANGE, now=now)
    return verdict.accepted


# -- wire format ----------------------------------------------------------------


def test_format_and_parse_round_trip() -> None:
    body = format_claim(IP_A, KEY)
    assert body == f"CLAIM 100.64.130.7 {KEY}"
    assert is_claim(body) and not is_claim(f"ANNOUNCE 198.18.1.2:51820 {KEY}")
    assert parse_claim(body, ALICE, 7, T0) == Claim(ALICE, IP_A, KEY, 7, T0)


def test_sender_comes_from_the_caller_not_the_body() -> None:
    parsed = parse_claim(f"CLAIM 100.64.130.7 {KEY}", BOB, 3, T0)
    assert parsed.sender == BOB


@pytest.mark.parametrize(("body", "message"), [
    ("hello", "not a CLAIM line"),
    (f"ANNOUNCE 198.18.1.2:51820 {KEY}", "not a CLAIM line"),
    ("CLAIM 100.64.130.7", "expected 'CLAIM <overlay-ip> <public key>'"),
    (f"CLAIM 100.64.130.7 {KEY} trailing", "expected 'CLAIM <overlay-ip> <public key>'"),
    (f"CLAIM host.example {KEY}", "not a bare IPv4 address"),
    (f"CLAIM fd00::1 {KEY}", "not a bare IPv4 address"),
    (f"CLAIM 100.64.130.7/32 {KEY}", "not a bare IPv4 address"),
    ("CLAIM 100.64.130.7 !!!notbase64", "not base64"),
    ("CLAIM 100.64.130.7 " + base64.b64encode(b"short").decode(), "5 bytes"),
])
def test_bad_bodies(body: str, message: str) -> None:
    with pytest.raises(ClaimError, match=message):
        parse_claim(body, ALICE, 1, T0)


@pytest.mark.parametrize(("body", "count"), [
    (f"CLAIM 100.64.130.7 100.64.130.8 {KEY}", 2),
    (f"CLAIM 100.64.130.7,100.64.130.8 {KEY}", 2),
    (f"CLAIM 100.64.130.7, 100.64.130.8 {KEY}", 2),
    (f"CLAIM 100.64.130.0/24 {KEY}", 256),
    (f"CLAIM 100.64.130.7 100.64.131.0/30 {KEY}", 5),
])
def test_two_addresses_at_once_are_rejected(body: str, count: int) -> None:
    with pytest.raises(ClaimError, match=f"claims {count} addresses at once"):
        parse_claim(body, ALICE, 1, T0)


# -- bad claims -----------------------------------------------------------------


@pytest.mark.parametrize(("bad", "rejection", "message"), [
    (claim(SERVER.device_id, IP_A, 5), Rejection.LISTED_DEVICE,
     "ops/server1 is listed in peers.json"),
    (claim(ALICE, STRAY.ip, 5), Rejection.LISTED_ADDRESS,
     "100.64.200.9 is listed in peers.json for ops/server2"),
    (claim(ALICE, SERVER.ip, 5), Rejection.LISTED_ADDRESS, "listed in peers.json"),
    (claim(ALICE, IPv4Address("100.64.1.1"), 5), Rejection.OUTSIDE_RANGE,
     "not a host address of the dynamic range 100.64.128.0/17"),
    (claim(ALICE, IPv4Address("10.0.0.1"), 5), Rejection.OUTSIDE_RANGE, "dynamic range"),
    (claim(ALICE, RANGE.network_address, 5), Rejection.OUTSIDE_RANGE, "dynamic range"),
    (claim(ALICE, RANGE.broadcast_address, 5), Rejection.OUTSIDE_RANGE, "dynamic range"),
    (claim(ALICE, IP_A, 5, sent_at=T0 - ANNOUNCE_TTL_S - 1), Rejection.EXPIRED, "ago"),
])
def test_bad_claims_are_ignored_with_a_reason(
    bad: Claim, rejection: Rejection, message: str
) -> None:
    book = ClaimBook()
    verdict = book.offer(bad, listed=LISTED, dynamic_range=RANGE, now=T0 + 1)
    assert not verdict.accepted
    assert verdict.rejection is rejection
    assert message in verdict.reason
    assert verdict.rejection.is_misbehaviour == (rejection is not Rejection.EXPIRED)
    assert book.live_claims(T0 + 1) == []
    assert book.owner_of(bad.ip, T0 + 1) is None
    assert book.claim_of(bad.sender, T0 + 1) is None


def test_no_dynamic_range_means_no_claims() -> None:
    verdict = ClaimBook().offer(claim(ALICE, IP_A, 1), listed=LISTED, dynamic_range=None,
                                now=T0)
    assert verdict.rejection is Rejection.NO_RANGE and "dynamic_range" in verdict.reason


def test_an_ignored_claim_does_not_displace_the_devices_valid_one() -> None:
    book = ClaimBook()
    assert offer(book, claim(ALICE, IP_A, 1))
    assert not offer(book, claim(ALICE, SERVER.ip, 2))
    assert book.claim_of(ALICE, T0 + 1) == claim(ALICE, IP_A, 1)


# -- conflicts ------------------------------------------------------------------


def test_uncontested_claim_owns_its_address() -> None:
    book = ClaimBook()
    mine = claim(ALICE, IP_A, 4)
    assert book.lost(mine, T0 + 1) is None  # before its echo arrives
    assert offer(book, mine)
    assert book.owner_of(IP_A, T0 + 1) == mine
    assert book.winner(ALICE, T0 + 1)
    assert book.lost(mine, T0 + 1) is None


def test_lower_message_id_wins_even_when_delivered_second() -> None:
    book = ClaimBook()
    bob_claim = claim(BOB, IP_A, 20)
    alice_claim = claim(ALICE, IP_A, 10)
    assert offer(book, bob_claim)  # the higher id arrives first ...
    assert book.owner_of(IP_A, T0 + 1) == bob_claim
    assert offer(book, alice_claim)  # ... then the lower one takes over
    assert book.owner_of(IP_A, T0 + 1) == alice_claim
    assert book.winner(ALICE, T0 + 1) and not book.winner(BOB, T0 + 1)
    assert book.lost(bob_claim, T0 + 1) == alice_claim
    assert book.lost(alice_claim, T0 + 1) is None  # the winner does nothing


def test_same_outcome_whatever_the_delivery_order() -> None:
    claims = [claim(BOB, IP_A, 20), claim(ALICE, IP_A, 10), claim(CAROL, IP_A, 15)]
    owners = set()
    for order in ([0, 1, 2], [2, 1, 0], [1, 0, 2], [0, 2, 1]):
        book = ClaimBook()
        for i in order:
            offer(book, claims[i])
        owners.add(book.owner_of(IP_A, T0 + 1))
    assert owners == {claims[1]}


def test_loser_reclaims_elsewhere_and_both_own_an_address() -> None:
    book = ClaimBook()
    bob_first = claim(BOB, IP_A, 20)
    offer(book, bob_first)
    offer(book, claim(ALICE, IP_A, 10))
    assert book.lost(bob_first, T0 + 1) is not None
    taken = book.taken(T0 + 1, besides=BOB) | {e.ip for e in LISTED}
    assert IP_A in taken
    new_ip = pick_free_address(RANGE, taken, random.Random(1))
    assert new_ip != IP_A
    bob_again = claim(BOB, new_ip, 30)
    verdict = book.offer(bob_again, listed=LISTED, dynamic_range=RANGE, now=T0 + 1)
    assert verdict.accepted and verdict.replaced == bob_first
    assert book.owner_of(IP_A, T0 + 1) == claim(ALICE, IP_A, 10)
    assert book.owner_of(new_ip, T0 + 1) == bob_again
    assert book.winner(ALICE, T0 + 1) and book.winner(BOB, T0 + 1)
    assert book.lost(bob_again, T0 + 1) is None
    # One address per device: the old claim no longer counts anywhere.
    assert [(s.claim.sender, s.claim.ip) for s in book.live_claims(T0 + 1)] == sorted(
        [(ALICE, IP_A), (BOB, new_ip)], key=lambda p: p[1])


def test_refresh_keeps_seniority_against_a_rival_who_claimed_in_between() -> None:
    book = ClaimBook()
    first = claim(ALICE, IP_A, 10)
    refresh = claim(ALICE, IP_A, 30, sent_at=T0 + 1800, key=KEY2)  # e.g. after a restart
    rival = claim(BOB, IP_A, 20, sent_at=T0 + 900)
    for c in (first, rival, refresh):
        offer(book, c, now=T0 + 1801)
    now = T0 + 1801
    assert book.owner_of(IP_A, now) == refresh  # the newest key, the first claim's rank
    assert book.seniority(ALICE) == 10
    assert book.lost(refresh, now) is None  # not beaten by its own earlier claim
    assert book.lost(rival, now) == refresh


def test_refresh_keeps_seniority_after_the_first_claim_expires() -> None:
    book = ClaimBook()
    offer(book, claim(ALICE, IP_A, 10))
    offer(book, claim(BOB, IP_A, 20, sent_at=T0 + 100), now=T0 + 100)
    # Re-announced every half TTL, for hours: the original message is long expired.
    for n in range(1, 8):
        sent = T0 + n * ANNOUNCE_TTL_S / 2
        offer(book, claim(ALICE, IP_A, 100 + n, sent_at=sent), now=sent)
        offer(book, claim(BOB, IP_A, 200 + n, sent_at=sent + 1), now=sent + 1)
    now = T0 + 7 * ANNOUNCE_TTL_S / 2 + 2
    book.prune(now)
    owner = book.owner_of(IP_A, now)
    assert owner is not None and owner.sender == ALICE and owner.msg_id == 107
    assert book.seniority(ALICE) == 10 and book.seniority(BOB) == 20


def test_history_read_newest_first_keeps_seniority() -> None:
    """A fresh agent reads #announce newest first: refreshes arrive before the claim."""
    book = ClaimBook()
    now = T0 + 1801
    newest_first = [
        claim(ALICE, IP_A, 30, sent_at=T0 + 1800), claim(BOB, IP_A, 20, sent_at=T0 + 900),
        claim(ALICE, IP_A, 10),
    ]
    verdicts = [book.offer(c, listed=LISTED, dynamic_range=RANGE, now=now)
                for c in newest_first]
    assert [v.accepted for v in verdicts] == [True, True, False]
    assert verdicts[2].rejection is Rejection.STALE and "seniority" in verdicts[2].reason
    assert book.claim_of(ALICE, now) == newest_first[0]  # the older one never replaces
    assert book.owner_of(IP_A, now) == newest_first[0]
    assert book.seniority(ALICE) == 10


def test_coming_back_to_an_address_counts_from_the_new_claim() -> None:
    book = ClaimBook()
    for c in (claim(ALICE, IP_A, 10), claim(ALICE, IP_B, 15), claim(BOB, IP_A, 20),
              claim(ALICE, IP_A, 25)):
        offer(book, c)
    assert book.seniority(ALICE) == 25
    owner = book.owner_of(IP_A, T0 + 1)
    assert owner is not None and owner.sender == BOB
    assert book.lost(claim(ALICE, IP_A, 25), T0 + 1) == claim(BOB, IP_A, 20)


def test_replay_of_an_old_claim_is_ignored() -> None:
    book = ClaimBook()
    old = claim(ALICE, IP_A, 10)
    moved = claim(ALICE, IP_B, 15)
    offer(book, old)
    offer(book, moved)
    for replay in (old, moved):
        verdict = book.offer(replay, listed=LISTED, dynamic_range=RANGE, now=T0 + 1)
        assert not verdict.accepted and verdict.rejection is Rejection.STALE
    assert book.claim_of(ALICE, T0 + 1) == moved
    assert book.owner_of(IP_A, T0 + 1) is None


def test_expiry_frees_the_address() -> None:
    book = ClaimBook()
    alice = claim(ALICE, IP_A, 10)
    bob = claim(BOB, IP_A, 20, sent_at=T0 + 600)
    offer(book, alice)
    offer(book, bob, now=T0 + 600)
    assert book.owner_of(IP_A, T0 + 600) == alice
    after_alice = alice.expires_at + 1
    assert book.owner_of(IP_A, after_alice) == bob  # Alice stopped refreshing
    assert book.lost(bob, after_alice) is None
    assert book.claim_of(ALICE, after_alice) is None
    assert IP_A not in book.taken(bob.expires_at + 1)
    assert book.owner_of(IP_A, bob.expires_at + 1) is None
    book.prune(bob.expires_at + 1)
    assert book.live_claims(bob.expires_at + 1) == []
    assert book.seniority(ALICE) is None


def test_live_claims_for_status() -> None:
    book = ClaimBook()
    offer(book, claim(BOB, IP_A, 20))
    offer(book, claim(ALICE, IP_A, 10))
    states = book.live_claims(T0 + 1)
    assert [(s.claim.sender, s.seniority, s.owner) for s in states] == [
        (ALICE, 10, True), (BOB, 20, False)]
    doc = states[0].to_json()
    assert doc == {
        "username": "alice", "device": "laptop", "ip": "100.64.130.7", "public_key": KEY,
        "msg_id": 10, "sent_at": T0, "expires_at": T0 + ANNOUNCE_TTL_S, "seniority": 10,
        "owner": True,
    }
    json.dumps(doc)


# -- picking an address ---------------------------------------------------------


def test_pick_is_deterministic_with_a_seeded_rng() -> None:
    picks = {pick_free_address(RANGE, set(), random.Random(42)) for _ in range(3)}
    assert len(picks) == 1
    (pick,) = picks
    assert pick in RANGE and pick not in (RANGE.network_address, RANGE.broadcast_address)
    assert pick_free_address(RANGE, set(), random.Random(43)) != pick


def test_pick_prefers_the_previous_address_when_free() -> None:
    previous = IPv4Address("100.64.150.1")
    assert pick_free_address(RANGE, {IP_A}, random.Random(1), previous) == previous
    assert pick_free_address(RANGE, {previous}, random.Random(1), previous) != previous
    outside = IPv4Address("100.64.1.1")  # e.g. the range changed since
    assert pick_free_address(RANGE, set(), random.Random(1), outside) in RANGE


def test_pick_avoids_taken_and_listed_addresses() -> None:
    small = IPv4Network("100.64.128.0/29")  # hosts .1 to .6
    taken = {IPv4Address(f"100.64.128.{i}") for i in (1, 2, 3, 5, 6)}
    for seed in range(20):
        assert pick_free_address(small, taken, random.Random(seed)) == IPv4Address(
            "100.64.128.4")


def test_pick_errors_when_the_range_is_full() -> None:
    small = IPv4Network("100.64.128.0/30")
    with pytest.raises(ClaimError, match="every address of the dynamic range"):
        pick_free_address(small, set(small.hosts()), random.Random(1))


def test_range_against_peers() -> None:
    problems = check_range_against_peers(RANGE, LISTED)
    assert len(problems) == 1
    assert "ops/server2 at 100.64.200.9" in problems[0]
    assert check_range_against_peers(RANGE, [SERVER]) == []


# -- policy ---------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "me_listed", "peer_listed", "expected"), [
    (Policy.MESH, True, True, True),
    (Policy.MESH, True, False, True),
    (Policy.MESH, False, True, True),
    (Policy.MESH, False, False, True),
    (Policy.SERVERS, True, True, True),
    (Policy.SERVERS, True, False, True),
    (Policy.SERVERS, False, True, True),
    (Policy.SERVERS, False, False, False),
])
def test_may_peer(policy: Policy, me_listed: bool, peer_listed: bool, expected: bool) -> None:
    assert may_peer(policy, me_listed, peer_listed) is expected


# -- previous address -----------------------------------------------------------


def test_previous_address_round_trip(tmp_path: Path) -> None:
    assert load_previous(tmp_path) is None
    save_previous(tmp_path, IP_A)
    assert load_previous(tmp_path) == IP_A
    save_previous(tmp_path, IP_B)
    assert load_previous(tmp_path) == IP_B
    assert [p.name for p in tmp_path.iterdir()] == ["dynamic-address.json"]


@pytest.mark.parametrize("content", ["{not json", "[]", '{"ip": "nope"}', '{"ip": 5}', "{}"])
def test_corrupt_previous_address_is_ignored(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "dynamic-address.json").write_text(content)
    with caplog.at_level(logging.WARNING):
        assert load_previous(tmp_path) is None
    assert "dynamic-address.json" in caplog.text


def test_claims_are_checked_against_the_peers_list_of_the_moment() -> None:
    """The listed devices and addresses are indexed once per peers.json list (the
    history's claims are checked again at every refresh): a new list is used at once."""
    book = ClaimBook()
    assert book.offer(claim(ALICE, IP_A, 10), listed=LISTED, dynamic_range=RANGE,
                      now=T0 + 1).accepted
    now_listed = [*LISTED, PeerEntry("alice", "laptop", IPv4Address("100.64.0.9"))]
    verdict = book.offer(claim(ALICE, IP_A, 11), listed=now_listed, dynamic_range=RANGE,
                         now=T0 + 1)
    assert verdict.rejection is Rejection.LISTED_DEVICE, verdict
    taken = [*LISTED, PeerEntry("dave", "nas", IP_B)]
    verdict = book.offer(claim(BOB, IP_B, 12), listed=taken, dynamic_range=RANGE,
                         now=T0 + 1)
    assert verdict.rejection is Rejection.LISTED_ADDRESS, verdict
    assert "dave/nas" in verdict.reason
