"""One request/answer exchange with the gateway over UDP, retransmitted on a schedule.

The socket is connected to the gateway, so only its answers arrive and an ICMP port
unreachable (nothing listening) ends the exchange at once as "refused". Datagrams the
decoder rejects are logged and ignored; if nothing decodable came before the last
timeout, the error says the gateway answered garbage. Anything on the LAN can send them
from the gateway's address, as fast as it likes: their log lines are limited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

from kbwg.core.loglimit import LimitedLog
from kbwg.portmap.mapping import PortmapError

log = logging.getLogger(__name__)

T = TypeVar("T")

# RFC 6886 starts at 250 ms and doubles; three tries keep a silent gateway under 2 s.
DEFAULT_WAITS: tuple[float, ...] = (0.25, 0.5, 1.0)


class Garbage(ValueError):
    """A datagram that is not a well-formed answer to our request."""


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | OSError] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, OSError):
            self.queue.put_nowait(exc)


async def exchange(gateway: tuple[str, int], local_ip: str | None, request: bytes,
                   decode: Callable[[bytes], T], what: str,
                   waits: Sequence[float] = DEFAULT_WAITS) -> T:
    """Send `request` to `gateway` until `decode` accepts an answer (raising `Garbage`
    for one it rejects); `what` names the protocol in messages."""
    loop = asyncio.get_running_loop()
    try:
        transport, proto = await loop.create_datagram_endpoint(
            _Protocol, local_addr=(local_ip or "0.0.0.0", 0), remote_addr=gateway)
    except OSError as exc:
        raise PortmapError("error", f"{what}: cannot reach {gateway[0]}: {exc}") from exc
    garbage: str | None = None
    ignored = LimitedLog(log, clock=loop.time)
    try:
        for wait in waits:
            with contextlib.suppress(OSError):
                transport.sendto(request)
            deadline = loop.time() + wait
            while (left := deadline - loop.time()) > 0:
                try:
                    item = await asyncio.wait_for(proto.queue.get(), left)
                except TimeoutError:
                    break
                if isinstance(item, OSError):
                    raise PortmapError(
                        "refused", f"{what}: {gateway[0]}:{gateway[1]} refused "
                        f"({item.strerror or item}): the gateway does not speak it")
                try:
                    return decode(item)
                except Garbage as exc:
                    garbage = str(exc)
                    ignored.log(logging.INFO, "%s: ignoring a %d-byte answer from %s: %s",
                                what, len(item), gateway[0], exc)
    finally:
        transport.close()
        if ignored.left_out:
            log.info("%s: %d more answers from %s ignored (lines left out: too many at once)",
                     what, ignored.left_out, gateway[0])
    if garbage is not None:
        raise PortmapError("garbage", f"{what}: {gateway[0]} answered garbage ({garbage})")
    raise PortmapError("timeout", f"{what}: no answer from {gateway[0]}:{gateway[1]} "
                       f"within {sum(waits):.2f}s")
