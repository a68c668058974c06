"""The default IPv4 gateway a mapping is asked of, and the local address that reaches it.

PortMapper's `find_gateway` finds it: `join` asks the device owner, `diag` (which runs
without an owner) reads netlink with the owner's reader, kbwg.owner.interfaces."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gateway:
    address: str
    local_ip: str  # our address on the gateway's network: mappings name it
    interface: str | None = None
