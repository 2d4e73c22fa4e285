"""Rules -> eBPF netfilter programs: one per (table, built-in chain), iptables' exact verdicts.

Layout of one program (all jumps between labels; verdicts are emitted in place, so a jump
never crosses more than one rule and 16-bit offsets always suffice):

- ``main``: the netfilter prologue (flavor_netfilter) fills the meta area (R7 points at it),
  then calls the parts of the built-in chain in order, then counts and returns the policy;
- ``part_N``: a run of the built-in chain's rules, each ``tests -> count -> action``, a
  failing test jumping to the label after the rule. Parts are *global* BPF functions: the
  verifier checks each once, on its own, which bounds the states it keeps pending (it gives
  up past 8192) however long the chain;
- ``chain_N``: every user chain reachable from the built-in chain, once, also global:
  ``chain(meta) -> DROP | ACCEPT | CONTINUE``. ``-j X`` calls X and goes on with the next
  rule on CONTINUE; ``-g X`` calls X and passes its answer up unchanged, so a RETURN in X
  continues in the caller of the chain that did the goto (in the built-in chain: the
  policy); RETURN and falling off the end of a user chain answer CONTINUE;
  A user chain too long for one function becomes a wrapper calling its parts in turn;
- ``count(index, meta)``: the per-rule counter update (per-CPU array map, atomic adds),
  global as well, so it is verified once and not at every rule.

Runs of rules the optimizer (``ir/optimizer``) can decide with one map lookup are emitted as
one block (``codegen/lookup``): the shared tests, the lookup, the counter of the rule the map
names and that rule's action. Their maps travel in ``CompiledRuleset.maps`` with their
contents in ``CompiledRuleset.contents``.

BPF allows 8 nested frames: main, a part, the counter, and so ``MAX_CHAIN_DEPTH`` nested
user chains (a split user chain takes two). Instructions no path reaches are dropped (the
verifier refuses them).
"""

from __future__ import annotations

import bisect
import contextlib
import gc
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from bpfilter.codegen import asm, flavor_packet, flavor_tc, flavor_xdp, lookup
from bpfilter.codegen import flavor_netfilter as nf
from bpfilter.codegen.actions import actions
from bpfilter.codegen.asm import Label
from bpfilter.codegen.flavor_packet import IfTarget
from bpfilter.codegen.insn import CALL, EXIT, R0, R1, R2, R7, Insn
from bpfilter.codegen.matchers import (
    HEADER,
    MATCHERS,
    PACKET_HOOKS,
    Emitter,
    Resources,
    header_fields,
)
from bpfilter.codegen.names import COUNTERS, HOOKS, PRIORITY
from bpfilter.codegen.opcodes import CLASS_MASK, OP_MASK, Class, JmpOp, PseudoCall
from bpfilter.codegen.spec import MapSpec
from bpfilter.codegen.uapi import (
    MAX_USED_MAPS,
    AttachType,
    Hook,
    IfHook,
    MapType,
    NfProto,
    NfVerdict,
    ProgType,
)
from bpfilter.ir.model import Chain, Family, Match, Ruleset, Table, TargetKind
from bpfilter.ir.model import Rule as IrRule
from bpfilter.ir.optimizer import (
    MAX_CLASSIFIER,
    MIN_CLASSIFIER,
    MIN_RUN,
    Classifier,
    Run,
    plan,
    rest_matches,
)

COUNTER_VALUE = 16  # struct { u64 packets; u64 bytes; } per CPU
MAX_CHAIN_DEPTH = 5  # 8 BPF call frames - main - a part of the built-in chain - the counter
PART_BRANCHES = 2048  # conditional branches per part of a built-in chain (verifier: 8192)
COUNT_FUNC = "func:count"
_JMP_CLASSES = (Class.JMP, Class.JMP32)
MAIN_FUNC = "func:main"
RESERVED_MAPS = 8  # of a program's MAX_USED_MAPS, kept for the maps of matches and targets

VERDICT_TARGETS = {"ACCEPT": NfVerdict.ACCEPT, "DROP": NfVerdict.DROP}
_SHORT = {IfHook.XDP: "xdp", IfHook.TC_INGRESS: "tci", IfHook.TC_EGRESS: "tce"}  # prog names
IF_FLAVORS: dict[IfHook, flavor_packet.PacketFlavor] = {
    IfHook.XDP: flavor_xdp.XDP, IfHook.TC_INGRESS: flavor_tc.TC_INGRESS,
    IfHook.TC_EGRESS: flavor_tc.TC_EGRESS}


class CompileError(ValueError):
    """A ruleset (or one rule of it) that cannot be compiled; names the input line."""

    def __init__(self, line: int, message: str) -> None:
        self.line = line
        self.reason = message
        super().__init__(f"line {line}: {message}")


class RuleRef(NamedTuple):
    """Where a counter index comes from. ``position`` counts rules from 1 as iptables does;
    position 0 is the policy of a built-in chain."""

    table: str
    chain: str
    position: int
    line: int


# eq=False: compared and hashed by identity; it keys the loader's dicts, and a hash over
# every instruction cost milliseconds per lookup for a thousand rules.
@dataclass(frozen=True, slots=True, eq=False)
class CompiledProgram:
    """One program: where it attaches and its code (kernel offsets unresolved). A netfilter
    program, or with an IfHook an XDP or TC one (``target`` says for which interface)."""

    name: str
    table: str
    chain: str
    hook: Hook
    pf: NfProto
    priority: int
    items: tuple[nf.Item, ...]
    needs: nf.Needs
    rule_labels: tuple[tuple[str, int], ...]  # (label at a rule's first insn, counter index)
    funcs: tuple[tuple[str, str, nf.FuncKind], ...]  # (entry label, BTF name, signature)
    kfuncs: tuple[str, ...] = ("bpf_dynptr_from_skb",)
    prog_type: ProgType = ProgType.NETFILTER
    attach_type: AttachType = AttachType.NETFILTER
    target: IfTarget | None = None

    def code(self, layout: nf.KernelLayout) -> list[Insn | Label]:
        """Instructions and labels ready for the link pass."""
        return layout.resolve(self.items)


class RuleIndex(Mapping[int, RuleRef]):
    """Counter index -> RuleRef, stored per chain (a RuleRef per rule took a third of the
    time of compiling a 100,000-rule blocklist): a built-in chain's policy, then its rules;
    a user chain's rules."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._chains: list[tuple[str, str, bool, int, tuple[int, ...]]] = []
        self._len = 0

    def add(self, table: str, chain: Chain) -> None:
        """Number ``chain`` (its policy first, if built in) after the chains added so far."""
        self._starts.append(self._len)
        self._chains.append((table, chain.name, chain.is_base, chain.line,
                             tuple(r.line for r in chain.rules)))
        self._len += len(chain.rules) + (1 if chain.is_base else 0)

    def __getitem__(self, index: int) -> RuleRef:
        if not isinstance(index, int) or not 0 <= index < self._len:
            raise KeyError(index)
        i = bisect.bisect_right(self._starts, index) - 1
        table, chain, base, line, lines = self._chains[i]
        pos = index - self._starts[i] + (0 if base else 1)
        return RuleRef(table, chain, pos, lines[pos - 1] if pos else line)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self._len))

    def __len__(self) -> int:
        return self._len


@dataclass(frozen=True, slots=True)
class CompiledRuleset:
    """Everything needed to load a ruleset for one family."""

    family: int
    programs: tuple[CompiledProgram, ...]
    rule_index: Mapping[int, RuleRef]
    maps: tuple[MapSpec, ...] = field(default=())
    # Initial (key, value) pairs of maps, by map name (lookup tables of optimized runs).
    contents: Mapping[str, tuple[tuple[bytes, bytes], ...]] = field(default_factory=dict)
    # (table, chain, run, map name) for every run decided by a lookup; a classifier's maps
    # are named after it: "<name>_src", "<name>_dst"... (lookup.CLASSIFIER_MAPS).
    lookups: tuple[tuple[str, str, Run | Classifier, str], ...] = ()

    @property
    def needs_conntrack(self) -> bool:
        return any(p.needs.conntrack for p in self.programs)

    def program(self, hook: Hook, table: str = "filter") -> CompiledProgram | None:
        """The program of ``table`` at ``hook``; None when that chain needs none."""
        for p in self.programs:
            if p.hook == hook and p.table == table:
                return p
        return None


def compile_ruleset(ruleset: Ruleset, family: int = 4, *, optimize: bool = True,
                    min_run: int = MIN_RUN, min_classifier: int = MIN_CLASSIFIER,
                    max_classifier: int = MAX_CLASSIFIER,
                    target: IfTarget | None = None) -> CompiledRuleset:
    """Compile the filter and raw tables of ``ruleset`` for IPv4 (4) or IPv6 (6).

    With ``target``, compile instead one XDP or TC program (codegen/flavor_packet): the
    filter table's built-in chain ``target.chain`` and the user chains it reaches; any other
    table is refused.

    With ``optimize``, runs of at least ``min_run`` rules that one map lookup can decide
    become lookups, and stretches of at least ``min_classifier`` rules testing addresses,
    protocol and ports become bit-vector classifiers of at most ``max_classifier`` rules
    each (see ir/optimizer); verdicts and counters are the same either way.
    Raises CompileError naming the line of the first table, rule, match or target that this
    compiler does not support; nothing is silently left out.
    """
    if family not in (4, 6):
        raise ValueError(f"family must be 4 or 6, not {family}")
    reserve = RESERVED_MAPS
    with _no_cyclic_gc():
        while True:
            lookups = _Lookups(family, optimize, min_run, min_classifier, max_classifier,
                               reserve=reserve)
            try:
                return _compile(ruleset, family, lookups, target)
            except _TooManyMaps as e:
                # Matches and targets need more maps than reserved: compile again leaving
                # the runs fewer (the largest runs keep their lookups).
                if e.needed <= reserve or e.needed > MAX_USED_MAPS - 2:
                    raise CompileError(e.line, f"the ruleset needs {e.needed} maps for its "
                                       "matches and targets (recent lists, hashlimit "
                                       f"tables, sets...); a program may use at most "
                                       f"{MAX_USED_MAPS - 2}") from None
                reserve = e.needed


class _TooManyMaps(Exception):
    def __init__(self, needed: int, line: int) -> None:
        super().__init__(needed)
        self.needed = needed
        self.line = line


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Compiling allocates hundreds of thousands of small acyclic objects; the cyclic
    collector's passes over them (and over the IR) took half the time of a 100,000-rule
    compile. Reference counting still frees everything."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _compile(ruleset: Ruleset, family: int, lookups: _Lookups,
             target: IfTarget | None = None) -> CompiledRuleset:
    want = Family.IP if family == 4 else Family.IP6
    index = RuleIndex()
    numbering: dict[tuple[str, str], int] = {}  # (table, chain) -> index of its first rule
    tables = []
    for table in ruleset.tables:
        if table.family != want:
            raise CompileError(table.line, f"table '{table.name}' is {table.family.value}, "
                               f"not IPv{family}")
        if table.name not in HOOKS:
            raise CompileError(table.line, f"table '{table.name}' is not supported")
        if target is not None and table.name != "filter":
            raise CompileError(table.line, f"table '{table.name}' cannot run at "
                               f"{target.hook.name}: only a chain of the filter table does")
        tables.append(table)
        for chain in table.chains:
            _check_chain(table, chain, family)
            numbering[(table.name, chain.name)] = len(index)
            index.add(table.name, chain)
    programs = []
    lookups.numbering = numbering
    lookups.choose(tables)
    for table in tables:
        for chain in table.chains:
            if not chain.is_base:
                continue
            hook = HOOKS[table.name].get(chain.name)
            if hook is None:
                raise CompileError(chain.line, f"chain '{chain.name}' is not a built-in chain "
                                   f"of table '{table.name}'")
            if target is not None:
                if chain.name != target.chain:
                    continue
                hook = target.hook
            elif not chain.rules and chain.policy == "ACCEPT":
                continue
            programs.append(_Program(table, chain, hook, family, numbering, lookups,
                                     target).build())
    if target is not None and not programs:
        raise CompileError(tables[0].line if tables else 0, f"the filter table has no "
                           f"built-in chain {target.chain} to run at {target.hook.name}")
    counters = MapSpec(COUNTERS, MapType.PERCPU_ARRAY, 4, COUNTER_VALUE, max(1, len(index)))
    fixed: tuple[MapSpec, ...] = (counters,)
    if any(isinstance(run, Run) for _, _, run, _ in lookups.made):
        # The table's switch (bpfilter.dispatch), which says which copy of the run maps
        # is in use; the loader links the live one when there is one.
        fixed += (MapSpec(lookup.CTL_MAP, MapType.ARRAY, 4, 4, 1),)
    res = lookups.res
    if len(fixed) + len(lookups.specs) + len(res) > MAX_USED_MAPS:
        raise _TooManyMaps(len(res), tables[0].line if tables else 0)
    return CompiledRuleset(family, tuple(programs), index,
                           (*fixed, *lookups.specs, *res.all_specs()),
                           {**lookups.contents, **res.contents}, tuple(lookups.made))


# Rules lo+1..hi (positions), one rule or decided by a lookup.
Segment = tuple[int, int, "Run | Classifier | None"]


@dataclass(slots=True)
class _Lookups:
    """The optimizer's runs per chain and their maps, shared by every program of a ruleset
    (a user chain called from two built-in chains uses the same maps)."""

    family: int
    optimize: bool
    min_run: int
    min_classifier: int
    max_classifier: int
    numbering: Mapping[tuple[str, str], int] = field(default_factory=dict)
    chosen: dict[tuple[str, str], list[Run | Classifier]] = field(default_factory=dict)
    segments: dict[tuple[str, str], list[Segment]] = field(default_factory=dict)
    names: dict[tuple[str, str, int], str] = field(default_factory=dict)
    specs: list[MapSpec] = field(default_factory=list)
    contents: dict[str, tuple[tuple[bytes, bytes], ...]] = field(default_factory=dict)
    made: list[tuple[str, str, Run | Classifier, str]] = field(default_factory=list)
    res: Resources = field(default_factory=Resources)  # maps of matches and targets
    reserve: int = RESERVED_MAPS  # maps kept for ``res`` when choosing runs

    def choose(self, tables: Sequence[Table]) -> None:
        """Plan every chain; when the runs need more maps than a program may use, keep the
        ones deciding the most rules and leave the others linear."""
        self.chosen = {}
        if not self.optimize:
            return
        planned = [(t.name, c.name, run) for t in tables for c in t.chains
                   for run in plan(c.rules, self.family, self.min_run, self.min_classifier,
                                   self.max_classifier)]
        budget = MAX_USED_MAPS - 2 - self.reserve  # the counters and the switch take two
        for t, c, run in sorted(planned, key=lambda x: -len(x[2].rules)):
            # A run's map has two copies (lookup.buffer_names).
            cost = 2 if isinstance(run, Run) else len(lookup.CLASSIFIER_MAPS)
            if cost <= budget:
                budget -= cost
                self.chosen.setdefault((t, c), []).append(run)

    def segments_of(self, table: str, chain: Chain) -> list[Segment]:
        """The chain cut into single rules and runs, in order."""
        key = (table, chain.name)
        segs = self.segments.get(key)
        if segs is None:
            runs = sorted(self.chosen.get(key, []), key=lambda r: r.start)
            segs = []
            pos = 0
            for run in runs:
                segs.extend((p, p + 1, None) for p in range(pos, run.start))
                segs.append((run.start, run.stop, run))
                pos = run.stop
            segs.extend((p, p + 1, None) for p in range(pos, len(chain.rules)))
            self.segments[key] = segs
        return segs

    def map_for(self, table: str, chain: Chain, run: Run | Classifier) -> str:
        """The name of the run's map (a classifier: its maps' prefix), created (specs and
        contents) on first use."""
        key = (table, chain.name, run.start)
        name = self.names.get(key)
        if name is None:
            first = self.numbering[(table, chain.name)] + (1 if chain.is_base else 0)
            if isinstance(run, Run):
                name = f"lookup_{len(self.names)}"
                spec = lookup.map_spec(name, run)
                contents = lookup.map_contents(run, first + run.start)
                for copy in lookup.buffer_names(name):
                    self.specs.append(replace(spec, name=copy))
                    self.contents[copy] = contents
            else:
                name = f"cls{len(self.names)}"
                for spec, contents in lookup.classifier_maps(name, run, first + run.start):
                    self.specs.append(spec)
                    self.contents[spec.name] = contents
            self.names[key] = name
            self.made.append((table, chain.name, run, name))
        return name


def _check_chain(table: Table, chain: Chain, family: int) -> None:
    if chain.is_base and chain.policy not in VERDICT_TARGETS:
        raise CompileError(chain.line, f"policy '{chain.policy}' of chain '{chain.name}' is "
                           "not supported")
    checked: set[int] = set()  # ids of match tuples and targets already found fine
    for rule in chain.rules:
        if rule.iif is not None or rule.oif is not None or rule.fragment is not None:
            for name in header_fields(rule):
                why = HEADER[name].refusal(_NO_MATCH, family)
                if why is not None:
                    raise CompileError(rule.line, why)
        # Matches and targets are interned by the parser: check each object once.
        if id(rule.matches) not in checked:
            for m in rule.matches:
                matcher = MATCHERS.get(m.kind)
                why = (f"match '{m.kind}' is not supported" if matcher is None
                       else matcher.refusal(m, family))
                if why is not None:
                    raise CompileError(rule.line, why)
            checked.add(id(rule.matches))
        t = rule.target
        if t is None or id(t) in checked:
            continue
        checked.add(id(t))
        if t.kind is TargetKind.VERDICT:
            if t.name not in VERDICT_TARGETS and t.name != "RETURN":
                raise CompileError(rule.line, f"target '{t.name}' is not supported")
        elif t.kind in (TargetKind.JUMP, TargetKind.GOTO):
            callee = table.chain(t.name)
            if callee is None or callee.is_base:
                raise CompileError(rule.line, f"chain '{t.name}' is not a user chain of "
                                   f"table '{table.name}'")
        else:
            action = actions().get(t.name)
            why = (f"target '{t.name}' is not supported" if action is None
                   else action.refusal(t, family))
            if why is not None:
                raise CompileError(rule.line, why)


_NO_MATCH = Match("")  # header fields have no options to check

# -s, -d and -p compile everywhere and need nothing from the prologue, so only rules with
# other header fields (-i, -o, -f) are looked at field by field (a 100,000-rule blocklist is checked
# in a few milliseconds).
_PLAIN_HEADER = ("-s", "-d", "-p")
assert all(HEADER[n].needs == nf.Needs() and HEADER[n].check is None
           and HEADER[n].families == frozenset({4, 6}) and HEADER[n].hooks == PACKET_HOOKS
           for n in _PLAIN_HEADER)


@dataclass(slots=True)
class _Program:
    table: Table
    base: Chain
    hook: Hook
    family: int
    numbering: Mapping[tuple[str, str], int]
    lookups: _Lookups
    target: IfTarget | None = None  # an XDP or TC program for this interface hook
    items: list[nf.Item] = field(default_factory=list)
    rule_labels: list[tuple[str, int]] = field(default_factory=list)
    funcs: list[tuple[str, str, nf.FuncKind]] = field(default_factory=list)
    hook_ok: set[tuple[int, int]] = field(default_factory=set)  # (matches, target) ids checked
    needs: nf.Needs = field(default_factory=nf.Needs)  # what the prologue gathers

    def build(self) -> CompiledProgram:
        chains = self._reachable()
        needs = self.needs = _needs(r for c in (self.base, *chains) for r in c.rules)
        base_parts = [f"part:{i}" for i in range(len(self._parts(self.base)))]
        flavor = None if self.target is None else IF_FLAVORS[self.target.hook]
        if flavor is not None:  # refuse by rule line before the prologue looks at the needs
            for c in (self.base, *chains):
                for r in c.rules:
                    self._check_hook(r)
        self._function(MAIN_FUNC, "bpfilter_main", nf.FuncKind.MAIN)
        main = len(self.items)
        if flavor is None:
            self.items.extend(nf.prologue(self.family, needs))
        else:
            assert self.target is not None
            self.items.extend(flavor.prologue(self.family, needs, self.target))
        if any(isinstance(run, Run) for c in (self.base, *chains)
               for run in self.lookups.chosen.get((self.table.name, c.name), ())):
            self.items.extend(lookup.load_buffer_bit())
        self._call_parts(base_parts, "main:policy")
        self.items.append(Label("main:policy"))
        self.items.extend(self._policy())
        if flavor is not None:
            self.items[main:] = flavor.map_exits(self.items[main:], needs)
        self._emit_parts(self.base, base_parts, "part")
        for n, chain in enumerate(chains):
            label = _func(chain.name)
            parts = self._parts(chain)
            if len(parts) == 1:
                self._global(label, f"chain_{n}", f"chain {chain.name}")
                self._emit_range(chain, 0, len(chain.rules), False)
                self.items.extend(nf.verdict(nf.RET_CONTINUE, f"end of {chain.name}: RETURN"))
                continue
            # A long user chain: a wrapper calling its parts; RETURN in a part leaves them all.
            labels = [f"{label}:part{j}" for j in range(len(parts))]
            self._global(label, f"chain_{n}", f"chain {chain.name}")
            self._call_parts(labels, f"{label}:return")
            self.items.append(Label(f"{label}:return"))
            self.items.extend(nf.verdict(nf.RET_CONTINUE, f"end of {chain.name}: RETURN"))
            self._emit_parts(chain, labels, f"chain_{n}_part")
        self._function(COUNT_FUNC, "count", nf.FuncKind.COUNT)
        self.items.extend(nf.counter_subprog(COUNT_FUNC, COUNTERS)[1:])
        items, live = live_code(self.items)
        pf = NfProto.IPV4 if self.family == 4 else NfProto.IPV6
        name = f"{self.table.name}_{self.base.name}{self.family}"[:15]
        funcs = tuple(f for f in self.funcs if f[0] in live)
        if flavor is not None:
            name = f"{_SHORT[flavor.hook]}_{self.base.name}{self.family}"[:15]
            return CompiledProgram(name, self.table.name, self.base.name, self.hook, pf, 0,
                                   tuple(items), needs, tuple(self.rule_labels), funcs,
                                   flavor.kfuncs, flavor.prog_type, flavor.attach_type,
                                   self.target)
        return CompiledProgram(name, self.table.name, self.base.name, self.hook, pf,
                               PRIORITY[self.table.name], tuple(items), needs,
                               tuple(self.rule_labels), funcs, nf.kfuncs(needs))

    def _call_parts(self, labels: list[str], on_return: str) -> None:
        """Call each part in turn: CONTINUE goes on, RETURN jumps to ``on_return``, a verdict
        leaves the function."""
        for label in labels:
            nxt = f"{label}:next"
            self.items.extend([
                asm.mov64(R1, R7), asm.call_local(label),
                asm.jmp("jeq", R0, nf.RET_CONTINUE, nxt),
                asm.jmp("jgt", R0, NfVerdict.ACCEPT, on_return),  # RET_RETURN
                asm.exit_(), Label(nxt)])

    def _emit_parts(self, chain: Chain, labels: list[str], btf_prefix: str) -> None:
        for j, ((lo, hi), label) in enumerate(zip(self._parts(chain), labels, strict=True)):
            self._global(label, f"{btf_prefix}_{j}", f"{chain.name} rules {lo + 1}-{hi}")
            self._emit_range(chain, lo, hi, True)
            self.items.extend(nf.verdict(nf.RET_CONTINUE, "end of part"))

    def _emit_range(self, chain: Chain, lo: int, hi: int, in_base: bool) -> None:
        """Rules lo+1..hi (a whole number of segments), one by one or by lookups."""
        first = self.numbering[(self.table.name, chain.name)] + (1 if chain.is_base else 0)
        for a, b, run in self.lookups.segments_of(self.table.name, chain):
            if a < lo or b > hi:
                continue
            if run is None:
                self._rule(chain, b, chain.rules[a], first + a, in_base)
            else:
                self._run(chain, run, first, in_base)

    def _emitter(self, prefix: str) -> Emitter:
        return Emitter(self.family, prefix, f"{prefix}:next", f"{prefix}:hotdrop",
                       res=self.lookups.res, table=self.table.name, hook=self.hook,
                       needs=self.needs)

    def _check_hook(self, rule: IrRule) -> None:
        """Refuse a match or target the program's hook cannot run (a rule of a user chain is
        checked at every hook that reaches it)."""
        if self.target is not None and (rule.iif is not None or rule.oif is not None):
            fields = header_fields(rule)
            why = flavor_packet.refusal(rule, fields, self.target)
            for name in fields:
                if why is None and self.hook not in HEADER[name].hooks:
                    why = HEADER[name].refusal(_NO_MATCH, self.family, self.hook)
            if why is not None:
                raise CompileError(rule.line, why)
        key = (id(rule.matches), id(rule.target))
        if key in self.hook_ok:
            return
        if self.target is not None:
            t = rule.target
            names = [m.kind for m in rule.matches]
            if t is not None and t.kind is TargetKind.EXTENSION:
                names.append(t.name)
            why = flavor_packet.refusal(rule, names, self.target)
            if why is None and all(self.hook in MATCHERS[m.kind].hooks for m in rule.matches) \
                    and (t is None or t.kind is not TargetKind.EXTENSION
                         or self.hook in actions()[t.name].hooks):
                why = flavor_packet.needs_refusal(rule, self.target)
            if why is not None:
                raise CompileError(rule.line, why)
        for m in rule.matches:
            matcher = MATCHERS[m.kind]
            if self.hook not in matcher.hooks:
                why = matcher.refusal(m, self.family, self.hook)
                if why is not None:
                    raise CompileError(rule.line, why)
        t = rule.target
        if t is not None and t.kind is TargetKind.EXTENSION:
            why = actions()[t.name].refusal(t, self.family, self.hook)
            if why is not None:
                raise CompileError(rule.line, why)
        self.hook_ok.add(key)

    def _function(self, label: str, btf_name: str, kind: nf.FuncKind) -> None:
        self.funcs.append((label, btf_name, kind))
        self.items.append(Label(label))

    def _global(self, label: str, btf_name: str, what: str) -> None:
        """Entry of a global function taking the meta pointer (which BTF says may be NULL)."""
        self._function(label, btf_name, nf.FuncKind.GLOBAL)
        self.items.extend([
            asm.jmp("jne", R1, 0, f"{label}:body", comment=what),
            *nf.verdict(nf.RET_CONTINUE),
            Label(f"{label}:body"),
            asm.mov64(R7, R1, comment="r7 = meta"),
        ])

    def _parts(self, chain: Chain) -> list[tuple[int, int]]:
        """Split a chain into runs of rules (lo, hi], each verified as one global function:
        the verifier keeps one pending state per branch to the next rule until it has walked
        the rest of the function, and gives up past 8192 of them."""
        parts: list[tuple[int, int]] = []
        lo = cost = 0
        for a, _, run in self.lookups.segments_of(self.table.name, chain):
            c = _branch_cost(chain.rules[a])
            if isinstance(run, Run):
                c += 2 + len(run.actions)
            elif run is not None:
                c = 5 * run.words + 30 + len(run.actions)
            cost += c
            if cost > PART_BRANCHES and a > lo:
                parts.append((lo, a))
                lo, cost = a, c
        if lo < len(chain.rules) or not parts:
            parts.append((lo, len(chain.rules)))
        return parts

    def _reachable(self) -> list[Chain]:
        """User chains reachable from the base chain, each once, in first-call order; refuses
        loops and calls nested deeper than the BPF call frames allow (a user chain takes one
        frame, or two when it is long enough to be split into parts)."""
        order: list[Chain] = []
        depth: dict[str, int] = {}  # most frames used below and by a chain, once known
        on_path: set[str] = set()

        def visit(chain: Chain) -> int:
            known = depth.get(chain.name)
            if known is not None:
                return known
            on_path.add(chain.name)
            deepest = 0
            for rule in chain.rules:
                t = rule.target
                if t is None or t.kind not in (TargetKind.JUMP, TargetKind.GOTO):
                    if _unconditional_verdict(rule):
                        break  # later rules are dead: iptables does not look at them either
                    continue
                if t.name in on_path:
                    raise CompileError(rule.line, f"jump to chain '{t.name}' creates a loop")
                callee = self.table.chain(t.name)
                assert callee is not None  # checked by _check_chain
                if callee.name not in depth:
                    order.append(callee)
                deepest = max(deepest, visit(callee))
                if deepest > MAX_CHAIN_DEPTH:
                    raise CompileError(rule.line, f"user chains nest deeper than "
                                       f"{MAX_CHAIN_DEPTH} levels below {self.base.name} (a "
                                       "chain split into parts counts twice)")
            on_path.discard(chain.name)
            own = 0 if chain.is_base else 1 if len(self._parts(chain)) == 1 else 2
            depth[chain.name] = deepest + own
            return deepest + own

        visit(self.base)
        return order

    def _policy(self) -> list[nf.Item]:
        policy = self.base.policy
        assert policy is not None
        index = self.numbering[(self.table.name, self.base.name)]
        return [*_count(index), *nf.verdict(VERDICT_TARGETS[policy], f"policy {policy}")]

    def _run(self, chain: Chain, run: Run | Classifier, first: int, in_base: bool) -> None:
        """Rules of ``run``: the shared tests with the key field's test replaced by the
        lookup, then the counter and the action of the rule the lookup names."""
        pos = run.start + 1
        prefix = f"{chain.name}#{pos}"
        name = self.lookups.map_for(self.table.name, chain, run)
        rep = run.rules[0]
        self._check_hook(rep)
        em = self._emitter(prefix)
        if isinstance(run, Classifier):
            lookup.emit_classifier(em, run, {k: f"{name}_{k}" for k in lookup.CLASSIFIER_MAPS})
        else:
            for f in header_fields(rep):
                if f == run.field.value:
                    lookup.emit_lookup(em, run, name)
                else:
                    HEADER[f].emit(em, rep, None)
            for m in rest_matches(rep, run.field):
                MATCHERS[m.kind].emit(em, rep, m)
            if run.field.is_port:
                lookup.emit_lookup(em, run, name)
        em.emit(asm.mov64(R1, lookup.INDEX_REG), asm.mov64(R2, R7), asm.call_local(COUNT_FUNC))
        last = len(run.actions) - 1
        for a, target in enumerate(run.actions):
            other = f"{prefix}:action{a + 1}"
            if a < last:
                em.emit(asm.jmp("jne", lookup.ACTION_REG, a, other))
            _action(em, replace(rep, target=target), in_base, f"{prefix}:{a}")
            if a < last:
                em.emit(Label(other))
        if em.used_hotdrop:
            em.emit(asm.ja(em.fail), Label(em.hotdrop),
                    *nf.verdict(NfVerdict.DROP, "hot drop (as iptables' hotdrop)"))
        em.emit(Label(em.fail))
        start = f"rule:{first + run.start}"
        self.rule_labels.append((start, first + run.start))
        self.items.append(Label(start))
        lines = run.lines
        self.items.extend(_annotate(em.items, f"lines {lines[0]}-{lines[-1]}: {chain.name} rules "
                                    f"{pos}-{run.stop} by lookup in {name}"))

    def _rule(self, chain: Chain, pos: int, rule: IrRule, index: int, in_base: bool) -> None:
        prefix = f"{chain.name}#{pos}"
        em = self._emitter(prefix)
        self._check_hook(rule)
        for name in header_fields(rule):
            HEADER[name].emit(em, rule, None)
        for m in rule.matches:
            MATCHERS[m.kind].emit(em, rule, m)
        em.emit(*_count(index))
        _action(em, rule, in_base, prefix)
        if em.used_hotdrop:
            em.emit(asm.ja(em.fail), Label(em.hotdrop),
                    *nf.verdict(NfVerdict.DROP, "hot drop (as iptables' hotdrop)"))
        em.emit(Label(em.fail))
        start = f"rule:{index}"
        self.rule_labels.append((start, index))
        self.items.append(Label(start))
        self.items.extend(_annotate(em.items, f"line {rule.line}: {chain.name} rule {pos}"))


def _action(em: Emitter, rule: IrRule, in_base: bool, prefix: str) -> None:
    """The target, inside a part of the built-in chain (``in_base``) or a user chain.

    Called chains answer DROP, ACCEPT or CONTINUE (RETURN, or the end of the chain): a jump
    goes on with the next rule on CONTINUE; a goto hands the answer up unchanged, so the
    chain that did the goto answers as the goto'd chain did (in the built-in chain: CONTINUE
    becomes the policy).
    """
    t = rule.target
    if t is None:
        return
    if t.kind is TargetKind.VERDICT:
        if t.name == "RETURN":
            em.emit(*nf.verdict(nf.RET_RETURN if in_base else nf.RET_CONTINUE, "RETURN"))
        else:
            em.emit(*nf.verdict(VERDICT_TARGETS[t.name], t.name))
        return
    if t.kind is TargetKind.EXTENSION:
        actions()[t.name].emit(em, rule, t)
        return
    em.emit(asm.mov64(R1, R7), asm.call_local(_func(t.name), comment=f"-> {t.name}"))
    if t.kind is TargetKind.JUMP:
        em.emit(asm.jmp("jeq", R0, nf.RET_CONTINUE, em.fail), asm.exit_())
    elif not in_base:
        em.emit(asm.exit_())
    else:
        policy = f"{prefix}:goto_policy"
        em.emit(asm.jmp("jeq", R0, nf.RET_CONTINUE, policy), asm.exit_(),
                Label(policy), *nf.verdict(nf.RET_RETURN, "policy"))


def _unconditional_verdict(rule: IrRule) -> bool:
    """A rule no packet gets past: ACCEPT, DROP or RETURN with no test at all. The kernel's
    loop check (mark_source_chains) stops walking a chain there, so loops and bad jumps
    behind it load in iptables; here they are dead code."""
    # Cheapest tests first: this runs for every rule of every reachable chain.
    return (rule.src is None and rule.dst is None and rule.proto is None and not rule.matches
            and rule.iif is None and rule.oif is None and rule.fragment is None
            and rule.target is not None and rule.target.kind is TargetKind.VERDICT)


def _branch_cost(rule: IrRule) -> int:
    """A generous bound on the conditional branches a rule's tests emit."""
    cost = 2 + 4 * len(header_fields(rule))
    for m in rule.matches:
        cost += 4 + sum(len(o.value) if isinstance(o.value, tuple) else 2 for o in m.options)
    return cost


def _func(chain: str) -> str:
    return f"chain:{chain}"


def _count(index: int) -> list[nf.Item]:
    return [asm.mov64(R1, index), asm.mov64(R2, R7), asm.call_local(COUNT_FUNC)]


def _needs(rules: Iterator[IrRule]) -> nf.Needs:
    needs = nf.Needs()
    seen: set[int] = set()  # ids of match tuples (interned by the parser)
    for rule in rules:
        if rule.iif is not None or rule.oif is not None or rule.fragment is not None:
            for name in header_fields(rule):
                needs |= HEADER[name].needs
        t = rule.target
        if t is not None and t.kind is TargetKind.EXTENSION and id(t) not in seen:
            seen.add(id(t))
            needs |= actions()[t.name].needs
        if id(rule.matches) in seen:
            continue
        seen.add(id(rule.matches))
        for m in rule.matches:
            needs |= MATCHERS[m.kind].needs_for(m)
        if len(needs.ext_opts) > nf.OPTS_MAX_LISTS:
            raise CompileError(rule.line, f"a program tests at most {nf.OPTS_MAX_LISTS} "
                               "different --hbh-opts/--dst-opts lists")
    return needs


def _annotate(items: list[nf.Item], comment: str) -> list[nf.Item]:
    for i, it in enumerate(items):
        if isinstance(it, Insn):
            items[i] = replace(it, comment=comment)
            break
    return items


def live_code(items: Sequence[nf.Item]) -> tuple[list[nf.Item], set[str]]:
    """Drop the instructions no path from the entry reaches (rules after an unconditional
    verdict, the policy behind one, tests that can never hold): the verifier refuses
    unreachable instructions. Labels stay, so the link pass still finds every target; the
    second result names the labels some path reaches (functions still called)."""
    where = {it.name: i for i, it in enumerate(items) if isinstance(it, Label)}
    n = len(items)
    live = bytearray(n)
    todo = [0]
    while todo:
        i = todo.pop()
        while i < n and not live[i]:
            live[i] = 1
            it = items[i]
            if type(it) is not Insn:
                i += 1
                continue
            op = it.opcode
            if op == EXIT:
                break
            ref = it.ref
            # A reference on a JMP/JMP32 instruction is a jump or a local call target (kfunc
            # calls and map loads carry names too, but are not jumps).
            if ref is not None and op & CLASS_MASK in _JMP_CLASSES and (
                    op != CALL or it.src == PseudoCall.CALL):
                todo.append(where[ref])
                if op & OP_MASK == JmpOp.JA:
                    break
            i += 1
    reached = {it.name for i, it in enumerate(items) if live[i] and isinstance(it, Label)}
    return [it for i, it in enumerate(items) if live[i] or isinstance(it, Label)], reached
