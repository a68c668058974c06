"""`#announce` lines: the prototype's `ANNOUNCE <ip:port> <base64 wg public key>`.

The sender's identity always comes from Keybase's message metadata, never from the body.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from nacl.bindings import crypto_scalarmult
from nacl.exceptions import CryptoError

from kbwg.core.identity import DeviceId
from kbwg.core.printable import PrintableReason

ANNOUNCE_CHANNEL = "announce"
# How long an announcement stays valid; agents re-announce well within it.
ANNOUNCE_TTL_S = 3600.0

# Any scalar tells a low-order point (clamping clears the cofactor's bits).
_ANY_SCALAR = bytes([1]) * 32

_ANNOUNCE_RE = re.compile(r"^ANNOUNCE (\S+):(\d{1,5}) (\S+)\s*$")


class AnnounceError(PrintableReason, ValueError):
    """A body that is not a usable announcement; str() is the reason, printable (no
    terminal controls from the body) and cut short."""


@dataclass(frozen=True)
class Announcement:
    sender: DeviceId
    endpoint_ip: str
    endpoint_port: int
    public_key: str  # canonical base64 (see canonical_key), as WireGuard prints it
    msg_id: int
    sent_at: float

    @property
    def endpoint(self) -> str:
        return f"{self.endpoint_ip}:{self.endpoint_port}"


def format_announce(ip: str, port: int, public_key_b64: str) -> str:
    return f"ANNOUNCE {ip}:{port} {public_key_b64}"


def decode_public_key(text: str) -> bytes:
    """The 32 bytes of a base64 WireGuard key; AnnounceError when it is not one."""
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AnnounceError(f"public key {text[:60]!r} is not base64") from exc
    if len(key) != 32:
        raise AnnounceError(f"public key decodes to {len(key)} bytes, not 32")
    try:
        # libsodium refuses a point of small order (X25519 with it is all zeros): no
        # device has such a key, and every Box with it (sealed negotiation, early
        # check credentials) would fail.
        crypto_scalarmult(_ANY_SCALAR, key)
    except CryptoError:
        raise AnnounceError("public key is a low-order point, no device's key") from None
    return key


def canonical_key(text: str) -> str:
    """The one spelling of a key: base64 of its decoded bytes.

    Base64 of 32 bytes leaves two spare bits in its last character, so four texts decode
    to the same key; keys are compared in this form only, or two spellings of one key
    would pass as two keys.
    """
    return base64.b64encode(decode_public_key(text)).decode()


def parse_announce(body: str, sender: DeviceId, msg_id: int, sent_at: float) -> Announcement:
    match = _ANNOUNCE_RE.match(body)
    if match is None:
        raise AnnounceError(f"not an ANNOUNCE line: {body[:80]!r}")
    ip_text, port_text, key_text = match.groups()
    try:
        ip = ipaddress.IPv4Address(ip_text)
    except ValueError as exc:
        raise AnnounceError(f"endpoint address {ip_text!r} is not IPv4") from exc
    if ip.is_unspecified or ip.is_loopback or ip.is_multicast or ip.is_reserved:
        # WireGuard would send to this host itself (a local service) or nowhere useful.
        raise AnnounceError(f"endpoint address {ip} is not a unicast address of another host")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise AnnounceError(f"endpoint port {port} is out of range")
    return Announcement(sender, str(ip), port, canonical_key(key_text), msg_id, sent_at)


class FromDevice(Protocol):
    @property
    def sender(self) -> DeviceId: ...

    @property
    def msg_id(self) -> int: ...

    @property
    def sent_at(self) -> float: ...


M = TypeVar("M", bound=FromDevice)


class NewestBook(Generic[M]):
    """Newest message per device. Message ids grow within one conversation, so a lower
    or equal id is a replay or a late delivery and never replaces a newer one."""

    def __init__(self) -> None:
        self.latest: dict[DeviceId, M] = {}

    def offer(self, message: M) -> bool:
        current = self.latest.get(message.sender)
        if current is not None and message.msg_id <= current.msg_id:
            return False
        self.latest[message.sender] = message
        return True

    def prune(self, before: float, keep: Callable[[DeviceId], bool] = lambda _: False
              ) -> None:
        """Forget the messages sent before `before`, but those of devices `keep` names.
        A line that old is refused when it comes again (the caller's TTL check), so
        forgetting its newer one opens no replay."""
        for device in [d for d, m in self.latest.items() if m.sent_at < before and not keep(d)]:
            del self.latest[device]


class AnnounceBook(NewestBook[Announcement]):
    """Newest announcement per device."""
