"""A pair's smoothed RTT and its variation, and the retransmission timeout they give
(RFC 6298 section 2), in milliseconds.

Consent checks are single-shot: one is missed when no answer came within `rto_ms`.
A timeout of a few median RTTs is missed by ordinary jitter on a path whose delay
varies (a relayed pair over links with 100 ms of jitter each); SRTT + 4 RTTVAR follows
the spread as well as the level, so such a path is not failed by jitter alone, while a
steady low-RTT path keeps a short timeout (and a dead one is noticed in about a second).

`BaseRtt` is the path's delay without the queue in front of it: the lowest sample of a
window (LEDBAT's base delay, BBR's min_rtt). Traffic we send on the selected path queues
behind itself (in a NAT's uplink, in a relay's loopback proxy) and raises that path's
recent samples while an idle alternative's stay low; choice compares base RTTs, or
every bulk transfer would move its own path away and back (`choice.py`).

Only exact samples belong here (Karn: an answer after a retransmit may answer any
copy); `CandidatePair.add_rtt` sorts them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

# RFC 6298's gains: SRTT moves by 1/8 of the error, RTTVAR by 1/4 of its own.
ALPHA = 0.125
BETA = 0.25
K = 4.0


@dataclass
class RttEstimator:
    """SRTT and RTTVAR of one path; None until the first sample."""

    srtt_ms: float | None = None
    rttvar_ms: float = 0.0
    samples: int = 0

    def add(self, sample_ms: float) -> None:
        """One exact RTT sample (RFC 6298 sections 2.2 and 2.3)."""
        if sample_ms < 0:
            return
        if self.srtt_ms is None:
            self.srtt_ms = sample_ms
            self.rttvar_ms = sample_ms / 2
        else:
            # RTTVAR first, with the SRTT from before this sample (as the RFC orders it).
            self.rttvar_ms = (1 - BETA) * self.rttvar_ms + BETA * abs(self.srtt_ms - sample_ms)
            self.srtt_ms = (1 - ALPHA) * self.srtt_ms + ALPHA * sample_ms
        self.samples += 1

    def rto_ms(self, granularity_ms: float) -> float | None:
        """SRTT + max(G, K * RTTVAR); None before the first sample. Unclamped: the
        caller bounds it for its own use."""
        if self.srtt_ms is None:
            return None
        return self.srtt_ms + max(granularity_ms, K * self.rttvar_ms)


@dataclass
class BaseRtt:
    """The lowest exact sample of the last `window_s` seconds, counted back from the
    newest sample; None before the first."""

    window_s: float
    # (at, ms) with both rising: each entry is the lowest from its time on, so the
    # first is the window's minimum and older higher samples never need keeping.
    _floor: deque[tuple[float, float]] = field(default_factory=deque)

    def add(self, at: float, sample_ms: float) -> None:
        while self._floor and self._floor[-1][1] >= sample_ms:
            self._floor.pop()
        self._floor.append((at, sample_ms))
        while self._floor[0][0] < at - self.window_s:
            self._floor.popleft()

    @property
    def value_ms(self) -> float | None:
        return self._floor[0][1] if self._floor else None
