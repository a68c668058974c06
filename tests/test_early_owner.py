"""`join` starts the device owner before it imports the daemon (owner_client.EarlyOwner):
the owner's process exists once `start` returns, the daemon takes that very owner, and
one nobody took is closed."""

from __future__ import annotations

import os
import sys

import pytest
from owner_fakes import FAKE_OWNER

from kbwg.agent.owner_client import EarlyOwner, OwnerStartError
from kbwg.owner.protocol import OP_HELLO


def children() -> set[int]:
    """This process's child pids (every thread's), from /proc."""
    found: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            found.update(int(pid) for pid in f.read().split())
    return found


async def test_the_owners_process_exists_when_start_returns() -> None:
    before = children()
    early = await EarlyOwner.start(FAKE_OWNER)
    # No further await: a blocking import here would not hold the spawn back.
    spawned = children() - before
    owner = await early.take(FAKE_OWNER)
    try:
        assert owner.pid in spawned, "the owner's process was not started by then"
        hello = await owner.request(OP_HELLO)
        assert hello["pid"] == owner.pid
        await early.discard()  # taken: left to its taker
        assert owner.returncode is None
    finally:
        await owner.close()


async def test_an_owner_nobody_took_is_closed() -> None:
    before = children()
    early = await EarlyOwner.start(FAKE_OWNER)
    (pid,) = children() - before
    await early.discard()
    assert pid not in children()  # exited and reaped
    await early.discard()  # twice is harmless


async def test_a_failed_start_reaches_the_taker_and_discard_is_quiet() -> None:
    command = [sys.executable, "-c", "import sys; sys.exit(3)"]
    early = await EarlyOwner.start(command)
    with pytest.raises(OwnerStartError):
        await early.take(command)
    await early.discard()
    untaken = await EarlyOwner.start(command)
    await untaken.discard()  # no error, no warning about a lost exception


async def test_the_taker_must_ask_for_the_command_it_was_started_with() -> None:
    early = await EarlyOwner.start(FAKE_OWNER)
    try:
        with pytest.raises(OwnerStartError, match="started as"):
            await early.take(["/usr/local/libexec/kbwg-owner"])
    finally:
        await early.discard()
