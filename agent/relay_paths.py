"""The agent's relayed candidates and relayed data paths.

One allocation per configured relay gives one relayed candidate (the lowest-RTT relay
gets the highest priority). A relay listed with several transports (kbwg.json entries
with the same host, secret and username: `turn:H`, `turn:H?transport=tcp`, `turns:H`)
is one relay: UDP is tried first; when it has failed or had a second alone (a network
that blocks outbound UDP), TCP starts beside it, then TLS the same way, and the first
allocation wins. Gathering waits for it at most its time-out (3 s); one that comes later
makes the agent gather again. `transport_reason` says why a relay is reached the way it
is (status and diag show it). A relay reached over a later transport is asked again
over its first now and then (`retry_first_transports`, Upkeep's loop): WireGuard inside a
stream suffers from every lost segment, and a UDP answer lost once at start-up, or a
network that let no UDP out for a while, must not keep the device on the stream for good.
The allocation it replaces carries its peers' data for a moment more
(`RETIRE_GRACE_S`), while the renegotiation moves them to the new one.

Each relay is also asked for an IPv6 relayed address (REQUESTED-ADDRESS-FAMILY, over its
IPv6 address when it has one, else over IPv4), so a peer reachable only over IPv6 has a
relayed path too, and a host with IPv6 alone reaches relays over IPv6; an IPv4 relayed
address is asked over IPv6 when IPv4 cannot reach the relay. A relay that refuses IPv6
(440 from ours or coturn without an IPv6 relay address) is not asked again.

Connectivity checks from a relayed candidate go out through its allocation; what comes
back is STUN (handed to the check dispatcher) or WireGuard data (handed to the loopback
proxy of the peer it comes from). The peer's first WireGuard handshake initiation often
arrives before that proxy exists: the peer gives WireGuard the path as soon as its
checks chose it, while this side (the controlled one, or the later to see a check
answered) opens the proxy only on its own choice, and WireGuard would retry only 5 s
later. So the newest initiation from a peer without a proxy is kept for a moment
(EARLY_INITIATION_S) and handed to the proxy that opens for it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aioice import stun

from kbwg.agent.teamconfig import TRANSPORTS, RelayConfig, tls_context
from kbwg.core.addresses import Address, format_endpoint
from kbwg.core.stun import is_stun
from kbwg.negotiation.candidates import Candidate, candidate_priority
from kbwg.negotiation.stun_client import resolve

if TYPE_CHECKING:
    # The TURN client and the proxies load with the first relay: a team without one
    # never needs them, and `join` does not wait for them (issue 13).
    from kbwg.agent.relay_proxy import LoopbackProxy, ProxyCounters
    from kbwg.turn.client import RelayAllocation

log = logging.getLogger(__name__)


StunHandler = Callable[[bytes, Address, Candidate], None]

# A relay's IPv6 allocation is kept under its group key plus this.
IPV6_KEY = "#ipv6"
# A WireGuard handshake initiation (message type 1, always 148 bytes) that arrived
# before the peer's proxy opened is kept this long, for that many routes at most.
EARLY_INITIATION_S = 2.0
EARLY_INITIATION_ROUTES = 64
# How long a relay's transport is tried alone before the next one listed for that relay
# starts beside it: a relay answers an allocation in two round trips (401, then the
# authenticated request), and aioice retransmits the first after 0.5 s.
NEXT_TRANSPORT_DELAY_S = 1.0
# An allocation replaced by one over the relay's first transport stays open this long:
# its peers' renegotiation (a chat delivery, then checks) moves them off it meanwhile.
RETIRE_GRACE_S = 10.0
_INITIATION_TYPE = 1
_INITIATION_LEN = 148


@dataclass(frozen=True)
class RelayGroup:
    """One relay and the ways to reach it, in the order they are tried."""

    key: str  # the first URL listed for it: allocations are kept by this
    options: tuple[RelayConfig, ...]


def relay_groups(relays: list[RelayConfig]) -> list[RelayGroup]:
    """Entries naming the same relay (host, secret, username) become one group, tried
    UDP first, then TCP, then TLS (in the file's order within a transport)."""
    grouped: dict[tuple[str, str, str | None], list[RelayConfig]] = {}
    for relay in relays:
        grouped.setdefault((relay.host.lower(), relay.secret, relay.username), []).append(relay)
    return [RelayGroup(options[0].url, tuple(sorted(
                options, key=lambda r: TRANSPORTS.index(r.transport))))
            for options in grouped.values()]


@dataclass
class RelayPaths:
    user: str
    wg_port: int
    on_stun: StunHandler
    on_lost: Callable[[RelayAllocation], None]
    # An allocation that arrived after `ensure` returned (a TCP/TLS fallback). None:
    # `on_lost` is told instead, since for the agent both mean the same: the relayed
    # candidates changed, so gather again and renegotiate.
    on_ready: Callable[[RelayAllocation], None] | None = None
    # By relay (the first URL listed for it, see RelayGroup).
    allocations: dict[str, RelayAllocation] = field(default_factory=dict)
    # Fallbacks to TCP/TLS under way, by relay.
    pending: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    proxies: dict[str, LoopbackProxy] = field(default_factory=dict)  # by peer name
    # By relay URL, shared by the proxies of its allocations: outlives each proxy, so
    # status shows what every relayed peer passed, dropped or refused since start.
    proxy_counters: dict[str, ProxyCounters] = field(default_factory=dict)
    # The same proxies by (our relayed address, peer address): one lookup per datagram.
    _by_route: dict[tuple[Address, Address], LoopbackProxy] = field(default_factory=dict)
    # Relays (group keys) that refused an IPv6 relayed address: not asked again.
    no_ipv6: set[str] = field(default_factory=set)
    # Initiations from peers without a proxy yet: (monotonic time, datagram) by route.
    _early: dict[tuple[Address, Address], tuple[float, bytes]] = field(default_factory=dict)
    # Allocations replaced by one over the first transport, closing after RETIRE_GRACE_S.
    _retiring: dict[asyncio.Task[None], RelayAllocation] = field(default_factory=dict)

    def missing(self, relays: list[RelayConfig]) -> list[RelayGroup]:
        """The configured relays without a live allocation or one under way."""
        return [g for g in relay_groups(relays)
                if g.key not in self.pending and not self._alive(g.key)]

    def _alive(self, key: str) -> bool:
        return key in self.allocations and not self.allocations[key].closed

    async def ensure(self, relays: list[RelayConfig], timeout: float = 3.0) -> None:
        """An allocation on every configured relay that has none alive, over the first of
        its transports to give one (`_first_allocation`), and an IPv6 relayed one beside
        it. Waits at most `timeout`; a relay still trying then goes on in the background
        and tells `on_ready` of what it gets."""
        late = asyncio.Event()  # set once this call has returned
        tasks = []
        for group in relay_groups(relays):
            if group.key in self.pending:
                continue
            want4 = not self._alive(group.key)
            want6 = group.key not in self.no_ipv6 and not self._alive(group.key + IPV6_KEY)
            if want4 or want6:
                tasks.append(self._start_group(group, timeout, late, want4, want6))
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        late.set()

    def _start_group(self, group: RelayGroup, timeout: float, late: asyncio.Event,
                     want4: bool, want6: bool) -> asyncio.Task[None]:
        task = asyncio.create_task(self._allocate_group(group, timeout, late, want4, want6))
        self.pending[group.key] = task

        def done(_task: asyncio.Task[None]) -> None:
            if self.pending.get(group.key) is task:
                del self.pending[group.key]

        task.add_done_callback(done)
        return task

    async def _allocate_group(self, group: RelayGroup, timeout: float, late: asyncio.Event,
                              want4: bool, want6: bool) -> None:
        """The relay's missing allocations. The IPv6 one is asked over the transport
        the IPv4 one uses: over the first listed, beside the IPv4 race, and once more
        over the transport that won it when that is another."""
        first = group.options[0]
        if self._alive(group.key):
            first = self._option_of(group, self.allocations[group.key])
        asking6 = (asyncio.create_task(self._allocate(first, timeout, ipv6=True))
                   if want6 else None)
        try:
            got = await self._allocate_ipv4(group, timeout) if want4 else None
            if asking6 is not None:
                over = self._option_of(group, got) if got is not None else first
                if over is not first:
                    await _cancel_all([asking6])
                    asking6 = asyncio.create_task(self._allocate(over, timeout, ipv6=True))
                result6 = (await asyncio.gather(asking6, return_exceptions=True))[0]
                asking6 = None
                self._ipv6_result(group, over, result6, timeout)
                got = got or self.allocations.get(group.key + IPV6_KEY)
        finally:
            if asking6 is not None:
                await _cancel_all([asking6])
        if got is not None and late.is_set():
            (self.on_ready or self.on_lost)(got)

    async def _allocate_ipv4(self, group: RelayGroup, timeout: float) -> RelayAllocation | None:
        try:
            allocation, reasons = await self._first_allocation(group, timeout)
        except _NoAllocation as exc:
            self.allocations.pop(group.key, None)
            log.warning("relay %s: no allocation%s: %s", group.key,
                        " over any transport" if len(group.options) > 1 else "",
                        "; ".join(exc.reasons))
            return None
        if reasons:
            allocation.transport_reason = "; ".join([*reasons, f"using {allocation.transport}"])
            log.info("relay %s: %s", group.key, allocation.transport_reason)
        else:
            allocation.transport_reason = f"{allocation.transport}: first choice"
        self.allocations[group.key] = allocation
        return allocation

    def on_later_transport(self, relays: list[RelayConfig]) -> list[RelayGroup]:
        """The relays whose live (IPv4) allocation goes over a transport listed after
        their first, with nothing under way for them."""
        return [g for g in relay_groups(relays)
                if g.key not in self.pending and self._alive(g.key)
                and self.allocations[g.key].url != g.options[0].url]

    async def retry_first_transports(self, relays: list[RelayConfig],
                                     timeout: float = 3.0) -> bool:
        """Ask each relay on a later transport for an allocation over its first once
        more; one that gives it replaces the old (which retires, see `_retire`). True
        when any did: the relayed candidates changed."""
        moved = False
        for group in self.on_later_transport(relays):
            first = group.options[0]
            try:
                allocation = await self._allocate(first, timeout)
            except Exception as exc:  # any failure means "not yet"
                log.debug("relay %s: still no allocation over %s (%s)", group.key,
                          first.transport, _failure(first, exc, timeout))
                continue
            old = self.allocations.get(group.key)
            if old is None or old.closed or group.key in self.pending:
                # Lost or replaced while we asked: the gathering that follows decides.
                await allocation.close()
                continue
            allocation.transport_reason = (f"{first.transport}: answers again "
                                           f"(was {old.transport})")
            log.info("relay %s: %s answers again: moving from %s to %s:%d", group.key,
                     first.transport, old.transport, *allocation.relayed)
            self.allocations[group.key] = allocation
            self._retire(old)
            moved = True
        return moved

    def drop_moved(self, host_ips: set[str]) -> None:
        """Allocations whose link leaves from an address this host no longer has (it
        moved to another network) are replaced now, not when a Refresh times out
        seconds later: the relay knows them by that address. `ensure` makes new ones."""
        for key, allocation in list(self.allocations.items()):
            local = allocation.local_ip
            if allocation.closed or local is None or local in host_ips:
                continue
            log.info("relay %s: allocation %s:%d left from %s, which this host no longer "
                     "has: allocating again", key, *allocation.relayed, local)
            del self.allocations[key]
            self._retire(allocation)

    def _retire(self, allocation: RelayAllocation) -> None:
        """Close `allocation` after RETIRE_GRACE_S; its proxies carry data till then."""
        allocation.on_lost = None  # its end is ours: no gathering for it
        task = asyncio.create_task(self._close_later(allocation))
        self._retiring[task] = allocation
        task.add_done_callback(lambda done: self._retiring.pop(done, None))

    async def _close_later(self, allocation: RelayAllocation) -> None:
        await asyncio.sleep(RETIRE_GRACE_S)
        for peer in [p for p, proxy in self.proxies.items() if proxy.allocation is allocation]:
            self.drop(peer)
        await allocation.close()

    @staticmethod
    def _option_of(group: RelayGroup, allocation: RelayAllocation) -> RelayConfig:
        return next((o for o in group.options if o.url == allocation.url), group.options[0])

    async def _first_allocation(self, group: RelayGroup,
                                timeout: float) -> tuple[RelayAllocation, list[str]]:
        """The first allocation any of the group's transports gives, and why the ones
        before it gave none. Each transport starts when the one before it failed or has
        had NEXT_TRANSPORT_DELAY_S alone (RFC 8305's attempt delay): where UDP is
        blocked, TCP waits that long, not a whole time-out. The rest are then cancelled
        (or closed, when they finished together)."""
        options = list(group.options)
        running: dict[asyncio.Task[RelayAllocation], tuple[RelayConfig, float]] = {}
        reasons: list[str] = []
        loop = asyncio.get_running_loop()
        delay = min(NEXT_TRANSPORT_DELAY_S, timeout)
        winner: RelayAllocation | None = None
        try:
            start_next = True
            while winner is None:
                if options and (start_next or not running):
                    option = options.pop(0)
                    if running:
                        log.info("relay %s: no answer over %s yet; trying %s beside it",
                                 group.key, ", ".join(o.transport for o, _ in running.values()),
                                 option.url)
                    running[asyncio.create_task(self._allocate(option, timeout))] = (
                        option, loop.time())
                if not running:
                    raise _NoAllocation(reasons)
                done, _ = await asyncio.wait(running, timeout=delay if options else None,
                                             return_when=asyncio.FIRST_COMPLETED)
                start_next = not done  # the delay ran out
                for task in done:
                    option, _started = running[task]
                    exc = task.exception()
                    if exc is not None:
                        del running[task]
                        reasons.append(_failure(option, exc, timeout))
                        start_next = True
                    elif winner is None:
                        del running[task]
                        winner = task.result()
            reasons += [f"{option.transport}: no answer in {loop.time() - started:.1f} s"
                        for task, (option, started) in running.items() if not task.done()]
            return winner, reasons
        finally:
            await _cancel_all(running)

    def _ipv6_result(self, group: RelayGroup, over: RelayConfig,
                     result: RelayAllocation | BaseException, timeout: float) -> None:
        key = group.key + IPV6_KEY
        if not isinstance(result, BaseException):
            result.transport_reason = f"{result.transport}: IPv6 relayed address"
            self.allocations[key] = result
            return
        self.allocations.pop(key, None)
        reason = _failure(over, result, timeout)
        if isinstance(result, stun.TransactionFailed):
            self.no_ipv6.add(group.key)  # 440, or a relay that knows no such request
            log.info("relay %s: no IPv6 relayed address (%s); not asked again", group.key,
                     reason)
        else:
            log.info("relay %s: no IPv6 relayed address: %s", group.key, reason)

    async def _allocate(self, relay: RelayConfig, timeout: float,
                        ipv6: bool = False) -> RelayAllocation:
        """An allocation on `relay` (an IPv6 relayed address when `ipv6`), reaching it
        over the family of the relayed address first, over the other when that has no
        address or route (a failure, not a time-out)."""
        from kbwg.turn.client import RelayAllocation

        tls = tls_context(relay) if relay.transport == "tls" else None
        families = ((socket.AF_INET6, socket.AF_INET) if ipv6
                    else (socket.AF_INET, socket.AF_INET6))
        for family in families:
            try:
                server = await resolve(relay.host, relay.port, family)
                allocation = await RelayAllocation.open(
                    relay.url, server, relay.username or self.user, relay.secret, timeout,
                    transport=relay.transport, tls=tls, server_hostname=relay.host,
                    ipv6=ipv6)
                break
            except TimeoutError:  # the relay is there but silent: the other family too
                raise
            except OSError:  # no address or no route of this family: try the other
                if family == families[-1]:
                    raise
        else:  # pragma: no cover - the last family's failure was raised
            raise OSError(f"relay {relay.url}: no address")
        allocation.receiver = lambda data, peer: self._received(allocation, data, peer)
        allocation.on_lost = self.on_lost
        return allocation

    def candidates(self) -> list[Candidate]:
        alive = sorted((a for a in self.allocations.values() if not a.closed),
                       key=lambda a: a.rtt_ms)
        return [
            Candidate(type="relay", address=a.relayed[0], port=a.relayed[1], interface=None,
                      priority=candidate_priority("relay", 65535 - rank),
                      source=f"relay {a.url} ({a.rtt_ms:.1f} ms)",
                      base=format_endpoint(a.mapped) if a.mapped else None)
            for rank, a in enumerate(alive)
        ]

    def confirm_soon(self) -> None:
        """Have every allocation confirmed now (a path went quiet; see
        RelayAllocation.confirm_soon)."""
        for allocation in self.allocations.values():
            if not allocation.closed:
                allocation.confirm_soon()

    def allocation_for(self, local: Candidate) -> RelayAllocation | None:
        for allocation in self.allocations.values():
            if allocation.relayed == (local.address, local.port) and not allocation.closed:
                return allocation
        return None

    def send(self, data: bytes, dest: Address, local: Candidate) -> None:
        allocation = self.allocation_for(local)
        if allocation is not None:
            allocation.send(data, dest)

    def _received(self, allocation: RelayAllocation, data: bytes, peer: Address) -> None:
        if is_stun(data):
            relayed = allocation.relayed
            local = next((c for c in self.candidates()
                          if (c.address, c.port) == relayed), None)
            if local is not None:
                self.on_stun(data, peer, local)
            return
        proxy = self._by_route.get((allocation.relayed, peer))
        if proxy is not None:
            proxy.from_relay(data)
            return
        # A NAT may show the peer's WireGuard traffic from another port than its checks.
        for proxy in self.proxies.values():
            if proxy.allocation is allocation and proxy.peer[0] == peer[0]:
                proxy.from_relay(data)
                return
        if len(data) == _INITIATION_LEN and data[0] == _INITIATION_TYPE:
            self._keep_initiation((allocation.relayed, peer), data)

    def _keep_initiation(self, route: tuple[Address, Address], data: bytes) -> None:
        self._early.pop(route, None)  # the newest goes last: eviction takes the oldest
        if len(self._early) >= EARLY_INITIATION_ROUTES:
            del self._early[next(iter(self._early))]
        self._early[route] = (time.monotonic(), data)

    def _early_initiation(self, relayed: Address, peer: Address) -> bytes | None:
        """The kept initiation for this route (or from the peer's address through
        another port, as `_received` matches), if it is recent enough."""
        now = time.monotonic()
        found = None
        for route in [r for r in self._early if r[0] == relayed and r[1][0] == peer[0]]:
            at, data = self._early.pop(route)
            if now - at <= EARLY_INITIATION_S and (found is None or at >= found[0]):
                found = (at, data)
        return found[1] if found is not None else None

    async def route(self, peer: str, local: Candidate | None, remote: Address) -> str | None:
        """The WireGuard endpoint for `peer` when its pair starts at our relay candidate
        (a loopback proxy), or None for a direct pair (and any old proxy closes)."""
        from kbwg.agent.relay_proxy import LoopbackProxy, ProxyCounters

        allocation = self.allocation_for(local) if local is not None else None
        current = self.proxies.get(peer)
        if current is not None and current.allocation is allocation and current.peer == remote:
            return current.endpoint
        self.drop(peer)
        if allocation is None:
            return None
        counters = self.proxy_counters.setdefault(allocation.url, ProxyCounters())
        proxy = self.proxies[peer] = await LoopbackProxy.open(allocation, remote, self.wg_port,
                                                              counters)
        self._by_route[(allocation.relayed, remote)] = proxy
        log.info("%s relayed through %s: WireGuard endpoint %s", peer, allocation.url,
                 proxy.endpoint)
        early = self._early_initiation(allocation.relayed, remote)
        if early is not None:
            log.debug("%s: its handshake initiation came before the proxy: passed on", peer)
            proxy.from_relay(early)
        return proxy.endpoint

    def drop(self, peer: str) -> None:
        proxy = self.proxies.pop(peer, None)
        if proxy is not None:
            self._by_route.pop((proxy.allocation.relayed, proxy.peer), None)
            proxy.close()

    def to_json(self) -> list[dict[str, Any]]:
        return [{"url": a.url, "relayed": format_endpoint(a.relayed),
                 "transport": a.transport, "transport_reason": a.transport_reason,
                 "rtt_ms": round(a.rtt_ms, 3), "alive": not a.closed,
                 "sent": a.counters.sent, "received": a.counters.received,
                 "send_errors": a.counters.send_errors, "unhandled": a.unhandled,
                 **self._proxy_json(a.url)}
                for a in self.allocations.values()]

    def _proxy_json(self, url: str) -> dict[str, int]:
        from kbwg.agent.relay_proxy import ProxyCounters

        c = self.proxy_counters.get(url, ProxyCounters())
        return {"proxy_to_peer": c.to_peer, "proxy_to_wireguard": c.to_wireguard,
                "proxy_dropped": c.dropped, "proxy_foreign": c.foreign}

    async def close(self) -> None:
        pending = list(self.pending.values())
        retiring = dict(self._retiring)
        for task in [*pending, *retiring]:
            task.cancel()
        # Their allocations under way close as they are cancelled.
        await asyncio.gather(*pending, *retiring, return_exceptions=True)
        for proxy in self.proxies.values():
            proxy.close()
        self.proxies.clear()
        self._by_route.clear()
        open_ = [*self.allocations.values(), *(a for a in retiring.values() if not a.closed)]
        await asyncio.gather(*(a.close() for a in open_), return_exceptions=True)


class _NoAllocation(Exception):
    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


async def _cancel_all(attempts: Iterable[asyncio.Task[RelayAllocation]]) -> None:
    """Cancel the allocations still under way; close those that came anyway."""
    tasks = list(attempts)
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(*(r.close() for r in results if not isinstance(r, BaseException)),
                         return_exceptions=True)


def _failure(relay: RelayConfig, exc: BaseException, timeout: float) -> str:
    """Why `relay` gave no allocation, in a few words: `udp: no answer in 3 s`."""
    if isinstance(exc, TimeoutError):
        return f"{relay.transport}: no answer in {timeout:g} s"
    return f"{relay.transport}: {exc or type(exc).__name__}"
