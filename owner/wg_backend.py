"""WireGuard backends: the interface the device owner drives, and the automatic choice.

The kernel module (through pyroute2) is used when present, else wireguard-go. Both only
ever run inside the privileged device owner.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Protocol

from kbwg.owner.tools import SYSTEM_DIRS, find_tool

logger = logging.getLogger(__name__)

WIREGUARD_GO = "wireguard-go"


class BackendError(Exception):
    """A backend could not be chosen, started or configured."""


@dataclass(frozen=True)
class PeerConfig:
    public_key: bytes
    endpoint: tuple[str, int] | None = None
    # Replaces the peer's whole list when applied.
    allowed_ips: list[str] = field(default_factory=list)
    keepalive: int = 0


@dataclass(frozen=True)
class PeerStats:
    public_key: bytes
    endpoint: str | None
    # Unix seconds, 0.0 if there was never a handshake.
    last_handshake: float
    rx_bytes: int
    tx_bytes: int
    allowed_ips: list[str] = field(default_factory=list)
    keepalive: int = 0


@dataclass(frozen=True)
class DeviceStats:
    """The device as one read saw it: its listen port and its peers."""

    listen_port: int
    peers: list[PeerStats] = field(default_factory=list)


class WireGuardBackend(Protocol):
    name: str
    # Whether the device stays when the owner is killed outright: the kernel's does
    # (the route reaper then removes it), wireguard-go's goes with its process.
    outlives_owner: bool

    async def create(self, ifname: str, private_key: bytes, listen_port: int) -> int:
        """Create the device with this key; returns the actual listen port."""
        ...

    async def set_peer(self, peer: PeerConfig) -> None: ...

    async def remove_peer(self, public_key: bytes) -> None: ...

    async def peers(self) -> list[PeerStats]: ...

    async def listen_port(self) -> int: ...

    async def stats(self) -> DeviceStats:
        """Listen port and peers from a single read of the device: `stats` is asked
        often, and each read is an exchange with wireguard-go or the kernel."""
        ...

    async def close(self) -> None:
        """Remove the device; safe to call more than once and after a failed create."""
        ...


# Generic netlink constants from linux/genetlink.h and linux/netlink.h.
_NETLINK_GENERIC = 16
_GENL_ID_CTRL = 0x10
_CTRL_CMD_GETFAMILY = 3
_CTRL_ATTR_FAMILY_NAME = 2
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2


def kernel_wireguard_available() -> bool:
    """Whether the `wireguard` generic netlink family resolves.

    Asking the kernel for the family by name also autoloads the module when it is
    installed but not loaded. This is a raw blocking socket on purpose: pyroute2's
    synchronous API refuses to run inside an event loop, and this must be callable from
    synchronous code too.
    """
    if os.path.isdir("/sys/module/wireguard"):
        return True
    name = b"wireguard\0"
    attr_len = 4 + len(name)
    attr = struct.pack("=HH", attr_len, _CTRL_ATTR_FAMILY_NAME) + name
    attr += b"\0" * (-attr_len % 4)
    payload = struct.pack("=BBH", _CTRL_CMD_GETFAMILY, 1, 0) + attr
    message = struct.pack("=IHHII", 16 + len(payload), _GENL_ID_CTRL, _NLM_F_REQUEST, 1, 0)
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_GENERIC) as sock:
            sock.settimeout(2.0)
            sock.bind((0, 0))
            sock.send(message + payload)
            reply = sock.recv(65536)
    except OSError as exc:
        logger.debug("generic netlink probe for wireguard failed: %s", exc)
        return False
    if len(reply) < 16:
        return False
    _length, msg_type, _flags, _seq, _pid = struct.unpack_from("=IHHII", reply)
    if msg_type == _NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", reply, 16)
        if code != 0:
            logger.debug("wireguard genl family not found: %s", errno.errorcode.get(-code, code))
        return code == 0
    return msg_type == _GENL_ID_CTRL


def wireguard_go_path() -> str | None:
    return find_tool(WIREGUARD_GO)


def select_backend(name: str) -> WireGuardBackend:
    """Return an unstarted backend: "kernel", "userspace" (wireguard-go) or "auto"."""
    if name not in ("auto", "kernel", "userspace"):
        raise BackendError(f"unknown WireGuard backend {name!r}")
    if name in ("auto", "kernel"):
        if kernel_wireguard_available():
            from kbwg.owner.wg_kernel import KernelBackend

            return KernelBackend()
        if name == "kernel":
            raise BackendError("the wireguard kernel module is not available on this host")
    binary = wireguard_go_path()
    if binary is None:
        prefix = "no kernel WireGuard and " if name == "auto" else ""
        raise BackendError(
            f"{prefix}wireguard-go was not found in {', '.join(SYSTEM_DIRS)} (root-owned "
            "only): install the `wireguard-go` package (Debian/Ubuntu: apt-get install "
            "wireguard-go)"
        )
    from kbwg.owner.wg_userspace import UserspaceBackend

    return UserspaceBackend(binary)
