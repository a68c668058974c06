"""kbwg.agent: the top layer. The `kbwg-agent` CLI, the join daemon (team files and
chat through the Keybase CLI, peer selection and sync), the agent's side of the device
owner (typed calls, STUN through its raw socket), the relayed data path (TURN allocations
and the loopback proxy), `status` and `diag`, and `install-helper`."""
