"""The state dir must be a private directory of the agent's user; agent.lock is never
followed through a symlink."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kbwg.agent.control import ControlServer, call
from kbwg.agent.statedir import (
    LOCK_NAME,
    SOCKET_NAME,
    StateDirBusy,
    StateDirUnsafe,
    lock_state_dir,
)

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A umask that lets everyone write, as a careless service manager might set."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_missing_dir_is_created_private_and_locked(tmp_path: Path, open_umask: None) -> None:
    state = tmp_path / "a" / "state"
    handle = lock_state_dir(state)
    try:
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        lock = state / LOCK_NAME
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600
        assert lock.read_text() == f"{os.getpid()}\n"
    finally:
        handle.close()


def test_second_lock_is_busy_and_leaves_the_pid(tmp_path: Path) -> None:
    handle = lock_state_dir(tmp_path)
    try:
        with pytest.raises(StateDirBusy, match="another agent"):
            lock_state_dir(tmp_path)
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    finally:
        handle.close()


def test_existing_lock_file_is_reused_truncated_and_made_private(tmp_path: Path) -> None:
    lock = tmp_path / LOCK_NAME
    lock.write_text("123456789 an old and longer pid line\n")
    lock.chmod(0o644)
    lock_state_dir(tmp_path).close()
    assert lock.read_text() == f"{os.getpid()}\n"
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600


@pytest.mark.parametrize("dangling", [False, True])
def test_symlinked_state_dir_is_refused(tmp_path: Path, dangling: bool) -> None:
    target = tmp_path / "real"
    if not dangling:
        target.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(StateDirUnsafe, match="is a symbolic link"):
        lock_state_dir(link)
    assert dangling is not target.exists()
    if not dangling:
        assert list(target.iterdir()) == []


def test_a_file_as_state_dir_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(StateDirUnsafe, match="is not a directory"):
        lock_state_dir(path)
    assert path.read_text() == "x"


@needs_root
def test_state_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOBODY)
    with pytest.raises(StateDirUnsafe, match=rf"owned by uid {NOBODY}.*chown 0"):
        lock_state_dir(state)
    assert list(state.iterdir()) == []


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o1777])
def test_group_or_world_writable_state_dir_is_refused(tmp_path: Path, mode: int) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(mode)
    with pytest.raises(StateDirUnsafe, match=r"writable by group or others.*chmod 700"):
        lock_state_dir(state)
    assert list(state.iterdir()) == []


def test_readable_state_dir_is_accepted(tmp_path: Path) -> None:
    # 0755 exposes nothing the agent writes: the socket and lock are 0600 themselves.
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o755)
    lock_state_dir(state).close()


def test_symlinked_lock_file_is_neither_followed_nor_truncated(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / LOCK_NAME).symlink_to(victim)
    with pytest.raises(StateDirUnsafe, match="symbolic link"):
        lock_state_dir(state)
    assert victim.read_text() == "precious\n"
    # A dangling link is not followed to create its target either.
    missing = tmp_path / "created-through-link"
    (state / LOCK_NAME).unlink()
    (state / LOCK_NAME).symlink_to(missing)
    with pytest.raises(StateDirUnsafe, match="symbolic link"):
        lock_state_dir(state)
    assert not missing.exists()


def test_fifo_as_lock_file_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / LOCK_NAME)
    with pytest.raises(StateDirUnsafe, match="not a regular file"):
        lock_state_dir(tmp_path)


def test_planted_file_at_the_socket_path_is_refused(tmp_path: Path) -> None:
    planted = tmp_path / SOCKET_NAME
    planted.write_text("not a socket\n")
    with pytest.raises(StateDirUnsafe, match="not a socket"):
        lock_state_dir(tmp_path)
    assert planted.read_text() == "not a socket\n"


def test_stale_socket_is_accepted(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / SOCKET_NAME))
    lock_state_dir(tmp_path).close()


@needs_root
async def test_status_needs_no_ownership_of_the_state_dir(tmp_path: Path) -> None:
    # Root may ask a user's agent: only the socket's permissions matter for `status`.
    async def status(_request: dict[str, object]) -> dict[str, object]:
        return {"ok": True}

    server = ControlServer(tmp_path, {"status": status})
    await server.start()
    try:
        os.chown(tmp_path, NOBODY, NOBODY)
        assert await call(tmp_path, "status") == {"ok": True}
    finally:
        await server.close()


async def test_join_with_an_unsafe_state_dir_exits_1_saying_what_to_do(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kbwg.agent.cli", "join", "team", "--state-dir", str(state),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert f"state dir {state} is writable by group or others" in err.decode()
    assert "chmod 700" in err.decode() and "--state-dir" in err.decode()
    assert "Traceback" not in err.decode()
    assert list(state.iterdir()) == []
