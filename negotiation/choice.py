"""Path choice for one peer: which candidate pair carries WireGuard, and why.

Pure functions over `PairView`s (a snapshot of a pair: types, addresses, check state,
RTT), so the rules can be tested without a network:

1. Class first. `direct-lan` beats `direct` beats `relay`:
   - `direct-lan`: host to host. Both ends answer on their own interface addresses, so
     no NAT is in between (the same LAN, or a routed private network). Not IPv6 host
     addresses in different /64s: IPv6 needs no NAT, so that is a routed path,
     typically across the internet, and counts as `direct`.
   - `relay`: either end is a TURN relayed candidate.
   - `direct`: everything else: a server-reflexive or peer-reflexive end, i.e. through a
     NAT but still peer to peer. A peer-reflexive address is one nobody listed: a NAT
     made it up (typically a symmetric NAT), so it never counts as LAN even when it
     looks private.
   So a direct IPv6 pair beats any relayed one, whatever the IPv4 NATs.
   Within `relay`, a pair with one relayed end beats one relayed at both ends: that
   crosses the relay twice (or two relays), and each end whose own allocation carries
   the path passes WireGuard through the agent's loopback proxy, so it is the slower
   path even when an idle check measures it a millisecond faster. Class and relayed
   ends together make a pair's tier.
2. Within a tier, lower RTT wins: each pair's base RTT, its lowest recent sample
   (`rtt_estimator.BaseRtt`), not its median. Traffic on the selected path queues
   behind itself and raises that path's recent samples while an idle alternative's stay
   low; on medians every bulk transfer would move its own path away and back, and each
   move costs the transfer its in-flight window. A selected pair is replaced by another
   of the same tier only when the newcomer is faster by both margins:
   `new < ratio * current` and `current - new >= hysteresis_ms`. Jitter then cannot
   make the choice flap, while a real improvement (a congested uplink clearing, a
   faster interface coming up) wins. An unknown RTT never wins on RTT. Two relayed
   pairs through the same relay address never replace each other on RTT: they differ
   only in whose allocation, and so whose loopback proxy, carries the path.
3. A pair of a better tier replaces the selected one at once, and a selected pair that
   stopped answering is replaced by the best usable pair at once.

Reasons are sentences for `status` and `diag`, e.g. "same LAN: host candidates answer
each other (0.4 ms)" or "switched from ... to ...: 5.2 ms vs 81.0 ms".
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

PathClass = Literal["direct-lan", "direct", "relay"]
PairState = Literal["waiting", "in-progress", "succeeded", "failed"]

CLASS_RANK: dict[str, int] = {"direct-lan": 0, "direct": 1, "relay": 2}
DEFAULT_HYSTERESIS_RATIO = 0.8
DEFAULT_HYSTERESIS_MS = 2.0

_TYPE_NAMES = {
    "host": "host", "srflx": "server-reflexive", "prflx": "peer-reflexive", "relay": "relayed",
    "mapped": "port-mapped",
}


def routed_ipv6(local_ip: str | None, remote_ip: str | None) -> bool:
    """Whether two addresses are IPv6 in different /64s (a routed path, not a LAN)."""
    if local_ip is None or remote_ip is None:
        return False
    try:
        local, remote = ipaddress.ip_address(local_ip), ipaddress.ip_address(remote_ip)
    except ValueError:
        return False
    if not isinstance(local, ipaddress.IPv6Address) or not isinstance(
            remote, ipaddress.IPv6Address):
        return False
    return remote not in ipaddress.IPv6Network((local, 64), strict=False)


def path_class(local_type: str, remote_type: str, local_ip: str | None = None,
               remote_ip: str | None = None) -> PathClass:
    """The class of a pair from its candidate types and, for IPv6, its addresses (see
    the module docstring)."""
    if local_type == "relay" or remote_type == "relay":
        return "relay"
    if local_type == "host" and remote_type == "host":
        return "direct" if routed_ipv6(local_ip, remote_ip) else "direct-lan"
    return "direct"


def _ip_of(endpoint: str) -> str | None:
    """The address of 'ip:port' or '[ipv6]:port'; None when it is neither."""
    host, sep, _port = endpoint.rpartition(":")
    if not sep:
        return None
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


@dataclass(frozen=True)
class PairView:
    """What choice needs to know about one candidate pair."""

    key: str  # identity: the same pair keeps the same key across snapshots
    local_type: str
    local_address: str  # "ip:port" or "[ipv6]:port"
    remote_type: str
    remote_address: str
    state: PairState = "succeeded"
    rtt_ms: float | None = None
    # True while the RTT is only an upper bound (timed across retransmissions).
    rtt_bound: bool = False
    # The lowest exact sample of the last window (None: no exact sample).
    base_rtt_ms: float | None = None
    priority: int = 0
    # Its latest check went unanswered: it may be dying (a peer that moved away).
    missed: bool = False

    @property
    def compared_rtt_ms(self) -> float | None:
        """The RTT choice ranks by: the base RTT once measured exactly."""
        return self.base_rtt_ms if self.base_rtt_ms is not None else self.rtt_ms

    @property
    def path(self) -> PathClass:
        return path_class(self.local_type, self.remote_type, _ip_of(self.local_address),
                          _ip_of(self.remote_address))

    @property
    def tier(self) -> tuple[int, int]:
        """Class rank, then how many ends are relayed (see the module docstring)."""
        relayed = (self.local_type == "relay") + (self.remote_type == "relay")
        return (CLASS_RANK[self.path], relayed)

    @property
    def relay_ips(self) -> frozenset[str]:
        """The addresses of the relays the pair goes through (its relayed ends)."""
        ends = ((self.local_type, self.local_address), (self.remote_type, self.remote_address))
        return frozenset(ip for kind, address in ends
                         if kind == "relay" and (ip := _ip_of(address)) is not None)

    @property
    def usable(self) -> bool:
        return self.state == "succeeded"

    @property
    def pending(self) -> bool:
        return self.state in ("waiting", "in-progress")

    def label(self) -> str:
        return (f"{self.local_type} {self.local_address} -> "
                f"{self.remote_type} {self.remote_address}")


def format_rtt(rtt_ms: float | None, bound: bool = False) -> str:
    if rtt_ms is None:
        return "RTT unknown"
    return f"at most {rtt_ms:.1f} ms" if bound else f"{rtt_ms:.1f} ms"


def _rank(view: PairView) -> tuple[tuple[int, int], float, int]:
    rtt = view.compared_rtt_ms
    return (view.tier, math.inf if rtt is None else rtt, -view.priority)


def explain(view: PairView, pairs: Sequence[PairView]) -> str:
    """Why `view` is a fitting path, as one sentence (its class and RTT)."""
    rtt = format_rtt(view.rtt_ms, view.rtt_bound)
    path = view.path
    if path == "direct-lan":
        return f"same LAN: host candidates answer each other ({rtt})"
    if path == "direct" and view.local_type == view.remote_type == "host":
        return f"direct over IPv6, no NAT between ({rtt})"
    if path == "direct":
        through = view.remote_type if view.remote_type != "host" else view.local_type
        return (f"direct through NAT via {_TYPE_NAMES.get(through, through)} address "
                f"({rtt}); no LAN path")
    tried = sum(1 for p in pairs if p.path != "relay")
    if tried == 0:
        return f"relayed ({rtt}): no direct candidate pair to try"
    return f"relayed ({rtt}): no direct pair answered (tried {tried})"


def _nothing_usable(pairs: Sequence[PairView]) -> str:
    if not pairs:
        return "no candidate pairs to check"
    pending = sum(1 for p in pairs if p.pending)
    if pending:
        return f"no pair answered yet ({pending} of {len(pairs)} still checking)"
    return f"no pair answered (tried {len(pairs)})"


def faster_enough(new_ms: float | None, current_ms: float | None, *,
                  ratio: float = DEFAULT_HYSTERESIS_RATIO,
                  margin_ms: float = DEFAULT_HYSTERESIS_MS) -> bool:
    """Whether a same-class pair is enough faster to replace the current one."""
    if new_ms is None or current_ms is None:
        return False
    return new_ms < ratio * current_ms and current_ms - new_ms >= margin_ms


def better_class_pending(best: PairView, pairs: Sequence[PairView]) -> bool:
    """Whether a pair of a better class than `best` is still being checked."""
    rank = CLASS_RANK[best.path]
    return any(p.pending and CLASS_RANK[p.path] < rank for p in pairs)


def choose(current: PairView | None, pairs: Sequence[PairView], *,
           hysteresis_ratio: float = DEFAULT_HYSTERESIS_RATIO,
           hysteresis_ms: float = DEFAULT_HYSTERESIS_MS) -> tuple[PairView | None, str]:
    """The pair to use, and why.

    `pairs` are all the peer's pairs in any state (only succeeded ones are usable; the
    others feed the reason). `current` is the selected pair, or None; its fresh view is
    taken from `pairs` when there. Returns `current`'s view itself when it stays.
    """
    if current is not None:
        current = next((p for p in pairs if p.key == current.key), current)
    usable = [p for p in pairs if p.usable]
    if not usable:
        reason = _nothing_usable(pairs)
        if current is not None:
            reason = f"{current.label()} stopped answering; {reason}"
        return None, reason
    # A pair whose latest check went unanswered is kept while it is the path, but not
    # moved to while another answers: a peer that moved leaves its old pairs working
    # until their misses add up, and going back to one would undo following it.
    answering = [p for p in usable
                 if not p.missed or (current is not None and p.key == current.key)]
    best = min(answering or usable, key=_rank)
    if current is None:
        return best, explain(best, pairs)
    if not current.usable:
        return best, (f"{current.label()} stopped answering; switched to {best.label()}: "
                      f"{explain(best, pairs)}")
    if best.key == current.key:
        return current, explain(current, pairs)
    if best.tier < current.tier:
        return best, (f"switched from {current.label()} to {best.label()}: "
                      f"{explain(best, pairs)}")
    # Same tier (best is never of a worse tier than a usable current): RTT decides.
    new_ms, current_ms = best.compared_rtt_ms, current.compared_rtt_ms
    if (best.tier == current.tier and not same_relay(best, current)
            and faster_enough(new_ms, current_ms, ratio=hysteresis_ratio,
                              margin_ms=hysteresis_ms)):
        return best, (f"switched from {current.label()} to {best.label()}: "
                      f"{format_rtt(new_ms)} vs {format_rtt(current_ms)}")
    return current, explain(current, pairs)


def same_relay(a: PairView, b: PairView) -> bool:
    """Whether two pairs are both relayed through the same relay addresses."""
    relays = a.relay_ips
    return bool(relays) and relays == b.relay_ips
