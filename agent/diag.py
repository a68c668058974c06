"""`kbwg-agent diag`: what this host's network allows, like `tailscale netcheck`.

Standalone mode binds its own UDP socket and runs everything from it: interfaces and
host candidates, one Binding to every STUN server (RTT, mapped address), NAT mapping
and filtering behaviour, hairpin, the classic pystun3 type, relay reachability, which
port mapping protocols the default gateway answers, and a one-line conclusion. The
JSON form (`DiagReport.to_json`) is a stable interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from typing import Any

from aioice import stun

from kbwg.agent.peers_file import DEFAULT_OVERLAY
from kbwg.agent.teamconfig import HostPort, RelayConfig, tls_context
from kbwg.core.printable import RENDER_LIMIT, printable_tree
from kbwg.negotiation.candidates import (
    DEFAULT_INTERFACE_EXCLUDE,
    Candidate,
    InterfaceAddress,
    gather_host_candidates,
    gather_srflx,
    host_address_problem,
)
from kbwg.negotiation.gathering import resolve_servers
from kbwg.negotiation.natprobe import (
    ENDPOINT_DEPENDENT,
    ENDPOINT_INDEPENDENT,
    NatBehaviour,
    probe_nat,
)
from kbwg.negotiation.stun_client import (
    Address,
    StunClient,
    StunCounters,
    StunError,
    bind_udp,
    format_address,
    open_udp_client,
)
from kbwg.portmap.gateway import Gateway
from kbwg.portmap.mapper import PortmapConfig, ProbeReport, config_from_env, probe
from kbwg.turn.stream import stream_binding

log = logging.getLogger(__name__)

JSON_VERSION = 1
EXIT_OK = 0
EXIT_UDP_BLOCKED = 2
ENV_RELAY_SECRET = "KBWG_RELAY_SECRET"
_SECRET_FILE_MAX = 64 * 1024
SECRET_ON_COMMAND_LINE = (
    "--relay-secret puts the secret in the process list, where every local user can "
    f"read it; use --relay-secret-file FILE or ${ENV_RELAY_SECRET} instead")


def read_secret_file(path: str) -> str:
    """The secret held in `path`, surrounding whitespace removed."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(_SECRET_FILE_MAX + 1)
    except OSError as exc:
        raise ValueError(f"cannot read --relay-secret-file {path}: {exc.strerror or exc}; "
                         "give a readable file holding the relays' secret") from exc
    if len(data) > _SECRET_FILE_MAX:
        raise ValueError(f"--relay-secret-file {path} is over {_SECRET_FILE_MAX} bytes: "
                         "it should hold only the relays' secret")
    try:
        secret = data.decode().strip()
    except UnicodeDecodeError as exc:
        raise ValueError(f"--relay-secret-file {path} is not UTF-8 text") from exc
    if not secret:
        raise ValueError(f"--relay-secret-file {path} holds no secret")
    return secret


def relay_secret(flag: str | None, file: str | None,
                 environ: Mapping[str, str]) -> tuple[str, str | None]:
    """The relays' secret from --relay-secret-file, $KBWG_RELAY_SECRET or (discouraged)
    --relay-secret, and a warning to print when it came from the command line."""
    if file is not None:
        return read_secret_file(file), None
    if flag is not None:
        return flag, SECRET_ON_COMMAND_LINE
    return environ.get(ENV_RELAY_SECRET, "").strip(), None


@dataclass
class DiagOptions:
    stun: list[HostPort] = field(default_factory=list)
    relays: list[RelayConfig] = field(default_factory=list)
    port: int = 0
    timeout: float = 5.0
    interface_exclude: list[str] = field(default_factory=lambda: list(DEFAULT_INTERFACE_EXCLUDE))
    overlay: IPv4Network = DEFAULT_OVERLAY
    classic: bool = True
    config_source: str = "command line"
    # Which port mapping protocols to ask the default gateway ($KBWG_PORTMAP).
    portmap: PortmapConfig = field(default_factory=lambda: config_from_env(os.environ))


@dataclass
class InterfaceReport:
    name: str
    address: str
    used: bool
    reason: str | None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address, "used": self.used,
                "reason": self.reason}


@dataclass
class ServerReport:
    """A STUN server, or a relay reached by STUN Binding."""

    server: str
    address: str | None = None
    rtt_ms: float | None = None
    mapped: str | None = None
    other_address: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"server": self.server, "address": self.address, "rtt_ms": self.rtt_ms,
                "mapped": self.mapped, "other_address": self.other_address,
                "error": self.error}


@dataclass
class RelayReport(ServerReport):
    url: str = ""
    transport: str = "udp"  # udp, tcp or tls: what the Binding went over

    @property
    def reachable(self) -> bool:
        return self.rtt_ms is not None

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "reachable": self.reachable, "transport": self.transport,
                **super().to_json()}


IPV6_YES = "yes"
IPV6_OS_ONLY = "no, but OS has support"
IPV6_NO = "no"


@dataclass
class Ipv6Report:
    """IPv6 as netcheck reports it: a STUN server answered over IPv6 (with the address
    it saw), or not though the OS has IPv6, or the OS has none."""

    os_support: bool = False
    address: str | None = None  # "[ip]:port" as the first answering server saw it
    servers: list[ServerReport] = field(default_factory=list)

    @property
    def state(self) -> str:
        if self.address is not None:
            return IPV6_YES
        return IPV6_OS_ONLY if self.os_support else IPV6_NO

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "reachable": self.address is not None,
                "address": self.address, "os_support": self.os_support,
                "servers": [s.to_json() for s in self.servers]}


def os_has_ipv6() -> bool:
    """Whether this host can use IPv6 at all (netcheck's test: bind to [::1])."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@dataclass
class DiagReport:
    local_port: int
    config_source: str
    nat: NatBehaviour
    interfaces: list[InterfaceReport] = field(default_factory=list)
    stun: list[ServerReport] = field(default_factory=list)
    relays: list[RelayReport] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    counters: StunCounters = field(default_factory=StunCounters)
    duration_s: float = 0.0
    mode: str = "standalone"
    portmap: ProbeReport = field(default_factory=ProbeReport)
    ipv6: Ipv6Report = field(default_factory=Ipv6Report)

    @property
    def conclusion(self) -> str:
        return conclude(self)

    @property
    def exit_code(self) -> int:
        return EXIT_UDP_BLOCKED if self.nat.udp is False else EXIT_OK

    def to_json(self) -> dict[str, Any]:
        return {
            "version": JSON_VERSION,
            "mode": self.mode,
            "config_source": self.config_source,
            "local_port": self.local_port,
            **self.nat.to_json(),
            "interfaces": [i.to_json() for i in self.interfaces],
            "stun": [s.to_json() for s in self.stun],
            "relays": [r.to_json() for r in self.relays],
            "candidates": [c.to_json() for c in self.candidates],
            "stun_counters": self.counters.to_json(),
            "duration_s": round(self.duration_s, 3),
            "conclusion": self.conclusion,
            "portmap": self.portmap.to_json(),
            "ipv6": self.ipv6.to_json(),
        }


def conclude(report: DiagReport) -> str:
    nat = report.nat
    relays = [r for r in report.relays if r.reachable]
    if report.relays:
        relay = (f"relay reachable ({relays[0].rtt_ms:.1f} ms)" if relays
                 else "no relay reachable: peers that cannot connect directly stay unreachable")
    else:
        relay = "no relay configured: peers that cannot connect directly stay unreachable"
    if nat.udp is None:
        return ("no STUN server configured: host candidates only, so direct connections "
                f"to peers on the same LAN; NAT behaviour unknown; {relay}")
    if nat.udp is False:
        return ("UDP blocked: no STUN server answered; only peers on the same LAN can "
                f"connect; {relay}")
    if nat.behind_nat is False:
        verdict = "no NAT (public address): direct connections likely"
    elif nat.mapping == ENDPOINT_INDEPENDENT:
        if nat.filtering == ENDPOINT_INDEPENDENT:
            verdict = "full-cone NAT: direct connections likely"
        else:
            verdict = ("port-preserving NAT (endpoint-independent mapping): direct "
                       "connections likely, except with peers behind symmetric NATs")
    elif nat.mapping == ENDPOINT_DEPENDENT:
        verdict = ("symmetric NAT (endpoint-dependent mapping): direct connections only "
                   "with peers on open or full-cone NATs; peers behind port-restricted or "
                   "symmetric NATs will be relayed")
    else:
        verdict = ("NAT mapping unknown (configure an RFC 5780 server or two STUN servers): "
                   "direct connections possible")
    return f"{verdict}; {relay}"


# diag runs without a device owner: it reads the host with the owner's own netlink reads.

async def _interface_addresses() -> list[InterfaceAddress]:
    from kbwg.owner.interfaces import interface_addresses

    return await interface_addresses()


async def _default_gateway() -> Gateway | None:
    from kbwg.owner.interfaces import default_gateway

    try:
        record = await default_gateway()
    except Exception as exc:  # no gateway read: the port-mapping probe says "no gateway"
        log.info("cannot read the default gateway: %s", exc)
        return None
    return None if record is None else Gateway(record.address, record.local_ip,
                                               record.interface)


def _interface_reports(addresses: Sequence[InterfaceAddress], options: DiagOptions,
                       ) -> list[InterfaceReport]:
    reports = []
    for entry in sorted(addresses, key=lambda e: (e.index, e.address)):
        problem = host_address_problem(entry, options.interface_exclude, [options.overlay])
        reports.append(InterfaceReport(entry.interface, f"{entry.address}/{entry.prefixlen}",
                                       problem is None, problem))
    return reports


async def _probe_relay(client: StunClient, relay: RelayConfig, address: Address | None,
                       timeout: float) -> RelayReport:
    report = RelayReport(server=str(relay.address), url=relay.url,
                         transport=relay.transport)
    if address is None:
        report.error = "cannot resolve"
        return report
    report.address = format_address(address)
    if relay.transport != "udp":
        return await _probe_stream_relay(report, relay, address, timeout)
    try:
        answer = await client.binding(address, timeout=timeout, rto=0.3)
    except StunError as exc:
        report.error = str(exc)
        return report
    report.rtt_ms = answer.rtt_ms
    report.mapped = format_address(answer.mapped)
    return report


async def _probe_stream_relay(report: RelayReport, relay: RelayConfig, address: Address,
                              timeout: float) -> RelayReport:
    """A Binding over TCP or TLS (connection and TLS handshake in the RTT)."""
    try:
        tls = tls_context(relay) if relay.transport == "tls" else None
        report.rtt_ms, mapped = await stream_binding(address, tls, relay.host, timeout)
    except TimeoutError:
        report.error = f"no answer over {relay.transport} in {timeout:.1f} s"
    except (OSError, ValueError, stun.TransactionError) as exc:
        report.error = f"{relay.transport}: {exc or type(exc).__name__}"
    else:
        report.mapped = format_address(mapped) if mapped else None
    return report


async def _probe_ipv6(options: DiagOptions, client: StunClient | None, local_port: int,
                      timeout: float, counters: StunCounters,
                      ) -> tuple[Ipv6Report, list[Candidate]]:
    """STUN over IPv6 to every server with an IPv6 address, from `client` (the shared
    WireGuard port, which sends either family) or else from an IPv6 socket of our own
    on the same port number."""
    report = Ipv6Report(os_support=os_has_ipv6())
    servers = [(name, addr) for name, addr in
               await resolve_servers(options.stun, timeout * 0.2, socket.AF_INET6)
               if addr is not None]
    if not servers or not report.os_support:
        return report, []
    async with contextlib.AsyncExitStack() as stack:
        if client is None:
            try:
                client, transport = await bind_udp("::", local_port, counters)
            except OSError as exc:
                report.servers = [ServerReport(name, format_address(addr), error=str(exc))
                                  for name, addr in servers]
                return report, []
            stack.callback(transport.close)
        srflx, results = await gather_srflx(client, servers, ("::", local_port),
                                            timeout=timeout * 0.8, rto=0.3)
    for result in results:
        answer = result.binding
        mapped = format_address(answer.mapped) if answer else None
        if mapped is not None and report.address is None:
            report.address = mapped
        report.servers.append(ServerReport(
            server=result.server,
            address=format_address(result.address) if result.address else None,
            rtt_ms=answer.rtt_ms if answer else None, mapped=mapped, error=result.error))
    return report, srflx


async def run_diag(options: DiagOptions) -> DiagReport:
    """Standalone diagnosis from a UDP socket of our own (port `options.port`)."""
    counters = StunCounters()
    client, transport = await bind_udp("0.0.0.0", options.port, counters)
    try:
        return await diagnose(options, client, transport.local_address[1], counters)
    finally:
        transport.close()


async def diagnose(
    options: DiagOptions,
    client: StunClient,
    local_port: int,
    counters: StunCounters,
    client_for: Callable[[str], StunClient] | None = None,
    mode: str = "standalone",
) -> DiagReport:
    """The report for `local_port`, probing through `client`.

    `client_for(address)`, when given, gives a client sending from that local address, so
    every host candidate gets its own server-reflexive candidate (a running agent's
    shared WireGuard port); otherwise all probes leave as the routing table decides.
    """
    started = time.monotonic()
    deadline = started + options.timeout

    def remaining(share: float = 1.0) -> float:
        return max(0.1, (deadline - time.monotonic()) * share)

    async def portmap() -> ProbeReport:
        if not options.portmap.protocols:  # off: not even the routing table is read
            return await probe(None, options.portmap)
        return await probe(await _default_gateway(), options.portmap)

    # The gateway is asked alongside everything else: a silent one costs seconds.
    portmap_task = asyncio.create_task(portmap(), name="diag-portmap")
    addresses = await _interface_addresses()
    report = DiagReport(local_port=local_port, config_source=options.config_source,
                        nat=NatBehaviour(), counters=counters, mode=mode)
    report.interfaces = _interface_reports(addresses, options)
    report.candidates = gather_host_candidates(
        local_port, options.interface_exclude, [options.overlay], addresses=addresses)

    stun_servers = await resolve_servers(options.stun, remaining(0.2))
    relay_servers = await resolve_servers([r.address for r in options.relays], remaining(0.2))
    gather_timeout = remaining(0.4)
    (srflx, results), relays, (report.ipv6, srflx6) = await asyncio.gather(
        gather_srflx(client, stun_servers, ("0.0.0.0", local_port),
                     timeout=gather_timeout, rto=0.3),
        asyncio.gather(*(
            _probe_relay(client, relay, addr, gather_timeout)
            for relay, (_, addr) in zip(options.relays, relay_servers, strict=True)
        )),
        # The shared port (client_for given) sends IPv6 too; a standalone run opens an
        # IPv6 socket of its own.
        _probe_ipv6(options, client if client_for is not None else None, local_port,
                    gather_timeout, counters),
    )
    if client_for is not None and stun_servers:
        # One srflx per uplink: the same servers asked from every other host address.
        hosts = [c for c in report.candidates if c.type == "host"][1:]
        for host, (more, _) in zip(hosts, await asyncio.gather(*(
            gather_srflx(client_for(h.address), stun_servers, (h.address, local_port),
                         timeout=gather_timeout, rto=0.3)
            for h in hosts
        )), strict=True):
            for cand in more:
                if all((c.address, c.port) != (cand.address, cand.port) for c in srflx):
                    cand.interface = host.interface
                    srflx.append(cand)
    report.candidates.extend(srflx)
    report.candidates.extend(c for c in srflx6 if all(
        (c.address, c.port) != (o.address, o.port) for o in report.candidates))
    report.relays = list(relays)
    for result in results:
        answer = result.binding
        report.stun.append(ServerReport(
            server=result.server,
            address=format_address(result.address) if result.address else None,
            rtt_ms=answer.rtt_ms if answer else None,
            mapped=format_address(answer.mapped) if answer else None,
            other_address=format_address(answer.other_address)
            if answer and answer.other_address else None,
            error=result.error,
        ))

    @contextlib.asynccontextmanager
    async def fresh() -> AsyncIterator[StunClient]:
        async with open_udp_client(counters=counters) as (other, _):
            yield other

    report.nat = await probe_nat(
        client, [r.binding for r in results if r.binding],
        servers_tried=len(options.stun),
        local_addresses={a.address for a in addresses},
        local_port=local_port, fresh_client=fresh, timeout=remaining(0.9),
        classic=options.classic,
    )
    if report.nat.udp is False and report.ipv6.address is not None:
        # UDP works, over IPv6: only the IPv4 NAT behaviour stays unknown.
        report.nat.udp = True
        report.nat.notes = [n for n in report.nat.notes
                            if not n.startswith("no STUN server answered")]
        report.nat.notes.append("no STUN server answered over IPv4, one did over IPv6")
    try:
        report.portmap = await asyncio.wait_for(portmap_task, remaining())
    except TimeoutError:
        report.portmap = ProbeReport(errors={"pcp": "diag timed out", "nat-pmp":
                                             "diag timed out", "upnp": "diag timed out"})
    report.duration_s = time.monotonic() - started
    return report


def _table(header: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "  ",
           ) -> list[str]:
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in r]
                                          for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in cells]


def _yes_no(value: bool | None) -> str:
    return "unknown" if value is None else ("yes" if value else "no")


def _ms(value: float | None) -> str | None:
    return None if value is None else f"{value:.1f} ms"


def _ipv6_line(ipv6: dict[str, Any] | None) -> str | None:
    """netcheck's wording: "yes, [addr]:port", "no, but OS has support" or "no"."""
    if not ipv6:
        return None
    if ipv6.get("address"):
        return f"{ipv6['state']}, {ipv6['address']}"
    if ipv6.get("os_support") and not ipv6.get("servers"):
        return f"{ipv6['state']} (no STUN server with an IPv6 address to test it)"
    return str(ipv6.get("state"))


def render_report(data: dict[str, Any]) -> str:
    """The human report from `DiagReport.to_json()` (also what a running agent returns),
    every string in it made printable: no terminal controls from others."""
    data = printable_tree(data, RENDER_LIMIT)
    lines = [f"kbwg-agent diag ({data['mode']}, UDP port {data['local_port']}, "
             f"servers from {data['config_source']}, {data['duration_s']:.2f}s)", ""]
    lines.append("Interfaces")
    lines += _table(("NAME", "ADDRESS", "HOST CANDIDATE"), [
        (i["name"], i["address"], "yes" if i["used"] else f"no ({i['reason']})")
        for i in data["interfaces"]
    ])
    lines += ["", "STUN servers"]
    if data["stun"]:
        lines += _table(("SERVER", "RTT", "MAPPED", "NOTE"), [
            (s["server"], _ms(s["rtt_ms"]), s["mapped"],
             s["error"] or (f"RFC 5780, other address {s['other_address']}"
                            if s["other_address"] else ""))
            for s in data["stun"]
        ])
    else:
        lines.append("  none configured (use --stun HOST:PORT or the team's kbwg.json)")
    lines += ["", "NAT behaviour"]
    mapping = data["mapping"] + (f" (by {data['mapping_method']})"
                                 if data["mapping_method"] else "")
    filtering = data["filtering"] + (f" (by {data['filtering_server']})"
                                     if data["filtering_server"] else "")
    udp = data["udp"]
    lines += _table(("", ""), [
        ("UDP", _yes_no(udp) if udp is not None else "not tested (no STUN server)"),
        ("Mapped address", data["mapped"]),
        ("Behind NAT", _yes_no(data["behind_nat"])),
        ("Mapping", mapping),
        ("Filtering", filtering),
        ("Hairpin", _yes_no(data["hairpin"])),
        ("Classic type", f"{data['classic']} (pystun3)" if data["classic"] else None),
        ("IPv6", _ipv6_line(data.get("ipv6"))),
    ])[1:]
    lines += ["", "Relays"]
    if data["relays"]:
        lines += _table(("URL", "REACHABLE", "RTT", "NOTE"), [
            (r["url"], _yes_no(r["reachable"]), _ms(r["rtt_ms"]), r["error"] or "")
            for r in data["relays"]
        ])
    else:
        lines.append("  none configured")
    for allocation in data.get("relay_allocations") or []:  # agent mode: the live ones
        lines.append(f"  allocation {allocation['relayed']} on {allocation['url']} over "
                     f"{allocation['transport']}: {allocation['transport_reason']}")
    if "portmap" in data:
        lines += ["", *_render_portmap(data["portmap"])]
    lines += ["", "Candidates"]
    if data["candidates"]:
        lines += _table(("TYPE", "ADDRESS", "PORT", "INTERFACE", "PRIORITY", "SOURCE"), [
            (c["type"], c["address"], c["port"], c["interface"], c["priority"], c["source"])
            for c in data["candidates"]
        ])
    else:
        lines.append("  none: no usable interface address")
    if "peers" in data:
        lines += ["", "Peers"]
        lines += _render_peers(data["peers"]) or ["  none listed besides this device"]
    for note in data["notes"]:
        lines.append(f"note: {note}")
    ignored = data["stun_counters"].get("ignored", 0)
    if ignored:
        lines.append(f"note: {ignored} bad or stray STUN datagrams ignored")
    shared = (data.get("shared_port") or {}).get("owner") or {}
    if shared.get("dropped"):
        over = sum(v for k, v in shared.items() if k.startswith("over_"))
        lines.append(f"note: the device owner dropped {shared['dropped']} STUN datagrams at "
                     f"the WireGuard port ({over} over a budget: a flood?)")
    lines += ["", f"Conclusion: {data['conclusion']}"]
    return "\n".join(lines)


def _render_peers(peers: Sequence[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for peer in peers:
        path = peer.get("path") or "none"
        lines.append(f"  {peer['username']}/{peer['device']} ({peer['overlay_ip']}): {path}"
                     + (f", {peer['reason']}" if peer.get("reason") else ""))
        cands = peer.get("candidates") or []
        if cands:
            lines += _table(("TYPE", "ADDRESS", "PORT"),
                            [(c["type"], c["ip"], c["port"]) for c in cands], indent="    ")
        pairs = peer.get("pairs") or []
        if pairs:
            lines += _table(("LOCAL", "REMOTE", "STATE", "RTT"),
                            [(x["local"], x["remote"], x["state"], _ms(x.get("rtt_ms")))
                             for x in pairs], indent="    ")
    return lines


def _render_portmap(portmap: dict[str, Any]) -> list[str]:
    if not portmap.get("gateway"):
        reason = next((e for e in (portmap.get("errors") or {}).values() if e), None)
        return ["Port mapping", f"  not tried: {reason or 'no default gateway'}"]
    lines = [f"Port mapping (gateway {portmap['gateway']}, from {portmap['local_ip']})"]
    errors = portmap.get("errors") or {}
    rows: list[tuple[str, str]] = []
    for key, name in (("pcp", "PCP"), ("nat_pmp", "NAT-PMP"), ("upnp", "UPnP")):
        answer = portmap.get(key)
        if answer is None:
            rows.append((name, f"not asked ({errors.get(key)})"))
        elif answer == "yes":
            extra = (f" (public address {portmap['public_ip']})"
                     if key == "nat_pmp" and portmap.get("public_ip") else "")
            rows.append((name, "yes" + extra))
        else:
            rows.append((name, f"{answer} ({errors.get(key)})"))
    mapping = portmap.get("mapping")
    rows.append(("Mapping", f"{mapping['external']} -> {mapping['internal']} by "
                 f"{mapping['protocol']}, lease {mapping['lifetime_s']} s"
                 if mapping else "none"))
    return lines + _table(("", ""), rows)[1:]
