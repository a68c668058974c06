"""kbwg.negotiation: candidates, the shared WireGuard port, wire messages, connectivity
checks, path choice and NAT behaviour probing."""
