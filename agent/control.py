"""The agent's local control socket: one JSON request line, one JSON reply line.

`kbwg-agent status --state-dir DIR` talks to the agent running with that state dir.
Connections are served concurrently: a `ping` waiting for its pong holds up nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from kbwg.agent.statedir import FILE_MODE, SOCKET_NAME, joining_agent

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(Exception):
    """The agent could not be reached or refused the request."""


class RequestRefused(Exception):
    """A handler's answer to a request it cannot serve (an unknown peer, say): its
    message goes to the client as it is, for the user to act on."""


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_NAME


class ControlServer:
    def __init__(self, state_dir: Path, handlers: dict[str, Handler]) -> None:
        self._path = socket_path(state_dir)
        self._handlers = handlers
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = False
        try:
            # Bound but not yet listening, the socket refuses every connection: it is
            # made private before listen(), so it is never reachable with a wider mode.
            sock.bind(str(self._path))
            bound = True
            os.chmod(self._path, FILE_MODE)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        except BaseException:
            sock.close()
            if bound:
                with contextlib.suppress(OSError):
                    self._path.unlink()
            raise

    def _remove_stale(self) -> None:
        """Remove a crashed agent's socket; refuse anything else found at its path."""
        try:
            st = os.lstat(self._path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(
                f"{self._path} exists and is not a socket, so no agent made it: look at it "
                "and remove it if it is not needed, or use another --state-dir")
        self._path.unlink()

    async def close(self) -> None:
        if self._server is None:
            return  # never started: whatever is at the path is not ours to remove
        self._server.close()
        with contextlib.suppress(Exception):
            await self._server.wait_closed()
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await reader.readline()
            except ValueError:  # longer than the reader's limit (64 KiB, = MAX_REQUEST)
                reply: dict[str, Any] = {"error": "request too large"}
            else:
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
        except RequestRefused as exc:
            return {"error": str(exc)}
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
        joining = joining_agent(state_dir)
        if joining is not None:
            raise ControlError(
                f"the agent with state dir {state_dir} (pid {joining}) has not joined yet: "
                "it is starting, or waiting for the Keybase service or the network; its "
                "log says which (under systemd: journalctl --user -u kbwg-agent@TEAM)"
            ) from exc
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
