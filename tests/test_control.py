import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from kbwg.agent.control import ControlError, ControlServer, call, socket_path


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
