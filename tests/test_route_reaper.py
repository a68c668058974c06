"""The route reaper's bookkeeping: which routes a dead owner left, and removing them."""

from __future__ import annotations

import json

from kbwg.owner.netconfig import HostRoute
from kbwg.owner.route_reaper import outstanding, parse_line, reap

A = HostRoute("198.51.100.7/32", "198.18.5.1", "eth1")
B = HostRoute("203.0.113.9/32", None, "eth0")


def line(op: str, route: HostRoute) -> bytes:
    return json.dumps({"op": op, "destination": route.destination, "via": route.via,
                       "ifname": route.ifname}).encode() + b"\n"


def test_routes_added_and_not_removed_are_outstanding() -> None:
    assert outstanding([line("add", A), line("add", B), line("del", A)]) == [B]
    assert outstanding([line("add", A), line("del", A)]) == []


def test_a_replaced_route_is_the_one_outstanding() -> None:
    moved = HostRoute(A.destination, "198.18.6.1", "eth2")
    assert outstanding([line("add", A), line("add", moved)]) == [moved]
    # Removing the old one (already replaced) leaves the new one.
    assert outstanding([line("add", A), line("add", moved), line("del", A)]) == [moved]


def test_garbage_lines_are_skipped() -> None:
    junk = [b"", b"not json\n", b"[]\n", b'{"op": "add"}\n', b'{"op": "zap", '
            b'"destination": "x", "ifname": "y"}\n', line("add", A)[:-10] + b"\n",
            b'{"op": "add", "destination": "x", "ifname": "y", "via": 5}\n']
    assert outstanding([*junk, line("add", B)]) == [B]
    assert all(parse_line(j) is None for j in junk)


async def test_reap_removes_each_and_survives_failures() -> None:
    removed: list[HostRoute] = []

    async def remove(route: HostRoute) -> None:
        if route is A:
            raise OSError("No such process")
        removed.append(route)

    assert await reap([A, B], remove) == 1
    assert removed == [B]
