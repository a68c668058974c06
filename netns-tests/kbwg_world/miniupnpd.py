"""miniupnpd (Debian `miniupnpd-nftables`) on a world router: UPnP IGD, NAT-PMP and PCP
for its LAN, in the router's namespace.

    with MiniUpnpd.start(router, stun) as upnpd:    # stun: an RFC 5780 StunServer
        ...
        upnpd.udp_mappings()                         # what it has mapped (its nft chain)

miniupnpd refuses to map while its external address is reserved (every test range is)
unless its own STUN test (`ext_perform_stun`, against an RFC 5780 server) finds the
router unfiltered (DESIGN, measured facts). So `start` also, in the router's own tables:
exempts the router's own packets from masquerading (only the LAN is NATed) and accepts
UDP from the STUN server's addresses on the WAN; and creates the chains miniupnpd fills,
in `table inet filter` (its defaults, as /etc/miniupnpd/nft_init.sh lays them out):
`miniupnpd` jumped to from a forward hook, `prerouting_miniupnpd` and
`postrouting_miniupnpd` from nat hooks. The router's drop policy in `kbwg_fw` still
applies; it accepts DNATed flows (`ct status dnat`), which is what mappings are.

Its config, pid and lease files live in a temporary folder of the world's directory.
`stop` (also on leaving the `with` block, and the world's close in any case) ends the
process, removes the table and the rules it added and the folder: every exit path.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from kbwg_world.stunserver import StunServer
from kbwg_world.world import LAN_SPACE, Router

BINARY = "/usr/sbin/miniupnpd"
TABLE = "filter"

_NFT_TABLE = f"""table inet {TABLE} {{
  chain forward {{
    type filter hook forward priority 0; policy accept;
    jump miniupnpd
  }}
  chain miniupnpd {{
  }}
  chain prerouting {{
    type nat hook prerouting priority -100; policy accept;
    jump prerouting_miniupnpd
  }}
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    jump postrouting_miniupnpd
  }}
  chain prerouting_miniupnpd {{
  }}
  chain postrouting_miniupnpd {{
  }}
}}
"""
# How nft lists its UDP redirects: `iif "wan0" @nh,72,8 0x11 th dport 51820 dnat ip to
# 198.18.1.10:51820` (0x11: the IPv4 protocol field says UDP).
_DNAT_RE = re.compile(
    r"(?:@nh,72,8 0x11 th|udp) dport (\d+) dnat (?:ip )?to ([\d.]+):(\d+)")


def render_config(router: Router, stun: StunServer, *, upnp: bool, natpmp: bool,
                  pcp: bool, workdir: Path) -> str:
    """miniupnpd.conf: secure mode, and mappings only from the world's LANs to
    unprivileged ports."""
    if natpmp != pcp:
        # miniupnpd serves NAT-PMP and PCP on one port with one switch (enable_natpmp;
        # Debian's build knows no enable_pcp_pmp): there is no PCP without NAT-PMP.
        raise ValueError("miniupnpd enables PCP and NAT-PMP together")
    stun_ip, _, stun_port = stun.address.rpartition(":")
    yes = {True: "yes", False: "no"}
    return "\n".join([
        "ext_ifname=wan0",
        "listening_ip=lan0",
        "port=0",
        f"enable_upnp={yes[upnp]}",
        f"enable_natpmp={yes[natpmp]}",
        "secure_mode=yes",
        "system_uptime=yes",
        "notify_interval=60",
        "clean_ruleset_interval=600",
        "min_lifetime=120",
        "max_lifetime=86400",
        f"uuid={uuid.uuid4()}",
        "ext_perform_stun=yes",
        f"ext_stun_host={stun_ip}",
        f"ext_stun_port={stun_port}",
        f"upnp_table_name={TABLE}",
        f"upnp_nat_table_name={TABLE}",
        "upnp_forward_chain=miniupnpd",
        "upnp_nat_chain=prerouting_miniupnpd",
        "upnp_nat_postrouting_chain=postrouting_miniupnpd",
        f"lease_file={workdir / 'leases'}",
        f"allow 1024-65535 {LAN_SPACE} 1024-65535",
        "deny 0-65535 0.0.0.0/0 0-65535",
    ]) + "\n"


@dataclass
class MiniUpnpd:
    router: Router
    workdir: Path
    proc: subprocess.Popen[Any] | None = None
    log_path: Path = field(init=False)
    _rule_handles: list[tuple[str, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / "miniupnpd.log"

    @classmethod
    def start(cls, router: Router, stun: StunServer, *, upnp: bool = True,
              natpmp: bool = True, pcp: bool = True, timeout: float = 20.0) -> MiniUpnpd:
        """Start miniupnpd on `router` and wait until its STUN test passed and it
        listens; `stun` must have RFC 5780 (two addresses)."""
        if not stun.rfc5780:
            raise ValueError("miniupnpd's STUN test needs an RFC 5780 server (two addresses)")
        workdir = Path(tempfile.mkdtemp(prefix=f"miniupnpd-{router.name}-",
                                        dir=router.world.dir))
        daemon = cls(router, workdir)
        try:
            daemon._prepare_router(stun)
            conf = workdir / "miniupnpd.conf"
            conf.write_text(render_config(router, stun, upnp=upnp, natpmp=natpmp, pcp=pcp,
                                          workdir=workdir))
            with open(daemon.log_path, "wb") as log:
                daemon.proc = router.popen(
                    [BINARY, "-d", "-f", str(conf), "-P", str(workdir / "miniupnpd.pid")],
                    stdout=log, stderr=subprocess.STDOUT)
            daemon._wait_ready(timeout, upnp=upnp, natpmp=natpmp)
        except BaseException:
            daemon.stop()
            raise
        return daemon

    def _nft(self, *args: str, input_text: str | None = None) -> str:
        return self.router.run(["nft", *args], input=input_text).stdout

    def _insert(self, table: str, chain: str, rule: str) -> None:
        out = self._nft("--echo", "--handle", "insert", "rule", "ip", table, chain, *rule.split())
        handle = re.search(r"# handle (\d+)", out)
        if handle:
            self._rule_handles.append((table, chain, handle.group(1)))

    def _prepare_router(self, stun: StunServer) -> None:
        router = self.router
        # Only the LAN is NATed: the router's own STUN test must see its real address.
        self._insert("kbwg_nat", "postrouting", f"ip saddr {router.wan_ip} accept")
        sources = ", ".join(stun.ips)
        if router.rules.firewall:
            # The STUN test's answers from the server's other address and port.
            self._insert("kbwg_fw", "input",
                         f"iifname wan0 ip saddr {{ {sources} }} udp sport != 0 accept")
        self._nft("-f", "-", input_text=_NFT_TABLE)

    def _wait_ready(self, timeout: float, *, upnp: bool, natpmp: bool) -> None:
        deadline = time.monotonic() + timeout
        wanted = []
        if upnp:
            wanted.append("HTTP listening on port")
        if natpmp:
            wanted.append("Listening for NAT-PMP/PCP traffic on port")
        while True:
            log = self.log()
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"miniupnpd exited with {self.proc.returncode}:\n{log}")
            if "does not support port forwarding" in log or "firewall filters" in log:
                raise RuntimeError(f"miniupnpd's STUN test found the router filtered:\n{log}")
            if all(w in log for w in wanted) and "does not block incoming" in log:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"miniupnpd not ready within {timeout}s:\n{log}")
            time.sleep(0.1)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def udp_mappings(self) -> list[tuple[int, str, int]]:
        """(external port, internal IP, internal port) of each UDP mapping, read from its
        nft chain (the rules are what forwards packets, whatever its lease file says)."""
        out = self._nft("list", "chain", "inet", TABLE, "prerouting_miniupnpd")
        return [(int(m[1]), m[2], int(m[3])) for m in _DNAT_RE.finditer(out)]

    def stop(self) -> None:
        """Stop miniupnpd (it removes its own rules), then what `start` added."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        with contextlib.suppress(Exception):
            self._nft("delete", "table", "inet", TABLE)
        for table, chain, handle in reversed(self._rule_handles):
            with contextlib.suppress(Exception):
                self._nft("delete", "rule", "ip", table, chain, "handle", handle)
        self._rule_handles.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> MiniUpnpd:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
