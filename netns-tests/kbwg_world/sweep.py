"""CLI: remove what crashed runs left behind: namespaces (with their processes) and temp dirs.

    python -m kbwg_world.sweep                 # everything named kbwg-*
    python -m kbwg_world.sweep --run-id 3fa2c1 # one run only
    python -m kbwg_world.sweep --dry-run

Beware: the default prefix also matches worlds of runs still in progress (other test
sessions on this machine); prefer --run-id when in doubt.
"""

from __future__ import annotations

import argparse
import sys

from kbwg_world.netns import sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="remove leftover kbwg netns worlds")
    parser.add_argument("--prefix", default="kbwg-")
    parser.add_argument("--run-id", help="sweep only this run (overrides --prefix)")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    prefix = f"kbwg-{args.run_id}-" if args.run_id else args.prefix
    names = sweep(prefix, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(names)} namespace(s)" + "".join(f"\n  {n}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
