"""The device owner's network watch (owner/netlink_watch.py) on real netlink, for IPv6:
a new, gone or newly unusable address is a change; the kernel's refresh of what it
already has (each router advertisement renews lifetimes) is not, or every RA would make
every agent gather again."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from typing import IO

import pytest

from kbwg_world import World

pytestmark = pytest.mark.netns

# Prints each change the watch reports as a JSON line; "ready" once it watches.
WATCH = """
import asyncio, json, logging, sys
from kbwg.owner.netlink_watch import watch_netlink

class Ready(logging.Handler):
    def emit(self, record):
        if "watching the network" in record.getMessage():
            print("ready", flush=True)

logging.getLogger("kbwg.owner.netlink_watch").addHandler(Ready())
logging.getLogger("kbwg.owner.netlink_watch").setLevel(logging.INFO)

def seen(change):
    print(json.dumps([change.change, change.ifname]), flush=True)

asyncio.run(watch_netlink(seen, lambda: None))
"""


def lines(stream: IO[str]) -> queue.Queue[str]:
    found: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            found.put(line.strip())

    threading.Thread(target=pump, daemon=True).start()
    return found


def until(found: queue.Queue[str], wanted: str, timeout: float = 10.0) -> list[str]:
    """The lines up to and including `wanted`."""
    got: list[str] = []
    while True:
        try:
            line = found.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no {wanted!r} within {timeout}s; got {got}") from None
        got.append(line)
        if line == wanted:
            return got


def test_ipv6_changes_are_seen_and_refreshes_are_not(world: World) -> None:
    inet = world.internet(ipv6="2001:db8::/64")
    host = world.server("h", inet)
    watch = host.popen([sys.executable, "-c", WATCH], stdout=subprocess.PIPE, text=True)
    assert watch.stdout is not None
    found = lines(watch.stdout)
    until(found, "ready")
    # A marker: an IPv4 address (always a change) on another interface, reported after
    # whatever went before it.
    markers = iter(range(20, 40))

    def marker() -> str:
        host.run(["ip", "addr", "add", f"198.51.100.{next(markers)}/32", "dev", "lo"])
        return json.dumps(["RTM_NEWADDR", "lo"])

    def v6(got: list[str]) -> list[str]:
        return got[:-1]  # the marker's own line is last

    extra = "2001:db8::77"
    host.run(["ip", "-6", "addr", "add", f"{extra}/64", "dev", "eth0", "nodad",
              "valid_lft", "600", "preferred_lft", "600"])
    assert json.dumps(["RTM_NEWADDR", "eth0"]) in v6(until(found, marker()))

    # The refresh a router advertisement makes: the same address, new lifetimes.
    host.run(["ip", "-6", "addr", "change", f"{extra}/64", "dev", "eth0",
              "valid_lft", "900", "preferred_lft", "900"])
    # A known route added again the same way.
    route = ["2001:db8:99::/64", "via", "2001:db8::1", "dev", "eth0"]
    host.run(["ip", "-6", "route", "add", *route])
    host.run(["ip", "-6", "route", "replace", *route])
    got = v6(until(found, marker()))
    assert got == [json.dumps(["RTM_NEWROUTE", "eth0"])], got

    # Deprecated: the kernel will not pick it for new traffic, so candidates change.
    host.run(["ip", "-6", "addr", "change", f"{extra}/64", "dev", "eth0",
              "valid_lft", "900", "preferred_lft", "0"])
    assert json.dumps(["RTM_NEWADDR", "eth0"]) in v6(until(found, marker()))

    host.run(["ip", "-6", "addr", "del", f"{extra}/64", "dev", "eth0"])
    host.run(["ip", "-6", "route", "del", "2001:db8:99::/64"])
    got = v6(until(found, marker()))
    assert json.dumps(["RTM_DELADDR", "eth0"]) in got
    assert json.dumps(["RTM_DELROUTE", "eth0"]) in got
    watch.terminate()
    watch.wait(timeout=10)
