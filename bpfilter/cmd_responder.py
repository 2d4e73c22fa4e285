"""`bpfilter responder`: the process that sends REJECT's replies in a network namespace."""

from __future__ import annotations

import argparse
import os
import sys

from bpfilter import netns, responder


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "responder",
        help="send the ICMP errors and TCP resets of REJECT rules (started by the loaders)",
        description="Read the reject events of the rulesets loaded in a network namespace and "
        "send the reply iptables' REJECT would send. bpfilter-restore and bpfilter-iptables "
        "start it detached when a ruleset REJECTs; `bpfilter flush` stops it.",
    )
    p.add_argument("--netns", metavar="NAME", default=None,
                   help="network namespace from `ip netns list` (default: this one)")
    return p


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("bpfilter responder: must be run as root (raw sockets, pins in bpffs)",
              file=sys.stderr)
        return 4
    try:
        if args.netns is not None:
            netns.path(args.netns)
        return responder.main(args.netns)
    except (netns.NetnsError, OSError) as e:
        print(f"bpfilter responder: {e}", file=sys.stderr)
        return 4
