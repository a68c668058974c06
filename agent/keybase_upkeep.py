"""The Keybase side of the joined device's upkeep: what each refresh reads and sends,
skipped while Keybase is away, and the catch-up once it is back.

While Keybase is away nothing about the peers changes: the WireGuard device, its peers
and their paths stay exactly as they are (no refresh, no sync: an announcement that
expires meanwhile cannot remove a peer), and only a cheap probe per refresh asks
whether it is back. When it is (the listener subscribed again, or a probe answered):
peers.json and kbwg.json are read again, #announce's history and the dev channel's
recent messages are taken (the service does not replay what it did not push), an
announcement that could not be sent goes out, and peers that never answered an offer
are offered to again.
"""

from __future__ import annotations

import logging

from kbwg.agent.chat_dispatch import ChatDispatch
from kbwg.agent.keybase import KeybaseClient, KeybaseError
from kbwg.agent.peer_sync import PeerSync
from kbwg.agent.presence import Presence
from kbwg.agent.runtime_state import AgentState
from kbwg.agent.team_view import TeamView
from kbwg.agent.teamconfig import TeamConfigError, load_team_config, team_config_path
from kbwg.negotiation.session import Negotiator

log = logging.getLogger(__name__)


class KeybaseUpkeep:
    def __init__(self, team: TeamView, state: AgentState, presence: Presence,
                 peer_sync: PeerSync, chat: ChatDispatch | None,
                 negotiator: Negotiator | None) -> None:
        self._team = team
        self._state = state
        self._presence = presence
        self._peer_sync = peer_sync
        self._chat = chat
        self._negotiator = negotiator

    @property
    def _keybase(self) -> KeybaseClient:
        return self._team.keybase

    async def refresh(self, reannounce: bool) -> bool:
        """One refresh's reads and sends (and the peer sync); False, with nothing
        changed, while Keybase is away. Returns whether an asked-for re-announcement
        went out."""
        if not self._keybase.link.connected and not await self._keybase.probe():
            return False
        await self._team.read_peers_file(strict=False)
        await self._team.read_history(self._state.me)
        await self.reread()
        announced = False
        if reannounce or self._presence.announce_pending:
            announced = await self._presence.try_announce()
        await self._presence.check_my_claim()
        await self._peer_sync.sync()
        return announced

    async def reread(self) -> None:
        """The dev channel's recent messages that no push brought."""
        if self._chat is not None:
            await self._chat.reread()

    async def follow(self) -> None:
        """Catch up each time Keybase is back; runs until cancelled."""
        while True:
            await self._keybase.link.wait_back()
            try:
                await self.catch_up()
            except KeybaseError as exc:
                # Gone again already: the next reconnection catches up.
                log.info("catching up with Keybase stopped: %s", exc)

    async def catch_up(self) -> None:
        team = self._team
        await team.read_peers_file(strict=False)
        await self._check_config()
        await team.read_history(self._state.me)
        await self.reread()
        if self._presence.announce_pending:
            await self._presence.try_announce()
        await self._presence.check_my_claim()
        await self._peer_sync.sync()
        if self._negotiator is not None:
            for session in list(self._negotiator.sessions.values()):
                # Our offers may have been lost with Keybase: offer once more.
                if session.state == "unanswered":
                    log.info("offering to %s again now that Keybase is back", session.peer)
                    await self._negotiator.offer(session)
        log.info("caught up with Keybase")

    async def _check_config(self) -> None:
        path = team_config_path(self._team.team)
        try:
            config = await load_team_config(self._keybase, self._team.team)
        except (TeamConfigError, KeybaseError) as exc:
            log.warning("cannot use %s (%s); the running settings stay", path, exc)
            return
        if config != self._team.config:
            log.warning("%s changed while Keybase was away: its settings are fixed while "
                        "the agent runs; restart it to apply them", path)
