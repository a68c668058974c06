"""`python -I -m kbwg.owner`: the device owner (see kbwg.owner.main)."""

from kbwg.owner.main import main

main()
