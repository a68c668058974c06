"""TURN REST credentials and nonces (long-term credential mechanism, RFC 8489 9.2).

The relay and the team share one secret. A username is `"<expiry unix time>:<user>"`
and its password is base64(HMAC-SHA1(secret, username)), the convention coturn calls
`use-auth-secret`: any team member can mint credentials, nobody has to register them,
and a leaked username stops working at its expiry.

Nonces are stateless: the issue time plus a MAC over it and the client's address, so
the relay keeps no table an attacker could fill and a nonce is useless from elsewhere.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from dataclasses import dataclass, field

from aioice.turn import make_integrity_key

from kbwg.core.addresses import Address
from kbwg.core.turnrest import rest_password, split_username

log = logging.getLogger(__name__)

_NONCE_MAC_BYTES = 10


@dataclass
class NonceIssuer:
    """Issues and checks nonces bound to a client address, valid for `lifetime` s."""

    lifetime: float = 600.0
    key: bytes = field(default_factory=lambda: os.urandom(16))

    def _mac(self, issued: int, client: Address) -> str:
        message = f"{issued}|{client[0]}|{client[1]}".encode()
        return hmac.new(self.key, message, hashlib.sha1).digest()[:_NONCE_MAC_BYTES].hex()

    def issue(self, client: Address, now: float | None = None) -> bytes:
        issued = int(time.time() if now is None else now)
        return f"{issued:x}-{self._mac(issued, client)}".encode()

    def check(self, nonce: bytes, client: Address, now: float | None = None) -> bool:
        """True for a nonce we issued to this client that is not yet stale."""
        try:
            stamp, _, mac = nonce.decode("ascii").partition("-")
            issued = int(stamp, 16)
        except (UnicodeDecodeError, ValueError):
            return False
        if not hmac.compare_digest(mac, self._mac(issued, client)):
            return False
        current = time.time() if now is None else now
        # A nonce from the future means the clock went back: make the client refetch.
        return issued <= current + 1 and current - issued < self.lifetime


@dataclass(frozen=True)
class RestAuthenticator:
    secret: str
    realm: str

    def integrity_key(self, username: str) -> bytes:
        return make_integrity_key(username, self.realm, rest_password(self.secret, username))

    def expired(self, username: str, now: float | None = None) -> bool:
        """True when the username has no valid expiry or it has passed."""
        parsed = split_username(username)
        if parsed is None:
            return True
        return parsed[0] < (time.time() if now is None else now)
