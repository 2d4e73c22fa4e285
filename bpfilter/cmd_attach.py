"""`bpfilter attach`: run a filter chain of an iptables ruleset as an XDP or TC program on an
interface (pinned, so it stays after the command exits; `bpfilter flush` removes it)."""

from __future__ import annotations

import argparse
import json
import sys

from bpfilter import bpf, bpffs, ifattach, netns, state
from bpfilter.codegen.compiler import CompileError
from bpfilter.codegen.flavor_packet import DEFAULT_CHAIN
from bpfilter.codegen.uapi import IfHook
from bpfilter.grammar.errors import ParseError
from bpfilter.loader import LoadError
from bpfilter.restore import CliExit, locked


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "attach",
        help="run a chain of the filter table as an XDP or TC program on an interface",
        description="Compile one built-in chain of the filter table of an iptables-save "
        "file (default INPUT at ingress, OUTPUT at egress; the user chains it reaches come "
        "along) into an XDP or TC program and attach it to an interface. Attaching again to "
        "the same interface, hook and IP version swaps the program in place. Rules using "
        "what the hook cannot see are refused with their line.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--xdp", metavar="DEV", help="XDP, on frames DEV receives")
    where.add_argument("--tc-ingress", metavar="DEV", help="TC (tcx) ingress of DEV")
    where.add_argument("--tc-egress", metavar="DEV", help="TC (tcx) egress of DEV")
    p.add_argument("--chain", metavar="NAME", default=None,
                   help="built-in chain of the filter table to run (default: INPUT, or "
                   "OUTPUT with --tc-egress)")
    p.add_argument("-6", "--ipv6", action="store_true",
                   help="the file is ip6tables-save text (default: iptables)")
    p.add_argument("--netns", metavar="NAME", default=None,
                   help="network namespace from `ip netns list` (default: this one)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-w", "--wait", type=float, nargs="?", const=float("inf"), default=None,
                   metavar="SECS", help="wait for the bpfilter lock (default: fail at once)")
    p.add_argument("file", nargs="?", default="-", metavar="FILE",
                   help="iptables-save text (default: standard input)")
    return p


def hook_and_device(args: argparse.Namespace) -> tuple[IfHook, str]:
    if args.xdp is not None:
        return IfHook.XDP, args.xdp
    if args.tc_ingress is not None:
        return IfHook.TC_INGRESS, args.tc_ingress
    return IfHook.TC_EGRESS, args.tc_egress


def run(args: argparse.Namespace) -> int:
    hook, dev = hook_and_device(args)
    chain = args.chain or DEFAULT_CHAIN[hook]
    family = 6 if args.ipv6 else 4
    name = "<stdin>" if args.file == "-" else args.file
    try:
        if args.file == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(args.file, "rb") as f:
                data = f.read()
    except OSError as e:
        print(f"bpfilter attach: can't open {args.file}: {e.strerror}", file=sys.stderr)
        return 1
    text = data.decode("utf-8", "surrogateescape")
    try:
        ruleset, compiled = ifattach.compile_for(text, family, hook, dev, chain, name)
    except ParseError as e:
        print(f"bpfilter attach: {e}", file=sys.stderr)
        return e.exit_code
    except (CompileError, ValueError) as e:
        print(f"bpfilter attach: {name}:{e}", file=sys.stderr)
        return 2
    try:
        state.require_root("bpfilter attach")
        if args.netns is not None:
            netns.path(args.netns)
        with locked(args.wait):
            key, replaced = ifattach.attach(ruleset, compiled, dev, args.netns)
    except CliExit as e:
        sys.stderr.write(e.err)
        return e.code
    except LoadError as e:
        print(f"bpfilter attach: {name}: {e}", file=sys.stderr)
        return 4
    except (ifattach.AttachError, state.StateError, netns.NetnsError, bpffs.BpffsError,
            bpf.BpfError, OSError) as e:
        print(f"bpfilter attach: {e}", file=sys.stderr)
        return 4
    if args.json:
        print(json.dumps({"hook": ifattach.HOOK_NAMES[hook], "dev": dev, "family": family,
                          "chain": chain, "netns": args.netns, "replaced": replaced},
                         sort_keys=True))
    else:
        print(f"{'replaced' if replaced else 'attached'} {key} (chain {chain})")
    return 0
