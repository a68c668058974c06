"""The owner's read-only network ops (interfaces, default_gateway, host_routes, egress)
and its network watch: argument checks, replies, the filter that leaves out the owner's
own device and host routes, and the coalescing that keeps a netlink storm off the pipe."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from typing import Any

import pytest
from nacl.public import PrivateKey
from owner_fakes import FakeNetConfig, MemoryBackend
from virtual_clock import REAL_CLOCK, VIRTUAL_CLOCK, advance_until, now

from kbwg.core.interface_address import InterfaceAddress
from kbwg.owner.interfaces import GatewayRecord
from kbwg.owner.netconfig import Egress, IPAddress, IPNetwork
from kbwg.owner.netlink_watch import (
    ChangeFilter,
    Coalescer,
    NetworkChange,
    keep_watching,
)
from kbwg.owner.policy import OwnerPolicy
from kbwg.owner.protocol import EVENT_NETWORK
from kbwg.owner.rawstun import RawStunSocket
from kbwg.owner.server import OwnerServer

pytestmark = VIRTUAL_CLOCK

ETH = InterfaceAddress("eth0", 2, "198.18.0.5", 24, True, True)


@dataclass
class FakeHost:
    """A HostNetwork with canned answers that records what it was asked."""

    addresses: list[InterfaceAddress] = field(default_factory=lambda: [ETH])
    gateway: GatewayRecord | None = None
    routes: list[IPv4Network] = field(default_factory=list)
    egress_answer: Egress | None = None
    asked: list[tuple[Any, ...]] = field(default_factory=list)
    watches: int = 0
    on_change: Callable[[NetworkChange], None] | None = None
    own_ifname: Callable[[], str | None] | None = None

    async def interfaces(self) -> list[InterfaceAddress]:
        return list(self.addresses)

    async def default_gateway(self) -> GatewayRecord | None:
        return self.gateway

    async def route_destinations(self, exclude_ifname: str) -> list[IPv4Network]:
        self.asked.append(("routes", exclude_ifname))
        return list(self.routes)

    async def egress(self, dst: IPAddress, via_ifname: str | None,
                     ignore: Iterable[IPNetwork]) -> Egress | None:
        self.asked.append(("egress", str(dst), via_ifname, sorted(str(n) for n in ignore)))
        return self.egress_answer

    async def watch(self, on_change: Callable[[NetworkChange], None],
                    own_ifname: Callable[[], str | None]) -> None:
        self.watches += 1
        self.on_change, self.own_ifname = on_change, own_ifname
        await asyncio.Event().wait()


@dataclass
class Owner:
    host: FakeHost = field(default_factory=FakeHost)
    net: FakeNetConfig = field(default_factory=FakeNetConfig)
    events: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.server = OwnerServer(self.net, lambda _name: MemoryBackend(), OwnerPolicy(),
                                  RawStunSocket.open, host=self.host)
        self.server.emit = self.events.append  # type: ignore[method-assign]
        self._id = 0

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        self._id += 1
        return await self.server.handle({"id": self._id, "op": op, **args})

    async def create(self) -> None:
        key = base64.b64encode(bytes(PrivateKey.generate())).decode()
        reply = await self.call("create", ifname="kbwg7", private_key=key, listen_port=0,
                                address="100.64.0.1/10", backend="auto")
        assert reply["ok"], reply


async def test_interfaces_and_gateway_are_answered_before_create() -> None:
    owner = Owner(FakeHost(gateway=GatewayRecord("198.18.0.1", "198.18.0.5", "eth0")))
    reply = await owner.call("interfaces")
    assert reply == {"id": 1, "ok": True, "addresses": [
        {"interface": "eth0", "index": 2, "address": "198.18.0.5", "prefixlen": 24,
         "up": True, "default_route": True}]}
    assert (await owner.call("default_gateway"))["gateway"] == {
        "address": "198.18.0.1", "local_ip": "198.18.0.5", "interface": "eth0"}
    owner.host.gateway = None
    assert (await owner.call("default_gateway")) == {"id": 3, "ok": True, "gateway": None}


@pytest.mark.parametrize("op", ["interfaces", "default_gateway", "watch_network"])
async def test_ops_without_arguments_refuse_any(op: str) -> None:
    owner = Owner()
    reply = await owner.call(op, ifname="eth0")
    assert not reply["ok"] and "takes no arguments" in reply["error"]
    assert owner.host.watches == 0


@pytest.mark.parametrize(("args", "error"), [
    ({}, "missing 'exclude_ifname'"),
    ({"exclude_ifname": 7}, "'exclude_ifname' must be a string"),
    ({"exclude_ifname": "a/b"}, "not a valid interface name"),
    ({"exclude_ifname": "x" * 16}, "not a valid interface name"),
    ({"exclude_ifname": "kbwg0", "table": 5}, "does not take table"),
])
async def test_host_routes_checks_its_argument(args: dict[str, Any], error: str) -> None:
    owner = Owner()
    reply = await owner.call("host_routes", **args)
    assert not reply["ok"] and error in reply["error"], reply
    assert owner.host.asked == []


async def test_host_routes_answers_the_destinations() -> None:
    owner = Owner(FakeHost(routes=[IPv4Network("10.9.0.0/16"), IPv4Network("192.0.2.0/24")]))
    reply = await owner.call("host_routes", exclude_ifname="kbwg0")
    assert reply["destinations"] == ["10.9.0.0/16", "192.0.2.0/24"]
    assert owner.host.asked == [("routes", "kbwg0")]


@pytest.mark.parametrize(("args", "error"), [
    ({}, "missing 'destination'"),
    ({"destination": 3}, "'destination' must be a string"),
    ({"destination": "198.18.0.0/24"}, "not an IP address"),
    ({"destination": "nonsense"}, "not an IP address"),
    ({"destination": "198.18.0.9", "ifname": ""}, "not a valid interface name"),
    ({"destination": "198.18.0.9", "ifname": 5}, "'ifname' must be a string"),
    ({"destination": "198.18.0.9", "via": "198.18.0.1"}, "does not take via"),
])
async def test_egress_checks_its_arguments(args: dict[str, Any], error: str) -> None:
    owner = Owner()
    reply = await owner.call("egress", **args)
    assert not reply["ok"] and error in reply["error"], reply
    assert owner.host.asked == []


async def test_egress_leaves_the_owners_own_host_routes_out() -> None:
    owner = Owner(FakeHost(egress_answer=Egress("eth1", "198.18.1.1")))
    assert (await owner.call("egress", destination="2001:db8::9")) == {
        "id": 1, "ok": True, "route": {"ifname": "eth1", "via": "198.18.1.1"}}
    await owner.create()
    # A host route of this owner's (to a current peer's endpoint).
    peer = {"public_key": base64.b64encode(bytes(32)).decode(),
            "endpoint": "198.18.0.9:51820", "allowed_ips": ["100.64.0.2/32"], "keepalive": 0}
    assert (await owner.call("set_peer", **peer))["ok"]
    assert (await owner.call("add_route", destination="198.18.0.9/32", ifname="eth9"))["ok"]
    owner.host.egress_answer = None
    assert (await owner.call("egress", destination="198.18.0.9", ifname="eth8"))["route"] is None
    assert owner.host.asked == [("egress", "2001:db8::9", None, []),
                                ("egress", "198.18.0.9", "eth8", ["198.18.0.9/32"])]


async def test_watch_network_starts_one_watch_that_skips_the_owners_device() -> None:
    owner = Owner()
    assert (await owner.call("watch_network"))["ok"]
    assert (await owner.call("watch_network"))["ok"]
    await advance_until(lambda: owner.host.watches > 0)
    assert owner.host.watches == 1
    assert owner.host.own_ifname is not None and owner.host.own_ifname() is None
    await owner.create()
    assert owner.host.own_ifname() == "kbwg7"
    assert owner.host.on_change is not None
    owner.host.on_change(NetworkChange("RTM_NEWADDR", "eth0"))
    assert owner.events == [{"event": EVENT_NETWORK, "change": "RTM_NEWADDR",
                             "ifname": "eth0", "count": 1}]
    await owner.server.stop_watching()
    assert owner.server._watching is None


def test_the_filter_leaves_out_the_own_device_host_routes_and_other_messages() -> None:
    changes = ChangeFilter({1: "lo", 2: "eth0"})
    own = "kbwg0"
    assert changes.classify({"event": "RTM_NEWLINK", "index": 7, "ifname": "kbwg0"}, own) is None
    # Learnt from the link message: a route through index 7 is on our device.
    assert changes.classify({"event": "RTM_NEWROUTE", "oif": 7, "dst_len": 24}, own) is None
    assert changes.classify({"event": "RTM_NEWADDR", "index": 7}, own) is None
    assert changes.classify({"event": "RTM_NEWROUTE", "oif": 2, "dst_len": 32}, own) is None
    assert changes.classify({"event": "RTM_NEWNEIGH", "index": 2}, own) is None
    assert changes.classify({"event": None}, own) is None
    assert changes.classify({"event": "RTM_DELROUTE", "oif": 2, "dst_len": 0}, own) == \
        NetworkChange("RTM_DELROUTE", "eth0")
    assert changes.classify({"event": "RTM_NEWADDR", "index": 2}, own) == \
        NetworkChange("RTM_NEWADDR", "eth0")
    # Before create nothing is ours; an unknown index still counts, unnamed.
    assert changes.classify({"event": "RTM_NEWADDR", "index": 7}, None) == \
        NetworkChange("RTM_NEWADDR", "kbwg0")
    assert changes.classify({"event": "RTM_DELLINK", "index": 9, "ifname": 3}, own) == \
        NetworkChange("RTM_DELLINK", None)
    assert changes.classify({"event": "RTM_NEWADDR", "index": "x"}, own) == \
        NetworkChange("RTM_NEWADDR", None)


def test_ipv6_refreshes_are_not_changes() -> None:
    changes = ChangeFilter({2: "eth0"})
    addr = {"event": "RTM_NEWADDR", "family": 10, "index": 2, "address": "2001:db8::5",
            "flags": 0}
    route = {"event": "RTM_NEWROUTE", "family": 10, "oif": 2, "dst_len": 0, "dst": None,
             "gateway": "2001:db8::1", "table": 254}
    # The first word of each is a change; the kernel's refreshes then say nothing new.
    assert changes.classify(addr, None) == NetworkChange("RTM_NEWADDR", "eth0")
    assert changes.classify(route, None) == NetworkChange("RTM_NEWROUTE", "eth0")
    assert changes.classify(addr, None) is None
    assert changes.classify(route, None) is None
    # Usable no more (deprecated, 0x20): a change; and usable again.
    assert changes.classify({**addr, "flags": 0x20}, None) == NetworkChange("RTM_NEWADDR", "eth0")
    assert changes.classify({**addr, "flags": 0x20}, None) is None
    assert changes.classify(addr, None) == NetworkChange("RTM_NEWADDR", "eth0")
    # New ones are changes once; gone ones always.
    other = {**addr, "address": "2001:db8::6"}
    assert changes.classify(other, None) == NetworkChange("RTM_NEWADDR", "eth0")
    assert changes.classify(other, None) is None
    assert changes.classify({**other, "event": "RTM_DELADDR"}, None) == \
        NetworkChange("RTM_DELADDR", "eth0")
    assert changes.classify(other, None) == NetworkChange("RTM_NEWADDR", "eth0")
    assert changes.classify({**route, "gateway": "2001:db8::2"}, None) == \
        NetworkChange("RTM_NEWROUTE", "eth0")
    assert changes.classify({**route, "event": "RTM_DELROUTE"}, None) == \
        NetworkChange("RTM_DELROUTE", "eth0")
    # Link-local and multicast, other tables, host routes: never changes.
    assert changes.classify({**addr, "address": "fe80::1"}, None) is None
    assert changes.classify({**addr, "address": "junk"}, None) is None
    assert changes.classify({**route, "dst": "fe80::", "dst_len": 64}, None) is None
    assert changes.classify({**route, "dst": "ff00::", "dst_len": 8}, None) is None
    assert changes.classify({**route, "table": 255, "dst": "2001:db8::"}, None) is None
    assert changes.classify({**route, "dst": "2001:db8::9", "dst_len": 128}, None) is None
    # IPv4 is as before: every address message is a change.
    v4 = {"event": "RTM_NEWADDR", "family": 2, "index": 2, "address": "198.18.0.2"}
    assert changes.classify(v4, None) == changes.classify(v4, None) == \
        NetworkChange("RTM_NEWADDR", "eth0")


async def test_a_storm_reaches_the_agent_as_a_few_events() -> None:
    sent: list[tuple[float, NetworkChange, int]] = []
    coalescer = Coalescer(lambda change, count: sent.append((now(), change, count)),
                          interval=0.2)
    start = now()
    for i in range(1000):
        coalescer.note(NetworkChange("RTM_NEWROUTE", f"eth{i % 3}"))
        if i % 100 == 0:
            await asyncio.sleep(0.01)  # over about a tenth of a second
    await advance_until(lambda: len(sent) == 2)
    assert sent[0][1:] == (NetworkChange("RTM_NEWROUTE", "eth0"), 1)
    # The latest change, standing for the rest, one interval after the first.
    assert sent[1][1:] == (NetworkChange("RTM_NEWROUTE", "eth0"), 999)
    assert sent[1][0] - start == pytest.approx(0.2)
    await asyncio.sleep(1.0)
    assert len(sent) == 2
    # After a quiet interval, a change goes at once.
    coalescer.note(NetworkChange("RTM_DELADDR", "eth1"))
    assert sent[2][1:] == (NetworkChange("RTM_DELADDR", "eth1"), 1)
    coalescer.close()


async def test_an_address_removed_in_a_burst_is_what_the_burst_reports() -> None:
    """The agent acts at once on an address removed (WireGuard must stop sending from
    it): the route removals that follow within the interval must not hide it."""
    sent: list[NetworkChange] = []
    coalescer = Coalescer(lambda change, _count: sent.append(change), interval=0.2)
    coalescer.note(NetworkChange("RTM_NEWLINK", "eth0"))  # goes at once
    coalescer.note(NetworkChange("RTM_DELADDR", "eth0"))
    coalescer.note(NetworkChange("RTM_DELROUTE", "eth0"))
    coalescer.note(NetworkChange("RTM_NEWROUTE", "eth1"))
    await advance_until(lambda: len(sent) == 2)
    assert sent == [NetworkChange("RTM_NEWLINK", "eth0"), NetworkChange("RTM_DELADDR", "eth0")]
    coalescer.note(NetworkChange("RTM_NEWROUTE", "eth1"))  # the next burst: the latest
    coalescer.note(NetworkChange("RTM_DELROUTE", "eth1"))
    await advance_until(lambda: len(sent) == 3)
    assert sent[2] == NetworkChange("RTM_DELROUTE", "eth1")
    coalescer.close()


async def test_a_failed_watch_is_opened_again_and_says_so() -> None:
    seen: list[NetworkChange] = []
    attempts: list[float] = []

    async def flaky(on_change: Callable[[NetworkChange], None],
                    _own: Callable[[], str | None]) -> None:
        attempts.append(now())
        if len(attempts) == 1:
            raise OSError("netlink socket failed")
        on_change(NetworkChange("RTM_NEWADDR", "eth0"))
        await asyncio.Event().wait()

    task = asyncio.create_task(keep_watching(seen.append, lambda: None, flaky, retry_s=5.0))
    await advance_until(lambda: len(seen) == 2, timeout=10.0)
    assert attempts[1] - attempts[0] == pytest.approx(5.0)
    assert seen == [NetworkChange("RESUBSCRIBED", None), NetworkChange("RTM_NEWADDR", "eth0")]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@REAL_CLOCK
async def test_netlink_reads_match_iproute2() -> None:
    """The owner's reads (AsyncIPRoute: the owner's loop keeps serving; `diag` reads the
    host with them too) give the addresses and default gateway `ip` shows on this host."""
    from kbwg.owner.host_network import NetlinkHostNetwork

    def ip_json(*args: str) -> Any:
        return json.loads(subprocess.run(["ip", "-j", *args], check=True, text=True,
                                         capture_output=True).stdout)

    host = NetlinkHostNetwork()
    ours = {(a.interface, a.address, a.prefixlen) for a in await host.interfaces()}
    unusable = ("tentative", "deprecated", "dadfailed")
    theirs = {(link["ifname"], addr["local"], addr["prefixlen"])
              for link in ip_json("addr", "show") for addr in link.get("addr_info", [])
              if not (addr["family"] == "inet6" and any(addr.get(f) for f in unusable))}
    assert ours == theirs and ("lo", "127.0.0.1", 8) in ours
    gateway = await host.default_gateway()
    defaults = sorted((r for r in ip_json("-4", "route", "show", "default", "table", "main")
                       if r.get("gateway")), key=lambda r: r.get("metric", 0))
    if not defaults:
        assert gateway is None
    else:
        assert gateway is not None
        assert (gateway.address, gateway.interface) == (defaults[0]["gateway"],
                                                        defaults[0].get("dev"))
