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

from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

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
from bpfilter.layout import (
    CLASSIFIER,
    LAYOUT_VERSION,
    Blocklist,
    Change,
    Layout,
    Rebuild,
    Segment,
    Slots,
    blocklist_change,
    edit_blob,
    edit_text,
)


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
    # Blocklist.entry_key tells an address key by its length.
    assert (length is not None) == run.field.is_prefix
    return Blocklist(run.field.value, run.bits, length,
                     format_rule(run.rules[0], chain.name), array("I", keys),  # type: ignore[arg-type]
                     bytearray(run.action_of), MIN_RUN)


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


def _same(x: Rule, y: Rule) -> bool:
    return x is y or _key(x) == _key(y)


def _run_slots(old: Sequence[Rule], old_slots: Sequence[int], new: Sequence[Rule],
               alloc: Slots) -> list[int]:
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
    alloc = Slots(layout)
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


__all__ = ["CLASSIFIER", "LAYOUT_VERSION", "Blocklist", "Change", "Layout", "Rebuild",
           "Segment", "blocklist", "blocklist_change", "edit_blob", "edit_text", "fresh_layout",
           "plan_change", "reachable", "rule_key"]
