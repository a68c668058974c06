"""The agent's relayed candidates and relayed data paths.

One allocation per configured relay gives one relayed candidate (the lowest-RTT relay
gets the highest priority). Connectivity checks from a relayed candidate go out through
its allocation; what comes back is STUN (handed to the check dispatcher) or WireGuard
data (handed to the loopback proxy of the peer it comes from).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kbwg.agent.relay_proxy import LoopbackProxy, ProxyCounters
from kbwg.agent.teamconfig import RelayConfig
from kbwg.core.stun import is_stun
from kbwg.negotiation.candidates import Candidate, candidate_priority
from kbwg.negotiation.stun_client import resolve
from kbwg.turn.client import Address, RelayAllocation

log = logging.getLogger(__name__)


StunHandler = Callable[[bytes, Address, Candidate], None]


@dataclass
class RelayPaths:
    user: str
    wg_port: int
    on_stun: StunHandler
    on_lost: Callable[[RelayAllocation], None]
    allocations: dict[str, RelayAllocation] = field(default_factory=dict)  # by relay URL
    proxies: dict[str, LoopbackProxy] = field(default_factory=dict)  # by peer name
    # By relay URL, shared by the proxies of its allocations: outlives each proxy, so
    # status shows what every relayed peer passed, dropped or refused since start.
    proxy_counters: dict[str, ProxyCounters] = field(default_factory=dict)
    # The same proxies by (our relayed address, peer address): one lookup per datagram.
    _by_route: dict[tuple[Address, Address], LoopbackProxy] = field(default_factory=dict)

    def missing(self, relays: list[RelayConfig]) -> list[RelayConfig]:
        """The configured relays without a live allocation."""
        return [r for r in relays
                if r.url not in self.allocations or self.allocations[r.url].closed]

    async def ensure(self, relays: list[RelayConfig], timeout: float = 3.0) -> None:
        """An allocation on every configured relay that has none alive."""
        missing = self.missing(relays)
        results = await asyncio.gather(*(self._allocate(r, timeout) for r in missing),
                                       return_exceptions=True)
        for relay, result in zip(missing, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("relay %s: no allocation: %s", relay.url,
                            result or type(result).__name__)
                self.allocations.pop(relay.url, None)
            else:
                self.allocations[relay.url] = result

    async def _allocate(self, relay: RelayConfig, timeout: float) -> RelayAllocation:
        server = await resolve(relay.host, relay.port)
        allocation = await RelayAllocation.open(
            relay.url, server, relay.username or self.user, relay.secret, timeout)
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
                      base=f"{a.mapped[0]}:{a.mapped[1]}" if a.mapped else None)
            for rank, a in enumerate(alive)
        ]

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

    async def route(self, peer: str, local: Candidate | None, remote: Address) -> str | None:
        """The WireGuard endpoint for `peer` when its pair starts at our relay candidate
        (a loopback proxy), or None for a direct pair (and any old proxy closes)."""
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
        return proxy.endpoint

    def drop(self, peer: str) -> None:
        proxy = self.proxies.pop(peer, None)
        if proxy is not None:
            self._by_route.pop((proxy.allocation.relayed, proxy.peer), None)
            proxy.close()

    def to_json(self) -> list[dict[str, Any]]:
        return [{"url": a.url, "relayed": f"{a.relayed[0]}:{a.relayed[1]}",
                 "rtt_ms": round(a.rtt_ms, 3), "alive": not a.closed,
                 "sent": a.counters.sent, "received": a.counters.received,
                 "send_errors": a.counters.send_errors, "unhandled": a.unhandled,
                 **self._proxy_json(a.url)}
                for a in self.allocations.values()]

    def _proxy_json(self, url: str) -> dict[str, int]:
        c = self.proxy_counters.get(url, ProxyCounters())
        return {"proxy_to_peer": c.to_peer, "proxy_to_wireguard": c.to_wireguard,
                "proxy_dropped": c.dropped, "proxy_foreign": c.foreign}

    async def close(self) -> None:
        for proxy in self.proxies.values():
            proxy.close()
        self.proxies.clear()
        self._by_route.clear()
        await asyncio.gather(*(a.close() for a in self.allocations.values()),
                             return_exceptions=True)
