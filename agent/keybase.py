"""The agent's client of the Keybase CLI JSON API (`keybase chat api`, `chat api-listen`,
`fs read`/`fs write`, `whoami --json`), see shared/reference/keybase-cli-api.md.

Keybase is reached only by running its CLI; which binary is a matter of configuration
(`--keybase` / ``KBWG_KEYBASE``), so the same code drives the real CLI or a stand-in.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import os
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kbwg.agent.keybase_link import Backoff, KeybaseLink

logger = logging.getLogger(__name__)

DEFAULT_BINARY = "keybase"
BINARY_ENV = "KBWG_KEYBASE"

# Body limits in UTF-8 bytes (msgchecker getMaxTextLength): CHAT is small, the others large.
CHAT_BODY_LIMIT = 10_000
DEV_BODY_LIMIT = 1_000_000
TOPIC_TYPES = frozenset({"none", "chat", "dev", "kbfsfileedit", "emoji", "emojicross"})
BODY_LIMITS: Mapping[str, int] = {
    "chat": CHAT_BODY_LIMIT,
    "dev": DEV_BODY_LIMIT,
    "kbfsfileedit": DEV_BODY_LIMIT,
    "emoji": DEV_BODY_LIMIT,
    "emojicross": DEV_BODY_LIMIT,
    "none": DEV_BODY_LIMIT,
}

# v1 methods of `keybase chat api` (chat_api_handler.go). Anything else would make the CLI
# print `invalid v1 method` and exit, killing the shared pipe.
KNOWN_METHODS = frozenset(
    {
        "list", "read", "get", "send", "edit", "reaction", "delete", "attach", "download",
        "setstatus", "mark", "searchinbox", "searchregexp", "newconv", "listconvsonname",
        "join", "leave", "addtochannel", "loadflip", "getunfurlsettings", "setunfurlsettings",
        "advertisecommands", "clearcommands", "listcommands", "pin", "unpin",
        "getresetconvmembers", "addresetconvmember", "getdeviceinfo", "listmembers",
        "emojiadd", "emojiaddalias", "emojiremove", "emojilist",
    }
)  # fmt: skip
# Methods whose options must name exactly one conversation.
CONV_METHODS = frozenset(
    {
        "read",
        "get",
        "send",
        "edit",
        "reaction",
        "delete",
        "attach",
        "download",
        "setstatus",
        "mark",
        "join",
        "leave",
        "pin",
        "unpin",
        "loadflip",
        "addtochannel",
    }
)

# stderr of a `chat api` that died because of the request itself (decode-loop errors):
# retrying on a fresh pipe would only kill that one too.
_REQUEST_ERROR_RE = re.compile(
    r"invalid \w+ v\d options|invalid v\d method|invalid version|json: |invalid character"
    r"|unexpected EOF|illegal base64",
)
# How a client says its service is away: Linux clients fail to dial its socket, a
# running api-listen loses its ping ("connection to service lost"), and the KBFS and
# macOS/Windows paths say "keybase isn't running".
_SERVICE_DOWN_RE = re.compile(
    r"dial unix|connection to service lost|isn't running|is not running|connection refused",
    re.IGNORECASE,
)
# A call that keeps hitting the rate limit gives up after this many tries.
RATE_LIMIT_ATTEMPTS = 4
# Calls in flight at once, each on its own `chat api` process (as the Go bot library's
# pipes): a send never waits long behind another's round trip.
DEFAULT_MAX_PIPES = 4
# How long a call waits for a busy pipe before it starts another: about what starting a
# `chat api` process costs, so a burst of quick calls (start-up's joins, history read
# and first sends) shares one process, while a slow round trip holds the next call up
# by no more than this.
PIPE_WAIT_S = 0.1
# An api-listen that ran this long before it ended had a working connection: the
# next restart starts the backoff again.
_LISTEN_STABLE_S = 10.0
# KBFS words it several ways: libkbfs NoSuchNameError is "<name> doesn't exist".
_NOT_FOUND_RE = re.compile(
    r"does not exist|doesn't exist|not found|no such file", re.IGNORECASE
)

# Replies to `read` may carry many 1 MB dev bodies: the default 64 KiB line limit is far
# too small.
_STREAM_LIMIT = 256 * 1024 * 1024
_STDERR_TAIL = 20
# api-listen's status line, printed once it is subscribed (cmd_chat_api_listen.go).
_LISTENING = "Listening for chat notifications"
_STDERR_LINE_MAX = 300
# The most `fs_read` takes of a file. It reads the team's files, which any team writer
# can make as big as they like (or keep growing), and read whole they were held in
# memory, then parsed at every refresh. peers.json at its cap (PEERS_MAX_ENTRIES) and
# any sensible kbwg.json are far smaller.
FS_READ_MAX_BYTES = 1024 * 1024
# What `fs_read` keeps of the CLI's stderr (only its error message matters).
_FS_STDERR_MAX = 64 * 1024
_READ_CHUNK = 64 * 1024


class KeybaseError(Exception):
    """Anything that went wrong talking to Keybase."""


class KeybaseServiceError(KeybaseError):
    """The service answered `{"error": {"code", "message", "data"}}`."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"keybase: {message} (code {code})" if code else f"keybase: {message}")
        self.code = code
        self.message = message
        self.data = data


class KeybaseRequestError(KeybaseError):
    """A request rejected before it reached the service (client-side validation, or the
    CLI's own decode loop)."""


class KeybaseRateLimited(KeybaseServiceError):
    """The service's rate-limit error (ChatRateLimitError) outlasted our retries."""


def is_rate_limit(data: Any) -> bool:
    """Whether an error's `data` is a chat1.RateLimit (name, callsRemaining, windowReset,
    maxCalls): the real CLI's errReply puts one there only for ChatRateLimitError."""
    return isinstance(data, dict) and ("windowReset" in data or "callsRemaining" in data)


class KeybaseUnavailable(KeybaseError):
    """The keybase binary cannot be started, or exits."""


class KeybaseServiceDown(KeybaseUnavailable):
    """The CLI ran but its service did not answer: not running (yet), restarting, or
    hung. Worth waiting for, unlike a missing binary or a logged-out device."""


class KeybaseFileNotFound(KeybaseError, FileNotFoundError):
    """A KBFS path that does not exist."""


class KeybaseFileTooLarge(KeybaseError):
    """A KBFS file over FS_READ_MAX_BYTES: not read further."""


class _TooMuchOutput(Exception):
    """A call's stdout went past its limit (`_run`)."""


def _unavailable(binary: str, what: str) -> KeybaseUnavailable:
    return KeybaseUnavailable(
        f"{what} (keybase binary {binary!r}). Check --keybase / {BINARY_ENV}, and that the "
        "Keybase service is running and logged in (`keybase whoami`)."
    )


def _service_down(binary: str, what: str) -> KeybaseServiceDown:
    return KeybaseServiceDown(
        f"{what} (keybase binary {binary!r}). Check that the Keybase service is running "
        "(`keybase status`; start it with `run_keybase`)."
    )


def _not_logged_in(binary: str) -> KeybaseUnavailable:
    return KeybaseUnavailable(
        f"not logged in to Keybase (keybase binary {binary!r}): log in with `keybase login` "
        "as the user the agent runs as, then start it again"
    )


def resolve_keybase_binary(cli_value: str | None) -> str:
    """The binary to run: the CLI flag, else $KBWG_KEYBASE, else `keybase` on PATH."""
    if cli_value:
        return cli_value
    return os.environ.get(BINARY_ENV) or DEFAULT_BINARY


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Channel:
    name: str
    topic_name: str
    topic_type: str = "chat"
    members_type: str = "team"

    def to_json(self) -> dict[str, str]:
        return {
            "name": self.name,
            "members_type": self.members_type,
            "topic_name": self.topic_name,
            "topic_type": self.topic_type,
        }

    @classmethod
    def from_json(cls, obj: Any) -> Channel:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise ValueError(f"not a channel object: {obj!r}")
        topic_type = obj.get("topic_type") or "chat"
        members_type = obj.get("members_type") or "team"
        topic_name = obj.get("topic_name") or ""
        if not all(isinstance(v, str) for v in (topic_type, members_type, topic_name)):
            raise ValueError(f"malformed channel object: {obj!r}")
        return cls(obj["name"], topic_name, topic_type.lower(), members_type.lower())

    @property
    def body_limit(self) -> int:
        return BODY_LIMITS.get(self.topic_type.lower(), CHAT_BODY_LIMIT)

    def __str__(self) -> str:
        suffix = "" if self.topic_type == "chat" else f" ({self.topic_type})"
        return f"{self.name}#{self.topic_name}{suffix}"


@dataclass(frozen=True)
class ChatMessage:
    id: int
    conversation_id: str
    channel: Channel
    sender_username: str
    sender_device: str
    sent_at: float  # seconds since the epoch
    body: str | None  # None for non-text content
    content_type: str


@dataclass(frozen=True)
class Identity:
    username: str
    device: str


@dataclass(frozen=True)
class Page:
    messages: list[ChatMessage]
    next: str | None
    last: bool


def parse_message(obj: Any) -> ChatMessage:
    """A MsgSummary (the `msg` of a read entry or a listen notification).

    Raises ValueError on anything malformed; callers log and skip it.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"message is not an object: {type(obj).__name__}")
    try:
        msg_id = obj["id"]
        conv_id = obj["conversation_id"]
        channel = Channel.from_json(obj["channel"])
        sender = obj["sender"]
        content = obj["content"]
    except KeyError as exc:
        raise ValueError(f"message lacks {exc.args[0]!r}") from exc
    if not isinstance(msg_id, int) or isinstance(msg_id, bool) or not isinstance(conv_id, str):
        raise ValueError("message id or conversation id has the wrong type")
    if not isinstance(sender, dict) or not isinstance(sender.get("username"), str):
        raise ValueError("message sender is malformed")
    device = sender.get("device_name")
    if not isinstance(device, str):
        raise ValueError("message sender has no device name")
    sent_ms = obj.get("sent_at_ms")
    sent_s = obj.get("sent_at")
    try:
        if isinstance(sent_ms, (int, float)) and not isinstance(sent_ms, bool):
            sent_at = sent_ms / 1000.0
        elif isinstance(sent_s, (int, float)) and not isinstance(sent_s, bool):
            sent_at = float(sent_s)
        else:
            raise ValueError("message has no sent_at/sent_at_ms")
    except OverflowError:  # a JSON integer too large for a float
        raise ValueError("message time is out of range") from None
    # NaN or infinity would make an announcement or a claim never expire.
    if not math.isfinite(sent_at):
        raise ValueError(f"message time {sent_at} is not a finite number")
    if not isinstance(content, dict) or not isinstance(content.get("type"), str):
        raise ValueError("message content is malformed")
    content_type: str = content["type"]
    body: str | None = None
    if content_type == "text":
        text = content.get("text")
        if not isinstance(text, dict) or not isinstance(text.get("body"), str):
            raise ValueError("text message has no body")
        body = text["body"]
    return ChatMessage(
        id=msg_id,
        conversation_id=conv_id,
        channel=channel,
        sender_username=sender["username"],
        sender_device=device,
        sent_at=sent_at,
        body=body,
        content_type=content_type,
    )


def validate_call(method: str, options: Any) -> None:
    """Reject what the CLI's decode loop would reject (it would exit and end the pipe)."""
    if method not in KNOWN_METHODS:
        raise KeybaseRequestError(f'invalid v1 method "{method}"')
    if not isinstance(options, dict):
        raise KeybaseRequestError(f"options for {method} must be an object")
    topic_type = options.get("topic_type")
    if topic_type not in (None, "") and (
        not isinstance(topic_type, str) or topic_type.lower() not in TOPIC_TYPES
    ):
        raise KeybaseRequestError(f"invalid topic type: '{topic_type}'")
    channel = options.get("channel")
    conv_id = options.get("conversation_id")
    has_channel = isinstance(channel, dict) and bool(channel.get("name"))
    if channel is not None:
        if not isinstance(channel, dict):
            raise KeybaseRequestError(f"{method}: channel must be an object")
        ctype = channel.get("topic_type")
        if ctype not in (None, "") and (
            not isinstance(ctype, str) or ctype.lower() not in TOPIC_TYPES
        ):
            raise KeybaseRequestError(f"invalid topic type: '{ctype}'")
    if conv_id is not None and not isinstance(conv_id, str):
        raise KeybaseRequestError(f"{method}: conversation_id must be a string")
    if method in CONV_METHODS or method == "newconv":
        if has_channel and conv_id:
            raise KeybaseRequestError(
                f"invalid {method} v1 options: include channel or conversation_id, not both"
            )
        if not has_channel and not conv_id:
            raise KeybaseRequestError(
                f"invalid {method} v1 options: need channel or conversation_id"
            )
    if method == "send":
        message = options.get("message")
        body = message.get("body") if isinstance(message, dict) else None
        if not isinstance(body, str) or not body:
            raise KeybaseRequestError("invalid message, body cannot be empty")
        if has_channel:
            assert isinstance(channel, dict)
            limit = BODY_LIMITS.get(
                str(channel.get("topic_type") or "chat").lower(), CHAT_BODY_LIMIT
            )
        else:
            # By conversation id the topic type is unknown here; the service enforces it.
            limit = DEV_BODY_LIMIT
        size = len(body.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise KeybaseRequestError(
                f"message exceeds the maximum length of {limit} bytes ({size} bytes)"
            )
    if method == "read":
        pagination = options.get("pagination")
        if pagination is not None and not isinstance(pagination, dict):
            raise KeybaseRequestError("read: pagination must be an object")


# --------------------------------------------------------------------------- client


@dataclass(eq=False)
class _Pipe:
    proc: asyncio.subprocess.Process
    stdin: asyncio.StreamWriter
    stdout: asyncio.StreamReader
    stderr_tail: collections.deque[str]
    stderr_task: asyncio.Task[None]


class KeybaseClient:
    """Long-lived `keybase chat api` pipes for calls (one per call in flight, up to
    `max_pipes`; a call waits up to `pipe_wait` seconds for a busy one before starting
    another), plus one-shot commands.

    Listeners are separate processes (`listen`). `link` says whether Keybase answers.
    Call `close()` when done.
    """

    def __init__(
        self,
        binary: str = DEFAULT_BINARY,
        env: Mapping[str, str] | None = None,
        *,
        call_timeout: float = 30.0,
        listen_backoff: tuple[float, float] = (1.0, 30.0),
        max_pipes: int = DEFAULT_MAX_PIPES,
        pipe_wait: float = PIPE_WAIT_S,
    ) -> None:
        self.binary = binary
        # Extra variables layered over our own environment (PATH, HOME stay usable).
        self._env: dict[str, str] | None = {**os.environ, **env} if env is not None else None
        self._call_timeout = call_timeout
        self._backoff_initial, self._backoff_max = listen_backoff
        self._slots = asyncio.Semaphore(max(1, max_pipes))
        self._idle: list[_Pipe] = []
        self._pipes: set[_Pipe] = set()
        self._pipe_wait = pipe_wait
        self._busy = 0  # calls holding a pipe (or starting one)
        # Calls waiting for a busy pipe: a pipe that comes free goes to the first.
        self._waiting: collections.deque[asyncio.Future[_Pipe | None]] = collections.deque()
        self.link = KeybaseLink()
        self._listeners: set[asyncio.subprocess.Process] = set()
        self._closed = False

    # ----- processes

    async def _spawn(
        self, *args: str, stdin: int | None = asyncio.subprocess.DEVNULL
    ) -> asyncio.subprocess.Process:
        try:
            proc = await asyncio.create_subprocess_exec(
                self.binary,
                *args,
                stdin=stdin,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env,
                limit=_STREAM_LIMIT,
                # Own process group: a Ctrl-C on the agent's terminal must not hit the
                # CLI before the agent has decided how to shut down.
                start_new_session=True,
            )
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            self.link.lost(f"cannot start keybase: {exc}")
            raise _unavailable(self.binary, f"cannot start keybase: {exc}") from exc
        # Each is a process start, a cost bench/startup.py counts from these lines.
        logger.debug("started `%s %s` (pid %d)", self.binary, " ".join(args[:2]), proc.pid)
        return proc

    async def _run(self, *args: str, input_data: bytes | None = None,
                   output_limit: int | None = None) -> tuple[int, bytes, bytes]:
        """`output_limit`: past that many bytes of stdout the CLI is stopped and
        _TooMuchOutput raised (Keybase did answer: the link stays up)."""
        proc = await self._spawn(
            *args,
            stdin=asyncio.subprocess.PIPE if input_data is not None else asyncio.subprocess.DEVNULL,
        )
        try:
            reading: Awaitable[tuple[bytes | None, bytes]]
            if output_limit is None:
                reading = proc.communicate(input_data)
            else:
                reading = _read_output(proc, output_limit)
            read = await asyncio.wait_for(reading, timeout=self._call_timeout)
        except TimeoutError:
            await _kill(proc)
            why = f"`keybase {' '.join(args)}` did not finish in {self._call_timeout}s"
            self.link.lost(why)
            raise _service_down(self.binary, why) from None
        except asyncio.CancelledError:
            await _kill(proc)
            raise
        out, err = read
        if out is None:
            self.link.ok()
            raise _TooMuchOutput
        assert proc.returncode is not None
        if proc.returncode != 0 and _SERVICE_DOWN_RE.search(_text(err)):
            why = f"`keybase {args[0]}` failed: {_text(err)[:_STDERR_LINE_MAX]}"
            self.link.lost(why)
            raise _service_down(self.binary, why)
        self.link.ok()
        return proc.returncode, out, err

    # ----- one-shot commands

    async def whoami(self) -> Identity:
        """Who is logged in on this device.

        A logged-out client still exits 0 with `loggedIn: false` and no `user`; older
        clients print no `deviceName`, which `keybase status --json` has as `Device.name`.
        """
        rc, out, err = await self._run("whoami", "--json")
        if rc != 0:
            raise _unavailable(
                self.binary, f"`keybase whoami` failed ({_text(err) or f'exit {rc}'})"
            )
        try:
            status = json.loads(out)
        except ValueError as exc:
            raise KeybaseError(f"unexpected `keybase whoami --json` output: {out[:200]!r}") from exc
        if not isinstance(status, dict):
            raise KeybaseError(f"unexpected `keybase whoami --json` output: {out[:200]!r}")
        if status.get("loggedIn") is not True:
            raise _not_logged_in(self.binary)
        user = status.get("user")
        username = user.get("username") if isinstance(user, dict) else None
        if not isinstance(username, str) or not username:
            raise KeybaseError(
                f"`keybase whoami --json` says logged in but names no user: {out[:200]!r}"
            )
        device = status.get("deviceName")
        if not isinstance(device, str) or not device:
            device = await self._status_device_name()
        return Identity(username, device)

    async def _status_device_name(self) -> str:
        rc, out, err = await self._run("status", "--json")
        if rc != 0:
            raise _unavailable(
                self.binary, f"`keybase status` failed ({_text(err) or f'exit {rc}'})"
            )
        try:
            status = json.loads(out)
        except ValueError as exc:
            raise KeybaseError(f"unexpected `keybase status --json` output: {out[:200]!r}") from exc
        device = status.get("Device") if isinstance(status, dict) else None
        name = device.get("name") if isinstance(device, dict) else None
        if not isinstance(name, str) or not name:
            if isinstance(status, dict) and status.get("LoggedIn") is False:
                raise _not_logged_in(self.binary)
            raise KeybaseError(
                "neither `keybase whoami --json` nor `keybase status --json` names this "
                "device; upgrade the Keybase client"
            )
        return name

    async def fs_read(self, path: str) -> bytes:
        """The file's bytes, at most FS_READ_MAX_BYTES: past them the CLI is stopped and
        KeybaseFileTooLarge raised (the team's files are written by any team writer)."""
        try:
            rc, out, err = await self._run("fs", "read", path, output_limit=FS_READ_MAX_BYTES)
        except _TooMuchOutput:
            raise KeybaseFileTooLarge(
                f"keybase fs read {path}: stopped at {FS_READ_MAX_BYTES} bytes (1 MiB), the "
                "most kbwg-agent reads of a team file; make the file smaller") from None
        if rc != 0:
            _raise_fs(rc, err, f"keybase fs read {path}")
        return out

    async def fs_write(self, path: str, data: bytes) -> None:
        rc, _out, err = await self._run("fs", "write", path, input_data=data)
        if rc != 0:
            _raise_fs(rc, err, f"keybase fs write {path}")

    async def fs_mkdir(self, path: str) -> None:
        rc, _out, err = await self._run("fs", "mkdir", path)
        if rc != 0:
            _raise_fs(rc, err, f"keybase fs mkdir {path}")

    # ----- chat api pipes

    @property
    def _pipe(self) -> _Pipe | None:
        """The pipe the next call will use first (tests look at its process)."""
        return self._idle[-1] if self._idle else None

    async def _start_pipe(self) -> _Pipe:
        if self._closed:
            raise KeybaseError("client is closed")
        proc = await self._spawn("chat", "api", stdin=asyncio.subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL)
        task = asyncio.create_task(_drain_stderr(proc.stderr, "chat api", tail))
        pipe = _Pipe(proc, proc.stdin, proc.stdout, tail, task)
        self._pipes.add(pipe)
        return pipe

    async def _stop_pipe(self, pipe: _Pipe) -> None:
        self._pipes.discard(pipe)
        if pipe in self._idle:
            self._idle.remove(pipe)
        with contextlib.suppress(OSError):
            pipe.stdin.close()
        try:
            await asyncio.wait_for(pipe.proc.wait(), timeout=1.0)
        except TimeoutError:
            await _kill(pipe.proc)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(pipe.stderr_task, timeout=1.0)

    async def _exchange(self, pipe: _Pipe | None, line: bytes) -> tuple[bytes | None, _Pipe]:
        """Send one request on `pipe` (a fresh one when None or dead); its reply line, or
        None if the pipe ended, and the pipe used."""
        if pipe is not None and pipe.proc.returncode is not None:
            # Its service gone: the link says so, once.
            quiet = not self.link.connected or _SERVICE_DOWN_RE.search(" ".join(pipe.stderr_tail))
            logger.log(
                logging.DEBUG if quiet else logging.WARNING,
                "`keybase chat api` exited (rc=%s%s); restarting it",
                pipe.proc.returncode,
                f", stderr: {' / '.join(pipe.stderr_tail)}" if pipe.stderr_tail else "",
            )
            await self._stop_pipe(pipe)
            pipe = None
        if pipe is None:
            pipe = await self._start_pipe()
        try:
            pipe.stdin.write(line)
            await pipe.stdin.drain()
            reply = await asyncio.wait_for(pipe.stdout.readline(), timeout=self._call_timeout)
        except (BrokenPipeError, ConnectionResetError):
            reply = b""
        except TimeoutError:
            # The reply may still come later and would be taken for the next call's.
            await _kill(pipe.proc)
            await self._stop_pipe(pipe)
            why = f"`keybase chat api` did not answer within {self._call_timeout}s"
            self.link.lost(why)
            raise _service_down(self.binary, why) from None
        except asyncio.CancelledError:
            # Same: an abandoned request leaves the pipe out of step.
            await _kill(pipe.proc)
            await self._stop_pipe(pipe)
            raise
        except ValueError as exc:  # line longer than the stream limit
            await _kill(pipe.proc)
            await self._stop_pipe(pipe)
            raise KeybaseError(f"`keybase chat api` reply too large: {exc}") from exc
        # A last line without its newline before EOF is still a whole JSON reply.
        return reply or None, pipe

    async def _pipe_failure(self, pipe: _Pipe) -> tuple[int | None, str]:
        try:
            await asyncio.wait_for(pipe.proc.wait(), timeout=2.0)
        except TimeoutError:
            await _kill(pipe.proc)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(pipe.stderr_task, timeout=1.0)
        rc = pipe.proc.returncode
        err = " / ".join(pipe.stderr_tail)
        await self._stop_pipe(pipe)
        return rc, err

    async def _free_pipe(self) -> _Pipe | None:
        """An idle pipe, or one that comes free within `pipe_wait` while others are busy;
        None: start a new one."""
        if self._idle:
            return self._idle.pop()
        if not self._busy or self._pipe_wait <= 0:
            return None
        waiter: asyncio.Future[_Pipe | None] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        timer = asyncio.get_running_loop().call_later(self._pipe_wait, _settle, waiter, None)
        try:
            return await waiter
        except BaseException:
            # Cancelled just as a pipe was handed over: pass it on.
            if waiter.done() and not waiter.cancelled() and (given := waiter.result()):
                self._release(given)
            raise
        finally:
            timer.cancel()
            with contextlib.suppress(ValueError):
                self._waiting.remove(waiter)

    def _release(self, pipe: _Pipe) -> None:
        """A pipe whose call is done: to the first waiting call, else idle."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(pipe)
                return
        self._idle.append(pipe)

    async def _call_once(self, method: str, line: bytes) -> bytes:
        """One request on an idle pipe (or a new one, up to `max_pipes` at a time, when
        none comes free soon): calls do not wait long behind one another's round trips."""
        async with self._slots:
            pipe: _Pipe | None = await self._free_pipe()
            self._busy += 1
            try:
                reply, pipe = await self._exchange(pipe, line)
                if reply is None:
                    rc, err = await self._pipe_failure(pipe)
                    pipe = None
                    self._pipe_died(method, rc, err, retrying=True)
                    reply, pipe = await self._exchange(None, line)
                    if reply is None:
                        rc, err = await self._pipe_failure(pipe)
                        pipe = None
                        self._pipe_died(method, rc, err, retrying=False)
            finally:
                self._busy -= 1
                if pipe is not None and pipe.proc.returncode is None and not self._closed:
                    self._release(pipe)
        assert reply is not None
        self.link.ok()
        return reply

    def _pipe_died(self, method: str, rc: int | None, err: str, *, retrying: bool) -> None:
        """A pipe ended before its reply: the request's fault, the service's absence, or
        (once) worth a retry on a fresh pipe."""
        if _REQUEST_ERROR_RE.search(err):
            raise KeybaseRequestError(f"keybase rejected the {method} request: {err}")
        detail = f"rc={rc}{', stderr: ' + err if err else ''}"
        if _SERVICE_DOWN_RE.search(err) or not retrying:
            why = f"`keybase chat api` exited ({detail})"
            self.link.lost(why)
            down = _SERVICE_DOWN_RE.search(err)
            raise (_service_down if down else _unavailable)(self.binary, why)
        logger.log(logging.WARNING if self.link.connected else logging.DEBUG,
                   "`keybase chat api` exited (%s); restarting it and retrying %s",
                   detail, method)

    async def call(self, method: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """One v1 call; the reply's `result` object.

        A rate-limit error holds this and every other call until the limit's window
        resets (or a backoff), then tries again, a few times.

        Raises KeybaseRequestError (invalid request), KeybaseServiceError (`error` reply;
        KeybaseRateLimited when the limit outlasts the retries), KeybaseUnavailable (the
        CLI cannot run or keeps dying).
        """
        opts = dict(options) if options is not None else {}
        validate_call(method, opts)
        if self._closed:
            raise KeybaseError("client is closed")
        request = {"method": method, "params": {"version": 1, "options": opts}}
        line = (json.dumps(request, separators=(",", ":")) + "\n").encode()
        backoff = Backoff(self._backoff_initial, self._backoff_max)
        for attempt in range(1, RATE_LIMIT_ATTEMPTS + 1):
            await self.link.wait_rate()
            reply = await self._call_once(method, line)
            try:
                result = _decode_reply(reply, method)
            except KeybaseServiceError as exc:
                if not is_rate_limit(exc.data):
                    self.link.rate_ok()
                    raise
                delay = self.link.rate_limited(exc.data, backoff)
                if attempt == RATE_LIMIT_ATTEMPTS:
                    raise KeybaseRateLimited(exc.code, exc.message, exc.data) from None
                logger.debug("%s rate-limited (%s); trying again in %.1fs", method,
                             exc.message, delay)
                continue
            self.link.rate_ok()
            return result
        raise AssertionError("unreachable")

    async def probe(self) -> bool:
        """Ask Keybase something cheap; whether it answered (the link says so too)."""
        with contextlib.suppress(KeybaseError):
            await self._run("whoami", "--json")
        return self.link.connected

    # ----- chat helpers

    async def send(self, channel: Channel, body: str) -> int:
        """Post a text message (creating the conversation if needed); its message id."""
        result = await self.call("send", {"channel": channel.to_json(), "message": {"body": body}})
        msg_id = result.get("id")
        if not isinstance(msg_id, int):
            raise KeybaseError(f"send reply has no message id: {result!r}")
        return msg_id

    async def read(
        self,
        channel: Channel,
        num: int = 50,
        next_token: str | None = None,
        *,
        peek: bool = True,
    ) -> Page:
        """One page, newest first; pass `Page.next` back for the next older page."""
        pagination: dict[str, Any] = {"num": num}
        if next_token:
            pagination["next"] = next_token
        result = await self.call(
            "read", {"channel": channel.to_json(), "pagination": pagination, "peek": peek}
        )
        messages: list[ChatMessage] = []
        for entry in result.get("messages") or []:
            if not isinstance(entry, dict):
                logger.warning("skipping malformed read entry in %s: %r", channel, entry)
                continue
            if "error" in entry:
                logger.warning("skipping undecryptable message in %s: %s", channel, entry["error"])
                continue
            try:
                messages.append(parse_message(entry.get("msg")))
            except ValueError as exc:
                logger.warning("skipping malformed message in %s: %s", channel, exc)
        pag = result.get("pagination") or {}
        nxt = pag.get("next") if isinstance(pag, dict) else None
        last = bool(pag.get("last")) if isinstance(pag, dict) else True
        return Page(messages, nxt if isinstance(nxt, str) and nxt else None, last)

    async def read_history(
        self, channel: Channel, since: float, *, page_size: int = 50
    ) -> AsyncGenerator[ChatMessage, None]:
        """Messages newest first, back to `since` (epoch seconds) or the start."""
        token: str | None = None
        while True:
            page = await self.read(channel, page_size, token)
            for msg in page.messages:
                if msg.sent_at < since:
                    return
                yield msg
            if page.last or page.next is None or not page.messages:
                return
            token = page.next

    async def join(self, channel: Channel) -> None:
        await self.call("join", {"channel": channel.to_json()})

    async def newconv(self, channel: Channel) -> str:
        result = await self.call("newconv", {"channel": channel.to_json()})
        conv_id = result.get("id")
        if not isinstance(conv_id, str):
            raise KeybaseError(f"newconv reply has no id: {result!r}")
        return conv_id

    # ----- listening

    async def listen(
        self,
        dev: bool = True,
        filter_channels: Sequence[Channel] | None = None,
        ready: asyncio.Event | None = None,
    ) -> AsyncGenerator[ChatMessage, None]:
        """New chat messages (own ones included) from `keybase chat api-listen`.

        `ready` is set once the listener says it is listening (its stderr status line):
        messages sent from then on will be delivered. The listener is restarted whenever
        it exits, with a backoff (1 s doubling to 30 s, jittered) that starts over once
        one has run for a while; `link` says when it is lost and when it is back.
        Close the iterator (`contextlib.aclosing`, or cancel the task consuming it) to
        stop the process.
        """
        args = ["chat", "api-listen"]
        if dev:
            args.append("--dev")
        if filter_channels:
            args += ["--filter-channels", json.dumps([c.to_json() for c in filter_channels])]
        backoff = Backoff(self._backoff_initial, self._backoff_max)
        first = True
        loop = asyncio.get_running_loop()
        while not self._closed:
            try:
                proc = await self._spawn(*args)
            except KeybaseUnavailable:
                if first:
                    raise
                delay = backoff.next()
                logger.debug("cannot restart `keybase chat api-listen`; retrying in %.1fs",
                             delay)
                await self._restart_pause(delay)
                continue
            first = False
            self._listeners.add(proc)
            assert proc.stdout is not None and proc.stderr is not None
            tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL)
            # Subscribed: the service is there (and whatever it did not push while we
            # were away is for the catch-up to read).
            stderr_task = asyncio.create_task(
                _drain_stderr(proc.stderr, "api-listen", tail, ready, self.link.ok))
            started = loop.time()
            ended = False
            try:
                while True:
                    try:
                        line = await proc.stdout.readline()
                    except ValueError:
                        logger.warning("api-listen line over the size limit; restarting it")
                        break
                    if not line:
                        ended = True
                        break
                    msg = _parse_notification(line)
                    if msg is not None:
                        yield msg
            finally:
                self._listeners.discard(proc)
                if ended:
                    # It is stopping by itself: let it, so its exit code and last stderr
                    # lines (the reason) make it into the log.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(proc.wait()), 1.0)
                        await asyncio.wait_for(stderr_task, 1.0)
                await _kill(proc)
                stderr_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stderr_task
            if self._closed:
                return
            if loop.time() - started > _LISTEN_STABLE_S:
                backoff.reset()
            delay = backoff.next()
            why = (f"`keybase chat api-listen` exited (rc={proc.returncode}"
                   f"{', stderr: ' + ' / '.join(tail) if tail else ''})")
            logger.debug("%s; restarting it in %.1fs", why, delay)
            self.link.lost(f"{why}; restarting it")
            await self._restart_pause(delay)

    async def _restart_pause(self, delay: float) -> None:
        """The listener's backoff, cut short when another call finds the service back
        (a join waiting for Keybase at boot listens as soon as it answers); never
        shorter than the backoff's first step, so a listener that dies for its own
        reasons is not restarted at the pace of other calls."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        await self.link.until_back(delay)
        rest = min(delay, self._backoff_initial) - (loop.time() - started)
        if rest > 0:
            await asyncio.sleep(rest)

    async def close(self) -> None:
        """Stop the chat api pipe and any listener processes."""
        self._closed = True
        for pipe in list(self._pipes):
            await self._stop_pipe(pipe)
        for proc in list(self._listeners):
            await _kill(proc)


# --------------------------------------------------------------------------- helpers


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    # Shielded: reaping must finish even if our caller is being cancelled again.
    with contextlib.suppress(asyncio.CancelledError, ProcessLookupError):
        await asyncio.shield(proc.wait())


async def _drain_stderr(
    stream: asyncio.StreamReader,
    what: str,
    tail: collections.deque[str],
    ready: asyncio.Event | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    # Drained continuously so a chatty CLI never blocks on a full stderr pipe; kept out of
    # the JSON stream on stdout.
    while True:
        try:
            line = await stream.readline()
        except ValueError:
            continue
        if not line:
            return
        text = line.decode(errors="replace").rstrip()
        if text.startswith(_LISTENING):
            if ready is not None:
                ready.set()
            if on_ready is not None:
                on_ready()
        if text:
            tail.append(text[:_STDERR_LINE_MAX])
            logger.debug("keybase %s stderr: %s", what, text)


def _settle(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _text(err: bytes) -> str:
    return err.decode(errors="replace").strip()


async def _read_output(proc: asyncio.subprocess.Process,
                       limit: int) -> tuple[bytes | None, bytes]:
    """The call's stdout (None past `limit` bytes: the process is then killed) and the
    start of its stderr, once it has exited."""
    assert proc.stdout is not None and proc.stderr is not None
    errors = asyncio.ensure_future(_read_at_most(proc.stderr, _FS_STDERR_MAX, drain=True))
    try:
        out = await _read_at_most(proc.stdout, limit + 1)
        if len(out) > limit:
            await _kill(proc)
            return None, b""
        err = await errors
        await proc.wait()
        return out, err
    finally:
        errors.cancel()


async def _read_at_most(stream: asyncio.StreamReader, limit: int, drain: bool = False) -> bytes:
    """Up to `limit` bytes of `stream` (until its end); with `drain`, what follows is
    read and dropped until the end (the writer must not block on a full pipe)."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await stream.read(min(_READ_CHUNK, limit - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
    while drain and await stream.read(_READ_CHUNK):
        pass
    return b"".join(chunks)


def _raise_fs(rc: int, err: bytes, what: str) -> None:
    text = _text(err) or f"exit code {rc}"
    if _NOT_FOUND_RE.search(text):
        raise KeybaseFileNotFound(f"{what}: {text}")
    raise KeybaseError(f"{what} failed: {text}")


def _decode_reply(reply: bytes, method: str) -> dict[str, Any]:
    try:
        obj = json.loads(reply)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting too deep
        raise KeybaseError(f"undecodable reply to {method}: {reply[:200]!r}") from exc
    if not isinstance(obj, dict):
        raise KeybaseError(f"unexpected reply to {method}: {reply[:200]!r}")
    error = obj.get("error")
    if error is not None:
        if isinstance(error, dict):
            code = error.get("code")
            raise KeybaseServiceError(
                code if isinstance(code, int) else 0,
                str(error.get("message", "")),
                error.get("data"),
            )
        raise KeybaseServiceError(0, str(error))
    result = obj.get("result")
    if result is None:
        return {}
    if not isinstance(result, dict):
        raise KeybaseError(f"unexpected result for {method}: {result!r}")
    return result


def _parse_notification(line: bytes) -> ChatMessage | None:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: nesting too deep
        logger.warning("api-listen: undecodable line skipped: %r", line[:200])
        return None
    if not isinstance(obj, dict):
        logger.warning("api-listen: unexpected line skipped: %r", line[:200])
        return None
    if obj.get("error"):
        logger.warning("api-listen: notification with error skipped: %s", obj["error"])
        return None
    if obj.get("type") != "chat":
        logger.debug("api-listen: %s notification ignored", obj.get("type"))
        return None
    if obj.get("source") not in (None, "remote"):
        return None
    try:
        return parse_message(obj.get("msg"))
    except ValueError as exc:
        logger.warning("api-listen: malformed message skipped: %s", exc)
        return None
