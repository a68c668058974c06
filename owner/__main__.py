"""`python -I -m kbwg.owner`: the device owner (see kbwg.owner.main)."""

from kbwg.owner.server import main

main()
