"""Which devices this agent peers with, and at which overlay address.

Listed devices (peers.json) are always peers. Unlisted devices become peers through a
claim on the team's dynamic range they still own, and only when the team's policy lets
the two kinds of device peer; their only allowed IP is the claimed address. A peer's
WireGuard key is its newest announcement's, and for an unlisted device that
announcement must carry the key its claim names.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address

from kbwg.agent.announce import AnnounceBook, Announcement
from kbwg.agent.claims import Claim, ClaimBook, Policy, may_peer
from kbwg.agent.peers import DeviceId, PeerEntry


@dataclass(frozen=True)
class PeerSpec:
    device: DeviceId
    overlay_ip: IPv4Address
    announcement: Announcement | None
    claim: Claim | None = None

    @property
    def dynamic(self) -> bool:
        return self.claim is not None


def desired_peers(
    me: DeviceId,
    entries: list[PeerEntry],
    announcements: AnnounceBook,
    claims: ClaimBook,
    policy: Policy,
    now: float,
) -> dict[DeviceId, PeerSpec]:
    listed = {e.device_id for e in entries}
    wanted = {
        e.device_id: PeerSpec(e.device_id, e.ip, announcements.latest.get(e.device_id))
        for e in entries if e.device_id != me
    }
    if not may_peer(policy, me in listed, peer_listed=False):
        return wanted
    for state in claims.live_claims(now):
        claim = state.claim
        if not state.owner or claim.sender in listed or claim.sender == me:
            continue
        ann = announcements.latest.get(claim.sender)
        if ann is not None and ann.public_key != claim.public_key:
            ann = None  # the announcement for this claim's key has not arrived yet
        wanted[claim.sender] = PeerSpec(claim.sender, claim.ip, ann, claim)
    return wanted
