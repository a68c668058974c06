"""Fuzzing the sealed negotiation envelope and its messages with a bounded budget.

Anyone in the team's channel can post any text, and a peer holding a valid key can seal
any msgpack structure at all. Whatever arrives, `open_body` and the body parsers raise a
`WireError` (`receive` returns None after a log line) and nothing else; a body that does
open is exactly the one that was sealed; the replay guard never accepts a message twice.

The budget is fixed (`derandomize`, no example database): the same examples every run.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fuzzing
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.public import Box, PrivateKey

from kbwg.agent.keybase import Channel, ChatMessage
from kbwg.core.identity import DeviceId
from kbwg.negotiation.replay import Replayed, ReplayGuard, Stale
from kbwg.negotiation.session import CheckerSpec, Negotiator
from kbwg.negotiation.wire import (
    PREFIX,
    Answer,
    CandidateInfo,
    InvalidField,
    Offer,
    WireError,
    WireMessage,
    key_hint,
    open_body,
    receive,
    seal,
)

FUZZ = settings(fuzzing.FUZZ, max_examples=120)

ALICE = DeviceId("alice", "laptop")
BOB = DeviceId("bob", "phone")
# Fixed keys: an example means the same thing on every run.
ALICE_KEY = PrivateKey(bytes(range(1, 33)))
BOB_KEY = PrivateKey(bytes(range(33, 65)))
NOW = 1_800_000_000.0
CHANNEL = Channel("team", "kbwg", "dev")
# What a usable ufrag/pwd is made of, the whole string (RFC 8445 ice-chars).
ICE_CHARS = re.compile(r"[A-Za-z0-9+/]*")

CAND = CandidateInfo("srflx", "198.51.100.7", 40000, 1694498815, "srflx1")
OFFER = Offer("abcd", "p" * 22, 2**64 - 1,
              [CAND, CandidateInfo("host", "192.0.2.2", 51820, 2130706431, "h0")], 51820)
ANSWER = Answer("wxyz+/09", "Q" * 64, [CAND])


def _message(type_: str = "offer", body: dict[str, Any] | None = None,
             timestamp: float = NOW) -> WireMessage:
    return WireMessage(type_, str(ALICE), str(BOB), b"r" * 16, b"s" * 16, timestamp,
                       b"n" * 12, OFFER.to_wire() if body is None else body)


def _bob_opens(text: str) -> WireMessage:
    return open_body(text, sender=str(ALICE), sender_public=ALICE_KEY.public_key,
                     my_private=BOB_KEY, me=str(BOB))


def _box_text(plain: bytes) -> str:
    """A correctly sealed body around any bytes at all: only the content is hostile."""
    boxed = Box(ALICE_KEY, BOB_KEY.public_key).encrypt(plain, b"\x07" * Box.NONCE_SIZE)
    return (f"{PREFIX} {key_hint(BOB_KEY.public_key)} {key_hint(ALICE_KEY.public_key)} "
            f"{base64.b64encode(bytes(boxed)).decode('ascii')}")


def _opens_or_wire_error(text: str) -> WireMessage | None:
    try:
        return _bob_opens(text)
    except WireError as exc:
        assert str(exc)  # the reason is what gets logged
        return None


def _bodies_parse_or_wire_error(body: object) -> None:
    """Offer/Answer/CandidateInfo on any structure: a WireError or a valid object."""
    for parser in (Offer.from_wire, Answer.from_wire):
        try:
            parsed = parser(body)
        except WireError as exc:
            assert str(exc)
            continue
        # Whatever was accepted is what the checks and STUN will rely on.
        assert ICE_CHARS.fullmatch(parsed.ufrag) and 4 <= len(parsed.ufrag) <= 32
        assert ICE_CHARS.fullmatch(parsed.pwd) and 22 <= len(parsed.pwd) <= 64
        for candidate in parsed.candidates:
            assert ICE_CHARS.fullmatch(candidate.foundation)
            assert isinstance(candidate.port, int) and 1 <= candidate.port <= 65535
    candidates = body.get("candidates") if isinstance(body, dict) else None
    for raw in candidates if isinstance(candidates, list) else []:
        with contextlib.suppress(WireError):
            CandidateInfo.from_wire(raw)


# --- strategies ---

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.binary(max_size=40))
# Maps with text keys mostly (the envelope's own kind), bytes keys sometimes.
keys = st.one_of(st.text(max_size=12), st.sampled_from(
    ["v", "t", "from", "to", "fs", "ts", "sid", "n", "body", "ufrag", "pwd", "candidates",
     "tie_breaker", "wg_port", "type", "ip", "port", "priority", "foundation"]),
    st.binary(max_size=4))
structures = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=5),
                               st.dictionaries(keys, children, max_size=5)),
    max_leaves=25)
# A wrong type for a field: a container as often as a scalar (a list or map where a
# string is expected must not reach a set lookup or a comparison).
containers = st.one_of(st.lists(scalars, max_size=3),
                       st.dictionaries(st.text(max_size=4), scalars, max_size=3))
wrong = st.one_of(scalars, containers)


def type_confused(valid: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    return fuzzing.type_confused(valid, scalars, containers)


def _ice(min_size: int, max_size: int) -> st.SearchStrategy[str]:
    return st.text("abcXYZ019+/", min_size=min_size, max_size=max_size)


# Near-valid values: right type, edge values, wrong type.
candidate_fields = {
    "type": st.one_of(st.sampled_from(["host", "srflx", "relay", "prflx"]), wrong),
    "ip": st.one_of(st.sampled_from(["198.51.100.7", "0.0.0.0", "255.255.255.255",
                                     "1.2.3", "01.2.3.4", "::1", "1.2.3.4\n", " 1.2.3.4"]),
                    wrong),
    "port": st.one_of(st.integers(-1, 70000), st.integers(-(2**63), 2**64 - 1), wrong),
    "priority": st.one_of(st.integers(-1, 2**32), wrong),
    "foundation": st.one_of(_ice(0, 40), st.text(max_size=40), wrong),
}


@st.composite
def _near(draw: st.DrawFn, valid: dict[str, Any],
          alternatives: dict[str, st.SearchStrategy[Any]]) -> dict[Any, Any]:
    """`valid` with a few fields replaced by near or wrong values, or left out."""
    out: dict[Any, Any] = dict(valid)
    for name in draw(st.sets(st.sampled_from(sorted(alternatives)), min_size=1, max_size=3)):
        if draw(st.integers(0, 5)):
            out[name] = draw(alternatives[name])
        else:
            out.pop(name, None)
    return out


near_valid_candidates = _near(CAND.to_wire(), candidate_fields)
body_fields = {
    # ICE characters with something after: a regex's `$` also matches before a final \n.
    "ufrag": st.one_of(_ice(0, 40), st.tuples(_ice(4, 31), st.sampled_from("\n\x00 ")).map(
        "".join), st.text(max_size=40), wrong),
    "pwd": st.one_of(_ice(20, 70), st.tuples(_ice(22, 63), st.sampled_from("\n\x00 ")).map(
        "".join), st.text(min_size=20, max_size=70), wrong),
    "tie_breaker": st.one_of(st.integers(-(2**63), 2**64 - 1), wrong),
    "wg_port": st.one_of(st.integers(-1, 70000), wrong),
    "candidates": st.one_of(
        st.lists(st.one_of(near_valid_candidates, wrong), max_size=6),
        st.lists(st.just(CAND.to_wire()), min_size=60, max_size=70), wrong),
}
near_valid_bodies = st.one_of(_near(OFFER.to_wire(), body_fields),
                              _near(ANSWER.to_wire(), body_fields))


envelope_fields = {
    "v": st.one_of(st.just(1), st.just(True), st.just(1.0), st.integers(-5, 5), wrong),
    "t": st.one_of(st.sampled_from(["offer", "answer", "restart", "bye", "claim", "ping",
                                    ""]), wrong),
    "from": st.one_of(st.sampled_from([str(ALICE), str(BOB), "alice", "alice/", "/",
                                       "x" * 200 + "/y"]), wrong),
    "to": st.one_of(st.sampled_from([str(BOB), str(ALICE), "bob/phone\x00"]), wrong),
    "fs": st.one_of(st.binary(min_size=15, max_size=17), wrong),
    "ts": st.one_of(st.just(NOW), st.integers(-(2**63), 2**64 - 1),
                    st.floats(allow_nan=True, allow_infinity=True), st.just(True),
                    wrong),
    "sid": st.one_of(st.binary(min_size=15, max_size=17), wrong),
    "n": st.one_of(st.binary(min_size=11, max_size=13), wrong),
    "body": st.one_of(near_valid_bodies, structures),
}


near_valid_envelopes = st.builds(
    lambda env, extra: {**env, **extra},
    _near(_message().to_envelope(), envelope_fields),
    st.dictionaries(keys, structures, max_size=1))


# Characters a sealed body is made of, favoured when one is mutated.
WIRE_CHARS = "ABab09+/= \n\t"
SEALED = seal(_message(), ALICE_KEY, BOB_KEY.public_key)
PLAIN = msgpack.packb(_message().to_envelope(), use_bin_type=True)
hint_prefix = f"{PREFIX} {key_hint(BOB_KEY.public_key)} {key_hint(ALICE_KEY.public_key)} "


# --- the outer text ---

@pytest.mark.timeout(60)
@FUZZ
@given(text=st.one_of(
    st.text(max_size=300),
    st.builds(lambda tail: hint_prefix + tail, st.text(max_size=200)),
    st.builds(lambda tail: hint_prefix + base64.b64encode(tail).decode(),
              st.binary(max_size=120)),
    st.builds(lambda a, b, c: f"{PREFIX} {a} {b} {c}", st.text(max_size=20),
              st.text(max_size=20), st.text(max_size=40)),
    st.integers(65_000, 70_000).map(lambda n: hint_prefix + "A" * n),
))
def test_any_text_is_a_wire_error(text: str) -> None:
    assert _opens_or_wire_error(text) is None


@pytest.mark.timeout(60)
@FUZZ
@given(text=fuzzing.mutated_text(SEALED, WIRE_CHARS))
def test_a_mutated_sealed_body_opens_to_the_original_or_not_at_all(text: str) -> None:
    # The box authenticates: no change to the text yields a different message (base64
    # padding aside, a change either breaks the box or decodes to the same bytes).
    opened = _opens_or_wire_error(text)
    assert opened is None or opened == _message()


# --- the sealed content ---

@pytest.mark.timeout(60)
@FUZZ
@given(plain=st.one_of(fuzzing.mutated(PLAIN), st.binary(max_size=200)))
def test_any_sealed_bytes_are_a_wire_error_or_a_valid_message(plain: bytes) -> None:
    opened = _opens_or_wire_error(_box_text(plain))
    if opened is not None:
        _bodies_parse_or_wire_error(opened.body)


@pytest.mark.timeout(60)
@FUZZ
@given(envelope=st.one_of(near_valid_envelopes, structures))
def test_any_sealed_structure_is_a_wire_error_or_a_valid_message(envelope: object) -> None:
    opened = _opens_or_wire_error(_box_text(msgpack.packb(envelope, use_bin_type=True)))
    if opened is not None:
        assert opened.sender == str(ALICE) and opened.recipient == str(BOB)
        assert isinstance(opened.timestamp, float) and math.isfinite(opened.timestamp)
        _bodies_parse_or_wire_error(opened.body)


@pytest.mark.timeout(60)
@FUZZ
@given(body=st.one_of(near_valid_bodies, type_confused(OFFER.to_wire()),
                     type_confused(ANSWER.to_wire()), structures))
def test_offer_and_answer_bodies(body: object) -> None:
    # The same structure after a msgpack round trip, as a peer's box delivers it.
    _bodies_parse_or_wire_error(body)
    _bodies_parse_or_wire_error(msgpack.unpackb(msgpack.packb(body, use_bin_type=True),
                                                raw=False, strict_map_key=False))


@pytest.mark.timeout(60)
@settings(FUZZ, max_examples=200)
@given(candidate=st.one_of(near_valid_candidates, type_confused(CAND.to_wire()),
                          structures))
def test_candidates(candidate: object) -> None:
    try:
        parsed = CandidateInfo.from_wire(candidate)
    except WireError as exc:
        assert str(exc)
    else:
        assert parsed.type in {"host", "srflx", "relay", "prflx"}
        assert ICE_CHARS.fullmatch(parsed.foundation)


# --- receive: the whole path with the replay guard ---

class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _records(name: str) -> Iterator[list[logging.LogRecord]]:
    """The records `name` logs meanwhile (caplog is one per test, not per example)."""
    logger, handler = logging.getLogger(name), _ListHandler()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _chat(msg_id: int, body: str | None, sender: DeviceId = ALICE) -> ChatMessage:
    return ChatMessage(msg_id, "conv", CHANNEL, sender.username, sender.device, NOW, body,
                       "text" if body is not None else "attachment")


@pytest.mark.timeout(60)
@settings(FUZZ, max_examples=50)
@given(posts=st.lists(st.tuples(
    st.one_of(near_valid_envelopes.map(
        lambda env: _box_text(msgpack.packb(env, use_bin_type=True))),
        fuzzing.mutated_text(SEALED, WIRE_CHARS), st.just(SEALED), st.text(max_size=60), st.none()),
    st.sampled_from([ALICE, BOB, DeviceId("mallory", "desk")])), min_size=1, max_size=8))
def test_receive_returns_a_message_or_none_and_the_channel_keeps_working(
        posts: list[tuple[str | None, DeviceId]]) -> None:
    guard = ReplayGuard(clock=lambda: NOW)
    keys = {ALICE: ALICE_KEY.public_key, BOB: BOB_KEY.public_key}
    with _records("kbwg.negotiation.wire") as records:
        for msg_id, (body, sender) in enumerate(posts, start=1):
            records.clear()
            got = receive(_chat(msg_id, body, sender), known_keys=keys, my_private=BOB_KEY,
                          me=BOB, guard=guard)
            if got is None:
                # Ignored, and said so.
                assert any(f" {msg_id} from " in r.getMessage() for r in records)
    # A fresh valid message after all that is still accepted.
    fresh = WireMessage("offer", str(ALICE), str(BOB), b"R" * 16, b"S" * 16, NOW + 1,
                        b"N" * 12, OFFER.to_wire())
    assert receive(_chat(len(posts) + 1, seal(fresh, ALICE_KEY, BOB_KEY.public_key)),
                   known_keys=keys, my_private=BOB_KEY, me=BOB, guard=guard) == fresh


# --- the negotiator: the entry point the agent's dev-channel listener calls ---

@dataclass(eq=False)
class _Checker:
    """Records what the session hands the connectivity checks."""

    spec: CheckerSpec
    remote: list[tuple[str, str, list[CandidateInfo]]] = field(default_factory=list)

    def set_remote(self, ufrag: str, pwd: str, candidates: list[CandidateInfo],
                   complete: bool = True) -> None:
        self.remote.append((ufrag, pwd, list(candidates)))

    def add_remote(self, candidates: list[CandidateInfo], complete: bool) -> None:
        self.remote.append(("", "", list(candidates)))

    def snapshot(self) -> dict[str, Any]:
        return {}

    @property
    def was_connected(self) -> bool:
        return False

    def retire(self) -> None:
        pass

    def close(self) -> None:
        pass


def _fresh(envelope: object) -> object:
    """The envelope timestamped now with a new message id where those fields are still
    the valid ones, so the replay guard lets it through to the body parsers."""
    if isinstance(envelope, dict) and envelope.get("ts") == NOW:
        return {**envelope, "ts": time.time(), "n": os.urandom(12)}
    return envelope


async def _bob_negotiates(envelopes: list[object]) -> None:
    posted: list[str] = []

    async def post(text: str) -> None:
        posted.append(text)

    async def candidates() -> list[CandidateInfo]:
        return [CAND]

    checkers: list[_Checker] = []

    def make_checker(spec: CheckerSpec) -> _Checker:
        checkers.append(_Checker(spec))
        return checkers[-1]

    bob = Negotiator(BOB, BOB_KEY, post, make_checker, candidates, 51820,
                     offer_grace_s=600.0, answer_timeout_s=600.0)
    try:
        # Alice joined later: Bob waits for her offer instead of offering.
        bob.peer_key(ALICE, base64.b64encode(bytes(ALICE_KEY.public_key)).decode(), True)
        for msg_id, envelope in enumerate(envelopes, start=1):
            body = _box_text(msgpack.packb(_fresh(envelope), use_bin_type=True))
            await asyncio.wait_for(bob.handle(_chat(msg_id, body)), 2.0)
        for checker in checkers:  # what got through is what the checks can use
            for ufrag, pwd, _ in checker.remote:
                assert ICE_CHARS.fullmatch(ufrag) and ICE_CHARS.fullmatch(pwd)
        # Still negotiating: a fresh offer from Alice (a new agent run) is answered.
        offer = WireMessage("offer", str(ALICE), str(BOB), os.urandom(16), os.urandom(16),
                            time.time(), os.urandom(12), OFFER.to_wire())
        await asyncio.wait_for(bob.handle(_chat(len(envelopes) + 1, seal(
            offer, ALICE_KEY, BOB_KEY.public_key))), 2.0)
        answer = open_body(posted[-1], sender=str(BOB), sender_public=BOB_KEY.public_key,
                           my_private=ALICE_KEY, me=str(ALICE))
        assert (answer.type, answer.session_id) == ("answer", offer.session_id)
    finally:
        bob.forget(ALICE)


@pytest.mark.timeout(60)
@settings(FUZZ, max_examples=60)
@given(envelopes=st.lists(st.one_of(
    near_valid_envelopes, structures,
    # Valid envelopes around near-valid bodies: the body parsers run inside the session.
    st.tuples(st.sampled_from(["offer", "restart", "answer"]), near_valid_bodies).map(
        lambda t: _message(*t).to_envelope()),
    # And valid offers around near-valid candidates.
    st.lists(st.one_of(near_valid_candidates, type_confused(CAND.to_wire())),
             min_size=1, max_size=3).map(
        lambda c: _message("offer", {**OFFER.to_wire(), "candidates": c}).to_envelope()),
), max_size=6))
def test_the_negotiator_ignores_any_sealed_content_and_keeps_answering(
        envelopes: list[object]) -> None:
    asyncio.run(_bob_negotiates(envelopes))


# --- the replay guard alone ---

@st.composite
def replay_messages(draw: st.DrawFn) -> tuple[float, WireMessage]:
    """(clock, message) from small pools, so runs, sessions and ids repeat."""
    clock = NOW + draw(st.integers(0, 400))
    timestamp = draw(st.one_of(st.floats(-1e300, 1e300),
                               st.integers(-300, 300).map(lambda d: clock + d)))
    message = WireMessage(
        draw(st.sampled_from(["offer", "answer", "bye"])),
        draw(st.sampled_from([str(ALICE), str(DeviceId("carol", "pc"))])), str(BOB),
        draw(st.sampled_from([b"a" * 16, b"b" * 16, b"c" * 16])),
        draw(st.sampled_from([b"x" * 16, b"y" * 16])), float(timestamp),
        draw(st.integers(0, 40)).to_bytes(12, "big"), {})
    return clock, message


@pytest.mark.timeout(60)
@settings(FUZZ, max_examples=80)
@given(steps=st.lists(st.one_of(replay_messages(), st.tuples(
    st.just(None), st.tuples(st.sampled_from([str(ALICE), "carol/pc"]),
                             st.sampled_from([b"x" * 16, b"y" * 16])))), max_size=40))
def test_replay_guard_never_accepts_a_message_twice(
        steps: list[tuple[float | None, Any]]) -> None:
    clock = [NOW]
    guard = ReplayGuard(window_s=120.0, clock=lambda: clock[0], max_nonces=8)
    accepted: set[tuple[object, ...]] = set()
    for at, item in steps:
        if at is None:
            guard.supersede(*item)
            continue
        clock[0] = max(clock[0], at)  # the wall clock may stand still, not go back here
        message: WireMessage = item
        try:
            guard.check(message)
        except (Replayed, Stale) as exc:
            assert str(exc)
            continue
        assert abs(clock[0] - message.timestamp) <= guard.window_s
        # The very same message, accepted a second time, would be a replay let through.
        key = (message.type, message.sender, message.sender_session, message.session_id,
               message.timestamp, message.nonce)
        assert key not in accepted
        accepted.add(key)
        assert guard.remembered() <= 2 * 8  # two senders, bounded memory


# --- what the fuzzing found, pinned ---

@pytest.mark.parametrize("kind", [["host"], {"host": 1}])
def test_an_unhashable_candidate_type_is_an_invalid_field(kind: object) -> None:
    # Was a TypeError from the set lookup, escaping the session's WireError handler.
    with pytest.raises(InvalidField, match=r"candidate\.type"):
        CandidateInfo.from_wire({**CAND.to_wire(), "type": kind})
    body = {**OFFER.to_wire(), "candidates": [{**CAND.to_wire(), "type": kind}]}
    with pytest.raises(InvalidField):
        Offer.from_wire(_bob_opens(_box_text(msgpack.packb(
            _message(body=body).to_envelope(), use_bin_type=True))).body)


@pytest.mark.parametrize(("field", "value"), [("ufrag", "abcd\n"), ("pwd", "p" * 22 + "\n")])
def test_credentials_ending_in_a_newline_are_not_ice_characters(field: str,
                                                                value: str) -> None:
    # `$` also matched before a final newline, which then went into STUN USERNAME.
    with pytest.raises(InvalidField, match=field):
        Offer.from_wire({**OFFER.to_wire(), field: value})
