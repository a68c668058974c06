"""What the device owner refuses (kbwg.owner.guard), the root-owned policy file, the
owner's start-up hardening and its import set. In-process with the test fakes, apart
from the tests that start `python -I` themselves. Runs as root (the policy file tests
chown a file to nobody)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import subprocess
import sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from nacl.public import PrivateKey
from owner_fakes import UPLINK, UPLINK_GATEWAY, FakeNetConfig, MemoryBackend

from kbwg.owner import tools, wg_userspace
from kbwg.owner.frames import encode_frame, read_frame
from kbwg.owner.netconfig import Egress, MainRoute, choose_egress
from kbwg.owner.policy import OwnerPolicy, PolicyError, load_policy
from kbwg.owner.server import OwnerServer
from kbwg.owner.wg_backend import BackendError
from kbwg.owner.wg_userspace import UserspaceBackend

PEER_ENDPOINT = "198.18.0.2"
NOBODY = 65534


def _key() -> str:
    return base64.b64encode(bytes(PrivateKey.generate())).decode()


def _pub() -> str:
    return base64.b64encode(bytes(PrivateKey.generate().public_key)).decode()


class Owner:
    """An OwnerServer in-process, driven frame by frame."""

    def __init__(self, net: FakeNetConfig | None = None,
                 policy: OwnerPolicy | None = None) -> None:
        self.net = net or FakeNetConfig()
        self.server = OwnerServer(self.net, lambda _name: MemoryBackend(),
                                  policy or OwnerPolicy(), _no_raw_stun)
        self.next_id = 1

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        rid, self.next_id = self.next_id, self.next_id + 1
        reply = await self.server.handle({"id": rid, "op": op, **args})
        assert reply["id"] == rid
        return reply

    async def create(self, **change: Any) -> dict[str, Any]:
        args = {"ifname": "kbwg0", "private_key": _key(), "listen_port": 0,
                "address": "100.64.0.1/10", "backend": "auto", **change}  # fmt: skip
        return await self.call("create", **args)

    async def device_with_peer(self, endpoint: str = f"{PEER_ENDPOINT}:51820") -> str:
        assert (await self.create())["ok"]
        pub = _pub()
        reply = await self.call("set_peer", public_key=pub, endpoint=endpoint,
                                allowed_ips=["100.64.0.2/32"], keepalive=25)
        assert reply["ok"], reply
        return pub

    async def refusals(self) -> dict[str, int]:
        stats = await self.call("stats")
        return dict(stats["refusals"])


def _no_raw_stun(port: int, callback: Any) -> Any:
    raise AssertionError("no raw STUN socket in these tests")


def assert_refused(reply: dict[str, Any], needle: str) -> None:
    assert reply["ok"] is False, reply
    assert reply["error"].startswith("refused: "), reply
    assert needle in reply["error"], reply


# -- create -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "key", "needle"),
    [
        ({"ifname": "eth0"}, "interface_name", "kbwg<N>"),
        ({"ifname": "kbt1234abcd"}, "interface_name", "kbwg<N>"),
        ({"ifname": "kbwg"}, "interface_name", "kbwg<N>"),
        ({"ifname": "kbwg0x"}, "interface_name", "kbwg<N>"),
        ({"listen_port": 53}, "listen_port", "below 1024"),
        ({"listen_port": 1023}, "listen_port", "below 1024"),
        # The example: the whole IPv4 space as the overlay.
        ({"address": "8.8.8.8/0"}, "overlay", "wider than /10"),
        ({"address": "100.64.0.1/9"}, "overlay", "wider than /10"),
        ({"address": "192.168.1.1/32"}, "overlay", "not inside the locally allowed"),
        ({"address": "10.0.0.1/24"}, "overlay", "not inside the locally allowed"),
        ({"address": "2001:db8::1/64"}, "overlay", "not IPv4"),
        ({"address": "100.64.0.0/10"}, "address", "network or broadcast"),
        ({"address": "100.127.255.255/10"}, "address", "network or broadcast"),
    ],
)
async def test_create_refusals(change: dict[str, Any], key: str, needle: str,
                               caplog: pytest.LogCaptureFixture) -> None:
    owner = Owner()
    with caplog.at_level(logging.WARNING, logger="kbwg.owner.server"):
        assert_refused(await owner.create(**change), needle)
    assert owner.server.state.backend is None and owner.net.addresses == {}
    assert await owner.refusals() == {key: 1}
    assert any(r.levelno == logging.WARNING and "refused create" in r.getMessage()
               and key in r.getMessage() for r in caplog.records)
    # The refusal left nothing behind: a good create works.
    assert (await owner.create())["ok"]


async def test_create_refuses_an_overlay_over_an_existing_route() -> None:
    owner = Owner(FakeNetConfig(routes=[IPv4Network("198.18.0.0/24"),
                                        IPv4Network("100.64.8.0/24")]))
    assert_refused(await owner.create(), "overlaps the host's existing route to 100.64.8.0/24")
    assert await owner.refusals() == {"overlay": 1}
    assert (await owner.create(address="100.65.0.1/16"))["ok"]


async def test_create_refuses_outside_a_narrower_local_policy() -> None:
    owner = Owner(policy=OwnerPolicy(overlay=IPv4Network("100.100.0.0/16")))
    assert_refused(await owner.create(), "not inside the locally allowed overlay 100.100")
    assert (await owner.create(address="100.100.3.4/24"))["ok"]


async def test_create_accepts_the_port_the_backend_picks() -> None:
    owner = Owner()
    created = await owner.create(listen_port=0)
    assert created["ok"] and created["listen_port"] == 51820
    assert await owner.refusals() == {}


# -- set_address --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "key", "needle"),
    [
        ("192.168.1.1/32", "overlay", "not inside the locally allowed"),
        ("8.8.8.8/0", "overlay", "wider than /10"),
        ("100.64.0.1/8", "overlay", "wider than /10"),
        ("100.65.0.1/16", "overlay_change", "not in the device's overlay 100.64.0.0/10"),
        ("100.64.0.0/10", "address", "network or broadcast"),
    ],
)
async def test_set_address_refusals(address: str, key: str, needle: str) -> None:
    owner = Owner()
    assert (await owner.create())["ok"]
    assert_refused(await owner.call("set_address", address=address), needle)
    assert owner.net.addresses["kbwg0"] == [owner.server.state.address]
    assert str(owner.server.state.address) == "100.64.0.1/10"
    assert await owner.refusals() == {key: 1}
    assert (await owner.call("set_address", address="100.64.0.9/10"))["ok"]


async def test_set_address_refuses_overlap_with_a_route_that_appeared() -> None:
    owner = Owner()
    assert (await owner.create())["ok"]
    owner.net.routes.append(IPv4Network("100.64.0.0/16"))
    assert_refused(await owner.call("set_address", address="100.64.0.9/10"), "overlaps")


# -- set_peer -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "key", "needle"),
    [
        ({"allowed_ips": ["0.0.0.0/0"]}, "allowed_ip", "not a single IPv4 address"),
        ({"allowed_ips": ["100.64.0.0/24"]}, "allowed_ip", "not a single IPv4 address"),
        ({"allowed_ips": ["100.64.0.2/32", "198.51.100.1/32"]}, "allowed_ip",
         "outside the overlay"),
        ({"allowed_ips": ["2001:db8::1/128"]}, "allowed_ip", "not a single IPv4"),
        ({"allowed_ips": ["100.127.255.255/32"]}, "allowed_ip", "broadcast"),
        ({"endpoint": "100.64.0.9:51820"}, "endpoint", "inside the overlay"),
        ({"endpoint": "0.0.0.0:51820"}, "endpoint", "unspecified or multicast"),
        ({"endpoint": "224.0.0.1:51820"}, "endpoint", "unspecified or multicast"),
        ({"endpoint": "[ff02::1]:51820"}, "endpoint", "unspecified or multicast"),
        ({"keepalive": 3601}, "keepalive", "above 3600"),
    ],
)
async def test_set_peer_refusals(change: dict[str, Any], key: str, needle: str) -> None:
    owner = Owner()
    assert (await owner.create())["ok"]
    args = {"public_key": _pub(), "endpoint": "198.18.0.2:51820",
            "allowed_ips": ["100.64.0.2/32"], "keepalive": 25, **change}  # fmt: skip
    assert_refused(await owner.call("set_peer", **args), needle)
    assert (await owner.call("stats"))["peers"] == []
    assert await owner.refusals() == {key: 1}


async def test_set_peer_accepts_our_own_address_while_a_conflict_settles() -> None:
    owner = Owner()
    assert (await owner.create())["ok"]
    reply = await owner.call("set_peer", public_key=_pub(), endpoint=None,
                             allowed_ips=["100.64.0.1/32"], keepalive=0)
    assert reply["ok"], reply


async def test_set_peer_accepts_a_relay_proxy_and_no_allowed_ips() -> None:
    owner = Owner()
    assert (await owner.create())["ok"]
    # A relayed path's endpoint is the agent's loopback proxy.
    reply = await owner.call("set_peer", public_key=_pub(), endpoint="127.0.0.1:40000",
                             allowed_ips=[], keepalive=0)
    assert reply == {"id": 2, "ok": True}


# -- add_route / remove_route -------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "key", "needle"),
    [
        # The example: a route the agent's user chose, gateway included.
        ({"destination": f"{PEER_ENDPOINT}/32", "via": "192.0.2.1", "ifname": UPLINK},
         "route_via", "takes no 'via'"),
        ({"destination": f"{PEER_ENDPOINT}/32", "via": None, "ifname": UPLINK},
         "route_via", "takes no 'via'"),
        ({"destination": "203.0.113.50/32", "ifname": UPLINK}, "route_not_peer",
         "not the endpoint of a current peer"),
        ({"destination": "100.64.0.2/32", "ifname": UPLINK}, "route_destination",
         "inside the overlay"),
        ({"destination": "127.0.0.1/32", "ifname": UPLINK}, "route_destination", "loopback"),
        ({"destination": "224.0.0.5/32", "ifname": UPLINK}, "route_destination", "multicast"),
        ({"destination": "0.0.0.0/32", "ifname": UPLINK}, "route_destination", "unspecified"),
        ({"destination": "255.255.255.255/32", "ifname": UPLINK}, "route_destination",
         "broadcast"),
        ({"destination": "2001:db8::2/128", "ifname": UPLINK}, "route_not_peer",
         "not the endpoint of a current peer"),
        ({"destination": f"{PEER_ENDPOINT}/32", "ifname": "lo"}, "route_interface",
         "loopback interface"),
        ({"destination": f"{PEER_ENDPOINT}/32", "ifname": "kbwg0"}, "route_interface",
         "the WireGuard interface"),
        ({"destination": f"{PEER_ENDPOINT}/32", "ifname": "eth7"}, "route_interface",
         "no usable interface eth7"),
        ({"destination": f"{PEER_ENDPOINT}/32", "ifname": "eth6"}, "route_egress",
         "no route to 198.18.0.2 through eth6"),
        ({"destination": f"{PEER_ENDPOINT}/32", "ifname": "eth5"}, "route_egress",
         "100.64.0.77, which is not usable"),
    ],
)
async def test_add_route_refusals(args: dict[str, Any], key: str, needle: str) -> None:
    net = FakeNetConfig(bare={"eth6"})
    net.uplinks["eth5"] = "100.64.0.77"
    owner = Owner(net)
    await owner.device_with_peer()
    assert_refused(await owner.call("add_route", **args), needle)
    assert net.added_routes == [] and owner.server.state.routes == {}
    assert await owner.refusals() == {key: 1}


async def test_add_route_refuses_a_relay_proxy_endpoint() -> None:
    owner = Owner()
    await owner.device_with_peer("127.0.0.1:40000")
    reply = await owner.call("add_route", destination="127.0.0.1/32", ifname=UPLINK)
    assert_refused(reply, "loopback")


async def test_add_route_goes_through_the_gateway_the_owner_finds() -> None:
    owner = Owner()
    await owner.device_with_peer()
    added = await owner.call("add_route", destination=f"{PEER_ENDPOINT}/32", ifname=UPLINK)
    assert added == {"id": 3, "ok": True, "via": UPLINK_GATEWAY, "ifname": UPLINK}
    (route,) = owner.net.added_routes
    assert (route.destination, route.via, route.ifname) == (f"{PEER_ENDPOINT}/32",
                                                            UPLINK_GATEWAY, UPLINK)
    # An on-link uplink has no gateway; the route moves there.
    moved = await owner.call("add_route", destination=f"{PEER_ENDPOINT}/32", ifname="eth8")
    assert moved["ok"] and moved["via"] is None
    assert [r.ifname for r in owner.net.added_routes] == ["eth8"]
    await owner.server.cleanup()
    assert owner.net.added_routes == []


async def test_add_route_only_while_the_endpoint_is_a_peer_s() -> None:
    owner = Owner()
    pub = await owner.device_with_peer()
    assert (await owner.call("remove_peer", public_key=pub))["ok"]
    reply = await owner.call("add_route", destination=f"{PEER_ENDPOINT}/32", ifname=UPLINK)
    assert_refused(reply, "not the endpoint of a current peer")


async def test_remove_route_only_of_routes_it_added() -> None:
    owner = Owner()
    await owner.device_with_peer()
    reply = await owner.call("remove_route", destination="198.18.0.1/32")
    assert_refused(reply, "no route to 198.18.0.1/32 was added by this owner")
    assert await owner.refusals() == {"route_not_ours": 1}


async def test_refusals_are_counted_per_reason() -> None:
    owner = Owner()
    for _ in range(3):
        await owner.create(ifname="eth0")
    await owner.create(listen_port=53)
    assert await owner.refusals() == {"interface_name": 3, "listen_port": 1}


# -- egress choice (the owner's, also used by the agent) ----------------------------------


def _route(net: str, ifname: str | None, gateway: str | None = None, metric: int = 0,
           unicast: bool = True) -> MainRoute:
    return MainRoute(IPv4Network(net), ifname, gateway, metric, unicast)


def test_choose_egress() -> None:
    routes = [
        _route("0.0.0.0/0", "eth0", "198.18.1.1", 100),
        _route("0.0.0.0/0", "eth1", "198.18.2.1", 200),
        _route("198.18.2.0/24", "eth1"),
        _route("203.0.113.0/24", None, unicast=False),  # a blackhole has no interface
        _route("203.0.113.9/32", "eth1", "198.18.2.1"),
    ]
    dst = IPv4Address("203.0.113.9")
    assert choose_egress(routes, dst) == Egress("eth1", "198.18.2.1")
    mine = [IPv4Network("203.0.113.9/32")]
    assert choose_egress(routes, dst, ignore=mine) == Egress("eth0", "198.18.1.1")
    assert choose_egress(routes, dst, "eth1", mine) == Egress("eth1", "198.18.2.1")
    assert choose_egress(routes, IPv4Address("198.18.2.7"), "eth1") == Egress("eth1", None)
    assert choose_egress(routes, dst, "eth9") is None


# -- the policy file ----------------------------------------------------------------------


def _policy_file(tmp_path: Path, text: str, mode: int = 0o644, uid: int = 0) -> Path:
    path = tmp_path / "owner.json"
    path.write_text(text)
    path.chmod(mode)
    os.chown(path, uid, 0)
    return path


def test_policy_defaults_without_a_file(tmp_path: Path) -> None:
    assert load_policy(tmp_path / "absent.json") == OwnerPolicy()
    assert OwnerPolicy().overlay == IPv4Network("100.64.0.0/10")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_policy_file_is_read_when_root_owned(tmp_path: Path) -> None:
    path = _policy_file(tmp_path, '{"overlay": "100.100.0.0/16"}')
    assert load_policy(path).overlay == IPv4Network("100.100.0.0/16")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
@pytest.mark.parametrize(("mode", "uid"), [(0o644, NOBODY), (0o664, 0), (0o646, 0)])
def test_policy_file_anyone_but_root_could_write_is_refused(
    tmp_path: Path, mode: int, uid: int
) -> None:
    path = _policy_file(tmp_path, '{"overlay": "0.0.0.0/0"}', mode, uid)
    with pytest.raises(PolicyError, match="must be owned by root and writable by root only"):
        load_policy(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_policy_file_symlink_is_refused(tmp_path: Path) -> None:
    target = _policy_file(tmp_path, '{"overlay": "100.100.0.0/16"}')
    link = tmp_path / "link.json"
    link.symlink_to(target)
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(link)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('{"overlay": "10.0.0.0/8"}', "wider than /10"),
        ('{"overlay": "100.64.0.1/10"}', "not an IPv4 network"),
        ('{"overlay": 5}', "must be a string"),
        ('{"overlay": "100.64.0.0/10", "extra": 1}', "unknown keys: extra"),
        ("[1]", "JSON object"),
        ("{", "not valid JSON"),
    ],
)
def test_policy_file_contents_are_checked(tmp_path: Path, text: str, needle: str) -> None:
    path = _policy_file(tmp_path, text)
    with pytest.raises(PolicyError, match=needle):
        load_policy(path)


# -- the owner process: entry point, hardening, imports -----------------------------------


def _owner_process(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
                   stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-I", "-m", "kbwg.owner", *args], input=stdin,
                          capture_output=True, cwd=cwd, env=env, timeout=30, check=False)


@pytest.mark.parametrize("source", ["devnull", "file"])
def test_owner_run_by_hand_says_to_run_join_instead(tmp_path: Path, source: str) -> None:
    """Without the agent's pipes (by hand, from a file) it exits at once with what to do,
    rather than a traceback or waiting forever."""
    path = Path(os.devnull) if source == "devnull" else tmp_path / "frames"
    if source == "file":
        path.write_bytes(b"")
    with path.open("rb") as stdin:
        result = subprocess.run([sys.executable, "-I", "-m", "kbwg.owner"], stdin=stdin,
                                capture_output=True, timeout=30, check=False)
    assert result.returncode == 2, result.stderr
    assert b"stdin is not a pipe" in result.stderr and b"kbwg-agent join" in result.stderr
    assert b"Traceback" not in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_owner_exits_2_on_a_bad_policy_file(tmp_path: Path) -> None:
    path = _policy_file(tmp_path, '{"overlay": "100.100.0.0/16"}', uid=NOBODY)
    result = _owner_process("--policy", str(path))
    assert result.returncode == 2
    assert b"must be owned by root" in result.stderr and b"chown root:root" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
async def test_owner_process_enforces_its_policy_file(tmp_path: Path) -> None:
    path = _policy_file(tmp_path, '{"overlay": "100.100.0.0/16"}')
    request = {"id": 1, "op": "create", "ifname": "kbwg0", "private_key": _key(),
               "listen_port": 0, "address": "100.64.0.1/10", "backend": "auto"}  # fmt: skip
    # Refused before anything touches the system: the frame never gets to a backend.
    result = await asyncio.to_thread(_owner_process, "--policy", str(path),
                                     stdin=encode_frame(request))
    assert result.returncode == 0, result.stderr
    reader = asyncio.StreamReader()
    reader.feed_data(result.stdout)
    reader.feed_eof()
    reply = await read_frame(reader)
    assert reply is not None
    assert_refused(reply, "not inside the locally allowed overlay 100.100.0.0/16")
    assert b"refused create (overlay)" in result.stderr


def test_owner_ignores_the_callers_directory_and_python_variables(tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    fake = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
    (tmp_path / "kbwg" / "owner").mkdir(parents=True)
    for name in ("kbwg/__init__.py", "kbwg/owner/__init__.py", "kbwg/owner/__main__.py",
                 "kbwg/owner/main.py", "sitecustomize.py", "usercustomize.py", "pyroute2.py",
                 "msgpack.py"):
        (tmp_path / name).write_text(fake)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(tmp_path),
           "PYTHONSTARTUP": str(tmp_path / "sitecustomize.py"), "PYTHONHOME": "/nonexistent"}
    # -I ignores PYTHONHOME too; without it the interpreter would not even start.
    result = _owner_process(cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert b"end of input" in result.stderr
    assert not marker.exists(), marker.read_text()


def test_harden_leaves_nothing_of_the_caller(tmp_path: Path) -> None:
    script = (
        "import json, os, sys\n"
        "sys.path[:0] = ['', os.getcwd(), 'relative']\n"
        "from kbwg.owner.main import harden\n"
        "harden()\n"
        "umask = os.umask(0)\n"
        "print(json.dumps({'cwd': os.getcwd(), 'umask': umask, 'env': dict(os.environ),\n"
        "                  'path': sys.path}))\n"
    )
    env = {**os.environ, "KBWG_JUNK": "1", "PATH": f"{tmp_path}:/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=30, check=True)
    seen = json.loads(result.stdout)
    assert seen["cwd"] == "/" and seen["umask"] == 0o077
    assert seen["env"] == {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    assert all(entry and os.path.isabs(entry) for entry in seen["path"]), seen["path"]
    assert str(tmp_path) not in seen["path"]


def test_owner_imports_nothing_of_kbwg_but_itself_and_the_bottom_layer() -> None:
    code = ("import json, kbwg.owner.main, sys; print(json.dumps(sorted(m for m in sys.modules "
            "if m.startswith('kbwg') or m.split('.')[0] in ('aioice', 'stun'))))")
    result = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True,
                            text=True, timeout=30, check=True)
    modules = json.loads(result.stdout)
    assert "kbwg.owner.main" in modules
    assert [m for m in modules if m != "kbwg"
            and not m.startswith(("kbwg.owner", "kbwg.core"))] == []


# -- external programs: by absolute path, clean environment -------------------------------


def test_find_tool_ignores_path_and_anything_not_root_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoy = tmp_path / "unshare"
    decoy.write_text("#!/bin/sh\n")
    decoy.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    found = tools.find_tool("unshare")
    assert found is not None and os.path.dirname(found) in tools.SYSTEM_DIRS
    assert tools.find_tool("../bin/sh") is None and tools.find_tool("") is None

    monkeypatch.setattr(tools, "SYSTEM_DIRS", (str(tmp_path),))
    tmp_path.chmod(0o755)
    assert tools.find_tool("unshare") == str(decoy)
    decoy.chmod(0o775)
    assert tools.find_tool("unshare") is None
    if os.geteuid() == 0:
        decoy.chmod(0o755)
        os.chown(decoy, NOBODY, 0)
        assert tools.find_tool("unshare") is None


async def test_wireguard_go_starts_by_absolute_paths_with_a_clean_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: dict[str, Any] = {}

    async def fake_exec(*argv: str, **kwargs: Any) -> Any:
        seen["argv"], seen["env"] = argv, kwargs["env"]
        raise OSError("stop here")

    monkeypatch.setenv("LD_PRELOAD", "/tmp/evil.so")
    monkeypatch.setenv("PATH", "/tmp")
    monkeypatch.setattr(wg_userspace.asyncio, "create_subprocess_exec", fake_exec)
    monkeypatch.setattr(wg_userspace, "_link_exists", lambda _name: False)
    monkeypatch.setattr(wg_userspace, "UAPI_DIR", str(tmp_path / "wireguard"))
    backend = UserspaceBackend("/usr/bin/wireguard-go")
    with pytest.raises(OSError, match="stop here"):
        await backend.create("kbwg7", bytes(32), 0)
    argv = list(seen["argv"])
    if os.path.basename(argv[0]) == "setpriv":
        assert os.path.isabs(argv[0]) and argv[1:3] == ["--pdeathsig", "TERM"]
        argv = argv[3:]
    unshare, *flags, sh, dash_c, _script, zero, mount, socket_dir, binary, ifname = argv
    assert flags == ["--mount", "--propagation", "private"] and dash_c == "-c"
    programs = {"unshare": unshare, "sh": sh, "mount": mount, "wireguard-go": binary}
    for name, path in programs.items():
        assert os.path.isabs(path) and os.path.basename(path) == name, argv
    assert zero == "sh" and socket_dir == str(tmp_path / "wireguard") and ifname == "kbwg7"
    assert seen["env"]["PATH"] == tools.FIXED_PATH
    assert set(seen["env"]) <= {"PATH", "WG_PROCESS_FOREGROUND", "LOG_LEVEL"}
    assert seen["env"]["WG_PROCESS_FOREGROUND"] == "1"

    relative = UserspaceBackend("wireguard-go")
    with pytest.raises(BackendError, match="not absolute"):
        await relative.create("kbwg7", bytes(32), 0)
