"""`CANDIDATES` lines in #announce: a device's candidates, published beside its ANNOUNCE
so that peers can check them before any offer (early checks, negotiation/early.py).

    CANDIDATES <base64 wg public key> host:198.18.0.2:51820 srflx:203.0.113.7:51820

Each item is `type:ip:port` (the IP may be IPv6: the type is before the first colon and
the port after the last). The line is a message of its own: the prototype matches a
whole message body against its ANNOUNCE pattern, so an ANNOUNCE message must stay one
line; older agents ignore this one (as they ignore CLAIM). The sender comes from
Keybase's metadata, and a peer uses a line only with the key it announced, so a member
can publish candidates for its own device alone.

Relayed candidates are published too: a relay passes a peer's check to us only once our
allocation has a permission for the peer's address, and our own early checks from the
relay to the peer's server-reflexive address install it (permissions are per IP), so
two devices behind symmetric NATs find their relayed path before the offer. An item of
a type this version does not know is skipped, not the whole line (agents before this
one refused a line with a `relay` item, and early-checked only the ANNOUNCE endpoint).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from kbwg.agent.announce import ANNOUNCE_TTL_S, AnnounceError, NewestBook, canonical_key
from kbwg.core.identity import DeviceId
from kbwg.negotiation.priority import candidate_priority
from kbwg.negotiation.wire import CandidateInfo, WireError

PREFIX = "CANDIDATES "
PUBLISHED_TYPES = ("host", "mapped", "srflx", "relay")
MAX_CANDIDATES = 16


@dataclass(frozen=True)
class PublishedCandidates:
    sender: DeviceId
    public_key: str  # canonical base64
    candidates: tuple[CandidateInfo, ...]
    msg_id: int
    sent_at: float


def is_candidates(body: str) -> bool:
    return body.startswith(PREFIX)


def format_candidates(public_key_b64: str, candidates: Sequence[CandidateInfo]) -> str | None:
    """The line for our candidates, or None when there is none to publish."""
    items = [f"{c.type}:{c.ip}:{c.port}" for c in candidates if c.type in PUBLISHED_TYPES]
    if not items:
        return None
    return f"{PREFIX}{public_key_b64} " + " ".join(items[:MAX_CANDIDATES])


def _candidate(item: str, rank: int) -> CandidateInfo | None:
    """The item as a candidate; None for a type this version does not know."""
    type_, _, rest = item.partition(":")
    ip_text, _, port_text = rest.rpartition(":")
    if type_ not in PUBLISHED_TYPES:
        return None
    try:
        ip = ipaddress.ip_address(ip_text)
    except ValueError:
        raise AnnounceError(f"candidate address {ip_text[:45]!r} is not an IP address") \
            from None
    if (ip.is_unspecified or ip.is_loopback or ip.is_multicast or ip.is_link_local
            or (ip.version == 4 and ip.is_reserved)):
        raise AnnounceError(f"candidate address {ip} is not a unicast address of another host")
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        # A scope names one of the sender's own interfaces: meaningless here.
        raise AnnounceError(f"candidate address {ip_text[:45]!r} has a scope")
    # isdigit() alone passes "²", which int() refuses.
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise AnnounceError(f"candidate port {port_text[:8]!r} is out of range")
    try:
        # Ranked in the sender's order (its own preference).
        return CandidateInfo(type_, str(ip), int(port_text),
                             candidate_priority(type_, 65535 - rank), f"{type_}{rank}")
    except WireError as exc:  # the books catch AnnounceError only
        raise AnnounceError(f"candidate {item[:60]!r}: {exc}") from None


def parse_candidates(body: str, sender: DeviceId, msg_id: int,
                     sent_at: float) -> PublishedCandidates:
    words = body.split()
    if len(words) < 3 or words[0] != PREFIX.strip():
        raise AnnounceError(f"not a CANDIDATES line: {body[:80]!r}")
    if len(words) - 2 > MAX_CANDIDATES:
        raise AnnounceError(f"{len(words) - 2} candidates, more than {MAX_CANDIDATES}")
    key = canonical_key(words[1])
    candidates = tuple(c for rank, item in enumerate(words[2:])
                       if (c := _candidate(item, rank)) is not None)
    if not candidates:
        raise AnnounceError(f"no candidate of a known type ({', '.join(PUBLISHED_TYPES)})")
    return PublishedCandidates(sender, key, candidates, msg_id, sent_at)


class CandidateBook(NewestBook[PublishedCandidates]):
    """Newest published candidates per device."""

    def of(self, device: DeviceId, public_key: str, now: float) -> tuple[CandidateInfo, ...]:
        """The live candidates `device` published for `public_key` (none otherwise)."""
        published = self.latest.get(device)
        if (published is None or published.public_key != public_key
                or published.sent_at < now - ANNOUNCE_TTL_S):
            return ()
        return published.candidates
