"""PCP (RFC 6887) client: MAP requests for UDP, renewal and deletion.

No well-kept asyncio PCP client exists on PyPI; a MAP request and its answer are fixed
60-byte layouts, so `struct` does it. IPv4 addresses travel IPv4-mapped (::ffff:a.b.c.d).
A NAT-PMP-only gateway answers a PCP request with a version 0 "unsupported version":
that is reported as such, so the caller moves on to NAT-PMP.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import struct
from collections.abc import Callable, Sequence

from kbwg.portmap.exchange import DEFAULT_WAITS, Garbage, exchange
from kbwg.portmap.mapping import Mapping, PortmapError

PORT = 5351
VERSION = 2
OP_MAP = 1
PROTO_UDP = 17
NONCE_LEN = 12
RESULTS = {
    0: "SUCCESS", 1: "UNSUPP_VERSION", 2: "NOT_AUTHORIZED", 3: "MALFORMED_REQUEST",
    4: "UNSUPP_OPCODE", 5: "UNSUPP_OPTION", 6: "MALFORMED_OPTION", 7: "NETWORK_FAILURE",
    8: "NO_RESOURCES", 9: "UNSUPP_PROTOCOL", 10: "USER_EX_QUOTA",
    11: "CANNOT_PROVIDE_EXTERNAL", 12: "ADDRESS_MISMATCH", 13: "EXCESSIVE_REMOTE_PEERS",
}

# version, R|opcode, reserved, lifetime, client IP
_REQUEST = struct.Struct("!BBHI16s")
# version, R|opcode, reserved, result, lifetime, epoch, reserved
_RESPONSE = struct.Struct("!BBBBII12x")
# nonce, protocol, reserved, internal port, external port, external IP
_MAP = struct.Struct("!12sB3xHH16s")
ANSWER_LEN = _RESPONSE.size + _MAP.size


def _mapped(ip: str) -> bytes:
    return ipaddress.IPv6Address(f"::ffff:{ipaddress.IPv4Address(ip)}").packed


def map_request(nonce: bytes, client_ip: str, internal_port: int, external_port: int,
                lifetime: int, external_ip: str = "0.0.0.0") -> bytes:
    return (_REQUEST.pack(VERSION, OP_MAP, 0, lifetime, _mapped(client_ip))
            + _MAP.pack(nonce, PROTO_UDP, internal_port, external_port, _mapped(external_ip)))


def decode_map(nonce: bytes, internal_port: int,
               ) -> Callable[[bytes], tuple[str, int, int]]:
    """A decoder of the answer to our MAP: (external IP, external port, lifetime)."""
    def decode(data: bytes) -> tuple[str, int, int]:
        if len(data) >= 4 and data[0] == 0 and data[3] == 1:
            # RFC 6887 9: a NAT-PMP server's "unsupported version". NAT-PMP's format has
            # no nonce, so a forged one is believed: it moves us on to NAT-PMP, whose
            # answers carry none either (what is mapped is checked in mapper.py).
            raise PortmapError("error", "PCP: the gateway speaks only NAT-PMP "
                               "(unsupported version)")
        if len(data) < _RESPONSE.size:
            raise Garbage(f"{len(data)} bytes, too short for PCP")
        version, op, _, result, lifetime, _ = _RESPONSE.unpack_from(data)
        if version != VERSION:
            raise Garbage(f"version {version}, not PCP's {VERSION}")
        if op != 0x80 | OP_MAP:
            raise Garbage(f"opcode {op:#x}, not a MAP answer")
        # A refusal too must carry our nonce (RFC 6887 7.2: an error answer copies the
        # request's fields), or anyone on the LAN could end the request with one.
        if len(data) < ANSWER_LEN or len(data) % 4:
            raise Garbage(f"{len(data)} bytes, a MAP answer (a refusal too) has "
                          f"{ANSWER_LEN} or more")
        got_nonce, proto, internal, external, ext_ip = _MAP.unpack_from(data, _RESPONSE.size)
        if got_nonce != nonce or proto != PROTO_UDP or internal != internal_port:
            raise Garbage("an answer to another request (nonce, protocol or port differ)")
        if result:
            raise PortmapError("error", f"PCP: the gateway refused: result {result} "
                               f"({RESULTS.get(result, 'unknown')})")
        v4 = ipaddress.IPv6Address(ext_ip).ipv4_mapped
        if v4 is None:
            raise Garbage("external address is not IPv4")
        return str(v4), external, lifetime
    return decode


def new_nonce() -> bytes:
    return os.urandom(NONCE_LEN)


async def map_udp(gateway: str, local_ip: str, internal_port: int, external_port: int,
                  lifetime: int, nonce: bytes | None = None, external_ip: str = "0.0.0.0",
                  port: int = PORT, waits: Sequence[float] = DEFAULT_WAITS) -> Mapping:
    """Map (or, repeating the nonce, renew) UDP `internal_port` of `local_ip`."""
    nonce = nonce or new_nonce()
    request = map_request(nonce, local_ip, internal_port, external_port, lifetime, external_ip)
    ext_ip, ext_port, granted = await exchange(
        (gateway, port), local_ip, request, decode_map(nonce, internal_port), "PCP", waits)
    if ext_port == 0 or granted == 0:
        raise PortmapError("error", "PCP: the gateway granted no port")
    return Mapping("pcp", gateway, local_ip, internal_port, ext_ip, ext_port, granted,
                   asyncio.get_running_loop().time(), nonce=nonce)


async def unmap_udp(mapping: Mapping, port: int = PORT,
                    waits: Sequence[float] = DEFAULT_WAITS) -> None:
    """RFC 6887 15: the same nonce and internal port with lifetime 0 delete it."""
    request = map_request(mapping.nonce, mapping.internal_ip, mapping.internal_port, 0, 0)
    await exchange((mapping.gateway, port), mapping.internal_ip, request,
                   decode_map(mapping.nonce, mapping.internal_port), "PCP", waits)


OP_ANNOUNCE = 0


def announce_request(client_ip: str) -> bytes:
    """RFC 6887 14.1: ANNOUNCE, a request that changes nothing: a probe."""
    return _REQUEST.pack(VERSION, OP_ANNOUNCE, 0, 0, _mapped(client_ip))


def decode_announce(data: bytes) -> int:
    """The result code of an ANNOUNCE answer."""
    if len(data) >= 4 and data[0] == 0:
        raise PortmapError("error", "PCP: the gateway speaks only NAT-PMP "
                           "(unsupported version)")
    if len(data) < _RESPONSE.size:
        raise Garbage(f"{len(data)} bytes, too short for PCP")
    version, op, _, result, _, _ = _RESPONSE.unpack_from(data)
    if version != VERSION or op != 0x80 | OP_ANNOUNCE:
        raise Garbage(f"version {version} opcode {op:#x}, not a PCP ANNOUNCE answer")
    return int(result)


async def announce(gateway: str, local_ip: str, port: int = PORT,
                   waits: Sequence[float] = DEFAULT_WAITS) -> int:
    return await exchange((gateway, port), local_ip, announce_request(local_ip),
                          decode_announce, "PCP", waits)
