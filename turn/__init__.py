"""kbwg.turn: the TURN client side (RFC 8656 over UDP): an allocation on a relay made
with aioice's TURN client, kept alive and confirmed, with a ChannelData fast path on its
own connected socket. The relay server it talks to is kbwg.relay (or coturn)."""
