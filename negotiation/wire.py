"""Negotiation messages on the team's dev-topic channel, sealed between two devices.

A message is one text body:

    kbwg1 <to> <from> <box>

- `<to>`, `<from>`: hints, the first 8 bytes (hex) of the recipient's and the sender's
  WireGuard public keys. Every agent reads every pair's messages, so the to-hint lets it
  skip the ones not sealed to its current key without trying to open them.
- `<box>`: standard base64 of `nacl.public.Box(sender_priv, recipient_pub).encrypt(m)`
  (24-byte random nonce first), the keys being the devices' announced WireGuard keys
  (both Curve25519), and `m` the msgpack map:

      v     1                      version
      t     "offer" | "answer" | "restart" | "bye" | "claim" | "candidates" | ...
      from  "user/device"          must equal the Keybase sender metadata
      to    "user/device"          must be the receiving device
      fs    16 random bytes        sender session: new each agent run
      ts    float                  sender's unix time
      sid   16 bytes               negotiation session, chosen by the offerer
      n     12 random bytes        message id, against replay
      body  map                    per type; `Offer` / `Answer` / `Trickle`

Candidates trickle (RFC 8838's idea): an offer or answer carries what is gathered when
it leaves (host candidates at least) and says with `eoc` (end of candidates) whether
more may follow; the rest follow in "candidates" messages of the same session, the
last one with `eoc` true. A body without `eoc` (an agent from before trickling) is
complete. Agents from before trickling ignore "candidates" messages (unknown type).

The box key is symmetric (A->B and B->A share it), so `from` and `to` inside the box
are what stop a device's own message being reflected back to it as the peer's.
Freshness (stale, replayed) is `replay.ReplayGuard`'s job; `receive` does it all.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import math
import os
import re
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from kbwg.core.identity import DeviceId
from kbwg.core.loglimit import LimitedLog
from kbwg.core.printable import PrintableReason
from kbwg.negotiation.signalling import SignalMessage

if TYPE_CHECKING:
    from kbwg.negotiation.replay import ReplayGuard

log = logging.getLogger(__name__)

VERSION = 1
PREFIX = f"kbwg{VERSION}"
# Far below the dev topic's 1,000,000 bytes: 64 candidates take about 6 KiB.
MAX_TEXT = 64 * 1024
DEFAULT_TYPES: frozenset[str] = frozenset(
    {"offer", "answer", "restart", "bye", "claim", "candidates"})
SENDER_SESSION_LEN = 16
SESSION_ID_LEN = 16
NONCE_LEN = 12
HINT_LEN = 8
MAX_CANDIDATES = 64
CANDIDATE_TYPES = frozenset({"host", "srflx", "relay", "prflx", "mapped"})

_HINT_RE = re.compile(rf"^[0-9a-f]{{{2 * HINT_LEN}}}$")
# RFC 8445 ice-chars: these end up in STUN USERNAME/MESSAGE-INTEGRITY. \Z, not $, which
# would also match before a final newline.
_ICE_CHARS_RE = re.compile(r"^[A-Za-z0-9+/]*\Z")
_BOX_OVERHEAD = Box.NONCE_SIZE + 16
_MAX_DEVICE_LEN = 128


class WireError(PrintableReason):
    """A negotiation message that cannot be used; str() is the reason, printable (no
    terminal controls from the body or the sender's name) and cut short."""


class NotForUs(WireError):
    """Sealed to another key: normal traffic between other pairs."""


class Undecodable(WireError):
    """Not our text format, bad base64 or msgpack, or a malformed field."""


class InvalidField(Undecodable):
    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"field {name!r}: {reason}")
        self.field = name


class Oversized(WireError):
    pass


class BadBox(WireError):
    """The box does not open with the sender's announced key: forged or tampered."""


class SenderKeyMismatch(BadBox):
    """Sealed with a key other than the announced one (perhaps a newer, unseen one)."""


class WrongSender(WireError):
    """The sealed `from`/`to` disagree with the Keybase sender or with us."""


class UnknownSender(WireError):
    """The Keybase sender is not in peers.json or has no announced key."""


def key_hint(key: PublicKey) -> str:
    return bytes(key)[:HINT_LEN].hex()


def _check(ok: bool, name: str, reason: str) -> None:
    if not ok:
        raise InvalidField(name, reason)


def _check_bytes(value: object, name: str, length: int) -> None:
    _check(isinstance(value, bytes) and len(value) == length, name, f"not {length} bytes")


def _check_int(value: object, name: str, low: int, high: int) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool), name, "not an integer")
    assert isinstance(value, int)
    _check(low <= value <= high, name, f"{value} not in {low}..{high}")


def _check_str(value: object, name: str, low: int, high: int, ice: bool = False) -> None:
    _check(isinstance(value, str), name, "not a string")
    assert isinstance(value, str)
    _check(low <= len(value) <= high, name, f"length {len(value)} not in {low}..{high}")
    _check(not ice or _ICE_CHARS_RE.match(value) is not None, name, "not ICE characters")


def _map(value: object, name: str) -> dict[str, Any]:
    _check(isinstance(value, dict) and all(isinstance(k, str) for k in value), name,
           "not a map with string keys")
    assert isinstance(value, dict)
    return value


@dataclass(frozen=True)
class WireMessage:
    type: str
    sender: str  # "user/device"
    recipient: str
    sender_session: bytes
    session_id: bytes
    timestamp: float
    nonce: bytes
    body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_str(self.type, "t", 1, 32)
        _check_str(self.sender, "from", 3, _MAX_DEVICE_LEN)
        _check("/" in self.sender, "from", "not user/device")
        _check_str(self.recipient, "to", 3, _MAX_DEVICE_LEN)
        _check("/" in self.recipient, "to", "not user/device")
        _check_bytes(self.sender_session, "fs", SENDER_SESSION_LEN)
        _check_bytes(self.session_id, "sid", SESSION_ID_LEN)
        _check(isinstance(self.timestamp, float) and math.isfinite(self.timestamp), "ts",
               "not a finite float")
        _check_bytes(self.nonce, "n", NONCE_LEN)
        _map(self.body, "body")

    @classmethod
    def new(cls, type: str, sender: DeviceId | str, recipient: DeviceId | str,
            sender_session: bytes, session_id: bytes, body: Mapping[str, Any] | None = None,
            *, timestamp: float | None = None) -> WireMessage:
        """A fresh message: now, with a random message id."""
        return cls(type, str(sender), str(recipient), sender_session, session_id,
                   time.time() if timestamp is None else timestamp, os.urandom(NONCE_LEN),
                   dict(body or {}))

    def to_envelope(self) -> dict[str, Any]:
        return {
            "v": VERSION, "t": self.type, "from": self.sender, "to": self.recipient,
            "fs": self.sender_session, "ts": self.timestamp, "sid": self.session_id,
            "n": self.nonce, "body": self.body,
        }

    @classmethod
    def from_envelope(cls, env: object) -> WireMessage:
        env = _map(env, "envelope")
        missing = {"v", "t", "from", "to", "fs", "ts", "sid", "n", "body"} - env.keys()
        _check(not missing, "envelope", f"lacks {sorted(missing)}")
        _check(type(env["v"]) is int and env["v"] == VERSION, "v",
               f"version {env['v']!r} is not {VERSION}")
        ts = env["ts"]
        # msgpack keeps a whole-number float a float, but a peer may send an int.
        _check(isinstance(ts, (int, float)) and not isinstance(ts, bool), "ts", "not a number")
        return cls(env["t"], env["from"], env["to"], env["fs"], env["sid"], float(ts),
                   env["n"], env["body"])


def new_sender_session() -> bytes:
    return os.urandom(SENDER_SESSION_LEN)


def new_session_id() -> bytes:
    return os.urandom(SESSION_ID_LEN)


# ------------------------------------------------------------------- sealing


def seal(message: WireMessage, sender_private: PrivateKey, recipient_public: PublicKey) -> str:
    plain = msgpack.packb(message.to_envelope(), use_bin_type=True)
    boxed = Box(sender_private, recipient_public).encrypt(plain)
    text = (f"{PREFIX} {key_hint(recipient_public)} {key_hint(sender_private.public_key)} "
            f"{base64.b64encode(bytes(boxed)).decode('ascii')}")
    if len(text) > MAX_TEXT:
        raise Oversized(f"{message.type} message is {len(text)} bytes, over {MAX_TEXT}")
    return text


def open_body(text: str, *, sender: str, sender_public: PublicKey, my_private: PrivateKey,
              me: str, types: Collection[str] = DEFAULT_TYPES) -> WireMessage:
    """The message in `text`, posted by Keybase device `sender` ("user/device").

    Cheap checks come first (size, then hints) so junk and other pairs' traffic cost
    no decryption. `types` lets a caller accept types added after this module.
    """
    # Checked on characters before any work: a valid body is ASCII, so this bounds bytes.
    if len(text) > MAX_TEXT:
        raise Oversized(f"body of {len(text)} characters, over {MAX_TEXT}")
    parts = text.split(" ")
    if len(parts) != 4 or parts[0] != PREFIX:
        raise Undecodable(f"not a {PREFIX} message: {text[:40]!r}")
    to_hint, from_hint, box_text = parts[1:]
    if not (_HINT_RE.match(to_hint) and _HINT_RE.match(from_hint)):
        raise Undecodable("malformed key hints")
    if to_hint != key_hint(my_private.public_key):
        raise NotForUs(f"sealed to key {to_hint}")
    if from_hint != key_hint(sender_public):
        raise SenderKeyMismatch(
            f"sealed with key {from_hint}, not {sender}'s announced {key_hint(sender_public)}")
    try:
        boxed = base64.b64decode(box_text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Undecodable("box is not base64") from exc
    if len(boxed) <= _BOX_OVERHEAD:
        raise Undecodable(f"box of {len(boxed)} bytes is too short")
    try:
        plain = Box(my_private, sender_public).decrypt(boxed)
    except CryptoError as exc:
        raise BadBox(f"box does not open with {sender}'s announced key") from exc
    try:
        env = msgpack.unpackb(plain, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise Undecodable(f"sealed content is not msgpack: {exc}") from exc
    message = WireMessage.from_envelope(env)
    if message.type not in types:
        raise InvalidField("t", f"unknown type {message.type!r}")
    if message.sender != sender:
        raise WrongSender(f"sealed as from {message.sender!r} but posted by {sender!r}")
    if message.recipient != me:
        raise WrongSender(f"sealed for {message.recipient!r}, not {me!r}")
    return message


def receive(chat: SignalMessage, *, known_keys: Mapping[DeviceId, PublicKey],
            my_private: PrivateKey, me: DeviceId, guard: ReplayGuard,
            types: Collection[str] = DEFAULT_TYPES) -> WireMessage | None:
    """The usable message in a dev-channel post, or None after a log line saying why.

    `known_keys` holds the announced key of every device in peers.json that has one:
    anyone else posting in the team's channel is ignored.
    """
    sender = DeviceId(chat.sender_username, chat.sender_device)
    try:
        if chat.body is None:
            raise Undecodable(f"{chat.content_type} content, not text")
        key = known_keys.get(sender)
        if key is None:
            raise UnknownSender("not in peers.json or no announced key")
        message = open_body(chat.body, sender=str(sender), sender_public=key,
                            my_private=my_private, me=str(me), types=types)
        guard.check(message)
    except WireError as exc:
        log_ignored(chat, exc)
        return None
    return message


def ignored_notes() -> LimitedLog:
    """For `log_ignored`: a sender can post refused messages without end."""
    return LimitedLog(log)


def log_ignored(chat: SignalMessage, exc: WireError, notes: LimitedLog | None = None) -> None:
    """One log line for a dev-channel post that is not used, at a level that fits
    (through `notes` when given)."""
    note = notes.log if notes is not None else log.log
    sender = f"{chat.sender_username}/{chat.sender_device}"
    if isinstance(exc, NotForUs):
        # The other pairs' everyday traffic (LimitedLog passes debug lines unlimited).
        note(logging.DEBUG, "negotiation message %d from %s not for us: %s", chat.id, sender,
             exc)
    elif isinstance(exc, BadBox | WrongSender | UnknownSender):
        # Possible forgery: worth an operator's attention.
        note(logging.WARNING, "ignoring negotiation message %d from %s: %s", chat.id, sender,
             exc)
    else:
        note(logging.INFO, "ignoring negotiation message %d from %s (%s): %s", chat.id,
             sender, type(exc).__name__, exc)


# ------------------------------------------------------------------- bodies


@dataclass(frozen=True)
class CandidateInfo:
    type: str  # host | srflx | relay | prflx | mapped
    ip: str  # IPv4, or IPv6 (canonical text, no scope)
    port: int
    priority: int
    foundation: str

    def __post_init__(self) -> None:
        # isinstance first: an unhashable value (a list, a map) cannot be looked up.
        _check(isinstance(self.type, str) and self.type in CANDIDATE_TYPES, "candidate.type",
               f"{self.type!r} unknown")
        _check_str(self.ip, "candidate.ip", 2, 39)
        try:
            ip = ipaddress.ip_address(self.ip)
        except ValueError:
            raise InvalidField("candidate.ip", f"{self.ip!r} is not an IP address") from None
        # One spelling per address: candidates are compared as text.
        _check(str(ip) == self.ip, "candidate.ip", f"{self.ip!r} is not in canonical form")
        _check_int(self.port, "candidate.port", 1, 65535)
        _check_int(self.priority, "candidate.priority", 0, 2**32 - 1)
        _check_str(self.foundation, "candidate.foundation", 1, 32, ice=True)

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.type, "ip": self.ip, "port": self.port,
                "priority": self.priority, "foundation": self.foundation}

    @classmethod
    def from_wire(cls, raw: object) -> CandidateInfo:
        obj = _map(raw, "candidate")
        try:
            return cls(obj["type"], obj["ip"], obj["port"], obj["priority"], obj["foundation"])
        except KeyError as exc:
            raise InvalidField(f"candidate.{exc.args[0]}", "missing") from None


def _check_credentials(ufrag: object, pwd: object) -> None:
    _check_str(ufrag, "ufrag", 4, 32, ice=True)
    _check_str(pwd, "pwd", 22, 64, ice=True)


def _split_families(candidates: list[CandidateInfo]) -> dict[str, Any]:
    """IPv4 candidates under "candidates", IPv6 ones under "candidates6": agents from
    before IPv6 read only the first key and refuse a body with an IPv6 address in it."""
    out: dict[str, Any] = {"candidates": [c.to_wire() for c in candidates if ":" not in c.ip]}
    six = [c.to_wire() for c in candidates if ":" in c.ip]
    if six:
        out["candidates6"] = six
    return out


def _merged_candidates(obj: dict[str, Any]) -> list[CandidateInfo]:
    merged = _candidates(obj["candidates"]) + _candidates(obj.get("candidates6", []))
    _check(len(merged) <= MAX_CANDIDATES, "candidates", f"{len(merged)} over {MAX_CANDIDATES}")
    return merged


def _candidates(raw: object) -> list[CandidateInfo]:
    _check(isinstance(raw, list), "candidates", "not a list")
    assert isinstance(raw, list)
    _check(len(raw) <= MAX_CANDIDATES, "candidates", f"{len(raw)} over {MAX_CANDIDATES}")
    return [CandidateInfo.from_wire(c) for c in raw]


def _check_candidates(value: object) -> None:
    _check(isinstance(value, list) and all(isinstance(c, CandidateInfo) for c in value),
           "candidates", "not a list of CandidateInfo")
    assert isinstance(value, list)
    _check(len(value) <= MAX_CANDIDATES, "candidates", f"{len(value)} over {MAX_CANDIDATES}")


def _eoc(obj: dict[str, Any]) -> bool:
    """End of candidates; absent (an agent from before trickling) means complete."""
    value = obj.get("eoc", True)
    _check(isinstance(value, bool), "eoc", "not a boolean")
    return bool(value)


@dataclass(frozen=True)
class Offer:
    ufrag: str
    pwd: str
    tie_breaker: int  # RFC 8445 role-conflict tie-breaker
    candidates: list[CandidateInfo]
    wg_port: int
    complete: bool = True  # False: more candidates trickle in later ("candidates")

    def __post_init__(self) -> None:
        _check_credentials(self.ufrag, self.pwd)
        _check_int(self.tie_breaker, "tie_breaker", 0, 2**64 - 1)
        _check_candidates(self.candidates)
        _check_int(self.wg_port, "wg_port", 1, 65535)

    def to_wire(self) -> dict[str, Any]:
        return {"ufrag": self.ufrag, "pwd": self.pwd, "tie_breaker": self.tie_breaker,
                **_split_families(self.candidates), "wg_port": self.wg_port,
                "eoc": self.complete}

    @classmethod
    def from_wire(cls, raw: object) -> Offer:
        obj = _map(raw, "body")
        try:
            return cls(obj["ufrag"], obj["pwd"], obj["tie_breaker"],
                       _merged_candidates(obj), obj["wg_port"], _eoc(obj))
        except KeyError as exc:
            raise InvalidField(exc.args[0], "missing") from None


@dataclass(frozen=True)
class Answer:
    ufrag: str
    pwd: str
    candidates: list[CandidateInfo]
    complete: bool = True

    def __post_init__(self) -> None:
        _check_credentials(self.ufrag, self.pwd)
        _check_candidates(self.candidates)

    def to_wire(self) -> dict[str, Any]:
        return {"ufrag": self.ufrag, "pwd": self.pwd, **_split_families(self.candidates),
                "eoc": self.complete}

    @classmethod
    def from_wire(cls, raw: object) -> Answer:
        obj = _map(raw, "body")
        try:
            return cls(obj["ufrag"], obj["pwd"], _merged_candidates(obj), _eoc(obj))
        except KeyError as exc:
            raise InvalidField(exc.args[0], "missing") from None


@dataclass(frozen=True)
class Trickle:
    """Candidates gathered after the offer or answer of the same session left."""

    candidates: list[CandidateInfo]
    complete: bool

    def __post_init__(self) -> None:
        _check_candidates(self.candidates)

    def to_wire(self) -> dict[str, Any]:
        return {**_split_families(self.candidates), "eoc": self.complete}

    @classmethod
    def from_wire(cls, raw: object) -> Trickle:
        obj = _map(raw, "body")
        try:
            return cls(_merged_candidates(obj), _eoc(obj))
        except KeyError as exc:
            raise InvalidField(exc.args[0], "missing") from None
