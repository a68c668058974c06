"""Fuzzing the team's files in KBFS, peers.json and kbwg.json, with a bounded budget.

Any team writer can put anything in them. Whatever they hold, the parsers return a
valid configuration or raise PeersError / TeamConfigError with a message naming the
problem; nothing else escapes (the agent catches exactly those, logs them and keeps its
last good state).
"""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import fuzzing
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kbwg.agent.peers_file import DEFAULT_OVERLAY, PeersError, parse_peers
from kbwg.agent.teamconfig import TeamConfigError, parse_team_config

FUZZ = fuzzing.FUZZ

VALID_PEERS: list[dict[str, Any]] = [
    {"username": "alice", "device": "laptop", "ip": "100.64.0.2"},
    {"username": "bob", "device": "phone", "ip": "100.64.0.3"},
]
VALID_CONFIG: dict[str, Any] = {
    "stun": ["198.51.100.1:3478", "stun.example.org"],
    "relays": [{"url": "turn:203.0.113.5:3478?transport=udp", "secret": "s3cret",
                "username": "relay-user"}],
    "overlay": "100.64.0.0/16",
    "announce_channel": "announce",
    "negotiation_channel": "kbwg",
    "interface_exclude": ["docker*", "veth*"],
    "dynamic_range": "100.64.128.0/17",
    "policy": "servers",
}

# --- strategies ---

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
    st.text(max_size=30))
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=10), children, max_size=4)),
    max_leaves=20)

near_strings = st.one_of(
    st.sampled_from(["", " ", "\n", "100.64.0.2", " 100.64.0.4 ", "100.64.0.0",
                     "100.127.255.255", "100.128.0.1", "10.0.0.1", "::1", "2001:db8::1",
                     "100.64.0.0/10", "100.64.0.0/31", "0.0.0.0/0", "127.0.0.0/8",
                     "100.64.0.0/9", "100.64.1.0/24", "100.64.0.0/16", "100.65.0.0/17",
                     "turn:203.0.113.5", "turn:203.0.113.5:0", "turn:[2001:db8::1]:3478",
                     "turns:203.0.113.5", "turn://203.0.113.5", "turn:h:1?transport=tcp",
                     "turn:h:1?x=1", "turn:h:1?transport", "turn:", "turn:[::1",
                     "h:99999", "h:\u00b2", "h:\u0665", "[::1]:1", "[::1]x", "a:b:c",
                     "h/x", "h:" + "1" * 5000, "mesh", "servers", "MESH",
                     "..:3478", "a..b", "a" * 64 + ".example:3478", "b\u00fccher.example",
                     "announce\n", "a" * 21, "dev-1_x"]),
    st.text(max_size=30))
json_containers = st.one_of(st.lists(json_scalars, max_size=3),
                            st.dictionaries(st.text(max_size=4), json_scalars, max_size=3))
near_values = st.one_of(near_strings, json_values,
                        st.lists(st.one_of(near_strings, json_values), max_size=4))


@st.composite
def near(draw: st.DrawFn, valid: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """`valid` with a few keys replaced, left out, or added."""
    out = dict(valid)
    for name in draw(st.sets(st.sampled_from(names), min_size=1, max_size=3)):
        if draw(st.integers(0, 4)):
            out[name] = draw(near_values)
        else:
            out.pop(name, None)
    return out


@st.composite
def near_peers(draw: st.DrawFn) -> list[Any]:
    entries: list[Any] = [dict(e) for e in VALID_PEERS]
    for index in draw(st.sets(st.integers(0, 1), max_size=2)):
        entries[index] = draw(st.one_of(near(VALID_PEERS[index], ["username", "device",
                                                                  "ip", "extra"]),
                                        json_values))
    if draw(st.booleans()):
        entries.append(draw(st.sampled_from(entries)))  # a duplicate
    return entries


confused_peers = fuzzing.type_confused(VALID_PEERS[0], json_scalars, json_containers).map(
    lambda entry: [entry, VALID_PEERS[1]])
confused_config = st.one_of(
    fuzzing.type_confused(VALID_CONFIG, json_scalars, json_containers),
    fuzzing.type_confused(VALID_CONFIG["relays"][0], json_scalars, json_containers).map(
        lambda relay: {**VALID_CONFIG, "relays": [relay]}))


@st.composite
def near_relays(draw: st.DrawFn) -> object:
    relay = VALID_CONFIG["relays"][0]
    return draw(st.one_of(
        st.lists(near(relay, ["url", "secret", "username", "extra"]), max_size=3),
        near_values))


@st.composite
def near_config(draw: st.DrawFn) -> dict[str, Any]:
    config = draw(near(VALID_CONFIG, [*VALID_CONFIG, "unknown"]))
    if draw(st.booleans()):
        config["relays"] = draw(near_relays())
    return config


def _texts(documents: st.SearchStrategy[Any]) -> st.SearchStrategy[str | bytes]:
    """Each document as JSON text, sometimes as bytes, sometimes cut or extended."""
    return st.one_of(
        documents.map(json.dumps),
        documents.map(lambda d: json.dumps(d).encode()),
        st.tuples(documents.map(json.dumps), st.integers(0, 200)).map(lambda t: t[0][:t[1]]),
        st.tuples(documents.map(json.dumps), st.text(max_size=10)).map(lambda t: t[0] + t[1]),
    )


hostile_texts = st.one_of(
    st.binary(max_size=100),  # not UTF-8, or UTF-16 with a BOM, or nothing
    st.text(max_size=100),
    st.integers(1, 5000).map(lambda n: "[" * n + "]" * n),  # deep nesting
    st.integers(1, 5000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.integers(4000, 6000).map(lambda n: "[" + "1" * n + "]"),  # int over the digit limit
    st.just('{"overlay": "100.64.0.0/16", "overlay": 1}'),  # duplicate keys
    st.just("NaN"), st.just("[Infinity]"), st.just('"\\ud800"'),
)


# --- peers.json ---

def _peers_or_error(data: str | bytes) -> None:
    try:
        entries = parse_peers(data)
    except PeersError as exc:
        assert str(exc).startswith("peers.json")
        return
    devices = {e.device_id for e in entries}
    addresses = {e.ip for e in entries}
    assert len(devices) == len(addresses) == len(entries)  # no duplicates get through
    for entry in entries:
        assert isinstance(entry.ip, IPv4Address) and entry.ip in DEFAULT_OVERLAY
        assert entry.ip not in (DEFAULT_OVERLAY.network_address,
                                DEFAULT_OVERLAY.broadcast_address)
        assert entry.username.strip() == entry.username != ""
        assert entry.device.strip() == entry.device != ""


@pytest.mark.timeout(60)
@FUZZ
@given(data=st.one_of(_texts(st.one_of(near_peers(), confused_peers, json_values)),
                     hostile_texts))
def test_peers_json_parses_or_gives_a_peers_error(data: str | bytes) -> None:
    _peers_or_error(data)


# --- kbwg.json ---

def _config_or_error(data: str | bytes) -> None:
    try:
        config = parse_team_config(data)
    except TeamConfigError as exc:
        assert str(exc).startswith("kbwg.json")
        return
    assert isinstance(config.overlay, IPv4Network)
    if config.dynamic_range is not None:
        assert config.dynamic_range.subnet_of(config.overlay)
    for channel in (config.announce_channel, config.negotiation_channel):
        assert channel.isascii() and 1 <= len(channel) <= 20 and channel.strip() == channel
    for server in [*config.stun, *(relay.address for relay in config.relays)]:
        assert 1 <= server.port <= 65535 and server.host
        server.host.encode("idna")  # the resolver takes it: a UnicodeError escaped there
    for relay in config.relays:
        assert relay.secret and relay.transport == "udp"


@pytest.mark.timeout(60)
@FUZZ
@given(data=st.one_of(_texts(st.one_of(near_config(), confused_config, json_values)),
                     hostile_texts))
def test_kbwg_json_parses_or_gives_a_team_config_error(data: str | bytes) -> None:
    _config_or_error(data)


@pytest.mark.timeout(60)
@FUZZ
@given(peers=confused_peers, config=confused_config)
def test_team_files_with_one_field_wrong(peers: list[Any], config: dict[str, Any]) -> None:
    _peers_or_error(json.dumps(peers))
    _config_or_error(json.dumps(config))


# --- what the fuzzing found, pinned ---

@pytest.mark.parametrize("data", [
    "[" * 100_000, '{"a":' * 100_000,  # RecursionError from the JSON decoder
    "[" + "1" * 5000 + "]",  # ValueError: over Python's integer digit limit
])
def test_json_the_decoder_itself_refuses_is_a_clear_error(data: str) -> None:
    with pytest.raises(PeersError, match=r"peers\.json is not valid JSON"):
        parse_peers(data)
    with pytest.raises(TeamConfigError, match=r"kbwg\.json is not valid JSON"):
        parse_team_config(data)


@pytest.mark.parametrize("channel", ["announce\n", "kbwg\n"])
def test_a_channel_name_ending_in_a_newline_is_refused(channel: str) -> None:
    with pytest.raises(TeamConfigError, match="must be a channel name"):
        parse_team_config(json.dumps({"announce_channel": channel}))


@pytest.mark.parametrize("host", ["..", "a..b", "a" * 64 + ".example"])
def test_a_host_the_resolver_cannot_encode_is_refused(host: str) -> None:
    # Accepted before, then getaddrinfo raised UnicodeError, which the STUN gatherer's
    # OSError handler let through.
    with pytest.raises(TeamConfigError, match="not a valid host name"):
        parse_team_config(json.dumps({"stun": [f"{host}:3478"]}))


@pytest.mark.parametrize("port", ["\u00b2", "\u0665", "1" * 5000, "0", "65536"])
def test_a_port_that_is_not_ascii_digits_gets_the_port_message(port: str) -> None:
    # "²" passed isdigit() and then failed in int() with Python's own message.
    with pytest.raises(TeamConfigError, match="port must be a number from 1 to 65535"):
        parse_team_config(json.dumps({"stun": [f"stun.example.org:{port}"]}))
