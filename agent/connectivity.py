"""This device's side of every peer's path: the WireGuard port's candidates, the checks
sent from them, and how a chosen pair becomes a WireGuard endpoint.

The agent (daemon.py) decides *which* peers exist and when to renegotiate; this object
knows *how* to reach them:

- gathering: host and server-reflexive candidates from the WireGuard port (through the
  device owner's shared port), relayed ones from the team's relays, a mapped one from
  the default gateway (kbwg.portmap: PCP, NAT-PMP or UPnP), one gathering at a time;
- checks: STUN from a host candidate leaves the WireGuard port from that address; from a
  relay candidate it goes through the allocation; what comes back is dispatched to the
  peer's checker by the mux;
- routes: a chosen pair that starts at our relay candidate becomes a loopback proxy;
  a direct one may need a host route that pins the interface it leaves from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from aioice import stun

from kbwg.agent.hostroutes import HostRoutes
from kbwg.agent.owner_calls import OwnerCalls
from kbwg.agent.owner_stun import OwnerStunTransport
from kbwg.agent.relay_paths import RelayPaths
from kbwg.agent.teamconfig import TeamConfig
from kbwg.core.addresses import format_endpoint, parse_ip
from kbwg.core.identity import DeviceId
from kbwg.negotiation.candidate_pairs import CandidatePair
from kbwg.negotiation.candidates import Candidate, mapped_candidate
from kbwg.negotiation.checks import PeerChecker
from kbwg.negotiation.gathering import LocalCandidates, gather_local, resolve_dual
from kbwg.negotiation.mux import CheckMux
from kbwg.negotiation.probe import PairProbe, ProbeResult, ProbingReceiver
from kbwg.negotiation.session import CheckerSpec
from kbwg.negotiation.stun_client import Address, StunClient, StunCounters
from kbwg.negotiation.wire import CandidateInfo
from kbwg.portmap.mapper import PortMapper, config_from_env
from kbwg.portmap.mapping import Mapping

if TYPE_CHECKING:  # the TURN client loads with the first relay (relay_paths)
    from kbwg.turn.client import RelayAllocation

log = logging.getLogger(__name__)

SelectedFn = Callable[[CandidatePair | None, str], None]
# Told our candidates after each gathering step (trickle): (all so far, gathering over).
CandidatesFn = Callable[[list[CandidateInfo], bool], None]

# How long a gathering waits for the gateway's port mapping once the rest is done. A
# gateway that speaks none of the protocols costs seconds (UPnP's SSDP gets no ICMP
# error back); a mapping that comes later joins through `portmap.on_change`.
PORTMAP_GRACE_S = 0.05


@dataclass(frozen=True)
class Route:
    """What a chosen pair means for WireGuard: its endpoint for the peer, and whether it
    goes through our relay (then the endpoint is a loopback proxy)."""

    endpoint: str
    relayed: bool


class Connectivity:
    def __init__(self, owner: OwnerCalls, port: OwnerStunTransport, wg_port: int,
                 relay_user: str, config: TeamConfig,
                 on_relay_lost: Callable[[RelayAllocation], None],
                 endpoint: tuple[str, int] | None = None) -> None:
        self.config = config
        self.wg_port = wg_port
        # `join --endpoint`: a forwarded port, say, that STUN cannot see (a symmetric NAT
        # maps our own packets elsewhere); offered as a mapped candidate, so the
        # negotiated checks try it, not only the early checks of the announcement.
        self._endpoint = endpoint
        self.local = LocalCandidates()
        self.stun_counters = StunCounters()
        self._port = port
        self._mux = CheckMux()
        self._stun_clients: dict[str | None, StunClient] = {}
        self._routes = HostRoutes.new(owner)
        # The host's addresses and gateway come from the owner (the agent has no netlink).
        self._interfaces = owner.interfaces
        self.relays = RelayPaths(relay_user, wg_port, self._on_relay_stun, on_relay_lost)
        self._gathering: asyncio.Task[None] | None = None
        # Trickle: the host and STUN part of the current gathering is done (the relays
        # may take longer); the live checkers are given what each step adds.
        self._local_done = asyncio.Event()
        self._checkers: set[PeerChecker] = set()
        self.on_candidates: CandidatesFn | None = None
        # The early checks' view of a peer's status (early_checks.py), when they run.
        self.early_view: Callable[[DeviceId, dict[str, Any]], dict[str, Any]] | None = None
        # The WireGuard port mapped on the default gateway. Its on_change (set by the
        # daemon) regathers and renegotiates when the mapping comes, moves or goes.
        # $KBWG_PORTMAP turns it off or limits its protocols.
        self.portmap = PortMapper(wg_port, config_from_env(os.environ),
                                  find_gateway=owner.default_gateway)
        self._mapping_task: asyncio.Task[Mapping | None] | None = None
        # Network events, a lost relay and the refresh loop may all ask for a new
        # gathering at once: one at a time, or a relay would get two allocations.
        self._regather = asyncio.Lock()
        port.local_receiver = self._on_port_datagram
        self._mux.fallback = self.client_for(None).datagram_received

    @classmethod
    async def open(cls, owner: OwnerCalls, wg_port: int, relay_user: str,
                   config: TeamConfig,
                   on_relay_lost: Callable[[RelayAllocation], None],
                   endpoint: tuple[str, int] | None = None) -> Connectivity:
        # STUN on the shared port speaks the owner's transport directly (owner_stun).
        port = await OwnerStunTransport.open(owner.transport)
        return cls(owner, port, wg_port, relay_user, config, on_relay_lost, endpoint)

    @property
    def shared_port(self) -> OwnerStunTransport:
        """The WireGuard port's STUN transport (through the device owner)."""
        return self._port

    async def close(self) -> None:
        if self._gathering is not None:
            self._gathering.cancel()
        if self._mapping_task is not None:
            self._mapping_task.cancel()
        # The mapping goes first: it points at this port.
        await self.portmap.close()
        await self._port.close()
        await self.relays.close()

    # -- candidates ---------------------------------------------------------------------

    def client_for(self, source: str | None) -> StunClient:
        """A STUN client on the WireGuard port, sending from `source` (None: as routed)."""
        client = self._stun_clients.get(source)
        if client is None:
            transport = self._port if source is None else self._port.from_source(source)
            client = self._stun_clients[source] = StunClient(transport, self.stun_counters)
            transport.receiver = client.datagram_received
        return client

    def start_gathering(self) -> asyncio.Task[None]:
        self._local_done.clear()
        self._gathering = task = asyncio.create_task(self._gather(), name="gather")
        return task

    def gathering_done(self) -> bool:
        return self._gathering is None or self._gathering.done()

    async def regather(self) -> bool:
        """Gather again (after a network change or a lost relay); True when the
        candidates changed."""
        async with self._regather:
            before = self._candidate_set()
            await self.start_gathering()
            return self._candidate_set() != before

    def _candidate_set(self) -> set[tuple[str, str, int]]:
        return {(c.type, c.address, c.port) for c in self.local.candidates}

    async def _gather(self) -> None:
        """Host and srflx candidates from the WireGuard port, relayed ones from the
        relays, at once."""
        mapping_task = self._mapping_task = asyncio.create_task(
            self._ensure_mapping(), name="portmap")
        again = bool(self.local.candidates)
        if not again:
            # First gathering: host candidates at once (a LAN peer needs nothing else);
            # server-reflexive and relayed ones trickle in as they come.
            self.local = await gather_local(self.wg_port, [], self.client_for,
                                            self.config.interface_exclude,
                                            [self.config.overlay], addresses=self._interfaces)
            self._publish(complete=False)
        servers = await resolve_dual(self.config.stun, timeout=2.0)

        found: LocalCandidates | None = None

        async def stun_part() -> LocalCandidates:
            nonlocal found
            found = await gather_local(self.wg_port, servers, self.client_for,
                                       self.config.interface_exclude, [self.config.overlay],
                                       addresses=self._interfaces)
            self.local = self._with_relays(found)
            self._local_done.set()
            self._publish(complete=False)
            return found

        async def relay_part() -> None:
            if again:
                self.relays.drop_moved({a.address for a in await self._interfaces()})
            await self.relays.ensure(self.config.relays)
            if found is not None and self.relays.candidates():
                # Trickled at once, not after the port mapping's grace: a peer behind a
                # symmetric NAT can early-check nothing else.
                self.local = self._with_relays(found)
                self._publish(complete=False)

        local, _ = await asyncio.gather(stun_part(), relay_part())
        self.local = self._with_relays(local)
        await asyncio.wait({mapping_task}, timeout=PORTMAP_GRACE_S)
        mapped: list[Candidate] = []
        if mapping_task.done():
            mapped = self._mapped_candidates(mapping_task.result())
        else:
            mapping_task.add_done_callback(self._late_mapping)
        self.local = self._with_relays(local, mapped)
        self._mux.set_local_candidates(self.local.candidates)
        log.info("local candidates: %s", ", ".join(
            f"{c.type} {c.address}:{c.port}" for c in self.local.candidates) or "none")
        self._publish(complete=True)

    def _with_relays(self, local: LocalCandidates,
                     mapped: Sequence[Candidate] = ()) -> LocalCandidates:
        """`local` with the port mapping's candidates, the configured endpoint's and the
        relays' as they are now."""
        known = [*local.candidates, *mapped]
        return replace(local, candidates=[*known, *self._configured(known),
                                          *self.relays.candidates()])

    def _configured(self, known: Sequence[Candidate]) -> list[Candidate]:
        """The configured endpoint as a mapped candidate, based on the first IPv4 host
        candidate's WireGuard port (where a forward delivers); none when a candidate
        already has its address and port (no NAT, or STUN saw the same)."""
        if self._endpoint is None:
            return []
        ip, port = self._endpoint
        host = next((c for c in known if c.type == "host" and ":" not in c.address), None)
        if host is None or any((c.address, c.port) == (ip, port) for c in known):
            return []
        if parse_ip(ip) in self.config.overlay:
            return []  # peers' device owners refuse an endpoint in the overlay
        return [mapped_candidate(ip, port, host.interface, "--endpoint",
                                 f"{host.address}:{self.wg_port}")]

    def _publish(self, complete: bool) -> None:
        """A gathering step is done: checks may leave from new bases at once, and the
        peers hear of the new candidates (trickle)."""
        self._mux.set_local_candidates(self.local.candidates)
        self._drop_closed()
        for checker in self._checkers:
            checker.add_local(self.local.candidates, complete)
        if self.on_candidates is not None:
            self.on_candidates(self.candidate_infos(), complete)

    async def local_gathered(self, timeout: float) -> None:
        """Until host and STUN candidates are known (relays aside), at most `timeout`."""
        if not self.gathering_done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._local_done.wait(), timeout)

    async def _ensure_mapping(self) -> Mapping | None:
        try:
            return await self.portmap.ensure()
        except Exception:  # the other candidates must not depend on the gateway
            log.exception("port mapping failed")
            return None

    def _late_mapping(self, task: asyncio.Task[Mapping | None]) -> None:
        if task.cancelled() or task.exception() is not None or task.result() is None:
            return
        if self.portmap.on_change is not None:
            self.portmap.on_change()

    def _mapped_candidates(self, mapping: Mapping | None) -> list[Candidate]:
        gateway = self.portmap.gateway
        if mapping is None or any(c.address == mapping.external_ip and c.type == "host"
                                  for c in self.local.candidates):
            # No mapping, or the gateway maps to our own address (no NAT): nothing new.
            return []
        if parse_ip(mapping.external_ip) in self.config.overlay:
            # Peers' device owners refuse an endpoint in the overlay: they would skip us.
            log.warning("port mapping %s is inside the overlay %s: not offered",
                        mapping.external, self.config.overlay)
            return []
        return [mapped_candidate(
            mapping.external_ip, mapping.external_port,
            gateway.interface if gateway else None,
            f"{mapping.protocol} {mapping.gateway}",
            f"{mapping.internal_ip}:{mapping.internal_port}")]

    def relays_missing(self) -> bool:
        return bool(self.relays.missing(self.config.relays))

    def relays_on_later_transport(self) -> bool:
        """A relay is reached over TCP or TLS although UDP is listed before it."""
        return bool(self.relays.on_later_transport(self.config.relays))

    async def retry_relay_transports(self) -> bool:
        """Those relays asked over their first transport again: True when one moved
        (the relayed candidates changed; the caller gathers again)."""
        return await self.relays.retry_first_transports(self.config.relays)

    def stun_unanswered(self) -> bool:
        """The last gathering asked STUN servers and none answered: a name that did not
        resolve yet (DNS comes up after the address at boot), or a server that was down
        or unreachable. (None asked: no server of the default uplink's family, or no
        address; a network change will tell.)"""
        return (self.gathering_done() and bool(self.local.stun)
                and all(r.binding is None for r in self.local.stun))

    def public_endpoint(self) -> str | None:
        """The gateway's mapping of our port, else the server-reflexive address of the
        default uplink, if STUN found one: a mapping reaches us from any peer."""
        for cand in self.local.candidates:
            if cand.type == "mapped":
                return f"{cand.address}:{cand.port}"
        hosts = [c for c in self.local.candidates if c.type == "host"]
        for cand in self.local.candidates:
            # Announcements carry IPv4 (the prototype's format); IPv6 goes in offers.
            if (cand.type == "srflx" and hosts and cand.interface == hosts[0].interface
                    and ":" not in cand.address):
                return f"{cand.address}:{cand.port}"
        return None

    async def offer_candidates(self, wait: float) -> list[CandidateInfo]:
        """Our candidates for an offer or answer: what is known once STUN answered (at
        most `wait` seconds: a server that does not answer is not waited for); what
        comes later trickles (`on_candidates`)."""
        await self.local_gathered(wait)
        return self.candidate_infos()

    def candidate_infos(self) -> list[CandidateInfo]:
        return [CandidateInfo(c.type, c.address, c.port, c.priority, f"{c.type}{i}")
                for i, c in enumerate(self.local.candidates)]

    # -- checks -------------------------------------------------------------------------

    def punch(self, endpoint: str) -> None:
        """Open our NAT towards a peer's announced (public) endpoint at once, so its
        checks get in before our own checks can start (they wait for its answer).
        From every host address: on a multi-homed host each uplink's NAT opens, so the
        peer's checks of every uplink race from the start (not the default one alone)."""
        ip, _, port = endpoint.rpartition(":")
        if any(c.address == ip for c in self.local.candidates):
            return
        indication = stun.Message(stun.Method.BINDING, stun.Class.INDICATION)
        # Only leaving our NAT matters; with a FINGERPRINT the peer's owner counts it as
        # well-formed rather than as a stranger's junk.
        indication.add_fingerprint()
        sources: list[str | None] = [
            c.address for c in self.local.candidates
            if c.type == "host" and (":" in c.address) == (":" in ip)]
        for source in sources or [None]:
            with contextlib.suppress(OSError):
                self._port.send(bytes(indication), (ip, int(port)), source=source)

    def make_checker(self, spec: CheckerSpec, on_selected: SelectedFn) -> RegisteredChecker:
        def selected(pair: CandidatePair | None, reason: str) -> None:
            on_selected(pair, reason)
            if spec.on_outcome is not None:  # the negotiator retries a session that failed
                spec.on_outcome(pair is not None)

        checker = PeerChecker(
            self.local.candidates, spec.ufrag, spec.pwd, controlling=spec.controlling,
            tie_breaker=spec.tie_breaker, send=self._send_check, on_selected=selected,
            name=str(spec.peer), on_relay_quiet=self.relays.confirm_soon,
        )
        if not self.gathering_done():
            checker.add_local([], complete=False)  # more bases may come: not failed yet
        self._keep(checker)
        # `kbwg-agent ping` probes go out like this peer's checks; the mux gives their
        # answers to the probe (ProbingReceiver).
        probe = PairProbe(spec.ufrag, self._send_check)
        self._mux.register(spec.ufrag, ProbingReceiver(checker, probe))
        # The owner passes checks naming this ufrag in a budget strangers cannot use up;
        # the declaration is a local round trip, long done when the peer reads our offer.
        self._port.add_ufrag(spec.ufrag)
        return RegisteredChecker(checker, self._mux, self._port, probe)

    @property
    def mux(self) -> CheckMux:
        return self._mux

    def early_checker(self, ufrag: str, pwd: str, controlling: bool, tie_breaker: int,
                      on_selected: SelectedFn, name: str) -> PeerChecker:
        """A checker for early checks (negotiation/early.py), which registers its ufrag
        with `mux` and the owner itself, once for all the checkers it runs."""
        checker = PeerChecker(self.local.candidates, ufrag, pwd, controlling=controlling,
                              tie_breaker=tie_breaker, send=self._send_check,
                              on_selected=on_selected, name=name,
                              on_relay_quiet=self.relays.confirm_soon)
        if not self.gathering_done():
            checker.add_local([], complete=False)
        self._keep(checker)
        return checker

    def _keep(self, checker: PeerChecker) -> None:
        """`checker` hears of new local candidates. Closed ones go now, not at the next
        gathering step: every offer, restart and retry makes a checker and closes the
        one before, and a stable host may gather again only days later."""
        self._drop_closed()
        self._checkers.add(checker)

    def _drop_closed(self) -> None:
        self._checkers = {c for c in self._checkers if c.state != "closed"}

    def _send_check(self, data: bytes, dest: Address, local: Candidate) -> None:
        if local.type == "relay":
            self.relays.send(data, dest, local)
            return
        try:
            self._port.send(data, dest, source=local.address)
        except OSError as exc:
            log.debug("check to %s:%d not sent: %s", *dest, exc)

    def _on_port_datagram(self, data: bytes, src: Address, local_ip: str) -> None:
        self._mux.datagram_received(data, src, self._mux.local_candidate(local_ip))

    def _on_relay_stun(self, data: bytes, src: Address, local: Candidate) -> None:
        self._mux.datagram_received(data, src, local)

    # -- routes -------------------------------------------------------------------------

    async def route(self, peer: str, pair: CandidatePair) -> Route:
        """The WireGuard endpoint for `peer` over `pair`."""
        proxy = await self.relays.route(peer, pair.local, pair.remote_address)
        if proxy is not None:
            # Relayed by our allocation: WireGuard talks to our loopback proxy.
            await self._routes.clear(peer)
            return Route(proxy, relayed=True)
        return Route(format_endpoint(pair.remote_address), relayed=False)

    async def pin(self, peer: str, pair: CandidatePair, route: Route) -> str | None:
        """The host route (if any) that pins a direct pair to its interface. Only once
        `route` is the peer's WireGuard endpoint: the owner routes to nothing else."""
        if route.relayed:
            return None
        return await self._routes.follow(peer, pair.remote_address[0], pair.local.interface)

    async def forget(self, peer: str) -> None:
        """A peer went away: its host route and relayed path (if any) go."""
        await self._routes.clear(peer)
        self.relays.drop(peer)


@dataclass
class RegisteredChecker:
    """A checker as the negotiator sees it: closing it also unregisters it from the mux."""

    checker: PeerChecker
    mux: CheckMux
    port: OwnerStunTransport
    probe: PairProbe

    @property
    def remote_candidates(self) -> list[CandidateInfo]:
        seen: dict[tuple[str, int], CandidateInfo] = {}
        for pair in self.checker.pairs:
            seen.setdefault((pair.remote.ip, pair.remote.port), pair.remote)
        return list(seen.values())

    def set_remote(self, ufrag: str, pwd: str, candidates: list[CandidateInfo],
                   complete: bool = True) -> None:
        self.probe.set_remote(ufrag, pwd)
        self.checker.set_remote(ufrag, pwd, candidates, complete)

    def add_remote(self, candidates: list[CandidateInfo], complete: bool) -> None:
        self.checker.add_remote(candidates, complete)

    async def ping(self, timeout: float) -> ProbeResult | None:
        """One sealed ping over the selected pair (probe.py); None without one."""
        pair = self.checker.selected
        if pair is None or not self.probe.ready:
            return None
        return await self.probe.ping(pair, timeout)

    def snapshot(self) -> dict[str, Any]:
        return self.checker.snapshot()

    @property
    def was_connected(self) -> bool:
        return self.checker.was_connected

    def retire(self) -> None:
        self.checker.retire()

    def close(self) -> None:
        self.mux.unregister(self.checker.ufrag)
        self.port.remove_ufrag(self.checker.ufrag)
        self.checker.close()
        self.probe.close()
