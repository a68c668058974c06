"""One address of one network interface: what the device owner reads from netlink, the
agent receives from it, and gathering makes host candidates of."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class InterfaceAddress:
    interface: str
    index: int
    address: str
    prefixlen: int
    up: bool
    # The interface holds a default route of the address's family (main table).
    default_route: bool

    def to_json(self) -> dict[str, Any]:
        return {"interface": self.interface, "index": self.index, "address": self.address,
                "prefixlen": self.prefixlen, "up": self.up,
                "default_route": self.default_route}  # fmt: skip
