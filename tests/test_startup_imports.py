"""What `join` imports on its way up (issue 13: it is timed from process start).

A fresh interpreter runs `join`'s start path for real: the command line, then the
agent with the Keybase stand-in and an in-memory device owner, until it has announced
itself. The device owner and whoami must start before the data path's modules load
(pyroute2, aioice: a third of a second), and modules only other commands or later
requests need (diag and pystun3, the relay server, install-helper, the ping command,
UPnP, and the TURN client while no relay is configured) must not load at all. Port
mapping is off: it would probe this machine's real gateway.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from join_script import run_join_script

# Loaded only by the commands and requests that need them, never by `join`'s start.
NOT_AT_START = (
    "kbwg.agent.diag",
    "kbwg.negotiation.natprobe",
    "stun",  # pystun3, for diag's classic NAT type
    "kbwg.relay",
    "kbwg.agent.install_helper",
    "kbwg.agent.ping_command",
    "async_upnp_client",
    "aiohttp",
    # The team here configures no relay: the TURN client is not needed.
    "kbwg.turn",
    "kbwg.agent.relay_proxy",
    # A pair's RTT median is taken without it (it loads fractions and decimal).
    "statistics",
    # aioice's package __init__ (its ICE agent, mDNS, dnspython): only its STUN module
    # is used (kbwg.core.deferred_init).
    "aioice.ice",
    "aioice.mdns",
    "dns",
)
# Not before the device owner and whoami have been started.
# (The bare `aioice` is there from the start: registered, its __init__ deferred.)
NOT_BEFORE_OWNER = ("pyroute2", "aioice.stun", "aioice.ice", "dns", "kbwg.agent.connectivity",
                    "kbwg.agent.joined", "kbwg.negotiation.checks")

SCRIPT = textwrap.dedent("""
    import asyncio, json, logging, sys
    from pathlib import Path

    from kbwg.agent import cli

    cli.lighter_imports()
    argv = ["-vv", "join", "t1", "--keybase", sys.argv[1], "--state-dir", sys.argv[2]]
    args = cli.build_parser(argv).parse_args(argv)

    from kbwg.agent.daemon import Agent, JoinOptions
    from kbwg.agent.keybase import KeybaseClient

    seen = {}

    class Owner:
        pid = 0

        def __init__(self):
            self.events = asyncio.Queue()

        async def wait_gone(self):
            await asyncio.Event().wait()

        async def request(self, op, **request):
            if op == "create":
                return {"listen_port": 40000, "backend": "memory", "public_key": "x",
                        "ifname": request["ifname"]}
            if op == "stun_open":
                return {"port": 40000}
            if op == "interfaces":
                return {"addresses": [{"interface": "eth9", "index": 2,
                                       "address": "198.18.0.5", "prefixlen": 24,
                                       "up": True, "default_route": True}]}
            if op == "stats":
                return {"peers": []}
            return {}

        async def close(self):
            pass

    async def start_owner(_command):
        seen["owner"] = sorted(sys.modules)
        return Owner()

    async def no_routes(_ifname):
        return []

    class Introduced(logging.Handler):
        def __init__(self, done):
            super().__init__()
            self.done = done

        def emit(self, record):
            if "introduced" in record.getMessage():
                self.done.set()

    async def main():
        introduced = asyncio.Event()
        daemon_log = logging.getLogger("kbwg.agent.daemon")
        daemon_log.setLevel(logging.DEBUG)
        daemon_log.addHandler(Introduced(introduced))
        options = JoinOptions(team=args.team, state_dir=Path(args.state_dir),
                              interface=args.interface, listen_port=args.port)
        agent = Agent(options, KeybaseClient(args.keybase), owner_factory=start_owner,
                      routes=no_routes)
        stop = asyncio.Event()
        run = asyncio.create_task(agent.run(stop))
        done, _ = await asyncio.wait([run, asyncio.create_task(introduced.wait())],
                                     timeout=60, return_when=asyncio.FIRST_COMPLETED)
        seen["started"] = sorted(sys.modules)
        seen["introduced"] = introduced.is_set()
        stop.set()
        await run

    asyncio.run(main())
    print(json.dumps(seen))
""")


def _loaded(modules: list[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if m in names or m.startswith(tuple(n + "." for n in names)))


def test_join_starts_the_owner_first_and_loads_no_other_commands_modules(tmp_path: Path) -> None:
    seen = run_join_script(tmp_path, SCRIPT, {"KBWG_PORTMAP": "off"})
    assert seen["introduced"], "the agent never announced itself:\n" + seen["stderr"]
    # The run got as far as the data path: the check below is not vacuous.
    assert _loaded(seen["started"], ("pyroute2", "kbwg.agent.joined", "aioice.stun")) != []
    assert _loaded(seen["owner"], NOT_BEFORE_OWNER) == []
    assert _loaded(seen["started"], NOT_AT_START) == []
