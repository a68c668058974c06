"""The shared wait helpers: what they return and how a failed wait explains itself."""

from __future__ import annotations

import asyncio

import pytest

from kbwg_testing import WaitTimeout, wait_for, wait_until


def test_wait_until_returns_the_first_truthy_value_and_survives_exceptions() -> None:
    calls: list[int] = []

    def probe() -> int | None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("not there yet")
        return 7 if len(calls) >= 3 else None

    assert wait_until(probe, timeout=5, interval=0) == 7
    assert len(calls) == 3


def test_wait_until_names_what_and_the_last_value() -> None:
    with pytest.raises(WaitTimeout, match=r"waiting for the impossible \(last: 0\)"):
        wait_until(lambda: 0, timeout=0.05, what="the impossible")


async def test_wait_for_lets_the_loop_run_and_takes_coroutine_probes() -> None:
    box: list[str] = []

    async def later() -> None:
        await asyncio.sleep(0.05)
        box.append("done")

    task = asyncio.create_task(later())
    assert await wait_for(lambda: box, "the task's result") == ["done"]
    await task

    async def probe() -> str | None:
        await asyncio.sleep(0)
        return box[0] if box else None

    assert await wait_for(probe, "an awaited probe") == "done"


async def test_wait_for_names_what_and_the_last_exception() -> None:
    def probe() -> bool:
        raise KeyError("missing")

    with pytest.raises(WaitTimeout, match=r"waiting for the key .*KeyError\('missing'\)"):
        await wait_for(probe, "the key", timeout=0.05)
