"""The joined device's background loops: the periodic refresh (peers.json, #announce
history, re-announcing, claim check, peer sync, missing relays), the stats poll, and
the network watch that re-gathers candidates and renegotiates after a change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

from kbwg.agent.connectivity import Connectivity
from kbwg.agent.device_stats import StatsPoll
from kbwg.agent.join_options import JoinOptions
from kbwg.agent.netwatch import NetworkWatcher
from kbwg.agent.peer_sync import PeerSync
from kbwg.agent.presence import Presence
from kbwg.agent.runtime_state import AgentState
from kbwg.agent.team_view import TeamView
from kbwg.negotiation.session import Negotiator

log = logging.getLogger(__name__)

# The refresh loop's first pass comes early: it covers messages sent while the
# listener was still starting.
FIRST_REFRESH_S = 2.0


class Upkeep:
    def __init__(self, options: JoinOptions, team: TeamView, state: AgentState,
                 presence: Presence, peer_sync: PeerSync, stats: StatsPoll, paths: Connectivity,
                 negotiator: Negotiator | None) -> None:
        self._options = options
        self._team = team
        self._state = state
        self._presence = presence
        self._peer_sync = peer_sync
        self._stats = stats
        self._paths = paths
        self._negotiator = negotiator

    def loops(self) -> dict[str, Coroutine[Any, Any, None]]:
        """The loops by name; each runs until cancelled."""
        return {"refresh": self._refresh(), "stats": self._poll_stats(),
                "netwatch": self._watch_network()}

    async def _refresh(self) -> None:
        """Safety net for missed notifications, peers.json edits and announcement expiry."""
        last_announce = time.monotonic()
        delays = [FIRST_REFRESH_S]
        while True:
            await asyncio.sleep(delays.pop() if delays else self._options.refresh_s)
            await self._team.read_peers_file(strict=False)
            await self._team.read_history(self._state.me)
            if time.monotonic() - last_announce >= self._options.reannounce_s:
                await self._presence.announce()
                last_announce = time.monotonic()
            await self._presence.check_my_claim()
            await self._peer_sync.sync()
            if self._paths.relays_missing():
                # A relay that was down (or forgot our allocation) may be back.
                await self.on_network_change()

    async def _poll_stats(self) -> None:
        while True:
            await self._stats.poll()
            await asyncio.sleep(self._options.stats_s)

    async def _watch_network(self) -> None:
        watcher = NetworkWatcher(self.on_network_change,
                                 ignore_ifnames=[self._options.interface])
        await watcher.run()

    async def on_network_change(self) -> None:
        """Also after a lost relay: consent checks move each peer off it within seconds;
        a fresh allocation and a renegotiation bring a relayed path back."""
        if not await self._paths.regather():
            return
        log.info("network changed: candidates now %s; renegotiating", ", ".join(sorted(
            f"{c.type} {c.address}:{c.port}" for c in self._paths.local.candidates)) or "none")
        await self._presence.follow_network(self._options.endpoint)
        if self._negotiator is not None:
            await self._negotiator.restart_all()
