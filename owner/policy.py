"""What the device owner may be asked to do on this host: the local policy, read from a
root-owned file, and the pure rules both the owner (enforcing) and the agent (checking
team input before anything is applied) judge requests by.

The policy file (`/etc/kbwg/owner.json`, optional) is written by the machine's
administrator, never by the team: `{"overlay": "100.64.0.0/10"}`. It is read only when
owned by root and not writable by group or others, because the agent's user must not be
able to widen what the root helper accepts.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

DEFAULT_POLICY_PATH = Path("/etc/kbwg/owner.json")
DEFAULT_ALLOWED_OVERLAY = IPv4Network("100.64.0.0/10")
# Never wider than this, whatever the local file says: a wider overlay would pull a
# large share of the host's traffic into the tunnel.
WIDEST_PREFIX = 10
MIN_LISTEN_PORT = 1024
_IFNAME_RE = re.compile(r"^kbwg[0-9]{1,5}$")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class PolicyError(ValueError):
    """The policy file cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class OwnerPolicy:
    """The locally allowed overlay: every overlay the team asks for must lie inside it."""

    overlay: IPv4Network = DEFAULT_ALLOWED_OVERLAY


def parse_policy(text: str | bytes, source: str = str(DEFAULT_POLICY_PATH)) -> OwnerPolicy:
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{source} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise PolicyError(f"{source} must hold a JSON object")
    unknown = sorted(set(doc) - {"overlay"})
    if unknown:
        raise PolicyError(f"{source} has unknown keys: {', '.join(unknown)}")
    overlay = DEFAULT_ALLOWED_OVERLAY
    if "overlay" in doc:
        value = doc["overlay"]
        if not isinstance(value, str):
            raise PolicyError(f"{source} 'overlay' must be a string like '100.64.0.0/10'")
        try:
            overlay = IPv4Network(value, strict=True)
        except ValueError as exc:
            raise PolicyError(f"{source} 'overlay' {value!r} is not an IPv4 network") from exc
        if overlay.prefixlen < WIDEST_PREFIX:
            raise PolicyError(
                f"{source} 'overlay' {overlay} is wider than /{WIDEST_PREFIX}; use a smaller range"
            )
    return OwnerPolicy(overlay=overlay)


def load_policy(path: Path = DEFAULT_POLICY_PATH) -> OwnerPolicy:
    """The policy in `path`, or the default when there is no such file. A file that any
    user but root could have written is refused, not ignored."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return OwnerPolicy()
    except OSError as exc:
        raise PolicyError(f"cannot read {path}: {exc}") from exc
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise PolicyError(f"{path} is not a regular file")
        if info.st_uid != 0 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise PolicyError(
                f"{path} must be owned by root and writable by root only "
                f"(chown root:root {path}; chmod 644 {path})"
            )
        return parse_policy(handle.read(1 << 16), str(path))


def check_interface_name(name: str) -> str | None:
    """None when `name` is one the owner may create, else why not."""
    if not _IFNAME_RE.match(name):
        return f"interface name {name!r} is not kbwg<N> (for example kbwg0)"
    return None


def check_overlay(network: IPv4Network, policy: OwnerPolicy,
                  host_routes: Iterable[IPNetwork] = ()) -> str | None:
    """None when `network` may be the overlay (the prefix put on the WireGuard
    interface), else why not. `host_routes` are the destinations of the routes the host
    already has, apart from default routes and routes through our own interface."""
    if network.prefixlen < WIDEST_PREFIX:
        return f"{network} is wider than /{WIDEST_PREFIX}"
    if not network.subnet_of(policy.overlay):
        return f"{network} is not inside the locally allowed overlay {policy.overlay}"
    for route in host_routes:
        if route.version == 4 and route.prefixlen > 0 and network.overlaps(route):
            return f"{network} overlaps the host's existing route to {route}"
    return None


def check_allowed_ip(network: IPNetwork, overlay: IPv4Network,
                     own: IPv4Address | None = None) -> str | None:
    """None when `network` may be a peer's allowed IP: one overlay address, not ours."""
    if network.version != 4 or network.prefixlen != 32:
        return f"allowed IP {network} is not a single IPv4 address (/32)"
    address = network.network_address
    if address not in overlay:
        return f"allowed IP {network} is outside the overlay {overlay}"
    if address in (overlay.network_address, overlay.broadcast_address):
        return f"allowed IP {network} is the overlay's network or broadcast address"
    if own is not None and address == own:
        return f"allowed IP {network} is this device's own overlay address"
    return None


def check_listen_port(port: int) -> str | None:
    """0 lets the backend pick (always above 1023); otherwise 1024 and above."""
    if port != 0 and port < MIN_LISTEN_PORT:
        return f"listen port {port} is below {MIN_LISTEN_PORT}"
    return None
