"""Fuzzing `#announce` lines (ANNOUNCE and CLAIM) with a bounded, deterministic budget.

Any team member can post any text in `#announce`, under its own name only (the sender
comes from Keybase's metadata). Whatever it posts, the parsers raise AnnounceError or
ClaimError and nothing else, what they accept is well-formed, and the intake keeps its
books usable: a valid line posted after the junk is still taken.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import math
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import fuzzing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kbwg.agent.announce import (
    AnnounceBook,
    AnnounceError,
    format_announce,
    parse_announce,
)
from kbwg.agent.announce_feed import take_announce_message
from kbwg.agent.claims import ClaimBook, ClaimError, format_claim, is_claim, parse_claim
from kbwg.agent.keybase import Channel, ChatMessage, _parse_notification, parse_message
from kbwg.agent.keyowners import KeyBook
from kbwg.agent.peers_file import PeerEntry
from kbwg.core.identity import DeviceId

FUZZ = settings(fuzzing.FUZZ, max_examples=200)

ME = DeviceId("me", "box")
ALICE = DeviceId("alice", "laptop")
MALLORY = DeviceId("mallory", "desk")
NEWCOMER = DeviceId("newcomer", "pc")
LISTED = [PeerEntry("alice", "laptop", IPv4Address("100.64.0.2")),
          PeerEntry("me", "box", IPv4Address("100.64.0.1"))]
DYNAMIC = IPv4Network("100.64.128.0/17")
NOW = 1_800_000_000.0
CHANNEL = Channel("team", "kbwg", "announce")
KEY = base64.b64encode(bytes(range(32))).decode()
OTHER_KEY = base64.b64encode(bytes(range(100, 132))).decode()
VALID_ANNOUNCE = format_announce("198.51.100.7", 51820, KEY)
VALID_CLAIM = format_claim(IPv4Address("100.64.200.9"), OTHER_KEY)

# --- strategies ---

ips = st.one_of(
    st.sampled_from(["198.51.100.7", "203.0.113.1", "0.0.0.0", "127.0.0.1", "224.0.0.1",
                     "240.0.0.1", "255.255.255.255", "100.64.200.9", "100.64.128.0",
                     "100.64.255.255", "100.64.0.2", "1.2.3", "1.2.3.4.5", "01.2.3.4",
                     "::1", "[::1]", "2001:db8::1", "100.64.200.9/32",
                     # Arabic-Indic digits: str.isdigit() says yes, ipaddress says no.
                     "\u0661\u0669\u0668.\u0665\u0661.\u0661\u0660\u0660.\u0667",
                     "100.64.200.0/24", "100.64.200.9,100.64.200.10", "0.0.0.0/0", "::/0",
                     ",", "1.2.3.4,", ""]),
    st.ip_addresses(v=4).map(str), st.text(max_size=20))
ports = st.one_of(st.integers(-5, 70000).map(str), st.sampled_from(
    ["", "0", "65535", "65536", "00051820", "\u0665\u0661\u0668\u0662\u0660", "1e3", "+1", " 1"]),
    st.text(max_size=8))
keys = st.one_of(
    st.just(KEY), st.just(OTHER_KEY),
    # Another spelling of the same key: the spare bits of the last character set.
    st.just(KEY[:-2] + "x="),
    st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()),
    st.binary(min_size=32, max_size=32).map(lambda b: base64.urlsafe_b64encode(b).decode()),
    st.sampled_from([KEY.rstrip("="), KEY + "=", KEY + "A", "=" * 44, "!" * 44]),
    st.text(max_size=50))
spaces = st.sampled_from([" ", "  ", "\t", "\n", "\u00a0", "\u2003", ""])


@st.composite
def near_lines(draw: st.DrawFn) -> str:
    """ANNOUNCE and CLAIM lines with none, one or a few parts away from valid."""
    claim = draw(st.booleans())
    parts = {"word": "CLAIM" if claim else "ANNOUNCE", "sep": " ",
             "ip": "100.64.200.9" if claim else "198.51.100.7", "port": "51820",
             "sep2": " ", "key": KEY, "tail": ""}
    alternatives = {
        "word": st.sampled_from(["ANNOUNCE", "CLAIM", "announce", "CLAIMS", "ANNOUNCE:"]),
        "sep": spaces, "ip": ips, "port": ports, "sep2": spaces, "key": keys,
        "tail": st.one_of(spaces, st.text(max_size=10)),
    }
    for name in draw(st.sets(st.sampled_from(sorted(parts)), max_size=2)):
        parts[name] = draw(alternatives[name])
    if claim:
        extra = draw(st.lists(ips, max_size=2)) if not draw(st.integers(0, 3)) else []
        address = parts["sep"].join([parts["ip"], *extra])
    else:
        address = f"{parts['ip']}:{parts['port']}"
    return f"{parts['word']}{parts['sep']}{address}{parts['sep2']}{parts['key']}{parts['tail']}"


def mutated_text(text: str) -> st.SearchStrategy[str]:
    return fuzzing.mutated_text(text, "0123456789.:/+= \t\nA")


# Half near-valid lines, half junk.
lines = st.one_of(near_lines(), st.one_of(
    st.text(max_size=120), mutated_text(VALID_ANNOUNCE),
    mutated_text(VALID_CLAIM),
    # Very long: a line is bounded by Keybase, not by the parser.
    st.builds(lambda word, n, tail: word + " " + "1" * n + ":" + tail,
              st.sampled_from(["ANNOUNCE", "CLAIM"]), st.integers(1000, 20000),
              st.text(max_size=10)),
    st.integers(1000, 4000).map(lambda n: f"CLAIM {'1.2.3.4,' * n} {KEY}"),
))


def _is_canonical_key(text: str) -> bool:
    raw = base64.b64decode(text, validate=True)
    return len(raw) == 32 and base64.b64encode(raw).decode() == text


# --- the parsers ---

@pytest.mark.timeout(60)
@FUZZ
@given(body=lines)
def test_announce_lines_parse_or_give_an_announce_error(body: str) -> None:
    try:
        ann = parse_announce(body, ALICE, 7, NOW)
    except AnnounceError as exc:
        assert str(exc)
        return
    ip = ipaddress.IPv4Address(ann.endpoint_ip)
    assert str(ip) == ann.endpoint_ip
    assert not (ip.is_unspecified or ip.is_loopback or ip.is_multicast or ip.is_reserved)
    assert 1 <= ann.endpoint_port <= 65535
    assert _is_canonical_key(ann.public_key)
    assert (ann.sender, ann.msg_id) == (ALICE, 7)  # never taken from the body


@pytest.mark.timeout(60)
@settings(FUZZ, max_examples=120)
@given(body=lines)
def test_claim_lines_parse_or_give_a_claim_error(body: str) -> None:
    claimed = is_claim(body)
    try:
        claim = parse_claim(body, ALICE, 7, NOW)
    except ClaimError as exc:
        assert str(exc)
        return
    assert claimed  # parse_claim accepts only what is_claim routes to it
    assert isinstance(claim.ip, IPv4Address)
    assert _is_canonical_key(claim.public_key)
    assert (claim.sender, claim.msg_id) == (ALICE, 7)


# --- the intake, with real books ---

def _post(msg_id: int, sender: DeviceId, body: str | None, sent_at: float = NOW
          ) -> ChatMessage:
    return ChatMessage(msg_id, "conv", CHANNEL, sender.username, sender.device, sent_at,
                       body, "text" if body is not None else "attachment")


@pytest.mark.timeout(60)
@settings(FUZZ, max_examples=40)
@given(posts=st.lists(st.tuples(
    st.one_of(lines, st.just(VALID_ANNOUNCE), st.just(VALID_CLAIM), st.none()),
    st.sampled_from([ME, ALICE, MALLORY, NEWCOMER]),
    st.integers(1, 50), st.sampled_from([NOW, NOW - 4000, NOW + 10, -1.0])),
    min_size=1, max_size=12))
def test_intake_ignores_junk_and_stays_usable(
        posts: list[tuple[str | None, DeviceId, int, float]]) -> None:
    announcements, claims, keys = AnnounceBook(), ClaimBook(), KeyBook()
    for body, sender, msg_id, sent_at in posts:
        changed = take_announce_message(_post(msg_id, sender, body, sent_at), ME,
                                        announcements, claims, LISTED, DYNAMIC, NOW, keys)
        assert isinstance(changed, bool)
    for device, ann in announcements.latest.items():
        assert ann.sender == device and device != ME  # our own echo is never a peer
    for state in claims.live_claims(NOW):
        assert state.claim.ip in DYNAMIC
        assert state.claim.sender not in {e.device_id for e in LISTED}

    # Still usable: a newer valid announcement and a valid claim are taken.
    ann_body = format_announce("203.0.113.9", 40000, OTHER_KEY)
    assert take_announce_message(_post(1000, ALICE, ann_body), ME, announcements, claims,
                                 LISTED, DYNAMIC, NOW, keys)
    assert announcements.latest[ALICE].endpoint == "203.0.113.9:40000"
    claim_body = format_claim(IPv4Address("100.64.250.1"), KEY)
    assert take_announce_message(_post(1001, DeviceId("late", "comer"), claim_body), ME,
                                 announcements, claims, LISTED, DYNAMIC, NOW, keys)
    owner = claims.owner_of(IPv4Address("100.64.250.1"), NOW)
    assert owner is not None and owner.sender == DeviceId("late", "comer")


# --- the Keybase lines the messages come in (api-listen notifications) ---

NOTIFICATION: dict[str, Any] = {
    "type": "chat", "source": "remote",
    "msg": {"id": 7, "conversation_id": "c0ffee",
            "channel": {"name": "team", "members_type": "team", "topic_type": "chat",
                        "topic_name": "announce"},
            "sender": {"username": "alice", "device_name": "laptop"},
            "sent_at": 1_800_000_000, "sent_at_ms": 1_800_000_000_000,
            "content": {"type": "text", "text": {"body": VALID_ANNOUNCE}}},
}
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.integers(10**308, 10**320), st.floats(), st.text(max_size=20))
json_containers = st.one_of(st.lists(json_scalars, max_size=3),
                            st.dictionaries(st.text(max_size=4), json_scalars, max_size=3))


def _with_msg(msg: dict[str, Any]) -> dict[str, Any]:
    return {**NOTIFICATION, "msg": msg}


def _confused_part(part: str) -> st.SearchStrategy[dict[str, Any]]:
    """The notification with one field of msg[part] wrong."""
    return fuzzing.type_confused(NOTIFICATION["msg"][part], json_scalars,
                                 json_containers).map(
        lambda value: _with_msg({**NOTIFICATION["msg"], part: value}))


notifications = st.one_of(
    fuzzing.type_confused(NOTIFICATION, json_scalars, json_containers),
    fuzzing.type_confused(NOTIFICATION["msg"], json_scalars, json_containers).map(_with_msg),
    *(_confused_part(part) for part in ("channel", "sender", "content")),
)
lines_from_keybase = st.one_of(
    notifications.map(lambda n: json.dumps(n).encode()),  # NaN and Infinity too
    st.binary(max_size=60),
    st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),
    st.just(b'{"type": "chat", "msg": ' + b"[" * 3000 + b"]" * 3000 + b"}"),
)


@pytest.mark.timeout(60)
@FUZZ
@given(line=lines_from_keybase)
def test_keybase_notification_lines_give_a_message_or_none(line: bytes) -> None:
    msg = _parse_notification(line)  # the listener's whole per-line path
    if msg is not None:
        assert isinstance(msg.id, int) and math.isfinite(msg.sent_at)
        assert msg.body is None or isinstance(msg.body, str)
        assert isinstance(msg.sender_username, str) and isinstance(msg.sender_device, str)


@pytest.mark.parametrize("times", [
    {"sent_at_ms": 10**400}, {"sent_at": 10**400, "sent_at_ms": None},
    {"sent_at_ms": float("nan")}, {"sent_at_ms": float("inf")}])
def test_a_message_time_that_is_no_finite_number_is_skipped(times: dict[str, Any]) -> None:
    # 10**400 raised OverflowError past the listener's ValueError handler; NaN and
    # infinity made announcements and claims that never expire.
    line = json.dumps(_with_msg({**NOTIFICATION["msg"], **times})).encode()
    assert _parse_notification(line) is None
    with pytest.raises(ValueError, match="message"):
        parse_message(json.loads(line)["msg"])
