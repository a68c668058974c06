"""Sealed pings over a peer's chosen pair: `kbwg-agent ping`'s probes.

A ping is a connectivity check like a consent check (RFC 7675): a STUN Binding request
on the pair, from the same local base (the WireGuard port through the device owner, or
our TURN allocation), USERNAME "<their ufrag>:<our ufrag>" and MESSAGE-INTEGRITY keyed
with the peer's password. Those credentials travelled only inside the NaCl-sealed
offer and answer, so only the peer can sign the answer: a pong counts only when it

- answers a ping in flight (transaction id),
- carries FINGERPRINT and a MESSAGE-INTEGRITY that checks with the peer's password,
- is a success response, and comes from the pair's remote address.

Anything else is counted (`ProbeCounters`) and the ping keeps waiting: a forged,
unsigned or misdirected answer never becomes an RTT. The request carries no role
attribute and no USE-CANDIDATE, so the peer's checker answers it and changes nothing
(its pair already succeeded: no triggered check, no nomination, no role conflict).

    probe = PairProbe(our_ufrag, send)
    probe.set_remote(their_ufrag, their_pwd)          # from the offer or answer
    mux.register(our_ufrag, ProbingReceiver(checker, probe))
    result = await probe.ping(checker.selected, timeout=5.0)
    probe.close()

The probe only times answers; which pair to ping is the caller's business.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Protocol

from aioice import stun

from kbwg.negotiation.candidate_pairs import Address, CandidatePair, prflx_priority
from kbwg.negotiation.candidates import Candidate
from kbwg.negotiation.check_config import SendFn

log = logging.getLogger(__name__)

# Pings are small; anything bigger is not an answer to one.
MAX_DATAGRAM = 1500
# Ids of pings that ended lately: a late pong is ours (counted late), not a stranger's.
RECENT_PINGS = 64
_RESPONSE_CLASSES = (stun.Class.RESPONSE, stun.Class.ERROR)


@dataclass(frozen=True)
class ProbeResult:
    """One ping: the pair it went over and, when an authentic pong came, its RTT and
    our address as the peer saw it."""

    pair: CandidatePair
    rtt_ms: float | None
    seen_as: Address | None = None
    error: str | None = None  # the peer answered with a (signed) STUN error

    @property
    def answered(self) -> bool:
        return self.rtt_ms is not None


@dataclass
class ProbeCounters:
    sent: int = 0
    pongs: int = 0
    timeouts: int = 0
    send_errors: int = 0
    late: int = 0  # an authentic answer after its ping timed out
    malformed: int = 0
    forged: int = 0  # no FINGERPRINT, no MESSAGE-INTEGRITY, or one that does not check
    wrong_source: int = 0  # signed, but from another address than the pair's
    error_responses: int = 0

    def to_json(self) -> dict[str, int]:
        return asdict(self)


@dataclass(eq=False)
class _Ping:
    pair: CandidatePair
    sent_at: float
    done: asyncio.Future[ProbeResult]


class NotReady(Exception):
    """The peer's credentials are not known yet: nothing can be signed."""


class PairProbe:
    def __init__(self, ufrag: str, send: SendFn) -> None:
        self._ufrag = ufrag
        self._send = send
        self._remote_ufrag: str | None = None
        self._remote_pwd: bytes | None = None
        self._pings: dict[bytes, _Ping] = {}
        self._recent: OrderedDict[bytes, None] = OrderedDict()
        self._closed = False
        self.counters = ProbeCounters()

    @property
    def ready(self) -> bool:
        return self._remote_pwd is not None and not self._closed

    def set_remote(self, ufrag: str, pwd: str) -> None:
        self._remote_ufrag = ufrag
        self._remote_pwd = pwd.encode()

    def close(self) -> None:
        self._closed = True
        for ping in self._pings.values():
            if not ping.done.done():
                ping.done.set_result(ProbeResult(
                    ping.pair, None, error="the negotiation restarted during the ping"))
        self._pings.clear()

    def has_transaction(self, transaction_id: bytes) -> bool:
        return transaction_id in self._pings or transaction_id in self._recent

    async def ping(self, pair: CandidatePair, timeout: float) -> ProbeResult:
        """Send one signed ping over `pair`; its result once an authentic pong came, or
        with no RTT after `timeout` seconds."""
        if not self.ready:
            raise NotReady("the peer's check credentials are not known yet")
        assert self._remote_ufrag is not None and self._remote_pwd is not None
        request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
        request.attributes["USERNAME"] = f"{self._remote_ufrag}:{self._ufrag}"
        request.attributes["PRIORITY"] = prflx_priority(pair.local)
        request.add_message_integrity(self._remote_pwd)  # adds FINGERPRINT too
        loop = asyncio.get_running_loop()
        ping = _Ping(pair, loop.time(), loop.create_future())
        tid = request.transaction_id
        self._pings[tid] = ping
        try:
            try:
                self._send(bytes(request), pair.remote_address, pair.local)
            except Exception as exc:  # lost like any datagram: the timeout says so
                self.counters.send_errors += 1
                log.debug("ping to %s:%d not sent: %s", *pair.remote_address, exc)
            self.counters.sent += 1
            try:
                return await asyncio.wait_for(asyncio.shield(ping.done), timeout)
            except TimeoutError:
                self.counters.timeouts += 1
                return ProbeResult(pair, None)
        finally:
            self._pings.pop(tid, None)
            self._recent[tid] = None
            while len(self._recent) > RECENT_PINGS:
                self._recent.popitem(last=False)

    def datagram_received(self, data: bytes, src: Address,
                          local: Candidate | None = None) -> bool:
        """An answer to one of our pings (the mux routes it by transaction id); True
        when it was one. Never raises."""
        try:
            return self._receive(data, (str(src[0]), int(src[1])))
        except Exception:  # the receive path must outlive any bug or hostile input
            self.counters.malformed += 1
            log.debug("error handling a pong from %s", src, exc_info=True)
            return False

    def _receive(self, data: bytes, src: Address) -> bool:
        if len(data) > MAX_DATAGRAM:
            self.counters.malformed += 1
            return False
        try:
            message = stun.parse_message(data)
        except Exception:  # aioice raises ValueError, struct.error, UnicodeDecodeError...
            self.counters.malformed += 1
            return False
        tid = message.transaction_id
        if (message.message_class not in _RESPONSE_CLASSES
                or message.message_method != stun.Method.BINDING
                or not self.has_transaction(tid)):
            return False
        if (self._remote_pwd is None or "FINGERPRINT" not in message.attributes
                or not message.check_message_integrity(self._remote_pwd)):
            self.counters.forged += 1
            return True
        ping = self._pings.get(tid)
        if ping is None or ping.done.done():
            self.counters.late += 1
            return True
        if src != ping.pair.remote_address:
            self.counters.wrong_source += 1
            return True
        rtt_ms = (asyncio.get_running_loop().time() - ping.sent_at) * 1000.0
        if message.message_class == stun.Class.ERROR:
            self.counters.error_responses += 1
            code = message.attributes.get("ERROR-CODE")
            ping.done.set_result(ProbeResult(ping.pair, None, error=f"STUN error {code}"))
            return True
        self.counters.pongs += 1
        mapped = message.attributes.get("XOR-MAPPED-ADDRESS")
        seen = (str(mapped[0]), int(mapped[1])) if isinstance(mapped, tuple) else None
        ping.done.set_result(ProbeResult(ping.pair, rtt_ms, seen))
        return True


class CheckReceiver(Protocol):
    """What the mux needs of a peer's checker (as `mux.CheckReceiver`)."""

    def datagram_received(self, data: bytes, src: Address,
                          local: Candidate | None = None) -> bool: ...

    def has_transaction(self, transaction_id: bytes) -> bool: ...


class ProbingReceiver:
    """A peer's checker as the mux sees it, with its pings: answers to a ping go to the
    probe, everything else to the checker."""

    def __init__(self, checker: CheckReceiver, probe: PairProbe) -> None:
        self.checker = checker
        self.probe = probe

    def has_transaction(self, transaction_id: bytes) -> bool:
        return (self.probe.has_transaction(transaction_id)
                or self.checker.has_transaction(transaction_id))

    def datagram_received(self, data: bytes, src: Address,
                          local: Candidate | None = None) -> bool:
        if len(data) >= stun.HEADER_LENGTH:
            msg_type = struct.unpack_from("!H", data)[0]
            if (msg_type & 0x0110 in _RESPONSE_CLASSES
                    and self.probe.has_transaction(data[8:stun.HEADER_LENGTH])):
                return self.probe.datagram_received(data, src, local)
        return self.checker.datagram_received(data, src, local)
