"""`keybase ctl stop|start|status`: the stand-in's "service", which tests stop and start
to play a Keybase outage.

The real client talks to a per-machine service over a socket. With the service stopped
(and no auto-fork), every command fails to dial it: Linux clients print ``▶ ERROR dial
unix .../keybased.sock: connect: no such file or directory`` and exit 2, and a running
`chat api-listen` exits with ``connection to service lost: error during ping: ...`` (its
one-second ping, cmd_chat_api_listen.go). The stand-in keeps that state as a marker file
in ``KBWG_STANDIN_HOME``: ``service.stopped`` stops it for every device (the whole
Keybase is away), ``service.stopped.<user>.<device>`` for one device only (one
machine's service is down). `ctl stop` with ``KBWG_STANDIN_USER``/``KBWG_STANDIN_DEVICE``
set stops that device's service, without them every service.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from kbwg_standin.env import Identity
from kbwg_standin.errors import EXIT_NOTOK, EXIT_OK, die

STOPPED_ALL = "service.stopped"
# How often a running `chat api` pipe looks at the marker (api-listen looks at every poll).
WATCH_INTERVAL_S = 0.1


def marker(home: Path, username: str | None = None, device: str | None = None) -> Path:
    if username and device:
        return home / f"{STOPPED_ALL}.{username.strip().lower()}.{device.strip()}"
    return home / STOPPED_ALL


def stop_service(home: Path, username: str | None = None, device: str | None = None) -> None:
    """Stop the service of one device (or, without a device, of everyone)."""
    home.mkdir(parents=True, exist_ok=True)
    marker(home, username, device).touch()


def start_service(home: Path, username: str | None = None, device: str | None = None) -> None:
    """Start it again; `start` without a device starts every service."""
    if username and device:
        marker(home, username, device).unlink(missing_ok=True)
        return
    for path in home.glob(f"{STOPPED_ALL}*"):
        path.unlink(missing_ok=True)


def is_stopped(home: Path, identity: Identity | None) -> bool:
    if marker(home).exists():
        return True
    return identity is not None and marker(home, identity.username, identity.device).exists()


def dial_error(home: Path) -> str:
    """What the real Linux client says when it cannot reach its service."""
    return f"dial unix {home / 'keybased.sock'}: connect: no such file or directory"


LOST = "connection to service lost: error during ping: EOF"


def watch(home: Path, identity: Identity | None, on_stop: Callable[[], None]) -> None:
    """Call `on_stop` (from a daemon thread) once this device's service is stopped."""
    import threading  # only `chat api` watches; every other command is a quick exit


    def run() -> None:
        while not is_stopped(home, identity):
            time.sleep(WATCH_INTERVAL_S)
        on_stop()

    threading.Thread(target=run, name="service-watch", daemon=True).start()


def cmd_ctl(home: Path, identity: Identity | None, args: Sequence[str]) -> int:
    if len(args) != 1 or args[0] not in ("stop", "start", "status"):
        die("usage: keybase ctl stop|start|status")
    user = identity.username if identity else None
    device = identity.device if identity else None
    if args[0] == "stop":
        stop_service(home, user, device)
    elif args[0] == "start":
        start_service(home, user, device)
    else:
        stopped = is_stopped(home, identity)
        print("stopped" if stopped else "running")
        return EXIT_NOTOK if stopped else EXIT_OK
    return EXIT_OK
