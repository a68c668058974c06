"""What this device tells its team: its address (a CLAIM when self-assigned) and its
WireGuard endpoint and key (ANNOUNCE), and moving a self-assigned address that lost a
conflict.

The address and the endpoint to announce are chosen here too, before the device
exists (`pick_dynamic`, `announce_target`); `Presence` keeps them current afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

from kbwg.agent.announce import format_announce
from kbwg.agent.claims import (
    Claim,
    ClaimError,
    format_claim,
    load_previous,
    pick_free_address,
    save_previous,
)
from kbwg.agent.join_options import JoinError, NoAddressToAnnounce
from kbwg.agent.keybase import Channel, KeybaseClient, KeybaseError
from kbwg.agent.owner_calls import OwnerCalls
from kbwg.agent.runtime_state import AgentState
from kbwg.agent.team_view import TeamView
from kbwg.agent.teamconfig import TeamConfig
from kbwg.core.identity import DeviceId
from kbwg.negotiation.candidates import InterfaceSource, gather_host_candidates

log = logging.getLogger(__name__)

ENV_DYNAMIC_SEED = "KBWG_DYNAMIC_SEED"


def pick_dynamic(team: TeamView, me: DeviceId, state_dir: Path,
                 previous: IPv4Address | None = None) -> IPv4Address:
    """A free address of the team's dynamic range (the one used before, when free)."""
    dynamic_range = team.config.dynamic_range
    if dynamic_range is None:
        raise JoinError(f"{me} is not listed in {team.peers_path} and kbwg.json sets no "
                        "dynamic_range; ask a team admin to list this device")
    seed = os.environ.get(ENV_DYNAMIC_SEED)
    # Test-only: seeded by the value alone, so devices sharing a seed draw the same
    # sequence and their first picks collide (tests force conflicts this way).
    rng = random.Random(seed) if seed else random.Random()
    taken = team.claims.taken(time.time(), besides=me) | {e.ip for e in team.entries}
    if previous is None:
        previous = load_previous(state_dir)
    try:
        return pick_free_address(dynamic_range, taken, rng, previous)
    except ClaimError as exc:
        raise JoinError(f"no free address in {dynamic_range}: {exc}; "
                        "ask a team admin for a larger dynamic_range") from exc


def split_endpoint(given: str) -> tuple[str, int | None]:
    """`IP[:PORT]` as (ip, port); port None when none is given."""
    host, sep, port = given.rpartition(":")
    if sep and port.isdigit():
        return host, int(port)
    return given, None


def configured_endpoint(given: str | None, wg_port: int) -> tuple[str, int] | None:
    """`--endpoint IP[:PORT]` as (ip, port), the port defaulting to WireGuard's; None
    without one, or when it is no IPv4 address (it is still announced as given, but
    cannot be a candidate)."""
    if not given:
        return None
    ip, port = split_endpoint(given)
    try:
        IPv4Address(ip)
    except ValueError:
        return None
    port = wg_port if port is None else port
    return (ip, port) if 0 < port < 65536 else None


async def announce_target(given: str | None, config: TeamConfig,
                          addresses: InterfaceSource) -> tuple[str, int]:
    """(ip, port) to announce; port 0 means the WireGuard listen port. `addresses`: the
    host's interface addresses (the device owner's `interfaces`)."""
    if given:
        given_ip, port = split_endpoint(given)
        return given_ip, port or 0
    # The first host candidate: the default route's interface, by the same rule
    # that chooses candidates (the WireGuard device and tunnels excluded).
    hosts = gather_host_candidates(0, config.interface_exclude, [config.overlay],
                                   addresses=await addresses())
    # Announcements carry IPv4 (the prototype's format): IPv6 goes in offers only.
    ip = next((h.address for h in hosts if ":" not in h.address), None)
    if ip is None:
        raise NoAddressToAnnounce(
            "found no IPv4 address to announce; bring up a network interface "
            "or pass --endpoint IP[:PORT]"
        )
    return ip, 0


class Presence:
    """This device's announcements and claims, sent to the team's #announce."""

    def __init__(self, keybase: KeybaseClient, team: TeamView, state: AgentState,
                 owner: OwnerCalls, state_dir: Path, lock: asyncio.Lock) -> None:
        self._keybase = keybase
        self._team = team
        self._state = state
        self._owner = owner
        self._state_dir = state_dir
        # The peer lock: an address move and a peer change never interleave.
        self._lock = lock
        # Our latest ANNOUNCE's message id; None until the first one is sent.
        self.announce_id: int | None = None
        # An announcement (or claim) that could not be sent: sent again at the next
        # refresh, or when Keybase is back.
        self.announce_pending = False
        # Another #announce line sent beside each ANNOUNCE (early_wiring: CANDIDATES).
        self.extra_line: Callable[[], str | None] | None = None
        self._extra: asyncio.Task[int] | None = None

    async def try_announce(self) -> bool:
        """`announce`, keeping a Keybase failure for later instead of raising; whether
        it went out."""
        try:
            await self.announce()
        except KeybaseError as exc:
            if not self.announce_pending:
                log.info("announcement not sent (%s); sending it again once Keybase "
                         "answers", exc)
            self.announce_pending = True
            return False
        self.announce_pending = False
        return True

    async def announce(self) -> None:
        s = self._state
        channel = self._team.announce_channel
        if not s.listed:
            msg_id = await self._keybase.send(channel, format_claim(s.overlay_ip, s.public_key))
            s.my_claim = Claim(s.me, s.overlay_ip, s.public_key, msg_id, time.time())
            save_previous(self._state_dir, s.overlay_ip)
            log.info("claimed %s (message %d)", s.overlay_ip, msg_id)
        ip, _, port = s.announced_endpoint.rpartition(":")
        extra = self.extra_line() if self.extra_line is not None else None
        if extra is not None:
            # Its own message (old agents parse ANNOUNCE as a whole message), started
            # first so that it usually arrives first, and not waited for.
            self._extra = asyncio.create_task(self._send_extra(channel, extra))
        self.announce_id = await self._keybase.send(
            channel, format_announce(ip, int(port), s.public_key))
        log.info("announced %s in #%s", s.announced_endpoint, channel.topic_name)

    async def _send_extra(self, channel: Channel, line: str) -> int:
        try:
            return await self._keybase.send(channel, line)
        except KeybaseError as exc:  # the ANNOUNCE is what matters; this goes next time
            log.info("%s line not sent: %s", line.split(" ", 1)[0], exc)
            return 0

    async def check_my_claim(self) -> None:
        """A self-assigned address that lost a conflict moves; the winner does nothing."""
        # Under the peer lock: the chat listener and the refresh loop both call this, and
        # without it both would see the lost claim (mine changes only after the send) and
        # move twice. PeerSync.sync takes the same lock but is never called from here.
        async with self._lock:
            s = self._state
            if s.my_claim is None:
                return
            rival = self._team.claims.lost(s.my_claim, time.time())
            if rival is None:
                return
            old = s.overlay_ip
            try:
                new = pick_dynamic(self._team, s.me, self._state_dir,
                                   previous=None if rival.ip == old else old)
            except JoinError as exc:
                # Nowhere to move: keep the address (peers that follow the rule reach
                # the rival there) and look again at the next check.
                log.warning("%s also claimed %s, first (message %d < %d), but %s; "
                            "keeping it for now", rival.sender, old, rival.msg_id,
                            s.my_claim.msg_id, exc)
                return
            log.warning("%s also claimed %s, first (message %d < %d): moving to %s",
                        rival.sender, old, rival.msg_id, s.my_claim.msg_id, new)
            prefix = self._team.config.overlay.prefixlen
            await self._owner.set_address(IPv4Interface(f"{new}/{prefix}"))
            s.overlay_ip = new
            save_previous(self._state_dir, new)
            try:
                msg_id = await self._keybase.send(self._team.announce_channel,
                                                  format_claim(new, s.public_key))
            except KeybaseError as exc:
                # No claim to judge until the new one is out (with the announcement).
                s.my_claim = None
                self.announce_pending = True
                log.info("claim of %s not sent (%s); sending it again once Keybase "
                         "answers", new, exc)
                return
            s.my_claim = Claim(s.me, new, s.public_key, msg_id, time.time())

    async def follow_network(self, given: str | None) -> None:
        """After a network change: announce the new endpoint if it moved (unless the
        endpoint was given)."""
        if given is not None:
            return
        ip, _ = await announce_target(None, self._team.config, self._owner.interfaces)
        endpoint = f"{ip}:{self._state.listen_port}"
        if endpoint != self._state.announced_endpoint:
            self._state.announced_endpoint = endpoint
            await self.try_announce()
