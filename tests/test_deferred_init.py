"""A package registered with its `__init__` deferred (kbwg.core.deferred_init) gives its
submodules without running that `__init__`, and runs it at the first use of a name only
the `__init__` defines. Each case runs in a fresh interpreter: sys.modules is global."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any


def _run(code: str) -> Any:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_aioice_stun_loads_without_the_ice_agent_and_the_rest_on_demand() -> None:
    seen = _run("""
        import json, sys
        from kbwg.core.deferred_init import defer_init
        deferred = defer_init("aioice")
        from aioice import stun
        import aioice.turn
        light = sorted(m for m in sys.modules if m.startswith(("aioice", "dns")))
        message = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
        from aioice import Connection  # only the package __init__ defines it
        import aioice
        print(json.dumps({"deferred": deferred, "light": light,
                          "parsed": stun.parse_message(bytes(message)).message_method.name,
                          "connection": Connection.__module__,
                          "candidate": aioice.Candidate.__name__,
                          "full": "aioice.ice" in sys.modules and "dns" in sys.modules}))
    """)
    assert seen["deferred"] is True
    assert "aioice.ice" not in seen["light"] and not any(
        m == "dns" or m.startswith("dns.") for m in seen["light"]), seen["light"]
    assert {"aioice", "aioice.stun", "aioice.turn"} <= set(seen["light"])
    assert seen["parsed"] == "BINDING"
    assert seen["connection"] == "aioice.ice" and seen["candidate"] == "Candidate"
    assert seen["full"] is True


def test_pyroute2_route_socket_loads_without_every_netlink_family() -> None:
    seen = _run("""
        import json, sys
        from kbwg.owner.main import preload
        preload().join(30)
        from pyroute2.iproute.linux import AsyncIPRoute
        from pyroute2.netlink.rtnl import RTMGRP_LINK
        light = "pyroute2.ipdb" in sys.modules or "pyroute2.ndb.main" in sys.modules
        import pyroute2
        print(json.dumps({"light": not light, "route": AsyncIPRoute.__name__,
                          "ndb": pyroute2.NDB.__name__, "link": RTMGRP_LINK}))
    """)
    assert seen["light"] is True
    assert seen["route"] == "AsyncIPRoute" and seen["ndb"] == "NDB" and seen["link"] == 1


def test_what_is_not_deferred() -> None:
    seen = _run("""
        import json, sys
        import msgpack
        from kbwg.core.deferred_init import defer_init
        print(json.dumps({"imported": defer_init("msgpack"), "module": defer_init("base64"),
                          "missing": defer_init("no_such_package_kbwg"),
                          "registered": "no_such_package_kbwg" in sys.modules}))
    """)
    assert seen == {"imported": False, "module": False, "missing": False, "registered": False}


def test_a_name_neither_submodule_nor_defined_is_an_attribute_error() -> None:
    seen = _run("""
        import json
        from kbwg.core.deferred_init import defer_init
        defer_init("aioice")
        import aioice
        errors = []
        for name in ("__wrapped__", "no_such_name"):
            try:
                getattr(aioice, name)
            except AttributeError as exc:
                errors.append(str(exc))
        print(json.dumps({"errors": errors, "has_stun": hasattr(aioice, "stun")}))
    """)
    assert len(seen["errors"]) == 2 and "no_such_name" in seen["errors"][1]
    assert seen["has_stun"] is True
