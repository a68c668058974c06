"""`python -m kbwg.agent.standin`, the same as the `kbwg-keybase-standin` executable."""

from __future__ import annotations

import sys

from kbwg.agent.standin.cli import main

sys.exit(main())
