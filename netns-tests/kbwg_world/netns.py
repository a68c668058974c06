"""Thin wrappers around `ip netns` and process handling, shared by the world and the sweep."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

NS_PREFIX = "kbwg-"
# Temp dirs (logs, private run dirs) are named apart from other kbwg-* files in /tmp, so a
# sweep never touches files that are not a world's.
WORLD_DIR_PREFIX = "kbwgworld-"

# wireguard-go keeps its UAPI socket here, shared by every namespace (see DESIGN): each node
# gets its own directory bound over it so two nodes may use the same interface name.
WG_RUN_DIR = "/run/wireguard"

# `ip netns exec` already gives each command a fresh mount namespace, so a bind mount made
# there is private to that command and its children and vanishes with them.
_BIND_WRAPPER = 'mkdir -p "$1" && mount --bind "$0" "$1" && shift && exec "$@"'


def ns_argv(ns: str, argv: Sequence[str], private_run: str | None = None) -> list[str]:
    """The argv that runs `argv` inside namespace `ns` (optionally with a private WG run dir)."""
    if private_run is None:
        return ["ip", "netns", "exec", ns, *argv]
    return ["ip", "netns", "exec", ns, "sh", "-c", _BIND_WRAPPER, private_run, WG_RUN_DIR, *argv]


class CommandError(subprocess.CalledProcessError):
    """A failed command whose message includes its stderr (the default one hides it)."""

    def __str__(self) -> str:
        return f"{super().__str__()}: {(self.stderr or '').strip()[-2000:]}"


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = 30.0,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; on failure the error names the command and stderr."""
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, input=input_text, check=False
    )
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, list(argv), output=proc.stdout, stderr=proc.stderr)
    return proc


def list_namespaces(prefix: str = "") -> list[str]:
    """Names of the named network namespaces starting with `prefix`."""
    proc = run(["ip", "-j", "netns", "list"], check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return []
    names = [str(entry["name"]) for entry in json.loads(proc.stdout)]
    return [name for name in names if name.startswith(prefix)]


def namespace_pids(ns: str) -> list[int]:
    """Pids of all processes living in namespace `ns` (tracked by us or not).

    Never this process or its parents: a thread of ours may be inside `ns` for a moment
    (pyroute2's NetNS enters it), and `ip netns pids` would then list us.
    """
    proc = run(["ip", "netns", "pids", ns], check=False)
    ours = {os.getpid(), os.getppid()}
    return [int(tok) for tok in proc.stdout.split() if tok.isdigit() and int(tok) not in ours]


def _signal(pid: int, sig: int, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def terminate(proc: subprocess.Popen[bytes] | subprocess.Popen[str], grace: float = 2.0) -> None:
    """TERM the process group of `proc`, KILL it after `grace` seconds, and reap the process.

    Every popen of the world starts a new session, so pid == pgid and helpers it spawned die
    with it.
    """
    if proc.poll() is None:
        _signal(proc.pid, signal.SIGTERM, group=True)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    # The leader may be gone while its children still run: KILL the group in any case.
    _signal(proc.pid, signal.SIGKILL, group=True)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)


def kill_namespace_processes(ns: str, grace: float = 1.0) -> None:
    """TERM, then KILL, whatever still runs inside `ns`, so that deleting it frees everything."""
    pids = namespace_pids(ns)
    for pid in pids:
        _signal(pid, signal.SIGTERM, group=False)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if _alive(pid)]
        time.sleep(0.02)
    for pid in pids:
        _signal(pid, signal.SIGKILL, group=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purpose (its parent will reap it); /proc tells them apart.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def delete_namespace(ns: str) -> None:
    """Kill the processes of `ns` and delete it; its veths and bridges go with it."""
    kill_namespace_processes(ns)
    run(["ip", "netns", "delete", ns], check=False)


def sweep(prefix: str = "kbwg-", dry_run: bool = False) -> list[str]:
    """Delete every namespace whose name starts with `prefix`; return their names.

    The worlds' temp directories (`kbwgworld-<run id>-*`) matching the prefix go too.
    """
    if not prefix.startswith(NS_PREFIX):
        raise ValueError(f"refusing to sweep {prefix!r}: only kbwg- names belong to the world")
    found = list_namespaces(prefix)
    run_part = prefix.removeprefix(NS_PREFIX)
    dirs = sorted(Path(tempfile.gettempdir()).glob(f"{WORLD_DIR_PREFIX}{run_part}*"))
    if not dry_run:
        for ns in found:
            delete_namespace(ns)
        for path in dirs:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
    return found
