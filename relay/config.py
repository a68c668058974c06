"""The relay's settings, as one immutable value built by the CLI or by tests."""

from __future__ import annotations

from dataclasses import dataclass, field

from kbwg.core.addresses import Address
from kbwg.relay.limits import Network, Quotas


@dataclass(frozen=True)
class Lifetimes:
    """Seconds; RFC 8656's defaults (allocation 600 s up to 3600, permission 300 s,
    channel 600 s, channel number quarantined 300 s after expiry)."""

    allocation_default: float = 600
    allocation_max: float = 3600
    permission: float = 300
    channel: float = 600
    channel_cooldown: float = 300
    nonce: float = 600
    # The longest a TURN REST username may stay valid: its expiry must not lie further
    # ahead (plus limits.CREDENTIAL_CLOCK_SKEW), or anyone who once held the secret
    # could mint credentials that never expire. kbwg agents mint 24-hour ones.
    credential_max: float = 24 * 3600

    def granted(self, requested: int | None) -> float:
        """RFC 8656 7.2: the request capped by the maximum, but never below the default."""
        if requested is None:
            return self.allocation_default
        return max(self.allocation_default, min(float(requested), self.allocation_max))


@dataclass(frozen=True)
class ServerConfig:
    listen: Address
    secret: str
    realm: str = "kbwg"
    # The address put in XOR-RELAYED-ADDRESS and bound by relayed sockets; defaults to
    # the listen address, and is required when listening on 0.0.0.0.
    relay_ip: str | None = None
    # RFC 5780: a second IP and port; the relay then listens on all four combinations.
    alt_address: Address | None = None
    allow_peers: tuple[Network, ...] = ()
    deny_peers: tuple[Network, ...] = ()
    quotas: Quotas = field(default_factory=Quotas)
    lifetimes: Lifetimes = field(default_factory=Lifetimes)
    sweep_interval: float = 1.0
    # Big buffers absorb bursts while the single Python thread is busy elsewhere.
    socket_buffer: int = 4 * 1024 * 1024
    relayed_socket_buffer: int = 1024 * 1024
    # Datagrams handled per readiness callback before yielding to the event loop.
    batch: int = 256
    software: str | None = "kbwg-relay"
    # TURN over TCP and TLS (RFC 8656 3.1), each off when None. TLS needs a certificate
    # chain and its key (PEM files).
    tcp_listen: Address | None = None
    tls_listen: Address | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # A stream client that has no allocation this long after connecting is closed, as
    # is one that leaves a frame half sent this long.
    stream_idle_timeout: float = 30.0
    stream_frame_timeout: float = 10.0
    tls_handshake_timeout: float = 10.0
    # IPv6 (RFC 8656 7.1): a second UDP socket for clients reaching the relay over IPv6,
    # and the address of IPv6 relayed sockets, given to allocations asking for one with
    # REQUESTED-ADDRESS-FAMILY (the family of the client's own path does not matter).
    # Without either the relay answers such requests 440.
    listen6: Address | None = None
    relay_ip6: str | None = None

    @property
    def relayed_ip(self) -> str:
        ip = self.relay_ip or self.listen[0]
        if ip in ("0.0.0.0", ""):
            raise ValueError("listening on a wildcard address needs --relay-ip")
        return ip

    @property
    def relayed_ip6(self) -> str | None:
        """The address of IPv6 relayed sockets, None when the relay offers none."""
        ip = self.relay_ip6 or (self.listen6[0] if self.listen6 is not None else None)
        if ip == "::":
            raise ValueError("listening on the IPv6 wildcard address needs --relay-ip6")
        return ip
