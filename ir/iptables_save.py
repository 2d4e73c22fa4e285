"""IR -> the text iptables-save prints (byte-identical per table, without `#` lines)."""

from __future__ import annotations

from bpfilter.ir.matches import MATCHES, Ctx
from bpfilter.ir.model import Chain, Rule, Ruleset, Table, TargetKind
from bpfilter.ir.targets import TARGETS
from bpfilter.ir.values import format_prefix, proto_name


def _bits(table: Table) -> int:
    return 128 if table.family.value == "ip6" else 32


def format_rule(rule: Rule, chain: str, *, bits: int = 32, table: str = "filter") -> str:
    """One rule as `-A CHAIN ...` in iptables-save's canonical option order."""
    out = ["-A", chain]
    if rule.src is not None:
        if rule.src_neg:
            out.append("!")
        out += ["-s", format_prefix(rule.src)]
    if rule.dst is not None:
        if rule.dst_neg:
            out.append("!")
        out += ["-d", format_prefix(rule.dst)]
    # iptables-save 1.8.9 prints nothing for "+" (an empty interface mask), even negated.
    if rule.iif is not None and rule.iif != "+":
        if rule.iif_neg:
            out.append("!")
        out += ["-i", rule.iif]
    if rule.oif is not None and rule.oif != "+":
        if rule.oif_neg:
            out.append("!")
        out += ["-o", rule.oif]
    if rule.proto is not None:
        if rule.proto_neg:
            out.append("!")
        out += ["-p", proto_name(rule.proto)]
    if rule.fragment is not None:
        if not rule.fragment:
            out.append("!")
        out.append("-f")
    ctx = None
    if rule.matches or (rule.target is not None and rule.target.options):
        ctx = Ctx(bits, rule.proto, rule.proto_neg, table, chain)
    for m in rule.matches:
        out += ["-m", m.kind]
        assert ctx is not None
        text = MATCHES[m.kind].save({o.name: o for o in m.options}, ctx)
        if text:
            out.append(text)
    t = rule.target
    if t is not None:
        out += ["-g" if t.kind is TargetKind.GOTO else "-j", t.name]
        if t.kind is TargetKind.EXTENSION:
            text = TARGETS[t.name].save({o.name: o for o in t.options},
                                        ctx or Ctx(bits, rule.proto, rule.proto_neg, table,
                                                   chain))
            if text:
                out.append(text)
    return " ".join(out)


def _ordered(table: Table) -> list[Chain]:
    base = [c for c in table.chains if c.is_base]
    # iptables-save lists user chains sorted by name (strcmp order).
    user = sorted((c for c in table.chains if not c.is_base), key=lambda c: c.name.encode())
    return base + user


def format_table(table: Table, *, counters: bool = False) -> str:
    """One `*table ... COMMIT` block."""
    bits = _bits(table)
    chains = _ordered(table)
    lines = [f"*{table.name}"]
    for c in chains:
        p, b = c.counters if counters and c.counters else (0, 0)
        lines.append(f":{c.name} {c.policy if c.is_base else '-'} [{p}:{b}]")
    for c in chains:
        for r in c.rules:
            text = format_rule(r, c.name, bits=bits, table=table.name)
            if counters:
                p, b = r.counters or (0, 0)
                text = f"[{p}:{b}] {text}"
            lines.append(text)
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def to_iptables_save(ruleset: Ruleset, *, table: str | None = None,
                     counters: bool = False) -> str:
    """The ruleset as iptables-save text: tables in ruleset order, no `#` lines."""
    return "".join(format_table(t, counters=counters) for t in ruleset.tables
                   if table is None or t.name == table)
