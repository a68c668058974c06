"""What the parts of a peer checker share: timer settings, counters, the send function.

`CheckTimers` are the knobs (tests shrink them). `CheckCounters` count what was sent
and received: the receive path counts bad input instead of raising, so a hostile or
broken sender shows up here and nowhere else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

from kbwg.negotiation.candidate_pairs import Address
from kbwg.negotiation.candidates import Candidate

# Sends one datagram from a local candidate (`checks.PeerChecker` documents the contract).
SendFn = Callable[[bytes, Address, Candidate], None]


@dataclass(frozen=True)
class CheckTimers:
    """Timer parameters in seconds; tests shrink them."""

    pacing: float = 0.010  # Ta: one new transaction per interval
    rto: float = 0.100  # first retransmit of a check, doubling ...
    max_rto: float = 1.6  # ... up to this
    max_transmissions: int = 6  # a check fails ~4.7 s after its first copy
    settle: float = 0.150  # a NAT path waits this for LAN pairs after the first success
    # ... and at most this long for pairs of its class still in flight that could
    # answer faster (a multi-homed host's other uplink): the first choice is the right one.
    contend_max: float = 0.5
    # A controlled side whose pairs work but that has no nomination after this checks
    # its best pair again, at most `nomination_rechecks` times (the wait doubling): the
    # controlling side may have stopped checking (its agent took the bye of our
    # previous run, delivered after our first checks), and a check of ours wakes it.
    nomination_wait: float = 1.0
    nomination_rechecks: int = 3
    # Consent follows the selected pair's RTT (consent_interval_for): a check every
    # `consent_rtts` RTTs, never more often than `consent_min_interval` nor less often
    # than `consent_interval`, while the path is active (below). Each check is missed
    # after the pair's RTO (RFC 6298: SRTT + max(G, 4 RTTVAR), `rtt_estimator.py`),
    # clamped to [`consent_min_timeout`, `consent_max_timeout`]; `consent_timeout` for
    # a pair not measured yet. `consent_failures` misses in a row fail a pair, more on
    # a path that loses checks often (consent_failures_for). At RTTs of 1-100 ms a lost
    # path is noticed in about 1 s; a jittery path's timeout grows with its variation
    # instead of failing it.
    consent_interval: float = 2.0
    consent_timeout: float = 1.0  # a single-shot check of an unmeasured pair: missed after
    consent_failures: int = 3  # misses in a row that fail a pair (~1 s, ~6 s unmeasured)
    consent_min_interval: float = 0.25
    consent_rtts: float = 4.0
    consent_min_timeout: float = 0.3
    consent_max_timeout: float = 2.0
    consent_granularity: float = 0.010  # G of RFC 6298, in seconds
    # On a lossy path, as many misses in a row as make a false failure this unlikely
    # (from the pair's measured loss), at most `consent_max_failures`.
    consent_false_failure: float = 1e-3
    consent_max_failures: int = 8
    keepalive_interval: float = 5.0
    # A path is active for `active_window` after it was selected and after the agent
    # last saw traffic on it (`PeerChecker.note_traffic`, from WireGuard's counters).
    # Checks at RTT pace cost an idle host with 20 peers ~5 % of a core (RFC 7675's
    # 5 s still ~2 %, bench/resources.py), so an idle path's consent comes every
    # `consent_idle_interval`, its alternatives' keepalives every
    # `keepalive_idle_interval` and failed pairs' re-probes at most every
    # `reprobe_idle_max`. WireGuard's own keepalives (25 s, on the same port and path)
    # keep the NAT's mapping; idle consent only has to notice a path gone. Traffic on
    # an idle path sends a consent check at once and brings the RTT pace back; so does
    # a miss.
    active_window: float = 30.0
    consent_idle_interval: float = 15.0
    keepalive_idle_interval: float = 30.0
    reprobe_min: float = 2.0
    reprobe_max: float = 30.0
    reprobe_idle_max: float = 300.0
    jitter: float = 0.2  # +-fraction on consent/keepalive intervals (RFC 7675)

    def consent_interval_for(self, rtt_ms: float | None) -> float:
        """Seconds between consent checks of an active pair with this RTT (None:
        unmeasured)."""
        if rtt_ms is None:
            return self.consent_interval
        return min(self.consent_interval,
                   max(self.consent_min_interval, self.consent_rtts * rtt_ms / 1000.0))

    def consent_timeout_for(self, rto_ms: float | None, rtt_ms: float | None = None) -> float:
        """Seconds after which a single-shot liveness check is missed, from the pair's
        RTO; with only an upper bound of its RTT (`rtt_ms`, from a retransmitted check),
        RFC 6298's first-sample RTO of it (3 RTTs); unmeasured, `consent_timeout`."""
        if rto_ms is None:
            if rtt_ms is None:
                return self.consent_timeout
            rto_ms = 3 * rtt_ms
        return min(self.consent_max_timeout, max(self.consent_min_timeout, rto_ms / 1000.0))

    def consent_failures_for(self, loss: float) -> int:
        """Misses in a row that fail a pair which loses this share of its checks."""
        if loss <= 0.0:
            return self.consent_failures
        if loss >= 1.0:
            return self.consent_max_failures
        needed = math.ceil(math.log(self.consent_false_failure) / math.log(loss))
        return max(self.consent_failures, min(self.consent_max_failures, needed))


@dataclass
class CheckCounters:
    """What was sent and received; bad input is counted, never raised."""

    checks: int = 0
    retransmits: int = 0
    timeouts: int = 0
    requests: int = 0
    answered: int = 0
    responses: int = 0
    error_responses: int = 0
    late_responses: int = 0
    role_conflicts: int = 0
    prflx_learned: int = 0
    send_errors: int = 0
    oversized: int = 0
    malformed: int = 0
    wrong_method: int = 0
    bad_request: int = 0
    bad_username: int = 0
    bad_integrity: int = 0
    unknown_transaction: int = 0
    address_mismatch: int = 0
    unusable_source: int = 0
    dropped: int = 0
    errors: int = 0

    @property
    def ignored(self) -> int:
        return (self.oversized + self.malformed + self.wrong_method + self.bad_request
                + self.bad_username + self.bad_integrity + self.unknown_transaction
                + self.unusable_source + self.dropped + self.errors)

    def to_json(self) -> dict[str, int]:
        return {**asdict(self), "ignored": self.ignored}
