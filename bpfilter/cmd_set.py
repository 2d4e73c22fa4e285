"""`bpfilter set`: create, fill and inspect the sets `-m set --match-set` rules look up."""

from __future__ import annotations

import argparse
import json
import sys

from bpfilter import bpf, bpffs, netns, sets, state
from bpfilter.codegen.sets import DEFAULT_MAXELEM, FAMILIES, SET_TYPES, SetError, SetType
from bpfilter.restore import CliExit, locked

EXIT_FAIL = 1  # ipset's exit status for a refused command
EXIT_RESOURCE = 4


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "set",
        help="manage bpfilter's sets (what ipset is to iptables)",
        description="Sets are pinned BPF maps of a network namespace that `-m set "
        "--match-set NAME src|dst[,src|dst]` rules look up. Adding or deleting an element "
        "takes effect at once for every loaded rule, without reloading a program.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--netns", metavar="NAME", default=None,
                        help="network namespace from `ip netns list` (default: this one)")
    common.add_argument("--json", action="store_true", help="print JSON")
    cmds = p.add_subparsers(dest="set_command", metavar="COMMAND", required=True)

    c = cmds.add_parser("create", parents=[common], help="create a set",
                        description="bpfilter set create NAME TYPE [family inet|inet6] "
                        "[maxelem N]")
    c.add_argument("name")
    c.add_argument("type", choices=SET_TYPES)
    c.add_argument("options", nargs="*", metavar="family inet|inet6 | maxelem N")
    c.add_argument("--exist", action="store_true",
                   help="no error when an identical set exists")
    c.add_argument("-w", "--wait", type=float, nargs="?", const=float("inf"), default=None,
                   metavar="SECS", help="wait for the bpfilter lock (default: fail at once)")
    for name, what in (("add", "add elements"), ("del", "delete elements")):
        e = cmds.add_parser(name, parents=[common], help=what)
        e.add_argument("name")
        e.add_argument("elements", nargs="+", metavar="ELEMENT",
                       help="ADDR[/CIDR] or ADDR[/CIDR],[tcp|udp|sctp|udplite:]PORT[-PORT]")
        e.add_argument("--exist", action="store_true",
                       help="no error for an element already there (add) or absent (del)")
    t = cmds.add_parser("test", parents=[common], help="is an element in the set (exit 0/1)")
    t.add_argument("name")
    t.add_argument("element")
    lst = cmds.add_parser("list", parents=[common], help="list sets and their elements")
    lst.add_argument("name", nargs="?")
    for name, what in (("flush", "remove every element"), ("destroy", "remove the set")):
        d = cmds.add_parser(name, parents=[common], help=what)
        d.add_argument("name")
        d.add_argument("-w", "--wait", type=float, nargs="?", const=float("inf"),
                       default=None, metavar="SECS",
                       help="wait for the bpfilter lock (default: fail at once)")
    return p


def _type(args: argparse.Namespace) -> SetType:
    opts = list(args.options)
    family, maxelem = 4, DEFAULT_MAXELEM
    while opts:
        word = opts.pop(0)
        if not opts:
            raise SetError(f"option {word!r} needs a value")
        value = opts.pop(0)
        if word == "family":
            if value not in FAMILIES:
                raise SetError(f"family must be inet or inet6, not {value!r}")
            family = FAMILIES[value]
        elif word == "maxelem":
            if not value.isdigit():
                raise SetError(f"maxelem must be a number, not {value!r}")
            maxelem = int(value)
        else:
            raise SetError(f"option {word!r} is not supported (only family and maxelem)")
    return SetType(args.type, family, maxelem)


def _print(args: argparse.Namespace, text: str, data: dict[str, object]) -> None:
    if args.json:
        print(json.dumps(data))
    elif text:
        print(text, end="")


def _execute(args: argparse.Namespace) -> int:
    cmd, ns = args.set_command, args.netns
    # Pins left by an earlier namespace of this name (deleted, created again) are not its sets.
    state.drop_stale(ns)
    if cmd == "create":
        t = _type(args)
        with locked(args.wait):
            sets.create(args.name, t, ns, exist_ok=args.exist)
        _print(args, "", {"created": args.name, "type": t.kind, "family": t.family_name,
                          "maxelem": t.maxelem})
    elif cmd == "add":
        n = sets.add(args.name, args.elements, ns, exist_ok=args.exist)
        _print(args, "", {"set": args.name, "added": n})
    elif cmd == "del":
        n = sets.delete(args.name, args.elements, ns, exist_ok=args.exist)
        _print(args, "", {"set": args.name, "deleted": n})
    elif cmd == "test":
        found = sets.test(args.name, args.element, ns)
        word = "is" if found else "is NOT"
        _print(args, f"{args.element} {word} in set {args.name}.\n",
               {"set": args.name, "element": args.element, "present": found})
        return 0 if found else EXIT_FAIL
    elif cmd == "list":
        listed = list(sets.listing(ns, args.name))
        _print(args, "\n".join(s.text() for s in listed),
               {"sets": [s.to_json() for s in listed]})
    elif cmd == "flush":
        with locked(args.wait):
            sets.flush(args.name, ns)
        _print(args, "", {"flushed": args.name})
    elif cmd == "destroy":
        with locked(args.wait):
            sets.destroy(args.name, ns)
        _print(args, "", {"destroyed": args.name})
    return 0


def run(args: argparse.Namespace) -> int:
    tool = f"bpfilter set {args.set_command}"
    try:
        state.require_root(tool)
        if args.netns is not None:
            netns.check_name(args.netns)
            netns.path(args.netns)
        bpffs.ensure_mounted()
        return _execute(args)
    except SetError as e:
        print(f"{tool}: {e}", file=sys.stderr)
        return EXIT_FAIL
    except CliExit as e:
        sys.stderr.write(e.err)
        return e.code
    except (state.StateError, netns.NetnsError, bpffs.BpffsError, bpf.BpfError) as e:
        print(f"{tool}: {e}", file=sys.stderr)
        return EXIT_RESOURCE
