"""`keybase fs read/write/mkdir/ls/stat/rm`: KBFS as a plain folder tree under
``$KBWG_STANDIN_HOME/kbfs/``, with team and private folder permissions."""

from __future__ import annotations

import contextlib
import fcntl
import os
import posixpath
import stat as stat_mod
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple, NoReturn

from kbwg_standin.env import Env
from kbwg_standin.errors import EXIT_OK, die


class KbfsPath(NamedTuple):
    shown: str  # as the user wrote it, for messages
    kbfs: str  # normalised KBFS path, e.g. /team/t/x
    local: Path


def kbfs_path(env: Env, arg: str) -> KbfsPath:
    if arg.startswith("keybase://"):
        rest = "/" + arg[len("keybase://") :]
    elif arg == "/keybase" or arg.startswith("/keybase/"):
        rest = arg[len("/keybase") :] or "/"
    else:
        die(f"{arg}: not a KBFS path (KBFS paths start with /keybase/ or keybase://)")
    norm = posixpath.normpath("/" + rest.lstrip("/"))
    if norm.startswith("//"):
        norm = norm[1:]
    parts = [p for p in norm.split("/") if p]
    if parts and parts[0] not in ("team", "private", "public"):
        die(f"{arg}: file does not exist")
    return KbfsPath(arg, norm, env.home.joinpath("kbfs", *parts))


def check_kbfs_access(env: Env, path: KbfsPath, write: bool) -> None:
    parts = [p for p in path.kbfs.split("/") if p]
    if len(parts) < 2:
        return
    me = env.identity
    if me is None:
        die("Login required: you are not logged into Keybase")
    kind, folder = parts[0], parts[1]
    if kind == "team":
        if not env.is_team_member(folder, me.username):
            die(f"{path.shown}: permission denied: {me.username} is not a member of team {folder}")
    elif kind == "private":
        if me.username not in folder.lower().split(","):
            die(f"{path.shown}: permission denied")
    elif kind == "public" and write and me.username not in folder.lower().split(","):
        die(f"{path.shown}: permission denied")


def _is_tlf_root_or_above(path: KbfsPath) -> bool:
    return len([p for p in path.kbfs.split("/") if p]) <= 2


def _not_found(path: KbfsPath) -> NoReturn:
    # Inside a folder real KBFS names the first missing entry (libkbfs NoSuchNameError,
    # "<name> doesn't exist"), not the whole path.
    below = [p for p in path.kbfs.split("/") if p][2:]
    entry = path.local.parents[len(below) - 1] if below else path.local
    for name in below:
        entry = entry / name
        if not entry.exists():
            die(f"{name} doesn't exist")
    die(f"{path.shown}: file does not exist")


def atomic_write(target: Path, data: bytes) -> None:
    # tempfile (with shutil and random) only for writes: `fs read` is a new process
    # each time the agent starts, and reads are most of them.
    import tempfile

    # Readers must never see half a file: write beside it, then rename over it.
    fd, tmp = tempfile.mkstemp(prefix=".standin-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def cmd_fs(env: Env, args: Sequence[str]) -> int:
    if not args:
        die("fs: missing subcommand (read, write, mkdir, ls, stat, rm)")
    sub, rest = args[0], list(args[1:])
    flags = [a for a in rest if a.startswith("-") and a != "-"]
    positional = [a for a in rest if not (a.startswith("-") and a != "-")]
    if sub in ("-b", "--buffersize"):
        die("fs: flags go after the subcommand")
    # -b/--buffersize and --rev take a value; drop it from the positionals.
    for flag in ("-b", "--buffersize", "--rev"):
        if flag in rest:
            idx = rest.index(flag)
            if idx + 1 < len(rest) and rest[idx + 1] in positional:
                positional.remove(rest[idx + 1])
    if not positional:
        die(f"fs {sub}: missing path")
    handlers: dict[str, Callable[[Env, list[KbfsPath], list[str]], int]] = {
        "read": _fs_read,
        "write": _fs_write,
        "mkdir": _fs_mkdir,
        "ls": _fs_ls,
        "stat": _fs_stat,
        "rm": _fs_rm,
    }
    handler = handlers.get(sub)
    if handler is None:
        die(f"fs {sub}: not supported by the keybase stand-in")
    paths = [kbfs_path(env, p) for p in positional]
    return handler(env, paths, flags)


def _fs_read(env: Env, paths: list[KbfsPath], _flags: list[str]) -> int:
    path = paths[0]
    check_kbfs_access(env, path, write=False)
    try:
        data = path.local.read_bytes()
    except FileNotFoundError:
        _not_found(path)
    except IsADirectoryError:
        die(f"{path.shown}: is a directory")
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return EXIT_OK


def _fs_write(env: Env, paths: list[KbfsPath], flags: list[str]) -> int:
    path = paths[0]
    if _is_tlf_root_or_above(path):
        die(f"{path.shown}: cannot write to a folder root")
    check_kbfs_access(env, path, write=True)
    parent = path.local.parent
    if not parent.is_dir():
        if len([p for p in path.kbfs.split("/") if p]) == 3:
            # The team/private/public folder itself always exists in real KBFS.
            parent.mkdir(parents=True, exist_ok=True)
        else:
            die(f"{path.shown}: parent folder does not exist (create it with keybase fs mkdir)")
    if path.local.is_dir():
        die(f"{path.shown}: is a directory")
    data = sys.stdin.buffer.read()
    if "-a" in flags or "--append" in flags:
        # Appends are read-modify-write; serialise them per file. The lock lives outside
        # the KBFS tree so listings stay clean.
        import hashlib  # only for appends: `fs read` is a new process each time

        lock_dir = env.home / "kbfs-locks"
        lock_dir.mkdir(exist_ok=True)
        lock_path = lock_dir / hashlib.sha256(path.kbfs.encode()).hexdigest()
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                old = path.local.read_bytes()
            except FileNotFoundError:
                old = b""
            atomic_write(path.local, old + data)
    else:
        atomic_write(path.local, data)
    return EXIT_OK


def _fs_mkdir(env: Env, paths: list[KbfsPath], _flags: list[str]) -> int:
    for path in paths:
        check_kbfs_access(env, path, write=True)
        if path.local.exists() and not path.local.is_dir():
            die(f"{path.shown}: file exists")
        path.local.mkdir(parents=True, exist_ok=True)
    return EXIT_OK


def _entry_exists(path: KbfsPath) -> bool:
    return path.local.exists() or _is_tlf_root_or_above(path)


def _fs_ls(env: Env, paths: list[KbfsPath], flags: list[str]) -> int:
    long = "-l" in flags or "--long" in flags
    for path in paths:
        check_kbfs_access(env, path, write=False)
        if not _entry_exists(path):
            _not_found(path)
        if path.local.is_file():
            names = [path.local.name]
            base = path.local.parent
        else:
            base = path.local
            names = sorted(
                n
                for n in (os.listdir(base) if base.is_dir() else [])
                if not n.startswith(".standin-")
            )
        for name in names:
            if long:
                st = (base / name).stat()
                kind = "DIR" if stat_mod.S_ISDIR(st.st_mode) else "FILE"
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_mtime))
                print(f"{stamp}\t{kind}\t{st.st_size}\t{name}")
            else:
                print(name)
    return EXIT_OK


def _fs_stat(env: Env, paths: list[KbfsPath], _flags: list[str]) -> int:
    path = paths[0]
    check_kbfs_access(env, path, write=False)
    if not path.local.exists():
        if _is_tlf_root_or_above(path):
            path.local.mkdir(parents=True, exist_ok=True)
        else:
            _not_found(path)
    st = path.local.stat()
    kind = "DIR" if stat_mod.S_ISDIR(st.st_mode) else "FILE"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(st.st_mtime))
    writer = env.identity.username if env.identity else ""
    print(path.shown)
    print(f"{stamp}\t{kind}\t{st.st_size}\t{path.local.name}\t{writer}\tComplete")
    return EXIT_OK


def _fs_rm(env: Env, paths: list[KbfsPath], flags: list[str]) -> int:
    recursive = "-r" in flags or "--recursive" in flags
    for path in paths:
        check_kbfs_access(env, path, write=True)
        if _is_tlf_root_or_above(path):
            die(f"{path.shown}: cannot remove a folder root")
        if not path.local.exists():
            _not_found(path)
        if path.local.is_dir():
            if not recursive:
                die(f"{path.shown}: is a directory (use -r)")
            for root, dirs, files in os.walk(path.local, topdown=False):
                for name in files:
                    os.unlink(os.path.join(root, name))
                for name in dirs:
                    os.rmdir(os.path.join(root, name))
            os.rmdir(path.local)
        else:
            path.local.unlink()
    return EXIT_OK
