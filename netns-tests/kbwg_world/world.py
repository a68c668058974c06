"""The declarative world builder: segments, routers, hosts and servers in network namespaces.

Topology model:
- A `Segment` is an L2 switch: a Linux bridge inside some namespace. The internet is a
  segment in a namespace of its own; a router's LAN is a bridge (`lan0`) inside the router's
  namespace, with the router's LAN address on it.
- Every node is one namespace. Attaching a node to a segment creates a veth pair directly
  between the node's namespace (`eth0`, `eth1`, ... or `wan0`) and the segment's namespace
  (`p0`, `p1`, ...), so nothing is ever created in the root namespace.
- The internet is flat: every node on it reaches every address of every internet subnet
  on-link (a segment may carry several subnets, e.g. for a STUN server's second address).
  Routers have no default route there; nested routers (WAN on another router's LAN) and
  hosts default to their segment's router.
- `NatMode.NONE` routers announce their LAN on their WAN segment: every member of that
  segment (now or later) gets a route to the LAN via the router's WAN address. That is one
  level deep; behind a NAT the announcement is pointless anyway.
- IPv6 is off in every namespace unless asked for: an internet with `ipv6="2001:db8::/64"`
  gives each member a global address there, and a router with `ipv6_lan=` routes that
  /64 (announced like a NONE router's LAN, never NATed) to its LAN, whose hosts get an
  address in it and a default route via the router. The router's stateful firewall
  covers IPv6 the same way (inbound only as replies), with all ICMPv6 let through:
  neighbour discovery needs it. Addresses are added with `nodad` (DESIGN: DAD delays them).

Every namespace is called `kbwg-<run id>-<name>`; `close()` (also called by the context
manager, atexit and SIGTERM) kills every process, deletes every namespace (taking the veths
and bridges with it) and sweeps whatever still carries the run id.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from types import FrameType
from typing import IO, Any

from kbwg_world import netns
from kbwg_world.nat import NatMode, PortForward, RouterRules
from kbwg_world.shaping import DelaySpec, Direction, delay_rules, iptables_argv, loss_ruleset

NS_PREFIX = netns.NS_PREFIX

# Hygiene: the world only ever uses documentation and benchmarking address space.
INTERNET_SPACE = tuple(
    IPv4Network(n) for n in ("203.0.113.0/24", "198.51.100.0/24", "192.0.2.0/24")
)
LAN_SPACE = IPv4Network("198.18.0.0/15")
IPV6_SPACE = IPv6Network("2001:db8::/32")
# Namespaces start with IPv6 off; these turn it on without router solicitations, router
# advertisements taken in, or duplicate address detection (before disable_ipv6=0, so
# the link-local addresses that come with it skip DAD too).
IPV6_ON_SYSCTLS = (
    "net.ipv6.conf.all.accept_ra=0", "net.ipv6.conf.default.accept_ra=0",
    "net.ipv6.conf.all.router_solicitations=0", "net.ipv6.conf.default.router_solicitations=0",
    "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
    "net.ipv6.conf.all.disable_ipv6=0", "net.ipv6.conf.default.disable_ipv6=0",
)

# Automatic addresses start here, leaving the low ones for explicit choices (e.g. servers).
AUTO_HOST_START = 10

DELAYER_SCRIPT = Path(__file__).with_name("delayer.py")
PINGTOOL_SCRIPT = Path(__file__).with_name("pingtool.py")

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")


class WorldError(RuntimeError):
    """Building, shaping or tearing down the world went wrong."""


def _check_space(net: IPv4Network, allowed: Sequence[IPv4Network], what: str) -> None:
    if not any(net.subnet_of(space) for space in allowed):
        spaces = ", ".join(str(s) for s in allowed)
        raise WorldError(f"{what} {net} is outside the allowed address space ({spaces})")


@dataclass(frozen=True)
class LinkStats:
    """Interface counters, as `ip -s link` reports them."""

    rx_packets: int
    tx_packets: int
    rx_bytes: int
    tx_bytes: int


@dataclass(frozen=True)
class PingResult:
    sent: int
    received: int
    rtts_ms: list[float]

    @property
    def ok(self) -> bool:
        """At least one reply."""
        return self.received > 0

    @property
    def lost(self) -> int:
        return self.sent - self.received


@dataclass(eq=False)
class Segment:
    """An L2 switch: a bridge `bridge` in namespace `ns`, carrying one or more subnets."""

    world: World = field(repr=False)
    name: str
    ns: str
    bridge: str
    subnets: list[IPv4Network]
    gateway: IPv4Address | None = None  # the router's address when this is a router LAN
    router: Router | None = field(default=None, repr=False)
    used: set[IPv4Address] = field(default_factory=set, repr=False)
    members: list[tuple[Node, str]] = field(default_factory=list, repr=False)
    # Routes announced on this segment: (network, via, announcing node).
    routes: list[tuple[IPv4Network, IPv4Address, Node]] = field(default_factory=list, repr=False)
    next_port: int = field(default=0, repr=False)
    # IPv6, when the segment has it: one /64, the router's address on a LAN, routes.
    subnet6: IPv6Network | None = None
    gateway6: IPv6Address | None = None
    used6: set[IPv6Address] = field(default_factory=set, repr=False)
    routes6: list[tuple[IPv6Network, IPv6Address, Node]] = field(
        default_factory=list, repr=False)

    def allocate6(self) -> IPv6Address:
        if self.subnet6 is None:
            raise WorldError(f"segment {self.name} has no IPv6")
        for offset in range(AUTO_HOST_START, 1 << 16):
            addr = self.subnet6.network_address + offset
            if addr not in self.used6:
                self.used6.add(addr)
                return addr
        raise WorldError(f"segment {self.name} has no free IPv6 address left")

    @property
    def subnet(self) -> IPv4Network:
        return self.subnets[0]

    def subnet_of(self, ip: IPv4Address) -> IPv4Network:
        for net in self.subnets:
            if ip in net:
                return net
        raise WorldError(f"{ip} is in none of the subnets of segment {self.name}")

    def reserve(self, ip: str | IPv4Address) -> IPv4Address:
        addr = IPv4Address(ip)
        net = self.subnet_of(addr)
        if addr in (net.network_address, net.broadcast_address):
            raise WorldError(f"{addr} is not a host address of {net}")
        if addr in self.used:
            raise WorldError(f"{addr} is already used on segment {self.name}")
        self.used.add(addr)
        return addr

    def allocate(self) -> IPv4Address:
        for offset in range(AUTO_HOST_START, self.subnet.num_addresses - 1):
            addr = self.subnet.network_address + offset
            if addr not in self.used:
                self.used.add(addr)
                return addr
        raise WorldError(f"segment {self.name} has no free address left")


@dataclass(eq=False)
class Interface:
    name: str
    segment: Segment = field(repr=False)
    addresses: list[IPv4Address]
    addresses6: list[IPv6Address] = field(default_factory=list)


@dataclass(eq=False)
class Node:
    """One network namespace: a host, server or router."""

    world: World = field(repr=False)
    name: str
    ns: str
    private_run: str | None = field(default=None, repr=False)
    interfaces: list[Interface] = field(default_factory=list)
    losses: dict[tuple[str, Direction], float] = field(default_factory=dict, repr=False)
    next_queue: int = field(default=0, repr=False)

    # -- addresses ---------------------------------------------------------------------------

    @property
    def addresses(self) -> list[str]:
        return [str(a) for iface in self.interfaces for a in iface.addresses]

    @property
    def ip(self) -> str:
        """The first address (a router's WAN address)."""
        if not self.interfaces or not self.interfaces[0].addresses:
            raise WorldError(f"{self.name} has no address")
        return str(self.interfaces[0].addresses[0])

    @property
    def ip6(self) -> str:
        """The first global IPv6 address (a router's WAN address)."""
        for iface in self.interfaces:
            if iface.addresses6:
                return str(iface.addresses6[0])
        raise WorldError(f"{self.name} has no IPv6 address")

    @property
    def addresses6(self) -> list[str]:
        return [str(a) for iface in self.interfaces for a in iface.addresses6]

    def interface(self, ifname: str) -> Interface:
        for iface in self.interfaces:
            if iface.name == ifname:
                return iface
        raise WorldError(f"{self.name} has no interface {ifname}")

    def address_on(self, segment: Segment) -> str:
        for iface in self.interfaces:
            if iface.segment is segment:
                return str(iface.addresses[0])
        raise WorldError(f"{self.name} is not on segment {segment.name}")

    # -- running things ----------------------------------------------------------------------

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` wrapped to run in this node (for callers that spawn processes themselves)."""
        return netns.ns_argv(self.ns, [str(a) for a in argv], self.private_run)

    def run(
        self,
        argv: Sequence[str],
        check: bool = True,
        timeout: float | None = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion in this node; text output is captured."""
        return netns.run(self.argv(argv), check=check, timeout=timeout, input_text=input)

    def popen(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        text: bool = False,
    ) -> subprocess.Popen[Any]:
        """Start a long-running process in this node; the world terminates it at close.

        `env` is merged over the current environment. The process leads its own session,
        so closing the world signals its whole process group.
        """
        full_env = {**os.environ, **env} if env is not None else None
        return self.world.spawn(
            self.argv(argv), env=full_env, stdin=stdin, stdout=stdout, stderr=stderr, text=text
        )

    def sh(self, command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a shell command line in this node (plumbing; no private run dir needed)."""
        return netns.run(netns.ns_argv(self.ns, ["sh", "-c", command]), check=check)

    def ip_batch(self, commands: Sequence[str]) -> None:
        """Several `ip` commands in one process (`ip -batch`), for fast setup."""
        if commands:
            netns.run(["ip", "-n", self.ns, "-batch", "-"], input_text="\n".join(commands) + "\n")

    def add_route(self, dest: str, via: str | None = None, dev: str | None = None) -> None:
        """Add (or replace) a route, e.g. a host route that pins a peer to one uplink."""
        cmd = ["route", "replace", dest]
        if via is not None:
            cmd += ["via", via]
        if dev is not None:
            cmd += ["dev", dev]
        netns.run(["ip", "-n", self.ns, *cmd])

    def link_stats(self, ifname: str) -> LinkStats:
        out = netns.run(["ip", "-n", self.ns, "-j", "-s", "link", "show", "dev", ifname]).stdout
        stats = json.loads(out)[0]["stats64"]
        return LinkStats(
            rx_packets=int(stats["rx"]["packets"]),
            tx_packets=int(stats["tx"]["packets"]),
            rx_bytes=int(stats["rx"]["bytes"]),
            tx_bytes=int(stats["tx"]["bytes"]),
        )

    def ping_ok(self, dest: str) -> bool:
        """One echo request to `dest` answered within a second."""
        return self.ping(dest, count=1, timeout=1.0).ok

    def ping(
        self,
        dest: str,
        count: int = 1,
        timeout: float = 1.0,
        interval: float = 0.2,
        source: str | None = None,
    ) -> PingResult:
        """ICMP echo from this node (`pingtool.py`: this machine has no ping binary).

        `timeout` is how long to wait for replies after the last request.
        """
        argv = [sys.executable, str(PINGTOOL_SCRIPT), dest, "--count", str(count),
                "--interval", str(interval), "--timeout", str(timeout)]  # fmt: skip
        if source is not None:
            argv += ["--source", source]
        proc = netns.run(
            netns.ns_argv(self.ns, argv), check=False, timeout=count * interval + timeout + 10
        )
        if not proc.stdout.strip():
            raise WorldError(f"pingtool failed in {self.name}: {proc.stderr[-2000:]}")
        out = json.loads(proc.stdout)
        return PingResult(int(out["sent"]), int(out["received"]), list(out["rtts_ms"]))

    def __str__(self) -> str:
        return self.name


@dataclass(eq=False)
class Host(Node):
    """A host or server: one interface per segment, `eth0`, `eth1`, ..."""


@dataclass(eq=False)
class Router(Node):
    """A NAT router: `wan0` on its WAN segment, bridge `lan0` as its LAN segment."""

    # Filled in by World.router right after the namespace exists (the LAN refers back to us).
    wan: Segment | None = field(default=None, repr=False)
    _lan: Segment | None = field(default=None, repr=False)
    _rules: RouterRules | None = field(default=None, repr=False)

    @property
    def lan(self) -> Segment:
        if self._lan is None:
            raise WorldError(f"router {self.name} is not built yet")
        return self._lan

    @property
    def rules(self) -> RouterRules:
        if self._rules is None:
            raise WorldError(f"router {self.name} is not built yet")
        return self._rules

    @property
    def wan_ip(self) -> str:
        return self.ip

    @property
    def lan_ip(self) -> str:
        return str(self.lan.gateway)

    @property
    def nat(self) -> NatMode:
        return self.rules.nat

    def forward_port(self, wan_port: int, host: Node | str, host_port: int | None = None) -> None:
        """Forward UDP `wan_port` on the WAN address to `host:host_port` (static DNAT)."""
        if self.rules.nat is NatMode.NONE:
            raise WorldError(f"router {self.name} does no NAT, there is nothing to forward")
        host_ip = host.address_on(self.lan) if isinstance(host, Node) else str(IPv4Address(host))
        self.rules.forwards.append(
            PortForward(wan_port, host_ip, wan_port if host_port is None else host_port)
        )
        self.load_rules()

    def load_rules(self) -> None:
        ruleset = self.rules.render()
        netns.run(["ip", "netns", "exec", self.ns, "nft", "-f", "-"], input_text=ruleset)

    def block_outbound_udp(self, allow_ports: Sequence[int] = (53,)) -> None:
        """Drop all UDP from the LAN to the WAN except to `allow_ports` (DNS), as an
        office or hotel network that only lets TCP out. A table of its own, so reloading
        the NAT rules keeps it."""
        allowed = ", ".join(str(p) for p in allow_ports) or "0"
        ruleset = "\n".join([
            "table ip kbwg_udpblock {",
            "  chain forward {",
            "    type filter hook forward priority filter - 10; policy accept;",
            f'    iifname "{self.rules.lan_if}" meta l4proto udp udp dport != {{ {allowed} }} drop',
            "  }",
            "}",
        ]) + "\n"
        netns.run(["ip", "netns", "exec", self.ns, "nft", "-f", "-"], input_text=ruleset)

    def allow_outbound_udp(self) -> None:
        """Undo `block_outbound_udp`: the network lets UDP out again."""
        netns.run(["ip", "netns", "exec", self.ns, "nft", "delete", "table", "ip",
                   "kbwg_udpblock"])


def _on_sigterm(signum: int, _frame: FrameType | None) -> None:
    # Unwinds `with World()` blocks and runs atexit handlers, both of which close worlds.
    raise SystemExit(128 + signum)


@dataclass(eq=False)
class World:
    """A network of namespaces; use as a context manager (or call `close()`)."""

    run_id: str | None = None
    # Give each node its own /run/wireguard (wireguard-go's UAPI sockets would collide).
    private_wireguard_run: bool = True
    handle_sigterm: bool = True
    grace: float = 2.0

    segments: list[Segment] = field(default_factory=list, init=False, repr=False)
    nodes: dict[str, Node] = field(default_factory=dict, init=False, repr=False)
    namespaces: list[str] = field(default_factory=list, init=False)
    delays: dict[tuple[str, str, Direction], DelaySpec] = field(
        default_factory=dict, init=False, repr=False
    )
    procs: list[subprocess.Popen[Any]] = field(default_factory=list, init=False, repr=False)
    dir: Path = field(init=False, repr=False)
    closed: bool = field(default=False, init=False)
    _lan_index: int = field(default=0, init=False, repr=False)
    _prev_sigterm: Any = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.run_id is None:
            self.run_id = secrets.token_hex(3)
        if not re.fullmatch(r"[a-z0-9]{1,12}", self.run_id):
            raise WorldError(f"run id {self.run_id!r}: use 1-12 lowercase letters or digits")
        self.dir = Path(tempfile.mkdtemp(prefix=f"{netns.WORLD_DIR_PREFIX}{self.run_id}-"))
        atexit.register(self.close)
        if (
            self.handle_sigterm
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        ):
            self._prev_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)

    # -- naming ------------------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        """The prefix of every namespace of this run (what the sweep of this run matches)."""
        return f"{NS_PREFIX}{self.run_id}-"

    def _require_open(self) -> None:
        if self.closed:
            raise WorldError("the world is closed")

    def _new_namespace(self, name: str) -> str:
        self._require_open()
        if not _NAME_RE.match(name):
            raise WorldError(f"name {name!r}: use lowercase letters, digits and dashes")
        ns = f"{self.prefix}{name}"
        if ns in self.namespaces:
            raise WorldError(f"name {name!r} is already used in this world")
        # Recorded before creation: a half-made namespace must still be torn down.
        self.namespaces.append(ns)
        netns.run(["ip", "netns", "add", ns])
        sysctls = [
            # No IPv6: no router solicitations or DAD traffic to disturb counters and captures.
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
            # Bridged frames must not traverse the forward chain (DESIGN: bridge netfilter is
            # on in new namespaces and a drop policy would cut host-to-host LAN traffic).
            "net.bridge.bridge-nf-call-iptables=0",
            "net.bridge.bridge-nf-call-ip6tables=0",
            "net.bridge.bridge-nf-call-arptables=0",
        ]
        netns.run(["ip", "netns", "exec", ns, "sysctl", "-q", "-e", "-w", *sysctls])
        netns.run(["ip", "-n", ns, "link", "set", "lo", "up"])
        return ns

    def _make_node(self, cls: type[Node], name: str) -> Node:
        if name in self.nodes:
            raise WorldError(f"node {name!r} already exists")
        ns = self._new_namespace(name)
        private_run = None
        if self.private_wireguard_run:
            run_dir = self.dir / name / "run-wireguard"
            run_dir.mkdir(parents=True)
            private_run = str(run_dir)
        node = cls(world=self, name=name, ns=ns, private_run=private_run)
        self.nodes[name] = node
        return node

    # -- segments ----------------------------------------------------------------------------

    def internet(
        self,
        subnet: str = "203.0.113.0/24",
        extra_subnets: Sequence[str] = (),
        name: str | None = None,
        ipv6: str | None = None,
    ) -> Segment:
        """A flat internet switch. `extra_subnets` are reachable on-link from every member;
        `ipv6` (a /64 of 2001:db8::/32) gives every member an IPv6 address too."""
        self._require_open()
        subnet6 = self._check_subnet6(ipv6) if ipv6 is not None else None
        nets = [IPv4Network(subnet), *(IPv4Network(s) for s in extra_subnets)]
        for net in nets:
            _check_space(net, INTERNET_SPACE, "internet subnet")
            for seg in self.segments:
                if any(net.overlaps(other) for other in seg.subnets):
                    raise WorldError(f"subnet {net} overlaps segment {seg.name}")
        if name is None:
            count = sum(1 for s in self.segments if s.router is None)
            name = "inet" if count == 0 else f"inet{count + 1}"
        ns = self._new_namespace(name)
        netns.run(["ip", "-n", ns, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0"])
        netns.run(["ip", "-n", ns, "link", "set", "br0", "up"])
        seg = Segment(world=self, name=name, ns=ns, bridge="br0", subnets=nets,
                      subnet6=subnet6)
        self.segments.append(seg)
        return seg

    def _check_subnet6(self, text: str) -> IPv6Network:
        net = IPv6Network(text)
        if net.prefixlen != 64 or not net.subnet_of(IPV6_SPACE):
            raise WorldError(f"IPv6 subnet {net} must be a /64 inside {IPV6_SPACE}")
        for seg in self.segments:
            if seg.subnet6 is not None and net.overlaps(seg.subnet6):
                raise WorldError(f"IPv6 subnet {net} overlaps segment {seg.name}")
        return net

    def _enable_ipv6(self, node: Node) -> None:
        netns.run(["ip", "netns", "exec", node.ns, "sysctl", "-q", "-w", *IPV6_ON_SYSCTLS])

    def _attach6(self, node: Node, seg: Segment, ifname: str) -> list[IPv6Address]:
        """`ifname`'s IPv6 address and routes on `seg` (none when it has no IPv6)."""
        if seg.subnet6 is None:
            return []
        addr = seg.allocate6()
        node.ip_batch([f"addr add {addr}/64 dev {ifname} nodad"] + [
            f"route replace {net} via {via} dev {ifname}"
            for net, via, announcer in seg.routes6 if announcer is not node
        ])
        return [addr]

    def _attach(self, node: Node, seg: Segment, ifname: str, ips: Sequence[IPv4Address]) -> None:
        if seg.subnet6 is not None:
            self._enable_ipv6(node)  # before the veth, which then starts with it
        port = f"p{seg.next_port}"
        seg.next_port += 1
        netns.run(
            ["ip", "-n", node.ns, "link", "add", ifname, "type", "veth",
             "peer", "name", port, "netns", seg.ns]
        )  # fmt: skip
        netns.run(["ip", "-n", seg.ns, "link", "set", port, "master", seg.bridge, "up"])
        cmds = [f"addr add {IPv4Interface((ip, seg.subnet_of(ip).prefixlen))} dev {ifname}"
                for ip in ips]  # fmt: skip
        cmds.append(f"link set {ifname} up")
        own_nets = {seg.subnet_of(ip) for ip in ips}
        # The other subnets of a flat segment are on-link too.
        cmds += [f"route replace {net} dev {ifname}" for net in seg.subnets if net not in own_nets]
        cmds += [
            f"route replace {net} via {via} dev {ifname}"
            for net, via, announcer in seg.routes
            if announcer is not node
        ]
        node.ip_batch(cmds)
        addresses6 = self._attach6(node, seg, ifname)
        node.interfaces.append(Interface(name=ifname, segment=seg, addresses=list(ips),
                                         addresses6=addresses6))
        seg.members.append((node, ifname))

    def attach(self, node: Node, seg: Segment, ifname: str) -> Interface:
        """A new interface `ifname` of `node` on `seg`, with an address of its own and the
        segment's routes but no default route (a laptop plugged into another network)."""
        self._require_open()
        self._attach(node, seg, ifname, self._addresses(seg, None))
        return node.interface(ifname)

    def _announce(self, seg: Segment, net: IPv4Network, via: IPv4Address, announcer: Node) -> None:
        seg.routes.append((net, via, announcer))
        for member, ifname in seg.members:
            if member is not announcer:
                member.ip_batch([f"route replace {net} via {via} dev {ifname}"])

    def _announce6(self, seg: Segment, net: IPv6Network, via: IPv6Address,
                   announcer: Node) -> None:
        seg.routes6.append((net, via, announcer))
        for member, ifname in seg.members:
            if member is not announcer:
                member.ip_batch([f"route replace {net} via {via} dev {ifname}"])

    def _addresses(self, seg: Segment, ips: Sequence[str | None] | None) -> list[IPv4Address]:
        if not ips:
            return [seg.allocate()]
        return [seg.allocate() if ip is None else seg.reserve(ip) for ip in ips]

    def _next_lan_subnet(self) -> IPv4Network:
        taken = [net for seg in self.segments for net in seg.subnets]
        while True:
            self._lan_index += 1
            if self._lan_index > 511:
                raise WorldError("no free LAN subnet left in 198.18.0.0/15")
            net = IPv4Network(f"198.{18 + self._lan_index // 256}.{self._lan_index % 256}.0/24")
            if not any(net.overlaps(t) for t in taken):
                return net

    # -- nodes -------------------------------------------------------------------------------

    def router(
        self,
        name: str,
        wan: Segment,
        wan_ip: str | None = None,
        lan_subnet: str | None = None,
        nat: NatMode = NatMode.MASQUERADE,
        firewall: bool = True,
        dnat_ports: Mapping[int, tuple[Node | str, int]] | None = None,
        delay_ms: Mapping[str, float] | None = None,
        loss_percent: Mapping[str, float] | None = None,
        ipv6_lan: str | None = None,
    ) -> Router:
        """A router between `wan` and a new LAN segment (`router.lan`).

        `wan` may be another router's LAN (carrier-grade / double NAT). `dnat_ports` maps a
        WAN UDP port to (LAN host or address, port); `Router.forward_port` adds more later,
        once the hosts exist. `ipv6_lan` (a /64 of 2001:db8::/32, on a `wan` with IPv6)
        gives the LAN global IPv6, routed and not NATed, behind the router's firewall.
        """
        self._require_open()
        lan6: IPv6Network | None = None
        if ipv6_lan is not None:
            if wan.subnet6 is None:
                raise WorldError(f"router {name}: an IPv6 LAN needs a WAN segment with IPv6")
            lan6 = self._check_subnet6(ipv6_lan)
        lan_net = IPv4Network(lan_subnet) if lan_subnet else self._next_lan_subnet()
        _check_space(lan_net, (LAN_SPACE,), "LAN subnet")
        for seg in self.segments:
            if any(lan_net.overlaps(other) for other in seg.subnets):
                raise WorldError(f"LAN subnet {lan_net} overlaps segment {seg.name}")
        node = self._make_node(Router, name)
        assert isinstance(node, Router)
        node.wan = wan
        netns.run(["ip", "netns", "exec", node.ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        if lan6 is not None:
            self._enable_ipv6(node)
            netns.run(["ip", "netns", "exec", node.ns, "sysctl", "-q", "-w",
                       "net.ipv6.conf.all.forwarding=1"])
        self._attach(node, wan, "wan0", self._addresses(wan, [wan_ip]))

        gateway = lan_net.network_address + 1
        lan = Segment(
            world=self, name=f"{name}-lan", ns=node.ns, bridge="lan0", subnets=[lan_net],
            gateway=gateway, router=node, used={gateway},
        )  # fmt: skip
        node.ip_batch([
            "link add lan0 type bridge mcast_snooping 0",
            f"addr add {IPv4Interface((gateway, lan_net.prefixlen))} dev lan0",
            "link set lan0 up",
        ])  # fmt: skip
        gateway6 = []
        if lan6 is not None:
            lan.subnet6 = lan6
            lan.gateway6 = lan6.network_address + 1
            lan.used6.add(lan.gateway6)
            gateway6 = [lan.gateway6]
            node.ip_batch([f"addr add {lan.gateway6}/64 dev lan0 nodad"])
        node.interfaces.append(Interface(name="lan0", segment=lan, addresses=[gateway],
                                         addresses6=gateway6))
        lan.members.append((node, "lan0"))
        node._lan = lan
        self.segments.append(lan)
        if wan.gateway is not None:
            node.ip_batch([f"route replace default via {wan.gateway} dev wan0"])
        if lan6 is not None and wan.gateway6 is not None:
            node.ip_batch([f"route replace ::/0 via {wan.gateway6} dev wan0"])

        node._rules = RouterRules(wan_if="wan0", lan_if="lan0", nat=nat, firewall=firewall,
                                  ipv6=lan6 is not None)
        for wan_port, (target, host_port) in (dnat_ports or {}).items():
            host_ip = target.address_on(lan) if isinstance(target, Node) else target
            node.rules.forwards.append(PortForward(wan_port, host_ip, host_port))
        if node.rules.forwards and nat is NatMode.NONE:
            raise WorldError(f"router {name}: port forwards need a NAT mode")
        node.load_rules()
        if nat is NatMode.NONE:
            self._announce(wan, lan_net, IPv4Address(node.wan_ip), node)
        if lan6 is not None:
            self._announce6(wan, lan6, IPv6Address(node.ip6), node)
        self._shape_at_creation(node, delay_ms, loss_percent)
        return node

    def host(
        self,
        name: str,
        lans: Sequence[Segment],
        ips: Sequence[str | None] | None = None,
        default_via: int | None = 0,
        delay_ms: Mapping[str, float] | None = None,
        loss_percent: Mapping[str, float] | None = None,
    ) -> Host:
        """A host with interface `eth<i>` on `lans[i]`, default route via `lans[default_via]`.

        `ips[i]` picks the address on `lans[i]` (None: automatic). On a segment without a
        router (the internet) the host is public and needs no default route.
        """
        if not lans:
            raise WorldError(f"host {name} needs at least one segment")
        if ips is not None and len(ips) != len(lans):
            raise WorldError(f"host {name}: give one address (or None) per segment")
        node = self._make_node(Host, name)
        assert isinstance(node, Host)
        for i, seg in enumerate(lans):
            ip = None if ips is None else ips[i]
            self._attach(node, seg, f"eth{i}", self._addresses(seg, [ip]))
        if default_via is not None:
            gw = lans[default_via].gateway
            if gw is not None:
                node.ip_batch([f"route replace default via {gw} dev eth{default_via}"])
            gw6 = lans[default_via].gateway6
            if gw6 is not None:
                node.ip_batch([f"route replace ::/0 via {gw6} dev eth{default_via}"])
        self._shape_at_creation(node, delay_ms, loss_percent)
        return node

    def server(
        self,
        name: str,
        segment: Segment,
        ips: Sequence[str] | None = None,
        delay_ms: Mapping[str, float] | None = None,
        loss_percent: Mapping[str, float] | None = None,
    ) -> Host:
        """A host on one segment with one or more addresses on `eth0` (e.g. STUN needs two)."""
        node = self._make_node(Host, name)
        assert isinstance(node, Host)
        self._attach(node, segment, "eth0", self._addresses(segment, list(ips or [])))
        if segment.gateway is not None:
            node.ip_batch([f"route replace default via {segment.gateway} dev eth0"])
        if segment.gateway6 is not None:
            node.ip_batch([f"route replace ::/0 via {segment.gateway6} dev eth0"])
        self._shape_at_creation(node, delay_ms, loss_percent)
        return node

    # -- shaping -----------------------------------------------------------------------------

    def _shape_at_creation(
        self,
        node: Node,
        delay_ms: Mapping[str, float] | None,
        loss_percent: Mapping[str, float] | None,
    ) -> None:
        for ifname, ms in (delay_ms or {}).items():
            self.set_delay(node, ifname, ms)
        for ifname, pct in (loss_percent or {}).items():
            self.set_loss(node, ifname, pct)

    def set_loss(
        self, node: Node, ifname: str, percent: float, direction: Direction = Direction.EGRESS
    ) -> None:
        """Drop `percent` % of the packets crossing `ifname` of `node` (0 removes the rule)."""
        if not 0 <= percent <= 100:
            raise WorldError(f"loss {percent} is not a percentage")
        node.interface(ifname)
        for side in direction.sides():
            if percent > 0:
                node.losses[(ifname, side)] = percent
            else:
                node.losses.pop((ifname, side), None)
        netns.run(
            ["ip", "netns", "exec", node.ns, "nft", "-f", "-"], input_text=loss_ruleset(node.losses)
        )

    def set_delay(
        self, node: Node, ifname: str, ms: float, direction: Direction = Direction.EGRESS,
        jitter_ms: float = 0.0, in_order: bool = False,
    ) -> None:
        """Hold every packet crossing `ifname` of `node` for `ms` milliseconds, plus a
        uniform random 0..`jitter_ms` (both 0 removes it). With jitter packets may
        overtake each other, as with netem, unless `in_order`.

        One delayer process per delayed side of a link, inside `node`'s namespace.
        """
        if ms < 0 or jitter_ms < 0:
            raise WorldError(f"delay {ms} ms (jitter {jitter_ms} ms) is negative")
        node.interface(ifname)
        for side in direction.sides():
            key = (node.name, ifname, side)
            old = self.delays.pop(key, None)
            if old is not None:
                self._remove_delay(node, old)
            if ms > 0 or jitter_ms > 0:
                self.delays[key] = self._start_delay(node, ifname, side, ms, jitter_ms,
                                                     in_order)

    def _start_delay(self, node: Node, ifname: str, side: Direction, ms: float,
                     jitter_ms: float = 0.0, in_order: bool = False) -> DelaySpec:
        queue = node.next_queue
        node.next_queue += 1
        log_path = self.dir / f"delayer-{node.name}-{ifname}-{side.value}.log"
        argv = [sys.executable, str(DELAYER_SCRIPT), "--queue", str(queue),
                "--delay-ms", str(ms)]  # fmt: skip
        if jitter_ms > 0:
            argv += ["--jitter-ms", str(jitter_ms)]
        if in_order:
            argv.append("--in-order")
        with open(log_path, "wb") as log:
            proc = self.spawn(
                netns.ns_argv(node.ns, argv), stdout=subprocess.PIPE, stderr=log,
            )  # fmt: skip
        assert proc.stdout is not None
        # The rule goes in only once the queue has a listener: without --queue-bypass a
        # listener-less queue drops packets.
        ready, _, _ = select.select([proc.stdout], [], [], 10.0)
        line = proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            netns.terminate(proc, self.grace)
            raise WorldError(
                f"delayer for {node.name}:{ifname} did not start: {log_path.read_text()[-2000:]}"
            )
        spec = DelaySpec(
            node=node.name, ifname=ifname, direction=side, delay_ms=ms, queue=queue,
            rules=delay_rules(ifname, side, queue), pid=proc.pid, jitter_ms=jitter_ms,
            in_order=in_order,
        )  # fmt: skip
        for rule in spec.rules:
            netns.run(["ip", "netns", "exec", node.ns, *iptables_argv("-A", rule)])
        return spec

    def _remove_delay(self, node: Node, spec: DelaySpec) -> None:
        # Rules first, so no packet is queued to a delayer that is going away.
        for rule in spec.rules:
            netns.run(["ip", "netns", "exec", node.ns, *iptables_argv("-D", rule)], check=False)
        for proc in self.procs:
            if proc.pid == spec.pid:
                netns.terminate(proc, self.grace)

    def check(self) -> None:
        """Raise if a delayer died: its link now drops everything (no --queue-bypass)."""
        dead = []
        for spec in self.delays.values():
            for proc in self.procs:
                if proc.pid == spec.pid and proc.poll() is not None:
                    dead.append(
                        f"{spec.node}:{spec.ifname} ({spec.direction.value}, "
                        f"exit {proc.returncode})"
                    )
        if dead:
            raise WorldError("delayer died, its link drops all packets: " + ", ".join(dead))

    # -- processes ---------------------------------------------------------------------------

    def spawn(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        text: bool = False,
    ) -> subprocess.Popen[Any]:
        """Start a tracked process (argv already wrapped for its namespace)."""
        with self._lock:
            if self.closed:
                raise WorldError("the world is closed")
            proc = subprocess.Popen(
                list(argv), env=env, stdin=stdin, stdout=stdout, stderr=stderr, text=text,
                start_new_session=True,
            )  # fmt: skip
            self.procs.append(proc)
            return proc

    def _terminate_all(self) -> None:
        procs = [p for p in self.procs if p.poll() is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            netns.terminate(proc, grace=0.5)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()

    # -- teardown ----------------------------------------------------------------------------

    def leftovers(self) -> list[str]:
        """Namespaces of this run that still exist."""
        return netns.list_namespaces(self.prefix)

    def close(self) -> None:
        """Tear everything down in reverse order; safe to call again and after failures."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        errors: list[str] = []
        try:
            self._terminate_all()
        except Exception as exc:  # keep going: namespaces must go whatever happened
            errors.append(f"processes: {exc!r}")
        for ns in reversed(self.namespaces):
            try:
                netns.delete_namespace(ns)
            except Exception as exc:
                errors.append(f"{ns}: {exc!r}")
        # The sweep by run id catches anything not (or not yet) recorded.
        for ns in netns.list_namespaces(self.prefix):
            netns.delete_namespace(ns)
        shutil.rmtree(self.dir, ignore_errors=True)
        atexit.unregister(self.close)
        if self._prev_sigterm is not None and signal.getsignal(signal.SIGTERM) is _on_sigterm:
            with contextlib.suppress(ValueError):  # not the main thread
                signal.signal(signal.SIGTERM, self._prev_sigterm)
        left = self.leftovers()
        if left:
            raise WorldError(f"namespaces left after close: {left} ({'; '.join(errors)})")

    def __enter__(self) -> World:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
