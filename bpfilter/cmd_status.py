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
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    try:
        state.require_root("bpfilter status")
        if args.netns is not None:
            netns.path(args.netns)
        tables = state.status(args.netns)
    except (state.StateError, netns.NetnsError, bpffs.BpffsError, bpf.BpfError) as e:
        print(f"bpfilter status: {e}", file=sys.stderr)
        return 4
    if args.json:
        doc = {"netns": args.netns, "tables": [dataclasses.asdict(t) for t in tables]}
        print(json.dumps(doc, sort_keys=True))
        return 0
    where = f"network namespace {args.netns}" if args.netns else "this network namespace"
    if not tables:
        print(f"nothing loaded by bpfilter in {where}")
        return 0
    for t in tables:
        fam = "ip" if t.family == 4 else "ip6"
        print(f"{fam} {t.table}: generation {t.generation}, {t.chains} chains, "
              f"{t.rules} rules")
        for p in t.programs:
            print(f"  {p.chain:<12} hook {p.hook:<12} prog id {p.prog_id} "
                  f"({p.insns} insns, {p.memlock} bytes jited)")
        for name, map_id, entries in t.maps:
            print(f"  map {name} id {map_id} ({entries} entries)")
    return 0
