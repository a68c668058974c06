"""The host's interface addresses as gathering sees them, and where they come from.

Gathering takes them from an `InterfaceSource`, a callable the caller passes in: the
agent's asks the device owner (which reads netlink, so the agent never loads pyroute2);
`diag`, which runs without an owner, reads them with the owner's own reader
(kbwg.owner.interfaces). A module of its own, light to import: the agent's owner calls
build these records before the data path's modules (aioice among them) have loaded.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from kbwg.core.interface_address import InterfaceAddress

__all__ = ["InterfaceAddress", "InterfaceSource"]

# What gathering needs of the host: its addresses, when asked.
InterfaceSource = Callable[[], Awaitable[Sequence[InterfaceAddress]]]
