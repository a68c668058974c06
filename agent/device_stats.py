"""The device's own view of its peers, polled: handshakes and byte counters into each
peer's state, WireGuard's authenticated roaming followed, and the device's peers
reconciled with what this agent configured (a bug or a hand-run `wg set` never stays).
"""

from __future__ import annotations

import asyncio
import logging

from kbwg.agent.owner_calls import OwnerCalls, PeerCounters
from kbwg.agent.runtime_state import ANNOUNCED, AgentState

log = logging.getLogger(__name__)


class StatsPoll:
    def __init__(self, owner: OwnerCalls, state: AgentState, keepalive_s: int,
                 lock: asyncio.Lock) -> None:
        self._owner = owner
        self._state = state
        self._keepalive_s = keepalive_s
        # The peer lock: a change of WireGuard peers is never seen half made.
        self._lock = lock

    async def poll(self) -> None:
        async with self._lock:
            by_key = (await self._owner.stats()).by_key()
            for peer in self._state.peers.values():
                current = by_key.get(peer.configured_key or "")
                if current is None:
                    continue
                if peer.observe(current.last_handshake, current.rx_bytes, current.tx_bytes):
                    log.info("handshake with %s (%s) over %s", peer.name,
                             peer.spec.overlay_ip, peer.endpoint)
                if peer.endpoint_source == ANNOUNCED and current.endpoint:
                    # WireGuard roams to where the peer's authenticated packets come from.
                    peer.endpoint = current.endpoint
            await self._reconcile(by_key)

    async def _reconcile(self, actual: dict[str, PeerCounters]) -> None:
        """Make the device's peers the ones this agent configured: whatever removed or
        added one by mistake, nothing stays that way."""
        configured = {p.configured_key: p for p in self._state.peers.values()
                      if p.configured_key is not None}
        for key in [k for k in actual if k not in configured]:
            log.warning("the device has a peer with key %s… that this agent did not "
                        "configure; removing it", key[:8])
            await self._owner.remove_peer(key)
        for key, peer in configured.items():
            if key in actual or peer.configured_ip is None:
                continue
            log.warning("%s's peer entry (key %s…) is missing from the device; adding it "
                        "again", peer.name, key[:8])
            await self._owner.set_peer(key, peer.endpoint, [peer.configured_ip],
                                       self._keepalive_s if peer.endpoint else 0)
