"""Chat messages to where they belong: #announce lines into the team's books (then a
claim check and a peer sync when something changed), negotiation messages from peers to
the negotiator. Messages from other teams and channels, or from non-peers, are ignored.
"""

from __future__ import annotations

import logging

from kbwg.agent.keybase import ChatMessage
from kbwg.agent.peer_sync import PeerSync
from kbwg.agent.presence import Presence
from kbwg.agent.runtime_state import AgentState
from kbwg.agent.team_view import TeamView
from kbwg.core.identity import DeviceId
from kbwg.negotiation.session import Negotiator

log = logging.getLogger(__name__)


class ChatDispatch:
    def __init__(self, team: TeamView, state: AgentState, presence: Presence,
                 peer_sync: PeerSync, negotiator: Negotiator | None) -> None:
        self._team = team
        self._state = state
        self._presence = presence
        self._peer_sync = peer_sync
        self._negotiator = negotiator

    async def on_message(self, msg: ChatMessage) -> None:
        ch = msg.channel
        if not self._team.is_team(ch.name):
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
            log.info("ignoring negotiation message %d from %s: not a peer of this "
                     "device (not in peers.json, no live claim, or policy)", msg.id, sender)
            return
        await self._negotiator.handle(msg)
