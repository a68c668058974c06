"""The STUN Binding messages of connectivity checks: building them and vetting arrivals.

Every request and answer carries MESSAGE-INTEGRITY and FINGERPRINT (aioice's
`add_message_integrity` adds both). Requests are keyed with the peer's password and
answers with our own, as in RFC 8445 section 7.2.2.

Vetting never raises: each reason to drop a datagram bumps its own `CheckCounters`
field. Unauthenticated or malformed requests are dropped, not answered with 400/401:
only the peer, which knows the password, gets answers.
"""

from __future__ import annotations

from aioice import stun

from kbwg.negotiation.candidate_pairs import Address
from kbwg.negotiation.check_config import CheckCounters

# Checks are small; anything bigger is not one and is not worth parsing.
MAX_DATAGRAM = 1500
ROLE_CONFLICT = 487


def parse_check(data: bytes, counters: CheckCounters) -> stun.Message | None:
    """A Binding message carrying FINGERPRINT, or None (counted)."""
    if len(data) > MAX_DATAGRAM:
        counters.oversized += 1
        return None
    try:
        message = stun.parse_message(data)
    except Exception:  # aioice raises ValueError, struct.error, UnicodeDecodeError...
        counters.malformed += 1
        return None
    if "FINGERPRINT" not in message.attributes:
        counters.malformed += 1  # RFC 8445 section 7.1: checks carry one
        return None
    if message.message_method != stun.Method.BINDING:
        counters.wrong_method += 1
        return None
    return message


def authentic_request(message: stun.Message, ufrag: str, remote_ufrag: str | None,
                      pwd: bytes, counters: CheckCounters) -> bool:
    """Whether a request is the peer's: USERNAME "<ours>:<theirs>", keyed with `pwd`.

    `remote_ufrag` is None until the peer's answer is known: then any "theirs" goes.
    """
    attrs = message.attributes
    username = attrs.get("USERNAME")
    if not isinstance(username, str) or "MESSAGE-INTEGRITY" not in attrs:
        counters.bad_request += 1
        return False
    ours, colon, theirs = username.partition(":")
    if colon != ":" or ours != ufrag or (
            remote_ufrag is not None and theirs != remote_ufrag):
        counters.bad_username += 1
        return False
    if not message.check_message_integrity(pwd):
        counters.bad_integrity += 1
        return False
    return True


def binding_request(*, username: str, priority: int, controlling: bool, tie_breaker: int,
                    use_candidate: bool, key: bytes) -> stun.Message:
    """A check; USE-CANDIDATE only counts from the controlling side, so only it sends one."""
    request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    attrs = request.attributes
    attrs["USERNAME"] = username
    attrs["PRIORITY"] = priority
    if controlling:
        attrs["ICE-CONTROLLING"] = tie_breaker
        if use_candidate:
            attrs["USE-CANDIDATE"] = None
    else:
        attrs["ICE-CONTROLLED"] = tie_breaker
    request.add_message_integrity(key)
    return request


def success_response(request: stun.Message, src: Address, key: bytes) -> bytes:
    """The answer to a check: where it came from, as the peer learns its candidate."""
    response = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE,
                            transaction_id=request.transaction_id)
    response.attributes["XOR-MAPPED-ADDRESS"] = src
    response.add_message_integrity(key)
    return bytes(response)


def error_response(request: stun.Message, code: int, reason: str, key: bytes) -> bytes:
    response = stun.Message(stun.Method.BINDING, stun.Class.ERROR,
                            transaction_id=request.transaction_id)
    response.attributes["ERROR-CODE"] = (code, reason)
    response.add_message_integrity(key)
    return bytes(response)
