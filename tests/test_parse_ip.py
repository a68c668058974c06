"""`kbwg.core.addresses.parse_ip`: ip_address remembered, without changing what it
accepts or refuses."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from kbwg.core import addresses
from kbwg.core.addresses import ip_family, parse_endpoint, parse_ip
from kbwg.negotiation.candidate_pairs import checkable
from kbwg.owner.rawstun import is_usable_unicast


def test_a_parsed_address_is_reused() -> None:
    first = parse_ip("198.51.100.7")
    assert parse_ip("198.51.100.7") is first
    assert first == ipaddress.ip_address("198.51.100.7")


def test_a_refused_address_is_refused_every_time() -> None:
    for _ in range(2):
        with pytest.raises(ValueError):
            parse_ip("198.51.100.300")


@pytest.mark.parametrize("value", [3232235777, b"192.0.2.1", ["192.0.2.1"], None])
def test_only_text_is_parsed(value: Any) -> None:
    # ip_address would take an int or bytes; a list would break the cache's hashing.
    with pytest.raises(ValueError):
        parse_ip(value)
    assert ip_family(value) is None and checkable(value) is False
    assert is_usable_unicast(value) is False


def test_many_distinct_addresses_stay_bounded() -> None:
    for i in range(5000):
        parse_ip(str(ipaddress.IPv4Address("198.18.0.0") + i))
    info = addresses._remembered_ip.cache_info()
    assert info.maxsize is not None and info.currsize <= info.maxsize


@pytest.mark.parametrize(("text", "usable"), [
    ("192.0.2.1", True),
    ("2001:db8::1", True),
    ("255.255.255.255", False),
    ("224.0.0.1", False),
    ("0.0.0.0", False),
    ("fe80::1", False),
    ("::ffff:192.0.2.1", False),
    ("not an address", False),
])
def test_callers_answer_as_before(text: str, usable: bool) -> None:
    # Twice: the second answer comes from the remembered parse.
    for _ in range(2):
        assert is_usable_unicast(text) is usable
    assert ip_family("2001:db8::1") == 6 and ip_family("nonsense") is None
    assert checkable("fe80::1") is False and checkable("192.0.2.1") is True
    assert parse_endpoint("[2001:db8::1]:51820") == ("2001:db8::1", 51820)
    with pytest.raises(ValueError):
        parse_endpoint("2001:db8::1:51820")
