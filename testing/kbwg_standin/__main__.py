"""`python -m kbwg_standin`, the same as the `kbwg-keybase-standin` executable."""

from __future__ import annotations

import sys

from kbwg_standin.cli import main

sys.exit(main())
