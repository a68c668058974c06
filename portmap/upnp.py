"""UPnP IGD client (async-upnp-client): find the gateway's Internet Gateway Device and
add, renew or delete a UDP port mapping on its WANIPConnection (or WANPPPConnection).

The SSDP search is unicast to the gateway only (never multicast to the whole LAN), and a
description URL pointing anywhere but the gateway is refused: a host on the LAN cannot
make us talk HTTP to it. Nor can whatever answers at the gateway's address (a rogue
gateway): every HTTP request goes to that address alone, redirects are refused, bodies
are capped and a description naming a flood of services is refused (`GatewayRequester`).
XML is parsed by the library with defusedxml (no entities, no external references).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from typing import Any
from xml.etree.ElementTree import ParseError

import aiohttp
import defusedxml.ElementTree as DET
import yarl
from async_upnp_client.client import UpnpRequester, UpnpService
from async_upnp_client.client_factory import UpnpFactory
from async_upnp_client.const import HttpRequest, HttpResponse
from async_upnp_client.search import SsdpSearchListener

from kbwg.core.loglimit import LimitedLog
from kbwg.core.printable import printable
from kbwg.portmap.mapping import Mapping, PortmapError

log = logging.getLogger(__name__)

SSDP_PORT = 1900  # mapper.SSDP_PORT says it too, without importing this module
SEARCH_TARGET = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
_WAN_SERVICES = ("WANIPConnection", "WANPPPConnection")
DESCRIPTION = "kbwg-agent WireGuard"
# An IGD's description and service descriptions are a few kB, twenty at most.
MAX_BODY_BYTES = 256 * 1024
# An IGD is three nested devices with a handful of services; each service is one more
# request (and, pointing elsewhere, one more warning from the library).
MAX_ELEMENTS = 32
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def _host(url: str) -> str | None:
    """The host aiohttp would connect to (it parses with yarl), or None."""
    try:
        return yarl.URL(url).host
    except (ValueError, TypeError):
        return None


class GatewayRequester(UpnpRequester):
    """The IGD's HTTP, on `host` (the gateway) alone. The description names the URLs the
    library fetches next and any answer may redirect: another host (this machine's
    loopback services, another LAN host) or scheme is refused, redirects are not
    followed, a body over MAX_BODY_BYTES is refused unread, a request ends within
    `timeout` however slowly its answer comes."""

    def __init__(self, host: str, timeout: float) -> None:
        self.host = host
        self.timeout = timeout

    async def async_http_request(self, http_request: HttpRequest) -> HttpResponse:
        url = http_request.url
        if not url.lower().startswith("http://") or _host(url) != self.host:
            raise PortmapError("error", f"UPnP: refusing to fetch {url[:200]!r}: not on "
                               f"the gateway {self.host}")
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.request(
                http_request.method, url, headers=dict(http_request.headers or {}),
                data=http_request.body, allow_redirects=False) as response:
            if response.status in _REDIRECTS:
                where = response.headers.get("Location", "")[:200]
                raise PortmapError("error", f"UPnP: {printable(url)} answered a redirect "
                                   f"({response.status}) to {where!r}: not followed")
            too_large = PortmapError("error", f"UPnP: {printable(url)} answered a body larger "
                                     f"than {MAX_BODY_BYTES} bytes (no IGD's is): refused")
            if (response.content_length or 0) > MAX_BODY_BYTES:
                raise too_large
            body = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise too_large
            try:
                text = body.decode(response.charset or "utf-8", errors="replace")
            except LookupError:  # an unknown charset
                text = body.decode("utf-8", errors="replace")
            return HttpResponse(response.status, response.headers, text)


def _check_description(response: HttpResponse) -> HttpResponse:
    """The description before the library reads it: a few devices and services."""
    try:
        root = DET.fromstring(response.body or "")
    except (ParseError, ValueError):
        return response  # the library says what is wrong with it
    count = sum(1 for el in root.iter() if isinstance(el.tag, str)
                and el.tag.rpartition("}")[2] in ("device", "service"))
    if count > MAX_ELEMENTS:
        raise PortmapError("error", f"UPnP: the description lists {count} devices and "
                           f"services; an IGD has a few (at most {MAX_ELEMENTS} taken)")
    return response


async def discover(gateway: str, local_ip: str | None, timeout: float,
                   ssdp_port: int = SSDP_PORT) -> str:
    """The IGD description URL the gateway answers an SSDP search with."""
    loop = asyncio.get_running_loop()
    found: asyncio.Future[str] = loop.create_future()
    # Anyone on the LAN can send answers (with the gateway's address), as many as it likes.
    ignored = LimitedLog(log, clock=loop.time)

    def on_response(headers: Any) -> None:
        location = str(headers.get("location") or "")
        if _host(location) != gateway:
            ignored.log(logging.INFO, "UPnP: ignoring an SSDP answer with location %r: "
                        "not the gateway %s", location[:200], gateway)
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
    host = _host(location)
    if host is None:
        raise PortmapError("error", f"UPnP: {location[:200]!r} is not a URL")
    factory = UpnpFactory(GatewayRequester(host, timeout), non_strict=True,
                          on_post_receive_device_spec=_check_description)
    device = await factory.async_create_device(location)
    for service in device.all_services:
        if any(f":service:{name}:" in service.service_type for name in _WAN_SERVICES):
            return service
    raise PortmapError("error", f"UPnP: the device at {printable(location)} has no WAN "
                       "connection service (not an Internet Gateway Device)")


async def _call(service: UpnpService, action: str, timeout: float,
                **kwargs: Any) -> Any:
    return await asyncio.wait_for(service.action(action).async_call(**kwargs), timeout)


def _wrap(what: str, exc: Exception) -> PortmapError:
    if isinstance(exc, PortmapError):
        return exc
    kind = "timeout" if isinstance(exc, TimeoutError) else "error"
    # The library's messages quote the gateway's answers (fault strings, XML): diag and
    # the log show them, so no terminal controls, and cut short.
    text = printable(str(exc) or type(exc).__name__, 300)
    return PortmapError(kind, f"UPnP: {what}: {text}")


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
