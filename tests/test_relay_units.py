"""Relay building blocks without sockets: credentials, nonces, policy, rate limits."""

from __future__ import annotations

import base64
import hashlib
import hmac

from kbwg.core.turnrest import rest_password, rest_username, split_username
from kbwg.relay.config import Lifetimes
from kbwg.relay.credentials import NonceIssuer, RestAuthenticator
from kbwg.relay.hostaddrs import HostAddresses, parse_fib_trie, parse_if_inet6
from kbwg.relay.limits import (
    PeerPolicy,
    RateLimiter,
    UnauthenticatedLimiter,
    parse_networks,
)


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


def test_expiry_is_capped_at_the_longest_credential_lifetime() -> None:
    # Finding 4: an expiry of 999999999999 was accepted, a credential for ever.
    auth = RestAuthenticator("s", "kbwg", max_lifetime=86400)
    now = 1_700_000_000
    assert auth.too_far("999999999999:alice", now=now)
    assert not auth.too_far(f"{now + 86400}:alice", now=now)  # what agents mint
    assert not auth.too_far(f"{now + 86400 + 120}:alice", now=now)  # a clock ahead
    assert auth.too_far(f"{now + 86400 + 3600}:alice", now=now)
    assert RestAuthenticator("s", "kbwg", max_lifetime=600).too_far(
        f"{now + 86400}:alice", now=now)


def test_nonces_are_bound_to_client_and_time() -> None:
    nonces = NonceIssuer(lifetime=10)
    nonce = nonces.issue(("192.0.2.1", 5000), now=100)
    assert len(nonce) == 16  # it goes out in answers to anyone: short
    assert nonces.check(nonce, ("192.0.2.1", 5000), now=105)
    assert not nonces.check(nonce, ("192.0.2.1", 5000), now=111)  # stale
    assert not nonces.check(nonce, ("192.0.2.2", 5000), now=105)  # another client
    assert not nonces.check(nonce, ("192.0.2.1", 5000), now=50)  # from the future
    assert not NonceIssuer().check(nonce, ("192.0.2.1", 5000), now=105)  # another key
    assert not nonces.check(b"\xff garbage", ("192.0.2.1", 5000), now=105)


def test_peer_policy() -> None:
    policy = PeerPolicy(own=frozenset({"203.0.113.5"}))
    # A global address (only ever checked here, never sent to).
    assert policy.refusal("8.8.8.8") is None
    for denied in ("127.0.0.1", "169.254.3.4", "224.0.0.251", "255.255.255.255",
                   "0.0.0.0", "203.0.113.5", "::1", "fe80::1", "::ffff:127.0.0.1",
                   # Finding 1: the relay host's private networks were relayable.
                   "10.0.0.2", "172.17.0.1", "192.168.1.1", "100.64.0.1",
                   "198.18.0.1", "198.19.255.254", "192.0.0.8", "fc00::1", "fd12::1",
                   "::ffff:10.0.0.1"):
        assert policy.refusal(denied) is not None, denied
    # Documentation ranges are test worlds' internet: relayable unless they are ours.
    for allowed in ("172.32.0.1", "100.128.0.1", "198.20.0.1", "11.0.0.1", "2a00::1",
                    "192.0.2.1", "198.51.100.7", "203.0.113.9", "2001:db8::1"):
        assert policy.refusal(allowed) is None, allowed
    opened = PeerPolicy(allow=parse_networks(["127.0.0.0/8", "198.18.5.0/24"]),
                        deny=parse_networks(["127.0.0.0/8", "10.0.0.0/8"]))
    assert opened.refusal("127.0.0.2") is None
    assert opened.refusal("10.1.2.3") is not None
    assert PeerPolicy(allow=parse_networks(["198.18.5.0/24"])).refusal("198.18.5.1") is None


def test_the_relay_hosts_own_addresses_are_refused_unless_allowed() -> None:
    host = tuple(parse_networks(["8.8.4.4/32", "2a00::5/128"]))
    policy = PeerPolicy()
    assert policy.refusal("8.8.4.4", host) is not None
    assert policy.refusal("2a00::5", host) is not None
    assert policy.refusal("8.8.4.5", host) is None
    assert PeerPolicy(allow=parse_networks(["8.8.4.0/24"])).refusal("8.8.4.4", host) is None


FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 198.18.7.0/24 2 0 2
           |-- 198.18.7.0
              /24 link UNICAST
           |-- 198.18.7.1
              /32 host LOCAL
           |-- 198.18.9.0
              /32 link UNICAST
              /24 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
           |-- 198.18.7.1
              /32 host LOCAL
"""


def test_host_addresses_from_procfs() -> None:
    assert parse_fib_trie(FIB_TRIE) == set(parse_networks(
        ["127.0.0.0/8", "127.0.0.1/32", "198.18.7.1/32", "198.18.9.0/24"]))
    inet6 = ("00000000000000000000000000000001 01 80 10 80       lo\n"
             "20010db8000000000000000000000005 04 40 00 82     eth0\n"
             "garbage\n")
    assert parse_if_inet6(inet6) == set(parse_networks(["::1/128", "2001:db8::5/128"]))
    assert parse_fib_trie("nonsense\n|-- not-an-ip\n  /32 host LOCAL\n") == set()


def test_host_addresses_are_reread_at_most_every_min_age() -> None:
    answers = [parse_networks(["198.18.7.1"]), parse_networks(["198.18.8.1"])]
    host = HostAddresses(reader=lambda: answers[min(host.reads, 1)], min_age=1.0)
    assert host.current(10.0) == parse_networks(["198.18.7.1"])
    assert host.current(10.5) == parse_networks(["198.18.7.1"])  # cached
    assert host.current(11.0) == parse_networks(["198.18.8.1"])  # re-read: changed
    assert host.reads == 2


def test_unauthenticated_answers_are_limited_per_source_and_in_total() -> None:
    limiter = UnauthenticatedLimiter(per_source=10, total=200)
    # One source: a burst of two seconds' worth, then its refill rate.
    verdicts = [limiter.allow("192.0.2.1", 0.0) for _ in range(100)]
    assert verdicts.count(None) == 20
    assert set(verdicts[20:]) == {"unauthenticated_limited_source"}
    assert [limiter.allow("192.0.2.1", 1.0) for _ in range(15)].count(None) == 10
    # Many (spoofed) sources: the total bucket caps them, and the table stays small.
    fresh = UnauthenticatedLimiter(per_source=10, total=200)
    answered = sum(fresh.allow(f"198.18.{i // 250}.{i % 250}", 5.0) is None
                   for i in range(1000))
    assert answered == 200
    assert len(fresh.sources) == 200
    fresh.prune(100.0)
    assert not fresh.sources
    unlimited = UnauthenticatedLimiter(per_source=0, total=0)
    assert all(unlimited.allow("192.0.2.1", 0.0) is None for _ in range(1000))


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
