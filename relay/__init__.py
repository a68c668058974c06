"""kbwg.relay: the TURN-compatible relay server behind `kbwg-agent relay`, meant to run
alone on a public host. It imports only kbwg.core, the standard library and aioice's
STUN code (tests/test_layers.py keeps it that way). The agent's side of relaying is
kbwg.turn (the client) and kbwg.agent (the relayed data path)."""
