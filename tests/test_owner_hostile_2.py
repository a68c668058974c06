"""A hostile agent against the device owner, second round: inputs the owner checked on
one value and used as another (a scoped IPv6 endpoint that became extra wireguard-go
UAPI lines, IPv4-mapped endpoints judged as IPv6), signals sudo relays that ended the
owner without cleaning up, and a cancelled host route the reaper forgot. In-process with
the test fakes, or the fake owner process (tests/fake_owner.py); no root needed."""

from __future__ import annotations

import asyncio
import base64
import json
import resource
import signal
from typing import Any

import pytest
from nacl.public import PrivateKey
from owner_fakes import FAKE_OWNER, FakeNetConfig, MemoryBackend

from kbwg.owner import main as owner_main
from kbwg.owner import route_reaper
from kbwg.owner import server as server_module
from kbwg.owner.frames import encode_frame, read_frame
from kbwg.owner.netconfig import HostRoute, NetlinkNetConfig
from kbwg.owner.policy import OwnerPolicy
from kbwg.owner.protocol import ProtocolError, SetPeerArgs, parse_endpoint
from kbwg.owner.server import OwnerServer
from kbwg.owner.wg_backend import BackendError, PeerConfig
from kbwg.owner.wg_userspace import UserspaceBackend


def _key() -> str:
    return base64.b64encode(bytes(PrivateKey.generate())).decode()


def _pub_bytes() -> bytes:
    return bytes(PrivateKey.generate().public_key)


def _no_raw_stun(port: int, callback: Any) -> Any:
    raise AssertionError("no raw STUN socket in these tests")


async def _owner_with_device() -> tuple[OwnerServer, MemoryBackend]:
    backend = MemoryBackend()
    server = OwnerServer(FakeNetConfig(), lambda _name: backend, OwnerPolicy(), _no_raw_stun)
    reply = await server.handle({"id": 1, "op": "create", "ifname": "kbwg0",
                                 "private_key": _key(), "listen_port": 0,
                                 "address": "100.64.0.1/10", "backend": "auto"})
    assert reply["ok"], reply
    return server, backend


def _injected_endpoint(victim: bytes) -> str:
    """A scoped IPv6 endpoint whose scope (any text but '%') carries UAPI lines: a second
    peer with an endpoint inside the overlay and a keepalive above the owner's limit.
    Against wireguard-go 0.0.20220316 it created exactly that peer."""
    return ("[2001:db8::1%lo]:1\npublic_key=" + victim.hex()
            + "\nendpoint=100.64.0.9:51820\npersistent_keepalive_interval=65535"
            + "\npublic_key=" + _pub_bytes().hex() + "\nendpoint=[2001:db8::2]:51820")


# -- scoped IPv6 endpoints --------------------------------------------------------------


@pytest.mark.parametrize("text", ["[2001:db8::1%lo]:51820", "[2001:db8::1%eth0]:51820",
                                  "[fe80::1%1]:51820", _injected_endpoint(b"\1" * 32)])
def test_a_scoped_endpoint_is_a_protocol_error(text: str) -> None:
    with pytest.raises(ProtocolError, match="scoped"):
        parse_endpoint(text)


async def test_set_peer_with_a_scoped_endpoint_reaches_no_backend() -> None:
    server, backend = await _owner_with_device()
    pub = _pub_bytes()
    reply = await server.handle({
        "id": 2, "op": "set_peer", "public_key": base64.b64encode(pub).decode(),
        "endpoint": _injected_endpoint(_pub_bytes()), "allowed_ips": ["100.64.0.2/32"],
        "keepalive": 25})  # fmt: skip
    assert reply["ok"] is False and "scoped" in reply["error"], reply
    assert await backend.peers() == []


async def test_the_userspace_backend_never_sends_a_value_holding_a_newline(
        monkeypatch: pytest.MonkeyPatch) -> None:
    backend = UserspaceBackend("/usr/bin/wireguard-go")
    sent: list[str] = []

    async def record(request: str) -> list[tuple[str, str]]:
        sent.append(request)
        return []

    monkeypatch.setattr(backend, "_uapi", record)
    peer = PeerConfig(_pub_bytes(), ("2001:db8::1%lo]:1\npublic_key=" + "00" * 32, 1))
    with pytest.raises(BackendError, match="newline"):
        await backend.set_peer(peer)
    assert sent == []
    # A well-formed peer still goes out, one key=value per line.
    await backend.set_peer(PeerConfig(_pub_bytes(), ("2001:db8::1", 51820), ["100.64.0.2/32"]))
    assert len(sent) == 1 and "endpoint=[2001:db8::1]:51820\n" in sent[0]


# -- IPv4-mapped endpoints ----------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["[::ffff:224.0.0.1]:51820", "[::ffff:0.0.0.0]:51820",
                                      "[::ffff:239.255.255.250]:1900",
                                      "[::ffff:100.64.0.9]:51820"])
async def test_an_ipv4_mapped_endpoint_is_judged_as_its_ipv4_address(endpoint: str) -> None:
    server, backend = await _owner_with_device()
    reply = await server.handle({
        "id": 2, "op": "set_peer", "public_key": base64.b64encode(_pub_bytes()).decode(),
        "endpoint": endpoint, "allowed_ips": ["100.64.0.2/32"], "keepalive": 25})  # fmt: skip
    assert reply["ok"] is False and reply["error"].startswith("refused: "), reply
    assert dict(server.refusals) == {"endpoint": 1}
    assert await backend.peers() == []


async def test_an_ipv4_mapped_public_endpoint_is_still_accepted() -> None:
    server, backend = await _owner_with_device()
    reply = await server.handle({
        "id": 2, "op": "set_peer", "public_key": base64.b64encode(_pub_bytes()).decode(),
        "endpoint": "[::ffff:198.51.100.7]:51820", "allowed_ips": [], "keepalive": 0})
    assert reply["ok"], reply
    assert [p.endpoint for p in await backend.peers()] == ["[::ffff:c633:6407]:51820"]


# -- signals sudo relays ------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM,
                                    signal.SIGQUIT])
async def test_a_relayed_signal_cleans_up_before_the_owner_exits(signum: int) -> None:
    # sudo relays these from the agent's user to the owner; by default each one ended
    # the owner on the spot (a kernel device and its address stayed behind).
    process = await asyncio.create_subprocess_exec(
        *FAKE_OWNER, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        assert process.stdin is not None and process.stdout is not None
        assert process.stderr is not None
        process.stdin.write(encode_frame({
            "id": 1, "op": "create", "ifname": "kbwg0", "private_key": _key(),
            "listen_port": 0, "address": "100.64.0.1/10", "backend": "auto"}))
        reply = await asyncio.wait_for(read_frame(process.stdout), 10)
        assert reply is not None and reply["ok"], reply
        process.send_signal(signum)
        err = (await asyncio.wait_for(process.stderr.read(), 15)).decode()
        code = await asyncio.wait_for(process.wait(), 15)
        assert code == 0, err
        assert "stopping on signal" in err and "removed device kbwg0" in err
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# -- the route reaper ---------------------------------------------------------------------


async def test_a_cancelled_route_add_stays_listed_for_the_reaper(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The owner stopping (a signal, a closed output) cancels an add_route in flight,
    # possibly after the kernel added the route. The owner does not track it, so only
    # the reaper can remove it: it must not be told the route is gone.
    told: list[dict[str, Any]] = []
    started = asyncio.Event()

    async def kernel_add(self: NetlinkNetConfig, route: HostRoute, replace: bool) -> None:
        started.set()
        await asyncio.Event().wait()  # the kernel's acknowledgement never comes in time

    monkeypatch.setattr(NetlinkNetConfig, "add_route", kernel_add)
    net = route_reaper.ReapedNetConfig()
    monkeypatch.setattr(net, "_tell", told.append)
    route = HostRoute("198.51.100.7/32", "198.18.0.1", "eth9")
    task = asyncio.ensure_future(net.add_route(route, replace=False))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [m["op"] for m in told] == ["add"]
    assert route_reaper.outstanding([json.dumps(m).encode() for m in told]) == ([route], [])


async def test_a_refused_route_add_is_still_taken_off_the_reaper_list(
        monkeypatch: pytest.MonkeyPatch) -> None:
    told: list[dict[str, Any]] = []

    async def kernel_refuses(self: NetlinkNetConfig, route: HostRoute, replace: bool) -> None:
        raise BackendError("File exists")

    monkeypatch.setattr(NetlinkNetConfig, "add_route", kernel_refuses)
    net = route_reaper.ReapedNetConfig()
    monkeypatch.setattr(net, "_tell", told.append)
    route = HostRoute("198.51.100.7/32", None, "eth9")
    with pytest.raises(BackendError):
        await net.add_route(route, replace=False)
    assert [m["op"] for m in told] == ["add", "del"]


# -- how much the agent can make root hold --------------------------------------------------


async def _set_peer(server: OwnerServer, rid: int, pub: bytes,
                    allowed: list[str] | None = None) -> dict[str, Any]:
    return await server.handle({
        "id": rid, "op": "set_peer", "public_key": base64.b64encode(pub).decode(),
        "endpoint": "198.51.100.7:51820", "allowed_ips": allowed or [], "keepalive": 0})


async def test_the_number_of_peers_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each peer costs wireguard-go (or the kernel) tens of KiB outside the agent user's
    # limits, and every later stats read grows with them: an agent adding keys without
    # end grew root's memory without bound.
    monkeypatch.setattr(server_module, "MAX_PEERS", 3)
    server, backend = await _owner_with_device()
    keys = [_pub_bytes() for _ in range(3)]
    for rid, key in enumerate(keys, start=10):
        assert (await _set_peer(server, rid, key))["ok"]
    refused = await _set_peer(server, 20, _pub_bytes())
    assert refused["ok"] is False and refused["error"].startswith("refused: "), refused
    assert dict(server.refusals) == {"peers": 1}
    assert len(await backend.peers()) == 3
    # A peer already there can still be changed, and a removal makes room.
    assert (await _set_peer(server, 21, keys[0], ["100.64.0.2/32"]))["ok"]
    reply = await server.handle({"id": 22, "op": "remove_peer",
                                 "public_key": base64.b64encode(keys[1]).decode()})
    assert reply["ok"], reply
    assert (await _set_peer(server, 23, _pub_bytes()))["ok"]


async def test_a_peer_whose_backend_call_failed_still_counts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # wireguard-go makes the peer at its public_key line, before a later line can fail.
    monkeypatch.setattr(server_module, "MAX_PEERS", 1)
    server, backend = await _owner_with_device()

    async def half_done(peer: PeerConfig) -> None:
        raise BackendError("wireguard-go refused the request: errno=-22")

    monkeypatch.setattr(backend, "set_peer", half_done)
    assert (await _set_peer(server, 10, _pub_bytes()))["ok"] is False
    assert (await _set_peer(server, 11, _pub_bytes()))["error"].startswith("refused: ")


def test_a_set_peer_carries_a_bounded_list_of_allowed_ips() -> None:
    args = {"public_key": base64.b64encode(_pub_bytes()).decode(), "endpoint": None,
            "keepalive": 0,
            "allowed_ips": [f"100.64.{i // 256}.{i % 256}/32" for i in range(1, 1000)]}
    with pytest.raises(ProtocolError, match="allowed_ips"):
        SetPeerArgs.parse(args)


# -- resource limits sudo passes on -------------------------------------------------------


def test_harden_lifts_the_limits_that_would_end_the_owner_without_cleanup(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # sudo keeps the invoking user's resource limits for the command. A CPU-time limit
    # ends the owner with SIGKILL (no cleanup: a kernel device stays), a tiny descriptor
    # limit makes its netlink sockets (cleanup's too) fail, and a core file of the owner
    # would hold the device's private key. (Recorded, not applied: raising a hard limit
    # needs CAP_SYS_RESOURCE, which a container's root may lack.)
    user_limits = {resource.RLIMIT_CPU: (30, 30), resource.RLIMIT_NOFILE: (16, 16),
                   resource.RLIMIT_CORE: (resource.RLIM_INFINITY,) * 2}
    applied: dict[int, tuple[int, int]] = {}
    monkeypatch.setattr(owner_main.resource, "getrlimit", lambda which: user_limits[which])
    monkeypatch.setattr(owner_main.resource, "setrlimit",
                        lambda which, value: applied.__setitem__(which, value))
    owner_main.lift_limits()
    assert applied == {resource.RLIMIT_CPU: (resource.RLIM_INFINITY,) * 2,
                       resource.RLIMIT_NOFILE: (4096, 4096), resource.RLIMIT_CORE: (0, 0)}


def test_a_cpu_limit_root_cannot_lift_still_ends_the_owner_with_cleanup() -> None:
    # Without CAP_SYS_RESOURCE the limit stays; its soft part's SIGXCPU comes first.
    assert signal.SIGXCPU in server_module.STOP_SIGNALS
