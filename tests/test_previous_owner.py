"""The previous agent's device owner, recorded in the state dir and waited for."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kbwg.agent import previous_owner
from kbwg.agent.join_options import JoinError


def test_record_load_and_forget(tmp_path: Path) -> None:
    previous_owner.record(tmp_path, os.getpid())
    record = previous_owner.load(tmp_path)
    assert record is not None and record.pid == os.getpid() and record.running()
    assert oct((tmp_path / previous_owner.OWNER_FILE).stat().st_mode & 0o777) == "0o600"
    previous_owner.forget(tmp_path)
    assert previous_owner.load(tmp_path) is None
    previous_owner.forget(tmp_path)  # twice is fine


def test_a_reused_pid_is_not_the_recorded_process(tmp_path: Path) -> None:
    start = previous_owner.process_start_time(os.getpid())
    assert start is not None
    (tmp_path / previous_owner.OWNER_FILE).write_text(f"{os.getpid()} {start + 1}\n")
    record = previous_owner.load(tmp_path)
    assert record is not None and not record.running()


def test_nothing_recorded_for_a_process_that_is_gone(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    previous_owner.record(tmp_path, child.pid)
    assert not (tmp_path / previous_owner.OWNER_FILE).exists()


@pytest.mark.parametrize("content", ["", "garbage", "1 2 3", "\xff\xfe", "-5 x"])
def test_a_broken_record_is_ignored(tmp_path: Path, content: str) -> None:
    (tmp_path / previous_owner.OWNER_FILE).write_bytes(content.encode("latin-1"))
    assert previous_owner.load(tmp_path) is None


def test_a_link_is_never_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text(f"{os.getpid()} 1\n")
    (tmp_path / previous_owner.OWNER_FILE).symlink_to(target)
    assert previous_owner.load(tmp_path) is None


async def test_waits_until_the_previous_owner_exits(tmp_path: Path) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; sys.stdin.read()", stdin=asyncio.subprocess.PIPE)
    previous_owner.record(tmp_path, child.pid)
    waiting = asyncio.create_task(previous_owner.wait_for_previous(tmp_path, timeout=30))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    assert child.stdin is not None
    child.stdin.close()  # end of input: the "owner" exits, as a real one does
    await child.wait()
    await asyncio.wait_for(waiting, 10)


async def test_an_owner_that_stays_is_reported_with_what_to_do(tmp_path: Path) -> None:
    previous_owner.record(tmp_path, os.getpid())
    with pytest.raises(JoinError, match=rf"pid {os.getpid()}.*sudo kill {os.getpid()}"):
        await previous_owner.wait_for_previous(tmp_path, timeout=0.1)


async def test_no_record_no_wait(tmp_path: Path) -> None:
    await asyncio.wait_for(previous_owner.wait_for_previous(tmp_path, timeout=0), 1)
