"""Fixtures for the netns scenario tests: puts `kbwg_world` on the path, skips without root.

Every test under this folder is marked `netns` and skipped unless we are root and `ip netns`
works. The `world` fixture yields a fresh `World` and, after the test, checks its delayers
are alive (a dead one silently blackholes a link), closes it and asserts that none of its
namespaces remain.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from kbwg_world import World  # noqa: E402  (needs the path set above)


def netns_unavailable() -> str | None:
    """Why netns tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "netns tests need root"
    try:
        proc = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns` is unusable: {exc}"
    if proc.returncode != 0:
        return f"`ip netns` fails: {proc.stderr.strip()}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = netns_unavailable()
    for item in items:
        # The hook sees the whole session; only the tests of this folder are netns tests.
        if HERE not in item.path.parents:
            continue
        item.add_marker(pytest.mark.netns)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    try:
        yield w
        w.check()
    finally:
        w.close()
        assert not w.leftovers(), f"namespaces left behind: {w.leftovers()}"
