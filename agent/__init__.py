"""kbwg.agent: the `kbwg-agent` CLI, the join daemon, the Keybase CLI client,
peers.json and the agent's side of the device owner."""
