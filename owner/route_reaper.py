"""Host routes outlive an owner killed outright (SIGKILL, OOM): this removes them.

The owner removes its host routes when it stops, but routes go through the uplinks,
not the WireGuard device, so nothing takes them away with a killed owner, and the next
owner's `add` of the same route then fails. `ReapedNetConfig` starts, at the first
host route only, a child `python -I -m kbwg.owner.route_reaper` in its own session
and tells it, one JSON line each, every route before adding it and after removing it.
When the owner's end of the pipe closes, however the owner ended, the reaper removes
the routes still listed (none after a clean stop) and exits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict
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

    async def add_route(self, route: HostRoute, replace: bool) -> None:
        self._tell("add", route)
        try:
            await super().add_route(route, replace)
        except Exception:
            # A failed replace leaves the route we had. A cancelled add (the owner is
            # stopping) may have reached the kernel: the reaper keeps it listed and
            # removes it, as nothing else would.
            if not replace:
                self._tell("del", route)
            raise

    async def remove_route(self, route: HostRoute) -> None:
        await super().remove_route(route)
        self._tell("del", route)

    def _tell(self, op: str, route: HostRoute) -> None:
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
            self._reaper.stdin.write(json.dumps({"op": op, **asdict(route)}).encode() + b"\n")
            self._reaper.stdin.flush()
        except OSError as exc:
            # The routes still work; only a killed owner would leave them behind.
            logger.warning("the route reaper is not running (%s): host routes would "
                           "outlive an owner killed outright", exc)


def parse_line(line: bytes) -> tuple[str, HostRoute] | None:
    """One line from the owner; None for anything else (logged)."""
    try:
        data: Any = json.loads(line)
        op = data["op"]
        route = HostRoute(str(data["destination"]), data.get("via"), str(data["ifname"]))
    except (ValueError, KeyError, TypeError) as exc:
        logger.warning("route reaper: ignoring a line it cannot read (%s)", exc)
        return None
    if op not in ("add", "del") or (route.via is not None and not isinstance(route.via, str)):
        logger.warning("route reaper: ignoring %r", line[:200])
        return None
    return op, route


def outstanding(lines: Iterable[bytes]) -> list[HostRoute]:
    """The routes added and not removed, in the order they were added."""
    routes: dict[str, HostRoute] = {}
    for line in lines:
        parsed = parse_line(line)
        if parsed is None:
            continue
        op, route = parsed
        if op == "add":
            routes[route.destination] = route
        elif routes.get(route.destination) == route:
            del routes[route.destination]
    return list(routes.values())


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


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="kbwg-route-reaper: %(message)s")
    # The owner's stderr may be gone by the time there is something to say.
    logging.raiseExceptions = False
    lines = iter(lambda: sys.stdin.buffer.readline(MAX_LINE), b"")
    routes = outstanding(lines)
    if routes:
        asyncio.run(reap(routes, NetlinkNetConfig().remove_route))


if __name__ == "__main__":
    main()
