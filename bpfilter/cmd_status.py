"""`bpfilter status`: what bpfilter has loaded in a network namespace."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from bpfilter import bpf, bpffs, ifattach, netns, responder, state


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "status",
        help="list the tables bpfilter loaded: hooks, programs, maps, rule counts",
        description="List what bpfilter-restore loaded in a network namespace.",
    )
    p.add_argument("--netns", metavar="NAME", default=None,
                   help="network namespace from `ip netns list` (default: this one)")
    p.add_argument("--all", action="store_true",
                   help="every namespace bpfilter has loaded something in")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-c", "--counters", action="store_true",
                   help="also print each ruleset attached to an interface (bpfilter attach) "
                   "as iptables-save -c text, with its live counters")
    return p


def run(args: argparse.Namespace) -> int:
    try:
        state.require_root("bpfilter status")
        if args.all:
            where: list[str | None] = state.namespaces()
        else:
            if args.netns is not None:
                netns.path(args.netns)
            where = [args.netns]
        found = [(ns, state.status(ns)) for ns in where]
        attached = {ns: ifattach.status(ns) for ns in where}
        saved = {ns: [ifattach.saved(k, ns) for k in ifattach.keys(ns)] if args.counters
                 else [] for ns in where}
        replies = {ns: responder.status(ns) for ns in where}
    except (state.StateError, netns.NetnsError, bpffs.BpffsError, bpf.BpfError) as e:
        print(f"bpfilter status: {e}", file=sys.stderr)
        return 4
    if args.json:
        docs = [{"netns": ns, "tables": [dataclasses.asdict(t) for t in tables],
                 "interfaces": [dataclasses.asdict(a) for a in attached[ns]],
                 **({"interface_rules": saved[ns]} if args.counters else {}),
                 "responder": dataclasses.asdict(replies[ns])}
                for ns, tables in found]
        print(json.dumps(docs if args.all else docs[0], sort_keys=True))
        return 0
    if args.all and not found:
        print("nothing loaded by bpfilter in any network namespace")
    for ns, tables in found:
        _print(ns, tables, args.all, attached[ns])
        for text in saved[ns]:
            sys.stdout.write(text)
        if replies[ns].needed or replies[ns].pid is not None:
            print(replies[ns].line())
    return 0


def _print(ns: str | None, tables: list[state.TableStatus], heading: bool,
           attached: list[ifattach.Attached]) -> None:
    where = f"network namespace {ns}" if ns else "this network namespace"
    if heading:
        print(f"{where}:")
    for a in attached:
        fam = "ip" if a.family == 4 else "ip6"
        print(f"{fam} filter {a.chain} at {a.hook} of {a.dev}: {a.rules} rules, link id "
              f"{a.link_id}, prog id {a.prog_id} ({a.insns} insns)")
        for name, map_id, entries in a.maps:
            print(f"  map {name} id {map_id} ({entries} entries)")
    if not tables:
        if not attached:
            print(f"nothing loaded by bpfilter in {where}")
        return
    for t in tables:
        fam = "ip" if t.family == 4 else "ip6"
        print(f"{fam} {t.table}: generation {t.generation}, {t.chains} chains, "
              f"{t.rules} rules")
        for p in t.programs:
            print(f"  {p.chain:<12} hook {p.hook:<12} prog id {p.prog_id} "
                  f"({p.insns} insns, {p.memlock} bytes jited)")
        for name, map_id, entries in t.maps:
            print(f"  map {name} id {map_id} ({entries} entries)")
