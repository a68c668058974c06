"""UPnP IGD client (async-upnp-client): find the gateway's Internet Gateway Device and
add, renew or delete a UDP port mapping on its WANIPConnection (or WANPPPConnection).

The SSDP search is unicast to the gateway only (never multicast to the whole LAN), and a
description URL pointing anywhere but the gateway is refused: a host on the LAN cannot
make us talk HTTP to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from typing import Any
from urllib.parse import urlsplit

from async_upnp_client.aiohttp import AiohttpRequester
from async_upnp_client.client import UpnpService
from async_upnp_client.client_factory import UpnpFactory
from async_upnp_client.search import SsdpSearchListener

from kbwg.portmap.mapping import Mapping, PortmapError

log = logging.getLogger(__name__)

SSDP_PORT = 1900  # mapper.SSDP_PORT says it too, without importing this module
SEARCH_TARGET = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
_WAN_SERVICES = ("WANIPConnection", "WANPPPConnection")
DESCRIPTION = "kbwg-agent WireGuard"


async def discover(gateway: str, local_ip: str | None, timeout: float,
                   ssdp_port: int = SSDP_PORT) -> str:
    """The IGD description URL the gateway answers an SSDP search with."""
    loop = asyncio.get_running_loop()
    found: asyncio.Future[str] = loop.create_future()

    def on_response(headers: Any) -> None:
        location = str(headers.get("location") or headers.get("LOCATION") or "")
        host = urlsplit(location).hostname
        if host != gateway:
            log.info("UPnP: ignoring an SSDP answer with location %r: not the gateway %s",
                     location[:200], gateway)
            return
        if not found.done():
            found.set_result(location)

    listener = SsdpSearchListener(
        callback=on_response, loop=loop, source=(local_ip or "0.0.0.0", 0),
        target=(gateway, ssdp_port), timeout=max(1, round(timeout)),
        search_target=SEARCH_TARGET)
    try:
        await listener.async_start()
        listener.async_search()
        # One retransmission: SSDP is UDP.
        retry = loop.call_later(timeout / 3, listener.async_search)
        try:
            return await asyncio.wait_for(found, timeout)
        except TimeoutError:
            raise PortmapError("timeout", f"UPnP: no SSDP answer from {gateway}:{ssdp_port} "
                               f"within {timeout:.1f}s") from None
        finally:
            retry.cancel()
    except OSError as exc:
        raise PortmapError("refused", f"UPnP: SSDP to {gateway}:{ssdp_port} failed: "
                           f"{exc.strerror or exc}") from exc
    finally:
        listener.async_stop()


async def wan_service(location: str, timeout: float) -> UpnpService:
    """The WAN connection service of the IGD described at `location`."""
    factory = UpnpFactory(AiohttpRequester(timeout=max(1, round(timeout))),
                          non_strict=True)
    device = await factory.async_create_device(location)
    for service in device.all_services:
        if any(f":service:{name}:" in service.service_type for name in _WAN_SERVICES):
            return service
    raise PortmapError("error", f"UPnP: the device at {location} has no WAN connection "
                       "service (not an Internet Gateway Device)")


async def _call(service: UpnpService, action: str, timeout: float,
                **kwargs: Any) -> Any:
    return await asyncio.wait_for(service.action(action).async_call(**kwargs), timeout)


def _wrap(what: str, exc: Exception) -> PortmapError:
    if isinstance(exc, PortmapError):
        return exc
    kind = "timeout" if isinstance(exc, TimeoutError) else "error"
    text = str(exc) or type(exc).__name__
    return PortmapError(kind, f"UPnP: {what}: {text[:300]}")


async def map_udp(gateway: str, local_ip: str, internal_port: int, external_port: int,
                  lifetime: int, timeout: float = 2.0, ssdp_port: int = SSDP_PORT,
                  service: UpnpService | None = None) -> Mapping:
    """Map (or renew, given the `service` of the mapping) UDP `internal_port`."""
    try:
        if service is None:
            location = await discover(gateway, local_ip, timeout, ssdp_port)
            service = await asyncio.wait_for(wan_service(location, timeout), timeout)
        await _call(service, "AddPortMapping", timeout,
                    NewRemoteHost="", NewExternalPort=external_port, NewProtocol="UDP",
                    NewInternalPort=internal_port, NewInternalClient=local_ip,
                    NewEnabled=True, NewPortMappingDescription=DESCRIPTION,
                    NewLeaseDuration=lifetime)
        answer = await _call(service, "GetExternalIPAddress", timeout)
        external_ip = str(ipaddress.IPv4Address(answer.get("NewExternalIPAddress")))
    except Exception as exc:  # a gateway's HTTP/XML is untrusted input: never crash on it
        raise _wrap("mapping failed", exc) from exc
    return Mapping("upnp", gateway, local_ip, internal_port, external_ip, external_port,
                   lifetime, asyncio.get_running_loop().time(), control=service)


async def unmap_udp(mapping: Mapping, timeout: float = 2.0) -> None:
    service = mapping.control
    if not isinstance(service, UpnpService):
        return
    try:
        await _call(service, "DeletePortMapping", timeout, NewRemoteHost="",
                    NewExternalPort=mapping.external_port, NewProtocol="UDP")
    except Exception as exc:  # untrusted input, as above
        raise _wrap("delete failed", exc) from exc


async def close(mapping: Mapping) -> None:
    """Release the HTTP session of a mapping's service, if the requester holds one."""
    service = mapping.control
    requester = getattr(service, "requester", None)
    closer = getattr(requester, "async_close", None)
    if closer is not None:
        with contextlib.suppress(Exception):
            await closer()
