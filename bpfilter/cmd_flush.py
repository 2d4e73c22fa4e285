"""`bpfilter flush`: remove everything bpfilter loaded in a network namespace."""

from __future__ import annotations

import argparse
import sys

from bpfilter import bpf, bpffs, delegate, ifattach, netns, responder, state
from bpfilter.restore import CliExit, locked


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "flush",
        help="remove every table bpfilter loaded (dispatchers, programs, maps, pins)",
        description="Detach and remove everything bpfilter-restore loaded in a network "
        "namespace: filtering by bpfilter stops there at once.",
    )
    p.add_argument("--netns", metavar="NAME", default=None,
                   help="network namespace from `ip netns list` (default: this one)")
    p.add_argument("-w", "--wait", type=float, nargs="?", const=float("inf"), default=None,
                   metavar="SECS", help="wait for the bpfilter lock (default: fail at once)")
    return p


def run(args: argparse.Namespace) -> int:
    try:
        state.require_root("bpfilter flush")
        if args.netns is not None:
            netns.check_name(args.netns)
        with locked(args.wait):
            detached = ifattach.remove_all(args.netns)
            emptied = delegate.flush_tables(args.netns)  # before state.flush drops the pins
            removed = state.flush(args.netns)
            responder.stop(args.netns)
    except CliExit as e:
        sys.stderr.write(e.err)
        return e.code
    except delegate.SaveError as e:
        sys.stderr.write(f"bpfilter flush: emptying a delegated table failed: {e.err}")
        return e.code
    except (state.StateError, netns.NetnsError, bpffs.BpffsError, bpf.BpfError) as e:
        print(f"bpfilter flush: {e}", file=sys.stderr)
        return 4
    for key in removed:
        print(f"removed {key.prefix}")
    for name in emptied:
        print(f"emptied {name} (delegated to iptables)")
    for attached in detached:
        print(f"removed {attached}")
    return 0
