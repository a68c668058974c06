"""`join` never loads pyroute2 (issue 15: ~13 MB and ~0.15 s of CPU in each agent): the
device owner, which has it loaded anyway, reads the host's network for the agent.

A fresh interpreter runs `join` for real (the Keybase stand-in, an in-memory device
owner that answers the network ops) through start-up, the announcement and a network
change that the owner reports as an event: the agent checks the overlay against the
owner's `host_routes`, gathers and announces from its `interfaces`, asks it for the
gateway, subscribes with `watch_network`, and re-gathers on the event. Then no module of
pyroute2 may be loaded.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from join_script import run_join_script

SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    from pathlib import Path

    from kbwg.agent.daemon import Agent, JoinOptions
    from kbwg.agent.keybase import KeybaseClient

    ADDRESS = {"interface": "eth9", "index": 2, "address": "198.18.0.5", "prefixlen": 24,
               "up": True, "default_route": True}

    class Owner:
        pid = 0

        def __init__(self):
            self.events = asyncio.Queue()
            self.ops = []

        async def wait_gone(self):
            await asyncio.Event().wait()

        async def request(self, op, **request):
            self.ops.append(op)
            if op == "create":
                return {"listen_port": 40000, "backend": "memory", "public_key": "x",
                        "ifname": request["ifname"]}
            if op == "stun_open":
                return {"port": 40000}
            if op == "stats":
                return {"peers": []}
            if op == "interfaces":
                # The address moves once the network has changed.
                moved = "watch_network" in self.ops and self.ops.count("interfaces") > 2
                return {"addresses": [{**ADDRESS, "address": "198.18.0.6"} if moved
                                      else ADDRESS]}
            if op == "host_routes":
                return {"destinations": ["192.0.2.0/24"]}
            if op == "default_gateway":
                return {"gateway": None}
            return {}

        async def close(self):
            pass

    owner = Owner()

    async def start_owner(_command):
        return owner

    async def until(predicate):
        for _ in range(3000):
            if predicate():
                return True
            await asyncio.sleep(0.01)
        return False

    async def main():
        options = JoinOptions(team="t1", state_dir=Path(sys.argv[2]), interface="kbwg0")
        agent = Agent(options, KeybaseClient(sys.argv[1]), owner_factory=start_owner)
        joined = []
        agent._on_joined = joined.append
        stop = asyncio.Event()
        run = asyncio.create_task(agent.run(stop))
        seen = {"subscribed": await until(lambda: "watch_network" in owner.ops)}
        await owner.events.put({"event": "network", "change": "RTM_NEWADDR",
                                "ifname": "eth9", "count": 1})
        seen["moved"] = await until(
            lambda: joined and joined[0].state.announced_endpoint.startswith("198.18.0.6:"))
        seen["ops"] = sorted(set(owner.ops))
        seen["modules"] = sorted(sys.modules)
        stop.set()
        await run
        return seen

    print(json.dumps(asyncio.run(main())))
""")


def test_join_loads_no_pyroute2(tmp_path: Path) -> None:
    # Port mapping on (the variable unset): the gateway comes from the owner too.
    seen = run_join_script(tmp_path, SCRIPT, {"KBWG_PORTMAP": None})
    # The run went through everything that used to read netlink in the agent.
    assert seen["subscribed"] and seen["moved"], seen["stderr"]
    assert {"host_routes", "interfaces", "default_gateway", "watch_network",
            "create"} <= set(seen["ops"]), seen["ops"]
    assert "kbwg.agent.joined" in seen["modules"]
    assert [m for m in seen["modules"] if m == "pyroute2" or m.startswith("pyroute2.")] == []
