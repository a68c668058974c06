"""Relay building blocks without sockets: credentials, nonces, policy, rate limits."""

from __future__ import annotations

import base64
import hashlib
import hmac

from kbwg.core.turnrest import rest_password, rest_username, split_username
from kbwg.relay.config import Lifetimes
from kbwg.relay.credentials import NonceIssuer, RestAuthenticator
from kbwg.relay.limits import PeerPolicy, RateLimiter, parse_networks


def test_rest_password_is_coturns() -> None:
    # coturn: base64(HMAC-SHA1(static-auth-secret, username)).
    expected = base64.b64encode(hmac.new(b"s", b"1700000000:alice", hashlib.sha1).digest())
    assert rest_password("s", "1700000000:alice") == expected.decode()
    assert rest_username("alice", 60, now=1000) == "1060:alice"
    assert split_username("1060:alice") == (1060, "alice")
    assert split_username("1060") == (1060, "1060")
    assert split_username("alice") is None and split_username("12x:a") is None


def test_expiry() -> None:
    auth = RestAuthenticator("s", "kbwg")
    assert not auth.expired("2000:alice", now=1999)
    assert auth.expired("2000:alice", now=2001)
    assert auth.expired("alice")


def test_nonces_are_bound_to_client_and_time() -> None:
    nonces = NonceIssuer(lifetime=10)
    nonce = nonces.issue(("192.0.2.1", 5000), now=100)
    assert nonces.check(nonce, ("192.0.2.1", 5000), now=105)
    assert not nonces.check(nonce, ("192.0.2.1", 5000), now=111)  # stale
    assert not nonces.check(nonce, ("192.0.2.2", 5000), now=105)  # another client
    assert not nonces.check(nonce, ("192.0.2.1", 5000), now=50)  # from the future
    assert not NonceIssuer().check(nonce, ("192.0.2.1", 5000), now=105)  # another key
    assert not nonces.check(b"\xff garbage", ("192.0.2.1", 5000), now=105)


def test_peer_policy() -> None:
    policy = PeerPolicy(own=frozenset({"203.0.113.5"}))
    assert policy.refusal("198.51.100.7") is None
    for denied in ("127.0.0.1", "169.254.3.4", "224.0.0.251", "255.255.255.255",
                   "0.0.0.0", "203.0.113.5", "::1", "fe80::1", "::ffff:127.0.0.1"):
        assert policy.refusal(denied) is not None, denied
    opened = PeerPolicy(allow=parse_networks(["127.0.0.0/8"]),
                        deny=parse_networks(["127.0.0.0/8", "10.0.0.0/8"]))
    assert opened.refusal("127.0.0.2") is None
    assert opened.refusal("10.1.2.3") is not None


def test_rate_limiter_refills_with_time() -> None:
    limiter = RateLimiter(10, 1e9, 1.0)
    limiter.last = 0.0
    assert sum(limiter.allow(0.0, 100) for _ in range(20)) == 10
    assert sum(limiter.allow(0.5, 100) for _ in range(20)) == 5
    bytes_limited = RateLimiter(1e9, 1000, 1.0)
    assert sum(bytes_limited.allow(0.0, 400) for _ in range(5)) == 2


def test_granted_lifetime() -> None:
    lifetimes = Lifetimes()
    assert lifetimes.granted(None) == 600
    assert lifetimes.granted(30) == 600
    assert lifetimes.granted(1800) == 1800
    assert lifetimes.granted(10**6) == 3600
