"""The addresses the relay host answers for itself, which no allocation may relay to.

Read from procfs, which shows the reading process's network namespace:
/proc/net/fib_trie lists every local IPv4 route (each interface address, and whole
prefixes routed `local`, as AnyIP setups do), /proc/net/if_inet6 every IPv6 address.
The relay may use only the standard library and aioice (tests/test_layers.py), so no
netlink library; procfs needs none. Addresses change (DHCP, a VPN coming up), so the
set is re-read when a peer is checked, at most every `min_age` seconds.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kbwg.relay.limits import Network

log = logging.getLogger(__name__)

FIB_TRIE = Path("/proc/net/fib_trie")
IF_INET6 = Path("/proc/net/if_inet6")


def parse_fib_trie(text: str) -> set[Network]:
    """The prefixes of `LOCAL` routes: a leaf line `|-- 192.0.2.2` followed by its
    prefixes, `/32 host LOCAL`."""
    networks: set[Network] = set()
    leaf: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|--"):
            leaf = stripped[3:].strip()
        elif stripped.startswith("/") and leaf is not None:
            fields = stripped.split()
            if len(fields) >= 3 and fields[2] == "LOCAL":
                try:
                    networks.add(ipaddress.ip_network(f"{leaf}{fields[0]}", strict=False))
                except ValueError:
                    continue
        elif stripped.startswith("+--") or stripped.endswith(":"):
            leaf = None
    return networks


def parse_if_inet6(text: str) -> set[Network]:
    """Each line starts with the address as 32 hex digits."""
    networks: set[Network] = set()
    for line in text.splitlines():
        fields = line.split()
        if not fields or len(fields[0]) != 32:
            continue
        try:
            networks.add(ipaddress.IPv6Network(int(fields[0], 16)))
        except ValueError:
            continue
    return networks


def read_host_networks() -> tuple[Network, ...]:
    """Everything the host answers for; a file that cannot be read adds nothing."""
    networks: set[Network] = set()
    for path, parse in ((FIB_TRIE, parse_fib_trie), (IF_INET6, parse_if_inet6)):
        try:
            networks |= parse(path.read_text(encoding="ascii", errors="replace"))
        except OSError as exc:
            log.debug("cannot read %s: %s", path, exc)
    return tuple(sorted(networks, key=lambda n: (n.version, n)))


@dataclass
class HostAddresses:
    """The host's networks, re-read when older than `min_age` seconds."""

    reader: Callable[[], tuple[Network, ...]] = read_host_networks
    min_age: float = 1.0
    networks: tuple[Network, ...] = ()
    read_at: float | None = None
    reads: int = field(default=0, compare=False)

    def current(self, now: float) -> tuple[Network, ...]:
        if self.read_at is None or now - self.read_at >= self.min_age:
            networks = self.reader()
            if networks != self.networks and self.read_at is not None:
                log.info("relay host addresses changed: %s",
                         ", ".join(str(n) for n in networks) or "none")
            self.networks = networks
            self.read_at = now
            self.reads += 1
        return self.networks
