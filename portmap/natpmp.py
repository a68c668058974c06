"""NAT-PMP (RFC 6886) client: the gateway's public address, and UDP mappings.

No well-kept asyncio NAT-PMP library exists on PyPI (py-natpmp is blocking and
unmaintained since 2013), and the messages are two fixed layouts: `struct` does it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from collections.abc import Callable, Sequence

from kbwg.portmap.exchange import DEFAULT_WAITS, Garbage, exchange
from kbwg.portmap.mapping import Mapping, PortmapError

PORT = 5351
VERSION = 0
OP_ADDRESS = 0
OP_MAP_UDP = 1
_RESPONSE = 128
RESULTS = {0: "success", 1: "unsupported version", 2: "not authorized/refused",
           3: "network failure", 4: "out of resources", 5: "unsupported opcode"}

_ADDRESS_ANSWER = struct.Struct("!BBHI4s")  # version, op, result, epoch, address
_MAP_REQUEST = struct.Struct("!BBHHHI")  # version, op, reserved, internal, external, lifetime
_MAP_ANSWER = struct.Struct("!BBHIHHI")  # version, op, result, epoch, internal, external, life


def address_request() -> bytes:
    return struct.pack("!BB", VERSION, OP_ADDRESS)


def map_request(internal_port: int, external_port: int, lifetime: int) -> bytes:
    return _MAP_REQUEST.pack(VERSION, OP_MAP_UDP, 0, internal_port, external_port, lifetime)


def _header(data: bytes, op: int, size: int) -> int:
    """The result code of an answer to `op`; Garbage when it is not one."""
    if len(data) < 4:
        raise Garbage(f"{len(data)} bytes, too short for NAT-PMP")
    version, got_op, result = struct.unpack_from("!BBH", data)
    if version != VERSION:
        raise Garbage(f"version {version}, not NAT-PMP's 0")
    if got_op != _RESPONSE + op:
        raise Garbage(f"opcode {got_op}, not the answer to opcode {op}")
    if result == 0 and len(data) < size:
        raise Garbage(f"{len(data)} bytes, an answer to opcode {op} has {size}")
    return int(result)


def _refusal(result: int) -> PortmapError:
    return PortmapError("error", f"NAT-PMP: the gateway refused: result {result} "
                        f"({RESULTS.get(result, 'unknown')})")


def decode_address(data: bytes) -> str:
    result = _header(data, OP_ADDRESS, _ADDRESS_ANSWER.size)
    if result:
        raise _refusal(result)
    return str(ipaddress.IPv4Address(_ADDRESS_ANSWER.unpack_from(data)[4]))


def decode_map(internal_port: int) -> Callable[[bytes], tuple[int, int]]:
    def decode(data: bytes) -> tuple[int, int]:
        result = _header(data, OP_MAP_UDP, _MAP_ANSWER.size)
        if result:
            raise _refusal(result)
        _, _, _, _, internal, external, lifetime = _MAP_ANSWER.unpack_from(data)
        if internal != internal_port:
            raise Garbage(f"answer for internal port {internal}, asked for {internal_port}")
        return external, lifetime
    return decode


async def public_address(gateway: str, local_ip: str | None, port: int = PORT,
                         waits: Sequence[float] = DEFAULT_WAITS) -> str:
    return await exchange((gateway, port), local_ip, address_request(), decode_address,
                          "NAT-PMP", waits)


async def map_udp(gateway: str, local_ip: str, internal_port: int, external_port: int,
                  lifetime: int, port: int = PORT,
                  waits: Sequence[float] = DEFAULT_WAITS) -> Mapping:
    """Map (or renew) UDP `internal_port` of `local_ip`, asking for `external_port`."""
    address = await public_address(gateway, local_ip, port, waits)
    mapped_port, granted = await exchange(
        (gateway, port), local_ip, map_request(internal_port, external_port, lifetime),
        decode_map(internal_port), "NAT-PMP", waits)
    if mapped_port == 0 or granted == 0:
        raise PortmapError("error", "NAT-PMP: the gateway granted no port")
    return Mapping("nat-pmp", gateway, local_ip, internal_port, address, mapped_port,
                   granted, asyncio.get_running_loop().time())


async def unmap_udp(mapping: Mapping, port: int = PORT,
                    waits: Sequence[float] = DEFAULT_WAITS) -> None:
    """RFC 6886 3.4: lifetime 0 and external port 0 delete the mapping."""
    await exchange((mapping.gateway, port), mapping.internal_ip,
                   map_request(mapping.internal_port, 0, 0),
                   decode_map(mapping.internal_port), "NAT-PMP", waits)
