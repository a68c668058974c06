"""The consent timeout from a pair's smoothed RTT and its variation (RFC 6298), and what
it does for a path whose delay jumps around: not failed by ordinary jitter, while a dead
path is still failed about a second after it went quiet on a steady low-RTT path."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace

import pytest
from test_checks import PORT, Iface, SimNet, close, connect, mirrored
from virtual_clock import VIRTUAL_CLOCK, advance_until, now

from kbwg.negotiation.candidate_pairs import CandidatePair
from kbwg.negotiation.candidates import Candidate, candidate_priority
from kbwg.negotiation.check_config import CheckTimers
from kbwg.negotiation.rtt_estimator import BaseRtt, RttEstimator
from kbwg.negotiation.wire import CandidateInfo

pytestmark = VIRTUAL_CLOCK


def test_the_base_rtt_is_the_lowest_sample_of_its_window() -> None:
    base = BaseRtt(window_s=30.0)
    assert base.value_ms is None
    base.add(0.0, 2.0)
    for t in range(1, 30):  # a transfer's queue: higher samples for 29 s
        base.add(float(t), 9.0 + t % 3)
    assert base.value_ms == 2.0
    base.add(30.5, 9.5)  # the idle sample is out of the window now
    assert base.value_ms == 9.0
    base.add(31.0, 3.0)  # the queue drained
    assert base.value_ms == 3.0
    # Only rising minima are kept: a long run of samples costs no memory.
    for t in range(32, 1000):
        base.add(float(t), 50.0)
    assert base.value_ms == 50.0 and len(base._floor) == 1


def test_the_estimator_follows_rfc_6298() -> None:
    est = RttEstimator()
    assert est.rto_ms(10.0) is None
    est.add(100.0)  # the first sample: SRTT = R, RTTVAR = R/2
    assert (est.srtt_ms, est.rttvar_ms) == (100.0, 50.0)
    assert est.rto_ms(10.0) == pytest.approx(300.0)
    est.add(200.0)  # RTTVAR = 3/4 * 50 + 1/4 * |100 - 200|; SRTT = 7/8 * 100 + 1/8 * 200
    assert est.rttvar_ms == pytest.approx(62.5)
    assert est.srtt_ms == pytest.approx(112.5)
    assert est.rto_ms(10.0) == pytest.approx(112.5 + 4 * 62.5)
    for _ in range(60):  # steady: the variation decays, G is the floor
        est.add(112.5)
    assert est.rto_ms(10.0) == pytest.approx(112.5 + 10.0, abs=0.01)
    est.add(-5.0)  # nonsense is ignored
    assert est.samples == 62


def test_only_exact_samples_feed_the_estimator() -> None:
    local = Candidate("host", "198.18.1.10", PORT, "eth0", candidate_priority("host"), "if")
    remote = CandidateInfo("host", "198.18.1.20", PORT, candidate_priority("host"), "f0")
    pair = CandidatePair(local, remote, 1)
    timers = CheckTimers()
    assert timers.consent_timeout_for(pair.rto_ms(10.0), pair.rtt_ms) == timers.consent_timeout
    pair.add_rtt(200.0, exact=False, at=0.0)  # after a retransmit: only a bound, 3x of it
    assert pair.rto_ms(10.0) is None
    assert timers.consent_timeout_for(pair.rto_ms(10.0), pair.rtt_ms) == pytest.approx(0.6)
    pair.add_rtt(50.0, exact=True, at=0.0)
    assert pair.rtt_estimate.srtt_ms == 50.0


@pytest.mark.parametrize(("samples", "timeout"), [
    ([2.0] * 20, 0.3),  # a LAN: the floor, three misses in about a second
    ([400.0, 250.0, 600.0, 380.0, 520.0, 300.0] * 4, 0.4 + 4 * 0.1),  # jitter: wider
    ([3000.0] * 5, 2.0),  # the ceiling
])
def test_the_consent_timeout_is_the_rto_clamped(samples: list[float], timeout: float) -> None:
    est = RttEstimator()
    for sample in samples:
        est.add(sample)
    got = CheckTimers().consent_timeout_for(est.rto_ms(10.0))
    assert got == pytest.approx(timeout, rel=0.35)


def test_more_misses_fail_a_lossy_pair() -> None:
    timers = CheckTimers()
    assert timers.consent_failures_for(0.0) == 3
    assert timers.consent_failures_for(0.05) == 3
    assert timers.consent_failures_for(0.2) == 5  # 0.2^5 = 3e-4
    assert timers.consent_failures_for(0.34) == 7
    assert timers.consent_failures_for(0.9) == timers.consent_max_failures
    assert timers.consent_failures_for(1.0) == timers.consent_max_failures


class JitterNet(SimNet):
    """Every datagram is held an extra 0.2-0.5 s with probability `spike`, in either
    direction: answers usually in 20 ms, often far later (Wi-Fi retries, a queue)."""

    def __init__(self, rng: random.Random, spike: float) -> None:
        super().__init__()
        self.rng = rng
        self.spike = spike

    def _deliver(self, data: bytes, src: Iface, dst: Iface, seen: tuple[str, int]) -> None:
        if frozenset((src.address[0], dst.address[0])) in self.cut:
            self.dropped += 1
            return
        extra = self.rng.uniform(0.2, 0.5) if self.rng.random() < self.spike else 0.0
        self.loop.call_later(src.delay + dst.delay + extra, dst.node.receive, data, seen,
                             dst.address)


async def test_a_jittery_path_is_not_failed_by_jitter_and_a_dead_one_still_is() -> None:
    """The former timeout (three median RTTs, at least 0.3 s, at most the interval)
    misses every check held back here, and failed this working path 45-59 times in
    these five minutes (three seeds). The RTO, fed the late answers too, covers the
    spread."""
    net = JitterNet(random.Random(7), spike=0.2)
    a, b = net.node("a"), net.node("b")
    a.host("198.18.1.10", lan="lan1", delay=0.005)
    b.host("198.18.1.20", lan="lan1", delay=0.005)
    timers = replace(CheckTimers(), jitter=0.0)
    await connect(a, b, timers)
    try:
        await advance_until(lambda: a.c.state == "connected" and mirrored(a, b))
        lost: list[float] = []
        a.c.on_lost = lambda _pair, _fell_back: lost.append(now())
        b.c.on_lost = lambda _pair, _fell_back: lost.append(now())
        pair = a.c.selected
        assert pair is not None
        start, checks = now(), a.c.counters.checks
        while now() - start < 300.0:  # five minutes of traffic
            a.c.note_traffic()
            b.c.note_traffic()
            await asyncio.sleep(5.0)
        sent = a.c.counters.checks - checks
        assert sent > 300, sent  # at RTT pace (or the RTO's, when that is longer)
        assert lost == [], f"a working path failed {len(lost)} times"
        assert a.c.selected is pair
        assert timers.consent_timeout_for(pair.rto_ms(10.0)) > 0.5
        assert pair.loss < 0.15  # answers within the RTO are not losses

        cut_at = now()
        net.cut.add(frozenset(("198.18.1.10", "198.18.1.20")))
        await advance_until(lambda: a.c.state == "failed", timeout=30.0)
        # A wider timeout on this path: still a few seconds, not RFC 7675's 30.
        assert now() - cut_at <= 4 * timers.consent_max_timeout
    finally:
        close(a, b)
