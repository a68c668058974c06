"""NAT behaviour discovery (RFC 5780) from the answers of the configured STUN servers.

- Mapping: the mapped address seen by two destinations of the same socket. With an
  RFC 5780 server the second destination is its OTHER-ADDRESS IP on the primary port
  (section 4.3, test II); otherwise a second configured server.
- Filtering (section 4.4): from a fresh socket, whether an answer sent from the other
  IP and port (test II), or from the other port only (test III), gets through. A fresh
  socket matters: the mapping test has already sent to the other IP, which would open an
  address-dependent filter and make it look endpoint-independent.
- Hairpin: whether a request to our own mapped address comes back to us.
- The classic RFC 3489 type from pystun3, as a second opinion, always against a
  configured server (pystun3's own default list is public servers).

Timeouts are the signal here, so every probe runs against a bounded budget.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import stun as pystun

from kbwg.core.routing import route_source
from kbwg.negotiation.stun_client import (
    Address,
    BindingResult,
    StunClient,
    StunError,
    StunErrorResponse,
    format_address,
)

log = logging.getLogger(__name__)

ENDPOINT_INDEPENDENT = "endpoint-independent"
ENDPOINT_DEPENDENT = "endpoint-dependent"
ADDRESS_DEPENDENT = "address-dependent"
ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
UNKNOWN = "unknown"

# pystun3's wording -> stable names for reports.
CLASSIC_NAMES = {
    pystun.Blocked: "blocked",
    pystun.OpenInternet: "open-internet",
    pystun.FullCone: "full-cone",
    pystun.SymmetricUDPFirewall: "symmetric-udp-firewall",
    pystun.RestricNAT: "restricted-cone",
    pystun.RestricPortNAT: "port-restricted-cone",
    pystun.SymmetricNAT: "symmetric",
    pystun.ChangedAddressError: "unknown",
}

ClientFactory = Callable[[], AbstractAsyncContextManager[StunClient]]


def mapping_verdict(mapped: Sequence[Address]) -> str:
    """Mapped addresses of one socket seen by different destinations."""
    if len(mapped) < 2:
        return UNKNOWN
    return ENDPOINT_INDEPENDENT if len(set(mapped)) == 1 else ENDPOINT_DEPENDENT


def filtering_verdict(other_ip_and_port: bool | None, other_port: bool | None) -> str:
    """Whether the answers of tests II and III arrived; None means not tested."""
    if other_ip_and_port is None:
        return UNKNOWN
    if other_ip_and_port:
        return ENDPOINT_INDEPENDENT
    if other_port is None:
        return UNKNOWN
    return ADDRESS_DEPENDENT if other_port else ADDRESS_AND_PORT_DEPENDENT


@dataclass
class NatBehaviour:
    udp: bool | None = None
    mapping: str = UNKNOWN
    mapping_method: str | None = None
    filtering: str = UNKNOWN
    filtering_server: str | None = None
    hairpin: bool | None = None
    classic: str | None = None
    behind_nat: bool | None = None
    mapped: Address | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "udp": self.udp, "mapping": self.mapping, "mapping_method": self.mapping_method,
            "filtering": self.filtering, "filtering_server": self.filtering_server,
            "hairpin": self.hairpin, "classic": self.classic, "behind_nat": self.behind_nat,
            "mapped": format_address(self.mapped) if self.mapped else None,
            "notes": list(self.notes),
        }


async def probe_mapping(client: StunClient, answers: Sequence[BindingResult], *,
                        timeout: float, rto: float = 0.25) -> tuple[str, str | None]:
    """(verdict, method) from the answers already gathered on this client's socket."""
    rfc5780 = next((a for a in answers if a.other_address), None)
    if rfc5780 is not None and rfc5780.other_address is not None:
        target = (rfc5780.other_address[0], rfc5780.server[1])
        if target[0] != rfc5780.server[0]:
            try:
                second = await client.binding(target, timeout=timeout, rto=rto)
            except StunError as exc:
                log.info("mapping test II to %s failed: %s", format_address(target), exc)
            else:
                return mapping_verdict([rfc5780.mapped, second.mapped]), "rfc5780"
    by_ip = {a.server[0]: a.mapped for a in answers}
    if len(by_ip) >= 2:
        return mapping_verdict(list(by_ip.values())), "two servers"
    by_port = {a.server: a.mapped for a in answers}
    if len(by_port) >= 2:
        # Two ports of one IP only tell port-dependent mappings apart.
        return mapping_verdict(list(by_port.values())), "two ports"
    return UNKNOWN, None


async def probe_filtering(client: StunClient, server: Address, *, timeout: float,
                          rto: float = 0.25) -> tuple[str, str | None]:
    """RFC 5780 section 4.4 from `client`, which should have a socket of its own.

    Returns (verdict, note); the note says why the verdict is unknown.
    """
    step = timeout / 3
    try:
        first = await client.binding(server, timeout=step, rto=rto)
    except StunError as exc:
        return UNKNOWN, f"filtering test I failed: {exc}"
    if first.other_address is None:
        return UNKNOWN, f"{format_address(server)} does not support RFC 5780 (no OTHER-ADDRESS)"

    async def changed(change_ip: bool) -> bool | None:
        try:
            answer = await client.binding(server, change_ip=change_ip, change_port=True,
                                          timeout=step, rto=rto)
        except StunErrorResponse as exc:
            log.info("CHANGE-REQUEST refused: %s", exc)
            return None
        except StunError:
            return False
        if answer.source == first.source:
            # The server ignored CHANGE-REQUEST: the answer proves nothing.
            return None
        return True

    test2 = await changed(change_ip=True)
    test3 = None if test2 is None or test2 else await changed(change_ip=False)
    verdict = filtering_verdict(test2, test3)
    note = None
    if verdict == UNKNOWN:
        note = f"{format_address(server)} did not honour CHANGE-REQUEST"
    return verdict, note


def classic_nat_type(server: Address, source_ip: str, socket_timeout: float) -> str:
    """pystun3's RFC 3489 classification from its own ephemeral socket. Blocking."""
    host, port = server
    if not host:
        raise ValueError("a STUN server is required: pystun3's default list is public")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.settimeout(socket_timeout)
        sock.bind(("0.0.0.0", 0))
        nat_type, _ = pystun.get_nat_type(sock, source_ip, sock.getsockname()[1],
                                          stun_host=host, stun_port=port)
    finally:
        sock.close()
    return CLASSIC_NAMES.get(nat_type, UNKNOWN)


async def probe_classic(server: Address, *, timeout: float) -> str | None:
    # pystun3 tries each test 4 times and a full run has up to 4 tests.
    socket_timeout = max(0.05, timeout / 16)
    try:
        source_ip = route_source(server[0])
        return await asyncio.to_thread(classic_nat_type, server, source_ip, socket_timeout)
    except Exception as exc:  # pystun3 trips over odd answers (KeyError, TypeError...)
        log.info("pystun3 classification against %s failed: %r", format_address(server), exc)
        return None


async def probe_nat(
    client: StunClient,
    answers: Sequence[BindingResult],
    *,
    servers_tried: int,
    local_addresses: set[str],
    local_port: int,
    fresh_client: ClientFactory | None = None,
    timeout: float = 3.0,
    classic: bool = True,
) -> NatBehaviour:
    """Everything after the first Binding to each server (`answers`, from `client`).

    `fresh_client` opens a client on a new socket for the filtering test; without it
    filtering is tested from `client` before the mapping test.
    """
    report = NatBehaviour()
    if servers_tried == 0:
        report.notes.append("no STUN server configured")
        return report
    report.udp = bool(answers)
    if not answers:
        report.notes.append("no STUN server answered: UDP is blocked or the servers are down")
        return report
    primary = answers[0]
    report.mapped = primary.mapped
    report.behind_nat = not (primary.mapped[0] in local_addresses
                             and primary.mapped[1] == local_port)

    async def filtering() -> None:
        server = next((a.server for a in answers if a.other_address), primary.server)
        report.filtering_server = format_address(server)
        if fresh_client is None:
            verdict, note = await probe_filtering(client, server, timeout=timeout)
        else:
            async with fresh_client() as other:
                verdict, note = await probe_filtering(other, server, timeout=timeout)
        report.filtering = verdict
        if note:
            report.notes.append(note)

    async def mapping_then_hairpin() -> None:
        report.mapping, report.mapping_method = await probe_mapping(
            client, answers, timeout=timeout / 2)
        if report.mapping == UNKNOWN:
            report.notes.append("mapping unknown: needs an RFC 5780 server or two STUN servers")
        report.hairpin = await client.hairpin(primary.mapped, timeout=min(1.0, timeout / 2))

    async def classic_type() -> None:
        report.classic = await probe_classic(primary.server, timeout=timeout)

    async def sequence() -> None:
        if fresh_client is None:
            # Filtering first: its requests go to the primary address only, while the
            # mapping test sends to the other IP and would open an address filter.
            await filtering()
            await mapping_then_hairpin()
        else:
            await asyncio.gather(filtering(), mapping_then_hairpin())

    tasks = [sequence()]
    if classic:
        tasks.append(classic_type())
    await asyncio.gather(*tasks)
    return report
