"""Host routes and a kernel WireGuard device outlive an owner killed outright (SIGKILL,
OOM): this removes them.

The owner removes its host routes when it stops, but routes go through the uplinks,
not the WireGuard device, so nothing takes them away with a killed owner, and the next
owner's `add` of the same route then fails. The kernel's WireGuard device, unlike
wireguard-go's, is no process that dies with the owner: left behind, it would keep its
overlay route and make the next owner's `create` fail. `ReapedNetConfig` starts, at
the first host route or kernel device only, a child `python -I -m
kbwg.owner.route_reaper` in its own session and tells it, one JSON line each, every
route before adding it and after removing it, and the device (by name and index) once
made and once removed. When the owner's end of the pipe closes, however the owner
ended, the reaper removes what is still listed (nothing after a clean stop) and exits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from kbwg.owner.netconfig import HostRoute, NetlinkNetConfig
from kbwg.owner.tools import clean_env

logger = logging.getLogger(__name__)

MAX_LINE = 4096
RemoveFn = Callable[[HostRoute], Awaitable[None]]


class ReapedNetConfig(NetlinkNetConfig):
    """NetlinkNetConfig whose host routes a reaper process removes if the owner dies."""

    def __init__(self) -> None:
        # Not an asyncio subprocess: its transport kills a child still running when it is
        # collected, and the reaper must outlive the owner. A line is far below a pipe's
        # buffer, so the write never blocks.
        self._reaper: subprocess.Popen[bytes] | None = None
        self._links: dict[str, int] = {}  # reaped links' indexes, by name

    async def add_route(self, route: HostRoute, replace: bool) -> None:
        self._tell({"op": "add", **asdict(route)})
        try:
            await super().add_route(route, replace)
        except Exception:
            # A failed replace leaves the route we had. A cancelled add (the owner is
            # stopping) may have reached the kernel: the reaper keeps it listed and
            # removes it, as nothing else would.
            if not replace:
                self._tell({"op": "del", **asdict(route)})
            raise

    async def remove_route(self, route: HostRoute) -> None:
        await super().remove_route(route)
        self._tell({"op": "del", **asdict(route)})

    async def reap_link(self, ifname: str) -> None:
        index = self._links[ifname] = await self.link_index(ifname)
        self._tell({"op": "link", "ifname": ifname, "index": index})

    def link_removed(self, ifname: str) -> None:
        index = self._links.pop(ifname, None)
        if index is not None:
            self._tell({"op": "unlink", "ifname": ifname, "index": index})

    def _tell(self, message: dict[str, Any]) -> None:
        try:
            if self._reaper is None:
                self._reaper = subprocess.Popen(
                    [sys.executable, "-I", "-m", "kbwg.owner.route_reaper"],
                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=clean_env(),
                    cwd="/",
                    # Not in the owner's session: a signal to the owner's group (a
                    # terminal's Ctrl-C) must not stop the reaper before the owner.
                    start_new_session=True)
            assert self._reaper.stdin is not None
            self._reaper.stdin.write(json.dumps(message).encode() + b"\n")
            self._reaper.stdin.flush()
        except OSError as exc:
            # The routes and the device still work; only a killed owner would leave them.
            logger.warning("the route reaper is not running (%s): host routes and a kernel "
                           "WireGuard device would outlive an owner killed outright", exc)


@dataclass(frozen=True)
class ReapedLink:
    """A network device the owner made, known by its index too: a device made later
    under the same name is another one's and is left alone."""

    ifname: str
    index: int


def parse_line(line: bytes) -> tuple[str, HostRoute | ReapedLink] | None:
    """One line from the owner; None for anything else (logged)."""
    try:
        data: Any = json.loads(line)
        op = data["op"]
        item: HostRoute | ReapedLink
        if op in ("link", "unlink"):
            if not isinstance(data["index"], int) or isinstance(data["index"], bool):
                raise TypeError(f"index {data['index']!r} is not an integer")
            item = ReapedLink(str(data["ifname"]), data["index"])
        else:
            item = HostRoute(str(data["destination"]), data.get("via"), str(data["ifname"]))
    except (ValueError, KeyError, TypeError) as exc:
        logger.warning("route reaper: ignoring a line it cannot read (%s)", exc)
        return None
    if op not in ("add", "del", "link", "unlink") or (
            isinstance(item, HostRoute) and item.via is not None
            and not isinstance(item.via, str)):
        logger.warning("route reaper: ignoring %r", line[:200])
        return None
    return op, item


def outstanding(lines: Iterable[bytes]) -> tuple[list[HostRoute], list[ReapedLink]]:
    """The routes and links added and not removed, in the order they were added."""
    routes: dict[str, HostRoute] = {}
    links: dict[str, ReapedLink] = {}
    for line in lines:
        parsed = parse_line(line)
        if parsed is None:
            continue
        op, item = parsed
        if isinstance(item, ReapedLink):
            if op == "link":
                links[item.ifname] = item
            elif links.get(item.ifname) == item:
                del links[item.ifname]
        elif op == "add":
            routes[item.destination] = item
        elif routes.get(item.destination) == item:
            del routes[item.destination]
    return list(routes.values()), list(links.values())


async def reap(routes: Iterable[HostRoute], remove: RemoveFn) -> int:
    """Remove each route; how many went."""
    removed = 0
    for route in routes:
        try:
            await remove(route)
            removed += 1
            logger.warning("the device owner ended without removing host route %s via %s "
                           "dev %s: removed it", route.destination, route.via, route.ifname)
        except Exception as exc:  # gone already, or its interface is
            logger.info("host route %s not removed: %s", route.destination, exc)
    return removed


async def reap_links(links: Iterable[ReapedLink],
                     remove: Callable[[str, int], Awaitable[bool]]) -> int:
    """Remove each link still there under its name and index; how many went."""
    removed = 0
    for link in links:
        try:
            if await remove(link.ifname, link.index):
                removed += 1
                logger.warning("the device owner ended without removing device %s: "
                               "removed it", link.ifname)
        except Exception as exc:
            logger.info("device %s not removed: %s", link.ifname, exc)
    return removed


async def _reap_all(routes: list[HostRoute], links: list[ReapedLink]) -> None:
    net = NetlinkNetConfig()
    await reap(routes, net.remove_route)
    await reap_links(links, net.remove_link)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="kbwg-route-reaper: %(message)s")
    # The owner's stderr may be gone by the time there is something to say.
    logging.raiseExceptions = False
    lines = iter(lambda: sys.stdin.buffer.readline(MAX_LINE), b"")
    routes, links = outstanding(lines)
    if routes or links:
        asyncio.run(_reap_all(routes, links))


if __name__ == "__main__":
    main()
