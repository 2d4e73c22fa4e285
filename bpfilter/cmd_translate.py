"""`bpfilter translate`: parse a ruleset and print it canonically, without touching the kernel."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bpfilter.grammar.errors import ParseError
from bpfilter.grammar.iptables import parse_restore
from bpfilter.ir.iptables_save import to_iptables_save
from bpfilter.ir.json import iter_json


def register(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "translate",
        help="parse a ruleset and print it as canonical iptables-save text or JSON",
        description="Parse iptables-restore input and print what iptables-save would print "
        "after loading it (or the IR as JSON). Nothing is loaded into the kernel.",
    )
    p.add_argument("--from", dest="source", choices=("iptables", "ip6tables"),
                   default="iptables", help="input syntax (default: iptables)")
    p.add_argument("--to", dest="dest", choices=("iptables", "json"), default="iptables",
                   help="output format (default: iptables)")
    p.add_argument("file", nargs="?", default="-", metavar="FILE",
                   help="input file (default: standard input)")
    return p


def run(args: argparse.Namespace) -> int:
    if args.file == "-":
        name = "<stdin>"
        text = sys.stdin.buffer.read().decode("utf-8", "surrogateescape")
    else:
        name = args.file
        try:
            with open(args.file, "rb") as f:
                text = f.read().decode("utf-8", "surrogateescape")
        except OSError as e:
            print(f"bpfilter translate: can't open {args.file}: {e.strerror}", file=sys.stderr)
            return 1
    family = 6 if args.source == "ip6tables" else 4
    try:
        ruleset = parse_restore(text, family=family, filename=name)
    except ParseError as e:
        print(f"bpfilter translate: {e}", file=sys.stderr)
        return e.exit_code
    try:
        if args.dest == "json":
            sys.stdout.writelines(iter_json(ruleset))
        else:
            sys.stdout.write(to_iptables_save(ruleset))
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`| head`); say nothing more, as cat and iptables-save do.
        sys.stdout = None
        return 1
    return 0
