"""The real device owner with wireguard-go, inside throwaway network namespaces (root)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nacl.public import PrivateKey

from kbwg.agent.owner_client import DeviceOwner, OwnerError
from kbwg.owner.frames import encode_frame, read_frame
from kbwg_testing import wait_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

RUN_TAG = f"{os.getpid() % 100000}{secrets.token_hex(2)}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _kill_namespace_processes(ns: str) -> None:
    pids = _ip("netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


@pytest.fixture
def netns() -> Iterator[Callable[[], str]]:
    """Factory of fresh namespaces (with lo up), all deleted at the end whatever happens."""
    created: list[str] = []

    def make() -> str:
        # Not under "kbwg-", which other suites' leftover sweeps may claim.
        name = f"kbo{RUN_TAG}-{len(created)}"
        _ip("netns", "add", name)
        created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    try:
        yield make
    finally:
        for name in created:
            _kill_namespace_processes(name)
            _ip("netns", "del", name, check=False)


def _ifname() -> str:
    # The owner creates kbwg<N> only; random digits keep concurrent runs apart.
    return f"kbwg{10000 + secrets.randbelow(90000)}"


def _wg_pids(ifname: str) -> list[int]:
    """wireguard-go processes serving this interface name, in any namespace."""
    wanted = b"\0".join([b"wireguard-go", b"-f", ifname.encode()])
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.rstrip(b"\0").endswith(wanted) and b"wireguard-go" in cmdline.split(b"\0")[0]:
            pids.append(int(entry.name))
    return pids


def _link(ns: str, ifname: str) -> dict[str, Any] | None:
    result = _ip("-n", ns, "-j", "addr", "show", "dev", ifname, check=False)
    if result.returncode != 0:
        return None
    links = json.loads(result.stdout)
    return links[0] if links else None


def _owner_command(ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-I", "-m", "kbwg.owner",
            "--log-level", "DEBUG"]  # fmt: skip


def _keypair() -> tuple[str, str]:
    key = PrivateKey.generate()
    return (
        base64.b64encode(bytes(key)).decode(),
        base64.b64encode(bytes(key.public_key)).decode(),
    )


def _create_args(ifname: str, address: str, listen_port: int = 0) -> tuple[dict[str, Any], str]:
    private, public = _keypair()
    args = {"ifname": ifname, "private_key": private, "listen_port": listen_port,
            "address": address, "backend": "auto"}  # fmt: skip
    return args, public


async def test_create_configure_and_close(netns: Callable[[], str]) -> None:
    ns = netns()
    ifname = _ifname()
    args, public = _create_args(ifname, "100.64.0.1/10")
    owner = await DeviceOwner.start(_owner_command(ns))
    try:
        created = await owner.request("create", **args)
        assert created["backend"] == "userspace" and created["ifname"] == ifname
        assert created["public_key"] == public
        assert 0 < created["listen_port"] < 65536

        link = _link(ns, ifname)
        assert link is not None
        assert link["mtu"] == 1420
        assert "UP" in link["flags"]
        addrs = [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"]
        assert addrs == [("100.64.0.1", 10)]
        routes = _ip("-n", ns, "route", "show", "dev", ifname).stdout
        assert "100.64.0.0/10" in routes
        (wg_pid,) = _wg_pids(ifname)
        # The UAPI socket lives in wireguard-go's private tmpfs, not the shared /run.
        assert not os.path.exists(f"/run/wireguard/{ifname}.sock")
        assert os.path.exists(f"/proc/{wg_pid}/root/run/wireguard/{ifname}.sock")

        _, peer = _keypair()
        await owner.request(
            "set_peer", public_key=peer, endpoint="198.18.0.2:51820",
            allowed_ips=["100.64.0.2/32"], keepalive=0,
        )  # fmt: skip
        stats = await owner.request("stats")
        assert stats["listen_port"] == created["listen_port"]
        (entry,) = stats["peers"]
        assert entry["public_key"] == peer and entry["endpoint"] == "198.18.0.2:51820"
        assert entry["allowed_ips"] == ["100.64.0.2/32"] and entry["last_handshake"] == 0
        # Updating replaces the allowed IPs.
        await owner.request(
            "set_peer", public_key=peer, endpoint=None, allowed_ips=["100.64.0.3/32"],
            keepalive=25,
        )  # fmt: skip
        (entry,) = (await owner.request("stats"))["peers"]
        assert entry["allowed_ips"] == ["100.64.0.3/32"] and entry["keepalive"] == 25
        await owner.request("remove_peer", public_key=peer)
        assert (await owner.request("stats"))["peers"] == []

        # This kernel has no dummy links; a veth pair inside the namespace will do. Its
        # default route is the uplink whose gateway the owner must find by itself.
        _ip("-n", ns, "link", "add", "kbwgv0", "type", "veth", "peer", "name", "kbwgv1")
        _ip("-n", ns, "link", "set", "kbwgv0", "up")
        _ip("-n", ns, "addr", "add", "198.18.5.1/24", "dev", "kbwgv0")
        _ip("-n", ns, "route", "add", "default", "via", "198.18.5.254", "dev", "kbwgv0")
        await owner.request(
            "set_peer", public_key=peer, endpoint="203.0.113.9:51820",
            allowed_ips=["100.64.0.2/32"], keepalive=25,
        )  # fmt: skip
        added = await owner.request("add_route", destination="203.0.113.9/32", ifname="kbwgv0")
        assert added == {"via": "198.18.5.254", "ifname": "kbwgv0"}
        routes = _ip("-n", ns, "route", "show", "203.0.113.9").stdout
        assert "via 198.18.5.254 dev kbwgv0" in routes
    finally:
        code = await owner.close()
    assert code == 0
    assert _link(ns, ifname) is None
    assert _ip("-n", ns, "route", "show", "203.0.113.9").stdout.strip() == ""
    await wait_for(lambda: not _wg_pids(ifname), "wireguard-go to exit")


async def test_refusals_judged_against_the_real_host(netns: Callable[[], str]) -> None:
    ns = netns()
    ifname = _ifname()
    _ip("-n", ns, "link", "add", "kbwgv0", "type", "veth", "peer", "name", "kbwgv1")
    _ip("-n", ns, "link", "set", "kbwgv0", "up")
    _ip("-n", ns, "addr", "add", "198.18.5.1/24", "dev", "kbwgv0")
    # The host already routes part of the shared address space elsewhere.
    _ip("-n", ns, "route", "add", "100.64.7.0/24", "via", "198.18.5.254", "dev", "kbwgv0")
    # ...and another VPN's address: only its local-table route shows it.
    _ip("-n", ns, "addr", "add", "100.66.1.1/32", "dev", "kbwgv0")
    async with await DeviceOwner.start(_owner_command(ns)) as owner:
        with pytest.raises(OwnerError, match=r"^refused: .*overlaps the host's existing "
                                             r"route to 100\.64\.7\.0/24"):
            await owner.request("create", **_create_args(ifname, "100.64.0.1/10")[0])
        assert _link(ns, ifname) is None
        with pytest.raises(OwnerError, match=r"^refused: .*route to 100\.66\.1\.1/32"):
            await owner.request("create", **_create_args(ifname, "100.66.0.1/16")[0])
        with pytest.raises(OwnerError, match=r"^refused: .*kbwg<N>"):
            await owner.request("create", **_create_args("kbt0", "100.65.0.1/16")[0])
        await owner.request("create", **_create_args(ifname, "100.65.0.1/16")[0])
        _, peer = _keypair()
        await owner.request("set_peer", public_key=peer, endpoint="198.18.5.7:51820",
                            allowed_ips=["100.65.0.2/32"], keepalive=25)
        refused = {
            "route_via": {"destination": "198.18.5.7/32", "via": "198.18.5.254",
                          "ifname": "kbwgv0"},
            "route_interface": {"destination": "198.18.5.7/32", "ifname": "lo"},
            "route_not_peer": {"destination": "198.18.5.8/32", "ifname": "kbwgv0"},
        }  # fmt: skip
        for args in refused.values():
            with pytest.raises(OwnerError, match=r"^refused: "):
                await owner.request("add_route", **args)
        with pytest.raises(OwnerError, match=r"^refused: .*WireGuard interface"):
            await owner.request("add_route", destination="198.18.5.7/32", ifname=ifname)
        # On-link: no gateway.
        added = await owner.request("add_route", destination="198.18.5.7/32", ifname="kbwgv0")
        assert added == {"via": None, "ifname": "kbwgv0"}
        assert "198.18.5.7 dev kbwgv0" in _ip("-n", ns, "route", "show", "198.18.5.7").stdout
        stats = await owner.request("stats")
        assert stats["refusals"] == {"overlay": 2, "interface_name": 1, "route_via": 1,
                                     "route_interface": 2, "route_not_peer": 1}  # fmt: skip
    assert owner.returncode == 0
    assert _link(ns, ifname) is None
    assert _ip("-n", ns, "route", "show", "198.18.5.7").stdout.strip() == ""


async def test_fixed_listen_port(netns: Callable[[], str]) -> None:
    ns = netns()
    ifname = _ifname()
    args, _ = _create_args(ifname, "100.64.0.1/10", listen_port=45123)
    async with await DeviceOwner.start(_owner_command(ns)) as owner:
        created = await owner.request("create", **args)
        assert created["listen_port"] == 45123
        sockets = _ip("netns", "exec", ns, "ss", "-Hnul").stdout
        assert ":45123" in sockets
    assert _link(ns, ifname) is None


async def test_same_ifname_in_two_namespaces(netns: Callable[[], str]) -> None:
    ns_a, ns_b = netns(), netns()
    ifname = _ifname()
    owners = await asyncio.gather(
        DeviceOwner.start(_owner_command(ns_a)), DeviceOwner.start(_owner_command(ns_b))
    )
    try:
        created = await asyncio.gather(
            *(o.request("create", **_create_args(ifname, f"100.64.0.{i}/10")[0])
              for i, o in enumerate(owners, 1))
        )  # fmt: skip
        assert all(c["ifname"] == ifname for c in created)
        assert len(_wg_pids(ifname)) == 2
        # Each owner talks to its own wireguard-go: a peer set on one is absent on the other.
        peers = [_keypair()[1], _keypair()[1]]
        for owner, peer in zip(owners, peers, strict=True):
            await owner.request(
                "set_peer", public_key=peer, endpoint=None, allowed_ips=[], keepalive=0
            )
        for owner, peer, c in zip(owners, peers, created, strict=True):
            stats = await owner.request("stats")
            assert [p["public_key"] for p in stats["peers"]] == [peer]
            assert stats["listen_port"] == c["listen_port"]
        assert _link(ns_a, ifname) is not None and _link(ns_b, ifname) is not None
    finally:
        codes = await asyncio.gather(*(o.close() for o in owners))
    assert codes == [0, 0]
    assert _link(ns_a, ifname) is None and _link(ns_b, ifname) is None
    await wait_for(lambda: not _wg_pids(ifname), "both wireguard-go to exit")


class RawOwner:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(encode_frame({"id": 1, "op": op, **args}))
        await self.process.stdin.drain()
        reply = await asyncio.wait_for(read_frame(self.process.stdout), 15)
        assert reply is not None and reply["ok"], reply
        return reply


@pytest.mark.parametrize("how", ["shutdown", "SIGTERM", "SIGINT", "eof", "SIGKILL"])
async def test_every_exit_path_removes_the_device(netns: Callable[[], str], how: str) -> None:
    ns = netns()
    ifname = _ifname()
    process = await asyncio.create_subprocess_exec(
        *_owner_command(ns),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    owner = RawOwner(process)
    try:
        await owner.call("create", **_create_args(ifname, "100.64.0.1/10")[0])
        assert _link(ns, ifname) is not None
        (wg_pid,) = _wg_pids(ifname)
        assert process.stdin is not None
        if how == "shutdown":
            await owner.call("shutdown")
        elif how == "eof":
            process.stdin.close()
        else:
            # `ip netns exec` execs the owner, so this pid is the owner itself.
            process.send_signal(getattr(signal, how))
        assert process.stderr is not None
        log = (await asyncio.wait_for(process.stderr.read(), 20)).decode()
        code = await asyncio.wait_for(process.wait(), 20)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if how == "SIGKILL":
        # No cleanup code ran: the parent-death signal still takes wireguard-go, and
        # its TUN link goes with it.
        assert code == -signal.SIGKILL
    else:
        assert code == 0, log
        assert "removed device" in log
    await wait_for(lambda: not Path(f"/proc/{wg_pid}").exists(), "wireguard-go to exit")
    assert not _wg_pids(ifname)
    await wait_for(lambda: _link(ns, ifname) is None, f"{ifname} to disappear")


@dataclass
class PeeredPair:
    """Two namespaces on one veth, each with a device owner whose device has the other
    as its peer (no keepalive)."""

    ns_a: str
    owner_a: DeviceOwner
    owner_b: DeviceOwner
    ifname: str
    dev_a: dict[str, Any]
    to_a: dict[str, Any]  # B's set_peer arguments for A
    to_b: dict[str, Any]  # A's for B

    async def ping(self) -> bool:
        """One ping from A to B over the overlay, waiting at most 1 s."""
        process = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.ns_a, "ping", "-c", "1", "-W", "1", "100.64.0.2",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        return await process.wait() == 0


@contextlib.asynccontextmanager
async def peered_pair(netns: Callable[[], str], tag: str) -> AsyncIterator[PeeredPair]:
    """A PeeredPair; both owners are closed at the end, and must exit 0 having taken
    their wireguard-go with them."""
    ns_a, ns_b = netns(), netns()
    veth_a, veth_b = f"kb{tag}a{RUN_TAG}"[:15], f"kb{tag}b{RUN_TAG}"[:15]
    _ip("link", "add", veth_a, "netns", ns_a, "type", "veth", "peer", "name", veth_b,
        "netns", ns_b)  # fmt: skip
    for ns, dev, addr in ((ns_a, veth_a, "198.18.0.1/24"), (ns_b, veth_b, "198.18.0.2/24")):
        _ip("-n", ns, "addr", "add", addr, "dev", dev)
        _ip("-n", ns, "link", "set", dev, "up")
    ifname = _ifname()
    owner_a, owner_b = await asyncio.gather(
        DeviceOwner.start(_owner_command(ns_a)), DeviceOwner.start(_owner_command(ns_b))
    )
    try:
        args_a, pub_a = _create_args(ifname, "100.64.0.1/10")
        args_b, pub_b = _create_args(ifname, "100.64.0.2/10")
        dev_a = await owner_a.request("create", **args_a)
        dev_b = await owner_b.request("create", **args_b)
        to_b = {"public_key": pub_b, "endpoint": f"198.18.0.2:{dev_b['listen_port']}",
                "allowed_ips": ["100.64.0.2/32"], "keepalive": 0}
        to_a = {"public_key": pub_a, "endpoint": f"198.18.0.1:{dev_a['listen_port']}",
                "allowed_ips": ["100.64.0.1/32"], "keepalive": 0}
        await owner_a.request("set_peer", **to_b)
        await owner_b.request("set_peer", **to_a)
        yield PeeredPair(ns_a, owner_a, owner_b, ifname, dev_a, to_a, to_b)
    finally:
        codes = await asyncio.gather(owner_a.close(), owner_b.close())
    assert codes == [0, 0]
    await wait_for(lambda: not _wg_pids(ifname), "wireguard-go to exit")


async def test_two_owners_ping_across_the_overlay(netns: Callable[[], str]) -> None:
    async with peered_pair(netns, "v") as pair:
        try:
            await wait_for(pair.ping, "a ping across the overlay", timeout=20, interval=0.2)
        except AssertionError as exc:
            details = [str(exc), f"wireguard-go pids: {_wg_pids(pair.ifname)}"]
            for owner in (pair.owner_a, pair.owner_b):
                details.append(f"stats: {await owner.request('stats')}")
                details.extend(owner.stderr_tail)
            raise AssertionError("\n".join(details)) from None
        for owner, peer in ((pair.owner_a, pair.to_b), (pair.owner_b, pair.to_a)):
            (entry,) = (await owner.request("stats"))["peers"]
            assert entry["public_key"] == peer["public_key"]
            assert abs(entry["last_handshake"] - time.time()) < 60
            assert entry["rx_bytes"] > 0 and entry["tx_bytes"] > 0
        # B learnt A's endpoint from the handshake as well.
        (entry,) = (await pair.owner_b.request("stats"))["peers"]
        assert entry["endpoint"] == f"198.18.0.1:{pair.dev_a['listen_port']}"


async def test_setting_a_peer_again_starts_a_fresh_session(netns: Callable[[], str]) -> None:
    """What the agent does after a sleep (agent/wake_watch.py), with real wireguard-go.
    A's session to B is one B no longer has (B refused its keys, as 180 s after the
    handshake; here B's peer entry was set again): A keeps sending under those keys and
    B drops every packet, until A's own 15 s timeout (measured: about 15 s). Setting B
    again on A (removed, then set as it was) drops A's keys, so its next packet starts
    a handshake."""
    async with peered_pair(netns, "s") as pair:
        await wait_for(pair.ping, "a ping across the overlay", timeout=20, interval=0.2)
        # B forgets the session; A does not know.
        await pair.owner_b.request("remove_peer", public_key=pair.to_a["public_key"])
        await pair.owner_b.request("set_peer", **pair.to_a)
        for _ in range(3):
            assert not await pair.ping(), "A's stale keys are refused: no ping gets through"
        await pair.owner_a.request("remove_peer", public_key=pair.to_b["public_key"])
        await pair.owner_a.request("set_peer", **pair.to_b)
        renewed = time.monotonic()
        # Well before A's own 15 s timeout (of which about 3 s are gone).
        await wait_for(pair.ping, "a ping with the fresh session", timeout=6, interval=0.1)
        assert time.monotonic() - renewed < 6
