"""The device owner's request protocol, against the real owner server in a process of its
own with the test-only fakes (tests/fake_owner.py: in-memory backend, no netlink), plus
the backends' pure translation functions. No root needed."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
import socket
import struct
import sys
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest
from nacl.public import PrivateKey
from owner_fakes import FAKE_OWNER, UPLINK, UPLINK_GATEWAY

from kbwg.agent.owner_client import DeviceOwner, OwnerError, OwnerGone
from kbwg.owner.frames import MAX_FRAME, encode_frame, read_frame
from kbwg.owner.protocol import ProtocolError, SetPeerArgs, parse_endpoint
from kbwg.owner.wg_backend import PeerConfig
from kbwg.owner.wg_kernel import info_to_stats, peer_to_pyroute2, remove_peer_to_pyroute2
from kbwg.owner.wg_userspace import parse_uapi_get, uapi_peer_lines


def _b64key() -> str:
    return base64.b64encode(bytes(PrivateKey.generate())).decode()


def _b64pub() -> str:
    return base64.b64encode(bytes(PrivateKey.generate().public_key)).decode()


class RawOwner:
    """The owner process driven byte by byte, to send what a well-behaved client won't."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        assert process.stdin is not None and process.stdout is not None
        self.stdin = process.stdin
        self.stdout = process.stdout

    async def send_raw(self, data: bytes) -> None:
        self.stdin.write(data)
        await self.stdin.drain()

    async def send(self, obj: dict[str, Any]) -> None:
        await self.send_raw(encode_frame(obj))

    async def reply(self) -> dict[str, Any]:
        frame = await asyncio.wait_for(read_frame(self.stdout), 10)
        assert frame is not None, "owner closed its output"
        return frame

    async def call(self, obj: dict[str, Any]) -> dict[str, Any]:
        await self.send(obj)
        return await self.reply()

    async def finish(self) -> tuple[int, str]:
        """Wait for exit; returns (status, stderr)."""
        assert self.process.stderr is not None
        err = await asyncio.wait_for(self.process.stderr.read(), 15)
        code = await asyncio.wait_for(self.process.wait(), 15)
        return code, err.decode()


@pytest.fixture
async def raw_owner() -> AsyncIterator[RawOwner]:
    process = await asyncio.create_subprocess_exec(
        *FAKE_OWNER,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield RawOwner(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _create(owner: RawOwner, rid: int = 100) -> dict[str, Any]:
    reply = await owner.call(
        {
            "id": rid,
            "op": "create",
            "ifname": "kbwg0",
            "private_key": _b64key(),
            "listen_port": 0,
            "address": "100.64.0.1/10",
            "backend": "auto",
        }
    )
    assert reply["ok"], reply
    return reply


async def test_unknown_op_answered_and_owner_keeps_serving(raw_owner: RawOwner) -> None:
    assert await raw_owner.call({"id": 1, "op": "frobnicate"}) == {
        "id": 1,
        "ok": False,
        "error": "unknown op 'frobnicate'",
    }
    hello = await raw_owner.call({"id": 2, "op": "hello"})
    assert hello["ok"] and hello["id"] == 2 and hello["pid"] == raw_owner.process.pid
    await raw_owner.stdin.drain()
    raw_owner.stdin.close()
    code, err = await raw_owner.finish()
    assert code == 0
    assert "end of input" in err


async def test_requests_before_create(raw_owner: RawOwner) -> None:
    for rid, op in enumerate(["set_peer", "remove_peer", "add_route", "remove_route"], 1):
        reply = await raw_owner.call({"id": rid, "op": op})
        assert reply == {"id": rid, "ok": False, "error": "no device yet"}
    stats = await raw_owner.call({"id": 10, "op": "stats"})
    assert stats == {"id": 10, "ok": True, "listen_port": 0, "peers": [], "refusals": {}}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"ifname": None}, "ifname"),
        ({"ifname": "x" * 16}, "ifname"),
        ({"private_key": "not base64!"}, "private_key"),
        ({"private_key": base64.b64encode(b"short").decode()}, "private_key"),
        ({"listen_port": "51820"}, "listen_port"),
        ({"listen_port": 70000}, "listen_port"),
        ({"listen_port": True}, "listen_port"),
        ({"address": "100.64.0.1"}, "address"),
        ({"address": "nonsense/10"}, "address"),
        ({"backend": "magic"}, "backend"),
        ({"mtu": 10}, "mtu"),
    ],
)
async def test_create_bad_args_name_the_field(
    raw_owner: RawOwner, change: dict[str, Any], field: str
) -> None:
    args: dict[str, Any] = {
        "ifname": "kbwg0",
        "private_key": _b64key(),
        "listen_port": 0,
        "address": "100.64.0.1/10",
        "backend": "auto",
    }
    args.update(change)
    args = {k: v for k, v in args.items() if v is not None}
    reply = await raw_owner.call({"id": 5, "op": "create", **args})
    assert reply["id"] == 5 and reply["ok"] is False
    assert f"'{field}'" in reply["error"]
    # Nothing was created: a valid create still works.
    await _create(raw_owner)


async def test_device_ops_and_bad_peer_args(raw_owner: RawOwner) -> None:
    created = await _create(raw_owner)
    assert created["backend"] == "fake" and created["ifname"] == "kbwg0"
    assert created["listen_port"] > 0
    again = await _create_failure(raw_owner)
    assert "already exists" in again

    pub = _b64pub()
    bad: list[tuple[dict[str, Any], str]] = [
        ({"public_key": pub, "endpoint": None, "allowed_ips": "100.64.0.2/32", "keepalive": 0},
         "allowed_ips"),
        ({"public_key": pub, "endpoint": None, "allowed_ips": ["100.64.0.2"], "keepalive": 0},
         "allowed_ips"),
        ({"public_key": pub, "endpoint": "host:1", "allowed_ips": [], "keepalive": 0},
         "endpoint"),
        ({"public_key": pub, "endpoint": 5, "allowed_ips": [], "keepalive": 0}, "endpoint"),
        ({"public_key": pub, "allowed_ips": [], "keepalive": 0}, "endpoint"),
        ({"public_key": pub, "endpoint": None, "allowed_ips": [], "keepalive": -1}, "keepalive"),
        ({"public_key": "AAAA", "endpoint": None, "allowed_ips": [], "keepalive": 0},
         "public_key"),
    ]  # fmt: skip
    for args, field in bad:
        reply = await raw_owner.call({"id": 7, "op": "set_peer", **args})
        assert reply["ok"] is False and f"'{field}'" in reply["error"], (args, reply)

    ok = await raw_owner.call(
        {"id": 8, "op": "set_peer", "public_key": pub, "endpoint": "198.18.0.2:51820",
         "allowed_ips": ["100.64.0.2/32"], "keepalive": 25}
    )  # fmt: skip
    assert ok == {"id": 8, "ok": True}
    stats = await raw_owner.call({"id": 9, "op": "stats"})
    assert stats["listen_port"] == created["listen_port"]
    (peer,) = stats["peers"]
    assert peer["public_key"] == pub and peer["endpoint"] == "198.18.0.2:51820"
    assert peer["last_handshake"] == 0 and peer["rx_bytes"] == 0 and peer["tx_bytes"] == 0

    # A host route to the peer's endpoint, through the uplink the agent names; the
    # gateway is the owner's own finding.
    route = {"destination": "198.18.0.2/32", "ifname": UPLINK}
    added = await raw_owner.call({"id": 12, "op": "add_route", **route})
    assert added == {"id": 12, "ok": True, "via": UPLINK_GATEWAY, "ifname": UPLINK}
    wide = {**route, "destination": "198.18.0.0/24"}
    not_host = await raw_owner.call({"id": 13, "op": "add_route", **wide})
    assert not not_host["ok"] and "'destination'" in not_host["error"]
    unknown = await raw_owner.call({"id": 14, "op": "remove_route", "destination": "192.0.2.1/32"})
    assert not unknown["ok"] and unknown["error"].startswith("refused: no route")
    gone = await raw_owner.call({"id": 15, "op": "remove_route", "destination": "198.18.0.2/32"})
    assert gone["ok"]
    stats = await raw_owner.call({"id": 11, "op": "stats"})
    assert stats["refusals"] == {"route_not_ours": 1}

    removed = await raw_owner.call({"id": 10, "op": "remove_peer", "public_key": pub})
    assert removed["ok"]
    assert (await raw_owner.call({"id": 11, "op": "stats"}))["peers"] == []

    assert await raw_owner.call({"id": 16, "op": "shutdown"}) == {"id": 16, "ok": True}
    code, err = await raw_owner.finish()
    assert code == 0
    assert "shutdown requested" in err and "removed device kbwg0" in err


async def _create_failure(owner: RawOwner) -> str:
    reply = await owner.call(
        {"id": 101, "op": "create", "ifname": "kbwg1", "private_key": _b64key(),
         "listen_port": 0, "address": "100.64.0.9/10", "backend": "auto"}
    )  # fmt: skip
    assert reply["ok"] is False
    return str(reply["error"])


@pytest.mark.parametrize(
    "frame",
    [{"op": "stats"}, {"id": "one", "op": "stats"}, {"id": None}, {"x": 1}],
)
async def test_invalid_request_gets_id_none(raw_owner: RawOwner, frame: dict[str, Any]) -> None:
    reply = await raw_owner.call(frame)
    assert reply["id"] is None and reply["ok"] is False and "invalid request" in reply["error"]
    assert (await raw_owner.call({"id": 3, "op": "hello"}))["ok"]


async def test_invalid_request_with_usable_id_echoes_it(raw_owner: RawOwner) -> None:
    reply = await raw_owner.call({"id": 4, "op": 12})
    assert reply == {"id": 4, "ok": False, "error": "invalid request: request needs a string 'op'"}


@pytest.mark.parametrize("body", [b"\xc1", b"", msgpack.packb([1, 2]), msgpack.packb("stats")])
async def test_undecodable_frame_answered_and_owner_keeps_serving(
    raw_owner: RawOwner, body: bytes
) -> None:
    await raw_owner.send_raw(struct.pack(">I", len(body)) + body)
    reply = await raw_owner.reply()
    assert reply["id"] is None and reply["ok"] is False
    assert (await raw_owner.call({"id": 1, "op": "hello"}))["ok"]


async def test_truncated_frame_makes_owner_clean_up_and_exit(raw_owner: RawOwner) -> None:
    await _create(raw_owner)
    frame = encode_frame({"id": 1, "op": "stats"})
    await raw_owner.send_raw(frame[:-3])
    raw_owner.stdin.close()
    code, err = await raw_owner.finish()
    assert code == 1
    assert "truncated frame" in err
    assert "removed device kbwg0" in err


async def test_oversized_length_makes_owner_exit(raw_owner: RawOwner) -> None:
    await raw_owner.send_raw(struct.pack(">I", MAX_FRAME + 1) + b"\0" * 64)
    code, err = await raw_owner.finish()
    assert code == 1
    assert "exceeds" in err


async def test_eof_exits_zero_after_cleanup(raw_owner: RawOwner) -> None:
    await _create(raw_owner)
    raw_owner.stdin.close()
    code, err = await raw_owner.finish()
    assert code == 0
    assert "end of input" in err and "removed device kbwg0" in err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_exits_zero_after_cleanup(raw_owner: RawOwner, signum: int) -> None:
    await _create(raw_owner)
    raw_owner.process.send_signal(signum)
    code, err = await raw_owner.finish()
    assert code == 0
    assert "stopping on signal" in err and "removed device kbwg0" in err


async def test_stdout_carries_only_frames(raw_owner: RawOwner) -> None:
    await _create(raw_owner)
    raw_owner.stdin.close()
    rest = await asyncio.wait_for(raw_owner.stdout.read(), 10)
    assert rest == b""
    await raw_owner.finish()


async def test_broken_output_pipe_makes_owner_clean_up_and_exit() -> None:
    read_end, write_end = os.pipe()
    process = await asyncio.create_subprocess_exec(
        *FAKE_OWNER,
        stdin=asyncio.subprocess.PIPE,
        stdout=write_end,
        stderr=asyncio.subprocess.PIPE,
    )
    os.close(write_end)
    os.close(read_end)
    try:
        assert process.stdin is not None and process.stderr is not None
        process.stdin.write(encode_frame({"id": 1, "op": "hello"}))
        await process.stdin.drain()
        err = (await asyncio.wait_for(process.stderr.read(), 15)).decode()
        code = await asyncio.wait_for(process.wait(), 15)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert code == 0
    assert "output closed" in err


# The client, against the same fake-backed owner.


async def test_client_round_trip_and_errors() -> None:
    async with await DeviceOwner.start(FAKE_OWNER) as owner:
        with pytest.raises(OwnerError, match="no device yet"):
            await owner.request("set_peer", public_key=_b64pub())
        with pytest.raises(OwnerError, match="unknown op 'nope'"):
            await owner.request("nope")
        key = PrivateKey.generate()
        created = await owner.request(
            "create", ifname="kbwg0", private_key=base64.b64encode(bytes(key)).decode(),
            listen_port=4000, address="100.64.0.1/10", backend="auto",
        )  # fmt: skip
        assert created == {
            "backend": "fake",
            "listen_port": 4000,
            "public_key": base64.b64encode(bytes(key.public_key)).decode(),
            "ifname": "kbwg0",
        }
        # Concurrent requests each get their own reply.
        results = await asyncio.gather(*(owner.request("stats") for _ in range(20)))
        assert all(r["listen_port"] == 4000 for r in results)
    assert owner.returncode == 0


async def test_client_reports_owner_gone() -> None:
    owner = await DeviceOwner.start(FAKE_OWNER)
    try:
        os.kill(owner.pid, signal.SIGKILL)
        with pytest.raises(OwnerGone) as info:
            await asyncio.wait_for(owner.request("stats"), 10)
        assert info.value.returncode == -signal.SIGKILL
        with pytest.raises(OwnerGone):
            await owner.request("stats")
    finally:
        await owner.close()


async def test_client_delivers_events() -> None:
    # A stand-in owner: answers hello, emits one event, then answers shutdown.
    script = (
        "import sys, asyncio\n"
        "from kbwg.owner.frames import encode_frame, FrameDecoder\n"
        "out = sys.stdout.buffer\n"
        "dec = FrameDecoder()\n"
        "while True:\n"
        "    data = sys.stdin.buffer.read1(65536)\n"
        "    if not data: break\n"
        "    for f in dec.feed(data):\n"
        "        out.write(encode_frame({'id': f['id'], 'ok': True, 'pid': 1}))\n"
        "        if f['op'] == 'hello':\n"
        "            out.write(encode_frame({'event': 'link_down', 'ifname': 'x'}))\n"
        "        out.flush()\n"
        "        if f['op'] == 'shutdown': sys.exit(0)\n"
    )
    seen: list[dict[str, Any]] = []
    owner = await DeviceOwner.start([sys.executable, "-c", script], on_event=seen.append)
    event = await asyncio.wait_for(owner.events.get(), 10)
    assert event == {"event": "link_down", "ifname": "x"}
    assert seen == [event]
    assert await owner.close() == 0


async def test_a_late_reply_to_a_cancelled_request_is_no_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    """A request whose caller gave up (start-up stopped) may still be answered: routine.
    A reply to an id the agent never used is worth a warning."""
    # A stand-in owner: holds the reply to `slow` until `release`; after hello it also
    # answers a request nobody sent.
    script = (
        "import sys\n"
        "from kbwg.owner.frames import encode_frame, FrameDecoder\n"
        "out = sys.stdout.buffer\n"
        "dec = FrameDecoder()\n"
        "held = None\n"
        "while True:\n"
        "    data = sys.stdin.buffer.read1(65536)\n"
        "    if not data: break\n"
        "    for f in dec.feed(data):\n"
        "        if f['op'] == 'slow':\n"
        "            held = f\n"
        "            continue\n"
        "        out.write(encode_frame({'id': f['id'], 'ok': True, 'pid': 1}))\n"
        "        if f['op'] == 'hello':\n"
        "            out.write(encode_frame({'id': 999, 'ok': True}))\n"
        "        if f['op'] == 'release':\n"
        "            out.write(encode_frame({'id': held['id'], 'ok': True}))\n"
        "        out.flush()\n"
        "        if f['op'] == 'shutdown': sys.exit(0)\n"
    )
    with caplog.at_level(logging.DEBUG, logger="kbwg.agent.owner_client"):
        owner = await DeviceOwner.start([sys.executable, "-c", script])
        slow = asyncio.create_task(owner.request("slow"))
        await owner.request("ping")  # answered in order: `slow` has reached the owner
        slow.cancel()
        await owner.request("release")
        await owner.request("ping")  # after the held reply, which is handled by now
        assert await owner.close() == 0
    late = [r for r in caplog.records if "no longer awaited" in r.getMessage()]
    stray = [r for r in caplog.records if "no pending request" in r.getMessage()]
    assert [r.levelno for r in late] == [logging.DEBUG]
    assert [r.levelno for r in stray] == [logging.WARNING]
    assert "999" in stray[0].getMessage()


# Pure translation functions of the backends.

PUB = bytes(range(32, 64))


def test_parse_endpoint() -> None:
    assert parse_endpoint("198.18.0.2:51820") == ("198.18.0.2", 51820)
    assert parse_endpoint("[2001:db8::1]:443") == ("2001:db8::1", 443)
    for bad in ["198.18.0.2", "198.18.0.2:0", "x:1", "1.2.3.4:99999", "1.2.3.4:-1"]:
        with pytest.raises(ProtocolError, match="'endpoint'"):
            parse_endpoint(bad)


def test_set_peer_args_normalise_cidrs() -> None:
    args = SetPeerArgs.parse(
        {"public_key": base64.b64encode(PUB).decode(), "endpoint": None,
         "allowed_ips": ["100.64.0.2/32", "10.1.2.3/8"], "keepalive": 0}
    )  # fmt: skip
    assert args.allowed_ips == ["100.64.0.2/32", "10.0.0.0/8"]


def test_kernel_peer_translation() -> None:
    peer = PeerConfig(PUB, ("198.18.0.2", 4242), ["100.64.0.2/32"], 25)
    assert peer_to_pyroute2(peer) == {
        "public_key": base64.b64encode(PUB).decode(),
        "endpoint_addr": "198.18.0.2",
        "endpoint_port": 4242,
        "persistent_keepalive": 25,
        "replace_allowed_ips": True,
        "allowed_ips": ["100.64.0.2/32"],
    }
    no_endpoint = peer_to_pyroute2(PeerConfig(PUB, None, [], 0))
    assert "endpoint_addr" not in no_endpoint and no_endpoint["allowed_ips"] == []
    assert remove_peer_to_pyroute2(PUB) == {
        "public_key": base64.b64encode(PUB).decode(),
        "remove": True,
    }


def _wg_info_message(peers: list[list[Any]], port: int = 51820) -> Any:
    """A WG_CMD_GET_DEVICE reply as the kernel would send it, decoded by pyroute2."""
    from pyroute2.netlink.generic.wireguard import wgmsg

    msg = wgmsg()
    msg["cmd"] = 0
    msg["version"] = 1
    msg["attrs"] = [
        ["WGDEVICE_A_IFNAME", "wg0"],
        ["WGDEVICE_A_LISTEN_PORT", port],
        ["WGDEVICE_A_PEERS", [{"attrs": attrs} for attrs in peers]],
    ]
    msg.encode()
    decoded = wgmsg(msg.data)
    decoded.decode()
    return decoded


def test_kernel_info_translation() -> None:
    other = bytes(range(64, 96))
    message = _wg_info_message(
        [
            [
                ["WGPEER_A_PUBLIC_KEY", {"value": base64.b64encode(PUB)}],
                ["WGPEER_A_ENDPOINT", {"addr": "198.18.0.2", "port": 4242}],
                ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", 25],
                ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 1700000000, "tv_nsec": 500000000}],
                ["WGPEER_A_RX_BYTES", 100],
                ["WGPEER_A_TX_BYTES", 200],
                [
                    "WGPEER_A_ALLOWEDIPS",
                    [
                        {
                            "attrs": [
                                ["WGALLOWEDIP_A_FAMILY", socket.AF_INET],
                                ["WGALLOWEDIP_A_IPADDR", socket.inet_aton("100.64.0.2")],
                                ["WGALLOWEDIP_A_CIDR_MASK", 32],
                            ]
                        }
                    ],
                ],
            ],
            [["WGPEER_A_PUBLIC_KEY", {"value": base64.b64encode(other)}]],
        ]
    )
    port, peers = info_to_stats([message])
    assert port == 51820
    first, second = peers
    assert first.public_key == PUB
    assert first.endpoint == "198.18.0.2:4242"
    assert first.last_handshake == pytest.approx(1700000000.5)
    assert (first.rx_bytes, first.tx_bytes) == (100, 200)
    assert first.allowed_ips == ["100.64.0.2/32"] and first.keepalive == 25
    assert second.public_key == other and second.endpoint is None
    assert second.last_handshake == 0.0 and second.rx_bytes == 0


def test_uapi_translation() -> None:
    peer = PeerConfig(PUB, ("2001:db8::2", 51820), ["100.64.0.2/32", "fd00::/64"], 0)
    assert uapi_peer_lines(peer) == [
        f"public_key={PUB.hex()}",
        "endpoint=[2001:db8::2]:51820",
        "persistent_keepalive_interval=0",
        "replace_allowed_ips=true",
        "allowed_ip=100.64.0.2/32",
        "allowed_ip=fd00::/64",
    ]
    pairs = [
        ("private_key", "00" * 32),
        ("listen_port", "40000"),
        ("public_key", PUB.hex()),
        ("endpoint", "198.18.0.2:4242"),
        ("last_handshake_time_sec", "1700000000"),
        ("last_handshake_time_nsec", "250000000"),
        ("tx_bytes", "92"),
        ("rx_bytes", "148"),
        ("persistent_keepalive_interval", "25"),
        ("allowed_ip", "100.64.0.2/32"),
        ("protocol_version", "1"),
        ("public_key", "11" * 32),
        ("last_handshake_time_sec", "0"),
        ("last_handshake_time_nsec", "0"),
    ]
    port, peers = parse_uapi_get(pairs)
    assert port == 40000
    assert peers[0].public_key == PUB and peers[0].endpoint == "198.18.0.2:4242"
    assert peers[0].last_handshake == pytest.approx(1700000000.25)
    assert (peers[0].rx_bytes, peers[0].tx_bytes) == (148, 92)
    assert peers[0].allowed_ips == ["100.64.0.2/32"] and peers[0].keepalive == 25
    assert peers[1].endpoint is None and peers[1].last_handshake == 0.0
