"""Import a package's submodules without running the package's `__init__` first.

aioice's and pyroute2's `__init__` import everything they ship: aioice its ICE agent,
mDNS and dnspython (60 ms of CPU here), pyroute2 every netlink family (100 ms more than
the route socket kbwg uses). Every device starts an agent and a device owner, each once
per `join`, on machines where start-up is CPU-bound, while kbwg needs one or two
submodules of each. `defer_init` registers the package unexecuted, so `import pkg.sub`
and `from pkg import sub` load only `sub` (and what it imports); the first use of a
name only the package's `__init__` defines (`from aioice import Connection`) runs that
`__init__` then, so code that uses the package whole still works.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from typing import Any

log = logging.getLogger(__name__)


def defer_init(package: str) -> bool:
    """Register `package` with its `__init__` deferred; whether it was. Not when the
    package is already imported or is not a plain package on the path (the normal
    import then behaves as always)."""
    if package in sys.modules:
        return False
    spec = importlib.util.find_spec(package)
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return False
    module = importlib.util.module_from_spec(spec)
    loader = spec.loader

    def complete(name: str) -> Any:
        # Called only for a name the module does not have yet.
        if f"{package}.{name}" in sys.modules or _is_submodule(package, name):
            return importlib.import_module(f"{package}.{name}")
        if name.startswith("__"):
            raise AttributeError(name)  # probes such as __wrapped__ need no package
        if module.__dict__.pop("__getattr__", None) is not None:
            log.debug("%s: running its __init__ for %r", package, name)
            loader.exec_module(module)
        try:
            return module.__dict__[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

    module.__dict__["__getattr__"] = complete
    sys.modules[package] = module
    return True


def _is_submodule(package: str, name: str) -> bool:
    try:
        return importlib.util.find_spec(f"{package}.{name}") is not None
    except (ImportError, ValueError):
        return False

