"""Abuse limits: quotas, per-allocation rate limits, the peer address policy, counters.

A relay on the internet is an open proxy for anyone holding a credential, so every
limit is on by default and every refusal is counted: the counters are how an operator
tells an attack or a misconfigured client from normal traffic.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

log = logging.getLogger(__name__)

Network = IPv4Network | IPv6Network

# Never relayed to unless --allow-peer says so. A relay is an open door into the
# networks its host can reach, so everything IANA's special-purpose registries mark as
# not globally reachable is refused (RFC 6890 and its updates): private and shared
# address space, loopback, link-local, benchmarking ranges, multicast and reserved
# space. The documentation ranges (TEST-NET-1/2/3, 2001:db8::/32, 3fff::/20) are the
# exception: no real network is numbered from them, so refusing them protects nobody,
# while test worlds use them as their public internet (the relay and the peers it
# serves), where refusing them would break every relayed path. The relay host's own
# interface addresses are refused too, read from the kernel (kbwg.relay.hostaddrs). A
# test world's LANs or a relay deliberately serving a LAN open what they need with
# --allow-peer.
DEFAULT_DENIED_PEERS: tuple[str, ...] = (
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",  # private (RFC 1918)
    "100.64.0.0/10",  # shared address space, carrier-grade NAT (RFC 6598)
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local
    "172.16.0.0/12",  # private (RFC 1918)
    "192.0.0.0/24",  # IETF protocol assignments
    "192.88.99.0/24",  # the deprecated 6to4 relay anycast
    "192.168.0.0/16",  # private (RFC 1918)
    "198.18.0.0/15",  # benchmarking (RFC 2544)
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, with the limited broadcast address
    "::/128",
    "::1/128",
    "64:ff9b:1::/48",  # local-use NAT64
    "100::/64",  # discard-only
    "2001:2::/48",  # benchmarking
    "5f00::/16",  # segment routing SIDs
    "fc00::/7",  # unique local
    "fe80::/10",  # link-local
    "fec0::/10",  # the deprecated site-local
    "ff00::/8",  # multicast
)

# RFC 6052's well-known NAT64 prefix: the last 32 bits are an IPv4 address.
NAT64_WELL_KNOWN = IPv6Network("64:ff9b::/96")

# How far in the future a TURN REST username's expiry may lie beyond the longest
# credential lifetime: the clocks of the relay and of the agent minting it differ.
CREDENTIAL_CLOCK_SKEW = 300.0


def client_key(ip: str) -> str:
    """Whom per-address quotas and rate limits count: an IPv4 address (also written
    IPv4-mapped), or an IPv6 address's /64. One IPv6 host holds a whole /64 (SLAAC,
    privacy addresses), as a site behind a NAT holds one IPv4 address: counted per
    address, it would have 2^64 quotas."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)


@dataclass(frozen=True)
class Quotas:
    allocations: int = 1000
    allocations_per_user: int = 10
    # Per client IP address (an IPv6 client's /64: client_key), whatever the user names:
    # REST credentials are minted by anyone holding the team secret, so a user name
    # alone bounds nothing.
    allocations_per_address: int = 10
    permissions_per_allocation: int = 64
    channels_per_allocation: int = 64
    # Both directions together, per allocation; 0 disables the limit.
    packets_per_second: int = 100_000
    bytes_per_second: int = 125_000_000
    burst_seconds: float = 0.2
    # Answers to requests without valid credentials (Binding, 401 challenges, errors),
    # per second: per source IP and in total; 0 disables the limit. They cost nothing to
    # provoke with a spoofed source, so they must not become a reflector.
    unauthenticated_per_source: int = 10
    unauthenticated_total: int = 200


@dataclass(slots=True)
class RateLimiter:
    """Token buckets for packets and bytes, refilled from the caller's clock.

    The caller passes one `now` per batch of packets: reading the clock per packet
    would cost as much as the check itself.
    """

    packets_per_second: float
    bytes_per_second: float
    burst_seconds: float
    packets: float = 0.0
    bytes: float = 0.0
    last: float = 0.0

    def __post_init__(self) -> None:
        self.packets = self.packets_per_second * self.burst_seconds
        self.bytes = self.bytes_per_second * self.burst_seconds

    def allow(self, now: float, size: int) -> bool:
        elapsed = now - self.last
        if elapsed:
            self.last = now
            burst = self.burst_seconds
            pps, bps = self.packets_per_second, self.bytes_per_second
            self.packets = min(self.packets + elapsed * pps, pps * burst)
            self.bytes = min(self.bytes + elapsed * bps, bps * burst)
        if self.packets < 1 or self.bytes < size:
            return False
        self.packets -= 1
        self.bytes -= size
        return True


def rate_limiter(quotas: Quotas, now: float) -> RateLimiter | None:
    if quotas.packets_per_second <= 0 and quotas.bytes_per_second <= 0:
        return None
    # A disabled dimension gets a bucket that never runs dry.
    unlimited = float(2**62)
    limiter = RateLimiter(
        float(quotas.packets_per_second) if quotas.packets_per_second > 0 else unlimited,
        float(quotas.bytes_per_second) if quotas.bytes_per_second > 0 else unlimited,
        quotas.burst_seconds,
    )
    limiter.last = now
    return limiter


def parse_networks(texts: Iterable[str]) -> tuple[Network, ...]:
    """CIDR blocks or single addresses; raises ValueError naming the bad one."""
    networks: list[Network] = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"'{text}' is not an IP address or network") from exc
    return tuple(networks)


@dataclass(frozen=True)
class PeerPolicy:
    """Which peer addresses an allocation may relay to.

    `allow` wins over everything else, so tests (or a relay deliberately serving its
    own host or LAN) can open a range without turning the other protections off.
    """

    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = field(
        default_factory=lambda: parse_networks(DEFAULT_DENIED_PEERS))
    own: frozenset[str] = frozenset()

    def refusal(self, ip: str, host: tuple[Network, ...] = ()) -> str | None:
        """Why relaying to `ip` is refused, or None when allowed; `host` holds the
        networks the relay host answers for itself (its interface addresses)."""
        try:
            address: IPv4Address | IPv6Address = ipaddress.ip_address(ip)
        except ValueError:
            return "not an IP address"
        if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        elif isinstance(address, IPv6Address) and address in NAT64_WELL_KNOWN:
            # A NAT64 next to the relay host takes 64:ff9b::10.0.0.1 to 10.0.0.1, and
            # 64:ff9b::<the relay's IPv4> back to the relay: judge the IPv4 address.
            address = IPv4Address(int(address) & 0xFFFFFFFF)
        if any(address in network for network in self.allow):
            return None
        if str(address) in self.own:
            return "the relay's own address"
        for network in host:
            if address in network:
                return f"an address of the relay host ({network})"
        for network in self.deny:
            if address in network:
                return f"denied network {network}"
        return None


# Per-source buckets of sources quiet this long are full again: forgetting them loses
# nothing. The table is also capped, and pruned when it reaches the cap.
_SOURCE_BURST_SECONDS = 2.0
_TOTAL_BURST_SECONDS = 1.0
_MAX_TRACKED_SOURCES = 4096


@dataclass
class UnauthenticatedLimiter:
    """Token buckets for answers to unauthenticated requests: one per source IP (the
    victim of a reflection attack is one address, whatever ports are spoofed) and one
    for all sources together (spoofed sources are countless).

    A source's bucket is created only when the total bucket lets its first answer
    through, so the table grows no faster than the total rate allows.
    """

    per_source: int
    total: int
    sources: dict[str, RateLimiter] = field(default_factory=dict)
    overall: RateLimiter | None = None

    def __post_init__(self) -> None:
        if self.total > 0:
            self.overall = RateLimiter(float(self.total), float(2**62), _TOTAL_BURST_SECONDS)

    def allow(self, source: str, now: float) -> str | None:
        """None to answer, else the counter naming why not."""
        bucket = None
        if self.per_source > 0:
            bucket = self.sources.get(source)
            if bucket is not None and not bucket.allow(now, 0):
                return "unauthenticated_limited_source"
        if self.overall is not None and not self.overall.allow(now, 0):
            return "unauthenticated_limited_total"
        if self.per_source > 0 and bucket is None:
            if len(self.sources) >= _MAX_TRACKED_SOURCES:
                self.prune(now)
                if len(self.sources) >= _MAX_TRACKED_SOURCES:
                    return "unauthenticated_limited_total"
            bucket = RateLimiter(float(self.per_source), float(2**62),
                                 _SOURCE_BURST_SECONDS)
            bucket.last = now
            bucket.allow(now, 0)
            self.sources[source] = bucket
        return None

    def prune(self, now: float) -> None:
        self.sources = {source: bucket for source, bucket in self.sources.items()
                        if now - bucket.last < _SOURCE_BURST_SECONDS}


@dataclass
class Counters:
    """Everything the relay did and refused; refusals are named after their reason."""

    # Traffic.
    stun_requests: int = 0
    stun_indications: int = 0
    channel_data_in: int = 0
    peer_datagrams_in: int = 0
    to_peer_packets: int = 0
    to_peer_bytes: int = 0
    to_client_packets: int = 0
    to_client_bytes: int = 0
    data_indications_out: int = 0
    binding_responses: int = 0
    change_request_responses: int = 0
    # Allocation lifecycle.
    allocations_created: int = 0
    allocations_deleted: int = 0
    allocations_expired: int = 0
    permissions_expired: int = 0
    channels_expired: int = 0
    # Undecodable input, dropped silently.
    truncated: int = 0
    not_stun: int = 0
    bad_fingerprint: int = 0
    malformed: int = 0
    unknown_method: int = 0
    truncated_channel_data: int = 0
    wrong_socket: int = 0
    handler_errors: int = 0
    # Refused requests, by error code.
    unknown_attribute: int = 0  # 420
    unauthenticated: int = 0  # 401 challenge: no credentials yet, the normal first step
    bad_credentials: int = 0  # 401
    expired_username: int = 0  # 401
    wrong_realm: int = 0  # 401
    expiry_too_far: int = 0  # 401: a username valid for longer than the relay accepts
    stale_nonce: int = 0  # 438
    bad_request: int = 0  # 400
    bad_channel_number: int = 0  # 400
    channel_conflict: int = 0  # 400
    peer_forbidden: int = 0  # 403
    allocation_mismatch: int = 0  # 437
    wrong_credentials: int = 0  # 441
    unsupported_transport: int = 0  # 442
    address_family: int = 0  # 440/443
    quota_user: int = 0  # 486
    quota_address: int = 0  # 486: too many allocations from one client IP
    quota_total: int = 0  # 508
    quota_permissions: int = 0  # 508
    quota_channels: int = 0  # 508
    no_capacity: int = 0  # 508: no relayed port, or a reservation we do not offer
    # Dropped data.
    no_allocation: int = 0
    no_permission: int = 0
    no_permission_in: int = 0
    no_channel: int = 0
    rate_limited: int = 0
    # Answers to unauthenticated requests not sent: their source, or all sources
    # together, asked too often (the request is still counted under its own name).
    unauthenticated_limited_source: int = 0
    unauthenticated_limited_total: int = 0
    send_errors: int = 0
    receive_errors: int = 0
    # TURN over TCP and TLS (kbwg.relay.streams).
    stream_connections: int = 0  # accepted
    stream_refused: int = 0  # over the connection limits
    stream_bad_input: int = 0  # closed: garbage, a stalled partial frame
    stream_idle: int = 0  # closed: no allocation in time
    stream_dropped: int = 0  # datagrams for a client that reads too slowly

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    def nonzero(self) -> dict[str, int]:
        return {key: value for key, value in asdict(self).items() if value}
