import base64

import pytest

from kbwg.agent.announce import (
    AnnounceBook,
    AnnounceError,
    format_announce,
    parse_announce,
)
from kbwg.core.identity import DeviceId

KEY = base64.b64encode(bytes(range(32))).decode()
ALICE = DeviceId("alice", "laptop")


def test_format_is_the_prototypes() -> None:
    assert format_announce("198.18.1.2", 51820, KEY) == f"ANNOUNCE 198.18.1.2:51820 {KEY}"


def test_round_trip() -> None:
    ann = parse_announce(format_announce("198.18.1.2", 51820, KEY), ALICE, 7, 100.0)
    assert (ann.endpoint, ann.public_key, ann.sender, ann.msg_id) == (
        "198.18.1.2:51820", KEY, ALICE, 7
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("hello", "not an ANNOUNCE line"),
        (f"ANNOUNCE 198.18.1.2 {KEY}", "not an ANNOUNCE line"),
        (f"ANNOUNCE host.example:51820 {KEY}", "not IPv4"),
        (f"ANNOUNCE 300.1.1.1:51820 {KEY}", "not IPv4"),
        (f"ANNOUNCE 198.18.1.2:0 {KEY}", "out of range"),
        (f"ANNOUNCE 198.18.1.2:70000 {KEY}", "out of range"),
        ("ANNOUNCE 198.18.1.2:51820 !!!notbase64", "not base64"),
        ("ANNOUNCE 198.18.1.2:51820 " + base64.b64encode(b"short").decode(), "5 bytes"),
        (f"ANNOUNCE 198.18.1.2:51820 {KEY} trailing", "not an ANNOUNCE line"),
    ],
)
def test_malformed_lines_are_rejected(body: str, message: str) -> None:
    with pytest.raises(AnnounceError, match=message):
        parse_announce(body, ALICE, 1, 0.0)


def test_book_keeps_newest_and_rejects_replays() -> None:
    book = AnnounceBook()
    first = parse_announce(format_announce("198.18.1.2", 1, KEY), ALICE, 5, 0.0)
    newer = parse_announce(format_announce("198.18.1.3", 1, KEY), ALICE, 9, 0.0)
    assert book.offer(first)
    assert book.offer(newer)
    assert not book.offer(first), "an older message must not replace a newer one"
    assert not book.offer(newer), "a replayed message must not be applied twice"
    assert book.latest[ALICE].endpoint_ip == "198.18.1.3"
