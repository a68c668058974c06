"""This device once it has joined: its WireGuard device (through the owner), its state,
its paths, and the parts that keep them in step with the team, wired together.

Nothing here is optional or filled in later: `JoinedDevice.assemble` makes every part
from what joining produced (daemon.Agent does the joining and owns the clean-up). The
negotiator is the one part that may be absent, when negotiation is turned off.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from nacl.public import PrivateKey

from kbwg.agent.chat_dispatch import ChatDispatch, post_or_drop
from kbwg.agent.connectivity import Connectivity, RegisteredChecker
from kbwg.agent.device_stats import StatsPoll
from kbwg.agent.early_wiring import attach_early_checks
from kbwg.agent.join_options import JoinOptions
from kbwg.agent.keybase import KeybaseClient
from kbwg.agent.owner_calls import OwnerCalls
from kbwg.agent.peer_sync import NEW_RUN, PeerSync, Spawn
from kbwg.agent.presence import Presence
from kbwg.agent.reports import ControlReplies
from kbwg.agent.runtime_state import AgentState
from kbwg.agent.team_view import TeamView
from kbwg.agent.upkeep import Upkeep
from kbwg.core.identity import DeviceId
from kbwg.negotiation.check_config import CheckTimers
from kbwg.negotiation.session import CheckerSpec, Negotiator
from kbwg.negotiation.wire import CandidateInfo

# How long an offer or answer waits for STUN's answer: a server that answers does so
# well within it; one that does not is not waited for (the rest of our candidates
# trickle in after the offer or answer).
STUN_WAIT_S = 0.3


@dataclass
class JoinedDevice:
    options: JoinOptions
    team: TeamView
    state: AgentState
    owner: OwnerCalls
    paths: Connectivity
    negotiator: Negotiator | None
    presence: Presence
    peer_sync: PeerSync
    stats: StatsPoll
    chat: ChatDispatch
    upkeep: Upkeep
    replies: ControlReplies

    @classmethod
    def assemble(cls, options: JoinOptions, keybase: KeybaseClient, team: TeamView,
                 state: AgentState, owner: OwnerCalls, paths: Connectivity,
                 private_key: PrivateKey, spawn: Spawn) -> JoinedDevice:
        # Held by every change of WireGuard peers (and of our address), so the stats
        # poll's reconciliation never sees a change half made.
        lock = asyncio.Lock()
        presence = Presence(keybase, team, state, owner, options.state_dir, lock)

        async def post(text: str) -> None:
            await post_or_drop(keybase, team.negotiation_channel, text)

        # The live checkers per peer (the newest, and one a renegotiation retired), told
        # of traffic by the stats poll (a path starts active; without traffic its
        # consent slows to the idle pace).
        checkers: dict[DeviceId, list[RegisteredChecker]] = {}

        def make_checker(spec: CheckerSpec) -> RegisteredChecker:
            # `peer_sync` and `upkeep` are made below; the negotiator asks for checkers
            # only once peers have keys, which PeerSync gives them.
            registered = paths.make_checker(spec, lambda pair, reason: spawn(
                peer_sync.path_chosen(spec.peer, pair, reason)))
            registered.checker.on_lost = lambda _pair, fell_back: spawn(
                upkeep.on_path_lost(spec.peer, fell_back))
            checkers[spec.peer] = [*live(spec.peer), registered]
            return registered

        def live(device: DeviceId) -> list[RegisteredChecker]:
            return [r for r in checkers.get(device, []) if r.checker.state != "closed"]

        def traffic(device: DeviceId) -> None:
            if not (registered := live(device)):
                checkers.pop(device, None)
                return
            checkers[device] = registered
            for one in registered:
                one.checker.note_traffic()

        async def offer_candidates() -> list[CandidateInfo]:
            return await paths.offer_candidates(STUN_WAIT_S)

        negotiator = (Negotiator(state.me, private_key, post, make_checker, offer_candidates,
                                 state.listen_port, gathering_done=paths.gathering_done)
                      if options.negotiate else None)
        peer_sync = PeerSync(owner, state, team, paths, negotiator, presence, options, lock,
                             spawn)
        stats = StatsPoll(owner, state, options.keepalive_s, lock, traffic,
                          CheckTimers().active_window)
        chat = ChatDispatch(team, state, presence, peer_sync, negotiator)
        upkeep = Upkeep(options, team, state, presence, peer_sync, stats, paths, negotiator,
                        chat, owner=owner)

        paths.on_candidates = lambda candidates, complete: spawn(trickled(
            negotiator, options, paths, state, presence, candidates, complete))
        if negotiator is not None:
            negotiator.on_new_run = lambda device: spawn(
                peer_sync.peer_checks_again(device, NEW_RUN))
        attach_early_checks(paths, peer_sync, presence, negotiator, team, state, private_key,
                            spawn)
        return cls(
            options=options, team=team, state=state, owner=owner, paths=paths,
            negotiator=negotiator, presence=presence, peer_sync=peer_sync, stats=stats,
            chat=chat,
            upkeep=upkeep,
            replies=ControlReplies(options.team, state, team.config, paths, team.claims,
                                   negotiator, stats, keybase.link),
        )

    async def introduce(self) -> None:
        """Tell the team where we are, then configure the peers known so far.

        At once, with what is known: the host candidates (a LAN peer needs nothing
        else) and the public endpoint only if STUN already answered. A public endpoint
        found later is announced again as soon as it is (`trickled`), so no peer waits
        for a STUN server, least of all one that never answers."""
        if self.options.endpoint is None:
            self.state.announced_endpoint = (self.paths.public_endpoint()
                                             or self.state.announced_endpoint)
        await self.presence.announce()
        # STUN may have answered while that send was under way (the trickle saw no
        # announcement yet and left it to us).
        await announce_if_moved(self.options, self.paths, self.state, self.presence)
        await self.peer_sync.sync()


async def trickled(negotiator: Negotiator | None, options: JoinOptions, paths: Connectivity,
                   state: AgentState, presence: Presence, candidates: list[CandidateInfo],
                   complete: bool) -> None:
    """A gathering step added candidates: the peers' sessions hear of them, and a public
    endpoint found after the first announcement left is announced at once, not when
    the whole gathering (relays, port mapping) is over."""
    if negotiator is not None:
        await negotiator.trickle(candidates, complete)
    if presence.announce_id is not None:
        await announce_if_moved(options, paths, state, presence)


async def announce_if_moved(options: JoinOptions, paths: Connectivity, state: AgentState,
                            presence: Presence) -> None:
    """Announce the public endpoint STUN found if it is not the one announced (unless
    the endpoint was given)."""
    public = paths.public_endpoint()
    if options.endpoint is None and public is not None and public != state.announced_endpoint:
        state.announced_endpoint = public
        await presence.announce()
