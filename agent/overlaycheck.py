"""The team's overlay against this host, before `join` creates anything.

The overlay is the prefix put on the WireGuard interface, so the kernel routes the whole
of it into the tunnel: a team writer who sets kbwg.json `overlay` to 0.0.0.0/1, or to
a range the host's own networks use, would pull the host's traffic to whichever peer
claims those addresses. The agent applies the device owner's rule (kbwg.owner.policy)
itself, so a bad overlay stops `join` with an error naming the key, before the device
owner is asked to create the interface.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from pathlib import Path

from kbwg.owner.netconfig import host_route_destinations
from kbwg.owner.policy import IPNetwork, PolicyError, check_overlay, load_policy

RoutesReader = Callable[[str], Awaitable[list[IPNetwork]]]


class OverlayError(ValueError):
    """The overlay may not be used on this host; the message says who can fix what."""


async def host_routes(own_ifname: str) -> list[IPNetwork]:
    """Destinations of the host's IPv4 routes, as the device owner reads them: every
    table, apart from default routes and routes through `own_ifname` (our WireGuard
    interface, left over or not)."""
    return list(await host_route_destinations(own_ifname))


async def check_team_overlay(overlay: ipaddress.IPv4Network, team_file: str,
                             own_ifname: str, policy_path: Path,
                             routes: RoutesReader = host_routes) -> None:
    """Raise OverlayError unless `overlay` passes the device owner's rule here."""
    try:
        policy = load_policy(policy_path)
    except PolicyError as exc:
        raise OverlayError(f"cannot check kbwg.json 'overlay': {exc}") from exc
    problem = check_overlay(overlay, policy, await routes(own_ifname))
    if problem is None:
        return
    raise OverlayError(
        f"kbwg.json 'overlay' {overlay}: {problem}; ask a team admin to set 'overlay' in "
        f"{team_file} to a range inside {policy.overlay} that no network of this host "
        f"uses (or this machine's administrator to allow it in {policy_path})"
    )
