"""The typed device-owner calls: each op's arguments go out in the wire's form, and a
reply that does not have the shape the protocol promises is an OwnerError (which the
agent handles like a refusal), never a KeyError or TypeError inside the agent."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv4Network
from typing import Any

import pytest

from kbwg.agent.owner_calls import DeviceStats, OwnerCalls, PeerCounters, Uplink
from kbwg.agent.owner_client import OwnerError
from kbwg.negotiation.host_addresses import InterfaceAddress


@dataclass
class Scripted:
    """A transport that answers each op with a fixed reply and records the requests."""

    replies: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    async def request(self, op: str, **args: Any) -> dict[str, Any]:
        self.calls.append((op, args))
        return self.replies.get(op, {})


def calls_for(transport: Scripted) -> OwnerCalls:
    return OwnerCalls(transport)  # type: ignore[arg-type]


async def test_arguments_go_out_in_the_wire_form() -> None:
    wire = Scripted({"create": {"listen_port": 40000, "backend": "kernel",
                                "public_key": "pk", "ifname": "kbwg0"},
                     "add_route": {"via": "198.18.0.1", "ifname": "eth1"}})
    owner = calls_for(wire)
    created = await owner.create("kbwg0", bytes(32), 0, IPv4Interface("100.64.0.1/10"), "auto")
    assert (created.listen_port, created.backend) == (40000, "kernel")
    await owner.set_peer("a2V5", None, ["100.64.0.2/32"], 0)
    added = await owner.add_route(IPv4Network("198.18.0.9/32"), "eth1")
    assert (added.via, added.ifname) == ("198.18.0.1", "eth1")
    await owner.set_address(IPv4Interface("100.64.0.7/10"))
    assert wire.calls == [
        ("create", {"ifname": "kbwg0", "private_key": "A" * 43 + "=", "listen_port": 0,
                    "address": "100.64.0.1/10", "backend": "auto"}),
        ("set_peer", {"public_key": "a2V5", "endpoint": None,
                      "allowed_ips": ["100.64.0.2/32"], "keepalive": 0}),
        ("add_route", {"destination": "198.18.0.9/32", "ifname": "eth1"}),
        ("set_address", {"address": "100.64.0.7/10"}),
    ]


async def test_stats_are_parsed_with_absent_counters_as_zero() -> None:
    wire = Scripted({"stats": {"listen_port": 1, "refusals": {"overlay": 2}, "peers": [
        {"public_key": "k1", "endpoint": "198.18.0.6:51820", "last_handshake": 5.5,
         "rx_bytes": 10, "tx_bytes": 20},
        {"public_key": "k2", "endpoint": None, "last_handshake": None},
    ]}})
    stats = await calls_for(wire).stats()
    assert stats == DeviceStats(
        peers=[PeerCounters("k1", "198.18.0.6:51820", 5.5, 10, 20),
               PeerCounters("k2", None, 0.0, 0, 0)],
        listen_port=1, refusals={"overlay": 2})
    assert set(stats.by_key()) == {"k1", "k2"}


@pytest.mark.parametrize(("op", "reply"), [
    ("stats", {"peers": [{"endpoint": "198.18.0.6:1"}]}),
    ("stats", {"peers": [{"public_key": 7}]}),
    ("stats", {"peers": [{"public_key": "k", "rx_bytes": "many"}]}),
    ("stats", {"peers": "none"}),
    ("stats", {"peers": [], "refusals": [1]}),
    ("create", {}),
    ("create", {"listen_port": "51820"}),
    ("create", {"listen_port": True}),
    ("add_route", {"via": 3}),
    ("stun_open", {"port": None}),
    ("hello", {"version": 1}),
])
async def test_a_malformed_reply_is_an_owner_error(op: str, reply: dict[str, Any]) -> None:
    owner = calls_for(Scripted({op: reply}))
    call = {
        "stats": owner.stats,
        "create": lambda: owner.create("kbwg0", bytes(32), 0,
                                       IPv4Interface("100.64.0.1/10"), "auto"),
        "add_route": lambda: owner.add_route(IPv4Network("198.18.0.9/32"), "eth1"),
        "stun_open": owner.stun_open,
        "hello": owner.hello,
    }[op]
    with pytest.raises(OwnerError, match=f"malformed {op} reply"):
        await call()


ADDRESS = {"interface": "eth0", "index": 2, "address": "198.18.0.5", "prefixlen": 24,
           "up": True, "default_route": False}


async def test_network_reads_are_parsed_and_go_out_in_the_wire_form() -> None:
    wire = Scripted({
        "interfaces": {"addresses": [ADDRESS, {**ADDRESS, "address": "2001:db8::5",
                                               "prefixlen": 64, "up": False}]},
        "default_gateway": {"gateway": {"address": "198.18.0.1", "local_ip": "198.18.0.5",
                                        "interface": None}},
        "host_routes": {"destinations": ["10.9.0.0/16"]},
        "egress": {"route": {"ifname": "eth1", "via": None}},
    })
    owner = calls_for(wire)
    assert await owner.interfaces() == [
        InterfaceAddress("eth0", 2, "198.18.0.5", 24, True, False),
        InterfaceAddress("eth0", 2, "2001:db8::5", 64, False, False)]
    gateway = await owner.default_gateway()
    assert gateway is not None and (gateway.address, gateway.local_ip, gateway.interface) == (
        "198.18.0.1", "198.18.0.5", None)
    assert await owner.host_routes("kbwg0") == [IPv4Network("10.9.0.0/16")]
    assert await owner.egress("198.18.0.9") == Uplink("eth1", None)
    assert await owner.egress("198.18.0.9", "eth1") == Uplink("eth1", None)
    await owner.watch_network()
    assert wire.calls == [("interfaces", {}), ("default_gateway", {}),
                          ("host_routes", {"exclude_ifname": "kbwg0"}),
                          ("egress", {"destination": "198.18.0.9"}),
                          ("egress", {"destination": "198.18.0.9", "ifname": "eth1"}),
                          ("watch_network", {})]
    wire.replies = {"default_gateway": {"gateway": None}, "egress": {"route": None}}
    assert await owner.default_gateway() is None
    assert await owner.egress("198.18.0.9") is None


@pytest.mark.parametrize(("op", "reply"), [
    ("interfaces", {}),
    ("interfaces", {"addresses": {"eth0": ADDRESS}}),
    ("interfaces", {"addresses": ["eth0"]}),
    ("interfaces", {"addresses": [{**ADDRESS, "address": "198.18.0.500"}]}),
    ("interfaces", {"addresses": [{**ADDRESS, "prefixlen": 33}]}),
    ("interfaces", {"addresses": [{**ADDRESS, "index": True}]}),
    ("interfaces", {"addresses": [{**ADDRESS, "up": 1}]}),
    ("interfaces", {"addresses": [{**ADDRESS, "interface": ""}]}),
    ("interfaces", {"addresses": [{k: v for k, v in ADDRESS.items() if k != "default_route"}]}),
    ("default_gateway", {"gateway": "198.18.0.1"}),
    ("default_gateway", {"gateway": {"address": "198.18.0.1"}}),
    ("default_gateway", {"gateway": {"address": "x", "local_ip": "198.18.0.5"}}),
    ("host_routes", {}),
    ("host_routes", {"destinations": ["2001:db8::/32"]}),
    ("host_routes", {"destinations": [None]}),
    ("egress", {"route": ["eth1"]}),
    ("egress", {"route": {"via": "198.18.0.1"}}),
    ("egress", {"route": {"ifname": "eth1", "via": "gateway"}}),
])
async def test_a_malformed_network_reply_is_an_owner_error(op: str,
                                                           reply: dict[str, Any]) -> None:
    owner = calls_for(Scripted({op: reply}))
    call = {
        "interfaces": owner.interfaces,
        "default_gateway": owner.default_gateway,
        "host_routes": lambda: owner.host_routes("kbwg0"),
        "egress": lambda: owner.egress("198.18.0.9"),
    }[op]
    with pytest.raises(OwnerError, match=f"malformed {op} reply"):
        await call()
