"""Where a running agent keeps its control socket and runtime files.

Several agents can run on one machine (one per network namespace in tests), each with
its own state dir; a lock file keeps two agents from sharing one.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

ENV_STATE_DIR = "KBWG_STATE_DIR"
LOCK_NAME = "agent.lock"


class StateDirBusy(RuntimeError):
    pass


def resolve_state_dir(cli_value: str | None) -> Path:
    if cli_value:
        return Path(cli_value)
    if os.environ.get(ENV_STATE_DIR):
        return Path(os.environ[ENV_STATE_DIR])
    if os.geteuid() == 0:
        return Path("/run/kbwg-agent")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "kbwg-agent"
    return Path.home() / ".local" / "state" / "kbwg-agent"


def lock_state_dir(state_dir: Path) -> IO[str]:
    """Create the state dir (0700) and hold its lock for the life of the agent."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    handle = open(state_dir / LOCK_NAME, "a+")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        handle.close()
        raise StateDirBusy(
            f"another agent is already running with state dir {state_dir}; "
            "stop it first or give this one its own --state-dir"
        ) from exc
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle
