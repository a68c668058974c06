"""What this agent knows of its team: kbwg.json, peers.json, and the books fed from
#announce (announcements, claims, which device used which key first).

The team's files are read here (peers.json again at every refresh: the last good
version stays in force), its channels are joined here, and every #announce message,
from the history or the listener, goes into the books through `take_announce`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field

from kbwg.agent.announce import ANNOUNCE_TTL_S, AnnounceBook
from kbwg.agent.announce_candidates import CandidateBook
from kbwg.agent.announce_feed import announce_feed_notes, take_announce_message
from kbwg.agent.claims import ClaimBook
from kbwg.agent.join_options import JoinError
from kbwg.agent.keybase import Channel, ChatMessage, KeybaseClient, KeybaseError
from kbwg.agent.keyowners import KeyBook
from kbwg.agent.peers_file import PeerEntry, PeersError, parse_peers, peers_path
from kbwg.agent.teamconfig import TeamConfig
from kbwg.core.identity import DeviceId
from kbwg.core.loglimit import LimitedLog

log = logging.getLogger(__name__)

# At most this many #announce messages per history read (newest first). Start-up reads
# two hours of it and every refresh (30 s) one hour, each line parsed and its key
# checked again: a member posting without end made every agent of the team read all of
# it, at every refresh. A device posts about 3 lines per re-announcement (every 30 min)
# and a few more when its candidates change: 5000 is two hours of a 250-device team.
# Past it the books keep what they took before (pushes are taken one by one).
HISTORY_MAX_MESSAGES = 5000


@dataclass
class TeamView:
    keybase: KeybaseClient
    team: str
    config: TeamConfig
    # peers.json as last read successfully.
    entries: list[PeerEntry] = field(default_factory=list)
    announcements: AnnounceBook = field(default_factory=AnnounceBook)
    claims: ClaimBook = field(default_factory=ClaimBook)
    keys: KeyBook = field(default_factory=KeyBook)
    # CANDIDATES lines: what peers published for early checks.
    published: CandidateBook = field(default_factory=CandidateBook)
    # Refused lines, which every history read meets again: a member can post them
    # without end.
    notes: LimitedLog = field(default_factory=announce_feed_notes)

    def __post_init__(self) -> None:
        # Keybase team names are case-insensitive and its replies use the canonical
        # lowercase form: so do our paths and channels.
        self.team = self.team.lower()

    def is_team(self, name: str) -> bool:
        return name.lower() == self.team

    @property
    def peers_path(self) -> str:
        return self.peers_path_of(self.team)

    @staticmethod
    def peers_path_of(team: str) -> str:
        """peers.json of `team`, readable before kbwg.json is (start-up reads both at once)."""
        return peers_path(team)

    @property
    def announce_channel(self) -> Channel:
        return Channel(self.team, self.config.announce_channel, "chat")

    @property
    def negotiation_channel(self) -> Channel:
        return Channel(self.team, self.config.negotiation_channel, "dev")

    async def read_peers_file(self, strict: bool,
                              reading: Awaitable[bytes] | None = None) -> None:
        """Read peers.json (or await `reading`, its read already under way). At start-up
        (`strict`) a problem raises JoinError; later the last good version stays in
        force and the problem is logged."""
        try:
            raw = await (reading if reading is not None
                         else self.keybase.fs_read(self.peers_path))
            entries = parse_peers(raw, self.config.overlay)
        except (PeersError, KeybaseError) as exc:
            if strict:
                raise JoinError(f"cannot use {self.peers_path}: {exc}") from exc
            log.warning("keeping the previous peer list: %s", exc)
            return
        self.entries = entries

    async def join_channels(self) -> None:
        """Keybase notifies only members of a conversation: be one before listening.

        One channel after the other: two quick calls on one `chat api` pipe cost less
        at start-up than a second pipe (a process) would."""
        for channel in (self.announce_channel, self.negotiation_channel):
            await self._join(channel)

    async def _join(self, channel: Channel) -> None:
        # On every start but a team's very first the channels exist, so `join` comes
        # first (one call). A channel that does not exist yet is made with newconv,
        # which the real service refuses for a name the team already uses: another
        # device made it meanwhile, so join it after all.
        try:
            await self.keybase.join(channel)
            return
        except KeybaseError as exc:
            log.debug("join %s: %s; creating it", channel, exc)
        try:
            await self.keybase.newconv(channel)
            return
        except KeybaseError as exc:
            log.debug("newconv %s: %s; joining it", channel, exc)
        try:
            await self.keybase.join(channel)
        except KeybaseError as exc:
            log.warning("cannot join %s (%s); new messages may arrive only with the "
                        "periodic history read", channel, exc)

    def take_announce(self, msg: ChatMessage, me: DeviceId) -> bool:
        """One #announce message into the books; True when something changed."""
        return take_announce_message(msg, me, self.announcements, self.claims, self.entries,
                                     self.config.dynamic_range, time.time(), self.keys,
                                     self.published, self.notes)

    def prune(self, now: float) -> None:
        """Forget what has expired from the books. Announcements stay for listed devices
        and live claimants (their peer keeps its key, as before); other devices' expired
        lines are no longer used, and a member posting as ever new devices grew them."""
        listed = {e.device_id for e in self.entries}
        self.claims.prune(now)
        self.announcements.prune(
            now - ANNOUNCE_TTL_S,
            keep=lambda d: d in listed or self.claims.claim_of(d, now) is not None)
        self.published.prune(now - ANNOUNCE_TTL_S)
        self.keys.prune(now)

    async def read_history(self, me: DeviceId, first: bool = False) -> None:
        self.take_history(await self.fetch_history(first), me)

    async def fetch_history(self, first: bool = False) -> list[ChatMessage]:
        """#announce's recent messages, newest first, not yet in the books (start-up
        reads them before it knows who it is or what peers.json says)."""
        # The first read goes back two lifetimes: a device re-announces its key within
        # every lifetime, so the key's first use is seen before any live copy of it.
        since = time.time() - ANNOUNCE_TTL_S * (2 if first else 1)
        messages: list[ChatMessage] = []
        history = self.keybase.read_history(self.announce_channel, since=since)
        try:
            async with contextlib.aclosing(history):
                async for msg in history:
                    if len(messages) >= HISTORY_MAX_MESSAGES:
                        log.warning("#announce: read the newest %d messages only, older "
                                    "ones are left out (a member posting without end?)",
                                    HISTORY_MAX_MESSAGES)
                        break
                    messages.append(msg)
        except KeybaseError as exc:
            # A team that never announced has no #announce yet; our send creates it.
            log.info("no announcement history read: %s", exc)
        return messages

    def take_history(self, messages: list[ChatMessage], me: DeviceId) -> None:
        """Messages from `fetch_history` into the books, in the order read."""
        for msg in messages:
            try:
                self.take_announce(msg, me)
            except Exception:
                # As for a pushed message: one line the books cannot take must not stop
                # start-up or the refresh loop (both read the history) for the rest.
                log.exception("taking message %d from %s/%s in %s failed", msg.id,
                              msg.sender_username, msg.sender_device, msg.channel)
