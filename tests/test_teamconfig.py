import json
import logging
import sys
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from kbwg.agent.claims import Policy
from kbwg.agent.keybase import KeybaseClient, KeybaseError, KeybaseFileNotFound
from kbwg.agent.teamconfig import (
    HostPort,
    RelayConfig,
    TeamConfig,
    TeamConfigError,
    load_team_config,
    parse_host_port,
    parse_team_config,
)
from kbwg.negotiation.candidates import DEFAULT_INTERFACE_EXCLUDE


def _doc(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def test_full_file() -> None:
    config = parse_team_config(_doc(
        stun=["192.0.2.10:3478", "stun.example.org", "[2001:db8::1]:3479"],
        relays=[
            {"url": "turn:192.0.2.20:3478", "secret": "s3cret"},
            {"url": "turn:relay.example.org:5349?transport=udp", "secret": "x",
             "username": "kbwg"},
        ],
        overlay="100.100.0.0/16",
        announce_channel="announce2",
        negotiation_channel="kbwg-dev",
        interface_exclude=["wg*", "eth9"],
        dynamic_range="100.100.128.0/17",
        policy="servers",
    ))
    assert config.stun == [HostPort("192.0.2.10", 3478), HostPort("stun.example.org", 3478),
                           HostPort("2001:db8::1", 3479)]
    assert str(config.stun[2]) == "[2001:db8::1]:3479"
    assert config.relays == [
        RelayConfig("turn:192.0.2.20:3478", "192.0.2.20", 3478, "s3cret"),
        RelayConfig("turn:relay.example.org:5349?transport=udp", "relay.example.org", 5349,
                    "x", "udp", "kbwg"),
    ]
    assert config.overlay == IPv4Network("100.100.0.0/16")
    assert (config.announce_channel, config.negotiation_channel) == ("announce2", "kbwg-dev")
    assert config.interface_exclude == ["wg*", "eth9"]
    assert config.dynamic_range == IPv4Network("100.100.128.0/17")
    assert config.policy is Policy.SERVERS


def test_empty_object_is_the_default_with_no_servers() -> None:
    config = parse_team_config(b"{}")
    assert config == TeamConfig()
    assert config.stun == [] and config.relays == []
    assert config.overlay == IPv4Network("100.64.0.0/10")
    assert (config.announce_channel, config.negotiation_channel) == ("announce", "kbwg")
    assert config.interface_exclude == list(DEFAULT_INTERFACE_EXCLUDE)
    assert config.dynamic_range is None and config.policy is Policy.MESH


@pytest.mark.parametrize(("fields", "expected"), [
    ({"dynamic_range": "100.64.128.0/17"}, IPv4Network("100.64.128.0/17")),
    ({"dynamic_range": "100.127.255.252/30"}, IPv4Network("100.127.255.252/30")),
    # The whole overlay is allowed: with an empty peers.json every device is dynamic.
    ({"overlay": "10.9.0.0/16", "dynamic_range": "10.9.0.0/16"}, IPv4Network("10.9.0.0/16")),
])
def test_dynamic_range_inside_the_overlay(fields: dict[str, object],
                                          expected: IPv4Network) -> None:
    assert parse_team_config(_doc(**fields)).dynamic_range == expected


def test_policy_mesh_is_explicit_too() -> None:
    assert parse_team_config(_doc(policy="mesh")).policy is Policy.MESH


def test_unknown_keys_are_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        config = parse_team_config(_doc(
            stun=["127.0.0.1:3478"], future_policy=1,
            relays=[{"url": "turn:127.0.0.1:3478", "secret": "s", "realm": "x"}]))
    assert config.stun == [HostPort("127.0.0.1", 3478)]
    assert "future_policy" in caplog.text and "realm" in caplog.text


@pytest.mark.parametrize(("data", "message"), [
    (b"{not json", "not valid JSON"),
    # Python keeps the last of a repeated key, other readers the first.
    (b'{"stun": ["127.0.0.1:3478"], "stun": ["192.0.2.1:3478"]}',
     "kbwg.json: key 'stun' appears twice in one object"),
    (b'{"relays": [{"url": "turn:a:1", "secret": "s", "secret": "t"}]}',
     "key 'secret' appears twice"),
    (b"[]", "must be a JSON object"),
    (_doc(stun="127.0.0.1:3478"), "'stun' must be a list"),
    (_doc(stun=[3478]), "'stun' item 1 must be a non-empty string"),
    (_doc(stun=["127.0.0.1:3478", "127.0.0.1:0"]), "'stun' item 2: .*port"),
    (_doc(stun=["127.0.0.1:http"]), "'stun' item 1: .*port"),
    (_doc(stun=["::1"]), "'stun' item 1: .*IPv6"),
    (_doc(stun=[":3478"]), "'stun' item 1: .*host"),
    (_doc(relays={"url": "turn:a:1"}), "'relays' must be a list"),
    (_doc(relays=["turn:a:1"]), "'relays' item 1 must be an object"),
    (_doc(relays=[{"secret": "s"}]), "'relays' item 1: 'url'"),
    # Another scheme or transport skips the relay instead (tests/test_turn_stream.py).
    (_doc(relays=[{"url": "turns://a:1", "secret": "s"}]), "'relays' item 1: 'url' .*//"),
    (_doc(relays=[{"url": "turns:a:1", "secret": "s", "ca_file": 5}]),
     "'relays' item 1: 'ca_file'"),
    (_doc(relays=[{"url": "turn:a:1?foo=1", "secret": "s"}]), "unknown URL parameter"),
    (_doc(relays=[{"url": "turn:a:99999", "secret": "s"}]), "'relays' item 1: 'url' .*port"),
    (_doc(relays=[{"url": "turn:a:1"}]), "'relays' item 1: 'secret'"),
    (_doc(relays=[{"url": "turn:a:1", "secret": ""}]), "'relays' item 1: 'secret'"),
    (_doc(relays=[{"url": "turn:a:1", "secret": "s", "username": 5}]),
     "'relays' item 1: 'username'"),
    (_doc(overlay="100.64.0.1/10"), "'overlay'"),
    (_doc(overlay="fd00::/64"), "'overlay'"),
    (_doc(overlay="100.64.0.0/31"), "'overlay'"),
    (_doc(overlay=10), "'overlay'"),
    # Wider than /10 would route that share of the address space into the tunnel.
    (_doc(overlay="0.0.0.0/1"), r"'overlay' 0.0.0.0/1 is wider than /10"),
    (_doc(overlay="0.0.0.0/0"), r"'overlay' 0.0.0.0/0 is wider than /10"),
    (_doc(overlay="100.0.0.0/9"), r"'overlay' 100.0.0.0/9 is wider than /10"),
    (_doc(overlay="0.0.0.0/10"), r"'overlay' 0.0.0.0/10 overlaps 0.0.0.0/8"),
    (_doc(overlay="127.0.0.0/16"), r"'overlay' 127.0.0.0/16 overlaps 127.0.0.0/8"),
    (_doc(overlay="169.254.0.0/24"), r"'overlay' 169.254.0.0/24 overlaps 169.254.0.0/16"),
    (_doc(overlay="224.0.0.0/16"), r"'overlay' 224.0.0.0/16 overlaps 224.0.0.0/4"),
    (_doc(overlay="255.255.255.0/24"), r"'overlay' 255.255.255.0/24 overlaps 240.0.0.0/4"),
    (_doc(announce_channel=""), "'announce_channel'"),
    (_doc(negotiation_channel="has space"), "'negotiation_channel'"),
    (_doc(negotiation_channel="x" * 21), "'negotiation_channel'"),
    (_doc(interface_exclude="wg*"), "'interface_exclude' must be a list"),
    (_doc(interface_exclude=["wg*", ""]), "'interface_exclude' item 2"),
    (_doc(dynamic_range="100.64.128.1/17"), "'dynamic_range' must be an IPv4 network"),
    (_doc(dynamic_range="fd00::/64"), "'dynamic_range' must be an IPv4 network"),
    (_doc(dynamic_range="100.64.128.0/31"), "'dynamic_range' .*at least 4 addresses"),
    (_doc(dynamic_range="100.64.128.4/32"), "'dynamic_range' .*at least 4 addresses"),
    (_doc(dynamic_range=["100.64.128.0/17"]), "'dynamic_range' must be an IPv4 network"),
    (_doc(dynamic_range="10.0.0.0/24"), "'dynamic_range' 10.0.0.0/24 is not inside the overlay"),
    (_doc(dynamic_range="100.0.0.0/8"), "'dynamic_range' .*not inside the overlay 100.64.0.0/10"),
    (_doc(overlay="100.100.0.0/16", dynamic_range="100.64.128.0/17"),
     "'dynamic_range' .*not inside the overlay 100.100.0.0/16"),
    (_doc(policy="star"), "'policy' must be 'mesh' or 'servers', got 'star'"),
    (_doc(policy="MESH"), "'policy'"),
    (_doc(policy=None), "'policy'"),
    (_doc(policy=["mesh"]), "'policy'"),
])
def test_bad_files_name_the_key(data: bytes, message: str) -> None:
    with pytest.raises(TeamConfigError, match=message):
        parse_team_config(data)


def test_parse_host_port_for_the_command_line() -> None:
    assert parse_host_port("127.0.0.1:3478") == HostPort("127.0.0.1", 3478)
    assert parse_host_port("[::1]:5") == HostPort("::1", 5)
    with pytest.raises(ValueError, match="no port"):
        parse_host_port("127.0.0.1", default_port=None)


class FakeKeybase:
    def __init__(self, files: dict[str, bytes], error: Exception | None = None) -> None:
        self.files = files
        self.error = error
        self.paths: list[str] = []

    async def fs_read(self, path: str) -> bytes:
        self.paths.append(path)
        if self.error:
            raise self.error
        if path not in self.files:
            raise KeybaseFileNotFound(f"{path} does not exist")
        return self.files[path]


async def test_load_reads_the_team_folder() -> None:
    keybase = FakeKeybase({"/keybase/team/t1/kbwg.json": _doc(stun=["127.0.0.1:9"])})
    config = await load_team_config(keybase, "t1")
    assert config.stun == [HostPort("127.0.0.1", 9)]
    assert keybase.paths == ["/keybase/team/t1/kbwg.json"]


async def test_absent_file_means_no_servers() -> None:
    config = await load_team_config(FakeKeybase({}), "t1")
    assert config == TeamConfig()
    assert config.stun == [] and config.relays == []


async def test_team_folder_is_the_canonical_lowercase_name() -> None:
    keybase = FakeKeybase({"/keybase/team/t1/kbwg.json": _doc(stun=["127.0.0.1:9"])})
    config = await load_team_config(keybase, "T1")
    assert config.stun == [HostPort("127.0.0.1", 9)]
    assert keybase.paths == ["/keybase/team/t1/kbwg.json"]


async def test_kbfs_wording_doesnt_exist_means_absent(tmp_path: Path) -> None:
    """KBFS says "kbwg.json doesn't exist" (libkbfs NoSuchNameError): that is missing."""
    home = tmp_path / "kb"
    (home / "kbfs" / "team" / "t1").mkdir(parents=True)
    client = KeybaseClient(str(Path(sys.executable).parent / "kbwg-keybase-standin"),
                           {"KBWG_STANDIN_HOME": str(home), "KBWG_STANDIN_USER": "alice",
                            "KBWG_STANDIN_DEVICE": "laptop"})
    try:
        assert await load_team_config(client, "t1") == TeamConfig()
    finally:
        await client.close()


async def test_other_keybase_errors_and_bad_files_propagate() -> None:
    with pytest.raises(KeybaseError, match="boom"):
        await load_team_config(FakeKeybase({}, KeybaseError("boom")), "t1")
    bad = FakeKeybase({"/keybase/team/t1/kbwg.json": b"{\"stun\": 1}"})
    with pytest.raises(TeamConfigError, match="'stun'"):
        await load_team_config(bad, "t1")
