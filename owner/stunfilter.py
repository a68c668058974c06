"""Which STUN-shaped datagrams on the shared WireGuard port reach the agent (device owner).

Anyone on the internet can send datagrams carrying the STUN cookie to the WireGuard port,
and each one the owner passes up costs a frame and an aioice parse in the agent. So the
owner sorts them first, with cheap checks only (header words, a CRC32, a short walk of
the attributes for USERNAME; never a full parse), in this order:

1. Malformed: not a STUN header, a length that does not match the datagram, larger than
   a check can be. Dropped.
2. FINGERPRINT: a wrong one is dropped, whatever the class. Requests and indications must
   carry one (RFC 8445 section 7.2.2: every connectivity check does), and so must answers
   to our own checks (requests we sent with MESSAGE-INTEGRITY and FINGERPRINT).
3. Ours: a transaction id of a request this owner sent (`note_sent`) in the last
   `transaction_ttl` seconds: the answers to our checks and STUN queries, and our own
   requests looped back by a hairpinning NAT. These share a reserved budget, which a
   stranger cannot spend: guessing a 96-bit random id does not work. Other answers
   (success or error to nobody's transaction) are dropped: nobody is waiting for them.
4. Checks for us: Binding requests whose USERNAME starts with a ufrag the agent declared
   (`set_ufrags`) and ':'. Each ufrag has its own reserved budget, so one peer cannot
   starve another either.
5. Everything else (requests naming unknown ufrags, indications): a budget per source
   address (a bounded table, least recently seen forgotten first) and then one small
   budget shared by all of them. A flood from strangers exhausts only those.

Each drop is counted by reason (`StunFilterCounters`, in the owner's `stats` reply).
"""

from __future__ import annotations

import logging
import struct
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

# Not aioice: the privileged program's only dependencies are msgpack, PyNaCl and
# pyroute2 (with kbwg.owner and kbwg.core).
from kbwg.core.ratelimit import TokenBucket
from kbwg.core.stun import STUN_HEADER, is_stun

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

FINGERPRINT_TYPE = 0x8028
FINGERPRINT_XOR = 0x5354554E
USERNAME_TYPE = 0x0006
MESSAGE_INTEGRITY_TYPE = 0x0008
# The last 8 bytes of a message whose last attribute is a FINGERPRINT start like this.
_FINGERPRINT_TL = struct.pack("!HH", FINGERPRINT_TYPE, 4)

# Message class bits of the type (RFC 8489 section 5).
CLASS_MASK = 0x0110
CLASS_REQUEST = 0x0000
CLASS_INDICATION = 0x0010

# How many attributes the USERNAME search looks at: checks put it first.
_MAX_ATTRIBUTES_WALKED = 8

_HEADER = struct.Struct("!HHI")
_TLV = struct.Struct("!HH")
_WORD = struct.Struct("!I")


@dataclass(frozen=True)
class FilterLimits:
    """Budgets in datagrams per second (with bursts). ICE paces a session's checks at
    tens per second and consent checks at one every few seconds, so each budget is far
    above what its legitimate traffic needs."""

    own_rate: float = 400.0
    own_burst: int = 200
    ufrag_rate: float = 100.0
    ufrag_burst: int = 100
    source_rate: float = 20.0
    source_burst: int = 40
    shared_rate: float = 100.0
    shared_burst: int = 100
    max_sources: int = 1024
    max_transactions: int = 4096
    transaction_ttl: float = 30.0


@dataclass
class StunFilterCounters:
    # Passed, by budget.
    passed_own: int = 0
    passed_ufrag: int = 0
    passed_other: int = 0
    # Dropped, by reason.
    malformed: int = 0
    bad_fingerprint: int = 0
    no_fingerprint: int = 0
    unknown_transaction: int = 0
    over_own_budget: int = 0
    over_ufrag_budget: int = 0
    over_source_budget: int = 0
    over_shared_budget: int = 0
    # Not a drop by itself: requests naming a ufrag the agent did not declare, which then
    # took the strangers' budgets.
    unknown_ufrag: int = 0

    @property
    def passed(self) -> int:
        return self.passed_own + self.passed_ufrag + self.passed_other

    @property
    def dropped(self) -> int:
        return (self.malformed + self.bad_fingerprint + self.no_fingerprint
                + self.unknown_transaction + self.over_own_budget + self.over_ufrag_budget
                + self.over_source_budget + self.over_shared_budget)

    def to_json(self) -> dict[str, int]:
        return {**asdict(self), "passed": self.passed, "dropped": self.dropped}


def fingerprint_state(payload: bytes) -> bool | None:
    """None when the message ends without a FINGERPRINT, else whether it is right.

    Only the last attribute can be one (RFC 8489 section 14.7), so no walk is needed; the
    length in the header already counts it, as it must for the CRC.
    """
    end = len(payload)
    if end < STUN_HEADER + 8 or payload[end - 8 : end - 4] != _FINGERPRINT_TL:
        return None
    (value,) = _WORD.unpack_from(payload, end - 4)
    return value == zlib.crc32(payload[: end - 8]) ^ FINGERPRINT_XOR


def attribute_types(payload: bytes) -> set[int]:
    """The attribute types of a message (for what we send: not on the receive path)."""
    found: set[int] = set()
    pos, end = STUN_HEADER, len(payload)
    while pos + 4 <= end:
        attr_type, attr_len = _TLV.unpack_from(payload, pos)
        found.add(attr_type)
        pos += 4 + attr_len + (-attr_len & 3)
    return found


def username_ufrag(payload: bytes) -> bytes | None:
    """The part of USERNAME before ':' (the receiver's ufrag in a check), or None."""
    pos, end = STUN_HEADER, len(payload)
    for _ in range(_MAX_ATTRIBUTES_WALKED):
        if pos + 4 > end:
            return None
        attr_type, attr_len = _TLV.unpack_from(payload, pos)
        if attr_type == USERNAME_TYPE:
            if pos + 4 + attr_len > end:
                return None
            return payload[pos + 4 : pos + 4 + attr_len].partition(b":")[0]
        pos += 4 + attr_len + (-attr_len & 3)
    return None


@dataclass
class _Sent:
    expires: float
    # Our request was an ICE check (MESSAGE-INTEGRITY and FINGERPRINT): so is its answer.
    needs_fingerprint: bool


@dataclass
class SharedPortFilter:
    """Admission of datagrams that passed the kernel filter (cookie, port) of the raw
    socket; see the module docstring for the order of the checks."""

    limits: FilterLimits = field(default_factory=FilterLimits)
    clock: Clock = time.monotonic
    counters: StunFilterCounters = field(default_factory=StunFilterCounters)

    def __post_init__(self) -> None:
        lim = self.limits
        self._sent: OrderedDict[bytes, _Sent] = OrderedDict()
        self._ufrags: dict[bytes, TokenBucket] = {}
        self._sources: OrderedDict[str, TokenBucket] = OrderedDict()
        self._own = TokenBucket(lim.own_rate, lim.own_burst, self.clock)
        self._shared = TokenBucket(lim.shared_rate, lim.shared_burst, self.clock)

    # -- what the agent and our own sends tell us ---------------------------------------

    def note_sent(self, payload: bytes) -> None:
        """Remember the transaction of a request we sent, so its answers are ours."""
        if len(payload) < STUN_HEADER:
            return
        (msg_type,) = struct.unpack_from("!H", payload)
        if msg_type & CLASS_MASK != CLASS_REQUEST:
            return  # answers and indications get no answers
        now = self.clock()
        types = attribute_types(payload)
        tid = payload[8:STUN_HEADER]
        self._sent.pop(tid, None)
        self._sent[tid] = _Sent(
            now + self.limits.transaction_ttl,
            FINGERPRINT_TYPE in types and MESSAGE_INTEGRITY_TYPE in types,
        )
        # Insertion order is expiry order (one TTL for all), so the oldest go first.
        sent = self._sent
        while sent and (len(sent) > self.limits.max_transactions
                        or next(iter(sent.values())).expires <= now):
            sent.popitem(last=False)

    def set_ufrags(self, ufrags: Iterable[str]) -> None:
        """The agent's current local ufrags (replacing the previous set); a ufrag that
        stays keeps its budget."""
        old = self._ufrags
        lim = self.limits
        self._ufrags = {}
        for text in ufrags:
            key = text.encode()
            self._ufrags[key] = old.get(key) or TokenBucket(lim.ufrag_rate, lim.ufrag_burst,
                                                            self.clock)
        logger.debug("%d local ufrags declared", len(self._ufrags))

    # -- the receive path ---------------------------------------------------------------

    def admit(self, payload: bytes, src_ip: str) -> bool:
        """Whether a datagram from `src_ip` goes up to the agent (counted either way)."""
        counters = self.counters
        if not is_stun(payload):
            counters.malformed += 1
            return False
        fingerprint = fingerprint_state(payload)
        if fingerprint is False:
            counters.bad_fingerprint += 1
            return False
        klass = _HEADER.unpack_from(payload)[0] & CLASS_MASK
        sent = self._sent.get(payload[8:STUN_HEADER])
        if sent is not None and sent.expires > self.clock():
            if sent.needs_fingerprint and fingerprint is None:
                counters.no_fingerprint += 1
                return False
            if not self._own.take():
                counters.over_own_budget += 1
                return False
            counters.passed_own += 1
            return True
        if klass not in (CLASS_REQUEST, CLASS_INDICATION):
            counters.unknown_transaction += 1
            return False
        if fingerprint is None:
            counters.no_fingerprint += 1
            return False
        if klass == CLASS_REQUEST:
            ufrag = username_ufrag(payload)
            if ufrag is not None:
                bucket = self._ufrags.get(ufrag)
                if bucket is not None:
                    if not bucket.take():
                        counters.over_ufrag_budget += 1
                        return False
                    counters.passed_ufrag += 1
                    return True
                counters.unknown_ufrag += 1
        return self._admit_stranger(src_ip)

    def _admit_stranger(self, src_ip: str) -> bool:
        counters = self.counters
        sources = self._sources
        bucket = sources.get(src_ip)
        if bucket is None:
            lim = self.limits
            bucket = sources[src_ip] = TokenBucket(lim.source_rate, lim.source_burst,
                                                   self.clock)
            if len(sources) > lim.max_sources:
                sources.popitem(last=False)
        else:
            sources.move_to_end(src_ip)
        if not bucket.take():
            counters.over_source_budget += 1
            return False
        if not self._shared.take():
            counters.over_shared_budget += 1
            return False
        counters.passed_other += 1
        return True

    def to_json(self) -> dict[str, int]:
        return {**self.counters.to_json(), "ufrags": len(self._ufrags),
                "sources": len(self._sources), "transactions": len(self._sent)}
