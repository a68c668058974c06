"""kbwg.core: the bottom layer. Small shared types and helpers (addresses, device ids,
STUN and ChannelData sniffing, rate limiters, background tasks) that every other package
may import; it imports nothing else of kbwg."""
