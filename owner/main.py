"""Entry point of the privileged device owner: `python -I -m kbwg.owner` or the installed
`kbwg-owner` script (`from kbwg.owner.main import main; main()`).

It runs as root on behalf of an unprivileged agent, so before anything else it sheds
what the caller could have chosen: the working directory, the umask, the environment
and any import path outside the installation. Then it reads the local policy and
serves frames on stdin/stdout.

Start-up is on the agent's critical path (issue 13: `join` is timed from process
start): the owner imports only what answering `hello` needs, and pyroute2's route
socket (needed by the first `create`) is imported in a thread meanwhile, while the
agent is still reading the team's files; pyroute2's own `__init__`, which loads every
netlink family it has, is skipped (kbwg.core.deferred_init).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import stat
import sys
import threading
from pathlib import Path

from kbwg.core.deferred_init import defer_init
from kbwg.owner.policy import DEFAULT_POLICY_PATH, OwnerPolicy, PolicyError, load_policy
from kbwg.owner.rawstun import RawStunSocket
from kbwg.owner.route_reaper import ReapedNetConfig
from kbwg.owner.server import OwnerServer, serve_stdio
from kbwg.owner.tools import FIXED_PATH
from kbwg.owner.wg_backend import select_backend

logger = logging.getLogger(__name__)

EXIT_BAD_POLICY = 2
EXIT_BAD_STDIO = 2
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
PRELOAD_JOIN_S = 5.0


# Descriptors the owner may hold: netlink and UAPI sockets per request in flight, the
# raw STUN sockets, pipes to wireguard-go and the route reaper.
OWNER_NOFILE = 4096


def lift_limits() -> None:
    """sudo keeps the invoking user's resource limits for the command. A CPU-time limit
    ends the owner with SIGKILL (no cleanup runs), a small descriptor limit fails its
    netlink sockets (cleanup's too), and a core file would hold the device's private key:
    root lifts the first two and forbids core files."""
    changes = [
        (resource.RLIMIT_CPU, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)),
        (resource.RLIMIT_CORE, (0, 0)),
    ]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < OWNER_NOFILE:
        if hard != resource.RLIM_INFINITY:
            hard = max(hard, OWNER_NOFILE)
        changes.append((resource.RLIMIT_NOFILE, (OWNER_NOFILE, hard)))
    for limit, value in changes:
        try:
            resource.setrlimit(limit, value)
        except (OSError, ValueError) as exc:  # not root (a test), or a kernel cap
            logger.debug("could not set resource limit %d to %s: %s", limit, value, exc)


def harden() -> None:
    """Leave nothing of the caller's choosing in effect: cwd, umask, environment (which
    children inherit), resource limits and import path entries that are relative or the
    caller's cwd (modules such as pyroute2's parts are imported lazily, later)."""
    lift_limits()
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = None
    os.chdir("/")
    os.umask(0o077)
    os.environ.clear()
    os.environ["PATH"] = FIXED_PATH
    sys.path[:] = [
        entry for entry in sys.path
        if entry and os.path.isabs(entry) and (cwd is None or entry != cwd)
    ]  # fmt: skip


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # pyroute2 dumps every netlink message at DEBUG, which drowns the owner's own log.
    logging.getLogger("pyroute2").setLevel(logging.WARNING)


def preload() -> threading.Thread:
    """Import pyroute2's route socket in the background (after `harden`: the import
    path is ours)."""
    defer_init("pyroute2")
    thread = threading.Thread(target=_import_netlink, name="preload", daemon=True)
    thread.start()
    return thread


def _import_netlink() -> None:
    try:
        import pyroute2.iproute.linux  # noqa: F401  (imported for its side effect: loaded)
    except Exception:  # the first request that needs it reports the problem
        logger.debug("preloading pyroute2 failed", exc_info=True)


def stdio_problem() -> str | None:
    """Why stdin/stdout cannot carry frames, or None. Only the agent starts the owner,
    always on pipes (or a socket): a terminal would mangle binary frames and wait
    forever, and a file or /dev/null cannot be waited on."""
    for fd, name in ((0, "stdin"), (1, "stdout")):
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            return f"{name} is closed"
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            return f"{name} is not a pipe"
    return None


def build_server(policy: OwnerPolicy) -> OwnerServer:
    return OwnerServer(ReapedNetConfig(), select_backend, policy, RawStunSocket.open)


def main(argv: list[str] | None = None) -> None:
    harden()
    parser = argparse.ArgumentParser(
        prog="kbwg-owner",
        description="kbwg privileged device owner (frames on stdin/stdout, logs on stderr)",
    )
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)
    parser.add_argument("--policy", type=Path, default=DEFAULT_POLICY_PATH,
                        help=f"root-owned policy file (default: {DEFAULT_POLICY_PATH})")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    if not sys.flags.isolated:
        logger.debug("not started with `python -I`: PYTHON* variables and the user site "
                     "directory were honoured at startup")
    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        print(f"kbwg-owner: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_POLICY)
    problem = stdio_problem()
    if problem is not None:
        print(f"kbwg-owner: {problem}: the device owner speaks only to kbwg-agent, which "
              "starts it with pipes; run `kbwg-agent join` instead", file=sys.stderr)
        sys.exit(EXIT_BAD_STDIO)
    logger.info("policy: overlay within %s", policy.overlay)
    preloading = preload()
    code = asyncio.run(serve_stdio(build_server(policy)))
    # An owner told to stop at once must not exit in the middle of an import.
    preloading.join(PRELOAD_JOIN_S)
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    sys.exit(code)
