"""kbwg.relay: the TURN-compatible relay server and the agent's relayed data path."""
