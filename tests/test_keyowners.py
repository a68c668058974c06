"""One key per device: who gets a key that several devices announce or claim.

The books are fed exactly as the daemon feeds them (take_announce_message), then
desired_peers says which device gets which key.
"""

from __future__ import annotations

import base64
import time
from ipaddress import IPv4Address, IPv4Network

import pytest
from nacl.public import PrivateKey

from kbwg.agent.announce import AnnounceBook, AnnounceError, canonical_key, parse_announce
from kbwg.agent.announce_feed import take_announce_message
from kbwg.agent.claims import ClaimBook, Policy, parse_claim
from kbwg.agent.keybase import Channel, ChatMessage
from kbwg.agent.keyowners import KeyBook
from kbwg.agent.peer_selection import DesiredPeers, desired_peers
from kbwg.agent.peers_file import PeerEntry
from kbwg.core.identity import DeviceId

ANNOUNCE = Channel("t", "announce", "chat")
ME = DeviceId("me", "box")
ALICE = DeviceId("alice", "laptop")
MALLORY = DeviceId("mallory", "phone")
U1 = DeviceId("u1", "a")
U2 = DeviceId("u2", "b")
RANGE = IPv4Network("100.64.128.0/24")
LISTED = [PeerEntry("me", "box", IPv4Address("100.64.0.1")),
          PeerEntry("alice", "laptop", IPv4Address("100.64.0.2")),
          PeerEntry("mallory", "phone", IPv4Address("100.64.0.3"))]


def new_key() -> str:
    return base64.b64encode(bytes(PrivateKey.generate().public_key)).decode()


def other_spelling(key: str) -> str:
    """The same 32 bytes, written with different spare bits in the last character."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(key[42])
    spelled = key[:42] + alphabet[last ^ 1] + key[43:]
    assert spelled != key and base64.b64decode(spelled) == base64.b64decode(key)
    return spelled


class Books:
    def __init__(self, listed: list[PeerEntry]) -> None:
        self.listed = listed
        self.announcements = AnnounceBook()
        self.claims = ClaimBook()
        self.keys = KeyBook()
        self.now = time.time()

    def take(self, sender: DeviceId, msg_id: int, body: str) -> None:
        msg = ChatMessage(msg_id, "c", ANNOUNCE, sender.username, sender.device,
                          self.now - 1000 + msg_id, body, "text")
        take_announce_message(msg, ME, self.announcements, self.claims, self.listed,
                              RANGE, self.now, self.keys)

    def desired(self, my_key: str | None = None) -> DesiredPeers:
        return desired_peers(ME, self.listed, self.announcements, self.claims, Policy.MESH,
                             self.now, self.keys, my_key)


def key_of(desired: DesiredPeers, device: DeviceId) -> str | None:
    spec = desired.peers.get(device)
    return None if spec is None or spec.announcement is None else spec.announcement.public_key


def test_canonical_key_folds_the_spare_bits() -> None:
    key = new_key()
    assert canonical_key(other_spelling(key)) == key
    ann = parse_announce(f"ANNOUNCE 198.18.0.9:1 {other_spelling(key)}", ALICE, 1, 0.0)
    assert ann.public_key == key
    claim = parse_claim(f"CLAIM 100.64.128.9 {other_spelling(key)}", U1, 1, 0.0)
    assert claim.public_key == key
    with pytest.raises(AnnounceError):
        canonical_key(key[:-1])


@pytest.mark.parametrize("order", ["in order", "copy delivered first"])
def test_listed_copy_of_a_listed_key_loses_to_the_first_use(order: str) -> None:
    books = Books(LISTED)
    alice_key = new_key()
    lines = [(ALICE, 10, f"ANNOUNCE 198.18.0.2:51820 {alice_key}"),
             (MALLORY, 20, f"ANNOUNCE 203.0.113.66:51820 {alice_key}")]
    for sender, msg_id, body in (lines if order == "in order" else lines[::-1]):
        books.take(sender, msg_id, body)
    desired = books.desired()
    assert key_of(desired, ALICE) == alice_key
    assert key_of(desired, MALLORY) is None
    spec = desired.peers[MALLORY]
    assert spec.refused is not None and "alice/laptop" in spec.refused
    assert [(r.device, r.msg_id, r.owner) for r in desired.refusals] == [(MALLORY, 20, ALICE)]


def test_two_spellings_of_one_key_are_one_key() -> None:
    books = Books(LISTED)
    alice_key = new_key()
    books.take(ALICE, 10, f"ANNOUNCE 198.18.0.2:51820 {alice_key}")
    books.take(MALLORY, 20, f"ANNOUNCE 203.0.113.66:51820 {other_spelling(alice_key)}")
    desired = books.desired()
    assert key_of(desired, ALICE) == alice_key
    assert key_of(desired, MALLORY) is None


def test_the_impostors_fresh_key_is_its_own() -> None:
    books = Books(LISTED)
    alice_key, fresh = new_key(), new_key()
    books.take(ALICE, 10, f"ANNOUNCE 198.18.0.2:51820 {alice_key}")
    books.take(MALLORY, 20, f"ANNOUNCE 203.0.113.66:51820 {alice_key}")
    books.take(MALLORY, 21, f"ANNOUNCE 203.0.113.66:51820 {fresh}")
    desired = books.desired()
    assert (key_of(desired, ALICE), key_of(desired, MALLORY)) == (alice_key, fresh)
    assert desired.refusals == []


def test_a_listed_device_beats_an_unlisted_one_that_used_the_key_first() -> None:
    books = Books(LISTED)
    key = new_key()
    books.take(U1, 5, f"CLAIM 100.64.128.9 {key}")
    books.take(U1, 6, f"ANNOUNCE 198.18.0.9:51820 {key}")
    books.take(ALICE, 10, f"ANNOUNCE 198.18.0.2:51820 {key}")
    desired = books.desired()
    assert key_of(desired, ALICE) == key
    assert U1 in desired.peers and key_of(desired, U1) is None
    assert desired.refusals[0].why == "listed in peers.json"


@pytest.mark.parametrize("order", ["in order", "newest first"])
def test_among_unlisted_devices_the_earliest_claim_wins(order: str) -> None:
    books = Books(LISTED)
    key = new_key()
    lines = [(U1, 5, f"CLAIM 100.64.128.9 {key}"), (U1, 6, f"ANNOUNCE 198.18.0.9:51820 {key}"),
             (U2, 7, f"CLAIM 100.64.128.10 {key}"), (U2, 8, f"ANNOUNCE 198.18.0.10:51820 {key}")]
    for sender, msg_id, body in (lines if order == "in order" else lines[::-1]):
        books.take(sender, msg_id, body)
    desired = books.desired()
    assert key_of(desired, U1) == key
    assert key_of(desired, U2) is None
    assert "message 5" in desired.refusals[0].why


def test_the_earliest_use_counts_across_re_announcements() -> None:
    """alice re-announces (higher ids); mallory's copy sits between: alice keeps it."""
    books = Books(LISTED)
    key = new_key()
    books.take(ALICE, 10, f"ANNOUNCE 198.18.0.2:51820 {key}")
    books.take(MALLORY, 20, f"ANNOUNCE 203.0.113.66:51820 {key}")
    books.take(ALICE, 30, f"ANNOUNCE 198.18.0.2:51820 {key}")
    desired = books.desired()
    assert key_of(desired, ALICE) == key and key_of(desired, MALLORY) is None


def test_nobody_gets_this_devices_own_key() -> None:
    books = Books(LISTED)
    mine = new_key()
    books.take(MALLORY, 20, f"ANNOUNCE 203.0.113.66:51820 {mine}")
    desired = books.desired(my_key=mine)
    assert key_of(desired, MALLORY) is None
    assert desired.refusals[0].owner == ME


def test_each_refused_message_is_logged_once() -> None:
    keys = KeyBook()
    assert keys.should_log(20)
    assert not keys.should_log(20)
    assert keys.should_log(21)
    # Once no recorded use is that old, the memory of having logged it goes too.
    keys.record(MALLORY, new_key(), 30, time.time())
    keys.prune(time.time())
    assert keys.should_log(20)
