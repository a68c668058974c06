"""A kernel WireGuard device outlives an owner killed outright (wireguard-go's goes with
the owner's process): the owner lists it with its route reaper once made, and takes it
off the list once it removed it itself (owner/route_reaper.py)."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from nacl.public import PrivateKey
from owner_fakes import FakeNetConfig, MemoryBackend

from kbwg.owner.policy import OwnerPolicy
from kbwg.owner.rawstun import RawStunSocket
from kbwg.owner.server import OwnerServer


class KernelLikeBackend(MemoryBackend):
    outlives_owner = True


@pytest.mark.parametrize(("backend", "reaped"), [
    (KernelLikeBackend, ["kbwg7"]),
    (MemoryBackend, []),
])
async def test_a_device_that_outlives_the_owner_is_reaped_until_the_owner_removes_it(
        backend: type[MemoryBackend], reaped: list[str]) -> None:
    net = FakeNetConfig()
    server = OwnerServer(net, lambda _name: backend(), OwnerPolicy(), RawStunSocket.open)
    key = base64.b64encode(bytes(PrivateKey.generate())).decode()
    reply: dict[str, Any] = await server.handle({
        "id": 1, "op": "create", "ifname": "kbwg7", "private_key": key, "listen_port": 0,
        "address": "100.64.0.1/10", "backend": "auto"})
    assert reply["ok"], reply
    assert net.reaped_links == reaped
    await server.cleanup()
    assert net.reaped_links == []
