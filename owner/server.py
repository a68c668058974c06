"""The privileged device owner's request server (started by kbwg.owner.main).

It speaks frames (kbwg.owner.frames, vocabulary in kbwg.owner.protocol) on stdin/stdout
and logs to stderr only. It owns the WireGuard device, the overlay address, any host
routes it was asked for and the raw socket that shares the WireGuard port with STUN
(whose packets it passes to the agent as `stun` events), and removes all of them on
`shutdown`, a stop signal (STOP_SIGNALS: INT, TERM, HUP and the others sudo relays),
end of stdin (the agent exited), a broken stdout, or a stream it cannot resynchronise.
Every request is judged by kbwg.owner.guard first.
It also reads the host's network for the agent (addresses, gateway, routes, and their
changes as `network` events: kbwg.owner.host_network), so that the agent never loads
pyroute2.

Its collaborators (netlink, WireGuard backend, raw STUN socket, policy) are constructor
arguments: there is no switch to anything else in the privileged program.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Network, ip_network
from typing import Any, Protocol

from nacl.public import PrivateKey

from kbwg.core.ratelimit import TokenBucket
from kbwg.owner.frames import FrameBodyError, FrameError, encode_frame, read_frame
from kbwg.owner.guard import R_PEERS, R_ROUTE_NOT_OURS, Guard, Refusal
from kbwg.owner.host_network import HostNetwork, NetlinkHostNetwork
from kbwg.owner.netconfig import HostRoute, IPInterface, NetConfig
from kbwg.owner.netlink_watch import Coalescer, NetworkChange
from kbwg.owner.policy import OwnerPolicy
from kbwg.owner.protocol import (
    ERR_NO_DEVICE,
    ERR_NO_STUN,
    OP_ADD_ROUTE,
    OP_CREATE,
    OP_DEFAULT_GATEWAY,
    OP_EGRESS,
    OP_HELLO,
    OP_HOST_ROUTES,
    OP_INTERFACES,
    OP_REMOVE_PEER,
    OP_REMOVE_ROUTE,
    OP_SET_ADDRESS,
    OP_SET_PEER,
    OP_SHUTDOWN,
    OP_STATS,
    OP_STUN_OPEN,
    OP_STUN_SEND,
    OP_STUN_UFRAGS,
    OP_WATCH_NETWORK,
    OPS_WITHOUT_DEVICE,
    PROTOCOL_VERSION,
    AddRouteArgs,
    CreateArgs,
    EgressArgs,
    HostRoutesArgs,
    ProtocolError,
    RemovePeerArgs,
    RemoveRouteArgs,
    Request,
    SetPeerArgs,
    StunSendArgs,
    StunUfragsArgs,
    encode_key,
    error_reply,
    format_endpoint,
    network_event,
    no_arguments,
    ok_reply,
    parse_interface,
    parse_request,
    stun_event,
)
from kbwg.owner.rawstun import (
    PacketCallback,
    RawStunError,
    UdpDatagram,
)
from kbwg.owner.stunfilter import SharedPortFilter
from kbwg.owner.wg_backend import BackendError, PeerConfig, WireGuardBackend

logger = logging.getLogger(__name__)

# A send refused because the address or route it needs just went: routine while the
# host changes networks (a Wi-Fi switch fails every check for a second), and the
# agent, which sent it, says so itself.
UNREACHABLE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL})


def _network_moving(exc: Exception) -> bool:
    cause = exc.__cause__
    return isinstance(cause, OSError) and cause.errno in UNREACHABLE


EXIT_OK = 0
EXIT_STREAM_BROKEN = 1

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

# Every signal whose default action ends the process, and that sudo relays from the
# agent's user to the owner (or the user's CPU-time limit sends, when root cannot lift
# it): any of them must clean up, not leave the device behind.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGXCPU)


class StunSocket(Protocol):
    """What the owner needs of kbwg.owner.rawstun.RawStunSocket (tests substitute it)."""

    port: int

    def send(
        self, payload: bytes, dest: tuple[str, int], source: str | None
    ) -> tuple[str, int]: ...

    def close(self) -> None: ...


RawStunFactory = Callable[[int, PacketCallback], StunSocket]

# STUN through the owner: ICE paces checks at tens per second, so this only bites a
# runaway agent. What arrives is sorted and budgeted by kbwg.owner.stunfilter.
STUN_SEND_RATE, STUN_SEND_BURST = 200.0, 100

# An agent that stops reading must not make the owner buffer events without bound.
EVENT_BUFFER_LIMIT = 1 << 20

# Peers one device may have. Each costs wireguard-go (or the kernel) tens of KiB that no
# limit of the agent's user covers, and every stats read grows with them; a team's mesh
# stays far below this.
MAX_PEERS = 4096

# Requests being answered at once. With this many, the owner reads no further frame until
# one is answered: it runs as root and must not grow its memory for an agent that floods
# it (a well-behaved agent has a handful out at a time).
MAX_IN_FLIGHT = 32

# Ops answered without waiting behind the others. Every op NOT listed here (including any
# op added later, unless it is listed) changes the device, the host or what the owner
# tracks, and runs strictly in arrival order with the rest of them: each may depend on an
# earlier one's effect (set_peer on create, add_route's check on the peers set before it,
# set_address on the address before it, shutdown after everything asked before it).
# These only read, or do all their work without awaiting anything, so they need no turn:
# - stun_send and stun_ufrags complete in one step (no await), hence in arrival order
#   among themselves. A connectivity check must not wait behind a set_peer's UAPI exchange
#   under CPU contention: that inflates the RTT it measures and delays the check.
# - stats, interfaces, default_gateway, host_routes, egress and hello read, each with its
#   own netlink socket or UAPI connection. One asked while a change is still in flight may
#   see the state before it; a client that needs the change's effect waits for its reply
#   first (the agent always does).
CONCURRENT_OPS = frozenset({
    OP_STUN_SEND, OP_STUN_UFRAGS, OP_STATS, OP_INTERFACES, OP_DEFAULT_GATEWAY,
    OP_HOST_ROUTES, OP_EGRESS, OP_HELLO,
})


class OverRateLimit(ProtocolError):
    """A stun_send beyond STUN_SEND_RATE: refused, and logged once per episode (a burst
    of them would otherwise fill the log with one line each)."""


@dataclass
class DeviceState:
    backend: WireGuardBackend | None = None
    ifname: str | None = None
    # Set only once the address is really on the link, so cleanup removes only ours.
    address: IPInterface | None = None
    # The overlay network of the device, fixed at create: set_address stays inside it.
    overlay: IPv4Network | None = None
    routes: dict[str, HostRoute] = field(default_factory=dict)
    stun: StunSocket | None = None
    # The keys set_peer may have put on the device and remove_peer did not take off.
    peers: set[bytes] = field(default_factory=set)


@dataclass
class _Session:
    """One `serve` call: its requests in flight, its output, and how it ends."""

    writer: asyncio.StreamWriter
    # Set once (with the exit code) when the session must end: output closed, shutdown
    # answered, or a request task failed outside its handler.
    ended: asyncio.Future[int]
    tasks: set[asyncio.Task[object]] = field(default_factory=set)

    def start(self, work: Awaitable[object]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[object]) -> None:
        self.tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        # handle() answers every handler failure, so this is a bug in the owner: exit and
        # clean up rather than run on in an unknown state.
        logger.error("answering a request failed: cleaning up and exiting",
                     exc_info=task.exception())  # fmt: skip
        self.end(EXIT_STREAM_BROKEN)

    def end(self, code: int, message: str | None = None) -> None:
        if not self.ended.done():
            if message is not None:
                logger.info("%s", message)
            self.ended.set_result(code)

    async def send(self, reply: dict[str, Any]) -> bool:
        """Write one reply as one whole frame (never interleaved with another reply or an
        event); False, and the session ends, if the output is closed."""
        try:
            data = encode_frame(reply)
        except Exception as exc:  # an oversized or unpackable reply: say so instead
            logger.exception("reply to request %r cannot be sent", reply.get("id"))
            data = encode_frame(error_reply(reply.get("id"), f"reply not sent: {exc}"))
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            self.end(EXIT_OK, f"output closed ({exc}): cleaning up and exiting")
            return False
        return True

    async def cancel_all(self) -> None:
        """Cancel the requests in flight and wait until they are gone, so that cleanup
        never races a half-done change (a UAPI write, a netlink request)."""
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


class OwnerServer:
    """Serves requests, each as a task of its own (state-changing ones in arrival order:
    CONCURRENT_OPS), and keeps track of everything it creates."""

    def __init__(
        self,
        net: NetConfig,
        backend_factory: Callable[[str], WireGuardBackend],
        policy: OwnerPolicy,
        raw_stun_factory: RawStunFactory,
        stun_filter: SharedPortFilter | None = None,
        host: HostNetwork | None = None,
    ) -> None:
        self._net = net
        self._host: HostNetwork = host if host is not None else NetlinkHostNetwork()
        self._watching: asyncio.Task[None] | None = None
        self._changes = Coalescer(self._on_network_change)
        self._backend_factory = backend_factory
        self._raw_stun_factory = raw_stun_factory
        self.guard = Guard(policy, net)
        self.refusals: Counter[str] = Counter()
        self.state = DeviceState()
        self._events: asyncio.StreamWriter | None = None
        self._send_bucket = TokenBucket(STUN_SEND_RATE, STUN_SEND_BURST)
        # Sends refused since the rate limit last cut in (0: under the limit).
        self._sends_refused = 0
        self.stun_filter = stun_filter if stun_filter is not None else SharedPortFilter()
        self.events_dropped = 0
        # Taken by every op not in CONCURRENT_OPS. asyncio.Lock is FIFO, and request tasks
        # take it in their first step, in the order they were started: arrival order.
        self._in_order = asyncio.Lock()
        # Later ops plug in here.
        self.handlers: dict[str, Handler] = {
            OP_HELLO: self._hello,
            OP_CREATE: self._create,
            OP_SET_PEER: self._set_peer,
            OP_REMOVE_PEER: self._remove_peer,
            OP_STATS: self._stats,
            OP_ADD_ROUTE: self._add_route,
            OP_REMOVE_ROUTE: self._remove_route,
            OP_STUN_OPEN: self._stun_open,
            OP_STUN_SEND: self._stun_send,
            OP_STUN_UFRAGS: self._stun_ufrags,
            OP_SET_ADDRESS: self._set_address,
            OP_SHUTDOWN: self._shutdown,
            OP_INTERFACES: self._interfaces,
            OP_DEFAULT_GATEWAY: self._default_gateway,
            OP_HOST_ROUTES: self._host_routes,
            OP_EGRESS: self._egress,
            OP_WATCH_NETWORK: self._watch_network,
        }

    async def handle(self, frame: dict[str, Any]) -> dict[str, Any]:
        try:
            request = parse_request(frame)
        except ProtocolError as exc:
            rid = frame.get("id")
            # Echo a usable id so the client fails that request instead of waiting.
            echo = rid if isinstance(rid, int) and not isinstance(rid, bool) else None
            logger.warning("invalid request: %s", exc)
            return error_reply(echo, f"invalid request: {exc}")
        if request.op in CONCURRENT_OPS:
            return await self._run(request)
        async with self._in_order:
            return await self._run(request)

    async def _run(self, request: Request) -> dict[str, Any]:
        handler = self.handlers.get(request.op)
        if handler is None:
            logger.warning("unknown op %r", request.op)
            return error_reply(request.id, f"unknown op '{request.op}'")
        if request.op not in OPS_WITHOUT_DEVICE and self.state.backend is None:
            return error_reply(request.id, ERR_NO_DEVICE)
        logger.debug("request %d: %s", request.id, request.op)
        try:
            result = await handler(request.args)
        except OverRateLimit as exc:
            return error_reply(request.id, str(exc))  # said once per episode, not per send
        except Refusal as exc:
            self.refusals[exc.key] += 1
            logger.warning("refused %s (%s): %s", request.op, exc.key, exc.reason)
            return error_reply(request.id, str(exc))
        except (ProtocolError, BackendError, RawStunError) as exc:
            logger.log(logging.DEBUG if _network_moving(exc) else logging.WARNING,
                       "%s failed: %s", request.op, exc)
            return error_reply(request.id, str(exc))
        except Exception as exc:
            logger.exception("%s failed", request.op)
            return error_reply(request.id, f"{request.op} failed: {exc}")
        return ok_reply(request.id, **result)

    def _backend(self) -> WireGuardBackend:
        if self.state.backend is None:
            raise ProtocolError(ERR_NO_DEVICE)
        return self.state.backend

    def _overlay(self) -> IPv4Network:
        if self.state.overlay is None:
            raise ProtocolError(ERR_NO_DEVICE)
        return self.state.overlay

    async def _set_address(self, args: dict[str, Any]) -> dict[str, Any]:
        address = parse_interface(args)
        assert self.state.ifname is not None
        await self.guard.set_address(address, self._overlay(), self.state.ifname)
        if address == self.state.address:
            return {}
        old = self.state.address
        if old is not None:
            # Old one first: deleting a primary address also deletes the secondary ones
            # of its subnet (promote_secondaries is off by default), so a new address
            # added before it would go too, leaving the device without any address.
            await self._net.remove_address(self.state.ifname, old)
            self.state.address = None
        try:
            await self._net.add_address(self.state.ifname, address)
        except BaseException:
            if old is not None:
                with contextlib.suppress(Exception):
                    await self._net.add_address(self.state.ifname, old)
                    self.state.address = old
            raise
        self.state.address = address
        logger.info("address of %s is now %s (was %s)", self.state.ifname, address, old)
        return {}

    async def _hello(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"version": PROTOCOL_VERSION, "pid": os.getpid()}

    async def _create(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.state.backend is not None:
            raise ProtocolError(f"device {self.state.ifname} already exists")
        spec = CreateArgs.parse(args)
        await self.guard.create(spec)
        assert isinstance(spec.address.network, IPv4Network)
        backend = self._backend_factory(spec.backend)
        port = await backend.create(spec.ifname, spec.private_key, spec.listen_port)
        self.state.backend, self.state.ifname = backend, spec.ifname
        self.state.overlay = spec.address.network
        try:
            if backend.outlives_owner:
                await self._net.reap_link(spec.ifname)
            await self._net.set_mtu(spec.ifname, spec.mtu)
            await self._net.add_address(spec.ifname, spec.address)
            self.state.address = spec.address
            await self._net.set_up(spec.ifname)
        except BaseException:
            # Half a device is worse than none: the agent may retry create cleanly.
            await self.cleanup()
            raise
        public_key = bytes(PrivateKey(spec.private_key).public_key)
        logger.info(
            "created %s (%s backend, port %d, address %s)",
            spec.ifname, backend.name, port, spec.address,
        )  # fmt: skip
        return {
            "backend": backend.name,
            "listen_port": port,
            "public_key": encode_key(public_key),
            "ifname": spec.ifname,
        }

    async def _set_peer(self, args: dict[str, Any]) -> dict[str, Any]:
        spec = SetPeerArgs.parse(args)
        self.guard.set_peer(spec, self._overlay())
        peers = self.state.peers
        if spec.public_key not in peers and len(peers) >= MAX_PEERS:
            raise Refusal(R_PEERS, f"the device already has {len(peers)} peers, the most "
                                   "it may have: remove one first")
        # Counted before the call: a failed one may still have made the peer.
        peers.add(spec.public_key)
        await self._backend().set_peer(
            PeerConfig(
                public_key=spec.public_key,
                endpoint=spec.endpoint,
                allowed_ips=spec.allowed_ips,
                keepalive=spec.keepalive,
            )
        )
        return {}

    async def _remove_peer(self, args: dict[str, Any]) -> dict[str, Any]:
        spec = RemovePeerArgs.parse(args)
        await self._backend().remove_peer(spec.public_key)
        self.state.peers.discard(spec.public_key)
        return {}

    def stun_filter_stats(self) -> dict[str, int]:
        return {**self.stun_filter.to_json(), "events_dropped": self.events_dropped}

    async def _stats(self, args: dict[str, Any]) -> dict[str, Any]:
        refusals = dict(self.refusals)
        if self.state.backend is None:
            return {"listen_port": 0, "peers": [], "refusals": refusals}
        # One read for both: on wireguard-go each read is a UAPI exchange.
        device = await self.state.backend.stats()
        return {
            "refusals": refusals,
            "stun_filter": self.stun_filter_stats(),
            "listen_port": device.listen_port,
            "peers": [
                {
                    "public_key": encode_key(p.public_key),
                    "endpoint": p.endpoint,
                    "last_handshake": p.last_handshake,
                    "rx_bytes": p.rx_bytes,
                    "tx_bytes": p.tx_bytes,
                    "allowed_ips": p.allowed_ips,
                    "keepalive": p.keepalive,
                }
                for p in device.peers
            ],
        }

    async def _add_route(self, args: dict[str, Any]) -> dict[str, Any]:
        spec = AddRouteArgs.parse(args)
        assert self.state.ifname is not None
        egress = await self.guard.add_route(
            spec, "via" in args, self.state.ifname, self._overlay(),
            await self._backend().peers(),
        )
        key = str(spec.destination)
        route = HostRoute(destination=key, via=egress.gateway, ifname=egress.ifname)
        previous = self.state.routes.get(key)
        if previous is not None and previous.ifname != route.ifname:
            # A replace would leave the old one tracked under the wrong interface.
            await self._net.remove_route(previous)
            del self.state.routes[key]
            previous = None
        # Replace only a route we own; `add` refuses to clobber someone else's.
        await self._net.add_route(route, replace=previous is not None)
        self.state.routes[key] = route
        logger.info("host route %s via %s dev %s", key, route.via, route.ifname)
        return {"via": route.via, "ifname": route.ifname}

    async def _remove_route(self, args: dict[str, Any]) -> dict[str, Any]:
        spec = RemoveRouteArgs.parse(args)
        key = str(spec.destination)
        route = self.state.routes.get(key)
        if route is None:
            raise Refusal(R_ROUTE_NOT_OURS, f"no route to {key} was added by this owner")
        await self._net.remove_route(route)
        del self.state.routes[key]
        return {}

    async def _stun_open(self, args: dict[str, Any]) -> dict[str, Any]:
        port = await self._backend().listen_port()
        current = self.state.stun
        if current is not None and current.port == port:
            return {"port": port}
        if current is not None:
            current.close()
            self.state.stun = None
        self.state.stun = self._raw_stun_factory(port, self._on_stun_packet)
        return {"port": port}

    async def _stun_send(self, args: dict[str, Any]) -> dict[str, Any]:
        spec = StunSendArgs.parse(args)
        if self.state.stun is None:
            raise ProtocolError(ERR_NO_STUN)
        if not self._send_bucket.take():
            if not self._sends_refused:
                logger.warning("stun_send over the rate limit (%.0f a second, bursts of "
                               "%d): refusing STUN sends until the agent slows down",
                               STUN_SEND_RATE, STUN_SEND_BURST)
            self._sends_refused += 1
            raise OverRateLimit("stun_send refused: over the rate limit")
        if self._sends_refused:
            logger.warning("stun_send back under the rate limit (%d sends refused)",
                           self._sends_refused)
            self._sends_refused = 0
        source = self.state.stun.send(spec.data, spec.dest, spec.source)
        self.stun_filter.note_sent(spec.data)
        return {"source": format_endpoint(source)}

    async def _stun_ufrags(self, args: dict[str, Any]) -> dict[str, Any]:
        spec = StunUfragsArgs.parse(args)
        self.stun_filter.set_ufrags(spec.ufrags)
        return {"ufrags": len(spec.ufrags)}

    async def _interfaces(self, args: dict[str, Any]) -> dict[str, Any]:
        no_arguments(args, OP_INTERFACES)
        return {"addresses": [a.to_json() for a in await self._host.interfaces()]}

    async def _default_gateway(self, args: dict[str, Any]) -> dict[str, Any]:
        no_arguments(args, OP_DEFAULT_GATEWAY)
        gateway = await self._host.default_gateway()
        return {"gateway": None if gateway is None else gateway.to_json()}

    async def _host_routes(self, args: dict[str, Any]) -> dict[str, Any]:
        spec = HostRoutesArgs.parse(args)
        found = await self._host.route_destinations(spec.exclude_ifname)
        return {"destinations": [str(n) for n in found]}

    async def _egress(self, args: dict[str, Any]) -> dict[str, Any]:
        spec = EgressArgs.parse(args)
        ours = [ip_network(key) for key in self.state.routes]
        egress = await self._host.egress(spec.destination, spec.ifname, ours)
        return {"route": None if egress is None else
                {"ifname": egress.ifname, "via": egress.gateway}}

    async def _watch_network(self, args: dict[str, Any]) -> dict[str, Any]:
        no_arguments(args, OP_WATCH_NETWORK)
        if self._watching is None or self._watching.done():
            self._watching = asyncio.create_task(
                self._host.watch(self._changes.note, lambda: self.state.ifname),
                name="watch-network")
        return {}

    def _on_network_change(self, change: NetworkChange, count: int) -> None:
        self.emit(network_event(change.change, change.ifname, count))

    async def stop_watching(self) -> None:
        self._changes.close()
        watching, self._watching = self._watching, None
        if watching is not None:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watching

    def _on_stun_packet(self, datagram: UdpDatagram) -> None:
        # Before anything else: the filter's checks are the cheap ones.
        if self.stun_filter.admit(datagram.payload, datagram.src[0]):
            self.emit(stun_event(datagram.src, datagram.dst, datagram.payload))

    def emit(self, event: dict[str, Any], bucket: TokenBucket | None = None) -> None:
        """Send an unsolicited frame to the agent, or drop it (and count) when the agent
        is not keeping up."""
        writer = self._events
        if writer is None or writer.is_closing():
            return
        if (bucket is not None and not bucket.take()) or (
            writer.transport.get_write_buffer_size() > EVENT_BUFFER_LIMIT
        ):
            self.events_dropped += 1
            if self.events_dropped in (1, 100) or self.events_dropped % 10000 == 0:
                logger.warning("dropped %d events: the agent is not keeping up",
                               self.events_dropped)  # fmt: skip
            return
        # One whole frame per write, so events never interleave with a reply.
        writer.write(encode_frame(event))

    async def _shutdown(self, args: dict[str, Any]) -> dict[str, Any]:
        # Its reply, once sent, ends the session (_answer).
        return {}

    async def cleanup(self) -> None:
        """Remove everything this owner created; safe to call repeatedly."""
        state = self.state
        if state.stun is not None:
            stun, state.stun = state.stun, None
            try:
                stun.close()
            except Exception:
                logger.exception("closing the raw STUN socket failed")
        for key, route in list(state.routes.items()):
            try:
                await self._net.remove_route(route)
                logger.info("removed host route %s", key)
            except Exception as exc:
                logger.warning("removing host route %s failed: %s", key, exc)
            state.routes.pop(key, None)
        if state.address is not None and state.ifname is not None:
            try:
                await self._net.remove_address(state.ifname, state.address)
                logger.info("removed address %s from %s", state.address, state.ifname)
            except Exception as exc:
                logger.warning("removing address %s failed: %s", state.address, exc)
            state.address = None
        if state.backend is not None:
            backend, state.backend = state.backend, None
            try:
                await backend.close()
                logger.info("removed device %s", state.ifname)
                if state.ifname is not None:
                    self._net.link_removed(state.ifname)
            except Exception:
                logger.exception("removing device %s failed", state.ifname)
        state.ifname = None
        state.overlay = None
        state.peers.clear()

    async def serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        stop: asyncio.Event,
    ) -> int:
        """Answer frames until the input ends or breaks, the output closes, `shutdown` is
        answered or stop is set; returns the exit code.

        Each request runs as a task of its own and writes its reply when done (the agent
        matches replies by id); at most MAX_IN_FLIGHT at once. At the end of the input the
        requests read before it are still answered; any other way out cancels those in
        flight, and they have finished when this returns.
        """
        loop = asyncio.get_running_loop()
        session = _Session(writer, loop.create_future())
        stopped = asyncio.ensure_future(stop.wait())
        self._events = writer
        try:
            return await self._read_requests(reader, session, stopped)
        finally:
            self._events = None
            stopped.cancel()
            await session.cancel_all()
            await self.stop_watching()

    async def _read_requests(
        self, reader: asyncio.StreamReader, session: _Session, stopped: asyncio.Future[Any]
    ) -> int:
        while True:
            if session.ended.done():
                return session.ended.result()
            if stopped.done():
                logger.info("stopping on signal")
                return EXIT_OK
            if len(session.tasks) >= MAX_IN_FLIGHT:
                # Full: the next frame waits in the pipe until a request is answered.
                await asyncio.wait({stopped, session.ended, *session.tasks},
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                continue
            reading = asyncio.ensure_future(read_frame(reader))
            await asyncio.wait({reading, stopped, session.ended},
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            if not reading.done():
                reading.cancel()
                continue  # the top of the loop says why
            try:
                frame = reading.result()
            except FrameBodyError as exc:
                # The length prefix kept the stream in sync: answer and read on.
                logger.warning("%s", exc)
                session.start(session.send(error_reply(None, str(exc))))
                continue
            except FrameError as exc:
                logger.error("input stream broken (%s): cleaning up and exiting", exc)
                return await self._answer_the_rest(session, stopped, EXIT_STREAM_BROKEN)
            if frame is None:
                logger.info("end of input (the agent is gone): cleaning up and exiting")
                return await self._answer_the_rest(session, stopped, EXIT_OK)
            session.start(self._answer(frame, session))

    async def _answer_the_rest(
        self, session: _Session, stopped: asyncio.Future[Any], code: int
    ) -> int:
        """The input is over: the requests read before its end still get their replies,
        as they did when each was answered before the next read (a stop signal, a closed
        output or a shutdown cuts this short)."""
        while session.tasks and not stopped.done() and not session.ended.done():
            await asyncio.wait({stopped, session.ended, *session.tasks},
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        return session.ended.result() if session.ended.done() else code

    async def _answer(self, frame: dict[str, Any], session: _Session) -> None:
        reply = await self.handle(frame)
        sent = await session.send(reply)
        if sent and reply.get("ok") and frame.get("op") == OP_SHUTDOWN:
            session.end(EXIT_OK, "shutdown requested")


async def _stdio_streams() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    # Frames get a private copy of stdout and fd 1 becomes stderr, so a stray print or a
    # child process can never corrupt the frame stream.
    frame_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(0, "rb", buffering=0)
    )
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(frame_fd, "wb", buffering=0)
    )
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer


async def serve_stdio(server: OwnerServer) -> int:
    """Serve the agent on stdin/stdout until it goes or a signal comes, then clean up;
    returns the exit status."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    code = EXIT_STREAM_BROKEN
    try:
        reader, writer = await _stdio_streams()
        code = await server.serve(reader, writer, stop)
    except Exception:
        logger.exception("device owner failed")
    finally:
        await server.cleanup()
    logger.info("device owner exiting with status %d", code)
    return code
