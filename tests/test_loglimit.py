"""Lines that anyone can cause are limited: a connection loop or a flood of garbage
must not write the relay's log as fast as it can send, and what was left out is said."""

from __future__ import annotations

import asyncio
import logging
from typing import cast

import pytest
from test_turn_stream import FakeStreamTransport, stream_connection

from kbwg.core.loglimit import BURST, LimitedLog
from kbwg.relay.streams import StreamConnection


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_a_trickle_and_the_next_line_counts_what_was_left_out(
        caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.loglimit")
    clock = Clock()
    limited = LimitedLog(logger, rate=1.0, burst=3, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.loglimit"):
        for i in range(10):
            limited.log(logging.INFO, "line %d", i)
        assert [r.getMessage() for r in caplog.records] == ["line 0", "line 1", "line 2"]
        assert limited.left_out == 7
        clock.now = 1.0
        limited.log(logging.WARNING, "line %d", 10)
        limited.log(logging.WARNING, "line %d", 11)
    assert caplog.records[-1].getMessage() == \
        "line 10 (7 lines before it left out: too many at once)"
    assert caplog.records[-1].levelno == logging.WARNING
    assert len(caplog.records) == 4 and limited.left_out == 1


def test_a_level_not_logged_spends_nothing(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.loglimit.quiet")
    limited = LimitedLog(logger, rate=1.0, burst=1, clock=Clock())
    with caplog.at_level(logging.WARNING, logger="test.loglimit.quiet"):
        for _ in range(5):
            limited.log(logging.DEBUG, "not logged")
        limited.log(logging.WARNING, "logged")
    assert [r.getMessage() for r in caplog.records] == ["logged"]
    assert limited.left_out == 0


def test_debug_lines_pass_and_leave_the_budget_to_the_others(
        caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.loglimit.debug")
    limited = LimitedLog(logger, rate=1.0, burst=1, clock=Clock())
    with caplog.at_level(logging.DEBUG, logger="test.loglimit.debug"):
        for i in range(5):
            limited.log(logging.DEBUG, "debug %d", i)
        limited.log(logging.WARNING, "warning")
    assert [r.getMessage() for r in caplog.records] == \
        [*(f"debug {i}" for i in range(5)), "warning"]


def test_a_connection_loop_past_the_cap_writes_a_bounded_log(
        caplog: pytest.LogCaptureFixture) -> None:
    """Every refusal is counted; only the first lines (and then a trickle) are logged."""
    first = stream_connection(("192.0.2.7", 40000))
    streams, cap = first.streams, first.server.config.quotas.allocations_per_address
    attempts = cap + 500
    try:
        with caplog.at_level(logging.INFO, logger="kbwg.relay.streams"):
            for port in range(40001, 40000 + attempts):
                connection = StreamConnection(streams, "tcp")
                connection.connection_made(cast(asyncio.Transport, FakeStreamTransport(
                    ("192.0.2.7", port))))
        refused = [r for r in caplog.records if "refused" in r.getMessage()]
        assert first.server.counters.stream_refused == attempts - cap
        assert 1 <= len(refused) <= BURST + 1  # the loop takes well under a second
    finally:
        first.server.close()


def test_garbage_on_many_connections_writes_a_bounded_log(
        caplog: pytest.LogCaptureFixture) -> None:
    """One connection after another that sends garbage: each is closed and counted."""
    first = stream_connection(("192.0.2.8", 40000))
    streams = first.streams
    try:
        with caplog.at_level(logging.INFO, logger="kbwg.relay.streams"):
            for i in range(300):
                connection = StreamConnection(streams, "tcp")
                connection.connection_made(cast(asyncio.Transport, FakeStreamTransport(
                    (f"198.51.100.{i % 250 + 1}", 40000 + i))))
                connection.data_received(b"\xff" * 20)  # neither STUN nor ChannelData
                assert connection.closed
                connection.connection_lost(None)
        closed = [r for r in caplog.records if "closed" in r.getMessage()]
        assert streams.counters.stream_bad_input == 300
        assert 1 <= len(closed) <= BURST + 1
    finally:
        first.server.close()
