"""Allocations and the rules that create, refresh and expire them (RFC 8656 6-12).

The table is pure bookkeeping: it opens relayed sockets through a callback and tells
the server when one goes away, so it can be tested without an event loop. It also
maintains the two dictionaries the data path reads, rebuilt only on control changes:
`routes` (client, channel) -> where to send, and each allocation's `peer_channels`.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from kbwg.core.addresses import Address
from kbwg.core.loglimit import LimitedLog
from kbwg.core.printable import printable
from kbwg.relay.config import Lifetimes
from kbwg.relay.hostaddrs import HostAddresses
from kbwg.relay.limits import (
    Counters,
    PeerPolicy,
    Quotas,
    RateLimiter,
    client_key,
    rate_limiter,
)
from kbwg.relay.wire import CHANNEL_MAX, CHANNEL_MIN

log = logging.getLogger(__name__)


class Refusal(Exception):
    """A request the relay refuses: the STUN error code and the counter to bump."""

    def __init__(self, code: int, counter: str, detail: str = "") -> None:
        super().__init__(detail or counter)
        self.code = code
        self.counter = counter


class ChannelRoute(NamedTuple):
    """What the ChannelData fast path needs, unpacked in one step."""

    sendto: Callable[[bytes | memoryview, Address], int]
    peer: Address
    limiter: RateLimiter | None


class StreamClient(Protocol):
    """A TCP or TLS client connection (kbwg.relay.streams): one allocation at most."""

    def send(self, data: bytes) -> bool:
        """Frame and queue `data` for the client; False when dropped."""
        ...


@dataclass
class Channel:
    peer: Address
    expires: float


@dataclass(eq=False)
class Allocation:
    client: Address
    username: str
    user: str
    key: bytes
    sock: socket.socket
    relayed: Address
    expires: float
    limiter: RateLimiter | None
    # The Allocate that created it, answered again if retransmitted (RFC 8656 7.2).
    transaction_id: bytes = b""
    response: bytes = b""
    permissions: dict[str, float] = field(default_factory=dict)
    channels: dict[int, Channel] = field(default_factory=dict)
    peer_channel: dict[Address, int] = field(default_factory=dict)
    # Expired channel numbers stay tied to their peer for a while (RFC 8656 12).
    cooldown: dict[int, tuple[Address, float]] = field(default_factory=dict)
    # Fast path, peer -> client: the channel of each peer with a live binding.
    peer_channels: dict[Address, int] = field(default_factory=dict)
    route_keys: list[tuple[Address, int]] = field(default_factory=list)
    # The TCP/TLS connection it was made on; None over UDP. Its ChannelData routes live
    # in `AllocationTable.stream_routes`, never reachable by a UDP datagram.
    stream: StreamClient | None = None

    def permitted(self, ip: str, now: float) -> bool:
        return self.permissions.get(ip, 0.0) > now

    @property
    def ipv6(self) -> bool:
        """Whether its relayed address, and so every peer it may reach, is IPv6."""
        return ":" in self.relayed[0]


@dataclass
class Reservation:
    """The odd port kept for a later Allocate with RESERVATION-TOKEN (RFC 8656 7.2)."""

    sock: socket.socket
    expires: float
    # Who made it: a reservation holds a port like an allocation, so it counts against
    # the same per-user and per-address quotas until used or expired.
    user: str = ""
    address: str = ""


# RFC 8656 14.9: a reservation lasts about 30 seconds.
RESERVATION_LIFETIME = 30.0


class AllocationTable:
    def __init__(self, *, quotas: Quotas, lifetimes: Lifetimes, policy: PeerPolicy,
                 counters: Counters, open_socket: Callable[[bool, bool], socket.socket],
                 open_pair: Callable[[], tuple[socket.socket, socket.socket]],
                 on_created: Callable[[Allocation], None],
                 on_removed: Callable[[Allocation], None],
                 host: HostAddresses | None = None,
                 open_socket6: Callable[[bool, bool], socket.socket] | None = None,
                 open_pair6: Callable[[], tuple[socket.socket, socket.socket]] | None = None,
                 ) -> None:
        self.quotas = quotas
        self.lifetimes = lifetimes
        self.policy = policy
        # None: no host addresses beyond the policy's own (tests without procfs).
        self.host = host
        self.counters = counters
        self._open_socket = open_socket
        self._open_pair = open_pair
        # IPv6 relayed sockets (REQUESTED-ADDRESS-FAMILY); None: the relay has no IPv6.
        self._open_socket6 = open_socket6
        self._open_pair6 = open_pair6
        self.reservations: dict[bytes, Reservation] = {}
        self._on_created = on_created
        self._on_removed = on_removed
        self.allocations: dict[Address, Allocation] = {}
        # The live allocations by relayed address. A peer there is another client of
        # this relay (both ends relayed: two hosts that reach it only over TCP): the one
        # peer allowed on the relay's own address, port by port, so that nothing is
        # ever relayed to the relay's own listening sockets.
        self.relayed: dict[Address, Allocation] = {}
        self.routes: dict[tuple[Address, int], ChannelRoute] = {}
        self.stream_routes: dict[tuple[Address, int], ChannelRoute] = {}
        self._per_user: dict[str, int] = {}
        self._per_address: dict[str, int] = {}
        # Anyone holding the team secret can allocate and delete in a loop: the lines
        # about allocations are limited, the counters not.
        self.notes = LimitedLog(log)

    def get(self, client: Address) -> Allocation | None:
        return self.allocations.get(client)

    def create(self, client: Address, username: str, user: str, key: bytes,
               lifetime: int | None, now: float, *, even_port: bool = False,
               reserve: bool = False, token: bytes | None = None,
               dont_fragment: bool = False, stream: StreamClient | None = None,
               ipv6: bool = False) -> tuple[Allocation, bytes | None]:
        """The new allocation, and the token of the port reserved with it if asked;
        `ipv6` asks for an IPv6 relayed address (RFC 8656 7.1), 440 when there is none."""
        open_socket, open_pair = self._open_socket, self._open_pair
        if ipv6:
            if self._open_socket6 is None or self._open_pair6 is None:
                raise Refusal(440, "address_family", "the relay has no IPv6 address")
            open_socket, open_pair = self._open_socket6, self._open_pair6
        # Reservations count too (but not the one this Allocate takes): otherwise one
        # client allocating with EVEN-PORT's R bit and deleting, again and again, holds
        # ports up to the total quota.
        others = [r for t, r in self.reservations.items() if t != token]
        source = client_key(client[0])
        users = self._per_user.get(user, 0) + sum(r.user == user for r in others)
        addresses = (self._per_address.get(source, 0)
                     + sum(r.address == source for r in others))
        if users >= self.quotas.allocations_per_user:
            raise Refusal(486, "quota_user", f"user {user} has too many allocations")
        if addresses >= self.quotas.allocations_per_address:
            raise Refusal(486, "quota_address", f"{source} has too many allocations")
        # Reservations hold ports too, so they count against the total.
        if len(self.allocations) + len(self.reservations) >= self.quotas.allocations:
            raise Refusal(508, "quota_total", "the relay is full")
        new_token: bytes | None = None
        if token is not None:
            reservation = self.reservations.pop(token, None)
            if reservation is None:
                raise Refusal(508, "no_capacity", "unknown or expired reservation token")
            sock = reservation.sock
        else:
            try:
                if reserve:
                    sock, odd = open_pair()
                    new_token = os.urandom(8)
                    self.reservations[new_token] = Reservation(
                        odd, now + RESERVATION_LIFETIME, user, source)
                else:
                    sock = open_socket(even_port, dont_fragment)
            except OSError as exc:
                raise Refusal(508, "no_capacity", f"no relayed port: {exc}") from exc
        host, port = sock.getsockname()[:2]
        allocation = Allocation(
            client=client, username=username, user=user, key=key, sock=sock,
            relayed=(str(host), int(port)), expires=now + self.lifetimes.granted(lifetime),
            limiter=rate_limiter(self.quotas, now), stream=stream,
        )
        self.allocations[client] = allocation
        self.relayed[allocation.relayed] = allocation
        self._per_user[user] = self._per_user.get(user, 0) + 1
        self._per_address[source] = self._per_address.get(source, 0) + 1
        self.counters.allocations_created += 1
        self._on_created(allocation)
        # The username is the client's text (a credential holder's): no terminal controls.
        self.notes.log(logging.INFO, "allocation %s:%d for %s (%s) relayed at %s:%d",
                       *client, printable(user), printable(username), *allocation.relayed)
        return allocation, new_token

    def refresh(self, allocation: Allocation, lifetime: int | None, now: float) -> float:
        """Seconds granted; 0 deletes the allocation (RFC 8656 8)."""
        if lifetime == 0:
            self.remove(allocation, "deleted")
            return 0
        granted = self.lifetimes.granted(lifetime)
        allocation.expires = now + granted
        return granted

    def _check_peer(self, allocation: Allocation, peer: Address, now: float) -> None:
        if (":" in peer[0]) != allocation.ipv6:
            family = "IPv6" if allocation.ipv6 else "IPv4"
            raise Refusal(443, "address_family", f"peer {peer[0]} on an {family} allocation")
        other = self.relayed.get((peer[0], peer[1]))
        if other is not None and other is not allocation:
            return
        reason = self.refusal(peer[0], now)
        if reason is not None:
            raise Refusal(403, "peer_forbidden", f"peer {peer[0]}: {reason}")

    def refusal(self, ip: str, now: float) -> str | None:
        """Why `ip` may not be a peer (None: it may), another allocation of this relay
        aside (`relayed`)."""
        host = self.host.current(now) if self.host is not None else ()
        return self.policy.refusal(ip, host)

    def may_send(self, peer: Address, now: float) -> bool:
        """Whether a datagram may go to `peer` on a permission (by IP, RFC 8656): a
        permission for the relay's own address (another allocation's) is for the
        relayed ports alone."""
        return (peer[0], peer[1]) in self.relayed or self.refusal(peer[0], now) is None

    def permit(self, allocation: Allocation, peers: list[Address], now: float) -> None:
        """Install or refresh permissions, all or none (RFC 8656 9.2)."""
        for peer in peers:
            self._check_peer(allocation, peer, now)
        new = {peer[0] for peer in peers} - allocation.permissions.keys()
        if len(allocation.permissions) + len(new) > self.quotas.permissions_per_allocation:
            raise Refusal(508, "quota_permissions", "too many permissions")
        expires = now + self.lifetimes.permission
        for peer in peers:
            allocation.permissions[peer[0]] = expires
        self._sync(allocation, now)

    def bind(self, allocation: Allocation, channel: int, peer: Address, now: float) -> None:
        if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
            raise Refusal(400, "bad_channel_number", f"channel 0x{channel:04x} out of range")
        self._check_peer(allocation, peer, now)
        bound = allocation.channels.get(channel)
        if bound is not None and bound.peer != peer:
            raise Refusal(400, "channel_conflict", f"channel 0x{channel:04x} is bound")
        cooling = allocation.cooldown.get(channel)
        if cooling is not None and cooling[0] != peer:
            raise Refusal(400, "channel_conflict", f"channel 0x{channel:04x} is cooling")
        other = allocation.peer_channel.get(peer)
        if other is not None and other != channel:
            raise Refusal(400, "channel_conflict", "peer bound to another channel")
        if bound is None and len(allocation.channels) >= self.quotas.channels_per_allocation:
            raise Refusal(508, "quota_channels", "too many channels")
        if peer[0] not in allocation.permissions and (
                len(allocation.permissions) >= self.quotas.permissions_per_allocation):
            raise Refusal(508, "quota_permissions", "too many permissions")
        allocation.cooldown.pop(channel, None)
        allocation.channels[channel] = Channel(peer, now + self.lifetimes.channel)
        allocation.peer_channel[peer] = channel
        # A channel binding also installs or refreshes the permission (RFC 8656 11.2).
        allocation.permissions[peer[0]] = now + self.lifetimes.permission
        self._sync(allocation, now)

    def remove(self, allocation: Allocation, why: str) -> None:
        if self.allocations.get(allocation.client) is not allocation:
            return
        del self.allocations[allocation.client]
        if self.relayed.get(allocation.relayed) is allocation:
            del self.relayed[allocation.relayed]
            self._unbind_peer(allocation.relayed)
        routes = self.routes if allocation.stream is None else self.stream_routes
        for key in allocation.route_keys:
            routes.pop(key, None)
        allocation.route_keys = []
        allocation.peer_channels = {}
        _decrement(self._per_user, allocation.user)
        _decrement(self._per_address, client_key(allocation.client[0]))
        if why == "expired":
            self.counters.allocations_expired += 1
        else:
            self.counters.allocations_deleted += 1
        self.notes.log(logging.INFO, "allocation %s:%d %s", *allocation.client, why)
        self._on_removed(allocation)

    def _unbind_peer(self, peer: Address) -> None:
        """Channels to a relayed address that went: its port may be anyone's next."""
        now = time.monotonic()
        for allocation in self.allocations.values():
            channel = allocation.peer_channel.pop(peer, None)
            if channel is not None:
                allocation.channels.pop(channel, None)
                self._sync(allocation, now)

    def close(self) -> None:
        for allocation in list(self.allocations.values()):
            self.remove(allocation, "closed")
        for reservation in self.reservations.values():
            reservation.sock.close()
        self.reservations.clear()

    def sweep(self, now: float) -> None:
        """Expire allocations, permissions and channels; cheap when nothing expires."""
        for token, reservation in list(self.reservations.items()):
            if reservation.expires <= now:
                reservation.sock.close()
                del self.reservations[token]
        for allocation in list(self.allocations.values()):
            if allocation.expires <= now:
                self.remove(allocation, "expired")
                continue
            changed = False
            for ip, expires in list(allocation.permissions.items()):
                if expires <= now:
                    del allocation.permissions[ip]
                    self.counters.permissions_expired += 1
                    changed = True
            for number, channel in list(allocation.channels.items()):
                if channel.expires <= now:
                    del allocation.channels[number]
                    allocation.peer_channel.pop(channel.peer, None)
                    allocation.cooldown[number] = (
                        channel.peer, now + self.lifetimes.channel_cooldown)
                    self.counters.channels_expired += 1
                    changed = True
            for number, (_, until) in list(allocation.cooldown.items()):
                if until <= now:
                    del allocation.cooldown[number]
            if changed:
                self._sync(allocation, now)

    def _sync(self, allocation: Allocation, now: float) -> None:
        """Rebuild the fast-path entries of one allocation from its control state."""
        routes = self.routes if allocation.stream is None else self.stream_routes
        for key in allocation.route_keys:
            routes.pop(key, None)
        keys: list[tuple[Address, int]] = []
        peer_channels: dict[Address, int] = {}
        for number, channel in allocation.channels.items():
            # Data on a channel whose permission lapsed must stop (RFC 8656 12).
            if channel.expires > now and allocation.permitted(channel.peer[0], now):
                key = (allocation.client, number)
                routes[key] = ChannelRoute(allocation.sock.sendto, channel.peer,
                                                allocation.limiter)
                keys.append(key)
                peer_channels[channel.peer] = number
        allocation.route_keys = keys
        allocation.peer_channels = peer_channels

    def counts(self) -> dict[str, int]:
        allocations = self.allocations.values()
        return {
            "allocations": len(self.allocations),
            "permissions": sum(len(a.permissions) for a in allocations),
            "channels": sum(len(a.channels) for a in allocations),
        }


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 1) - 1
    if left:
        counts[key] = left
    else:
        counts.pop(key, None)
