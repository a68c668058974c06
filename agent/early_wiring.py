"""Early checks wired into a joined device: the manager (early_checks.py) told of peers by
PeerSync, its choices given to PeerSync like a session's, its view given to `status`, and
our candidates published beside each ANNOUNCE (a CANDIDATES line).

Only with negotiation on: an agent that does not negotiate stands for an older agent,
which neither publishes candidates nor answers early checks. `KBWG_EARLY_CHECKS=off`
turns them off too (to compare, or should they ever get in the way).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from nacl.public import PrivateKey

from kbwg.agent.announce_candidates import format_candidates
from kbwg.agent.connectivity import Connectivity, RegisteredChecker
from kbwg.agent.early_checks import EarlyChecks
from kbwg.agent.keybase import KeybaseError
from kbwg.agent.peer_sync import PeerSync, Spawn
from kbwg.agent.presence import Presence
from kbwg.agent.runtime_state import AgentState
from kbwg.agent.team_view import TeamView
from kbwg.core.identity import DeviceId
from kbwg.negotiation.candidate_pairs import CandidatePair
from kbwg.negotiation.session import Negotiator
from kbwg.negotiation.wire import CandidateInfo

log = logging.getLogger(__name__)

ENV_EARLY_CHECKS = "KBWG_EARLY_CHECKS"
# Our candidates changed after an announcement: the line goes alone after this, unless
# an announcement (which carries one) went meanwhile, as it does when STUN answers late.
# Short: the relay allocation usually completes just after the first announcement, and
# a peer behind a symmetric NAT early-checks our relayed candidate only once it has it
# (before the offer, which comes one chat delivery later). At worst one line more.
REPUBLISH_WAIT_S = 0.1


@dataclass
class CandidatesLine:
    """Our CANDIDATES line: sent with every ANNOUNCE, and alone when gathering finds
    more after it (STUN answering while the first announcement is being sent)."""

    team: TeamView
    state: AgentState
    candidates: Callable[[], list[CandidateInfo]]
    spawn: Spawn
    sent: str | None = None  # the last line sent (or being sent)
    announced: bool = False
    pending: asyncio.TimerHandle | None = None

    def line(self) -> str | None:
        """For Presence: the line to send beside the ANNOUNCE."""
        self.announced = True
        self.sent = format_candidates(self.state.public_key, self.candidates())
        return self.sent

    def changed(self) -> None:
        """Our candidates changed: an ANNOUNCE went out already, so the line goes
        alone (the announced endpoint follows its own rules)."""
        if self.announced and self.pending is None:
            self.pending = asyncio.get_running_loop().call_later(
                REPUBLISH_WAIT_S, self._republish)

    def _republish(self) -> None:
        self.pending = None
        line = format_candidates(self.state.public_key, self.candidates())
        if line is None or line == self.sent:
            return
        self.sent = line
        self.spawn(self._send(line))

    async def _send(self, line: str) -> None:
        try:
            await self.team.keybase.send(self.team.announce_channel, line)
        except KeybaseError as exc:  # the next announcement carries it
            log.info("candidates not published: %s", exc)


def attach_early_checks(paths: Connectivity, peer_sync: PeerSync, presence: Presence,
                        negotiator: Negotiator | None, team: TeamView, state: AgentState,
                        private_key: PrivateKey, spawn: Spawn) -> EarlyChecks | None:
    if negotiator is None:
        return None
    if os.environ.get(ENV_EARLY_CHECKS, "").strip().lower() in ("off", "0", "no"):
        log.info("early checks off (%s)", ENV_EARLY_CHECKS)
        return None

    def session_of(device: DeviceId) -> tuple[object | None, bool]:
        session = negotiator.sessions.get(device)
        checker = session.checker if session is not None else None
        connected = (isinstance(checker, RegisteredChecker)
                     and checker.checker.state == "connected")
        return checker, connected

    def chosen(device: DeviceId, pair: CandidatePair, reason: str) -> None:
        spawn(peer_sync.path_chosen(device, pair, reason, early=True))

    def rewoken(device: DeviceId) -> None:
        spawn(peer_sync.peer_checks_again(device))

    early = EarlyChecks(paths, private_key, team.published, session_of, chosen, rewoken)
    negotiator.on_bye = early.peer_left
    peer_sync.early = early
    paths.early_view = early.status
    published = CandidatesLine(team, state, paths.candidate_infos, spawn)
    presence.extra_line = published.line
    trickled = paths.on_candidates

    def candidates_changed(candidates: list[CandidateInfo], complete: bool) -> None:
        if trickled is not None:
            trickled(candidates, complete)
        published.changed()

    paths.on_candidates = candidates_changed
    return early
