"""`bpfilter status`: what bpfilter has loaded in a network namespace."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from bpfilter import bpf, bpffs, netns, state


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
    except (state.StateError, netns.NetnsError, bpffs.BpffsError, bpf.BpfError) as e:
        print(f"bpfilter status: {e}", file=sys.stderr)
        return 4
    if args.json:
        docs = [{"netns": ns, "tables": [dataclasses.asdict(t) for t in tables]}
                for ns, tables in found]
        print(json.dumps(docs if args.all else docs[0], sort_keys=True))
        return 0
    if args.all and not found:
        print("nothing loaded by bpfilter in any network namespace")
    for ns, tables in found:
        _print(ns, tables, args.all)
    return 0


def _print(ns: str | None, tables: list[state.TableStatus], heading: bool) -> None:
    where = f"network namespace {ns}" if ns else "this network namespace"
    if heading:
        print(f"{where}:")
    if not tables:
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
