"""Link shaping without netem: loss by an nftables rule, delay by NFQUEUE and `delayer.py`.

Both act, like netem, on one side of one link: by default on packets *leaving* the
interface (egress), so a delay of 40 ms on one end of a link adds 40 ms to the round trip.
Shape both ends (or use `Direction.BOTH`) for a symmetric link.

Where the hooks sit, and why:
- loss: nftables `prerouting`/`postrouting` at priority -300 (before conntrack), so a
  dropped packet never creates connection state.
- delay: iptables-nft (the kernel lacks nft's `queue` expression; the xt NFQUEUE target
  works). Ingress and locally sent egress are queued in the `raw` table, before conntrack,
  so packets of a new flow reach conntrack one by one in order. Forwarded egress can only
  be queued after conntrack (`mangle FORWARD`): through a NAT, two packets of a *new* flow
  held together are NATed separately and may clash; shape the hosts' links, or the
  router's ingress, rather than a NAT router's egress when that matters.
- queued packets stay charged to the sending socket (netem orphans them, NFQUEUE cannot):
  on a delayed *local* egress a socket keeps at most its send buffer in flight (212992
  bytes by default, about 256 small datagrams; `net.core.wmem_default` is not writable
  inside a netns here), so a fast non-blocking sender gets EAGAIN and a blocking one is
  throttled to about sndbuf/delay. Measured with a 1000-datagram burst and 20 ms: 614
  delivered on the sender's egress, 1000 on the receiver's ingress or a router's egress
  (crossing a veth into another namespace releases the charge). Shape the ingress of the
  far end, or a router, for high-rate flows; wireguard-go forces 7 MB socket buffers.
- jitter: the delayer adds a uniform random 0..J ms to each packet (netem's `delay
  D+J/2 J/2`) and, like netem, lets packets overtake each other unless asked to keep
  their order (see delayer.py).
- no `--queue-bypass`: if a delayer dies its link goes dark rather than silently losing its
  delay (a benchmark would otherwise measure the wrong thing); `World.check()` names the
  dead delayer so the failure is loud and clear.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Direction(enum.Enum):
    EGRESS = "egress"
    INGRESS = "ingress"
    BOTH = "both"

    def sides(self) -> tuple[Direction, ...]:
        if self is Direction.BOTH:
            return (Direction.EGRESS, Direction.INGRESS)
        return (self,)


# Resolution of the loss rule: percent with two decimals.
_LOSS_SCALE = 10000


def loss_ruleset(losses: dict[tuple[str, Direction], float]) -> str:
    """The `kbwg_shape` table for all lossy (interface, direction) pairs of one namespace."""
    egress: list[str] = []
    ingress: list[str] = []
    ordered = sorted(losses.items(), key=lambda kv: (kv[0][0], kv[0][1].value))
    for (ifname, direction), percent in ordered:
        threshold = round(percent * _LOSS_SCALE / 100)
        if threshold <= 0:
            continue
        match = "oifname" if direction is Direction.EGRESS else "iifname"
        # numgen yields 0..scale-1, so `< scale` would not parse: 100 % is a plain drop.
        chance = ""
        if threshold < _LOSS_SCALE:
            chance = f"numgen random mod {_LOSS_SCALE} < {threshold} "
        rule = f'    {match} "{ifname}" {chance}drop'
        (egress if direction is Direction.EGRESS else ingress).append(rule)
    lines = ["table ip kbwg_shape {}", "delete table ip kbwg_shape"]
    if egress or ingress:
        lines += [
            "table ip kbwg_shape {",
            "  chain egress {",
            "    type filter hook postrouting priority -300; policy accept;",
            *egress,
            "  }",
            "  chain ingress {",
            "    type filter hook prerouting priority -300; policy accept;",
            *ingress,
            "  }",
            "}",
        ]
    return "\n".join(lines) + "\n"


def delay_rules(ifname: str, direction: Direction, queue: int) -> list[list[str]]:
    """iptables rule specs (table, chain, match..., target) queueing one side of a link."""
    target = ["-j", "NFQUEUE", "--queue-num", str(queue)]
    if direction is Direction.INGRESS:
        return [["-t", "raw", "PREROUTING", "-i", ifname, *target]]
    return [
        ["-t", "raw", "OUTPUT", "-o", ifname, *target],
        ["-t", "mangle", "FORWARD", "-o", ifname, *target],
    ]


def iptables_argv(action: str, rule: list[str]) -> list[str]:
    """`iptables -t T -A|-D CHAIN ...` for a rule spec made by `delay_rules`."""
    table_opt, table, chain, *rest = rule
    return ["iptables", "-w", table_opt, table, action, chain, *rest]


@dataclass
class DelaySpec:
    """One delayed side of one link: what `World` needs to undo or report it."""

    node: str
    ifname: str
    direction: Direction
    delay_ms: float
    queue: int
    rules: list[list[str]]
    pid: int
    jitter_ms: float = 0.0
    in_order: bool = False
