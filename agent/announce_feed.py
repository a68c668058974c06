"""#announce messages into the books: ANNOUNCE lines (endpoint and key) and CLAIM lines
(self-assigned addresses), each judged as it comes; bad ones are logged and dropped.
Every well-formed line, however old, also tells the key book who used which key first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from ipaddress import IPv4Network

from kbwg.agent.announce import ANNOUNCE_TTL_S, AnnounceBook, AnnounceError, parse_announce
from kbwg.agent.announce_candidates import CandidateBook, is_candidates, parse_candidates
from kbwg.agent.claims import ClaimBook, ClaimError, is_claim, parse_claim
from kbwg.agent.keybase import ChatMessage
from kbwg.agent.keyowners import KeyBook
from kbwg.agent.peers_file import PeerEntry
from kbwg.core.identity import DeviceId
from kbwg.core.loglimit import LimitedLog

log = logging.getLogger(__name__)

# A log call: level, format, arguments.
Note = Callable[..., None]


def announce_feed_notes() -> LimitedLog:
    """The lines about refused messages, limited: every history read meets the same
    messages again, and a member can post refused lines without end."""
    return LimitedLog(log)


def take_announce_message(msg: ChatMessage, me: DeviceId | None,
                          announcements: AnnounceBook, claims: ClaimBook,
                          listed: Sequence[PeerEntry], dynamic_range: IPv4Network | None,
                          now: float, keys: KeyBook | None = None,
                          published: CandidateBook | None = None,
                          notes: LimitedLog | None = None) -> bool:
    """Feed one #announce message to the books; True when something changed. `notes`
    takes the lines about refused messages (unlimited without it)."""
    if msg.body is None:
        return False
    note = notes.log if notes is not None else log.log
    sender = DeviceId(msg.sender_username, msg.sender_device)
    if is_candidates(msg.body):
        return _take_candidates(msg, sender, me, published, now, note)
    if is_claim(msg.body):
        try:
            claim = parse_claim(msg.body, sender, msg.id, msg.sent_at)
        except ClaimError as exc:
            note(logging.WARNING, "ignoring claim %d from %s: %s", msg.id, sender, exc)
            return False
        if keys is not None:
            keys.record(sender, claim.public_key, msg.id, msg.sent_at)
        verdict = claims.offer(claim, listed=listed, dynamic_range=dynamic_range, now=now)
        if not verdict.accepted:
            level = (logging.WARNING if verdict.rejection is not None
                     and verdict.rejection.is_misbehaviour else logging.DEBUG)
            note(level, "ignoring claim %d from %s: %s", msg.id, sender, verdict.reason)
            return False
        return True  # our own echo too: a rival may have been seen before it
    if sender == me:
        return False
    try:
        ann = parse_announce(msg.body, sender, msg.id, msg.sent_at)
    except AnnounceError as exc:
        note(logging.WARNING, "ignoring message %d from %s in #%s: %s",
             msg.id, sender, msg.channel.topic_name, exc)
        return False
    if keys is not None:
        keys.record(sender, ann.public_key, msg.id, msg.sent_at)
    if ann.sent_at < now - ANNOUNCE_TTL_S:
        return False
    if not announcements.offer(ann):
        log.debug("ignoring older or repeated announcement %d from %s", msg.id, sender)
        return False
    if (not any(e.device_id == sender for e in listed)
            and claims.claim_of(sender, now) is None):
        note(logging.INFO, "ignoring announcement from %s: not listed in peers.json and no "
             "live claim", sender)
    return True


def _take_candidates(msg: ChatMessage, sender: DeviceId, me: DeviceId | None,
                     published: CandidateBook | None, now: float, note: Note) -> bool:
    """A CANDIDATES line (announce_candidates.py): for early checks, never a key's
    first use (only ANNOUNCE and CLAIM lines rank keys)."""
    if published is None or sender == me or msg.body is None:
        return False
    try:
        line = parse_candidates(msg.body, sender, msg.id, msg.sent_at)
    except AnnounceError as exc:
        note(logging.WARNING, "ignoring candidates %d from %s: %s", msg.id, sender, exc)
        return False
    if line.sent_at < now - ANNOUNCE_TTL_S:
        return False
    return published.offer(line)
