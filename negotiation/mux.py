"""Dispatch of what arrives at the shared WireGuard port: checks per peer, the rest aside.

One `CheckMux` per shared port. Every STUN datagram the device owner passes up goes
through `datagram_received(data, src, local)`:

- Binding requests carrying USERNAME `"<our ufrag>:<their ufrag>"` go to the checker
  registered under our ufrag (each negotiation session has its own). Unknown ufrags are
  counted and dropped: stale sessions and scanners.
- Responses and error responses go to the checker that owns the transaction id (each
  checker answers `has_transaction`); a handful of peers makes asking each one cheaper
  than keeping a second map in step with the checkers' own.
- Everything else goes to `fallback`, e.g. `StunClient.datagram_received` of the client
  gathering server-reflexive candidates (its answers, its hairpin probes, and garbage,
  which it counts). Without a fallback it is counted here.

`local` is the local candidate the datagram arrived at. The shared port only knows the
local address, so `receiver_for(ip)` gives a `(data, src)` receiver for one address
(the transport's `from_source(ip).receiver` in the agent), which looks the candidate up in
`set_local_candidates`. A TURN client passes its relay candidate directly.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Protocol

from aioice import stun

from kbwg.core.addresses import Address
from kbwg.negotiation.candidates import Candidate

log = logging.getLogger(__name__)

Fallback = Callable[[bytes, Address], object]

_CLASS_MASK = 0x0110
_REQUEST = 0x0000


class CheckReceiver(Protocol):
    """What the mux needs of a per-peer checker (`checks.PeerChecker`)."""

    def datagram_received(self, data: bytes, src: Address,
                          local: Candidate | None = None) -> bool: ...

    def has_transaction(self, transaction_id: bytes) -> bool: ...


@dataclass
class MuxCounters:
    requests: int = 0  # routed to a checker by ufrag
    responses: int = 0  # routed to a checker by transaction id
    fallback: int = 0
    unknown_ufrag: int = 0
    malformed: int = 0  # looked like a STUN request, but does not parse
    unroutable: int = 0  # nobody to give it to (no fallback)
    errors: int = 0

    @property
    def ignored(self) -> int:
        return self.unknown_ufrag + self.malformed + self.unroutable + self.errors

    def to_json(self) -> dict[str, int]:
        return {**asdict(self), "ignored": self.ignored}


def _stun_header(data: bytes) -> tuple[int, bytes] | None:
    """(message type, transaction id) when `data` starts like STUN, else None."""
    if len(data) < stun.HEADER_LENGTH:
        return None
    msg_type, _length, cookie = struct.unpack_from("!HHI", data)
    if msg_type & 0xC000 or cookie != stun.COOKIE:
        return None
    return msg_type, data[8:stun.HEADER_LENGTH]


class CheckMux:
    def __init__(self, fallback: Fallback | None = None,
                 local_candidates: Iterable[Candidate] = ()) -> None:
        self.fallback = fallback
        self.counters = MuxCounters()
        self._checkers: dict[str, CheckReceiver] = {}
        self._locals: list[Candidate] = list(local_candidates)

    def register(self, ufrag: str, checker: CheckReceiver) -> None:
        if not ufrag or ":" in ufrag:
            raise ValueError(f"bad ufrag {ufrag!r}")
        if ufrag in self._checkers and self._checkers[ufrag] is not checker:
            raise ValueError(f"ufrag {ufrag!r} is already registered")
        self._checkers[ufrag] = checker

    def unregister(self, ufrag: str) -> None:
        self._checkers.pop(ufrag, None)

    def checker(self, ufrag: str) -> CheckReceiver | None:
        return self._checkers.get(ufrag)

    def set_local_candidates(self, candidates: Iterable[Candidate]) -> None:
        """The local candidates `receiver_for` matches arrival addresses against."""
        self._locals = list(candidates)

    def local_candidate(self, address: str, port: int | None = None) -> Candidate | None:
        """The host or relay candidate at `address` (and `port` when given)."""
        for cand in self._locals:
            if (cand.type in ("host", "relay") and cand.address == address
                    and (port is None or cand.port == port)):
                return cand
        return None

    def receiver_for(self, local_ip: str) -> Callable[[bytes, Address], bool]:
        """A `(data, src)` receiver for datagrams that arrived at `local_ip`."""
        def receive(data: bytes, src: Address) -> bool:
            return self.datagram_received(data, src, self.local_candidate(local_ip))
        return receive

    def datagram_received(self, data: bytes, src: Address,
                          local: Candidate | None = None) -> bool:
        """Route one datagram; True when someone took it. Never raises."""
        try:
            return self._route(data, src, local)
        except Exception:  # the receive path must outlive any bug or hostile input
            self.counters.errors += 1
            log.debug("error routing a datagram from %s", src, exc_info=True)
            return False

    def _route(self, data: bytes, src: Address, local: Candidate | None) -> bool:
        header = _stun_header(data)
        if header is None:
            return self._to_fallback(data, src)
        msg_type, transaction_id = header
        if msg_type & _CLASS_MASK == _REQUEST:
            try:
                message = stun.parse_message(data)
            except Exception:  # aioice raises ValueError, struct.error, UnicodeDecodeError
                self.counters.malformed += 1
                return False
            username = message.attributes.get("USERNAME")
            if not isinstance(username, str):
                return self._to_fallback(data, src)  # e.g. our own hairpin probe
            ufrag = username.partition(":")[0]
            checker = self._checkers.get(ufrag)
            if checker is None:
                self.counters.unknown_ufrag += 1
                log.debug("check from %s for unknown ufrag %r", src, ufrag)
                return False
            self.counters.requests += 1
            return checker.datagram_received(data, src, local)
        if msg_type & _CLASS_MASK in (stun.Class.RESPONSE, stun.Class.ERROR):
            for checker in self._checkers.values():
                if checker.has_transaction(transaction_id):
                    self.counters.responses += 1
                    return checker.datagram_received(data, src, local)
        return self._to_fallback(data, src)

    def _to_fallback(self, data: bytes, src: Address) -> bool:
        if self.fallback is None:
            self.counters.unroutable += 1
            return False
        self.counters.fallback += 1
        result = self.fallback(data, src)
        return result if isinstance(result, bool) else True
