"""`kbwg-agent ping PEER`: sealed pings through the running agent, like `tailscale ping`.

Each ping is one control request (`ping`, agent/ping.py) answered with its outcome;
this side paces them, prints them and decides the exit status:

- without `--until-direct`: `count` pings, `interval` apart (a ping that took longer is
  followed at once); exit 0 when at least one pong came, 1 otherwise;
- with `--until-direct`: stop with exit 0 at the first pong over a direct or LAN path,
  exit 1 when `count` pings went by without one (relayed, or no answer);
- the agent unreachable or refusing the request (an unknown peer, say): its message and
  exit 1, at once.

`--json` prints one JSON object per line: `{"type": "ping", "seq": N, ...}` per ping
(the agent's reply) and a last `{"type": "summary", ...}`.
"""

from __future__ import annotations

import asyncio
import json
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from kbwg.agent.control import ControlError
from kbwg.core.printable import RENDER_LIMIT, printable, printable_tree

DIRECT_PATHS = ("direct", "direct-lan")
PATH_NAMES = {"direct-lan": "LAN", "direct": "direct", "relay": "relay"}
EXIT_OK = 0
EXIT_FAILED = 1

# One ping: the peer and the per-ping timeout, answered with the agent's reply.
PingCall = Callable[[str, float], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class PingOptions:
    peer: str
    count: int = 10
    timeout: float = 5.0
    interval: float = 1.0
    until_direct: bool = False
    json: bool = False


@dataclass
class PingTally:
    sent: int = 0
    rtts_ms: list[float] = field(default_factory=list)
    last: dict[str, Any] | None = None

    @property
    def direct(self) -> bool:
        return (self.last is not None and self.last.get("status") == "pong"
                and self.last.get("path") in DIRECT_PATHS)

    def to_json(self, peer: str, code: int) -> dict[str, Any]:
        rtts = self.rtts_ms
        return {
            "type": "summary",
            "peer": self.last["peer"] if self.last else peer,
            "sent": self.sent,
            "pongs": len(rtts),
            "path": self.last.get("path") if self.last else None,
            "direct": self.direct,
            "rtt_ms": {"min": round(min(rtts), 3), "avg": round(statistics.fmean(rtts), 3),
                       "max": round(max(rtts), 3)} if rtts else None,
            "exit": code,
        }


def describe_path(reply: dict[str, Any]) -> str:
    """`via direct (srflx 198.51.100.1:51820 -> host 203.0.113.9:51820)`."""
    path = PATH_NAMES.get(str(reply.get("path")), str(reply.get("path")))
    return f"via {path} ({reply.get('local_candidate')} -> {reply.get('remote_candidate')})"


def render_ping(reply: dict[str, Any], timeout: float) -> str:
    reply = printable_tree(reply, RENDER_LIMIT)  # no terminal controls from others
    who = f"{reply.get('peer')} ({reply.get('overlay_ip')})"
    status = reply.get("status")
    rtt = reply.get("rtt_ms")
    if status == "pong" and isinstance(rtt, int | float):
        return f"pong from {who} {describe_path(reply)} in {rtt:.2f} ms"
    if status == "timeout":
        return (f"no pong from {who} {describe_path(reply)} within {timeout:g} s"
                f" ({reply.get('reason')})")
    return f"no path to {who}: {reply.get('reason')}"


def render_summary(tally: PingTally, peer: str) -> str:
    name = printable(tally.last["peer"] if tally.last else peer, RENDER_LIMIT)
    line = f"--- {name}: {tally.sent} pings, {len(tally.rtts_ms)} pongs"
    if tally.rtts_ms:
        rtts = tally.rtts_ms
        line += (f", rtt min/avg/max {min(rtts):.2f}/{statistics.fmean(rtts):.2f}/"
                 f"{max(rtts):.2f} ms")
    return line


async def run_ping(options: PingOptions, call: PingCall, out: TextIO, err: TextIO) -> int:
    """Ping as `options` say; the exit status."""
    loop = asyncio.get_running_loop()
    tally = PingTally()
    code: int | None = None
    for seq in range(1, options.count + 1):
        started = loop.time()
        try:
            reply = await call(options.peer, options.timeout)
        except ControlError as exc:
            print(f"kbwg-agent: error: {printable(exc, RENDER_LIMIT)}", file=err)
            return EXIT_FAILED
        tally.sent += 1
        tally.last = reply
        if reply.get("status") == "pong" and isinstance(reply.get("rtt_ms"), int | float):
            tally.rtts_ms.append(float(reply["rtt_ms"]))
        if options.json:
            print(json.dumps({"type": "ping", "seq": seq, **reply}), file=out, flush=True)
        else:
            print(render_ping(reply, options.timeout), file=out, flush=True)
        if options.until_direct and tally.direct:
            code = EXIT_OK
            break
        if seq < options.count:
            await asyncio.sleep(max(0.0, started + options.interval - loop.time()))
    if code is None:
        code = EXIT_FAILED if options.until_direct or not tally.rtts_ms else EXIT_OK
    if options.json:
        print(json.dumps(tally.to_json(options.peer, code)), file=out, flush=True)
    else:
        print(render_summary(tally, options.peer), file=out)
        if options.until_direct and code != EXIT_OK:
            last = tally.last.get("path") if tally.last else None
            path = printable(PATH_NAMES.get(str(last), last or "none"), RENDER_LIMIT)
            print(f"kbwg-agent: direct connection not established after {tally.sent} "
                  f"pings (path: {path})", file=err)
    return code
