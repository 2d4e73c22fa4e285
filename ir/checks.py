"""Commit-time checks iptables (and the kernel behind it) make on a whole table."""

from __future__ import annotations

from dataclasses import dataclass

from bpfilter.codegen.uapi import NfHook
from bpfilter.ir.matches import LIMIT_SCALE, MATCHES
from bpfilter.ir.model import Chain, Family, Match, Rule, Table, TargetKind
from bpfilter.ir.targets import TARGETS


@dataclass(frozen=True, slots=True)
class Problem:
    """Something the kernel would refuse at COMMIT, located at a rule."""

    line: int
    col: int
    message: str


# Matches the kernel registers for one protocol only (`-m tcp` needs `-p tcp`).
MATCH_PROTO = {"tcp": 6, "udp": 17, "sctp": 132, "icmp": 1, "icmp6": 58, "tcpmss": 6,
               "esp": 50, "mh": 135, "dccp": 33, "osf": 6, "ipcomp": 108}
MATCH_PROTO4 = {"ah": 51}  # ipt_ah is registered for IPPROTO_AH; ip6t_ah walks the headers
# Hooks a target may run at (x_tables checkentry hook masks).
TARGET_HOOKS: dict[str, frozenset[NfHook]] = {
    "DNAT": frozenset({NfHook.PRE_ROUTING, NfHook.LOCAL_OUT}),
    "REDIRECT": frozenset({NfHook.PRE_ROUTING, NfHook.LOCAL_OUT}),
    "SNAT": frozenset({NfHook.POST_ROUTING, NfHook.LOCAL_IN}),
    "MASQUERADE": frozenset({NfHook.POST_ROUTING}),
    "REJECT": frozenset({NfHook.LOCAL_IN, NfHook.FORWARD, NfHook.LOCAL_OUT}),
    "CLASSIFY": frozenset({NfHook.LOCAL_OUT, NfHook.FORWARD, NfHook.POST_ROUTING}),
    "DNPT": frozenset({NfHook.PRE_ROUTING, NfHook.LOCAL_OUT}),
    "SNPT": frozenset({NfHook.LOCAL_IN, NfHook.POST_ROUTING}),
    "TPROXY": frozenset({NfHook.PRE_ROUTING}),
    "SYNPROXY": frozenset({NfHook.LOCAL_IN, NfHook.FORWARD}),
}
MATCH_HOOKS: dict[str, frozenset[NfHook]] = {
    "mac": frozenset({NfHook.PRE_ROUTING, NfHook.LOCAL_IN, NfHook.FORWARD}),
    "owner": frozenset({NfHook.LOCAL_OUT, NfHook.POST_ROUTING}),
    "eui64": frozenset({NfHook.PRE_ROUTING, NfHook.LOCAL_IN, NfHook.FORWARD}),
    "socket": frozenset({NfHook.PRE_ROUTING, NfHook.LOCAL_IN}),
    "cgroup": frozenset({NfHook.LOCAL_OUT, NfHook.POST_ROUTING, NfHook.LOCAL_IN}),
    "osf": frozenset({NfHook.PRE_ROUTING, NfHook.LOCAL_IN, NfHook.FORWARD}),
    "realm": frozenset({NfHook.POST_ROUTING, NfHook.FORWARD, NfHook.LOCAL_OUT,
                        NfHook.LOCAL_IN}),
}


def _jumps(chain: Chain) -> list[tuple[Rule, str]]:
    return [(r, r.target.name) for r in chain.rules
            if r.target is not None and r.target.kind in (TargetKind.JUMP, TargetKind.GOTO)]


_Jumps = dict[str, list[tuple[Rule, str]]]


def _scan(table: Table) -> tuple[_Jumps, _Jumps, list[tuple[int, Rule]]]:
    """One pass over every rule: each chain's jumps, the jumps the kernel's loop check walks
    (_walked_jumps), and the rules _check_rule could refuse (a plain rule with a verdict or
    no target has nothing to check; blocklists are mostly such rules)."""
    jumps: _Jumps = {}
    walked: _Jumps = {}
    checked: list[tuple[int, Rule]] = []  # (chain index, rule)
    verdict, jump, goto = TargetKind.VERDICT, TargetKind.JUMP, TargetKind.GOTO
    for ci, chain in enumerate(table.chains):
        found: list[tuple[Rule, str]] = []
        stop: int | None = None
        for r in chain.rules:
            t = r.target
            if r.matches:
                checked.append((ci, r))
            if t is None:
                continue
            kind = t.kind
            if kind is verdict:
                if stop is None and r.src is None and r.dst is None and _unconditional(r):
                    stop = len(found)
                continue
            if kind is jump or kind is goto:
                found.append((r, t.name))
            if not r.matches:
                checked.append((ci, r))
        jumps[chain.name] = found
        walked[chain.name] = found if stop is None else found[:stop]
    return jumps, walked, checked


def reachable_hooks(table: Table, jumps: _Jumps | None = None
                    ) -> dict[str, frozenset[NfHook]]:
    """For every chain, the hooks whose base chain can reach it through jumps and gotos
    (`jumps`: each chain's jumps, when already known)."""
    by_name = {c.name: c for c in table.chains}
    if jumps is None:
        jumps = {c.name: _jumps(c) for c in table.chains}
    hooks: dict[str, set[NfHook]] = {c.name: set() for c in table.chains}
    for base in table.chains:
        if base.hook is None:
            continue
        stack = [base.name]
        seen = set()
        while stack:
            name = stack.pop()
            if name in seen or name not in by_name:
                continue
            seen.add(name)
            hooks[name].add(base.hook)
            stack.extend(t for _, t in jumps[name])
    return {k: frozenset(v) for k, v in hooks.items()}


def _walked_jumps(chain: Chain) -> list[tuple[Rule, str]]:
    # The kernel's loop check (mark_source_chains) stops walking a chain at its first
    # unconditional ACCEPT/DROP/RETURN: jumps after it close no loop.
    for i, r in enumerate(chain.rules):
        t = r.target
        if t is not None and t.kind is TargetKind.VERDICT and _unconditional(r):
            return _jumps(Chain(chain.name, chain.rules[:i]))
    return _jumps(chain)


def _unconditional(r: Rule) -> bool:
    return (not r.matches and r.src is None and r.dst is None and r.iif is None
            and r.oif is None and not r.proto and r.fragment is None
            and not (r.src_neg or r.dst_neg or r.iif_neg or r.oif_neg or r.proto_neg))


def find_loop(table: Table, walked: _Jumps | None = None) -> Rule | None:
    """A rule whose jump closes a cycle reachable from a base chain, if there is one
    (`walked`: each chain's _walked_jumps, when already known).

    The kernel only walks chains reachable from its hooks, so an unreachable cycle
    (`-A A -g A` with nothing jumping to A) is accepted, as iptables accepts it.
    """
    by_name = {c.name: c for c in table.chains}
    if walked is None:
        walked = {c.name: _walked_jumps(c) for c in table.chains}
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done

    def visit(name: str) -> Rule | None:
        state[name] = 1
        for rule, target in walked[name]:
            if target not in by_name:
                continue
            s = state.get(target)
            if s == 1:
                return rule
            if s is None:
                found = visit(target)
                if found is not None:
                    return found
        state[name] = 2
        return None

    for c in table.chains:
        if c.hook is not None and c.name not in state:
            found = visit(c.name)
            if found is not None:
                return found
    return None


def check_table(table: Table) -> list[Problem]:
    """Everything the kernel would refuse when this table is committed."""
    problems: list[Problem] = []
    names = {c.name for c in table.chains}
    jumps, walked, checked = _scan(table)
    hooks = reachable_hooks(table, jumps)
    # Problems in chain order, each chain's policy before its rules.
    at = 0
    for ci, chain in enumerate(table.chains):
        if chain.hook is not None and chain.policy not in ("ACCEPT", "DROP"):
            problems.append(Problem(chain.line, 1, f"bad policy on chain {chain.name}"))
        while at < len(checked) and checked[at][0] == ci:
            problems.extend(_check_rule(table, chain, checked[at][1], names, hooks[chain.name]))
            at += 1
    loop = find_loop(table, walked)
    if loop is not None:
        problems.append(Problem(loop.line, loop.col, "Too many levels of symbolic links "
                                "(the jump creates a loop)"))
    return problems


def _check_rule(table: Table, chain: Chain, rule: Rule, names: set[str],
                hooks: frozenset[NfHook]) -> list[Problem]:
    # Only called for rules with matches or a jump/goto/extension target (_scan): a check
    # on anything else needs _scan to pass such rules too.
    out = []
    t = rule.target
    where = (rule.line, rule.col)
    for m in rule.matches:
        ext = MATCHES[m.kind]
        if ext.tables is not None and table.name not in ext.tables:
            out.append(Problem(*where, f"{m.kind} match is only valid in the "
                               f"{'/'.join(sorted(ext.tables))} table"))
        if m.kind == "limit" and _limit_overflows(m):
            out.append(Problem(*where, "limit: rate times burst overflows, try a lower one"))
        need = MATCH_PROTO.get(m.kind)
        if need is None and table.family is Family.IP:
            need = MATCH_PROTO4.get(m.kind)
        if need is not None and (rule.proto != need or rule.proto_neg):
            out.append(Problem(*where, f"{m.kind} match: only valid for protocol {need}"))
        allowed = MATCH_HOOKS.get(m.kind)
        if allowed is not None and hooks - allowed:
            out.append(Problem(*where, f"{m.kind} match: used from a hook where it is invalid"))
        why = _option_hooks(m, hooks)
        if why is not None:
            out.append(Problem(*where, why))
    if t is None:
        return out
    if t.kind in (TargetKind.JUMP, TargetKind.GOTO) and t.name not in names:
        out.append(Problem(*where, f"chain `{t.name}' does not exist"))
    if t.kind is not TargetKind.EXTENSION:
        return out
    ext = TARGETS[t.name]
    if ext.tables is not None and table.name not in ext.tables:
        out.append(Problem(*where, f"{t.name} target is only valid in the "
                           f"{'/'.join(sorted(ext.tables))} table"))
    allowed = TARGET_HOOKS.get(t.name)
    if allowed is not None and hooks - allowed:
        out.append(Problem(*where, f"{t.name} target: used from a hook where it is invalid"))
    if t.name == "SET" and (t.get("--map-prio") is not None or t.get("--map-queue") is not None) \
            and hooks & _IN_HOOKS:
        out.append(Problem(*where, "SET target: mapping of prio or/and queue is allowed only "
                           "from OUTPUT/FORWARD/POSTROUTING chains"))
    if t.name == "REJECT":
        rw = t.get("--reject-with")
        if rw is not None and rw.value == "tcp-reset" and (rule.proto != 6 or rule.proto_neg):
            out.append(Problem(*where, "REJECT --reject-with tcp-reset needs -p tcp"))
    if t.name == "TCPMSS":
        if rule.proto != 6 or rule.proto_neg:
            out.append(Problem(*where, "TCPMSS target: only valid for TCP"))
        elif not any(m.kind == "tcp" and _syn_match(m) for m in rule.matches):
            out.append(Problem(*where, "TCPMSS target: only works on TCP SYN packets"))
        elif t.get("--clamp-mss-to-pmtu") is not None and hooks - {
                NfHook.FORWARD, NfHook.LOCAL_OUT, NfHook.POST_ROUTING}:
            out.append(Problem(*where, "TCPMSS --clamp-mss-to-pmtu: only valid in FORWARD, "
                               "OUTPUT and POSTROUTING"))
    return out


_IN_HOOKS = frozenset({NfHook.PRE_ROUTING, NfHook.LOCAL_IN})  # no output device yet
_OUT_HOOKS = frozenset({NfHook.LOCAL_OUT, NfHook.POST_ROUTING})  # no input device


def _option_hooks(m: Match, hooks: frozenset[NfHook]) -> str | None:
    """Options whose checkentry refuses some of the hooks the rule's chain is reached from."""
    if m.kind == "policy":
        d = m.get("--dir")
        if d is not None and d.value == "in" and hooks & _OUT_HOOKS:
            return "policy match: input policy not valid in POSTROUTING and OUTPUT"
        if d is not None and d.value == "out" and hooks & _IN_HOOKS:
            return "policy match: output policy not valid in PREROUTING and INPUT"
    elif m.kind == "devgroup":
        if m.get("--src-group") is not None and hooks & _OUT_HOOKS:
            return "devgroup: --src-group is not valid in OUTPUT and POSTROUTING"
        if m.get("--dst-group") is not None and hooks & _IN_HOOKS:
            return "devgroup: --dst-group is not valid in PREROUTING and INPUT"
    elif m.kind == "physdev":
        bridged = m.get("--physdev-is-bridged")
        if (m.get("--physdev-out") is not None or m.get("--physdev-is-out") is not None) \
                and (bridged is None or bridged.negated) and NfHook.LOCAL_OUT in hooks:
            return ("physdev match: using --physdev-out and --physdev-is-out are only "
                    "supported in the FORWARD and POSTROUTING chains with bridged traffic")
    return None


# xt_limit converts rates to credits with the kernel's HZ (CONFIG_HZ; 250 on Debian).
KERNEL_HZ = 250
_CREDITS_PER_JIFFY = 1 << ((0xFFFFFFFF // (KERNEL_HZ * 86400)).bit_length() - 1)


def _user2credits(user: int) -> int:
    if user > 0xFFFFFFFF // (KERNEL_HZ * _CREDITS_PER_JIFFY):
        return (user // LIMIT_SCALE) * KERNEL_HZ * _CREDITS_PER_JIFFY
    return user * KERNEL_HZ * _CREDITS_PER_JIFFY // LIMIT_SCALE


def _limit_overflows(m: Match) -> bool:
    """xt_limit refuses a rule whose u32 avg * burst wraps (checkentry returns -ERANGE)."""
    avg = m.get("--limit")
    burst = m.get("--limit-burst")
    if avg is None or burst is None:
        return False
    a, b = int(avg.value), int(burst.value)
    return b == 0 or _user2credits((a * b) & 0xFFFFFFFF) < _user2credits(a)


def _syn_match(m: object) -> bool:
    flags = m.get("--tcp-flags")  # type: ignore[attr-defined]
    if flags is None or flags.negated:
        return False
    return bool(flags.value[1] & 0x02)
