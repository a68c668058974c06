"""A hostile agent against the real device owner and wireguard-go, in a throwaway
network namespace (root): a scoped IPv6 endpoint whose scope carried UAPI lines, and a
signal sudo relays that ended the owner without removing its device."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from nacl.public import PrivateKey
from test_device_owner import _ip, netns  # noqa: F401  (netns: a fixture)

from kbwg.owner.frames import encode_frame, read_frame

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]


@pytest.fixture
def ns(netns: Callable[[], str]) -> str:  # noqa: F811  (the fixture imported above)
    """One fresh namespace (lo up), its processes killed and the namespace deleted at the
    end whatever happens (test_device_owner's factory)."""
    return netns()


class Owner:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdin is not None and process.stdout is not None
        self.process, self.stdin, self.stdout = process, process.stdin, process.stdout
        self.next_id = 1

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        rid, self.next_id = self.next_id, self.next_id + 1
        self.stdin.write(encode_frame({"id": rid, "op": op, **args}))
        await self.stdin.drain()
        reply = await asyncio.wait_for(read_frame(self.stdout), 30)
        assert reply is not None and reply["id"] == rid, reply
        return reply


@pytest.fixture
async def owner(ns: str) -> AsyncIterator[Owner]:
    process = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, sys.executable, "-I", "-m", "kbwg.owner",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        yield Owner(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


async def _create(owner: Owner, ifname: str) -> None:
    reply = await owner.call("create", ifname=ifname,
                             private_key=_b64(bytes(PrivateKey.generate())), listen_port=0,
                             address="100.64.0.1/10", backend="userspace")
    assert reply["ok"], reply


def _ifname() -> str:
    return f"kbwg{10000 + secrets.randbelow(90000)}"


async def test_a_scoped_endpoint_adds_no_uapi_lines(owner: Owner) -> None:
    await _create(owner, _ifname())
    victim = bytes(PrivateKey.generate().public_key)
    # Against wireguard-go 0.0.20220316 this made a second peer (victim) with an endpoint
    # inside the overlay and a keepalive of 65535 s, both of which the guard refuses.
    endpoint = ("[2001:db8::1%lo]:1\npublic_key=" + victim.hex()
                + "\nendpoint=100.64.0.9:51820\npersistent_keepalive_interval=65535"
                + "\npublic_key=" + bytes(PrivateKey.generate().public_key).hex()
                + "\nendpoint=[2001:db8::2]:51820")
    reply = await owner.call("set_peer", public_key=_b64(bytes(PrivateKey.generate().public_key)),
                             endpoint=endpoint, allowed_ips=["100.64.0.2/32"], keepalive=25)
    assert reply["ok"] is False, reply
    stats = await owner.call("stats")
    assert stats["peers"] == [], stats
    assert (await owner.call("shutdown"))["ok"]


async def test_sigusr1_through_sudo_removes_the_device(ns: str, owner: Owner) -> None:
    ifname = _ifname()
    await _create(owner, ifname)
    assert _ip("-n", ns, "link", "show", ifname, check=False).returncode == 0
    # `ip netns exec` execs the owner: this pid is the owner's, as sudo's child would be.
    owner.process.send_signal(signal.SIGUSR1)
    code = await asyncio.wait_for(owner.process.wait(), 30)
    assert code == 0
    assert _ip("-n", ns, "link", "show", ifname, check=False).returncode != 0


FAKE_WIREGUARD_GO = """#!/bin/sh
# Another owner's device takes the name first (two agents joining with kbwg0 at once);
# this wireguard-go then cannot have it, as the real one cannot.
ip link add "$2" type bridge
echo "Failed to create TUN device: device or resource busy"
exit 1
"""


def test_a_wireguard_go_that_never_came_up_deletes_no_link_of_its_name(
        ns: str, tmp_path: Path) -> None:
    fake = tmp_path / "wireguard-go"
    fake.write_text(FAKE_WIREGUARD_GO)
    fake.chmod(0o755)
    ifname = _ifname()
    script = (
        "import asyncio, sys\n"
        "from kbwg.owner.wg_userspace import UserspaceBackend\n"
        "async def main():\n"
        "    backend = UserspaceBackend(sys.argv[1])\n"
        "    try:\n"
        "        await backend.create(sys.argv[2], bytes(32), 0)\n"
        "    except Exception as exc:\n"
        "        print('failed:', exc)\n"
        "asyncio.run(main())\n"
    )
    result = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", script,
                             str(fake), ifname], capture_output=True, text=True, timeout=60)
    assert "failed: wireguard-go for" in result.stdout, (result.stdout, result.stderr)
    # The link is the other owner's: a failed start must leave it alone.
    assert _ip("-n", ns, "link", "show", ifname, check=False).returncode == 0, result.stderr[-600:]
