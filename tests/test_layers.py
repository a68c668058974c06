"""The packages depend only downward; this test fails on an upward or cross-layer import.

    kbwg.agent                       the top: CLI, join daemon, Keybase client, data paths
      kbwg.negotiation  kbwg.turn  kbwg.owner  kbwg.relay
        kbwg.core                    shared types and helpers; imports nothing of ours

The relay server runs alone on a public host, and the owner runs as root: both may import
only the bottom layer besides their own package, and the relay's third-party imports are
pinned too, so its dependency set cannot grow unnoticed. Function-local imports count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> (its folder, the first-party packages it may import besides itself)
LAYERS: dict[str, tuple[str, frozenset[str]]] = {
    "kbwg.core": ("core", frozenset()),
    "kbwg.owner": ("owner", frozenset({"kbwg.core"})),
    "kbwg.negotiation": ("negotiation", frozenset({"kbwg.core"})),
    "kbwg.turn": ("turn", frozenset({"kbwg.core"})),
    "kbwg.relay": ("relay", frozenset({"kbwg.core"})),
    "kbwg.portmap": ("portmap", frozenset({"kbwg.core"})),
    "kbwg.agent": ("agent", frozenset({"kbwg.core", "kbwg.owner", "kbwg.negotiation",
                                       "kbwg.turn", "kbwg.relay", "kbwg.portmap"})),
    "kbwg_standin": ("testing/kbwg_standin", frozenset()),
}
FIRST_PARTY_ROOTS = ("kbwg", "kbwg_standin", "kbwg_world")
# Third-party modules the relay server may import (beyond the standard library).
RELAY_THIRD_PARTY = frozenset({"aioice"})
OWNER_THIRD_PARTY = frozenset({"msgpack", "nacl", "pyroute2"})


def _imports(path: Path, package: str) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    module = package + "." + ".".join(path.relative_to(ROOT / LAYERS[package][0])
                                      .with_suffix("").parts)
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level]
                names.append(".".join([*base, node.module] if node.module else base))
            elif node.module:
                names.append(node.module)
    return names


def _package_of(name: str) -> str | None:
    for package in sorted(LAYERS, key=len, reverse=True):
        if name == package or name.startswith(package + "."):
            return package
    if name.split(".")[0] in FIRST_PARTY_ROOTS:
        return name
    return None


def _files(package: str) -> list[Path]:
    return sorted((ROOT / LAYERS[package][0]).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_imports_only_downward(package: str) -> None:
    allowed = LAYERS[package][1] | {package}
    files = _files(package)
    assert files, f"{package}: no modules found in {LAYERS[package][0]}/"
    wrong = []
    for path in files:
        for name in _imports(path, package):
            target = _package_of(name)
            if target is not None and target not in allowed:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, f"{package} may import only {sorted(allowed)}:\n" + "\n".join(wrong)


@pytest.mark.parametrize(("package", "third_party"), [("kbwg.relay", RELAY_THIRD_PARTY),
                                                       ("kbwg.owner", OWNER_THIRD_PARTY),
                                                       ("kbwg.core", frozenset())])
def test_third_party_imports_are_pinned(package: str, third_party: frozenset[str]) -> None:
    import sys

    stdlib = sys.stdlib_module_names
    extra = set()
    for path in _files(package):
        for name in _imports(path, package):
            top = name.split(".")[0]
            if top not in stdlib and top not in FIRST_PARTY_ROOTS and top != "__future__":
                extra.add(top)
    assert extra <= third_party, f"{package} grew imports: {sorted(extra - third_party)}"


def test_every_module_says_what_it_owns() -> None:
    missing = []
    for package in LAYERS:
        for path in _files(package):
            if ast.get_docstring(ast.parse(path.read_text())) is None:
                missing.append(str(path.relative_to(ROOT)))
    assert not missing, "modules without an opening docstring:\n" + "\n".join(missing)


def test_test_files_have_unique_basenames() -> None:
    """pytest imports test modules by basename: a tests/ and a netns-tests/ file of one
    name stop the whole suite at collection."""
    names = [p.name for folder in ("tests", "netns-tests")
             for p in (ROOT / folder).glob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
