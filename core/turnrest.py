"""TURN REST credentials (the convention coturn's `use-auth-secret` follows): a username
`EXPIRY:USER` and the password base64(HMAC-SHA1(shared secret, username)). The agent
makes them, the relay checks them; both sides use these functions."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

# coturn's default separator between the expiry and the user name.
USERNAME_SEPARATOR = ":"


def rest_password(secret: str, username: str) -> str:
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def rest_username(user: str, ttl: float, now: float | None = None) -> str:
    expiry = int((time.time() if now is None else now) + ttl)
    return f"{expiry}{USERNAME_SEPARATOR}{user}"


def split_username(username: str) -> tuple[int, str] | None:
    """(expiry, user) of a REST username; a bare timestamp is its own user, as in coturn.

    None when the expiry is not a number.
    """
    stamp, sep, user = username.partition(USERNAME_SEPARATOR)
    # isascii too: isdigit() also passes "²" and other digits that int() refuses.
    if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 12:
        return None
    return int(stamp), user if sep else username
