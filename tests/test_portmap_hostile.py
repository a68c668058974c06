"""kbwg.portmap against a hostile device on the same LAN (a coffee-shop neighbour, or a
rogue gateway): PCP and NAT-PMP answers forged from the gateway's address, SSDP answers
with any location, and an IGD whose HTTP redirects, streams without end, declares
entities or points at other hosts.

None of it may give a mapping peers cannot use (an address they refuse would make them
refuse the whole ANNOUNCE or CANDIDATES line), make the agent talk HTTP to any host but
the gateway (this host's loopback services, other LAN hosts), grow memory or the log
without bound, or raise out of the mapper.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import pytest
from aiohttp import web
from portmap_fakes import _DESCRIPTION, PUBLIC_IP, FakeIgd, FakePcpGateway, start_pcp_gateway
from test_portmap import WG_PORT, gateway_at, mapper_for, upnp_mapper
from test_stun_retry import HOST, paths_with
from virtual_clock import REAL_CLOCK, VIRTUAL_CLOCK

from kbwg.agent.teamconfig import parse_team_config
from kbwg.negotiation.gathering import LocalCandidates
from kbwg.portmap.mapper import PortmapConfig, probe
from kbwg.portmap.mapping import Mapping

pytestmark = VIRTUAL_CLOCK

# -- what the gateway says it mapped -----------------------------------------------------

# Peers refuse an ANNOUNCE or CANDIDATES line naming the first kinds (and with it this
# device); their owners refuse an endpoint in the overlay (100.64.0.0/10 by default);
# a private or shared address is the gateway's own side of another NAT, which no peer
# outside reaches.
UNUSABLE = ["0.0.0.0", "0.1.2.3", "127.0.0.1", "169.254.1.1", "224.0.0.1", "240.0.0.1",
            "255.255.255.255", "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.9"]


@pytest.mark.parametrize("protocol", ["pcp", "nat-pmp"])
@pytest.mark.parametrize("external", UNUSABLE)
async def test_an_external_address_peers_cannot_use_gives_no_mapping(
        protocol: str, external: str) -> None:
    fake = await start_pcp_gateway("pcp", public_ip=external)
    mapper = mapper_for(fake, protocols=(protocol,))
    try:
        assert await mapper.ensure() is None
        error = mapper.last_errors[protocol]
        assert error is not None and f"external address {external}" in error, error
        # What the gateway made (if it did) is deleted, not left to run its lease.
        assert fake.mappings == {}
        assert len(fake.maps(protocol, deleting=True)) == 1
    finally:
        await mapper.close()
        fake.close()


@dataclass
class Forger(FakePcpGateway):
    """The gateway, and a neighbour forging datagrams from its address: `forged` goes to
    the client before each of the gateway's own answers."""

    forged: list[bytes] = field(default_factory=list)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        for datagram in self.forged:
            self.transport.sendto(datagram, addr)
        super().datagram_received(data, addr)


async def start_forger(mode: str = "pcp", **kwargs: object) -> Forger:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(
        lambda: Forger(mode, **kwargs), local_addr=("127.0.0.1", 0))  # type: ignore[arg-type]
    return proto


def pcp_refusal(nonce: bytes | None) -> bytes:
    """A PCP MAP answer with result 2 (NOT_AUTHORIZED); header only without a nonce."""
    header = struct.pack("!BBBBII12x", 2, 0x81, 0, 2, 0, 1000)
    if nonce is None:
        return header
    ext = ipaddress.IPv6Address(f"::ffff:{PUBLIC_IP}").packed
    return header + struct.pack("!12sB3xHH16s", nonce, 17, WG_PORT, WG_PORT, ext)


@pytest.mark.parametrize("forged", [pcp_refusal(b"not our nonc"), pcp_refusal(None)],
                         ids=["other-nonce", "no-nonce"])
async def test_a_forged_pcp_refusal_does_not_end_the_request(forged: bytes) -> None:
    """A refusal counts only with our request's nonce: anyone on the LAN could forge one
    otherwise, and a PCP gateway's mapping would be given up for NAT-PMP's (no nonce)."""
    fake = await start_forger(forged=[forged])
    mapper = mapper_for(fake, protocols=("pcp",))
    try:
        mapping = await mapper.ensure()
        assert mapping is not None and mapping.protocol == "pcp", mapper.last_errors
    finally:
        await mapper.close()
        fake.close()


@pytest.mark.parametrize("protocol", ["pcp", "nat-pmp"])
async def test_a_lease_too_short_to_keep_is_refused_not_renewed_in_a_loop(
        protocol: str) -> None:
    """A 1 s lease renewed at half its lifetime: two requests a second, and with an
    external port that changes at each, a regathering and a renegotiation with every
    peer each time."""
    fake = await start_pcp_gateway("pcp", granted=1)
    mapper = mapper_for(fake, protocols=(protocol,))
    try:
        assert await mapper.ensure() is None
        error = mapper.last_errors[protocol]
        assert error is not None and "lease of 1 s" in error, error
        await asyncio.sleep(30)
        assert len(fake.maps(protocol)) == 1, "renewed a refused mapping"
    finally:
        await mapper.close()
        fake.close()


@pytest.mark.parametrize("protocol", ["pcp", "nat-pmp"])
async def test_a_lease_longer_than_asked_is_renewed_as_the_one_asked(protocol: str) -> None:
    """Believing 136 years, the mapper would never renew: the gateway's real mapping
    (or none, if the answer was forged) would run out while the agent still offers it."""
    fake = await start_pcp_gateway("pcp", granted=0xFFFFFFFF)
    mapper = mapper_for(fake, protocols=(protocol,))  # asks for 120 s
    try:
        mapping = await mapper.ensure()
        assert mapping is not None and mapping.lifetime == 120
        await asyncio.sleep(60.1)
        assert len(fake.maps(protocol)) == 2, "no renewal at half the lease asked"
    finally:
        await mapper.close()
        fake.close()


async def test_a_flood_of_garbage_answers_logs_a_bounded_number_of_lines(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "kbwg.portmap")
    # 100 undecodable datagrams after each of the three requests, no real answer.
    fake = await start_forger("silent", forged=[b"\x07" * 60] * 100)
    mapper = mapper_for(fake, protocols=("pcp",))
    try:
        assert await mapper.ensure() is None
        assert "answered garbage" in (mapper.last_errors["pcp"] or "")
        ignored = [r for r in caplog.records if "ignoring a 60-byte answer" in r.getMessage()]
        assert 1 <= len(ignored) <= 25, len(ignored)
        assert any("left out" in r.getMessage() for r in caplog.records), caplog.text
    finally:
        await mapper.close()
        fake.close()


async def test_a_mapping_inside_the_overlay_is_no_candidate() -> None:
    """Peers' device owners refuse an endpoint inside the overlay: they would skip this
    device altogether."""
    config = parse_team_config('{"overlay": "198.51.100.0/24"}')
    paths = paths_with(config, LocalCandidates([HOST]))
    try:
        mapping = Mapping("pcp", "198.18.1.1", "198.18.1.10", WG_PORT, "198.51.100.7",
                          WG_PORT, 7200, 0.0)
        assert paths._mapped_candidates(mapping) == []
        good = replace(mapping, external_ip=PUBLIC_IP)
        assert [c.address for c in paths._mapped_candidates(good)] == [PUBLIC_IP]
    finally:
        await paths.close()


# -- SSDP and the IGD's HTTP (aiohttp: real time) -------------------------------------------

def ssdp_answer(location: str) -> bytes:
    return ("HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n"
            "ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
            "USN: uuid:00000000-0000-0000-0000-000000000001::upnp:rootdevice\r\n"
            f"EXT:\r\nSERVER: hostile\r\nLOCATION: {location}\r\n\r\n").encode()


@dataclass
class SsdpResponder(asyncio.DatagramProtocol):
    """Answers every M-SEARCH with `answers`, in order."""

    answers: list[bytes]
    transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if data.startswith(b"M-SEARCH") and self.transport is not None:
            for answer in self.answers:
                self.transport.sendto(answer, addr)


@REAL_CLOCK
async def test_ssdp_answers_pointing_elsewhere_or_malformed_are_ignored_quietly(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    igd = await FakeIgd().start()
    good = f"http://127.0.0.1:{igd.http_port}/rootDesc.xml"
    answers = [ssdp_answer("http://[zz/rootDesc.xml"),
               *(ssdp_answer(f"http://192.0.2.{i + 1}:80/rootDesc.xml") for i in range(80)),
               ssdp_answer(good)]
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: SsdpResponder(answers), local_addr=("127.0.0.1", 0))
    try:
        config = PortmapConfig(lifetime=120, protocols=("upnp",),
                               ssdp_port=transport.get_extra_info("sockname")[1],
                               upnp_timeout=1.0)
        mapper = upnp_mapper(igd)
        mapper.config = config
        mapping = await mapper.ensure()
        assert mapping is not None, mapper.last_errors
        await mapper.close()
        # A malformed URL is one more answer ignored, not an exception in the loop.
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
        ignored = [r for r in caplog.records if "ignoring an SSDP answer" in r.getMessage()]
        assert 1 <= len(ignored) <= 25, len(ignored)
    finally:
        transport.close()
        await igd.close()


@dataclass
class HostileIgd(FakeIgd):
    """FakeIgd, misbehaving as asked; `hits` records every HTTP request it serves."""

    description: str | None = None
    redirect: str | None = None  # the description answers 302 to it
    control_redirect: str | None = None  # every action answers 307 to it
    slow: bool = False  # the description dribbles a byte at a time
    hits: list[str] = field(default_factory=list)

    async def _description(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(f"GET {request.path}")
        if self.redirect:
            return web.Response(status=302, headers={"Location": self.redirect})
        if self.slow:
            response = web.StreamResponse(headers={"Content-Type": "text/xml"})
            await response.prepare(request)
            await response.write(_DESCRIPTION[:200].encode())
            for _ in range(200):  # 10 s at most, unless the client goes first
                await asyncio.sleep(0.05)
                await response.write(b" ")
            return response
        if self.description is not None:
            return web.Response(text=self.description, content_type="text/xml")
        return await super()._description(request)

    async def _scpd(self, request: web.Request) -> web.Response:
        self.hits.append(f"GET {request.path}")
        return await super()._scpd(request)

    async def _control(self, request: web.Request) -> web.Response:
        self.hits.append(f"POST {request.path}")
        if self.control_redirect:
            return web.Response(status=307, headers={"Location": self.control_redirect})
        return await super()._control(request)


async def map_with(igd: HostileIgd) -> tuple[Mapping | None, str, float]:
    """One UPnP mapping attempt: the mapping, the error, the seconds it took."""
    mapper = upnp_mapper(igd)
    loop = asyncio.get_running_loop()
    started = loop.time()
    mapping = await mapper.ensure()
    took = loop.time() - started
    error = mapper.last_errors.get("upnp") or ""
    await mapper.close()
    return mapping, error, took


async def with_victim(test: Callable[[HostileIgd], Awaitable[None]]) -> None:
    """`test` given another host's service (127.0.0.2): a working IGD, so that anything
    the client let through there would succeed, and show."""
    victim = await HostileIgd(host="127.0.0.2").start()
    try:
        await test(victim)
        assert victim.hits == [], f"fetched from another host: {victim.hits}"
    finally:
        await victim.close()


@REAL_CLOCK
async def test_a_description_redirect_to_another_host_is_not_followed() -> None:
    async def test(victim: HostileIgd) -> None:
        igd = await HostileIgd(
            redirect=f"http://127.0.0.2:{victim.http_port}/rootDesc.xml").start()
        try:
            mapping, error, _ = await map_with(igd)
            assert mapping is None and "redirect" in error, error
            report = await probe(gateway_at(), PortmapConfig(
                protocols=("upnp",), ssdp_port=igd.ssdp_port, upnp_timeout=1.0))
            assert report.answers["upnp"] == "error", report
        finally:
            await igd.close()
    await with_victim(test)


@REAL_CLOCK
async def test_a_control_redirect_to_another_host_is_not_followed() -> None:
    async def test(victim: HostileIgd) -> None:
        igd = await HostileIgd(
            control_redirect=f"http://127.0.0.2:{victim.http_port}/ctl/IPConn").start()
        try:
            mapping, error, _ = await map_with(igd)
            assert mapping is None and "redirect" in error, error
            assert victim.actions == []
        finally:
            await igd.close()
    await with_victim(test)


@REAL_CLOCK
async def test_service_urls_on_another_host_are_never_fetched() -> None:
    async def test(victim: HostileIgd) -> None:
        elsewhere = f"http://127.0.0.2:{victim.http_port}"
        description = (_DESCRIPTION
                       .replace("<SCPDURL>/", f"<SCPDURL>{elsewhere}/")
                       .replace("<controlURL>/", f"<controlURL>{elsewhere}/"))
        igd = await HostileIgd(description=description).start()
        try:
            mapping, error, _ = await map_with(igd)
            assert mapping is None and error, error
        finally:
            await igd.close()
    await with_victim(test)


@REAL_CLOCK
async def test_a_huge_description_is_refused_unread() -> None:
    padded = _DESCRIPTION.replace("</root>", "<!--" + "x" * (4 << 20) + "--></root>")
    igd = await HostileIgd(description=padded).start()
    try:
        mapping, error, _ = await map_with(igd)
        assert mapping is None and "larger than" in error, error
    finally:
        await igd.close()


@REAL_CLOCK
async def test_a_slow_description_ends_within_the_timeout() -> None:
    igd = await HostileIgd(slow=True).start()
    try:
        mapping, error, took = await map_with(igd)  # upnp_timeout 1 s
        assert mapping is None and error
        assert took < 5, took
    finally:
        await igd.close()


@REAL_CLOCK
async def test_entity_expansion_is_refused() -> None:
    laughs = ('<?xml version="1.0"?><!DOCTYPE root [<!ENTITY a "aaaaaaaaaa">'
              + "".join(f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">'
                        for i in range(8))
              + ']><root xmlns="urn:schemas-upnp-org:device-1-0"><device>'
              "<deviceType>&i;</deviceType></device></root>")
    igd = await HostileIgd(description=laughs).start()
    try:
        mapping, error, took = await map_with(igd)
        assert mapping is None and error and took < 5
    finally:
        await igd.close()


@REAL_CLOCK
async def test_a_description_with_a_flood_of_services_is_refused_with_one_line(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    service = ("<service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:1"
               "</serviceType><serviceId>urn:upnp-org:serviceId:x</serviceId>"
               "<SCPDURL>http://192.0.2.1/s.xml</SCPDURL>"
               "<controlURL>http://192.0.2.1/c</controlURL></service>")
    description = ('<?xml version="1.0"?><root xmlns="urn:schemas-upnp-org:device-1-0">'
                   "<device><deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1"
                   "</deviceType><serviceList>" + service * 300
                   + "</serviceList></device></root>")
    igd = await HostileIgd(description=description).start()
    try:
        mapping, error, _ = await map_with(igd)
        assert mapping is None and "services" in error, error
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) <= 3, [r.getMessage()[:100] for r in warnings]
    finally:
        await igd.close()


@REAL_CLOCK
@pytest.mark.parametrize("external", ["0.0.0.0", "192.168.1.1"])
async def test_upnp_external_address_peers_cannot_use_gives_no_mapping(
        external: str) -> None:
    igd = await HostileIgd(public_ip=external).start()
    try:
        mapping, error, _ = await map_with(igd)
        assert mapping is None and f"external address {external}" in error, error
        assert igd.mappings == {}, "the refused mapping was left on the gateway"
    finally:
        await igd.close()
