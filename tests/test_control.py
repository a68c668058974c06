import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kbwg.agent.control import ControlError, ControlServer, call, socket_path
from kbwg.agent.statedir import LOCK_NAME


async def test_call_round_trip_and_errors(tmp_path: Path) -> None:
    async def status(request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "echo": request.get("x")}

    async def broken(_request: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("boom")

    server = ControlServer(tmp_path, {"status": status, "broken": broken})
    await server.start()
    try:
        assert await call(tmp_path, "status", x=3) == {"ok": True, "echo": 3}
        with pytest.raises(ControlError, match="unknown command 'nope'"):
            await call(tmp_path, "nope")
        with pytest.raises(ControlError, match="RuntimeError: boom"):
            await call(tmp_path, "broken")
        # Garbage on the socket gets an error reply and the server keeps serving.
        reader, writer = await asyncio.open_unix_connection(str(socket_path(tmp_path)))
        writer.write(b"\xff garbage\n")
        reply = json.loads(await reader.readline())
        writer.close()
        assert reply == {"error": "request is not JSON"}
        assert (await call(tmp_path, "status"))["ok"] is True
    finally:
        await server.close()
    assert not socket_path(tmp_path).exists()


async def test_no_agent_says_how_to_start_one(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="no agent is running with state dir"):
        await call(tmp_path, "status")


async def test_an_agent_that_has_not_joined_yet_is_told_apart_from_none(
        tmp_path: Path) -> None:
    # A `join` still starting (or waiting for Keybase or the network) holds the state
    # dir's lock, which records its pid, and has no control socket yet.
    joining = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "join"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(f"{joining.pid}\n")
        with pytest.raises(ControlError, match=f"pid {joining.pid}\\) has not joined yet"):
            await call(tmp_path, "status")
        # A stale lock file: its pid reused by a process that is no `join`, or gone.
        (tmp_path / LOCK_NAME).write_text(f"{other.pid}\n")
        with pytest.raises(ControlError, match="no agent is running with state dir"):
            await call(tmp_path, "status")
        # Whatever else is there is no pid: not text, or too long to be one.
        for junk in ("../../proc/self\n", f"{joining.pid}" + " " * 64, "\x00\xff"):
            (tmp_path / LOCK_NAME).write_text(junk)
            with pytest.raises(ControlError, match="no agent is running with state dir"):
                await call(tmp_path, "status")
        # A link planted as the lock file is not followed.
        (tmp_path / LOCK_NAME).unlink()
        (tmp_path / "elsewhere").write_text(f"{joining.pid}\n")
        (tmp_path / LOCK_NAME).symlink_to(tmp_path / "elsewhere")
        with pytest.raises(ControlError, match="no agent is running with state dir"):
            await call(tmp_path, "status")
        (tmp_path / LOCK_NAME).unlink()
    finally:
        for proc in (joining, other):
            proc.kill()
            proc.wait()
    (tmp_path / LOCK_NAME).write_text(f"{joining.pid}\n")
    with pytest.raises(ControlError, match="no agent is running with state dir"):
        await call(tmp_path, "status")


async def test_socket_is_private_before_it_accepts_connections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def status(_request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    path = socket_path(tmp_path)
    chmod = os.chmod
    seen: list[type[BaseException] | None] = []

    def chmod_checking_reachability(target: Any, mode: int) -> None:
        # At the moment the mode is set, the socket must not take connections yet.
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(path))
                seen.append(None)
            except OSError as exc:
                seen.append(type(exc))
        chmod(target, mode)

    monkeypatch.setattr(os, "chmod", chmod_checking_reachability)
    old_umask = os.umask(0)  # bind() alone would make the socket 0777
    server = ControlServer(tmp_path, {"status": status})
    try:
        await server.start()
    finally:
        os.umask(old_umask)
    try:
        assert seen == [ConnectionRefusedError]
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert await call(tmp_path, "status") == {"ok": True}
    finally:
        await server.close()


@pytest.mark.parametrize("kind", ["file", "symlink"])
async def test_planted_path_is_not_removed(tmp_path: Path, kind: str) -> None:
    path = socket_path(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    if kind == "file":
        path.write_text("keep me\n")
    else:
        path.symlink_to(victim)
    server = ControlServer(tmp_path, {})
    with pytest.raises(ControlError, match="is not a socket"):
        await server.start()
    await server.close()  # what the agent's shutdown does after a failed start
    assert path.is_symlink() is (kind == "symlink")
    assert path.read_text() == "keep me\n" and victim.read_text() == "keep me\n"


async def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    async def status(_request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    path = socket_path(tmp_path)
    with socket.socket(socket.AF_UNIX) as crashed:
        crashed.bind(str(path))  # left behind, as by a killed agent
    server = ControlServer(tmp_path, {"status": status})
    await server.start()
    try:
        assert await call(tmp_path, "status") == {"ok": True}
    finally:
        await server.close()
    assert not path.exists()
