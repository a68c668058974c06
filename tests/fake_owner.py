"""Test-only device owner: `python tests/fake_owner.py [--log-level L]`. The real
kbwg.owner server and frames over stdin/stdout, with the fakes of owner_fakes.py
(nothing is configured, no root needed) and the default policy."""

from __future__ import annotations

import argparse
import asyncio
import sys

from owner_fakes import FakeNetConfig, MemoryBackend

from kbwg.owner.main import configure_logging
from kbwg.owner.policy import OwnerPolicy
from kbwg.owner.rawstun import RawStunSocket
from kbwg.owner.server import OwnerServer, serve_stdio


def main() -> None:
    parser = argparse.ArgumentParser(prog="fake_owner.py")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    configure_logging(args.log_level)
    server = OwnerServer(FakeNetConfig(), lambda _name: MemoryBackend(), OwnerPolicy(),
                         RawStunSocket.open)
    sys.exit(asyncio.run(serve_stdio(server)))


if __name__ == "__main__":
    main()
