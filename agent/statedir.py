"""Where a running agent keeps its control socket and runtime files.

Several agents can run on one machine (one per network namespace in tests), each with
its own state dir; a lock file keeps two agents from sharing one.

The agent (often root) creates, truncates and replaces files there, so the directory
must be its own: a real directory (not a symlink), owned by the effective uid and not
writable by group or others. Otherwise another local user could point the agent's writes
at a file of their choosing or swap its control socket. `status` and `diag --state-dir`
only connect to the socket and check nothing here: root may query a user's agent.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
from pathlib import Path
from typing import IO

ENV_STATE_DIR = "KBWG_STATE_DIR"
LOCK_NAME = "agent.lock"
# The control socket's name (kbwg.agent.control imports it from here).
SOCKET_NAME = "control.sock"
DIR_MODE = 0o700
FILE_MODE = 0o600


class StateDirBusy(RuntimeError):
    pass


class StateDirUnsafe(PermissionError):
    """The state dir is not a private directory of this user.

    An OSError, so whoever reports the state dir's OSErrors reports this one too."""


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


def _unsafe(state_dir: Path, problem: str, fix: str) -> StateDirUnsafe:
    return StateDirUnsafe(
        f"state dir {state_dir} {problem}; {fix}, or give the agent another --state-dir "
        f"(or ${ENV_STATE_DIR})")


def _open_dir(state_dir: Path) -> int:
    """The state dir opened without following a symlink in its last component."""
    try:
        return os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        if state_dir.is_symlink():
            raise _unsafe(state_dir, "is a symbolic link",
                          "pass the directory it points to, if you trust it, "
                          "or remove the link") from exc
        raise _unsafe(state_dir, "is not a directory", "remove it") from exc


def check_dir_stat(state_dir: Path, st: os.stat_result) -> None:
    """Refuse a state dir that is not a directory of ours closed to everyone else."""
    if not stat.S_ISDIR(st.st_mode):
        raise _unsafe(state_dir, "is not a directory", "remove it")
    uid = os.geteuid()
    if st.st_uid != uid:
        raise _unsafe(state_dir, f"is owned by uid {st.st_uid}, not by this user "
                      f"(uid {uid})", f"`chown {uid} {state_dir}` if it is meant for "
                      "this agent")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise _unsafe(state_dir, f"is writable by group or others (mode "
                      f"{stat.S_IMODE(st.st_mode):04o})", f"`chmod 700 {state_dir}`")


def open_state_dir(state_dir: Path) -> int:
    """Create the state dir (0700) if missing, check it and return an fd of it.

    The checks run on the opened directory (fstat), so a rename between check and use
    cannot substitute another one.
    """
    try:
        state_dir.parent.mkdir(parents=True, exist_ok=True)
        state_dir.mkdir(mode=DIR_MODE)
        created = True
    except FileExistsError:
        created = False
    fd = _open_dir(state_dir)
    try:
        if created:
            os.fchmod(fd, DIR_MODE)  # mkdir's mode is masked by the umask
        check_dir_stat(state_dir, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_state_dir(state_dir: Path) -> None:
    """Create and check the state dir, for anything that writes there."""
    os.close(open_state_dir(state_dir))


def _check_socket_slot(state_dir: Path, dir_fd: int) -> None:
    # A leftover control socket is replaced at start; anything else there was not made
    # by an agent and is left alone (kbwg.agent.control refuses it too, later).
    try:
        st = os.stat(SOCKET_NAME, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        path = state_dir / SOCKET_NAME
        raise _unsafe(state_dir, f"holds {path}, which is not a socket (an agent never "
                      "made it)", "look at it and remove it if it is not needed")


def lock_state_dir(state_dir: Path) -> IO[str]:
    """Create the state dir (0700), check it and hold its lock for the life of the agent."""
    dir_fd = open_state_dir(state_dir)
    try:
        _check_socket_slot(state_dir, dir_fd)
        # O_NOFOLLOW and no O_TRUNC: a symlink planted as agent.lock is refused, never
        # followed, and a file is only truncated once it is known to be ours and locked.
        try:
            fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                         | os.O_NONBLOCK, FILE_MODE, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _unsafe(state_dir, f"holds {state_dir / LOCK_NAME} as a symbolic link",
                              "remove the link") from exc
            raise
    finally:
        os.close(dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _unsafe(state_dir, f"holds {state_dir / LOCK_NAME}, which is not a "
                          "regular file", "remove it")
        handle = os.fdopen(fd, "r+")  # held until exit
    except BaseException:
        os.close(fd)
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise StateDirBusy(
                f"another agent is already running with state dir {state_dir}; "
                "stop it first or give this one its own --state-dir"
            ) from exc
        if os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, FILE_MODE)  # older agents made it 0644
        os.ftruncate(fd, 0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
    except BaseException:
        with contextlib.suppress(OSError):
            handle.close()
        raise
    return handle


def read_private(path: Path, limit: int, owner_only: bool = False) -> bytes | None:
    """A small file the agent wrote into its state dir; None if there is none.

    O_NOFOLLOW and a regular file only: never a link or a FIFO someone put there (reading
    one could block or read another file). `owner_only`: a secret, refused when group or
    others may read it (checked on the file read, not on its path). Raises OSError (ELOOP
    for a link) or ValueError (not a regular file, readable by others, over `limit`
    bytes).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if owner_only and mode & 0o077:
            raise ValueError(f"others may have read it (mode {mode:04o})")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError("too large")
    return data


def joining_agent(state_dir: Path) -> int | None:
    """The pid of a `join` that holds `state_dir` but has no control socket yet (still
    starting, or waiting for Keybase or the network), from the pid its lock file
    records; None when that process is gone or is no `join` (a stale file)."""
    try:
        raw = read_private(state_dir / LOCK_NAME, 32)
        pid = int(raw or b"")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if b"join" in argv else None


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` through a fresh private temp file renamed over it: never a
    fixed name someone could have planted, never half written. Raises OSError."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
