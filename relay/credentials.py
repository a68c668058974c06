"""TURN REST credentials and nonces (long-term credential mechanism, RFC 8489 9.2).

The relay and the team share one secret. A username is `"<expiry unix time>:<user>"`
and its password is base64(HMAC-SHA1(secret, username)), the convention coturn calls
`use-auth-secret`: any team member can mint credentials, nobody has to register them,
and a leaked username stops working at its expiry, which the relay caps: an expiry
further ahead than the longest credential lifetime is refused, so nobody can mint a
username that never expires.

Nonces are stateless: the issue time plus a MAC over it and the client's address, so
the relay keeps no table an attacker could fill and a nonce is useless from elsewhere.
They are short (16 characters) because they go out in answers to unauthenticated
requests, which must not amplify much.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import struct
import time
from dataclasses import dataclass, field

from aioice.turn import make_integrity_key

from kbwg.core.addresses import Address
from kbwg.core.turnrest import rest_password, split_username
from kbwg.relay.limits import CREDENTIAL_CLOCK_SKEW

log = logging.getLogger(__name__)

_NONCE_MAC_BYTES = 8
_NONCE_TIME = struct.Struct("!I")


@dataclass
class NonceIssuer:
    """Issues and checks nonces bound to a client address, valid for `lifetime` s."""

    lifetime: float = 600.0
    key: bytes = field(default_factory=lambda: os.urandom(16))

    def _mac(self, issued: int, client: Address) -> bytes:
        message = f"{issued}|{client[0]}|{client[1]}".encode()
        return hmac.new(self.key, message, hashlib.sha1).digest()[:_NONCE_MAC_BYTES]

    def issue(self, client: Address, now: float | None = None) -> bytes:
        """base64url of the issue time (4 bytes) and the MAC: 16 characters."""
        issued = int(time.time() if now is None else now) & 0xFFFFFFFF
        return base64.urlsafe_b64encode(_NONCE_TIME.pack(issued) + self._mac(issued, client))

    def check(self, nonce: bytes, client: Address, now: float | None = None) -> bool:
        """True for a nonce we issued to this client that is not yet stale."""
        try:
            raw = base64.b64decode(nonce, altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            return False
        if len(raw) != _NONCE_TIME.size + _NONCE_MAC_BYTES:
            return False
        (issued,) = _NONCE_TIME.unpack_from(raw)
        if not hmac.compare_digest(raw[_NONCE_TIME.size:], self._mac(issued, client)):
            return False
        current = time.time() if now is None else now
        # A nonce from the future means the clock went back: make the client refetch.
        return issued <= current + 1 and current - issued < self.lifetime


@dataclass(frozen=True)
class RestAuthenticator:
    secret: str
    realm: str
    # Seconds: the furthest ahead a username's expiry may lie (plus the clock skew).
    max_lifetime: float = 24 * 3600

    def integrity_key(self, username: str) -> bytes:
        return make_integrity_key(username, self.realm, rest_password(self.secret, username))

    def expired(self, username: str, now: float | None = None) -> bool:
        """True when the username has no valid expiry or it has passed."""
        parsed = split_username(username)
        if parsed is None:
            return True
        return parsed[0] < (time.time() if now is None else now)

    def too_far(self, username: str, now: float | None = None) -> bool:
        """True when the username's expiry lies beyond the longest lifetime accepted."""
        parsed = split_username(username)
        if parsed is None:
            return False
        current = time.time() if now is None else now
        return parsed[0] > current + self.max_lifetime + CREDENTIAL_CLOCK_SKEW
