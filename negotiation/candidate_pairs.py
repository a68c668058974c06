"""Candidate pairs of one peer: forming and ordering them, and each pair's check state.

Checks leave from bases (RFC 8445 section 6.1.2.4): a server-reflexive candidate is
sent from its base, a host candidate, so srflx local candidates add no pairs of their
own and are pruned. What the peer sees of us on a pair is learned from the
XOR-MAPPED-ADDRESS of the answer (`CandidatePair.local_seen`): a host candidate when no
NAT is between, our srflx candidate through an endpoint-independent NAT, or a new
peer-reflexive one (a symmetric NAT). Relay candidates are bases of their own: their
checks leave through the TURN allocation.

Pairs join candidates of one address family only (RFC 8421): an IPv4 base never checks
an IPv6 remote. A relay candidate counts as the family of its relayed address.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from kbwg.core.addresses import Address, format_endpoint, ip_family, parse_endpoint, parse_ip
from kbwg.negotiation.candidates import Candidate, candidate_priority
from kbwg.negotiation.choice import PairState, PairView, PathClass, path_class
from kbwg.negotiation.rtt_estimator import BaseRtt, RttEstimator
from kbwg.negotiation.wire import CandidateInfo

TxKind = Literal["check", "nominate", "live"]

# RFC 8445 section 6.1.2.5 suggests 100; a peer sends at most 64 candidates.
MAX_PAIRS = 100
# RTT is the median of the last few unambiguous samples: one late answer does not move it.
RTT_WINDOW = 5
# A pair's base RTT, which choice compares, is its lowest sample in this window: a
# sustained transfer's own queue moves the selected path away at most once per window,
# while a slower route (or another user's traffic) raises the base within it.
BASE_RTT_WINDOW_S = 30.0
# The weight of each liveness check's outcome in a pair's loss estimate (about the
# last 16 checks).
LOSS_GAIN = 1 / 16
_BASE_TYPES = ("host", "relay")


def parse_address(text: str | None) -> Address | None:
    """"ip:port" (as in `Candidate.base`) to a tuple; None when it is not one."""
    if not text:
        return None
    try:
        return parse_endpoint(text)
    except ValueError:
        return None


def ipv4(address: str) -> bool:
    try:
        return isinstance(parse_ip(address), ipaddress.IPv4Address)
    except ValueError:
        return False


def checkable(address: str) -> bool:
    """An address checks may go to or come from: IPv4, or IPv6 that is not link-local
    (no scope to send it with) nor IPv4-mapped (IPv4 goes as IPv4)."""
    try:
        ip = parse_ip(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        return not (ip.is_link_local or ip.ipv4_mapped is not None or ip.scope_id)
    return True


def same_family(a: str, b: str) -> bool:
    family = ip_family(a)
    return family is not None and family == ip_family(b)


def candidate_label(type_: str, address: str, port: int) -> str:
    return f"{type_} {format_endpoint((address, port))}"


def check_bases(local: Iterable[Candidate]) -> list[Candidate]:
    """The local candidates checks leave from: host and relay, deduplicated."""
    bases: list[Candidate] = []
    seen: set[Address] = set()
    for cand in local:
        addr = (cand.address, cand.port)
        if cand.type in _BASE_TYPES and checkable(cand.address) and addr not in seen:
            seen.add(addr)
            bases.append(cand)
    return bases


def pair_priority(local_priority: int, remote_priority: int, controlling: bool) -> int:
    """RFC 8445 section 6.1.2.3; G is the controlling side's candidate priority."""
    g, d = (local_priority, remote_priority) if controlling else (
        remote_priority, local_priority)
    return (1 << 32) * min(g, d) + 2 * max(g, d) + (1 if g > d else 0)


def prflx_priority(base: Candidate) -> int:
    """PRIORITY of our checks: what a prflx candidate learned from them would get.

    From a relayed base, the relay's type: the peer learns a candidate from such a check
    only when a NAT on its side changed the relay's port, and that candidate is still
    the relay (RFC 8445 would say prflx, which would rank and count it as direct)."""
    kind = "relay" if base.type == "relay" else "prflx"
    return candidate_priority(kind, (base.priority >> 8) & 0xFFFF)


@dataclass(eq=False)
class CandidatePair:
    """One local base and one remote candidate, with its check state and RTT."""

    local: Candidate  # the base checks leave from (host or relay)
    remote: CandidateInfo
    priority: int
    state: PairState = "waiting"
    # Our candidate as the peer sees it, from the last answer's XOR-MAPPED-ADDRESS.
    local_seen: Candidate | None = None
    # Answers to single-shot liveness checks missed in a row.
    misses: int = 0
    # The share of liveness checks lost, from runs of misses that an answer ended (a
    # run still going may be a dead path: it must not raise the bar that fails it).
    loss: float = 0.0
    # Re-probe backoff while failed (seconds); `probe_at` in loop time, None if unplanned.
    probe_delay: float = 0.0
    probe_at: float | None = None
    succeeded_at: float | None = None
    # Whether a check of this pair has concluded once: re-probes do not count as checking.
    tried: bool = False
    checks: int = 0
    answers: int = 0
    in_flight: dict[TxKind, bytes] = field(default_factory=dict)
    _rtt_samples: deque[float] = field(default_factory=lambda: deque(maxlen=RTT_WINDOW))
    # Set when the only RTT known came from a retransmitted transaction: an upper bound.
    _rtt_bound: float | None = None
    # SRTT and RTTVAR from the exact samples: the consent timeout (RFC 6298's RTO).
    rtt_estimate: RttEstimator = field(default_factory=RttEstimator)
    base_rtt: BaseRtt = field(default_factory=lambda: BaseRtt(BASE_RTT_WINDOW_S))

    @property
    def remote_address(self) -> Address:
        return (self.remote.ip, self.remote.port)

    @property
    def local_address(self) -> Address:
        return (self.local.address, self.local.port)

    @property
    def key(self) -> str:
        return (f"{format_endpoint(self.local_address)}>"
                f"{format_endpoint(self.remote_address)}")

    @property
    def shown_local(self) -> Candidate:
        return self.local_seen if self.local_seen is not None else self.local

    @property
    def path(self) -> PathClass:
        local = self.shown_local
        return path_class(local.type, self.remote.type, local.address, self.remote.ip)

    @property
    def rtt_ms(self) -> float | None:
        if self._rtt_samples:
            return _median(self._rtt_samples)
        return self._rtt_bound

    def add_rtt(self, sample_ms: float, exact: bool, at: float) -> None:
        """An RTT sample taken at loop time `at`; `exact` is False when the transaction
        was retransmitted.

        Karn: an answer after retransmits may answer any copy. Timed from the first
        copy it is an upper bound (exact when the first copy was answered, the usual
        case on a path slower than the RTO), used only until an exact sample arrives.
        """
        if exact:
            self._rtt_samples.append(sample_ms)
            self.rtt_estimate.add(sample_ms)
            self.base_rtt.add(at, sample_ms)
        elif not self._rtt_samples:
            self._rtt_bound = sample_ms

    def rto_ms(self, granularity_ms: float) -> float | None:
        """RFC 6298's RTO from the exact samples; None before the first."""
        return self.rtt_estimate.rto_ms(granularity_ms)

    def answered(self, live: bool) -> None:
        """A check was answered (`live`: a single-shot liveness check): the misses before
        it were losses, this answer was not."""
        for _ in range(self.misses):
            self.loss += LOSS_GAIN * (1.0 - self.loss)
        if live or self.misses:
            self.loss -= LOSS_GAIN * self.loss
        self.misses = 0

    def local_label(self) -> str:
        local = self.shown_local
        return candidate_label(local.type, local.address, local.port)

    def remote_label(self) -> str:
        return candidate_label(self.remote.type, self.remote.ip, self.remote.port)

    def describe(self) -> str:
        return f"{self.local_label()} -> {self.remote_label()}"

    def view(self) -> PairView:
        local = self.shown_local
        return PairView(
            key=self.key, local_type=local.type,
            local_address=format_endpoint((local.address, local.port)),
            remote_type=self.remote.type, remote_address=format_endpoint(self.remote_address),
            state=self.state, rtt_ms=self.rtt_ms, rtt_bound=not self._rtt_samples,
            base_rtt_ms=self.base_rtt.value_ms, priority=self.priority,
            missed=self.misses > 0,
        )

    def to_json(self) -> dict[str, object]:
        rtt, base = self.rtt_ms, self.base_rtt.value_ms
        return {
            "local": self.local_label(), "remote": self.remote_label(), "state": self.state,
            "path": self.path, "rtt_ms": None if rtt is None else round(rtt, 3),
            "base_rtt_ms": None if base is None else round(base, 3),
            "interface": self.local.interface,
        }


def unique_remotes(candidates: Iterable[CandidateInfo]) -> list[CandidateInfo]:
    """Checkable remotes (IPv4 and IPv6), one per address, the highest priority kept.

    A peer without NAT lists one address as both host and srflx: pairs with both would
    be redundant (RFC 8445 section 6.1.2.4).
    """
    best: dict[Address, CandidateInfo] = {}
    for cand in candidates:
        addr = (cand.ip, cand.port)
        if checkable(cand.ip) and (addr not in best or best[addr].priority < cand.priority):
            best[addr] = cand
    return list(best.values())


# The foundation of a candidate whose type is only guessed: a peer's announced endpoint
# in early checks, taken for server-reflexive until its CANDIDATES line says what it is.
GUESSED_FOUNDATION = "announced"


def relay_reaches(remote: CandidateInfo, candidates: Iterable[CandidateInfo]) -> bool:
    """Whether a check from a relay allocation to `remote` is worth sending.

    A relay sits on the public side, so a peer's host address is only worth sending to
    when its STUN server saw it as it is (a srflx candidate at that address; a peer
    without NAT lists its address as both). One its STUN server saw differently is
    behind a NAT, and one no STUN server answered for may be too (a network that lets
    no UDP out, or a STUN server down): unreachable from the relay. Sending there is
    worse than useless: coturn closes an allocation's relay socket on the first send
    error (ENETUNREACH where it has no route), and with it every relayed path of that
    allocation, TCP ones too. A candidate whose type is a guess (`GUESSED_FOUNDATION`)
    counts as a host one: an announced endpoint is the peer's own address when it
    announced before STUN answered, or when it has no NAT.
    """
    if remote.type != "host" and remote.foundation != GUESSED_FOUNDATION:
        return True
    return remote.ip in {c.ip for c in candidates
                         if c.type in ("srflx", "mapped") and c.foundation != GUESSED_FOUNDATION}


def form_pairs(bases: Sequence[Candidate], candidates: Sequence[CandidateInfo],
               controlling: bool) -> list[CandidatePair]:
    """Every base with every distinct remote of its family it can reach, best first,
    at most MAX_PAIRS (a relay base: relay_reaches)."""
    pairs = [
        CandidatePair(base, remote, pair_priority(base.priority, remote.priority, controlling))
        for base in bases for remote in unique_remotes(candidates)
        if same_family(base.address, remote.ip)
        and (base.type != "relay" or relay_reaches(remote, candidates))
    ]
    pairs.sort(key=lambda p: p.priority, reverse=True)
    return pairs[:MAX_PAIRS]


def _median(samples: Iterable[float]) -> float:
    # statistics.median, without loading `statistics` (and its `fractions`, `decimal`)
    # on the start path for a handful of samples.
    ordered = sorted(samples)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return float(ordered[middle])
    return (ordered[middle - 1] + ordered[middle]) / 2
