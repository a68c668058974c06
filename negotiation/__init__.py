"""kbwg.negotiation: candidates and gathering, the STUN client, NAT behaviour probing,
sealed wire messages, offer/answer sessions, connectivity checks and path choice. It
depends only on kbwg.core and is driven through interfaces it declares: a signalling
channel (`signalling.SignalMessage`, a post function) and a send function for checks."""
