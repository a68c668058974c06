"""The command line's own behaviour, apart from what its commands report."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap

import pytest

from kbwg.agent import cli


def test_a_reader_that_leaves_early_ends_status_quietly(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def status(_args: argparse.Namespace) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_status", status)
    redirected: list[int] = []
    monkeypatch.setattr(os, "dup2", lambda _fd, target: redirected.append(target))
    assert cli.main(["status", "--state-dir", "/nonexistent"]) == 141
    assert redirected == [sys.stdout.fileno()]


def test_status_into_a_closed_pipe_prints_no_traceback(tmp_path: os.PathLike[str]) -> None:
    """`kbwg-agent status | head` once ended with a BrokenPipeError traceback."""
    script = textwrap.dedent("""
        import sys
        from kbwg.agent import cli
        async def status(_args):
            for _ in range(10000):
                print("peer line " * 10)
            return 0
        cli._status = status
        sys.exit(cli.main(["status", "--state-dir", sys.argv[1]]))
    """)
    reader, writer = os.pipe()
    os.close(reader)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], stdout=writer,
                          stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    os.close(writer)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 141
