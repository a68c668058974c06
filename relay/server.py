"""The relay server: its sockets, the data path, and the expiry timer.

Throughput is decided here. Each socket is a raw non-blocking socket watched with
`loop.add_reader`; one readiness callback drains up to `batch` datagrams with
`recvfrom_into` into a preallocated buffer and forwards slices of it, so a relayed
packet costs two system calls, two dictionary lookups and no Python object beyond
the address tuple the kernel hands back. asyncio's DatagramProtocol would add a bytes
copy, a callback and a transport layer per packet.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
import time
from dataclasses import replace

from kbwg.core.addresses import Address
from kbwg.core.stun import is_channel_data
from kbwg.relay.allocation import Allocation, AllocationTable
from kbwg.relay.config import ServerConfig
from kbwg.relay.control import ControlPlane
from kbwg.relay.hostaddrs import HostAddresses
from kbwg.relay.limits import DEFAULT_DENIED_PEERS, Counters, PeerPolicy, parse_networks
from kbwg.relay.sockets import local_address, open_even_pair, open_relayed, open_udp
from kbwg.relay.streams import StreamListeners, peer_to_stream

log = logging.getLogger(__name__)


_MAX_DATAGRAM = 65536
_CHANNEL_HEADER = struct.Struct("!HH")


class RelayServer:
    def __init__(self, config: ServerConfig, counters: Counters | None = None) -> None:
        self.config = config
        self.counters = counters if counters is not None else Counters()
        self._relay_ip = config.relayed_ip
        self._relay_ip6 = config.relayed_ip6
        self._sockets: dict[Address, socket.socket] = {}
        self._main: socket.socket | None = None
        self._main_addr: Address = config.listen
        self._main6: socket.socket | None = None  # IPv6 clients (--listen6)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.Task[None] | None = None
        # Two buffers: client->peer, and peer->client with room for the channel header.
        self._in = bytearray(_MAX_DATAGRAM)
        self._in_view = memoryview(self._in)
        self._out = bytearray(_MAX_DATAGRAM + 4)
        self._out_view = memoryview(self._out)
        own = {config.listen[0], self._relay_ip}
        if config.alt_address:
            own.add(config.alt_address[0])
        if config.listen6 is not None:
            own.add(config.listen6[0])
        if self._relay_ip6 is not None:
            own.add(self._relay_ip6)
        own -= {"0.0.0.0", "::"}
        policy = PeerPolicy(
            allow=config.allow_peers,
            deny=parse_networks(DEFAULT_DENIED_PEERS) + config.deny_peers,
            own=frozenset(_canonical(ip) for ip in own),
        )
        relay_ip6 = self._relay_ip6
        self.table = AllocationTable(
            quotas=config.quotas, lifetimes=config.lifetimes, policy=policy,
            counters=self.counters, open_socket=self._open_relayed,
            open_pair=lambda: open_even_pair(self._relay_ip, config.relayed_socket_buffer),
            on_created=self._allocation_created, on_removed=self._allocation_removed,
            host=HostAddresses(),
            open_socket6=None if relay_ip6 is None else self._open_relayed6,
            open_pair6=None if relay_ip6 is None else (
                lambda: open_even_pair(relay_ip6, config.relayed_socket_buffer)),
        )
        self.control: ControlPlane | None = None
        self.streams: StreamListeners | None = None  # TCP and TLS clients

    @property
    def address(self) -> Address:
        if self._main is None:
            raise RuntimeError("relay not started")
        return local_address(self._main)

    @property
    def address6(self) -> Address | None:
        """The IPv6 socket's address, None without --listen6."""
        return None if self._main6 is None else local_address(self._main6)

    @property
    def addresses(self) -> list[Address]:
        return list(self._sockets)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        config = self.config
        try:
            main = open_udp(config.listen, config.socket_buffer)
            self._main = main
            main_address = local_address(main)
            self._main_addr = main_address
            self._sockets[main_address] = main
            alternates: dict[Address, Address] = {}
            if config.alt_address is not None:
                alternates = self._open_alternates(main_address, config.alt_address)
            main6_address: Address | None = None
            if config.listen6 is not None:
                main6 = open_udp(config.listen6, config.socket_buffer)
                self._main6 = main6
                main6_address = local_address(main6)
                self._sockets[main6_address] = main6
                self._loop.add_reader(main6.fileno(), self._main_readable, main6,
                                      main6_address)
            self.control = ControlPlane(config, self.table, self.counters, self._send,
                                        main_address, alternates, main6_address)
            self._loop.add_reader(main.fileno(), self._main_readable, main, main_address)
            for address, sock in self._sockets.items():
                if sock is not main and sock is not self._main6:
                    self._loop.add_reader(sock.fileno(), self._aux_readable, sock, address)
            if config.tcp_listen is not None or config.tls_listen is not None:
                self.streams = StreamListeners(config, self.table, self.counters,
                                               self.control, main_address)
                await self.streams.start()
        except BaseException:
            self.close()
            raise
        self._sweeper = asyncio.create_task(self._sweep())
        log.info("relay listening on %s (relayed address %s%s)",
                 ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}"
                           for h, p in self._sockets), self._relay_ip,
                 f", IPv6 {self._relay_ip6}" if self._relay_ip6 else "")
        self._log_peer_policy()

    def _log_peer_policy(self) -> None:
        policy = self.table.policy
        log.info("peers allowed beyond the default policy (--allow-peer): %s",
                 ", ".join(str(n) for n in policy.allow) or "none")
        # A relay on a private network refuses its neighbours unless told otherwise:
        # say so at start, not in the first 403.
        for ip in (self._relay_ip, self._relay_ip6):
            reason = None if ip is None else replace(policy, own=frozenset()).refusal(ip)
            if reason is not None:
                log.warning("the relayed address %s is in %s: peers on its network are "
                            "refused unless --allow-peer opens them", ip, reason)

    def _open_alternates(self, main: Address, alt: Address) -> dict[Address, Address]:
        """RFC 5780: listen on both IPs x both ports; each socket's OTHER-ADDRESS is the
        one differing in both."""
        if alt[0] == main[0] or alt[1] == main[1]:
            raise ValueError("the alternate address needs another IP and another port")
        alternates: dict[Address, Address] = {}
        for ip, other_ip in ((main[0], alt[0]), (alt[0], main[0])):
            for port, other_port in ((main[1], alt[1]), (alt[1], main[1])):
                if (ip, port) != main:
                    self._sockets[(ip, port)] = open_udp((ip, port), self.config.socket_buffer)
                alternates[(ip, port)] = (other_ip, other_port)
        return alternates

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self.streams is not None:
            self.streams.close()
        self.table.close()
        for sock in self._sockets.values():
            if self._loop is not None and sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets.clear()
        self._main = None
        self._main6 = None

    async def __aenter__(self) -> RelayServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # --- sockets of allocations ---

    def _open_relayed(self, even_port: bool, dont_fragment: bool) -> socket.socket:
        return open_relayed(self._relay_ip, self.config.relayed_socket_buffer,
                            even_port=even_port, dont_fragment=dont_fragment)

    def _open_relayed6(self, even_port: bool, dont_fragment: bool) -> socket.socket:
        if self._relay_ip6 is None:
            raise OSError("no IPv6 relayed address")
        return open_relayed(self._relay_ip6, self.config.relayed_socket_buffer,
                            even_port=even_port, dont_fragment=dont_fragment)

    def _allocation_removed(self, allocation: Allocation) -> None:
        sock = allocation.sock
        if self._loop is not None and sock.fileno() >= 0:
            self._loop.remove_reader(sock.fileno())
        sock.close()

    def _allocation_created(self, allocation: Allocation) -> None:
        if self._loop is None:
            return
        if allocation.stream is None:
            self._loop.add_reader(allocation.sock.fileno(), self._relayed_readable,
                                  allocation)
        elif self.control is not None:
            self._loop.add_reader(allocation.sock.fileno(), peer_to_stream, allocation,
                                  self.control, self.counters, self.config.batch)

    # --- sending ---

    def _send(self, data: bytes, to: Address, local: Address) -> None:
        sock = self._sockets.get(local)
        if sock is None:
            return
        try:
            sock.sendto(data, to)
        except OSError:
            self.counters.send_errors += 1

    # --- the data path ---

    def _main_readable(self, main: socket.socket, local: Address) -> None:
        """The main socket, or the IPv6 one (`local` is its address)."""
        control = self.control
        if control is None or main.fileno() < 0:
            return
        recv = main.recvfrom_into
        buf, view = self._in, self._in_view
        routes = self.table.routes
        unpack = _CHANNEL_HEADER.unpack_from
        counters = self.counters
        now = time.monotonic()
        received = sent = sent_bytes = 0
        try:
            for _ in range(self.config.batch):
                try:
                    size, source = recv(buf)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    counters.receive_errors += 1
                    break
                # An IPv6 socket's source has flow info and scope too: routes and
                # allocations are keyed by (host, port).
                client = source if len(source) == 2 else (source[0], source[1])
                # core.stun.is_channel_data, inlined on the per-packet hot path.
                if size and 0x40 <= buf[0] <= 0x7F:
                    received += 1
                    if size < 4:
                        counters.truncated_channel_data += 1
                        continue
                    channel, length = unpack(buf)
                    # UDP ChannelData may carry padding, never less than its length.
                    if length > size - 4:
                        counters.truncated_channel_data += 1
                        continue
                    route = routes.get((client, channel))
                    if route is None:
                        counters.no_channel += 1
                        continue
                    sendto, peer, limiter = route
                    if limiter is not None and not limiter.allow(now, length):
                        counters.rate_limited += 1
                        continue
                    try:
                        sendto(view[4:4 + length], peer)
                    except OSError:
                        counters.send_errors += 1
                        continue
                    sent += 1
                    sent_bytes += length
                else:
                    control.datagram_received(bytes(view[:size]), client, local)
        finally:
            counters.channel_data_in += received
            counters.to_peer_packets += sent
            counters.to_peer_bytes += sent_bytes

    def _aux_readable(self, sock: socket.socket, local: Address) -> None:
        """RFC 5780 sockets: STUN Binding only, never on the data path."""
        control = self.control
        if control is None:
            return
        for _ in range(self.config.batch):
            try:
                data, client = sock.recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.counters.receive_errors += 1
                return
            if data and is_channel_data(data):
                self.counters.wrong_socket += 1
                continue
            control.datagram_received(data, (str(client[0]), int(client[1])), local)

    def _relayed_readable(self, allocation: Allocation) -> None:
        client = allocation.client
        # Back on the socket the client came in on: the IPv6 one for an IPv6 client.
        main = self._main6 if ":" in client[0] else self._main
        control = self.control
        if main is None or control is None:
            return
        recv = allocation.sock.recvfrom_into
        send = main.sendto
        buf, view = self._out, self._out_view
        payload = view[4:]
        pack = _CHANNEL_HEADER.pack_into
        channels = allocation.peer_channels
        limiter = allocation.limiter
        counters = self.counters
        now = time.monotonic()
        received = sent = sent_bytes = 0
        try:
            for _ in range(self.config.batch):
                try:
                    size, source = recv(payload)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:  # closed under us when the allocation went away
                    counters.receive_errors += 1
                    break
                received += 1
                peer = source if len(source) == 2 else (source[0], source[1])
                channel = channels.get(peer)
                if channel is None and not allocation.permitted(peer[0], now):
                    counters.no_permission_in += 1
                    continue
                if limiter is not None and not limiter.allow(now, size):
                    counters.rate_limited += 1
                    continue
                try:
                    if channel is not None:
                        pack(buf, 0, channel, size)
                        send(view[:4 + size], client)
                    else:
                        send(control.data_indication(
                            allocation, (str(peer[0]), int(peer[1])),
                            bytes(payload[:size])), client)
                except OSError:
                    counters.send_errors += 1
                    continue
                sent += 1
                sent_bytes += size
        finally:
            counters.peer_datagrams_in += received
            counters.to_client_packets += sent
            counters.to_client_bytes += sent_bytes

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            try:
                now = time.monotonic()
                self.table.sweep(now)
                if self.streams is not None:
                    self.streams.sweep(now)
            except Exception:  # the timer must survive a bug in one allocation
                self.counters.handler_errors += 1
                log.exception("expiry sweep failed")


def _canonical(ip: str) -> str:
    """As PeerPolicy compares: `str(ip_address(...))`, so 2001:DB8:0::1 is 2001:db8::1."""
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return ip
