"""The device's own view of its peers, polled: handshakes and byte counters into each
peer's state, WireGuard's authenticated roaming followed, the device's peers reconciled
with what this agent configured (a bug or a hand-run `wg set` never stays), and traffic
told to each peer's checks (`on_traffic`), whose consent pace follows it.

A poll is a round trip to the device owner, so it comes every `stats_s` (5 s). Between
polls the WireGuard interface's own packet counters (/proc/self/net/dev, readable
without privilege, a few tens of microseconds) are looked at every `WATCH_S`: they count
only the tunnel's inner packets, never keepalives or handshakes, so when they move while
a peer is idle, traffic has (probably) started to it and the poll comes at once, so its
checks speed up within about half a second rather than up to 5 s later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from kbwg.agent.owner_calls import OwnerCalls, PeerCounters
from kbwg.agent.runtime_state import ANNOUNCED, AgentState
from kbwg.core.identity import DeviceId

log = logging.getLogger(__name__)

# Told after a poll for each peer whose counters moved by more than keepalives do.
TrafficFn = Callable[[DeviceId], None]
NET_DEV = "/proc/self/net/dev"
WATCH_S = 0.5
# Early polls (the interface moved while a peer is idle) at most this often; while one
# finds nothing new (traffic to a peer already known busy), the spacing doubles up to
# the poll interval, and comes back once the interface is quiet for a look.
EARLY_MIN_S = 1.0


def interface_packets(name: str, path: str = NET_DEV) -> int | None:
    """Packets received plus sent on interface `name` in this network namespace; None
    when it is not there or the file is unreadable."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError:
        return None
    wanted = name.encode()
    for line in text.split(b"\n")[2:]:
        iface, sep, rest = line.partition(b":")
        if sep and iface.strip() == wanted:
            fields = rest.split()
            try:
                return int(fields[1]) + int(fields[9])
            except (IndexError, ValueError):
                return None
    return None


class StatsPoll:
    def __init__(self, owner: OwnerCalls, state: AgentState, keepalive_s: int,
                 lock: asyncio.Lock, on_traffic: TrafficFn | None = None,
                 active_window: float = 30.0, net_dev: str = NET_DEV) -> None:
        self._owner = owner
        self._state = state
        self._keepalive_s = keepalive_s
        # The peer lock: a change of WireGuard peers is never seen half made.
        self._lock = lock
        self._on_traffic = on_traffic
        # How long traffic keeps a peer's checks at full pace (CheckTimers.active_window).
        self._active_window = active_window
        self._net_dev = net_dev
        self._early_gap = EARLY_MIN_S
        self.early_polls = 0

    async def poll(self) -> int:
        """One poll; the number of idle peers it found traffic to."""
        woken = 0
        async with self._lock:
            by_key = (await self._owner.stats()).by_key()
            now = time.monotonic()
            for device, peer in self._state.peers.items():
                current = by_key.get(peer.configured_key or "")
                if current is None:
                    continue
                was_busy = peer.busy(now, self._active_window)
                before = peer.traffic_at
                first = peer.observe(current.last_handshake, current.rx_bytes,
                                     current.tx_bytes, now)
                if peer.traffic_at != before:
                    woken += not was_busy
                    if self._on_traffic is not None:
                        self._on_traffic(device)
                if first:
                    # The higher-keyed end of a fresh path may not have set the endpoint
                    # yet (peer_sync holds it): WireGuard's own is where it answered.
                    log.info("handshake with %s (%s) over %s", peer.name,
                             peer.spec.overlay_ip, peer.endpoint or current.endpoint)
                if peer.endpoint_source == ANNOUNCED and current.endpoint:
                    # WireGuard roams to where the peer's authenticated packets come from.
                    peer.endpoint = current.endpoint
            await self._reconcile(by_key)
        return woken

    async def run(self, every_s: float) -> None:
        """Poll every `every_s`, and early when traffic starts (`watch`); until
        cancelled."""
        early = False
        while True:
            woken = await self.poll()
            if early:
                self.early_polls += 1
                # Nothing new (traffic to a peer known busy, or no peer's at all): the
                # next early poll waits twice as long.
                self._early_gap = (EARLY_MIN_S if woken
                                   else min(self._early_gap * 2, every_s))
            early = await self.watch(every_s)

    async def watch(self, seconds: float) -> bool:
        """Wait `seconds`; True as soon as the interface's packet counters move while a
        peer with a path is idle (at least `_early_gap` after the last poll)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + seconds
        last = interface_packets(self._state.interface, self._net_dev)
        moved = False
        while (left := deadline - loop.time()) > 0:
            await asyncio.sleep(min(WATCH_S, left))
            current = interface_packets(self._state.interface, self._net_dev)
            if current is None or current == last:
                self._early_gap = EARLY_MIN_S  # quiet: the next traffic is news
            else:
                moved, last = True, current
            if moved and loop.time() - start >= self._early_gap and self._idle_peer():
                return True
        return False

    def _idle_peer(self) -> bool:
        now = time.monotonic()
        return any(peer.endpoint is not None and not peer.busy(now, self._active_window)
                   for peer in self._state.peers.values())

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
