"""External programs the owner runs, found only in root-owned system directories and
started with a fixed environment: whatever PATH, LD_* or locale the agent's user had
must not choose what runs as root."""

from __future__ import annotations

import os
import stat

# Searched in this order; PATH is never consulted.
SYSTEM_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/sbin", "/usr/local/bin")
FIXED_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def find_tool(name: str) -> str | None:
    """The absolute path of `name` in SYSTEM_DIRS, skipping any candidate (or directory)
    that someone other than root could have replaced."""
    if "/" in name or not name:
        return None
    for directory in SYSTEM_DIRS:
        if not _root_only(directory, want_dir=True):
            continue
        path = os.path.join(directory, name)
        if _root_only(path, want_dir=False) and os.access(path, os.X_OK):
            return path
    return None


def _root_only(path: str, want_dir: bool) -> bool:
    try:
        # Symlinks are followed (/sbin -> usr/sbin on merged-/usr systems); the target
        # is what gets checked.
        info = os.stat(path)
    except OSError:
        return False
    kind_ok = stat.S_ISDIR(info.st_mode) if want_dir else stat.S_ISREG(info.st_mode)
    return kind_ok and info.st_uid == 0 and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def clean_env(**extra: str) -> dict[str, str]:
    """The whole environment of a child process: the fixed PATH and `extra`, nothing
    inherited."""
    return {"PATH": FIXED_PATH, **extra}
