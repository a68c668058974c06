"""Which devices this agent peers with, and at which overlay address.

Listed devices (peers.json) are always peers. Unlisted devices become peers through a
claim on the team's dynamic range they still own, and only when the team's policy lets
the two kinds of device peer; their only allowed IP is the claimed address. A peer's
WireGuard key is its newest announcement's, and for an unlisted device that
announcement must carry the key its claim names. A key belongs to one device only
(keyowners): a device whose announcement carries another device's key gets no key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address

from kbwg.agent.announce import ANNOUNCE_TTL_S, AnnounceBook, Announcement
from kbwg.agent.claims import Claim, ClaimBook, Policy, may_peer
from kbwg.agent.keyowners import KeyBook, KeyRefusal
from kbwg.agent.peers_file import PeerEntry
from kbwg.core.identity import DeviceId


@dataclass(frozen=True)
class PeerSpec:
    device: DeviceId
    overlay_ip: IPv4Address
    announcement: Announcement | None
    claim: Claim | None = None
    # Why the device has no key although it announced one (the key is another's).
    refused: str | None = None

    @property
    def dynamic(self) -> bool:
        return self.claim is not None


@dataclass
class DesiredPeers:
    peers: dict[DeviceId, PeerSpec]
    refusals: list[KeyRefusal] = field(default_factory=list)


def desired_peers(
    me: DeviceId,
    entries: list[PeerEntry],
    announcements: AnnounceBook,
    claims: ClaimBook,
    policy: Policy,
    now: float,
    keys: KeyBook | None = None,
    my_key: str | None = None,
) -> DesiredPeers:
    listed = {e.device_id for e in entries}
    wanted = {
        e.device_id: PeerSpec(e.device_id, e.ip, announcements.latest.get(e.device_id))
        for e in entries if e.device_id != me
    }
    if may_peer(policy, me in listed, peer_listed=False):
        _add_claimed(wanted, me, listed, announcements, claims, now)
    return _one_device_per_key(wanted, me, listed, announcements, claims,
                               keys or KeyBook(), my_key, now)


def _add_claimed(wanted: dict[DeviceId, PeerSpec], me: DeviceId, listed: set[DeviceId],
                 announcements: AnnounceBook, claims: ClaimBook, now: float) -> None:
    for state in claims.live_claims(now):
        claim = state.claim
        if not state.owner or claim.sender in listed or claim.sender == me:
            continue
        ann = announcements.latest.get(claim.sender)
        if ann is not None and ann.public_key != claim.public_key:
            ann = None  # the announcement for this claim's key has not arrived yet
        wanted[claim.sender] = PeerSpec(claim.sender, claim.ip, ann, claim)


def _one_device_per_key(wanted: dict[DeviceId, PeerSpec], me: DeviceId, listed: set[DeviceId],
                        announcements: AnnounceBook, claims: ClaimBook, keys: KeyBook,
                        my_key: str | None, now: float) -> DesiredPeers:
    # Every device's current use counts, peer or not, so that every agent judges a
    # key the same way whatever its own policy lets it peer with.
    users: dict[str, dict[DeviceId, int]] = {}
    for device, latest in announcements.latest.items():
        if device != me and (device in wanted or latest.sent_at >= now - ANNOUNCE_TTL_S):
            users.setdefault(latest.public_key, {})[device] = latest.msg_id
    for state in claims.live_claims(now):
        claim = state.claim
        if claim.sender != me:
            current = users.setdefault(claim.public_key, {})
            current[claim.sender] = min(current.get(claim.sender, claim.msg_id), claim.msg_id)
    result = DesiredPeers(wanted)
    for device, spec in wanted.items():
        ann = spec.announcement
        if ann is None:
            continue
        if ann.public_key == my_key:
            owner, why = me, "this device's own key"
        elif len(users.get(ann.public_key, {})) > 1:
            owner, why = keys.owner(ann.public_key, users[ann.public_key], listed)
        else:
            continue
        if owner != device:
            refusal = KeyRefusal(device, ann.msg_id, ann.public_key, owner, why)
            result.refusals.append(refusal)
            wanted[device] = replace(spec, announcement=None, refused=refusal.describe())
    return result
