"""Tests of the netns world builder itself: every feature the scenario tests rely on."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kbwg_world import (
    Direction,
    NatMode,
    UdpPeer,
    WaitTimeout,
    World,
    WorldError,
    sweep,
    wait_until,
)
from kbwg_world.netns import list_namespaces

pytestmark = pytest.mark.netns

HERE = Path(__file__).resolve().parent


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# -- LAN and NAT behaviour --------------------------------------------------------------------


def test_lan_hosts_reach_each_other_across_firewalled_router_bridge(world: World) -> None:
    inet = world.internet()
    router = world.router("r", inet, nat=NatMode.MASQUERADE, firewall=True)
    a = world.host("a", [router.lan])
    b = world.host("b", [router.lan])

    assert a.ping(b.ip, count=2, interval=0.05).received == 2
    peer_b = UdpPeer.start(b, 5000)
    UdpPeer.start(a, 5001).send(b.ip, 5000, "on the lan")
    assert peer_b.expect().src == (a.ip, 5001)

    # The test above only means something if the forward chain really drops by default and
    # would see bridged frames with bridge netfilter on (DESIGN): check both.
    assert "policy drop" in router.run(["nft", "list", "chain", "ip", "kbwg_fw", "forward"]).stdout
    router.run(["sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=1"])
    assert not a.ping(b.ip, timeout=0.3).ok


def test_masquerade_preserves_port_and_maps_endpoint_independently(world: World) -> None:
    inet = world.internet()
    stun = world.server("stun", inet, ips=["203.0.113.2", "203.0.113.3"])
    router = world.router("r", inet, nat=NatMode.MASQUERADE)
    host = world.host("h", [router.lan])
    first = UdpPeer.start(stun, 3478, bind="203.0.113.2", echo=True)
    second = UdpPeer.start(stun, 3478, bind="203.0.113.3")

    client = UdpPeer.start(host, 40000)
    client.send("203.0.113.2", 3478, "one")
    client.send("203.0.113.3", 3478, "two")

    assert first.expect().src == (router.wan_ip, 40000)
    assert second.expect().src == (router.wan_ip, 40000)
    assert client.expect().data == f"seen {router.wan_ip}:40000"


@pytest.mark.parametrize("nat", [NatMode.MASQUERADE_RANDOM, NatMode.FULLY_RANDOM])
def test_random_masquerade_maps_per_destination(world: World, nat: NatMode) -> None:
    inet = world.internet()
    stun = world.server("stun", inet, ips=["203.0.113.2", "203.0.113.3"])
    router = world.router("r", inet, nat=nat)
    host = world.host("h", [router.lan])
    first = UdpPeer.start(stun, 3478, bind="203.0.113.2")
    second = UdpPeer.start(stun, 3478, bind="203.0.113.3")

    client = UdpPeer.start(host, 40000)
    client.send("203.0.113.2", 3478)
    client.send("203.0.113.3", 3478)

    seen_first, seen_second = first.expect(), second.expect()
    assert seen_first.src_ip == seen_second.src_ip == router.wan_ip
    assert seen_first.src_port != seen_second.src_port


def test_firewall_drops_unsolicited_inbound_and_keeps_the_mapping(world: World) -> None:
    inet = world.internet()
    peer = world.server("peer", inet)
    router = world.router("r", inet, nat=NatMode.MASQUERADE)
    host = world.host("h", [router.lan])
    remote = UdpPeer.start(peer, 5000)
    local = UdpPeer.start(host, 40000)

    remote.send(router.wan_ip, 40000, "unsolicited")
    assert local.recv(timeout=0.5) is None

    # The early packet must not have left state that makes the NAT remap port 40000.
    local.send(peer.ip, 5000, "out")
    assert remote.expect().src == (router.wan_ip, 40000)
    remote.send(router.wan_ip, 40000, "answer")
    assert local.expect().data == "answer"


def test_static_dnat_forwards_inbound_port(world: World) -> None:
    inet = world.internet()
    peer = world.server("peer", inet)
    router = world.router(
        "r", inet, nat=NatMode.STATIC_DNAT, lan_subnet="198.18.7.0/24",
        dnat_ports={51820: ("198.18.7.20", 51820)},
    )  # fmt: skip
    host = world.host("h", [router.lan], ips=["198.18.7.20"])
    router.forward_port(6000, host, 6001)
    forwarded = UdpPeer.start(host, 51820)
    forwarded_other = UdpPeer.start(host, 6001)
    closed = UdpPeer.start(host, 51821)
    remote = UdpPeer.start(peer, 5000)

    remote.send(router.wan_ip, 51820, "in")
    assert forwarded.expect().src == (peer.ip, 5000)
    remote.send(router.wan_ip, 6000, "in too")
    assert forwarded_other.expect().data == "in too"
    remote.send(router.wan_ip, 51821, "not forwarded")
    assert closed.recv(timeout=0.5) is None


def test_double_nat_reaches_the_internet(world: World) -> None:
    inet = world.internet()
    server = world.server("srv", inet)
    carrier = world.router("cgnat", inet, nat=NatMode.MASQUERADE)
    home = world.router("home", carrier.lan, nat=NatMode.MASQUERADE)
    host = world.host("h", [home.lan])
    echo = UdpPeer.start(server, 3478, echo=True)

    assert host.ping(server.ip).ok
    client = UdpPeer.start(host, 40000)
    client.send(server.ip, 3478)
    # Both NATs preserve the port; the outside sees the carrier's address.
    assert echo.expect().src == (carrier.wan_ip, 40000)
    assert client.expect().data == f"seen {carrier.wan_ip}:40000"


def test_nat_none_routes_the_lan_from_the_internet(world: World) -> None:
    inet = world.internet()
    early = world.server("early", inet)
    router = world.router("r", inet, nat=NatMode.NONE, firewall=False)
    host = world.host("h", [router.lan])
    late = world.server("late", inet)  # attached after the announcement: gets the route too

    assert early.ping(host.ip).ok
    assert late.ping(host.ip).ok
    listener = UdpPeer.start(late, 5000)
    UdpPeer.start(host, 40000).send(late.ip, 5000)
    assert listener.expect().src == (host.ip, 40000)


def test_multihomed_host_leaves_by_default_or_pinned_uplink(world: World) -> None:
    inet = world.internet()
    server = world.server("srv", inet)
    first = world.router("r1", inet)
    second = world.router("r2", inet)
    host = world.host("h", [first.lan, second.lan])
    listener = UdpPeer.start(server, 5000)
    client = UdpPeer.start(host, 40000)

    def tx() -> tuple[int, int]:
        return host.link_stats("eth0").tx_packets, host.link_stats("eth1").tx_packets

    before = tx()
    assert host.ping(server.ip, count=10, interval=0.01).received == 10
    after = tx()
    assert after[0] - before[0] >= 10
    assert after[1] - before[1] <= 2
    client.send(server.ip, 5000)
    assert listener.expect().src_ip == first.wan_ip

    host.add_route(f"{server.ip}/32", via=second.lan_ip, dev="eth1")
    before = tx()
    assert host.ping(server.ip, count=10, interval=0.01).received == 10
    after = tx()
    assert after[1] - before[1] >= 10
    assert after[0] - before[0] <= 2
    client.send(server.ip, 5000)
    assert listener.expect().src_ip == second.wan_ip


# -- shaping ----------------------------------------------------------------------------------


def test_delay_adds_latency_and_can_be_removed(world: World) -> None:
    inet = world.internet()
    server = world.server("srv", inet)
    router = world.router("r", inet)
    host = world.host("h", [router.lan], delay_ms={"eth0": 40})

    rtts = host.ping(server.ip, count=8, interval=0.05).rtts_ms
    assert len(rtts) == 8
    assert min(rtts) >= 40.0
    assert statistics.mean(rtts) < 60.0

    world.set_delay(host, "eth0", 40, Direction.BOTH)
    assert min(host.ping(server.ip, count=3, interval=0.05).rtts_ms) >= 80.0

    world.set_delay(host, "eth0", 0, Direction.BOTH)
    assert max(host.ping(server.ip, count=3, interval=0.05).rtts_ms) < 20.0
    assert not world.delays
    assert "NFQUEUE" not in host.run(["iptables-save"]).stdout


def test_delayers_keep_order_and_lose_nothing(world: World) -> None:
    # Forwarded egress and ingress: a burst from a *local* sender on a delayed egress would
    # instead hit the sender's socket buffer (the queued packets stay charged to it).
    inet = world.internet()
    server = world.server("srv", inet)
    router = world.router("r", inet, delay_ms={"wan0": 10})
    world.set_delay(server, "eth0", 10, Direction.INGRESS)
    host = world.host("h", [router.lan])
    listener = UdpPeer.start(server, 5000)
    sender = UdpPeer.start(host, 40000)

    # 200, not more: the delayers share the machine's two cores with whatever else the
    # suite runs, and a larger burst can overflow a queue there, which is load, not order.
    for i in range(200):
        sender.send(server.ip, 5000, str(i))
    received = []
    while (dgram := listener.recv(timeout=1.0)) is not None:
        received.append(int(dgram.data))
    assert received == list(range(200))


def test_loss_all_none_and_half(world: World) -> None:
    inet = world.internet()
    server = world.server("srv", inet)
    host = world.server("h", inet, loss_percent={"eth0": 100})

    assert host.ping(server.ip, count=3, interval=0.02, timeout=0.3).received == 0
    world.set_loss(host, "eth0", 0)
    assert host.ping(server.ip, count=30, interval=0.005).received == 30
    world.set_loss(host, "eth0", 50)
    # Binomial(200, 0.5): outside 60..140 has odds far below 1e-8.
    assert 60 <= host.ping(server.ip, count=200, interval=0.002).received <= 140

    # Ingress loss lets requests out but eats the replies.
    world.set_loss(host, "eth0", 0)
    world.set_loss(host, "eth0", 100, Direction.INGRESS)
    listener = UdpPeer.start(server, 5000, echo=True)
    client = UdpPeer.start(host, 40000)
    client.send(server.ip, 5000)
    assert listener.expect().src == (host.ip, 40000)
    assert client.recv(timeout=0.5) is None


def test_dead_delayer_is_reported(world: World) -> None:
    inet = world.internet()
    host = world.server("h", inet, delay_ms={"eth0": 5})
    (spec,) = world.delays.values()
    (proc,) = [p for p in world.procs if p.pid == spec.pid]
    world.check()
    os.kill(spec.pid, signal.SIGKILL)
    wait_until(lambda: proc.poll() is not None, timeout=2, what="the delayer to die")
    with pytest.raises(WorldError, match=r"delayer died.*h:eth0"):
        world.check()
    world.set_delay(host, "eth0", 0)  # so the fixture's own check passes


# -- nodes, hygiene, helpers --------------------------------------------------------------------


def test_private_wireguard_run_dir_per_node(world: World) -> None:
    inet = world.internet()
    a = world.server("a", inet)
    b = world.server("b", inet)
    a.run(["sh", "-c", "echo a > /run/wireguard/wg0.sock"])
    assert "wg0.sock" in a.run(["ls", "/run/wireguard"]).stdout
    assert "wg0.sock" not in b.run(["ls", "/run/wireguard"]).stdout
    assert not Path("/run/wireguard/wg0.sock").exists()


def test_addresses_and_extra_subnet(world: World) -> None:
    inet = world.internet(extra_subnets=["198.51.100.0/24"])
    stun = world.server("stun", inet, ips=["203.0.113.2", "198.51.100.2"])
    client = world.server("c", inet)
    assert stun.addresses == ["203.0.113.2", "198.51.100.2"]
    assert client.ping("198.51.100.2").ok  # the extra subnet is on-link for everyone
    assert "198.51.100.2/24" in stun.run(["ip", "-o", "addr", "show", "dev", "eth0"]).stdout


def test_address_hygiene_and_partial_build(world: World) -> None:
    with pytest.raises(WorldError, match="outside the allowed"):
        world.internet("10.0.0.0/24")
    inet = world.internet()
    with pytest.raises(WorldError, match="outside the allowed"):
        world.router("r", inet, lan_subnet="192.168.1.0/24")
    world.server("a", inet, ips=["203.0.113.5"])
    with pytest.raises(WorldError, match="already used"):
        world.server("b", inet, ips=["203.0.113.5"])
    # The half-built node "b" has a namespace: the fixture asserts that close removes it.
    assert world.prefix + "b" in list_namespaces(world.prefix)


def test_wait_until_returns_value_or_explains_timeout() -> None:
    assert wait_until(lambda: 7, timeout=0.1) == 7
    with pytest.raises(WaitTimeout, match="the impossible"):
        wait_until(lambda: False, timeout=0.1, what="the impossible")


# -- cleanup ------------------------------------------------------------------------------------


def test_close_removes_namespaces_processes_and_is_idempotent() -> None:
    w = World()
    inet = w.internet()
    host = w.server("h", inet, delay_ms={"eth0": 10})
    sleeper = host.popen(["sleep", "300"])
    delayer_pids = [spec.pid for spec in w.delays.values()]
    assert len(list_namespaces(w.prefix)) == 2

    w.close()
    assert list_namespaces(w.prefix) == []
    assert sleeper.poll() is not None
    assert all(_pid_gone(pid) for pid in delayer_pids)
    assert not w.dir.exists()
    w.close()
    with pytest.raises(WorldError, match="closed"):
        w.internet()


def test_exception_inside_with_still_cleans_up() -> None:
    with pytest.raises(RuntimeError, match="boom"), World() as w:
        w.router("r", w.internet())
        raise RuntimeError("boom")
    assert list_namespaces(w.prefix) == []


def test_sweep_removes_a_crashed_runs_namespaces() -> None:
    w = World()
    w.server("s", w.internet())
    removed = sweep(w.prefix)  # as if the process owning `w` had died
    assert sorted(removed) == sorted(w.namespaces)
    assert list_namespaces(w.prefix) == []
    w.close()  # tolerates namespaces that are already gone


def test_sigterm_cleans_up_a_world_owning_process() -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(HERE)!r})
        from kbwg_world import World
        w = World()
        w.server("s", w.internet(), delay_ms={{"eth0": 5}})
        print(w.prefix, flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    prefix = ""
    try:
        assert proc.stdout is not None
        prefix = proc.stdout.readline().strip()
        assert len(list_namespaces(prefix)) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 128 + signal.SIGTERM
        assert list_namespaces(prefix) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if prefix:
            sweep(prefix)
