import base64
import logging
import time
from typing import Any

import msgpack
import pytest
from nacl.public import Box, PrivateKey, PublicKey

from kbwg.agent.keybase import Channel, ChatMessage
from kbwg.core.identity import DeviceId
from kbwg.negotiation import wire
from kbwg.negotiation.replay import Replayed, ReplayGuard, Stale
from kbwg.negotiation.wire import (
    MAX_TEXT,
    Answer,
    BadBox,
    CandidateInfo,
    InvalidField,
    NotForUs,
    Offer,
    Oversized,
    Undecodable,
    UnknownSender,
    WireError,
    WireMessage,
    WrongSender,
    key_hint,
    new_sender_session,
    new_session_id,
    open_body,
    receive,
    seal,
)

ALICE = DeviceId("alice", "laptop")
BOB = DeviceId("bob", "phone")
MALLORY = DeviceId("mallory", "desk")
CHANNEL = Channel("team", "kbwg", "dev")

ALICE_KEY = PrivateKey.generate()
BOB_KEY = PrivateKey.generate()
MALLORY_KEY = PrivateKey.generate()
ALICE_RUN = new_sender_session()

CAND = CandidateInfo("srflx", "198.51.100.7", 40000, 1694498815, "srflx1")
OFFER = Offer("abcd", "p" * 22, 2**64 - 1, [CAND, CandidateInfo("host", "10.0.0.2", 51820,
                                                              2130706431, "h0")], 51820)
ANSWER = Answer("wxyz+/09", "Q" * 64, [CAND])


def message(type_: str = "offer", body: dict[str, Any] | None = None, *,
            sender: DeviceId = ALICE, recipient: DeviceId = BOB, run: bytes = ALICE_RUN,
            timestamp: float | None = None) -> WireMessage:
    body = OFFER.to_wire() if body is None else body
    return WireMessage.new(type_, sender, recipient, run, new_session_id(), body,
                           timestamp=timestamp)


def bob_opens(text: str, sender: DeviceId = ALICE,
              sender_public: PublicKey = ALICE_KEY.public_key) -> WireMessage:
    return open_body(text, sender=str(sender), sender_public=sender_public,
                     my_private=BOB_KEY, me=str(BOB))


def chat(body: str, sender: DeviceId = ALICE, msg_id: int = 1) -> ChatMessage:
    return ChatMessage(msg_id, "conv", CHANNEL, sender.username, sender.device, time.time(),
                       body, "text")


def bob_receives(post: ChatMessage, guard: ReplayGuard) -> WireMessage | None:
    keys = {ALICE: ALICE_KEY.public_key, BOB: BOB_KEY.public_key}  # peers.json + announces
    return receive(post, known_keys=keys, my_private=BOB_KEY, me=BOB, guard=guard)


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize(
    ("type_", "body"),
    [("offer", OFFER.to_wire()), ("answer", ANSWER.to_wire()), ("restart", {}),
     ("bye", {"reason": "shutting down"})],
)
def test_round_trip(type_: str, body: dict[str, Any]) -> None:
    msg = message(type_, body)
    text = seal(msg, ALICE_KEY, BOB_KEY.public_key)
    assert text.startswith(f"kbwg1 {key_hint(BOB_KEY.public_key)} "
                           f"{key_hint(ALICE_KEY.public_key)} ")
    assert text.isascii()
    assert bob_opens(text) == msg


def test_offer_and_answer_bodies_round_trip() -> None:
    assert Offer.from_wire(bob_opens(seal(message(), ALICE_KEY, BOB_KEY.public_key)).body) \
        == OFFER
    assert Answer.from_wire(msgpack.unpackb(msgpack.packb(ANSWER.to_wire()))) == ANSWER


def test_bob_answers_alice_with_the_same_keys() -> None:
    msg = message("answer", ANSWER.to_wire(), sender=BOB, recipient=ALICE)
    opened = open_body(seal(msg, BOB_KEY, ALICE_KEY.public_key), sender=str(BOB),
                       sender_public=BOB_KEY.public_key, my_private=ALICE_KEY, me=str(ALICE))
    assert opened == msg


def test_extra_types_only_when_registered() -> None:
    text = seal(message("ping", {}), ALICE_KEY, BOB_KEY.public_key)
    with pytest.raises(InvalidField, match="unknown type 'ping'"):
        bob_opens(text)
    opened = open_body(text, sender=str(ALICE), sender_public=ALICE_KEY.public_key,
                       my_private=BOB_KEY, me=str(BOB), types={"ping"})
    assert opened.type == "ping"


# ------------------------------------------------------------------ field validation


def _with(obj: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = dict(obj)
    for key, value in changes.items():
        if value is _MISSING:
            del out[key]
        else:
            out[key] = value
    return out


_MISSING = object()
_CAND = CAND.to_wire()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (_with(OFFER.to_wire(), ufrag="abc"), "ufrag"),
        (_with(OFFER.to_wire(), ufrag="a" * 33), "ufrag"),
        (_with(OFFER.to_wire(), ufrag="ab d"), "ufrag"),
        (_with(OFFER.to_wire(), ufrag=1234), "ufrag"),
        (_with(OFFER.to_wire(), pwd="p" * 21), "pwd"),
        (_with(OFFER.to_wire(), pwd="p" * 65), "pwd"),
        (_with(OFFER.to_wire(), tie_breaker=-1), "tie_breaker"),
        (_with(OFFER.to_wire(), tie_breaker=2**64), "tie_breaker"),
        (_with(OFFER.to_wire(), tie_breaker="1"), "tie_breaker"),
        (_with(OFFER.to_wire(), wg_port=0), "wg_port"),
        (_with(OFFER.to_wire(), wg_port=65536), "wg_port"),
        (_with(OFFER.to_wire(), wg_port=True), "wg_port"),
        (_with(OFFER.to_wire(), wg_port=_MISSING), "wg_port"),
        (_with(OFFER.to_wire(), candidates={}), "candidates"),
        (_with(OFFER.to_wire(), candidates=[_CAND] * 65), "candidates"),
        (_with(OFFER.to_wire(), candidates=["x"]), "candidate"),
        (_with(OFFER.to_wire(), candidates=[_with(_CAND, type="bogus")]), "candidate.type"),
        (_with(OFFER.to_wire(), candidates=[_with(_CAND, ip="2001:DB8::1")]), "candidate.ip"),
        (_with(OFFER.to_wire(), candidates=[_with(_CAND, ip="300.1.1.1")]), "candidate.ip"),
        (_with(OFFER.to_wire(), candidates=[_with(_CAND, ip=None)]), "candidate.ip"),
        (_with(OFFER.to_wire(), candidates=[_with(_CAND, port=0)]), "candidate.port"),
        (_with(OFFER.to_wire(), candidates=[_with(_CAND, port=70000)]), "candidate.port"),
        (_with(OFFER.to_wire(), candidates=[_with(_CAND, priority=2**32)]),
         "candidate.priority"),
        (_with(OFFER.to_wire(), candidates=[_with(_CAND, foundation="")]),
         "candidate.foundation"),
        (_with(OFFER.to_wire(), candidates=[_with(_CAND, foundation=_MISSING)]),
         "candidate.foundation"),
    ],
)
def test_offer_field_validation(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidField) as info:
        Offer.from_wire(body)
    assert info.value.field == field
    assert field in str(info.value)


def test_answer_field_validation() -> None:
    with pytest.raises(InvalidField, match="'pwd'"):
        Answer.from_wire(_with(ANSWER.to_wire(), pwd=_MISSING))
    with pytest.raises(InvalidField, match="'ufrag'"):
        Answer("a", "p" * 22, [])
    assert Offer.from_wire(_with(OFFER.to_wire(), candidates=[_CAND] * 64)).candidates


def _envelope(**changes: Any) -> dict[str, Any]:
    return _with(message().to_envelope(), **changes)


@pytest.mark.parametrize(
    ("envelope", "field"),
    [
        (_envelope(v=2), "v"),
        (_envelope(v=True), "v"),
        (_envelope(t=7), "t"),
        (_envelope(**{"from": "alice"}), "from"),
        (_envelope(to=b"bob/phone"), "to"),
        (_envelope(fs=b"short"), "fs"),
        (_envelope(sid="x" * 16), "sid"),
        (_envelope(ts="now"), "ts"),
        (_envelope(ts=float("nan")), "ts"),
        (_envelope(n=b"\0" * 11), "n"),
        (_envelope(body=[1]), "body"),
        (_envelope(n=_MISSING), "envelope"),
    ],
)
def test_envelope_field_validation(envelope: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidField) as info:
        WireMessage.from_envelope(envelope)
    assert info.value.field == field
    # And the same through a real box: every bad field is Undecodable.
    boxed = Box(ALICE_KEY, BOB_KEY.public_key).encrypt(msgpack.packb(envelope))
    text = (f"kbwg1 {key_hint(BOB_KEY.public_key)} {key_hint(ALICE_KEY.public_key)} "
            f"{base64.b64encode(bytes(boxed)).decode()}")
    with pytest.raises(Undecodable, match=repr(field)):
        bob_opens(text)


# ------------------------------------------------------------------ forgery


def test_sealed_by_a_third_key_is_a_bad_box() -> None:
    # Mallory seals with her own key and claims to be Alice everywhere she can.
    text = seal(message(), MALLORY_KEY, BOB_KEY.public_key)
    with pytest.raises(BadBox, match="sealed with key"):
        bob_opens(text)
    # Even with the from-hint forged to Alice's, the box does not open.
    forged = text.split(" ")
    forged[2] = key_hint(ALICE_KEY.public_key)
    with pytest.raises(BadBox, match="does not open"):
        bob_opens(" ".join(forged))


def test_tampered_box_is_a_bad_box() -> None:
    text = seal(message(), ALICE_KEY, BOB_KEY.public_key)
    head, box = text.rsplit(" ", 1)
    raw = bytearray(base64.b64decode(box))
    raw[-1] ^= 1
    with pytest.raises(BadBox):
        bob_opens(f"{head} {base64.b64encode(bytes(raw)).decode()}")


def test_envelope_naming_another_sender_is_wrong_sender() -> None:
    # Bob himself seals a message claiming to be from Alice: his box opens with his key,
    # but the sealed `from` is not who Keybase says posted it.
    msg = message(sender=ALICE, recipient=ALICE)
    text = seal(msg, BOB_KEY, ALICE_KEY.public_key)
    with pytest.raises(WrongSender, match="posted by 'bob/phone'"):
        open_body(text, sender=str(BOB), sender_public=BOB_KEY.public_key,
                  my_private=ALICE_KEY, me=str(ALICE))


def test_own_message_reflected_back_is_wrong_sender() -> None:
    # The box key is symmetric: Alice's message to Bob opens for Alice too if the hints
    # are swapped and a (compromised) Keybase attributes it to Bob.
    text = seal(message(), ALICE_KEY, BOB_KEY.public_key)
    parts = text.split(" ")
    parts[1], parts[2] = parts[2], parts[1]
    with pytest.raises(WrongSender):
        open_body(" ".join(parts), sender=str(BOB), sender_public=BOB_KEY.public_key,
                  my_private=ALICE_KEY, me=str(ALICE))


def test_sealed_to_the_wrong_key() -> None:
    text = seal(message(), ALICE_KEY, MALLORY_KEY.public_key)
    with pytest.raises(NotForUs):
        bob_opens(text)
    parts = text.split(" ")
    parts[1] = key_hint(BOB_KEY.public_key)
    with pytest.raises(BadBox):
        bob_opens(" ".join(parts))


def test_sealed_for_another_device_is_wrong_sender() -> None:
    text = seal(message(recipient=MALLORY), ALICE_KEY, BOB_KEY.public_key)
    with pytest.raises(WrongSender, match="sealed for 'mallory/desk'"):
        bob_opens(text)


def test_receive_ignores_devices_not_in_peers_json(caplog: pytest.LogCaptureFixture) -> None:
    guard = ReplayGuard()
    text = seal(message(sender=MALLORY), MALLORY_KEY, BOB_KEY.public_key)
    with caplog.at_level(logging.WARNING, logger=wire.__name__):
        assert bob_receives(chat(text, sender=MALLORY), guard) is None
    assert "mallory/desk" in caplog.text and "peers.json" in caplog.text


def test_receive_uses_only_authentic_fresh_messages(caplog: pytest.LogCaptureFixture) -> None:
    guard = ReplayGuard()
    msg = message()
    text = seal(msg, ALICE_KEY, BOB_KEY.public_key)
    with caplog.at_level(logging.DEBUG, logger=wire.__name__):
        assert bob_receives(chat(text), guard) == msg
        # The replayed offer, redelivered or reposted: ignored with a log line.
        assert bob_receives(chat(text, msg_id=2), guard) is None
        assert "Replayed" in caplog.text
        caplog.clear()
        # Mallory reposts Alice's body as her own post: not usable either.
        assert bob_receives(chat(text, sender=MALLORY, msg_id=3), guard) is None
        assert "mallory/desk" in caplog.text
        caplog.clear()
        wrong_key = seal(message(), ALICE_KEY, MALLORY_KEY.public_key)
        assert bob_receives(chat(wrong_key, msg_id=4), guard) is None
        assert "not for us" in caplog.text
        caplog.clear()
        assert bob_receives(chat("hello", msg_id=5), guard) is None
        assert "Undecodable" in caplog.text
        non_text = ChatMessage(6, "conv", CHANNEL, "alice", "laptop", 0.0, None, "reaction")
        assert bob_receives(non_text, guard) is None


# ------------------------------------------------------------------ undecodable input


def test_oversized_before_any_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("decoded an oversized body")

    monkeypatch.setattr(base64, "b64decode", no_decoding)
    head = f"kbwg1 {key_hint(BOB_KEY.public_key)} {key_hint(ALICE_KEY.public_key)} "
    with pytest.raises(Oversized):
        bob_opens(head + "A" * MAX_TEXT)
    with pytest.raises(Oversized):
        bob_opens("\u00e9" * (MAX_TEXT + 1))


def test_seal_refuses_an_oversized_message() -> None:
    with pytest.raises(Oversized):
        seal(message("bye", {"pad": "x" * MAX_TEXT}), ALICE_KEY, BOB_KEY.public_key)


def _rebox(plain: bytes) -> str:
    boxed = Box(ALICE_KEY, BOB_KEY.public_key).encrypt(plain)
    return (f"kbwg1 {key_hint(BOB_KEY.public_key)} {key_hint(ALICE_KEY.public_key)} "
            f"{base64.b64encode(bytes(boxed)).decode()}")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-7],  # truncated base64
        lambda t: t[:-4] + "!!!!",  # not base64
        lambda t: t.replace("kbwg1", "kbwg2", 1),
        lambda t: t.replace(" ", "  ", 1),
        lambda t: t + " extra",
        lambda t: "kbwg1 zz" + t[8:],  # bad hint
        lambda t: " ".join([*t.split(" ")[:3], "QUJD"]),  # shorter than a box
        lambda t: "",
    ],
)
def test_garbled_text_is_undecodable(mangle: Any) -> None:
    text = seal(message(), ALICE_KEY, BOB_KEY.public_key)
    with pytest.raises(Undecodable):
        bob_opens(mangle(text))


@pytest.mark.parametrize(
    "plain",
    [
        b"\x93\x01\x02",  # a truncated msgpack array
        msgpack.packb(message().to_envelope())[:-3],  # truncated map
        msgpack.packb(message().to_envelope()) + b"\x00",  # trailing data
        msgpack.packb([1, 2, 3]),  # not a map
        msgpack.packb("offer"),
        msgpack.packb({1: 2}),  # non-string keys
        b"\xc1",  # never-used msgpack byte
    ],
)
def test_sealed_garbage_is_undecodable(plain: bytes) -> None:
    with pytest.raises(Undecodable):
        bob_opens(_rebox(plain))


def test_every_failure_is_a_wire_error() -> None:
    for exc in (NotForUs, Undecodable, Oversized, BadBox, WrongSender, UnknownSender,
                Replayed, Stale):
        assert issubclass(exc, WireError)


# ------------------------------------------------------------------ replay and staleness


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_same_message_twice_is_replayed() -> None:
    clock = Clock()
    guard = ReplayGuard(clock=clock)
    msg = message(timestamp=clock.now)
    opened = bob_opens(seal(msg, ALICE_KEY, BOB_KEY.public_key))
    guard.check(opened)
    # Sealed again (new box nonce), but the same message id.
    with pytest.raises(Replayed):
        guard.check(bob_opens(seal(msg, ALICE_KEY, BOB_KEY.public_key)))
    guard.check(message(timestamp=clock.now))  # a new message is fine


def test_old_and_future_messages_are_stale() -> None:
    clock = Clock()
    guard = ReplayGuard(window_s=120.0, clock=clock)
    with pytest.raises(Stale, match="ago"):
        guard.check(message(timestamp=clock.now - 121))
    with pytest.raises(Stale, match="future"):
        guard.check(message(timestamp=clock.now + 121))
    guard.check(message(timestamp=clock.now - 119))
    guard.check(message(timestamp=clock.now + 119))


def test_replay_after_the_window_is_stale_not_accepted() -> None:
    clock = Clock()
    guard = ReplayGuard(window_s=120.0, clock=clock)
    msg = message(timestamp=clock.now)
    guard.check(msg)
    clock.now += 121
    with pytest.raises(Stale):
        guard.check(msg)


def test_previous_sender_run_is_stale_once_a_newer_one_is_seen() -> None:
    clock = Clock()
    guard = ReplayGuard(clock=clock)
    old_run, new_run = new_sender_session(), new_sender_session()
    late_old = message(run=old_run, timestamp=clock.now - 5)  # sent before the restart
    # The first run heard of is no restart; the next one is (the agent renews
    # WireGuard's session with the peer then), once.
    assert not guard.check(message(run=old_run, timestamp=clock.now - 10))
    assert guard.check(message(run=new_run, timestamp=clock.now - 1))
    assert not guard.check(message(run=new_run, timestamp=clock.now - 0.5))
    with pytest.raises(Stale, match="earlier run"):
        guard.check(late_old)
    # Once replaced, the old run is never taken back, whatever its timestamps say.
    with pytest.raises(Stale, match="earlier run"):
        guard.check(message(run=old_run, timestamp=clock.now))
    guard.check(message(run=new_run, timestamp=clock.now))


def test_run_seen_late_but_older_is_stale() -> None:
    clock = Clock()
    guard = ReplayGuard(clock=clock)
    guard.check(message(run=new_sender_session(), timestamp=clock.now))
    with pytest.raises(Stale, match="earlier run"):
        guard.check(message(run=new_sender_session(), timestamp=clock.now - 30))


def test_sender_runs_are_tracked_per_sender() -> None:
    clock = Clock()
    guard = ReplayGuard(clock=clock)
    guard.check(message(run=new_sender_session(), timestamp=clock.now))
    guard.check(message(sender=BOB, recipient=ALICE, run=new_sender_session(),
                        timestamp=clock.now - 30))


def test_superseded_negotiation_session_is_stale() -> None:
    clock = Clock()
    guard = ReplayGuard(clock=clock)
    first = message(timestamp=clock.now)
    guard.check(first)
    guard.supersede(str(ALICE), first.session_id)
    later = WireMessage.new("answer", ALICE, BOB, ALICE_RUN, first.session_id,
                            ANSWER.to_wire(), timestamp=clock.now)
    with pytest.raises(Stale, match="superseded"):
        guard.check(later)


def test_nonces_are_pruned_over_time() -> None:
    clock = Clock()
    guard = ReplayGuard(window_s=120.0, clock=clock)
    for _ in range(2000):
        guard.check(message(timestamp=clock.now))
        clock.now += 1.0
    # One message a second with a 120 s window: about 120 ids held, not 2000.
    assert guard.remembered() <= 121


def test_per_sender_cap_never_opens_a_replay_hole() -> None:
    clock = Clock()
    guard = ReplayGuard(clock=clock, max_nonces=10)
    msgs = [message(timestamp=clock.now - 50 + i) for i in range(30)]
    for msg in msgs:
        guard.check(msg)
    assert guard.remembered() == 10
    for msg in msgs:  # forgotten ids fall under the floor, remembered ones are replays
        with pytest.raises((Stale, Replayed)):
            guard.check(msg)
    guard.check(message(timestamp=clock.now))
