"""The agent's local control socket: one JSON request line, one JSON reply line.

`kbwg-agent status --state-dir DIR` talks to the agent running with that state dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_REQUEST = 64 * 1024

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(Exception):
    """The agent could not be reached or refused the request."""


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_NAME


class ControlServer:
    def __init__(self, state_dir: Path, handlers: dict[str, Handler]) -> None:
        self._path = socket_path(state_dir)
        self._handlers = handlers
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, path=str(self._path))
        os.chmod(self._path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            reply = await self._dispatch(line)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.debug("control client went away: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        if len(line) > MAX_REQUEST:
            return {"error": "request too large"}
        try:
            request = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {"error": "request is not JSON"}
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"error": "request must be an object with a 'cmd' string"}
        handler = self._handlers.get(request["cmd"])
        if handler is None:
            return {"error": f"unknown command {request['cmd']!r}"}
        try:
            return {"result": await handler(request)}
        except Exception as exc:
            log.exception("control command %s failed", request["cmd"])
            return {"error": f"{type(exc).__name__}: {exc}"}


async def call(state_dir: Path, cmd: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    path = socket_path(state_dir)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(path), limit=16 * 1024 * 1024), timeout
        )
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise ControlError(
            f"no agent is running with state dir {state_dir} ({path} is not accepting "
            "connections); start one with `kbwg-agent join TEAM --state-dir DIR` "
            "or pass the --state-dir it uses"
        ) from exc
    except PermissionError as exc:
        raise ControlError(
            f"cannot open {path}: permission denied; run as the agent's user"
        ) from exc
    try:
        writer.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    if not line:
        raise ControlError("the agent closed the control connection without answering")
    reply = json.loads(line)
    if "error" in reply:
        raise ControlError(str(reply["error"]))
    result = reply.get("result")
    if not isinstance(result, dict):
        raise ControlError("the agent sent a malformed reply")
    return result
