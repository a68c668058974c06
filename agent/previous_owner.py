"""The device owner of the agent that last ran with this state dir: recorded while it
runs, waited for by the next agent before it creates its device.

An agent killed outright (SIGKILL, the OOM killer) cannot stop its device owner. The
owner sees the end of its input and removes the device by itself, but that takes a
moment, and a `join` started again at once (by hand, or by a service manager) would
otherwise find the interface still there and fail with "interface kbwg0 already exists".
So each agent records its owner's pid in the state dir, with the process's start time
(a pid can be reused), and the next agent waits for a recorded owner that still runs.

The pid is the process the agent started: the owner itself, or `sudo`, which lives as
long as the helper it runs. /proc/PID/stat is readable by every user, so an
unprivileged agent can watch a root owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from kbwg.agent.join_options import JoinError
from kbwg.agent.statedir import read_private, write_private

log = logging.getLogger(__name__)

OWNER_FILE = "owner.pid"
WAIT_S = 20.0
POLL_S = 0.05
_MAX_BYTES = 100


@dataclass(frozen=True)
class OwnerRecord:
    pid: int
    # Clock ticks since boot (/proc/PID/stat field 22): tells a reused pid apart.
    start_time: int

    def running(self) -> bool:
        return process_start_time(self.pid) == self.start_time


def process_start_time(pid: int) -> int | None:
    """The start time of a live (not zombie) process, or None when there is none."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            text = handle.read().decode(errors="replace")
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields follow the last ")".
    fields = text.rpartition(")")[2].split()
    try:
        # fields[0] is field 3 (the state), so field 22 is fields[19].
        return None if fields[0] == "Z" else int(fields[19])
    except (IndexError, ValueError):
        return None


def record(state_dir: Path, pid: int) -> None:
    """Remember the running owner; a failure only costs the wait after a hard kill."""
    start_time = process_start_time(pid)
    if start_time is None:
        return  # not a process (or gone already): nothing to wait for later
    path = state_dir / OWNER_FILE
    try:
        write_private(path, f"{pid} {start_time}\n")
    except OSError as exc:
        log.warning("cannot write %s: %s", path, exc)


def load(state_dir: Path) -> OwnerRecord | None:
    path = state_dir / OWNER_FILE
    try:
        data = read_private(path, _MAX_BYTES)
        if data is None:
            return None
        pid_text, start_text = data.decode("ascii").split()
        return OwnerRecord(int(pid_text), int(start_text))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        log.warning("ignoring %s (%s)", path, exc)
        return None


def forget(state_dir: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(state_dir / OWNER_FILE)


async def wait_for_previous(state_dir: Path, timeout: float = WAIT_S) -> None:
    """Return once the previous agent's owner (if any still runs) has exited; raises
    JoinError, saying what to do, if it is still there after `timeout`."""
    previous = load(state_dir)
    if previous is None or not previous.running():
        return
    log.info("the device owner of the previous agent (pid %d) still runs: waiting for it "
             "to remove its device", previous.pid)
    started = time.monotonic()
    while previous.running():
        if time.monotonic() - started > timeout:
            raise JoinError(
                f"the device owner of the previous agent with state dir {state_dir} (pid "
                f"{previous.pid}) still runs after {timeout:.0f}s; it removes its device and "
                "exits once it notices its agent is gone. If it is stuck, stop it (`sudo "
                f"kill {previous.pid}`) and start `kbwg-agent join` again")
        await asyncio.sleep(POLL_S)
    log.info("the previous device owner exited after %.1fs", time.monotonic() - started)
