"""Port mapping on the default gateway: PCP (RFC 6887), then NAT-PMP (RFC 6886), then
UPnP IGD, for the WireGuard port, so a device behind a NAT that maps per destination
(symmetric) still has one public address:port every peer can reach (the `mapped`
candidate). Runs unprivileged: requests leave from ordinary sockets and name the
internal port explicitly. Imports only kbwg.core of ours.
"""
