"""Chat messages to where they belong: #announce lines into the team's books (then a
claim check and a peer sync when something changed), negotiation messages from peers to
the negotiator. Messages from other teams and channels, or from non-peers, are ignored.

Each message is taken once, by conversation and message id, whichever way it came: the
listener's push or `reread`. The real service does not replay pushes missed while its
client reconnects (nor ones simply lost), so the dev channel's recent history is read
again at every refresh, after a network change and when Keybase is back.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time

from kbwg.agent.keybase import (
    Channel,
    ChatMessage,
    KeybaseClient,
    KeybaseError,
    KeybaseRateLimited,
    KeybaseUnavailable,
)
from kbwg.agent.peer_sync import PeerSync
from kbwg.agent.presence import Presence
from kbwg.agent.runtime_state import AgentState
from kbwg.agent.team_view import TeamView
from kbwg.core.identity import DeviceId
from kbwg.core.loglimit import LimitedLog
from kbwg.negotiation.replay import DEFAULT_WINDOW_S
from kbwg.negotiation.session import Negotiator

log = logging.getLogger(__name__)

# Older negotiation messages are refused as stale anyway (the replay guard's window).
REREAD_WINDOW_S = DEFAULT_WINDOW_S
# Bounds one re-read (newest first): a team's negotiation traffic in the window is far less.
REREAD_MAX_MESSAGES = 200
SEEN_MAX = 4096


class SeenMessages:
    """Message ids taken, per conversation; the oldest forgotten past `cap` (by then far
    outside any re-read)."""

    def __init__(self, cap: int = SEEN_MAX) -> None:
        self._cap = cap
        self._seen: collections.OrderedDict[tuple[str, int], None] = collections.OrderedDict()

    def __contains__(self, msg: ChatMessage) -> bool:
        return (msg.conversation_id, msg.id) in self._seen

    def first_time(self, msg: ChatMessage) -> bool:
        """Record `msg`; whether it was new."""
        key = (msg.conversation_id, msg.id)
        if key in self._seen:
            return False
        self._seen[key] = None
        while len(self._seen) > self._cap:
            self._seen.popitem(last=False)
        return True


async def post_or_drop(keybase: KeybaseClient, channel: Channel, text: str) -> None:
    """Send a negotiation message; while Keybase is away (or rate-limits us past its
    retries) it is dropped: offers are resent on their own, and the catch-up offers
    again to peers that never answered."""
    try:
        await keybase.send(channel, text)
    except (KeybaseUnavailable, KeybaseRateLimited) as exc:
        log.debug("negotiation message to %s not sent: %s", channel, exc)


class ChatDispatch:
    def __init__(self, team: TeamView, state: AgentState, presence: Presence,
                 peer_sync: PeerSync, negotiator: Negotiator | None) -> None:
        self._team = team
        self._state = state
        self._presence = presence
        self._peer_sync = peer_sync
        self._negotiator = negotiator
        self.seen = SeenMessages()
        # Lines about messages from non-peers: any team member can post them without end.
        self._notes = LimitedLog(log)

    async def on_message(self, msg: ChatMessage) -> None:
        ch = msg.channel
        if not self._team.is_team(ch.name):
            return
        if not self.seen.first_time(msg):
            log.debug("message %d in %s taken already", msg.id, ch)
            return
        if ch.topic_type == "chat" and ch.topic_name == self._team.announce_channel.topic_name:
            if self._team.take_announce(msg, self._state.me):
                await self._presence.check_my_claim()
                await self._peer_sync.sync()
        elif (ch.topic_type == "dev"
              and ch.topic_name == self._team.negotiation_channel.topic_name):
            await self._on_negotiation(msg)

    async def _on_negotiation(self, msg: ChatMessage) -> None:
        if self._negotiator is None:
            return
        sender = DeviceId(msg.sender_username, msg.sender_device)
        if sender == self._state.me:
            return
        if sender not in self._state.peers:
            self._notes.log(logging.INFO, "ignoring negotiation message %d from %s: not a "
                            "peer of this device (not in peers.json, no live claim, or "
                            "policy)", msg.id, sender)
            return
        await self._negotiator.handle(msg)


    async def reread(self) -> int:
        """Take the dev channel's recent messages that no push brought; how many."""
        channel = self._team.negotiation_channel
        missed: list[ChatMessage] = []
        count = 0
        history = self._team.keybase.read_history(channel, since=time.time() - REREAD_WINDOW_S)
        try:
            async with contextlib.aclosing(history):
                async for msg in history:
                    count += 1
                    sender = DeviceId(msg.sender_username, msg.sender_device)
                    if msg not in self.seen and sender != self._state.me:
                        missed.append(msg)
                    if count >= REREAD_MAX_MESSAGES:
                        break
        except KeybaseError as exc:
            log.debug("%s not read again: %s", channel, exc)
            return 0
        for msg in reversed(missed):  # oldest first, as they were sent
            if msg in self.seen:
                continue  # pushed while we were reading
            log.info("message %d from %s/%s in %s was not pushed; taken from the history",
                     msg.id, msg.sender_username, msg.sender_device, channel)
            try:
                await self.on_message(msg)
            except Exception:
                # As for a pushed message: one bad message must not stop the rest.
                log.exception("handling message %d from %s/%s failed", msg.id,
                              msg.sender_username, msg.sender_device)
        return len(missed)
