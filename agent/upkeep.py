"""The joined device's background loops: the periodic refresh (peers.json, #announce
history, re-announcing, claim check, peer sync, missing relays), unanswered STUN servers
asked again, relays reached over a stream asked over UDP again, the stats poll, the
network watch (the device owner's `network` events, kbwg.agent.netwatch) that re-gathers
candidates and renegotiates after a change, and the wake watch (the machine slept:
kbwg.agent.wake_watch); and the same repair when a peer's chosen pair goes quiet
(`on_path_lost`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

from kbwg.agent.chat_dispatch import ChatDispatch
from kbwg.agent.connectivity import Connectivity
from kbwg.agent.device_stats import StatsPoll
from kbwg.agent.join_options import JoinOptions
from kbwg.agent.keybase_upkeep import KeybaseUpkeep
from kbwg.agent.netwatch import NetworkWatcher
from kbwg.agent.owner_calls import OwnerCalls
from kbwg.agent.owner_client import OwnerError
from kbwg.agent.peer_sync import PeerSync
from kbwg.agent.presence import Presence
from kbwg.agent.runtime_state import AgentState
from kbwg.agent.team_view import TeamView
from kbwg.agent.wake_watch import WakeWatch
from kbwg.core.identity import DeviceId
from kbwg.negotiation.session import Negotiator

log = logging.getLogger(__name__)

# The refresh loop's first pass comes early: it covers messages sent while the
# listener was still starting.
FIRST_REFRESH_S = 2.0
# STUN servers that did not answer are asked again after this, doubling up to the max.
STUN_RETRY_FIRST_S = 2.0
STUN_RETRY_MAX_S = 30.0
# A relay reached over TCP or TLS, with UDP listed first, is asked over UDP again after
# this, doubling up to the max while UDP still gets no answer.
RELAY_RETRY_FIRST_S = 15.0
RELAY_RETRY_MAX_S = 300.0
# A peer whose path keeps dying (gone offline, flapping) is renegotiated at most this often.
LOST_PATH_SPACING_S = 2.0
# Kernel WireGuard drops its session keys itself when the machine suspends
# (wg_pm_notification); wireguard-go does not.
KERNEL_BACKEND = "kernel"


class Upkeep:
    def __init__(self, options: JoinOptions, team: TeamView, state: AgentState,
                 presence: Presence, peer_sync: PeerSync, stats: StatsPoll, paths: Connectivity,
                 negotiator: Negotiator | None, chat: ChatDispatch | None = None, *,
                 owner: OwnerCalls) -> None:
        self._options = options
        self._team = team
        self._state = state
        self._presence = presence
        self._peer_sync = peer_sync
        self._stats = stats
        self._paths = paths
        self._negotiator = negotiator
        self._owner = owner
        self._keybase = KeybaseUpkeep(team, state, presence, peer_sync, chat, negotiator)
        self._lost_at: dict[DeviceId, float] = {}
        # WireGuard told to pick its source addresses anew (an address went), if under way.
        self._forgetting: asyncio.Task[None] | None = None
        if negotiator is not None:
            negotiator.on_restart = self.on_peer_restart

    def loops(self) -> dict[str, Coroutine[Any, Any, None]]:
        """The loops by name; each runs until cancelled."""
        return {"refresh": self._refresh(), "stun": self._ask_stun_again(),
                "relays": self._retry_relay_transports(),
                "stats": self._poll_stats(),
                "netwatch": self._watch_network(), "keybase": self._keybase.follow(),
                "wake": WakeWatch(self.on_wake).run()}

    async def _refresh(self) -> None:
        """Safety net for missed notifications, peers.json edits and announcement expiry."""
        last_announce = time.monotonic()
        delays = [FIRST_REFRESH_S]
        while True:
            await asyncio.sleep(delays.pop() if delays else self._options.refresh_s)
            # peers.json, the histories, (re-)announcing, claim check and peer sync; all
            # of it left alone while Keybase is away (keybase_upkeep).
            due = time.monotonic() - last_announce >= self._options.reannounce_s
            try:
                if await self._keybase.refresh(due):
                    last_announce = time.monotonic()
                if self._paths.relays_missing():
                    # A relay that was down (or forgot our allocation) may be back.
                    await self.on_network_change()
            except Exception:
                # One pass that fails (a bug, or a team input nothing else refused) must
                # not stop the agent, and with it every peer's path: the next pass may
                # go better.
                log.exception("refresh failed (please report this with the trace); the "
                              "next one comes in %.0fs", self._options.refresh_s)

    async def _ask_stun_again(self) -> None:
        """STUN servers that did not answer the last gathering are asked again, soon and
        then less often (`STUN_RETRY_FIRST_S` doubling to `STUN_RETRY_MAX_S`): at boot
        the address often comes up before DNS, and nothing on the host changes when DNS
        does, so no network event would make us ask; without an answer a NATed device
        announces only its private address."""
        wait = STUN_RETRY_FIRST_S
        while True:
            await asyncio.sleep(wait)
            if not self._paths.stun_unanswered():
                wait = STUN_RETRY_FIRST_S
                continue
            if wait == STUN_RETRY_FIRST_S:
                log.info("no STUN server answered the last gathering: asking again now, "
                         "then less and less often (up to every %.0fs)", STUN_RETRY_MAX_S)
            try:
                await self._regather("a STUN server answered again")
            except Exception:
                # As for a network change: the next try may go better.
                log.exception("asking the STUN servers again failed")
            wait = min(wait * 2, STUN_RETRY_MAX_S)

    async def _retry_relay_transports(self) -> None:
        """A relay reached over a stream because UDP got no answer (a network that let
        no UDP out, or one answer lost at start-up) is asked over UDP again, soon and
        then less often (`RELAY_RETRY_FIRST_S` doubling to `RELAY_RETRY_MAX_S`); once it
        answers, the relayed paths move to the UDP allocation."""
        wait = RELAY_RETRY_FIRST_S
        while True:
            await asyncio.sleep(wait)
            if not self._paths.relays_on_later_transport():
                wait = RELAY_RETRY_FIRST_S
                continue
            try:
                moved = await self._paths.retry_relay_transports()
                if moved:
                    await self._regather("a relay answers over UDP again")
            except Exception:
                # As for a network change: the next try may go better.
                log.exception("asking a relay over UDP again failed")
                moved = False
            wait = RELAY_RETRY_FIRST_S if moved else min(wait * 2, RELAY_RETRY_MAX_S)

    async def _poll_stats(self) -> None:
        await self._stats.run(self._options.stats_s)

    async def _watch_network(self) -> None:
        watcher = NetworkWatcher(self.on_network_change, on_address_gone=self.on_address_gone)
        # The owner's events other than `stun` come through the shared port's pump.
        self._paths.shared_port.on_other_event = watcher.on_event
        await watcher.run(self._owner.watch_network)

    async def on_network_change(self) -> None:
        """Also after a lost relay: consent checks move each peer off it within seconds;
        a fresh allocation and a renegotiation bring a relayed path back."""
        await self._regather("network changed")
        # Pushes may have been lost while the network moved.
        await self._keybase.reread()

    def on_address_gone(self) -> None:
        """An address of the host went (another network, at once, not after the network
        settles): WireGuard must stop sending from it (PeerSync.forget_sources)."""
        if self._forgetting is None or self._forgetting.done():
            self._forgetting = asyncio.create_task(self._forget_sources())

    async def _forget_sources(self) -> None:
        try:
            await self._peer_sync.forget_sources()
        except OwnerError as exc:
            log.debug("WireGuard's source addresses not renewed: %s", exc)

    async def on_wake(self, slept_s: float) -> None:
        """The machine slept (wake_watch): the peers gave up on this device meanwhile,
        whatever its own timers think. Fresh WireGuard sessions, candidates gathered
        again (the NAT's mappings and relay allocations may be gone, the network may be
        another), every peer renegotiated and the team's news read."""
        log.warning("this machine slept for about %.0fs: starting fresh WireGuard sessions "
                    "and checking every path again", slept_s)
        if self._state.backend != KERNEL_BACKEND:
            await self._peer_sync.renew_sessions()
        if not await self._regather("woke from sleep") and self._negotiator is not None:
            await self._negotiator.restart_all()
        # The refresh loop's timer stopped with the clock: what the team said meanwhile
        # (new keys, peers.json) is read now, not up to `refresh_s` later.
        await self._keybase.refresh(False)

    async def on_path_lost(self, peer: DeviceId, fell_back: bool) -> None:
        """The chosen pair to `peer` went quiet. Our NAT may have a new public address
        (nothing on this host changed, so no network event says so): STUN again at
        once, and renegotiate with everyone if our candidates changed; else with this
        peer, unless another pair already took over."""
        now = asyncio.get_running_loop().time()
        if now - self._lost_at.get(peer, -LOST_PATH_SPACING_S) < LOST_PATH_SPACING_S:
            return
        # Only the spacing's window matters: peers that come and go (claimed devices)
        # would otherwise stay here for good.
        self._lost_at = {p: t for p, t in self._lost_at.items()
                         if now - t < LOST_PATH_SPACING_S}
        self._lost_at[peer] = now
        if await self._regather(f"path to {peer} lost"):
            return
        if not fell_back and self._negotiator is not None \
                and await self._negotiator.restart(peer):
            log.info("path to %s lost, candidates unchanged: renegotiating with it", peer)

    async def on_peer_restart(self, peer: DeviceId) -> None:
        """`peer` renegotiates because its path to us went quiet; ours to it likely did
        too, whether or not our checks noticed yet (answering replaces them). As for a
        lost path: STUN again before the answer goes, so that it does not carry a
        public address our NAT no longer has, but leave that peer's offer standing."""
        await self.on_path_lost(peer, fell_back=True)

    async def _regather(self, why: str) -> bool:
        """Gather again; when the candidates changed, tell the team and renegotiate with
        every peer (True)."""
        if not await self._paths.regather():
            return False
        log.info("%s: candidates now %s; renegotiating", why, ", ".join(sorted(
            f"{c.type} {c.address}:{c.port}" for c in self._paths.local.candidates)) or "none")
        if self._paths.public_endpoint() is None:
            # With a public endpoint, the end of the gathering announces it if it moved
            # (JoinedDevice's trickle hook); without one, the host address is it.
            await self._presence.follow_network(self._options.endpoint)
        if self._negotiator is not None:
            await self._negotiator.restart_all()
        return True
