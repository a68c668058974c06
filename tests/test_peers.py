import json
import re

import pytest

from kbwg.agent.peers_file import PeersError, parse_peers
from kbwg.core.identity import DeviceId


def doc(*entries: dict[str, str]) -> str:
    return json.dumps(list(entries))


def test_valid_file_parses_in_order() -> None:
    entries = parse_peers(doc(
        {"username": "alice", "device": "laptop", "ip": "100.64.0.1"},
        {"username": "bob", "device": "desk", "ip": "100.64.0.2"},
    ))
    assert [str(e.device_id) for e in entries] == ["alice/laptop", "bob/desk"]
    assert str(entries[1].ip) == "100.64.0.2"
    assert entries[0].device_id == DeviceId("alice", "laptop")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        # Python keeps the last of a repeated key, other readers the first.
        ('[{"username": "a", "device": "d", "ip": "100.64.0.1", "ip": "100.64.0.9"}]',
         "peers.json: key 'ip' appears twice in one object"),
        ('{"username": "a"}', "must be a JSON list"),
        ('["x"]', "entry 1: must be an object"),
        (doc({"username": "a", "device": "d"}), "entry 1 (a/d): 'ip' must be"),
        (doc({"username": "", "device": "d", "ip": "100.64.0.1"}), "'username' must be"),
        (doc({"username": "a", "device": "d", "ip": "banana"}), "'banana' is not an IP"),
        (doc({"username": "a", "device": "d", "ip": "10.0.0.1"}), "outside the overlay range"),
        (doc({"username": "a", "device": "d", "ip": "::1"}), "outside the overlay range"),
        (doc({"username": "a", "device": "d", "ip": "100.64.0.0"}), "not a usable host"),
    ],
)
def test_bad_input_names_the_problem(text: str, message: str) -> None:
    with pytest.raises(PeersError, match=re.escape(message)):
        parse_peers(text)


def test_duplicate_device_names_both_entries() -> None:
    expected = "entry 2 (a/d): duplicate device a/d, already listed as entry 1"
    with pytest.raises(PeersError, match=re.escape(expected)):
        parse_peers(doc(
            {"username": "a", "device": "d", "ip": "100.64.0.1"},
            {"username": "a", "device": "d", "ip": "100.64.0.2"},
        ))


def test_duplicate_ip_names_both_entries() -> None:
    expected = "entry 3 (c/d): duplicate address 100.64.0.1, already used by entry 1"
    with pytest.raises(PeersError, match=re.escape(expected)):
        parse_peers(doc(
            {"username": "a", "device": "d", "ip": "100.64.0.1"},
            {"username": "b", "device": "d", "ip": "100.64.0.2"},
            {"username": "c", "device": "d", "ip": "100.64.0.1"},
        ))


def test_invalid_utf8_is_a_peers_error() -> None:
    with pytest.raises(PeersError, match="not valid JSON"):
        parse_peers(b"\xff\xfe[")
