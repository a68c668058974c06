"""The STUN/TURN control plane: every datagram that is not ChannelData.

Decoding is layered so each failure is counted under its own name: header checks and
the raw attribute walk (kbwg.relay.wire), then aioice's parser, then authentication
(long-term credentials with TURN REST usernames), then the method. Header-level garbage
is dropped silently as RFC 8489 6.3 asks; a well-framed request that is wrong gets an
error response.

Answers to requests without valid credentials (Binding, challenges, errors before
authentication) cost an attacker one spoofed datagram each, so they are rate-limited
per source IP and in total, and carry nothing beyond what the client needs: no
SOFTWARE, and FINGERPRINT only when the request had one.

Messages from TCP/TLS clients (kbwg.relay.streams) come here too, with the connection
they came on (`stream`): answers go back on it, and an allocation belongs to its
connection, so neither a UDP datagram nor another connection can use it.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from aioice import stun

from kbwg.core.addresses import Address
from kbwg.core.printable import printable
from kbwg.relay import wire
from kbwg.relay.allocation import Allocation, AllocationTable, Refusal, StreamClient
from kbwg.relay.config import ServerConfig
from kbwg.relay.credentials import NonceIssuer, RestAuthenticator, split_username
from kbwg.relay.limits import Counters, UnauthenticatedLimiter, client_key

log = logging.getLogger(__name__)

# send(data, to, from_local): from_local picks the socket (RFC 5780 CHANGE-REQUEST).
Sender = Callable[[bytes, Address, Address], None]

_TURN_REQUESTS = frozenset({stun.Method.ALLOCATE, stun.Method.REFRESH,
                            stun.Method.CREATE_PERMISSION, stun.Method.CHANNEL_BIND})


@dataclass(frozen=True)
class Credentials:
    username: str
    key: bytes


@dataclass(frozen=True)
class Request:
    message: stun.Message
    raw: list[wire.RawAttribute]
    client: Address
    local: Address
    stream: StreamClient | None = None

    @property
    def fingerprint(self) -> bool:
        """Whether the client uses FINGERPRINT, and so wants it in answers."""
        return any(attribute.type == wire.FINGERPRINT for attribute in self.raw)


class ControlPlane:
    def __init__(self, config: ServerConfig, table: AllocationTable, counters: Counters,
                 send: Sender, main: Address, alternates: dict[Address, Address],
                 main6: Address | None = None) -> None:
        self.config = config
        self.table = table
        self.counters = counters
        self._send = send
        self._main = main
        # The sockets TURN is served on: the main one, and the IPv6 one if any.
        self._mains = frozenset({main} if main6 is None else {main, main6})
        # local socket address -> its OTHER-ADDRESS; empty without --alt-address.
        self._alternates = alternates
        self._auth = RestAuthenticator(config.secret, config.realm,
                                       config.lifetimes.credential_max)
        self._nonces = NonceIssuer(config.lifetimes.nonce)
        self._unauthenticated = UnauthenticatedLimiter(
            config.quotas.unauthenticated_per_source, config.quotas.unauthenticated_total)

    def datagram_received(self, data: bytes, client: Address, local: Address,
                          stream: StreamClient | None = None) -> None:
        """Never raises: a bug or a hostile datagram must not stop the relay. A message
        from a stream client names its connection and the main address as `local`."""
        try:
            self._handle(data, client, local, stream)
        except wire.MalformedDatagram as exc:
            setattr(self.counters, exc.reason, getattr(self.counters, exc.reason) + 1)
        except Exception:
            self.counters.handler_errors += 1
            log.debug("error handling a datagram from %s:%d", *client, exc_info=True)

    def _handle(self, data: bytes, client: Address, local: Address,
                stream: StreamClient | None) -> None:
        wire.check_header(data)
        raw = wire.scan_attributes(data)
        try:
            message = stun.parse_message(data)
        except (ValueError, struct.error, UnicodeDecodeError, IndexError):
            self._undecodable(data, raw, client, local, stream)
            return
        request = Request(message, raw, client, local, stream)
        if message.message_class == stun.Class.INDICATION:
            self.counters.stun_indications += 1
            if local in self._mains and message.message_method == stun.Method.SEND:
                self._send_indication(request)
            else:
                self.counters.unknown_method += 1
            return
        if message.message_class != stun.Class.REQUEST:
            self.counters.malformed += 1  # responses are never sent to a server
            return
        self.counters.stun_requests += 1
        unknown = wire.unknown_required(raw)
        if message.message_method == stun.Method.BINDING:
            if "CHANGE-REQUEST" in message.attributes and not self._alternates:
                unknown.append(wire.CHANGE_REQUEST)
            if unknown:
                self._unknown_attributes(request, unknown)
            else:
                self._binding(request)
            return
        if message.message_method not in _TURN_REQUESTS:
            self._refuse(request, Refusal(400, "unknown_method"), None)
            return
        if local not in self._mains:
            self.counters.wrong_socket += 1
            return
        if unknown:
            self._unknown_attributes(request, unknown)
            return
        credentials = self._authenticate(request)
        if credentials is None:
            return
        try:
            self._turn(request, credentials)
        except Refusal as refusal:
            self._refuse(request, refusal, credentials.key)
        except (ValueError, struct.error) as exc:
            self._refuse(request, Refusal(400, "bad_request", str(exc)), credentials.key)

    def _undecodable(self, data: bytes, raw: list[wire.RawAttribute], client: Address,
                     local: Address, stream: StreamClient | None) -> None:
        """A well-framed message whose attributes do not decode: 400 to requests."""
        self.counters.malformed += 1
        msg_type, _, _, transaction_id = struct.unpack_from("!HHI12s", data)
        try:
            method = stun.Method(msg_type & 0x3EEF)
        except ValueError:
            self.counters.unknown_method += 1
            return
        if msg_type & 0x0110 == stun.Class.REQUEST and self._may_answer(client):
            message = stun.Message(method, stun.Class.REQUEST, transaction_id)
            fingerprint = any(attribute.type == wire.FINGERPRINT for attribute in raw)
            answer = wire.encode(wire.error(message, 400), fingerprint=fingerprint)
            if stream is not None:
                stream.send(answer)
            else:
                self._send(answer, client, local)

    def _may_answer(self, client: Address) -> bool:
        """Whether an unauthenticated answer to `client` fits the rate limits."""
        limited = self._unauthenticated.allow(client_key(client[0]), time.monotonic())
        if limited is None:
            return True
        self._count(limited)
        return False

    def _count(self, counter: str) -> None:
        setattr(self.counters, counter, getattr(self.counters, counter) + 1)

    def _reply(self, request: Request, data: bytes, local: Address | None = None) -> None:
        if request.stream is not None:
            request.stream.send(data)
        else:
            self._send(data, request.client, local or request.local)

    def _refuse(self, request: Request, refusal: Refusal, key: bytes | None) -> None:
        """Count and answer; without `key` (unauthenticated) within the rate limits."""
        self._count(refusal.counter)
        log.debug("%s from %s:%d refused %d (%s)", request.message.message_method.name,
                  *request.client, refusal.code, printable(refusal))  # may quote the client
        if key is None and not self._may_answer(request.client):
            return
        self._error(request, refusal.code, key)

    def _error(self, request: Request, code: int, key: bytes | None,
               attributes: dict[str, object] | None = None) -> None:
        self._reply(request, wire.encode(wire.error(request.message, code, attributes), key,
                                         fingerprint=request.fingerprint))

    def _unknown_attributes(self, request: Request, types: list[int]) -> None:
        self.counters.unknown_attribute += 1
        if self._may_answer(request.client):
            self._reply(request, wire.unknown_attributes_error(
                request.message, types, fingerprint=request.fingerprint))

    # --- authentication (RFC 8489 9.2.4) ---

    def _challenge(self, request: Request, code: int, counter: str) -> None:
        """An error with REALM and a fresh NONCE; the nonce is made only when sent."""
        self._count(counter)
        log.debug("%s from %s:%d challenged %d (%s)", request.message.message_method.name,
                  *request.client, code, counter)
        if self._may_answer(request.client):
            self._error(request, code, None, {"REALM": self.config.realm,
                                              "NONCE": self._nonces.issue(request.client)})

    def _authenticate(self, request: Request) -> Credentials | None:
        attributes = request.message.attributes
        if "MESSAGE-INTEGRITY" not in attributes:
            self._challenge(request, 401, "unauthenticated")
            return None
        username, realm = attributes.get("USERNAME"), attributes.get("REALM")
        nonce = attributes.get("NONCE")
        if not username or not realm or not nonce:
            self._refuse(request, Refusal(400, "bad_request", "incomplete credentials"), None)
            return None
        if realm != self.config.realm:
            self._challenge(request, 401, "wrong_realm")
            return None
        if not self._nonces.check(nonce, request.client):
            self._challenge(request, 438, "stale_nonce")
            return None
        if self._auth.expired(username):
            self._challenge(request, 401, "expired_username")
            return None
        if self._auth.too_far(username):
            self._challenge(request, 401, "expiry_too_far")
            return None
        key = self._auth.integrity_key(username)
        if not request.message.check_message_integrity(key):
            self._challenge(request, 401, "bad_credentials")
            return None
        return Credentials(username, key)

    # --- STUN Binding and RFC 5780 ---

    def _binding(self, request: Request) -> None:
        if not self._may_answer(request.client):
            return
        local = request.local
        source = local
        attributes: dict[str, object] = {"XOR-MAPPED-ADDRESS": request.client}
        # RFC 5780 over a stream would test nothing: its answers cannot change socket.
        other = self._alternates.get(local) if request.stream is None else None
        if other is not None:
            change = int(request.message.attributes.get("CHANGE-REQUEST", 0))
            source = (other[0] if change & wire.CHANGE_IP else local[0],
                      other[1] if change & wire.CHANGE_PORT else local[1])
            if source != local:
                self.counters.change_request_responses += 1
            attributes["OTHER-ADDRESS"] = other
            attributes["RESPONSE-ORIGIN"] = source
        self.counters.binding_responses += 1
        self._reply(request, wire.encode(wire.response(request.message, attributes),
                                         fingerprint=request.fingerprint), source)

    # --- TURN ---

    def _turn(self, request: Request, credentials: Credentials) -> None:
        method = request.message.message_method
        now = time.monotonic()
        if method == stun.Method.ALLOCATE:
            self._allocate(request, credentials, now)
            return
        allocation = self.table.get(request.client)
        if allocation is None:
            raise Refusal(437, "allocation_mismatch", "no allocation")
        if allocation.stream is not request.stream:
            raise Refusal(437, "allocation_mismatch", "the allocation is another transport's")
        if allocation.username != credentials.username:
            raise Refusal(441, "wrong_credentials", "not the allocation's username")
        attributes = request.message.attributes
        if method == stun.Method.REFRESH:
            family = self._requested_family(request.raw)
            if family is not None and (family == wire.ADDRESS_FAMILY_IPV6) != allocation.ipv6:
                raise Refusal(443, "address_family", "not the allocation's address family")
            granted = self.table.refresh(allocation, attributes.get("LIFETIME"), now)
            self._ok(request, credentials, {"LIFETIME": int(granted)})
        elif method == stun.Method.CREATE_PERMISSION:
            peers = wire.peer_addresses(request.raw, request.message.transaction_id)
            if not peers:
                raise Refusal(400, "bad_request", "no XOR-PEER-ADDRESS")
            self.table.permit(allocation, peers, now)
            self._ok(request, credentials)
        else:
            number = attributes.get("CHANNEL-NUMBER")
            peer = attributes.get("XOR-PEER-ADDRESS")
            if number is None or peer is None:
                raise Refusal(400, "bad_request", "CHANNEL-NUMBER and XOR-PEER-ADDRESS needed")
            self.table.bind(allocation, int(number), (str(peer[0]), int(peer[1])), now)
            self._ok(request, credentials)

    def _ok(self, request: Request, credentials: Credentials,
            attributes: dict[str, object] | None = None) -> None:
        self._reply(request, wire.encode(wire.response(request.message, attributes),
                                         credentials.key))

    @staticmethod
    def _requested_family(raw: list[wire.RawAttribute]) -> int | None:
        """REQUESTED-ADDRESS-FAMILY (RFC 8656 14.1): a family byte and three reserved
        ones; None when absent, 400 when malformed or of no family we know."""
        family = wire.find(raw, wire.REQUESTED_ADDRESS_FAMILY)
        if family is None:
            return None
        if len(family) != 4 or family[0] not in (wire.ADDRESS_FAMILY_IPV4,
                                                 wire.ADDRESS_FAMILY_IPV6):
            raise Refusal(400, "bad_request", "bad REQUESTED-ADDRESS-FAMILY")
        return family[0]

    def _allocate(self, request: Request, credentials: Credentials, now: float) -> None:
        message, raw = request.message, request.raw
        existing = self.table.get(request.client)
        if existing is not None:
            if (existing.transaction_id == message.transaction_id
                    and existing.stream is request.stream):
                self._reply(request, existing.response)  # a retransmission
                return
            raise Refusal(437, "allocation_mismatch", "5-tuple already allocated")
        transport = message.attributes.get("REQUESTED-TRANSPORT")
        if transport is None:
            raise Refusal(400, "bad_request", "no REQUESTED-TRANSPORT")
        if transport >> 24 != wire.UDP_TRANSPORT:
            raise Refusal(442, "unsupported_transport", "only UDP relaying")
        family = self._requested_family(raw)
        even = wire.find(raw, wire.EVEN_PORT)
        token = wire.find(raw, wire.RESERVATION_TOKEN)
        if family is not None and token is not None:
            # RFC 8656 7.2: the reserved socket already has its family.
            raise Refusal(400, "bad_request", "REQUESTED-ADDRESS-FAMILY with RESERVATION-TOKEN")
        if even is not None and token is not None:
            raise Refusal(400, "bad_request", "EVEN-PORT with RESERVATION-TOKEN")
        if even is not None and len(even) != 1:
            raise Refusal(400, "bad_request", "bad EVEN-PORT")
        if token is not None and len(token) != 8:
            raise Refusal(400, "bad_request", "bad RESERVATION-TOKEN")
        parsed = split_username(credentials.username)
        user = parsed[1] if parsed else credentials.username
        allocation, new_token = self.table.create(
            request.client, credentials.username, user, credentials.key,
            message.attributes.get("LIFETIME"), now, even_port=even is not None,
            reserve=bool(even and even[0] & 0x80), token=token,
            dont_fragment=wire.find(raw, wire.DONT_FRAGMENT) is not None,
            stream=request.stream, ipv6=family == wire.ADDRESS_FAMILY_IPV6)
        attributes: dict[str, object] = {
            "XOR-RELAYED-ADDRESS": allocation.relayed,
            "LIFETIME": round(allocation.expires - now),  # int() would floor 1199.999...
            "XOR-MAPPED-ADDRESS": request.client,
        }
        if self.config.software:
            attributes["SOFTWARE"] = self.config.software
        extra = b"" if new_token is None else wire.raw_attribute(wire.RESERVATION_TOKEN,
                                                                new_token)
        data = wire.encode_with(wire.response(message, attributes), extra, credentials.key)
        allocation.transaction_id = message.transaction_id
        allocation.response = data
        self._reply(request, data)

    def _send_indication(self, request: Request) -> None:
        allocation = self.table.get(request.client)
        if allocation is None or allocation.stream is not request.stream:
            self.counters.no_allocation += 1
            return
        attributes = request.message.attributes
        peer, data = attributes.get("XOR-PEER-ADDRESS"), attributes.get("DATA")
        if peer is None or data is None:
            self.counters.bad_request += 1
            return
        now = time.monotonic()
        if not allocation.permitted(peer[0], now) or not self.table.may_send(peer, now):
            self.counters.no_permission += 1
            return
        if allocation.limiter is not None and not allocation.limiter.allow(now, len(data)):
            self.counters.rate_limited += 1
            return
        try:
            allocation.sock.sendto(data, (peer[0], peer[1]))
        except OSError:
            self.counters.send_errors += 1
            return
        self.counters.to_peer_packets += 1
        self.counters.to_peer_bytes += len(data)

    def data_indication(self, allocation: Allocation, peer: Address, data: bytes) -> bytes:
        """A peer's datagram for a client without a channel to that peer (RFC 8656 11.6)."""
        message = stun.Message(stun.Method.DATA, stun.Class.INDICATION,
                               attributes={"XOR-PEER-ADDRESS": peer, "DATA": data})
        self.counters.data_indications_out += 1
        return bytes(message)
