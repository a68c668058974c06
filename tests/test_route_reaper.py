"""The route reaper's bookkeeping: which routes and devices a dead owner left, and
removing them."""

from __future__ import annotations

import json

from kbwg.owner.netconfig import HostRoute
from kbwg.owner.route_reaper import ReapedLink, outstanding, parse_line, reap, reap_links

A = HostRoute("198.51.100.7/32", "198.18.5.1", "eth1")
B = HostRoute("203.0.113.9/32", None, "eth0")


def line(op: str, route: HostRoute) -> bytes:
    return json.dumps({"op": op, "destination": route.destination, "via": route.via,
                       "ifname": route.ifname}).encode() + b"\n"


def link_line(op: str, ifname: str, index: object) -> bytes:
    return json.dumps({"op": op, "ifname": ifname, "index": index}).encode() + b"\n"


def routes(lines: list[bytes]) -> list[HostRoute]:
    found, links = outstanding(lines)
    assert links == []
    return found


def test_routes_added_and_not_removed_are_outstanding() -> None:
    assert routes([line("add", A), line("add", B), line("del", A)]) == [B]
    assert routes([line("add", A), line("del", A)]) == []


def test_a_replaced_route_is_the_one_outstanding() -> None:
    moved = HostRoute(A.destination, "198.18.6.1", "eth2")
    assert routes([line("add", A), line("add", moved)]) == [moved]
    # Removing the old one (already replaced) leaves the new one.
    assert routes([line("add", A), line("add", moved), line("del", A)]) == [moved]


def test_garbage_lines_are_skipped() -> None:
    junk = [b"", b"not json\n", b"[]\n", b'{"op": "add"}\n', b'{"op": "zap", '
            b'"destination": "x", "ifname": "y"}\n', line("add", A)[:-10] + b"\n",
            b'{"op": "add", "destination": "x", "ifname": "y", "via": 5}\n',
            link_line("link", "kbwg0", "7"), link_line("link", "kbwg0", True),
            b'{"op": "link", "ifname": "kbwg0"}\n']
    assert routes([*junk, line("add", B)]) == [B]
    assert all(parse_line(j) is None for j in junk)


async def test_reap_removes_each_and_survives_failures() -> None:
    removed: list[HostRoute] = []

    async def remove(route: HostRoute) -> None:
        if route is A:
            raise OSError("No such process")
        removed.append(route)

    assert await reap([A, B], remove) == 1
    assert removed == [B]


def test_a_device_made_and_not_removed_is_outstanding() -> None:
    """The kernel's WireGuard device outlives a killed owner (wireguard-go's does not)."""
    kbwg0 = ReapedLink("kbwg0", 7)
    assert outstanding([link_line("link", "kbwg0", 7), line("add", A)]) == ([A], [kbwg0])
    assert outstanding([link_line("link", "kbwg0", 7), link_line("unlink", "kbwg0", 7)]) == (
        [], [])
    # Removed and made again: the new device (another index) is the one outstanding.
    remade = [link_line("link", "kbwg0", 7), link_line("unlink", "kbwg0", 7),
              link_line("link", "kbwg0", 9), link_line("unlink", "kbwg0", 7)]
    assert outstanding(remade) == ([], [ReapedLink("kbwg0", 9)])


async def test_reap_links_removes_each_still_there_and_survives_failures() -> None:
    asked: list[tuple[str, int]] = []

    async def remove(ifname: str, index: int) -> bool:
        asked.append((ifname, index))
        if ifname == "gone":
            raise OSError("No such device")
        return ifname != "renamed"  # False: not there under that name and index

    links = [ReapedLink("gone", 3), ReapedLink("renamed", 4), ReapedLink("kbwg0", 7)]
    assert await reap_links(links, remove) == 1
    assert asked == [("gone", 3), ("renamed", 4), ("kbwg0", 7)]
