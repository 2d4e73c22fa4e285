"""The stored layout of a table generation (counter slots, run maps, blocklist chains) and
the changes worked out on it alone: no IR, no optimizer, no code generator.

bpfilter.incremental decides from the IR which changes are map writes and builds layouts;
this module is what a single command on a blocklist chain needs (bpfilter.fastcmd), kept
light so that such a command imports little. The on-disk encoding is versioned: a layout of
another version reads as None, and the next change then rebuilds.
"""

from __future__ import annotations

import marshal
import struct
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from bpfilter.codegen.names import VALUE

# 2: a blocklist records the shortest length it stays a lookup at (``min_len``).
LAYOUT_VERSION = 2
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
    number in the code's order, and one rule of the run (all share their other tests).
    ``length`` is set exactly for prefix fields (whose keys are addresses); ``min_len`` is
    the optimizer's shortest run when the layout was made: a shorter chain is rebuilt."""

    field: str
    bits: int
    length: int | None  # the prefix length of every key (prefix fields)
    rep: str  # one rule of the run, as iptables-save prints it
    keys: array[int]
    acts: bytearray
    min_len: int

    def dump(self) -> tuple[object, ...]:
        return (self.field, self.bits, self.length, self.rep, self.keys.tobytes(),
                bytes(self.acts), self.min_len)

    @classmethod
    def load(cls, v: tuple[object, ...]) -> Blocklist:
        f, bits, length, rep, keys, acts, min_len = v
        assert isinstance(f, str) and isinstance(bits, int) and isinstance(rep, str)
        assert isinstance(keys, bytes) and isinstance(acts, bytes)
        assert length is None or isinstance(length, int)
        assert isinstance(min_len, int)
        return cls(f, bits, length, rep, _u32s(keys), bytearray(acts), min_len)

    def entry_key(self, key: int) -> bytes:
        """``key`` as the run's map stores it (codegen.lookup.map_contents): an address in
        network order, anything else a host-order u32."""
        if self.length is not None:
            return key.to_bytes(self.bits // 8, "big")
        return struct.pack("<I", key)

    def key_of(self, entry: bytes) -> int:
        """The key of a map key (``entry_key`` undone)."""
        if self.length is not None:
            return int.from_bytes(entry, "big")
        return int(struct.unpack("<I", entry)[0])


@dataclass(slots=True)
class Layout:
    """Counter slots and run maps of one generation of a table (stored next to its text).

    ``free`` slots may be handed out by the next change; ``cooling`` slots were freed by
    this generation's change and the maps of the previous generation may still name them, so
    they become free one change later. ``lag`` names, per run map, the keys where the copy
    not in use (codegen.names.buffer_names) differs from the copy in use; ``touched`` the
    keys this generation's change wrote into the copy it switched to.
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
            return cls(capacity, top, dict(policy), {c: _u32s(b) for c, b in raw.items()},
                       {c: [Segment(a, b, f, m, tuple(acts)) for a, b, f, m, acts in gs]
                        for c, gs in segs.items()},
                       dict(caps), list(free), list(cooling), dict(lag), dict(touched),
                       {c: Blocklist.load(b) for c, b in fast.items()})
        except (ValueError, TypeError, EOFError, AssertionError):
            return None

    def slot_of(self, chain: str, position: int) -> int | None:
        """Counter slot of rule ``position`` (from 1; 0: the policy) of ``chain``."""
        if position == 0:
            return self.policy.get(chain)
        s = self.slots.get(chain)
        return s[position - 1] if s is not None and 0 < position <= len(s) else None


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


class Slots:
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


def blocklist_change(layout: Layout, chain: str, position: int, key: int, action: int | None,
                     *, dirty: Mapping[str, Iterable[bytes]] | None = None) -> Change:
    """The map writes for one rule inserted into (``action`` its number) or deleted from
    (``action`` None) the blocklist chain ``chain`` at ``position`` (0-based), worked out on
    the compact form alone: O(changed keys) Python work, whatever the chain's length.
    Raises Rebuild when the chain would stop being a run."""
    b = layout.fast[chain]
    [seg] = layout.segments[chain]
    keys, acts, slots = array("I", b.keys), bytearray(b.acts), array("I", layout.slots[chain])
    alloc = Slots(layout)
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
    if len(keys) < b.min_len:
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
    i = find_key(keys, key)
    return None if i < 0 else VALUE.pack(slots[i], acts[i])


def find_rule(keys: array[int], acts: bytearray | bytes, key: int, act: int) -> int:
    """Position of the first rule with ``key`` and action ``act`` (-1: none)."""
    i = find_key(keys, key)
    while i >= 0 and acts[i] != act:
        i = find_key(keys, key, i + 1)
    return i


def find_key(keys: array[int], key: int, start: int = 0) -> int:
    """Index of the first ``key`` in ``keys`` from ``start`` on (-1: none), by a byte search
    of the array's memory (array.index compares element by element, 50x slower)."""
    raw = keys.tobytes()
    needle = struct.pack(f"={keys.typecode}", key)
    size = keys.itemsize
    at = raw.find(needle, start * size)
    while at >= 0 and at % size:  # a match across two elements
        at = raw.find(needle, at + 1)
    return at // size if at >= 0 else -1


def edit_text(text: str, chain: str, rules: int, position: int, line: str | None) -> str:
    """``text`` (iptables-save, ``rules`` rules in ``chain``) with ``line`` inserted before
    rule ``position`` (0-based) of ``chain``, or (``line`` None) that rule removed."""
    data = edit_blob(text.encode("utf-8", "surrogateescape"), chain, rules, position,
                     None if line is None else line.encode("utf-8", "surrogateescape"))
    return data.decode("utf-8", "surrogateescape")


def edit_blob(data: bytes, chain: str, rules: int, position: int, line: bytes | None) -> bytes:
    """``edit_text`` on the encoded text, without splitting it into lines: the rules of a
    chain are consecutive lines starting ``-A CHAIN ``, so rule ``position`` is found by
    counting newlines from the nearer end of that stretch."""
    head = f"\n-A {chain} ".encode("utf-8", "surrogateescape")
    first = data.find(head) + 1
    if first == 0:
        raise ValueError(f"no rule of chain {chain} in the text")
    end = data.rfind(head) + 1  # the start of the chain's last rule
    end = data.index(b"\n", end) + 1  # every rule line ends with a newline
    if position <= rules - position:
        at = first
        for _ in range(position):
            at = data.index(b"\n", at) + 1
    else:
        at = end
        for _ in range(rules - position):
            at = data.rindex(b"\n", 0, at - 1) + 1
    view = memoryview(data)
    if line is None:
        return b"".join((view[:at], view[data.index(b"\n", at) + 1:]))
    return b"".join((view[:at], line, b"\n", view[at:]))


__all__ = ["CLASSIFIER", "LAYOUT_VERSION", "Blocklist", "Change", "Layout", "Rebuild",
           "Segment", "Slots", "blocklist_change", "edit_blob", "edit_text", "find_key",
           "find_rule"]
