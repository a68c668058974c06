"""What the parts of a peer checker share: timer settings, counters, the send function.

`CheckTimers` are the knobs (tests shrink them). `CheckCounters` count what was sent
and received: the receive path counts bad input instead of raising, so a hostile or
broken sender shows up here and nowhere else.
"""

from __future__ import annotations

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
    settle: float = 0.150  # wait for better-class pairs after the first success
    # ... and at most this long for pairs of its class still in flight that could
    # answer faster (a multi-homed host's other uplink): the first choice is the right one.
    contend_max: float = 0.5
    # Consent follows the selected pair's RTT (consent_interval_for): a check every
    # `consent_rtts` RTTs, never more often than `consent_min_interval` nor less often
    # than `consent_interval`; each is missed after `consent_timeout_rtts` RTTs, at least
    # `consent_min_timeout` and at most `consent_timeout` or the interval. At RTTs of
    # 1-100 ms a lost path is noticed in about 1 s: three misses in a row.
    consent_interval: float = 2.0
    consent_timeout: float = 1.0  # a single-shot liveness check is missed after this
    consent_failures: int = 3  # misses in a row that fail a pair (~1 s, ~6 s unmeasured)
    consent_min_interval: float = 0.25
    consent_rtts: float = 4.0
    consent_min_timeout: float = 0.3
    consent_timeout_rtts: float = 3.0
    keepalive_interval: float = 5.0
    reprobe_min: float = 2.0
    reprobe_max: float = 30.0
    jitter: float = 0.2  # +-fraction on consent/keepalive intervals (RFC 7675)

    def consent_interval_for(self, rtt_ms: float | None) -> float:
        """Seconds between consent checks of a pair with this RTT (None: unmeasured)."""
        if rtt_ms is None:
            return self.consent_interval
        return min(self.consent_interval,
                   max(self.consent_min_interval, self.consent_rtts * rtt_ms / 1000.0))

    def consent_timeout_for(self, rtt_ms: float | None) -> float:
        """Seconds after which a single-shot liveness check of such a pair is missed;
        never longer than the interval (a check still in flight holds back the next)."""
        if rtt_ms is None:
            return self.consent_timeout
        return min(self.consent_timeout, self.consent_interval_for(rtt_ms),
                   max(self.consent_min_timeout, self.consent_timeout_rtts * rtt_ms / 1000.0))


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
