"""`bpfilter translate`: parse a ruleset and print it canonically, without touching the kernel."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bpfilter.codegen import flavor_netfilter as nf
from bpfilter.codegen.compiler import CompiledRuleset, CompileError, compile_ruleset
from bpfilter.codegen.flavor_packet import DEFAULT_CHAIN, IfTarget
from bpfilter.codegen.link import link
from bpfilter.codegen.uapi import IfHook
from bpfilter.grammar.errors import ParseError
from bpfilter.grammar.iptables import parse_restore
from bpfilter.ir.iptables_save import to_iptables_save
from bpfilter.ir.json import iter_json
from bpfilter.ir.model import Ruleset
from bpfilter.ir.optimizer import explain

_IF_HOOKS = {"xdp": IfHook.XDP, "tc-ingress": IfHook.TC_INGRESS, "tc-egress": IfHook.TC_EGRESS}


def register(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "translate",
        help="parse a ruleset and print it as canonical iptables-save text or JSON",
        description="Parse iptables-restore input and print what iptables-save would print "
        "after loading it (or the IR as JSON). Nothing is loaded into the kernel.",
    )
    p.add_argument("--from", dest="source", choices=("iptables", "ip6tables"),
                   default="iptables", help="input syntax (default: iptables)")
    p.add_argument("--to", dest="dest", choices=("iptables", "json", "asm"),
                   default="iptables",
                   help="output format (default: iptables); asm: the compiled eBPF programs, "
                   "each rule's code marked with its input line")
    p.add_argument("--explain", action="store_true",
                   help="instead, list which rules the optimizer turned into which lookups")
    p.add_argument("--hook", choices=tuple(_IF_HOOKS), default=None,
                   help="with --to asm or --explain: compile one chain of the filter table as "
                   "the XDP or TC program `bpfilter attach` would load")
    p.add_argument("--chain", metavar="NAME", default=None,
                   help="with --hook: the built-in chain (default INPUT, OUTPUT at tc-egress)")
    p.add_argument("--dev", metavar="NAME", default=None,
                   help="with --hook: the interface (what -i/-o rules compare with)")
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
    if args.explain or args.dest == "asm":
        try:
            target = None
            if args.hook is not None:
                hook = _IF_HOOKS[args.hook]
                target = IfTarget(hook, args.chain or DEFAULT_CHAIN[hook], args.dev)
            compiled = compile_ruleset(ruleset, family, target=target)
        except (CompileError, ValueError) as e:
            print(f"bpfilter translate: {name}:{e}", file=sys.stderr)
            return 1
        lines = _explain(ruleset, compiled) if args.explain else _asm(compiled)
        try:
            sys.stdout.writelines(line + "\n" for line in lines)
            sys.stdout.flush()
        except BrokenPipeError:
            sys.stdout = None
            return 1
        return 0
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


def _explain(ruleset: Ruleset, compiled: CompiledRuleset) -> list[str]:
    out = []
    for table in ruleset.tables:
        for chain in table.chains:
            made = [run for t, c, run, _ in compiled.lookups
                    if t == table.name and c == chain.name]
            folded = sum(len(run.rules) for run in made)
            out.append(f"{table.name} {chain.name}: {len(chain.rules)} rules, {folded} in "
                       f"{len(made)} lookup(s), {len(chain.rules) - folded} one by one")
            out.extend(f"  {line}" for line in explain(made))
    for spec in compiled.maps:
        out.append(f"map {spec.name}: {spec.type.name.lower()}, key {spec.key_size} B, "
                   f"value {spec.value_size} B, {spec.max_entries} entries")
    return out


def _asm(compiled: CompiledRuleset) -> list[str]:
    """Each program linked with kernel offsets from BTF when readable (else 0) and kfuncs
    and maps by name; comments name the rules' input lines."""
    try:
        from bpfilter.loader import kernel_layout

        layout = kernel_layout()
        note = None
    except (OSError, ValueError, KeyError):
        layout = nf.KernelLayout({f: 0 for f in nf.KField})
        note = "; kernel struct offsets unknown (no readable BTF): shown as 0"
    out = []
    for program in compiled.programs:
        kfuncs = {k: i + 1 for i, k in enumerate(program.kfuncs)}
        linked = link(program.code(layout), kfuncs=kfuncs)
        out.append(f"; program {program.name}: table {program.table}, chain {program.chain}, "
                   f"hook {program.hook.name}, priority {program.priority}, "
                   f"{len(linked)} instructions")
        if note:
            out.append(note)
        out.extend(linked.dump(kfunc_names={i: k for k, i in kfuncs.items()}))
        for slot, map_name in linked.relocations:
            out.append(f"; slot {slot}: map {map_name}")
    return out
