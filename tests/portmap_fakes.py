"""Fake gateways on loopback for the port mapping tests: one answering PCP and NAT-PMP
(or only NAT-PMP, garbage, refusals, or nothing) on a UDP port, and a UPnP IGD (SSDP
responder plus an HTTP server with its description and SOAP control).

Messages are packed here by hand from the RFCs' layouts, not with kbwg.portmap's own
encoders, so the tests check the client against the format rather than against itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import struct
from dataclasses import dataclass, field
from typing import Any, cast

from aiohttp import web

PUBLIC_IP = "203.0.113.7"


@dataclass
class Request:
    protocol: str  # "pcp" or "nat-pmp"
    opcode: int
    lifetime: int = 0
    internal_port: int = 0
    external_port: int = 0
    nonce: bytes = b""


@dataclass
class FakePcpGateway(asyncio.DatagramProtocol):
    """`mode`: "pcp" (PCP and NAT-PMP), "natpmp" (NAT-PMP only: PCP gets "unsupported
    version"), "garbage", "refuse" (result 2 to everything), "silent"."""

    mode: str = "pcp"
    public_ip: str = PUBLIC_IP
    max_lifetime: int = 7200
    port_shift: int = 0  # the external port granted = suggested + port_shift
    granted: int | None = None  # the lease answered to a MAP, whatever was asked
    requests: list[Request] = field(default_factory=list)
    mappings: dict[int, int] = field(default_factory=dict)  # internal -> external
    datagrams: int = 0  # every datagram received, answered or not
    transport: asyncio.DatagramTransport | None = None

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def maps(self, protocol: str, *, deleting: bool = False) -> list[Request]:
        return [r for r in self.requests if r.protocol == protocol and r.opcode == 1
                and (r.lifetime == 0) == deleting]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.datagrams += 1
        if self.mode == "silent" or len(data) < 2:
            return
        if self.mode == "garbage":
            # Right length and version, wrong everything else; then a runt.
            self.transport.sendto(bytes([data[0]]) + b"\xff" * 59, addr)
            self.transport.sendto(b"\x02", addr)
            return
        if data[0] == 2:
            self._pcp(data, addr)
        elif data[0] == 0:
            self._natpmp(data, addr)

    def _pcp(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        opcode = data[1] & 0x7F
        lifetime = struct.unpack_from("!I", data, 4)[0]
        if self.mode == "natpmp":
            # RFC 6886 3.5 / RFC 6887 9: a NAT-PMP server's "unsupported version".
            self.transport.sendto(struct.pack("!BBHI", 0, 128 + opcode, 1, 1000), addr)
            return
        result = 2 if self.mode == "refuse" else 0
        header = struct.pack("!BBBBII12x", 2, 0x80 | opcode, 0, result, lifetime, 1000)
        if opcode == 0:
            self.requests.append(Request("pcp", 0))
            self.transport.sendto(header, addr)
            return
        nonce, proto, internal, suggested = struct.unpack_from("!12sB3xHH", data, 24)
        self.requests.append(Request("pcp", 1, lifetime, internal, suggested, nonce))
        granted = self._lease(lifetime)
        external = (suggested or internal) + self.port_shift
        if lifetime == 0:
            self.mappings.pop(internal, None)
        elif result == 0:
            self.mappings[internal] = external
        ext_ip = ipaddress.IPv6Address(f"::ffff:{self.public_ip}").packed
        header = struct.pack("!BBBBII12x", 2, 0x81, 0, result, granted, 1000)
        self.transport.sendto(
            header + struct.pack("!12sB3xHH16s", nonce, proto, internal, external, ext_ip), addr)

    def _natpmp(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        opcode = data[1]
        result = 2 if self.mode == "refuse" else 0
        if opcode == 0:
            self.requests.append(Request("nat-pmp", 0))
            self.transport.sendto(struct.pack("!BBHI4s", 0, 128, result, 1000,
                                              ipaddress.IPv4Address(self.public_ip).packed),
                                  addr)
            return
        internal, suggested, lifetime = struct.unpack_from("!HHI", data, 4)
        self.requests.append(Request("nat-pmp", opcode, lifetime, internal, suggested))
        external = 0 if lifetime == 0 else (suggested or internal) + self.port_shift
        if lifetime == 0:
            self.mappings.pop(internal, None)
        elif result == 0:
            self.mappings[internal] = external
        self.transport.sendto(struct.pack("!BBHIHHI", 0, 128 + opcode, result, 1000, internal,
                                          external, self._lease(lifetime)), addr)

    def _lease(self, asked: int) -> int:
        if asked == 0 or self.granted is None:
            return min(asked, self.max_lifetime)
        return self.granted


async def start_pcp_gateway(mode: str = "pcp", host: str = "127.0.0.1",
                            **kwargs: Any) -> FakePcpGateway:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(
        lambda: FakePcpGateway(mode, **kwargs), local_addr=(host, 0))
    return proto


# -- UPnP ------------------------------------------------------------------------------

_SERVICE = "urn:schemas-upnp-org:service:WANIPConnection:1"
_DESCRIPTION = """<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0">
 <specVersion><major>1</major><minor>0</minor></specVersion>
 <device>
  <deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType>
  <friendlyName>fake IGD</friendlyName><manufacturer>tests</manufacturer>
  <modelName>fake</modelName><UDN>uuid:00000000-0000-0000-0000-000000000001</UDN>
  <deviceList><device>
   <deviceType>urn:schemas-upnp-org:device:WANDevice:1</deviceType>
   <friendlyName>WAN</friendlyName><manufacturer>tests</manufacturer>
   <modelName>fake</modelName><UDN>uuid:00000000-0000-0000-0000-000000000002</UDN>
   <deviceList><device>
    <deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:1</deviceType>
    <friendlyName>WANConn</friendlyName><manufacturer>tests</manufacturer>
    <modelName>fake</modelName><UDN>uuid:00000000-0000-0000-0000-000000000003</UDN>
    <serviceList><service>
     <serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>
     <serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId>
     <SCPDURL>/WANIPCn.xml</SCPDURL><controlURL>/ctl/IPConn</controlURL>
     <eventSubURL>/evt/IPConn</eventSubURL>
    </service></serviceList>
   </device></deviceList>
  </device></deviceList>
 </device>
</root>
"""


def _arg(name: str, direction: str, variable: str) -> str:
    return (f"<argument><name>{name}</name><direction>{direction}</direction>"
            f"<relatedStateVariable>{variable}</relatedStateVariable></argument>")


def _var(name: str, type_: str) -> str:
    return (f'<stateVariable sendEvents="no"><name>{name}</name>'
            f"<dataType>{type_}</dataType></stateVariable>")


_MAPPING_ARGS = [("NewRemoteHost", "RemoteHost"), ("NewExternalPort", "ExternalPort"),
                 ("NewProtocol", "PortMappingProtocol")]
_SCPD = (
    '<?xml version="1.0"?><scpd xmlns="urn:schemas-upnp-org:service-1-0">'
    "<specVersion><major>1</major><minor>0</minor></specVersion><actionList>"
    "<action><name>AddPortMapping</name><argumentList>"
    + "".join(_arg(n, "in", v) for n, v in [
        *_MAPPING_ARGS, ("NewInternalPort", "InternalPort"),
        ("NewInternalClient", "InternalClient"), ("NewEnabled", "PortMappingEnabled"),
        ("NewPortMappingDescription", "PortMappingDescription"),
        ("NewLeaseDuration", "PortMappingLeaseDuration")])
    + "</argumentList></action>"
    "<action><name>DeletePortMapping</name><argumentList>"
    + "".join(_arg(n, "in", v) for n, v in _MAPPING_ARGS)
    + "</argumentList></action>"
    "<action><name>GetExternalIPAddress</name><argumentList>"
    + _arg("NewExternalIPAddress", "out", "ExternalIPAddress")
    + "</argumentList></action></actionList><serviceStateTable>"
    + "".join(_var(n, t) for n, t in [
        ("RemoteHost", "string"), ("ExternalPort", "ui2"), ("PortMappingProtocol", "string"),
        ("InternalPort", "ui2"), ("InternalClient", "string"),
        ("PortMappingEnabled", "boolean"), ("PortMappingDescription", "string"),
        ("PortMappingLeaseDuration", "ui4"), ("ExternalIPAddress", "string")])
    + "</serviceStateTable></scpd>"
)


def _soap(body: str) -> str:
    return ('<?xml version="1.0"?><s:Envelope '
            'xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
            's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/">'
            f"<s:Body>{body}</s:Body></s:Envelope>")


_FAULT = _soap(
    "<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring>"
    '<detail><UPnPError xmlns="urn:schemas-upnp-org:control-1-0"><errorCode>718'
    "</errorCode><errorDescription>ConflictInMappingEntry</errorDescription></UPnPError>"
    "</detail></s:Fault>")


@dataclass
class FakeIgd:
    """`mode`: "ok", "fault" (AddPortMapping answers a SOAP fault), "garbage" (the
    description is not XML), "elsewhere" (SSDP points at another host)."""

    mode: str = "ok"
    host: str = "127.0.0.1"
    public_ip: str = PUBLIC_IP
    actions: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    mappings: dict[int, tuple[str, int, int]] = field(default_factory=dict)
    ssdp_port: int = 0
    http_port: int = 0
    _runner: web.AppRunner | None = None
    _ssdp: asyncio.DatagramTransport | None = None

    async def start(self) -> FakeIgd:
        app = web.Application()
        app.router.add_get("/rootDesc.xml", self._description)
        app.router.add_get("/WANIPCn.xml", self._scpd)
        app.router.add_post("/ctl/IPConn", self._control)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        server = site._server
        assert server is not None
        self.http_port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        loop = asyncio.get_running_loop()
        igd = self

        class Ssdp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                if not data.startswith(b"M-SEARCH"):
                    return
                host = "192.0.2.99" if igd.mode == "elsewhere" else igd.host
                answer = ("HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n"
                          f"ST: {_SERVICE}\r\nUSN: uuid:00000000-0000-0000-0000-000000000001"
                          f"::{_SERVICE}\r\nEXT:\r\nSERVER: fake\r\n"
                          f"LOCATION: http://{host}:{igd.http_port}/rootDesc.xml\r\n\r\n")
                cast(asyncio.DatagramTransport, self.transport).sendto(answer.encode(), addr)

        self._ssdp, _ = await loop.create_datagram_endpoint(Ssdp, local_addr=(self.host, 0))
        self.ssdp_port = self._ssdp.get_extra_info("sockname")[1]
        return self

    async def close(self) -> None:
        if self._ssdp is not None:
            self._ssdp.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _scpd(self, _request: web.Request) -> web.Response:
        return web.Response(text=_SCPD, content_type="text/xml")

    async def _description(self, _request: web.Request) -> web.Response:
        if self.mode == "garbage":
            return web.Response(text="<root><device>\x00 not xml", content_type="text/xml")
        return web.Response(text=_DESCRIPTION, content_type="text/xml")

    async def _control(self, request: web.Request) -> web.Response:
        action = request.headers.get("SOAPACTION", "").strip('"').rpartition("#")[2]
        body = await request.text()
        args = dict(re.findall(r"<(New\w+)>([^<]*)</\1>", body))
        self.actions.append((action, args))
        if action == "AddPortMapping":
            if self.mode == "fault":
                return web.Response(status=500, text=_FAULT, content_type="text/xml")
            self.mappings[int(args["NewExternalPort"])] = (
                args["NewInternalClient"], int(args["NewInternalPort"]),
                int(args["NewLeaseDuration"]))
            out = ""
        elif action == "DeletePortMapping":
            self.mappings.pop(int(args["NewExternalPort"]), None)
            out = ""
        elif action == "GetExternalIPAddress":
            out = f"<NewExternalIPAddress>{self.public_ip}</NewExternalIPAddress>"
        else:
            return web.Response(status=500, text=_FAULT, content_type="text/xml")
        return web.Response(text=_soap(f'<u:{action}Response xmlns:u="{_SERVICE}">{out}'
                                       f"</u:{action}Response>"), content_type="text/xml")
