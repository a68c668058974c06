"""kbwg.agent: the `kbwg-agent` CLI, the join daemon, the Keybase CLI client and its
stand-in, peers.json, the privileged device owner and its WireGuard backends."""
