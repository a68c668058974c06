"""Kernel WireGuard backend through pyroute2 (rtnetlink for the link, genl for config).

Deliberately thin: the translations between our dataclasses and pyroute2's structures
are pure functions, unit-tested without the kernel module (absent on the test machine).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterable
from typing import Any

from kbwg.core.addresses import format_endpoint
from kbwg.owner.wg_backend import BackendError, DeviceStats, PeerConfig, PeerStats

logger = logging.getLogger(__name__)


def peer_to_pyroute2(peer: PeerConfig) -> dict[str, Any]:
    """PeerConfig → the `peer` argument of pyroute2's `WireGuard.set`."""
    out: dict[str, Any] = {
        "public_key": base64.b64encode(peer.public_key).decode("ascii"),
        "persistent_keepalive": peer.keepalive,
        # Our set_peer replaces the list, as the UAPI backend does.
        "replace_allowed_ips": True,
        "allowed_ips": list(peer.allowed_ips),
    }
    if peer.endpoint is not None:
        out["endpoint_addr"], out["endpoint_port"] = peer.endpoint
    return out


def remove_peer_to_pyroute2(public_key: bytes) -> dict[str, Any]:
    return {"public_key": base64.b64encode(public_key).decode("ascii"), "remove": True}


def _key_bytes(value: Any) -> bytes:
    # pyroute2 hands keys back base64-encoded (bytes); accept str or raw too.
    if isinstance(value, dict):
        value = value.get("value", value.get("key"))
    if isinstance(value, str):
        value = value.encode("ascii")
    if isinstance(value, bytes) and len(value) == 32:
        return value
    if isinstance(value, bytes):
        return base64.b64decode(value)
    raise BackendError(f"unexpected key value from pyroute2: {value!r}")


def _peer_stats(peer: Any) -> PeerStats:
    endpoint = peer.get_attr("WGPEER_A_ENDPOINT")
    handshake = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME") or {}
    sec = int(handshake.get("tv_sec", 0))
    nsec = int(handshake.get("tv_nsec", 0))
    allowed = [
        str(item["addr"]) for item in peer.get_attr("WGPEER_A_ALLOWEDIPS") or [] if "addr" in item
    ]
    has_endpoint = endpoint and endpoint.get("port")
    return PeerStats(
        public_key=_key_bytes(peer.get_attr("WGPEER_A_PUBLIC_KEY")),
        endpoint=format_endpoint((endpoint["addr"], endpoint["port"])) if has_endpoint else None,
        last_handshake=sec + nsec / 1e9 if sec else 0.0,
        rx_bytes=int(peer.get_attr("WGPEER_A_RX_BYTES") or 0),
        tx_bytes=int(peer.get_attr("WGPEER_A_TX_BYTES") or 0),
        allowed_ips=allowed,
        keepalive=int(peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0),
    )


def info_to_stats(messages: Iterable[Any]) -> tuple[int, list[PeerStats]]:
    """pyroute2 `WireGuard.info` messages → (listen port, peers).

    A large device comes back as several messages (the dump is split), each carrying a
    share of the peers.
    """
    listen_port = 0
    peers: list[PeerStats] = []
    for message in messages:
        port = message.get_attr("WGDEVICE_A_LISTEN_PORT")
        if port:
            listen_port = int(port)
        peers.extend(_peer_stats(peer) for peer in message.get_attr("WGDEVICE_A_PEERS") or [])
    return listen_port, peers


class KernelBackend:
    name = "kernel"
    outlives_owner = True

    def __init__(self) -> None:
        self._ifname: str | None = None

    def _require(self) -> str:
        if self._ifname is None:
            raise BackendError("no kernel WireGuard device")
        return self._ifname

    async def _wg_set(self, **kwargs: Any) -> None:
        from pyroute2.netlink.generic.wireguard import AsyncWireGuard

        async with AsyncWireGuard() as wg:
            await wg.setup_endpoint()
            await wg.set(self._require(), **kwargs)

    async def _info(self) -> tuple[int, list[PeerStats]]:
        from pyroute2.netlink.generic.wireguard import AsyncWireGuard

        async with AsyncWireGuard() as wg:
            await wg.setup_endpoint()
            return info_to_stats([m async for m in await wg.info(self._require())])

    async def create(self, ifname: str, private_key: bytes, listen_port: int) -> int:
        from pyroute2.iproute.linux import AsyncIPRoute

        if self._ifname is not None:
            raise BackendError("this backend already owns a device")
        async with AsyncIPRoute() as ipr:
            await ipr.link("add", ifname=ifname, kind="wireguard")
        self._ifname = ifname
        try:
            await self._wg_set(
                private_key=base64.b64encode(private_key).decode("ascii"),
                listen_port=listen_port,
            )
            return await self.listen_port()
        except BaseException:
            await self.close()
            raise

    async def set_peer(self, peer: PeerConfig) -> None:
        await self._wg_set(peer=peer_to_pyroute2(peer))

    async def remove_peer(self, public_key: bytes) -> None:
        await self._wg_set(peer=remove_peer_to_pyroute2(public_key))

    async def peers(self) -> list[PeerStats]:
        return (await self._info())[1]

    async def listen_port(self) -> int:
        return (await self._info())[0]

    async def stats(self) -> DeviceStats:
        listen_port, peers = await self._info()
        return DeviceStats(listen_port, peers)

    async def close(self) -> None:
        from pyroute2.iproute.linux import AsyncIPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        ifname, self._ifname = self._ifname, None
        if ifname is None:
            return
        try:
            async with AsyncIPRoute() as ipr:
                await ipr.link("del", ifname=ifname)
        except NetlinkError as exc:
            logger.info("kernel WireGuard link %s was already gone: %s", ifname, exc)
        except Exception:
            logger.exception("deleting kernel WireGuard link %s failed", ifname)
