"""The agent's side of the device owner: start it, send requests, receive events.

    async with await DeviceOwner.start() as owner:
        created = await OwnerCalls(owner).create("kbwg0", private_key, 51820, address, "auto")

`request(op, **args)` is the transport; the agent calls the owner through
owner_calls.OwnerCalls, which names each op's arguments and checks its reply.

The owner is the helper program `kbwg-agent install-helper` installs (by default
/usr/local/libexec/kbwg-owner; `join --owner` or $KBWG_OWNER name another), started
through `sudo -n` with no arguments when the agent is not root. Root without the helper
runs its own Python's `-I -m kbwg.owner` instead. The owner's stderr (its log) is read
line by line and re-logged here at the level the owner logged it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import pwd
import shutil
import signal
import sys
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from kbwg.owner.frames import FrameError, read_frame, write_frame
from kbwg.owner.protocol import OP_HELLO, OP_SHUTDOWN

logger = logging.getLogger(__name__)

OWNER_MODULE = "kbwg.owner"
DEFAULT_HELPER = "/usr/local/libexec/kbwg-owner"
ENV_OWNER = "KBWG_OWNER"
INSTALL_COMMAND = "sudo kbwg-agent install-helper"
_STDERR_TAIL_LINES = 30
_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}

EventCallback = Callable[[dict[str, Any]], None]


class OwnerError(Exception):
    """The owner answered a request with ok False."""


class OwnerGone(Exception):
    """The owner process has exited (or its pipe broke)."""

    def __init__(self, returncode: int | None, detail: str = "") -> None:
        message = f"device owner {describe_exit(returncode)}"
        if detail:
            message += f" (its last log line: {detail})"
        super().__init__(message)
        self.returncode = returncode


def describe_exit(returncode: int | None) -> str:
    """How a process ended, from asyncio's returncode (negative: the signal)."""
    if returncode is None:
        return "closed its pipe"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


class OwnerStartError(Exception):
    """The owner could not be started; the message says how to fix it."""


def helper_path(flag: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The device owner helper: `--owner`, else $KBWG_OWNER, else the default path."""
    environ = os.environ if environ is None else environ
    return flag or environ.get(ENV_OWNER) or DEFAULT_HELPER


def owner_command(flag: str | None = None, environ: Mapping[str, str] | None = None) -> list[str]:
    """The command that starts the device owner; raises OwnerStartError if there is none.

    Not root: `sudo -n HELPER` and nothing else, since the sudoers rule allows no
    arguments. Root: the helper when installed, else this Python's kbwg.owner, which root
    already trusts by running this program.
    """
    environ = os.environ if environ is None else environ
    helper = helper_path(flag, environ)
    if os.geteuid() != 0:
        if not os.path.exists(helper):
            raise OwnerStartError(
                f"the device owner helper {helper} is not installed: " + sudo_fix_hint(helper)
            )
        logger.info("device owner: sudo -n %s", helper)
        return ["sudo", "-n", helper]
    if os.path.exists(helper) or flag or environ.get(ENV_OWNER):
        # A path the user named is used as given: if it is missing, starting it says so.
        logger.info("device owner: %s", helper)
        return [helper]
    command = [sys.executable, "-I", "-m", OWNER_MODULE]
    logger.info("device owner: %s is not installed, running %s", helper, " ".join(command))
    return command


def _install_command(helper: str) -> str:
    if helper == DEFAULT_HELPER:
        return INSTALL_COMMAND
    return f"{INSTALL_COMMAND} --helper {helper}"


def sudoers_line(user: str, helper: str = DEFAULT_HELPER) -> str:
    """The sudoers rule that lets `user` start the helper, and with no arguments ("")."""
    return f'{user} ALL=(root) NOPASSWD: {helper} ""'


def sudo_fix_hint(helper: str | None = None) -> str:
    helper = helper or helper_path()
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = "<user>"
    return (
        "the device owner needs root. Either run the agent as root, or install the "
        "device owner helper and let this user run it through sudo without a password:\n"
        f"    {_install_command(helper)}\n"
        "and add this line with `sudo visudo -f /etc/sudoers.d/kbwg-owner`:\n"
        f"    {sudoers_line(user, helper)}"
    )


def _sudo_helper(command: list[str]) -> str | None:
    """The helper of a `sudo -n HELPER` command, else None."""
    if len(command) == 3 and _uses_sudo(command) and command[1] == "-n":
        return command[2]
    return None


def _uses_sudo(command: list[str]) -> bool:
    return bool(command) and os.path.basename(command[0]) == "sudo"


class DeviceOwner:
    """A running device owner process and the request/reply channel to it."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        command: list[str],
        on_event: EventCallback | None = None,
    ) -> None:
        self._process = process
        self._command = command
        self._on_event = on_event
        # Unsolicited frames, for whoever wants them (on_event sees them as well).
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 1
        self._write_lock = asyncio.Lock()
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self._gone: OwnerGone | None = None
        self._gone_event = asyncio.Event()
        self._closed = False
        self._reader_task = asyncio.create_task(self._read_replies())
        self._stderr_task = asyncio.create_task(self._read_stderr())

    @classmethod
    async def start(
        cls,
        command: list[str] | None = None,
        *,
        env: dict[str, str] | None = None,
        on_event: EventCallback | None = None,
        start_timeout: float = 15.0,
    ) -> DeviceOwner:
        """Start the owner and wait for its `hello`; raises OwnerStartError."""
        command = list(command) if command is not None else owner_command()
        if _uses_sudo(command) and shutil.which(command[0]) is None:
            raise OwnerStartError("sudo is not installed: " + sudo_fix_hint(_sudo_helper(command)))
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                # Out of the terminal's process group: the agent decides when the owner
                # stops (and sudo then has no tty to allocate a pty on).
                start_new_session=True,
            )
        except OSError as exc:
            raise OwnerStartError(f"cannot run {command[0]}: {exc}") from exc
        owner = cls(process, command, on_event)
        try:
            hello = await asyncio.wait_for(owner.request(OP_HELLO), start_timeout)
        except (TimeoutError, OwnerGone, OwnerError) as exc:
            await owner.close(timeout=5.0)
            raise OwnerStartError(owner._start_failure(exc)) from exc
        logger.info("device owner started (pid %s)", hello.get("pid"))
        return owner

    def _start_failure(self, exc: BaseException) -> str:
        tail = "\n".join(self._stderr_tail)
        what = "timed out" if isinstance(exc, TimeoutError) else str(exc)
        message = f"device owner `{' '.join(self._command)}` failed to start ({what})"
        if tail:
            message += f":\n{tail}"
        if _uses_sudo(self._command):
            message += "\n" + sudo_fix_hint(_sudo_helper(self._command))
        return message

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    @property
    def stderr_tail(self) -> list[str]:
        return list(self._stderr_tail)

    @property
    def closing(self) -> bool:
        """close() was called: the owner is going away on purpose."""
        return self._closed

    async def wait_gone(self) -> OwnerGone:
        """Return once the owner has exited or its pipe broke, with why."""
        await self._gone_event.wait()
        assert self._gone is not None
        return self._gone

    async def request(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request; returns the reply without `id` and `ok`."""
        if self._gone is not None:
            raise self._gone
        rid = self._next_id
        self._next_id += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            async with self._write_lock:
                assert self._process.stdin is not None
                try:
                    await write_frame(self._process.stdin, {"id": rid, "op": op, **args})
                except (ConnectionError, OSError):
                    await self._mark_gone()
                    assert self._gone is not None
                    raise self._gone from None
            reply = await future
        finally:
            self._pending.pop(rid, None)
        if not reply.get("ok"):
            raise OwnerError(str(reply.get("error", "unknown error")))
        return {k: v for k, v in reply.items() if k not in ("id", "ok")}

    async def _read_replies(self) -> None:
        assert self._process.stdout is not None
        try:
            while True:
                frame = await read_frame(self._process.stdout)
                if frame is None:
                    break
                self._dispatch(frame)
        except FrameError as exc:
            logger.error("device owner sent a broken stream: %s", exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("reading the device owner's replies failed")
        await self._mark_gone()

    def _dispatch(self, frame: dict[str, Any]) -> None:
        if "event" in frame and "id" not in frame:
            if self._on_event is not None:
                try:
                    self._on_event(frame)
                except Exception:
                    logger.exception("event callback failed")
            try:
                self.events.put_nowait(frame)
            except asyncio.QueueFull:
                logger.warning("dropping device owner event %s: queue full", frame.get("event"))
            return
        rid = frame.get("id")
        future = self._pending.get(rid) if isinstance(rid, int) else None
        if future is None and type(rid) is int and 0 < rid < self._next_id:
            # Its caller was cancelled (start-up stopped, a step gave up) before the reply.
            logger.debug("device owner reply to request %d, no longer awaited", rid)
        elif future is None:
            logger.warning("device owner reply to no pending request: %r", frame)
        elif not future.done():
            future.set_result(frame)

    async def _read_stderr(self) -> None:
        assert self._process.stderr is not None
        while True:
            try:
                line = await self._process.stderr.readline()
            except (OSError, ValueError) as exc:
                # ValueError: a line beyond the stream limit; the log is not worth dying for.
                logger.warning("reading the device owner's log failed: %s", exc)
                return
            if not line:
                return
            text = line.decode(errors="replace").rstrip()
            self._stderr_tail.append(text)
            level_name, _, rest = text.partition(" ")
            if level_name in _LEVELS:
                logger.log(logging.getLevelName(level_name), "owner: %s", rest)
            else:
                logger.info("owner: %s", text)

    async def _mark_gone(self) -> None:
        if self._gone is not None:
            return
        # stdout closed: the process is exiting, its status follows shortly.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._process.wait(), 5.0)
        # Its last log lines usually say why; let the stderr reader catch up with them.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._stderr_task), 1.0)
        tail = self._stderr_tail[-1] if self._stderr_tail else ""
        self._gone = OwnerGone(self._process.returncode, tail)
        self._gone_event.set()
        if not self._closed:
            logger.warning("%s", self._gone)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(self._gone)

    async def close(self, timeout: float = 10.0) -> int | None:
        """Ask the owner to remove everything and exit; escalate if it does not.

        Returns its exit status.
        """
        self._closed = True
        process = self._process
        if process.returncode is None and self._gone is None:
            try:
                await asyncio.wait_for(self.request(OP_SHUTDOWN), timeout)
            except (TimeoutError, OwnerGone, OwnerError) as exc:
                logger.warning("device owner shutdown request failed: %s", exc)
        if process.stdin is not None:
            # End of input is itself a shutdown request for the owner.
            with contextlib.suppress(Exception):
                process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            logger.warning("device owner did not exit, terminating it")
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                logger.error("device owner ignored SIGTERM, killing it")
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        for task in (self._reader_task, self._stderr_task):
            try:
                await asyncio.wait_for(task, 2.0)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
        return process.returncode

    async def __aenter__(self) -> DeviceOwner:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class EarlyOwner:
    """A device owner started before the code that uses it is imported: the owner's
    start (a process, its imports, its hello) is the slowest step of `join`, so it runs
    while the daemon's modules load. `take` is an OwnerFactory (daemon.OwnerFactory)
    handing over that owner, once; `discard` closes it if nobody took it."""

    def __init__(self, command: list[str] | None) -> None:
        self._command = command
        self._task: asyncio.Task[DeviceOwner] = asyncio.create_task(DeviceOwner.start(command))
        self._taken = False

    @classmethod
    async def start(cls, command: list[str] | None) -> EarlyOwner:
        """Start it; returns once the owner's process exists (the start's first step),
        so a blocking import that follows does not hold the spawn back."""
        early = cls(command)
        await asyncio.sleep(0)
        return early

    async def take(self, command: list[str] | None) -> DeviceOwner:
        if command != self._command:
            raise OwnerStartError(f"the device owner was started as {self._command!r}, "
                                  f"not {command!r}")
        self._taken = True
        return await self._task

    async def discard(self) -> None:
        if self._taken:
            return
        self._taken = True
        try:
            # Not cancelled mid-start: that would leave its process without a close.
            owner = await asyncio.shield(self._task)
        except (OwnerStartError, asyncio.CancelledError):
            return
        await owner.close()
