"""Incremental changes: which edits of a live table touch only lookup-map entries, and the
counter numbering that lets them leave the programs alone.

A compiled program holds the counter index of each rule it tests one by one as a constant,
and a run's map holds, per key, the counter index and action of the rule that decides it.
A rebuild numbers counters in chain order; after that a table keeps a *layout*: the counter
slot of every rule by position, handed out again only for rules that were added. So a rule
inserted into a run takes a free slot, every other rule keeps its slot (and its counts), the
constants in the programs stay right, and only map entries change.

A change qualifies when the new table differs from the old one only inside runs that stay
runs of the same shape (same key field, same shared tests, same actions in the same order,
same map type) at the same place in the plan; everything else (a rule outside a run, a
policy, a chain, a classifier, a run that appears, vanishes or outgrows its map) is rebuilt.
This module is pure: it reads IR and layouts and answers map writes.
"""

from __future__ import annotations

import marshal
import struct
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from bpfilter.codegen import lookup
from bpfilter.codegen.compiler import CompiledRuleset, _Lookups
from bpfilter.ir.iptables_save import format_rule
from bpfilter.ir.model import Chain, Rule, Table, TargetKind
from bpfilter.ir.optimizer import (
    MAX_CLASSIFIER,
    MIN_CLASSIFIER,
    MIN_RUN,
    Classifier,
    KeyField,
    Run,
    _shapes,
    build_run,
    port_key,
)

LAYOUT_VERSION = 1
CLASSIFIER = "cls"  # Segment.field of a bit-vector classifier


@dataclass(frozen=True, slots=True)
class Segment:
    """A run or classifier with a map in force: rules ``start..stop-1`` (0-based) of its
    chain, its key field's spelling (``CLASSIFIER`` for a classifier), its map's name and
    the actions its code dispatches on, in the code's order (a map value names one by
    number; iptables-save spelling)."""

    start: int
    stop: int
    field: str
    map: str
    actions: tuple[str, ...] = ()


def _u32s(data: bytes) -> array[int]:
    a = array("I")
    a.frombytes(data)
    return a


@dataclass(slots=True)
class Blocklist:
    """A chain that is one exact run and nothing else (a blocklist), kept compact so that a
    single command changes it without the IR of the whole table: each rule's key, its action
    number in the code's order, and one rule of the run (all share their other tests)."""

    field: str
    bits: int
    length: int | None  # the prefix length of every key (prefix fields)
    rep: str  # one rule of the run, as iptables-save prints it
    keys: array[int]
    acts: bytearray

    def dump(self) -> tuple[object, ...]:
        return (self.field, self.bits, self.length, self.rep, self.keys.tobytes(),
                bytes(self.acts))

    @classmethod
    def load(cls, v: tuple[object, ...]) -> Blocklist:
        f, bits, length, rep, keys, acts = v
        assert isinstance(f, str) and isinstance(bits, int) and isinstance(rep, str)
        assert isinstance(keys, bytes) and isinstance(acts, bytes)
        assert length is None or isinstance(length, int)
        return cls(f, bits, length, rep, _u32s(keys), bytearray(acts))

    def entry_key(self, key: int) -> bytes:
        """``key`` as the run's map stores it (lookup.map_contents)."""
        if KeyField(self.field).is_prefix:
            return key.to_bytes(self.bits // 8, "big")
        return struct.pack("<I", key)

    def key_of(self, entry: bytes) -> int:
        """The key of a map key (``entry_key`` undone)."""
        if KeyField(self.field).is_prefix:
            return int.from_bytes(entry, "big")
        return int(struct.unpack("<I", entry)[0])


def rule_key(rule: Rule, f: KeyField) -> int | None:
    """The key a rule of an exact run on ``f`` has (a masked address, port or protocol)."""
    if f is KeyField.SRC:
        return rule.src.addr if rule.src is not None else None
    if f is KeyField.DST:
        return rule.dst.addr if rule.dst is not None else None
    if f is KeyField.PROTO:
        return rule.proto
    if f.is_port:
        return port_key(rule, f)
    return None


def blocklist(chain: Chain, run: Run, family: int) -> Blocklist | None:
    """The compact form of ``chain`` when ``run`` is all of it, exact, and keyed by at most
    32 bits (IPv4); else None. ``run.action_of`` must number actions in the code's order."""
    if family != 4 or run.start != 0 or run.stop != len(chain.rules) or not run.exact \
            or run.field.is_interface or (run.field.is_prefix and run.bits != 32):
        return None
    keys = [rule_key(r, run.field) for r in run.rules]
    if any(k is None for k in keys):
        return None
    length = run.key_length if run.field.is_prefix else None
    return Blocklist(run.field.value, run.bits, length,
                     format_rule(run.rules[0], chain.name), array("I", keys),  # type: ignore[arg-type]
                     bytearray(run.action_of))


@dataclass(slots=True)
class Layout:
    """Counter slots and run maps of one generation of a table (stored next to its text).

    ``free`` slots may be handed out by the next change; ``cooling`` slots were freed by
    this generation's change and the maps of the previous generation may still name them, so
    they become free one change later. ``lag`` names, per run map, the keys where the copy
    not in use (lookup.buffer_names) differs from the copy in use; ``touched`` the keys this
    generation's change wrote into the copy it switched to.
    """

    capacity: int  # slots in the counter map
    top: int  # slots from here up were never handed out
    policy: dict[str, int]
    slots: dict[str, array[int]]  # chain -> slot of rule 1, 2, ...
    segments: dict[str, list[Segment]]
    map_capacity: dict[str, int]
    free: list[int] = field(default_factory=list)
    cooling: list[int] = field(default_factory=list)
    lag: dict[str, list[bytes]] = field(default_factory=dict)
    touched: dict[str, list[bytes]] = field(default_factory=dict)
    fast: dict[str, Blocklist] = field(default_factory=dict)

    def dumps(self) -> bytes:
        """A versioned, compact encoding (marshal of builtins only)."""
        return marshal.dumps((
            LAYOUT_VERSION, self.capacity, self.top, self.policy,
            {c: s.tobytes() for c, s in self.slots.items()},
            {c: [(g.start, g.stop, g.field, g.map, list(g.actions)) for g in segs]
             for c, segs in self.segments.items()},
            self.map_capacity, self.free, self.cooling, self.lag, self.touched,
            {c: b.dump() for c, b in self.fast.items()}))

    @classmethod
    def loads(cls, data: bytes) -> Layout | None:
        """The layout ``dumps`` gave, or None when ``data`` is not one of this version."""
        try:
            v = marshal.loads(data)
            if not isinstance(v, tuple) or len(v) != 12 or v[0] != LAYOUT_VERSION:
                return None
            _, capacity, top, policy, raw, segs, caps, free, cooling, lag, touched, fast = v
            slots = {}
            for c, b in raw.items():
                a = array("I")
                a.frombytes(b)
                slots[c] = a
            return cls(capacity, top, dict(policy), slots,
                       {c: [Segment(a, b, f, m, tuple(acts)) for a, b, f, m, acts in gs]
                        for c, gs in segs.items()},
                       dict(caps), list(free), list(cooling), dict(lag), dict(touched),
                       {c: Blocklist.load(b) for c, b in fast.items()})
        except (ValueError, TypeError, EOFError):
            return None

    def slot_of(self, chain: str, position: int) -> int | None:
        """Counter slot of rule ``position`` (from 1; 0: the policy) of ``chain``."""
        if position == 0:
            return self.policy.get(chain)
        s = self.slots.get(chain)
        return s[position - 1] if s is not None and 0 < position <= len(s) else None


def fresh_layout(table: Table, compiled: CompiledRuleset, capacity: int,
                 map_capacity: dict[str, int]) -> Layout:
    """The layout of a rebuilt ``table`` (compiled alone): counters in the compiler's chain
    order (a built-in chain's policy, then its rules), both copies of every map equal."""
    slots: dict[str, array[int]] = {}
    policy: dict[str, int] = {}
    n = 0
    for c in table.chains:
        if c.is_base:
            policy[c.name] = n
            n += 1
        slots[c.name] = array("I", range(n, n + len(c.rules)))
        n += len(c.rules)
    assert n == len(compiled.rule_index), "the counter numbering is the compiler's"
    segments: dict[str, list[Segment]] = {}
    for t, chain, run, name in compiled.lookups:
        if t != table.name:
            continue
        if isinstance(run, Run):
            seg = Segment(run.start, run.stop, run.field.value, name, _actions(run))
        else:
            seg = Segment(run.start, run.stop, CLASSIFIER, name)
        segments.setdefault(chain, []).append(seg)
    for segs in segments.values():
        segs.sort(key=lambda g: g.start)
    fast = {}
    for t, chain, run, _ in compiled.lookups:
        c = table.chain(chain)
        if t == table.name and isinstance(run, Run) and c is not None:
            b = blocklist(c, run, compiled.family)
            if b is not None:
                fast[chain] = b
    return Layout(capacity, n, policy, slots, segments, map_capacity, fast=fast)


@dataclass(slots=True)
class Change:
    """A change made of map writes: the new layout, the value every written key must have
    in the copy being switched to (None: absent), and counter slots to set first."""

    layout: Layout
    writes: dict[str, dict[bytes, bytes | None]]
    counters: dict[int, tuple[int, int]]  # slot -> (packets, bytes): new rules, explicit -c

    @property
    def entries_written(self) -> int:
        return sum(len(w) for w in self.writes.values())


class Rebuild(Exception):  # noqa: N818 - an answer, not a failure
    """The change is not map entries only; ``reason`` says why (for --json and tests)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _key(r: Rule) -> Rule:
    return replace(r, counters=None, line=0, col=0)


def _same_rules(a: Sequence[Rule], b: Sequence[Rule]) -> bool:
    """Equal rules (lines and counters aside); unchanged rules are usually the same objects."""
    if len(a) != len(b):
        return False
    return all(x is y or _key(x) == _key(y) for x, y in zip(a, b, strict=True))


def reachable(table: Table) -> set[str]:
    """Chains some program may run: the built-in ones and every chain a jump or goto names
    from a chain already reachable (rules behind an unconditional verdict included, which
    only makes this larger, and the answer more careful)."""
    by_name = {c.name: c for c in table.chains}
    todo = [c.name for c in table.chains if c.is_base]
    seen = set(todo)
    while todo:
        c = by_name.get(todo.pop())
        if c is None:
            continue
        for r in c.rules:
            t = r.target
            if t is not None and t.kind in (TargetKind.JUMP, TargetKind.GOTO) \
                    and t.name not in seen:
                seen.add(t.name)
                todo.append(t.name)
    return seen


def _shape(run: Run) -> object:
    return _shapes(run.rules[:1])[run.field][0]


def _map_shape(run: Run) -> tuple[object, ...]:
    """What the run's map and code depend on besides its entries and actions."""
    length = run.key_length if run.field.is_prefix and run.exact else None
    return (run.exact, run.bits, length)


def _actions(run: Run) -> tuple[str, ...]:
    return tuple(format_rule(Rule(target=t), "X") for t in run.actions)


def _in_code_order(run: Run, code: Sequence[str]) -> Run | None:
    """``run`` with its action numbers those of the code (``code``: the actions the code
    dispatches on); None when the run uses an action the code lacks."""
    mine = _actions(run)
    if mine == tuple(code):
        return run
    try:
        number = [code.index(a) for a in mine]
    except ValueError:
        return None
    # Only action_of changes: map_contents reads it, and nothing here reads ``actions``.
    return replace(run, action_of=tuple(number[a] for a in run.action_of))


def _entries(run: Run, slots: Sequence[int]) -> dict[bytes, bytes]:
    return dict(lookup.map_contents(run, 0, slots))


class _Slots:
    """Hands out counter slots: free ones first, then never used ones."""

    def __init__(self, layout: Layout) -> None:
        self.free = layout.free + layout.cooling  # the maps in use name none of them
        self.top = layout.top
        self.capacity = layout.capacity
        self.taken: list[int] = []
        self.freed: list[int] = []

    def take(self) -> int:
        if self.free:
            s = self.free.pop()
        elif self.top < self.capacity:
            s = self.top
            self.top += 1
        else:
            raise Rebuild("the counter map is full")
        self.taken.append(s)
        return s


def _same(x: Rule, y: Rule) -> bool:
    return x is y or _key(x) == _key(y)


def _run_slots(old: Sequence[Rule], old_slots: Sequence[int], new: Sequence[Rule],
               alloc: _Slots) -> list[int]:
    """Slots of a run's new rules: a rule that stays (same rule, same occurrence in the
    changed stretch) keeps its slot, an added one gets a free slot; slots of removed rules
    are freed. Only the stretch between the common head and tail is matched rule by rule
    (a single command changes one place of a long run)."""
    head = 0
    limit = min(len(old), len(new))
    while head < limit and _same(old[head], new[head]):
        head += 1
    tail = 0
    while tail < limit - head and _same(old[-1 - tail], new[-1 - tail]):
        tail += 1
    by_rule: dict[Rule, list[int]] = {}
    for r, s in zip(old[head:len(old) - tail], old_slots[head:len(old) - tail], strict=True):
        by_rule.setdefault(_key(r), []).append(s)
    for v in by_rule.values():
        v.reverse()  # pop() takes the first occurrence
    middle = []
    for r in new[head:len(new) - tail]:
        left = by_rule.get(_key(r))
        middle.append(left.pop() if left else alloc.take())
    alloc.freed.extend(s for v in by_rule.values() for s in v)
    return [*old_slots[:head], *middle, *old_slots[len(old) - tail:]]


def plan_change(old: Table, layout: Layout, new: Table, family: int, *,
                dirty: Mapping[str, Iterable[bytes]] | None = None,
                explicit: dict[tuple[str, int], tuple[int, int]] | None = None) -> Change:
    """The map writes turning ``old`` (in force, numbered by ``layout``) into ``new``;
    raises Rebuild when the change is more than that. ``dirty`` adds keys an interrupted
    change may have written into the copy not in use; ``explicit`` gives counters (by chain
    and position in ``new``) to set, as ``-c`` does."""
    if [(c.name, c.is_base, c.policy) for c in old.chains] != \
            [(c.name, c.is_base, c.policy) for c in new.chains]:
        raise Rebuild("chains or policies changed")
    lookups = _Lookups(family, True, MIN_RUN, MIN_CLASSIFIER, MAX_CLASSIFIER)
    lookups.choose([new])
    live = reachable(new)
    alloc = _Slots(layout)
    slots: dict[str, array[int]] = {}
    segments: dict[str, list[Segment]] = {}
    runs: dict[str, tuple[Run, list[int], Run | None, list[int] | None]] = {}
    changed: set[str] = set()
    for oc, nc in zip(old.chains, new.chains, strict=True):
        chosen = sorted(lookups.chosen.get((new.name, nc.name), []), key=lambda r: r.start) \
            if nc.name in live else []
        olds = layout.segments.get(nc.name, [])
        if len(chosen) != len(olds) or any(
                g.field != (r.field.value if isinstance(r, Run) else CLASSIFIER)
                for g, r in zip(olds, chosen, strict=True)):
            raise Rebuild(f"the lookups of chain {nc.name} changed")
        old_slots = layout.slots[oc.name]
        if oc.rules is nc.rules or _same_rules(oc.rules, nc.rules):
            if [(g.start, g.stop) for g in olds] != [(r.start, r.stop) for r in chosen]:
                raise Rebuild(f"the lookups of chain {nc.name} changed")
            slots[nc.name] = old_slots
            segments[nc.name] = olds
            for g, r in zip(olds, chosen, strict=True):
                if isinstance(r, Run) and (g.map in layout.lag or g.map in (dirty or {})):
                    ordered = _in_code_order(r, g.actions)
                    if ordered is None:  # not from this layout
                        raise Rebuild(f"the lookups of chain {nc.name} changed")
                    runs[g.map] = (ordered, list(old_slots[g.start:g.stop]), None, None)
            continue
        changed.add(nc.name)
        new_slots = array("I")
        o = n = 0  # positions in the old and new chain
        segs = []
        ends: list[tuple[Segment | None, Run | Classifier | None]] = [
            *zip(olds, chosen, strict=True), (None, None)]
        for seg, r in ends:
            o_end = seg.start if seg is not None else len(oc.rules)
            n_end = r.start if r is not None else len(nc.rules)
            if not _same_rules(oc.rules[o:o_end], nc.rules[n:n_end]):
                raise Rebuild(f"a rule of chain {nc.name} outside its lookups changed")
            new_slots.extend(old_slots[o:o_end])
            if seg is None or r is None:
                break
            if isinstance(r, Classifier):
                if not _same_rules(oc.rules[seg.start:seg.stop], r.rules):
                    raise Rebuild(f"a classifier of chain {nc.name} changed")
                new_slots.extend(old_slots[seg.start:seg.stop])
            else:
                built = build_run(oc.rules[seg.start:seg.stop], KeyField(seg.field), seg.start)
                if _map_shape(built) != _map_shape(r) or _shape(built) != _shape(r):
                    raise Rebuild(f"a lookup of chain {nc.name} changed shape")
                before, after = (_in_code_order(built, seg.actions),
                                 _in_code_order(r, seg.actions))
                if before is None or after is None:
                    raise Rebuild(f"a lookup of chain {nc.name} got a new action")
                kept = list(old_slots[seg.start:seg.stop])
                got = _run_slots(before.rules, kept, after.rules, alloc)
                new_slots.extend(got)
                runs[seg.map] = (after, got, before, kept)
            segs.append(replace(seg, start=r.start, stop=r.stop))
            o, n = seg.stop, r.stop
        slots[nc.name] = new_slots
        segments[nc.name] = segs
    writes: dict[str, dict[bytes, bytes | None]] = {}
    lag: dict[str, list[bytes]] = {}
    dirty = dirty or {}
    for name, (run, run_slots, was_run, was_slots) in runs.items():
        stale = {*layout.lag.get(name, ()), *dirty.get(name, ())}
        if was_run is None and not stale:
            continue
        after = _entries(run, run_slots)
        if len(after) > layout.map_capacity.get(name, 0):
            raise Rebuild(f"map {name} is full")
        if was_run is not None:
            was = _entries(was_run, was_slots or [])
            delta = [k for k in was.keys() | after.keys() if was.get(k) != after.get(k)]
            if delta:
                lag[name] = delta
            stale.update(delta)
        if stale:
            writes[name] = {k: after.get(k) for k in stale}
    counters: dict[int, tuple[int, int]] = dict.fromkeys(alloc.taken, (0, 0))
    for (chain, pos), value in (explicit or {}).items():
        s = slots[chain][pos - 1] if pos else layout.policy.get(chain)
        if s is not None:
            counters[s] = value
    fast = {}
    for c in new.chains:
        old_fast = layout.fast.get(c.name)
        segs = segments.get(c.name, [])
        if old_fast is not None and c.name not in changed:
            fast[c.name] = old_fast
        elif len(segs) == 1 and segs[0].map in runs and segs[0].field != CLASSIFIER:
            b = blocklist(c, runs[segs[0].map][0], family)
            if b is not None:
                fast[c.name] = b
    out = Layout(layout.capacity, alloc.top, dict(layout.policy), slots, segments,
                 dict(layout.map_capacity), alloc.free, alloc.freed, lag,
                 {k: list(v) for k, v in writes.items()}, fast)
    return Change(out, writes, counters)


def blocklist_change(layout: Layout, chain: str, position: int, key: int, action: int | None,
                     *, dirty: Mapping[str, Iterable[bytes]] | None = None) -> Change:
    """The map writes for one rule inserted into (``action`` its number) or deleted from
    (``action`` None) the blocklist chain ``chain`` at ``position`` (0-based), worked out on
    the compact form alone: O(changed keys) Python work, whatever the chain's length.
    Raises Rebuild when the chain would stop being a run."""
    b = layout.fast[chain]
    [seg] = layout.segments[chain]
    keys, acts, slots = array("I", b.keys), bytearray(b.acts), array("I", layout.slots[chain])
    alloc = _Slots(layout)
    counters: dict[int, tuple[int, int]] = {}
    if action is None:
        alloc.freed.append(slots[position])
        del keys[position], acts[position], slots[position]
    else:
        s = alloc.take()
        counters[s] = (0, 0)
        keys.insert(position, key)
        acts.insert(position, action)
        slots.insert(position, s)
    if len(keys) < MIN_RUN:
        raise Rebuild(f"chain {chain} is too short for a lookup")
    if len(keys) > layout.map_capacity.get(seg.map, 0):
        raise Rebuild(f"map {seg.map} is full")

    mine = b.entry_key(key)
    was = _value(b.keys, b.acts, layout.slots[chain], key)
    writes: dict[str, dict[bytes, bytes | None]] = {
        seg.map: {mine: _value(keys, acts, slots, key)}}
    # Keys the other copy lags behind by (the previous change's), and keys a killed change
    # left written there, get the value now in force; here from the compact forms alone.
    owner = {segs[0].map: c for c, segs in layout.segments.items()
             if c in layout.fast and len(segs) == 1}
    for name in {*layout.lag, *(dirty or {})}:
        stale = {*layout.lag.get(name, ()), *(dirty or {}).get(name, ())}
        c = owner.get(name)
        if c is None:
            raise Rebuild(f"map {name} has keys to rewrite outside a blocklist")
        other = layout.fast[c]
        ks, acs, ss = (keys, acts, slots) if c == chain else (other.keys, other.acts,
                                                                layout.slots[c])
        w = writes.setdefault(name, {})
        for k in stale - w.keys():
            w[k] = _value(ks, acs, ss, other.key_of(k))
    lag = {seg.map: [mine]} if writes[seg.map][mine] != was else {}
    out = Layout(layout.capacity, alloc.top, dict(layout.policy),
                 {**layout.slots, chain: slots},
                 {**layout.segments, chain: [replace(seg, stop=len(keys))]},
                 dict(layout.map_capacity), alloc.free, alloc.freed, lag,
                 {name: list(w) for name, w in writes.items()},
                 {**layout.fast, chain: replace(b, keys=keys, acts=acts)})
    return Change(out, writes, counters)


def _value(keys: array[int], acts: bytearray | bytes, slots: Sequence[int],
           key: int) -> bytes | None:
    """The map value for ``key``: the first rule with it (its slot and action), or None."""
    try:
        i = keys.index(key)
    except ValueError:
        return None
    return lookup.VALUE.pack(slots[i], acts[i])


def edit_text(text: str, chain: str, rules: int, position: int, line: str | None) -> str:
    """``text`` (iptables-save, ``rules`` rules in ``chain``) with ``line`` inserted before
    rule ``position`` (0-based) of ``chain``, or (``line`` None) that rule removed."""
    start = text.find(f"\n-A {chain} ") + 1
    if start == 0:
        raise ValueError(f"no rule of chain {chain} in the text")
    lines = text[start:].split("\n", rules)
    if line is None:
        del lines[position]
    else:
        lines.insert(position, line)
    return text[:start] + "\n".join(lines)


__all__ = ["CLASSIFIER", "LAYOUT_VERSION", "Blocklist", "Change", "Layout", "Rebuild",
           "Segment", "blocklist_change", "edit_text", "fresh_layout", "plan_change",
           "reachable", "rule_key"]
