"""Candidate priorities (RFC 8445 section 5.1.2): what a candidate's type and rank are
worth, apart from gathering.

Separate from kbwg.negotiation.candidates (which needs the STUN client, and with it
aioice) so that reading a peer's published candidates, at start-up, loads nothing heavy.
"""

from __future__ import annotations

# RFC 8445 section 5.1.2.2 recommended type preferences. `mapped` (a port the gateway
# maps for us by PCP, NAT-PMP or UPnP, like Tailscale's portmap endpoints) sits between
# host and srflx: unlike srflx it reaches us from any peer, even through a symmetric NAT.
TYPE_PREFERENCE: dict[str, int] = {"host": 126, "prflx": 110, "mapped": 105, "srflx": 100,
                                   "relay": 0}

LOCAL_PREFERENCE_MAX = 65535


def candidate_priority(type_: str, local_preference: int = LOCAL_PREFERENCE_MAX,
                       component: int = 1) -> int:
    """RFC 8445 section 5.1.2.1."""
    return (1 << 24) * TYPE_PREFERENCE[type_] + (1 << 8) * local_preference + (256 - component)
