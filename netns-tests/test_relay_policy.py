"""The relay's peer policy, seen from outside: coturn's test client, through our relay,
cannot reach the relay host's private network unless the operator allows it.

The relay host is a router: its WAN address is on the internet, its LAN address
(198.18.x.1) is its private network. turnutils_peer echoes on that LAN address, and
turnutils_uclient on the internet asks the relay to reach it.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from ipaddress import IPv4Network, ip_network

import pytest

from kbwg_testing import wait_until
from kbwg_world import NatMode, Node, World
from kbwg_world.turnserver import AGENT, TurnServer

SECRET = "policy-secret"
RELAY_IP = "203.0.113.5"
RELAY_PORT = 3478
PEER_PORT = 3480

pytestmark = pytest.mark.skipif(
    shutil.which("turnutils_uclient") is None or shutil.which("turnutils_peer") is None,
    reason="coturn's test tools are not installed")


def start_our_relay(node: Node, allow: list[str]) -> TurnServer:
    base = node.world.dir / f"policy-relay-{node.name}"
    secret_file = base.with_suffix(".secret")
    secret_file.write_text(SECRET + "\n")
    log_path = base.with_suffix(".log")
    argv = [str(AGENT), "relay", "--listen", f"{RELAY_IP}:{RELAY_PORT}", "--secret-file",
            str(secret_file), "--stats-interval", "0"]
    for network in allow:
        argv += ["--allow-peer", network]
    with open(log_path, "wb") as log:
        proc = node.popen(argv, stdout=log, stderr=subprocess.STDOUT)
    server = TurnServer("kbwg", node, proc, RELAY_IP, RELAY_PORT, SECRET, log_path)
    server.wait_ready()
    return server


def start_echo_peer(node: Node, ip: str) -> None:
    node.popen(["turnutils_peer", "-L", ip, "-p", str(PEER_PORT)],
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def listening() -> bool:
        sockets = node.run(["ss", "-Hlun", f"src {ip}:{PEER_PORT}"], check=False)
        return f"{ip}:{PEER_PORT}" in sockets.stdout

    wait_until(listening, timeout=10, what="turnutils_peer to listen")


def stop_and_read_counters(relay: TurnServer) -> str:
    relay.proc.send_signal(signal.SIGINT)
    relay.proc.wait(timeout=10)
    log = relay.log()
    assert relay.proc.returncode == 0, log
    assert "counters (exit)" in log, log
    return log


@pytest.mark.timeout(120)
@pytest.mark.parametrize("allowed", [False, True], ids=["default", "allow-peer"])
def test_turnutils_through_our_relay_to_the_relay_hosts_private_address(
        world: World, allowed: bool) -> None:
    inet = world.internet()
    relay_host = world.router("relayhost", wan=inet, wan_ip=RELAY_IP, nat=NatMode.MASQUERADE,
                              firewall=False)
    private = relay_host.lan_ip
    private_net: IPv4Network = relay_host.lan.subnet
    client = world.server("client", inet, ips=["203.0.113.20"])
    start_echo_peer(relay_host, private)
    relay = start_our_relay(relay_host, [str(private_net)] if allowed else [])

    result = client.run(
        ["turnutils_uclient", "-n", "20", "-m", "2", "-l", "400", "-z", "5", "-u", "alice",
         "-W", SECRET, "-e", private, "-r", str(PEER_PORT), "-p", str(RELAY_PORT),
         RELAY_IP], check=False, timeout=60)  # fmt: skip
    output = result.stdout + result.stderr
    log = stop_and_read_counters(relay)
    totals = re.findall(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)", output)
    if allowed:
        assert result.returncode == 0, output
        assert totals, output
        sent, received = map(int, totals[-1])
        assert sent >= 40 and received == sent, output
        assert '"to_peer_packets"' in log and '"peer_forbidden"' not in log, log
    else:
        assert result.returncode != 0, output
        assert "403" in output, output
        assert all(int(received) == 0 for _, received in totals), output
        assert re.search(r'"peer_forbidden": [1-9]', log), log
        assert '"to_peer_packets"' not in log and '"to_client_packets"' not in log, log


def test_the_relay_reads_its_hosts_addresses_in_its_namespace(world: World) -> None:
    inet = world.internet()
    relay_host = world.router("relayhost", wan=inet, wan_ip=RELAY_IP, firewall=False)
    result = relay_host.run([sys.executable, "-c",
                             "from kbwg.relay.hostaddrs import read_host_networks\n"
                             "print(*read_host_networks())"])
    networks = {ip_network(text) for text in result.stdout.split()}
    assert ip_network(f"{RELAY_IP}/32") in networks, result.stdout
    assert ip_network(f"{relay_host.lan_ip}/32") in networks, result.stdout
    # Not the host this test runs on: the relay sees only its own namespace.
    assert all(n.version == 6 or n.subnet_of(ip_network("127.0.0.0/8"))  # type: ignore[arg-type]
               or n in {ip_network(f"{RELAY_IP}/32"), ip_network(f"{relay_host.lan_ip}/32")}
               for n in networks), result.stdout
