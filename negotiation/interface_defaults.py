"""Which interfaces gathering leaves out unless kbwg.json says otherwise.

A module of its own so that kbwg.json's parser, which `join` runs while the data
path's modules are still loading, does not load the STUN client (and aioice) with it.
"""

from __future__ import annotations

# veth is not excluded: inside containers and network namespaces it is the uplink.
DEFAULT_INTERFACE_EXCLUDE: tuple[str, ...] = (
    "lo", "wg*", "kbwg*", "tun*", "tap*", "docker*", "br-*", "virbr*", "tailscale*",
    "zt*", "nebula*",
)
