"""What bpfilter has loaded in a network namespace, kept in bpffs next to the pins.

Layout of ``<bpffs>/bpfilter/<netns or "host">/`` (directory mode 0700, so root only):

- ``ip-filter-ctl``, ``ip-filter-progs``, ``ip-filter-link-INPUT`` ...: the table's switch
  and its attached dispatchers (see bpfilter.dispatch); ``ip6-`` for IPv6, ``raw`` likewise;
- ``ip-filter-gN-text``: the canonical iptables-save text of generation N of the table (no
  counters), in an array map of TEXT_CHUNK-byte values, since bpffs holds only BPF objects;
- ``ip-filter-gN-map-NAME``: the maps of generation N (``counters`` and any lookup maps);
- ``ip-filter-gN-layout``: generation N's counter slots and run maps (bpfilter.incremental),
  stored like the text.

- ``owner``: the inode of the named network namespace the pins belong to. A namespace
  deleted and created again under the same name is a different namespace: the pins of the
  old one are stale (their links filter a namespace that is gone) and are dropped.

The ``ctl`` value says which generation is in force; a generation's pins are complete before
it is switched in, and pins of other generations are leftovers of an interrupted or earlier
run, removed by the next commit. So a process killed at any point leaves the old or the new
ruleset in force, each with its text, and the state stays readable.

A change of lookup entries only (``apply_change``) keeps the programs and their maps: the
new generation pins the same maps again, writes the copy of the run maps no packet uses and
switches with the same one ``ctl`` write (bpfilter.dispatch). A killed change has written
only that unused copy; the keys it wrote are in its leftover layout and are rewritten by the
next change.
"""

from __future__ import annotations

import mmap
import os
import re
import signal
import struct
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from bpfilter import bpf, bpffs
from bpfilter import netns as netns_mod
from bpfilter.codegen.names import COUNTERS, CTL_MAP, buffer_names
from bpfilter.codegen.spec import MapSpec
from bpfilter.codegen.uapi import MapFlag, MapType
from bpfilter.dispatch import (
    Dispatch,
    TableKey,
    buffer_copy,
    detach,
    ensure_dispatch,
    next_generation,
    open_dispatch,
    pin_name,
)
from bpfilter.dispatch import switch_map as dispatch_switch_map
from bpfilter.layout import Change, Layout, Rebuild

if TYPE_CHECKING:
    from bpfilter.codegen.compiler import CompiledRuleset
    from bpfilter.codegen.uapi import NfHook
    from bpfilter.ir.model import Rule, Ruleset, Table
    from bpfilter.loader import CounterKey, Programs

# The parser, the compiler and the loader are imported by the functions that need them: a
# change of a blocklist chain (bpfilter.fastcmd) works from the stored layout alone.

TEXT_CHUNK = 16384
KILL_ENV = "BPFILTER_KILL_AT"  # tests: SIGKILL this process at the named commit step
_LEN = struct.Struct("<Q")
_GEN_PIN = re.compile(r"^(ip6?-[a-z]+)-g(\d+)-")
CONNTRACK_TABLE = "bpfilter_ct"
NFT_TIMEOUT = 10.0
READ_ATTEMPTS = 5


class StateError(RuntimeError):
    """The stored state cannot be read or written (not root, no bpffs, a broken pin)."""


def require_root(tool: str) -> None:
    """Refuse at once, before touching anything, unless running as root."""
    if os.geteuid() != 0:
        raise StateError(f"{tool}: must be run as root: the firewall and its state in bpffs "
                         "are readable and writable by root alone")


def checkpoint(step: str) -> None:
    """A named step of a commit; tests kill the process there (``BPFILTER_KILL_AT``)."""
    if os.environ.get(KILL_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


# --- the text of a generation ---------------------------------------------------------------

def store_text(text: str) -> bpf.Map:
    """A new array map holding ``text`` (8-byte length, then the UTF-8 bytes)."""
    return store_blob(text.encode("utf-8", "surrogateescape"))


def store_blob(data: bytes, name: str = "bpfilter_text") -> bpf.Map:
    """A new array map holding ``data`` (8-byte length, then the bytes).

    The map is mmapable (its values are one contiguous area, written here with a memory
    copy, not a system call per chunk); it is complete before anyone can open it (the caller
    pins it after), and nothing writes it afterwards."""
    size = _LEN.size + len(data)
    n = max(1, -(-size // TEXT_CHUNK))
    m = bpf.map_create(MapSpec(name, MapType.ARRAY, 4, TEXT_CHUNK, n, MapFlag.MMAPABLE))
    try:
        with mmap.mmap(m.fd, n * TEXT_CHUNK, mmap.MAP_SHARED,
                       mmap.PROT_READ | mmap.PROT_WRITE) as area:
            area[:_LEN.size] = _LEN.pack(len(data))
            area[_LEN.size:size] = data
    except BaseException:
        m.close()
        raise
    return m


def load_text(m: bpf.Map) -> str:
    """The text ``store_text`` put in ``m``."""
    return load_blob(m).decode("utf-8", "surrogateescape")


def load_blob(m: bpf.Map) -> bytes:
    """The bytes ``store_blob`` put in ``m``."""
    if m.spec.flags & MapFlag.MMAPABLE:
        with mmap.mmap(m.fd, m.spec.max_entries * TEXT_CHUNK, mmap.MAP_SHARED,
                       mmap.PROT_READ) as area:
            (size,) = _LEN.unpack_from(area)
            return area[_LEN.size:_LEN.size + size]
    # Stored before the maps were mmapable. An array's batch lookup answers in index order;
    # one call takes every chunk.
    data = b"".join(v for _, v in m.lookup_batch(m.spec.max_entries))
    (size,) = _LEN.unpack_from(data)
    return data[_LEN.size:_LEN.size + size]


def _load_layout(key: TableKey, gen: int, netns: str | None) -> Layout | None:
    try:
        fd = bpffs.get(pin_name(key, f"g{gen}-layout"), netns)
    except bpffs.BpffsError:
        return None  # written by an older bpfilter: the next change rebuilds
    with bpf.map_from_fd(fd, "bpfilter_layout") as m:
        return Layout.loads(load_blob(m))


# --- whose pins ----------------------------------------------------------------------------

OWNER_PIN = "owner"
_OWNER = MapSpec("bpfilter_owner", MapType.ARRAY, 4, 8, 1)


def _owner(netns: str | None) -> int | None:
    try:
        fd = bpffs.get(OWNER_PIN, netns)
    except bpffs.BpffsError:
        return None
    with bpf.map_from_fd(fd, _OWNER.name) as m:
        raw = m.lookup(struct.pack("<I", 0))
    return struct.unpack("<Q", raw)[0] if raw else None


def stale(netns: str | None) -> bool:
    """True when the pins of ``netns`` were made for an earlier namespace of that name."""
    if netns is None:
        return False  # the caller's own namespace outlives every pin
    owner = _owner(netns)
    return owner is not None and owner != netns_mod.inode(netns)


def claim(netns: str | None) -> None:
    """Record which namespace the pins of ``netns`` belong to (once)."""
    if netns is None or _owner(netns) is not None:
        return
    with bpf.map_create(_OWNER) as m:
        m.update(struct.pack("<I", 0), struct.pack("<Q", netns_mod.inode(netns)))
        bpffs.pin(m, OWNER_PIN, netns, replace=True)


def drop_stale(netns: str | None) -> bool:
    """Remove the pins of an earlier namespace of this name; True when there were any."""
    if not stale(netns):
        return False
    for key in tables(netns):
        detach(key, netns)
    bpffs.cleanup(netns)
    return True


# --- reading the state ----------------------------------------------------------------------

def namespaces() -> list[str | None]:
    """Namespaces with a pin directory (None: the caller's own), the caller's first."""
    root = bpffs.find()
    d = root / bpffs.ROOT_DIR if root is not None else None
    if d is None or not d.is_dir():
        return []
    names = sorted(p.name for p in d.iterdir() if p.is_dir())
    return ([None] if bpffs.HOST in names else []) + [n for n in names if n != bpffs.HOST]


def tables(netns: str | None, family: int | None = None) -> list[TableKey]:
    """Tables with a switch set up in ``netns`` (optionally of one family), sorted."""
    d = bpffs.pin_dir(netns, create=False)
    if not d.is_dir():
        return []
    keys = set()
    for p in d.iterdir():
        if p.name.endswith("-ctl"):
            key = TableKey.parse(p.name[: -len("-ctl")])
            if key is not None and (family is None or key.family == family):
                keys.add(key)
    return sorted(keys, key=lambda k: (k.family, k.table))


@dataclass(frozen=True, slots=True)
class LiveTable:
    """A table in force: its generation, stored text, parsed IR and programs."""

    key: TableKey
    generation: int
    text: str
    table: Table
    prog_ids: dict[str, int]  # built-in chain -> id of the program in its slot
    netns: str | None = None
    layout: Layout | None = field(default=None, compare=False)

    def compiled(self) -> CompiledRuleset:
        """The table compiled again (deterministic: the counter indices of a rebuild)."""
        from bpfilter.codegen.compiler import compile_ruleset
        from bpfilter.ir.model import Ruleset

        return compile_ruleset(Ruleset((self.table,)), self.key.family)

    def counters(self) -> dict[CounterKey, tuple[int, int]]:
        """(table, chain, position) -> (packets, bytes) from the live counter map."""
        try:
            fd = bpffs.get(pin_name(self.key, f"g{self.generation}-map-{COUNTERS}"),
                           self.netns)
        except bpffs.BpffsError:
            return {}
        with bpf.map_from_fd(fd, COUNTERS) as m:
            if self.layout is None:
                from bpfilter.loader import read_counters

                return read_counters(self.compiled(), m)
            return layout_counters(self.table, self.layout, m)


_COUNTER = struct.Struct("<QQ")


def slot_counters(m: bpf.Map) -> list[tuple[int, int]]:
    """(packets, bytes) of every slot of a per-CPU counter map, summed over CPUs, read with
    batch lookups."""
    ncpu = bpf.possible_cpus()
    out = []
    for _, raw in m.lookup_batch(8192):
        packets = total = 0
        for p, b in _COUNTER.iter_unpack(raw[:16 * ncpu]):
            packets += p
            total += b
        out.append((packets, total))
    return out


def layout_counters(table: Table, layout: Layout,
                    m: bpf.Map) -> dict[CounterKey, tuple[int, int]]:
    """(table, chain, position) -> (packets, bytes), by the layout's slots."""
    values = slot_counters(m)
    out: dict[CounterKey, tuple[int, int]] = {}
    name = table.name
    for c in table.chains:
        if c.is_base and c.name in layout.policy:
            out[(name, c.name, 0)] = values[layout.policy[c.name]]
        for i, s in enumerate(layout.slots.get(c.name, ()), 1):
            out[(name, c.name, i)] = values[s]
    return out


def live_table(key: TableKey, netns: str | None) -> LiveTable | None:
    """The table ``key`` as it is in force in ``netns``; None when nothing is (generation 0)."""
    if stale(netns):
        return None
    d = open_dispatch(key, netns)
    if d is None:
        return None
    with d.ctl, d.progs:
        for attempt in range(READ_ATTEMPTS):
            gen = d.generation()
            if gen == 0:
                return None
            try:
                fd = bpffs.get(pin_name(key, f"g{gen}-text"), netns)
                break
            except bpffs.BpffsError as e:
                # Readers take no lock: a commit may have switched on and removed this
                # generation's pins between the two reads. Then read the new one.
                if attempt + 1 == READ_ATTEMPTS or d.generation() == gen:
                    raise StateError(f"generation {gen} of {key.prefix} is in force but its "
                                     f"text is missing: {e}") from e
        with bpf.map_from_fd(fd, "bpfilter_text") as m:
            text = load_text(m)
        layout = _load_layout(key, gen, netns)
        ids = {chain: pid for chain, hook in key.hooks.items()
               if (pid := d.prog_id(gen, hook)) is not None}
    from bpfilter.grammar.iptables import parse_restore

    parsed = parse_restore(text, family=key.family, filename=pin_name(key, f"g{gen}-text"))
    table = parsed.table(key.table)
    if table is None:
        raise StateError(f"the stored text of {key.prefix} holds no table {key.table}")
    if layout is not None and [c.name for c in table.chains] != list(layout.slots) or \
            layout is not None and any(len(c.rules) != len(layout.slots[c.name])
                                       for c in table.chains):
        layout = None  # not this text's: counters by a recompile, the next change rebuilds
    return LiveTable(key, gen, text, table, ids, netns, layout)


@dataclass(frozen=True, slots=True)
class LiveHead:
    """What is in force for a table, without its text or IR: enough for a change that the
    layout alone decides (bpfilter.incremental.blocklist_change)."""

    key: TableKey
    generation: int
    layout: Layout
    prog_ids: dict[str, int]
    netns: str | None = None

    def text(self) -> str:
        """The stored text of this generation."""
        return self.blob().decode("utf-8", "surrogateescape")

    def blob(self) -> bytes:
        """The stored text of this generation, encoded as stored."""
        with bpf.map_from_fd(bpffs.get(pin_name(self.key, f"g{self.generation}-text"),
                                       self.netns), "bpfilter_text") as m:
            return load_blob(m)


def live_head(key: TableKey, netns: str | None) -> LiveHead | None:
    """The table ``key`` in force, by its layout; None when nothing is, it has no layout,
    or a commit is switching it right now (the caller then reads it in full)."""
    if stale(netns):
        return None
    d = open_dispatch(key, netns)
    if d is None:
        return None
    with d.ctl, d.progs:
        gen = d.generation()
        if gen == 0:
            return None
        layout = _load_layout(key, gen, netns)
        ids = {chain: pid for chain, hook in key.hooks.items()
               if (pid := d.prog_id(gen, hook)) is not None}
        if layout is None or d.generation() != gen:
            return None
    return LiveHead(key, gen, layout, ids, netns)


def live_tables(netns: str | None, family: int) -> list[LiveTable]:
    """Every table in force in ``netns`` for ``family``."""
    return [live for key in tables(netns, family)
            if (live := live_table(key, netns)) is not None]


def live_ruleset(netns: str | None, family: int) -> Ruleset:
    """Every table in force in ``netns`` for ``family``, as IR."""
    from bpfilter.ir.model import Ruleset

    return Ruleset(tuple(live.table for live in live_tables(netns, family)))


def with_counters(live: LiveTable) -> Table:
    """The live table with each chain's and rule's counters from the live map."""
    counts = live.counters()
    name = live.key.table
    chains = []
    for c in live.table.chains:
        rules = tuple(replace(r, counters=counts.get((name, c.name, i), (0, 0)))
                      for i, r in enumerate(c.rules, 1))
        policy = counts.get((name, c.name, 0), (0, 0)) if c.is_base else None
        chains.append(replace(c, rules=rules, counters=policy))
    return replace(live.table, chains=tuple(chains))


# --- committing -----------------------------------------------------------------------------

def commit(key: TableKey, programs: Programs, text: str, netns: str | None, *,
           carry: dict[CounterKey, tuple[int, int]] | None = None,
           table: Table | None = None) -> int:
    """Put a loaded generation of ``key``'s table in force; returns its number.

    ``programs`` are loaded, not attached; ``text`` is the table's canonical
    iptables-save text. ``carry`` gives initial counters (packets, bytes) by (table, chain,
    position) of the new table, written before the switch. With ``table`` (the IR the
    programs were compiled from, alone) its layout is stored too, so that later changes of
    lookup entries can skip the rebuild.
    """
    from bpfilter.incremental import fresh_layout
    from bpfilter.loader import growable

    drop_stale(netns)
    claim(netns)
    d = ensure_dispatch(key, netns)
    try:
        gen = next_generation(d.generation(), rebuild=True)
        _clear_generations(key, netns, keep=d.generation())
        prefix = f"g{gen}"
        for name, m in programs.maps.items():
            bpffs.pin(m, pin_name(key, f"{prefix}-map-{name}"), netns, replace=True)
        if carry:
            _seed_counters(programs, carry)
        with store_text(text) as tm:
            bpffs.pin(tm, pin_name(key, f"{prefix}-text"), netns, replace=True)
        # A layout lets later changes write the run maps' other copy and flip ctl's copy
        # bit: only for programs that read that bit from this table's ctl.
        switched = all(spec.name != CTL_MAP for spec in programs.compiled.maps) or \
            programs.shared_ids.get(CTL_MAP) == d.ctl.info().id
        if table is not None and COUNTERS in programs.maps and switched:
            grow = growable(programs.compiled)
            caps = {n: m.spec.max_entries for n, m in programs.maps.items() if n in grow}
            layout = fresh_layout(table, programs.compiled, caps.pop(COUNTERS), caps)
            with store_blob(layout.dumps(), "bpfilter_layout") as lm:
                bpffs.pin(lm, pin_name(key, f"{prefix}-layout"), netns, replace=True)
        if programs.compiled.needs_conntrack:
            ensure_conntrack(netns)
        by_hook: dict[NfHook, bpf.Prog] = {p.hook: prog for p, prog in programs.progs.items()
                                           if p.table == key.table}
        d.stage(gen, by_hook)
        checkpoint("rebuild-staged")
        d.switch(gen)  # the commit point
        checkpoint("rebuild-switched")
        _clear_generations(key, netns, keep=gen)
        return gen
    finally:
        d.close()


@dataclass(frozen=True, slots=True)
class Applied:
    """A change applied as map writes: the generation now in force and what it took."""

    generation: int
    prog_ids: dict[str, int]
    entries: int  # map entries written
    seconds: float  # from the first pin to the switch
    write_seconds: float  # the map writes and the switch alone

    def as_json(self) -> dict[str, float | int]:
        return {"entries": self.entries, "seconds": self.seconds,
                "write_seconds": self.write_seconds}


def plan_incremental(live: LiveTable, table: Table, *,
                     explicit: dict[tuple[str, int], tuple[int, int]] | None = None
                     ) -> Change | str:
    """The map writes turning ``live`` into ``table``, or why it takes a rebuild."""
    if live.layout is None:
        return "no layout stored for the table in force"
    from bpfilter.incremental import plan_change

    try:
        return plan_change(live.table, live.layout, table, live.key.family,
                           dirty=_dirty(live), explicit=explicit)
    except Rebuild as e:
        return e.reason


def _dirty(live: LiveTable | LiveHead) -> dict[str, list[bytes]]:
    """Keys a killed change may have written into the copy not in use: the leftover layout
    of the generation it was making (the one this change makes too)."""
    nxt = next_generation(live.generation, rebuild=False)
    left = _load_layout(live.key, nxt, live.netns)
    return left.touched if left is not None else {}


def dirty_keys(live: LiveTable | LiveHead) -> dict[str, list[bytes]]:
    """Keys a killed change may have left written in the copy not in use (see _dirty)."""
    return _dirty(live)


def apply_change(live: LiveTable | LiveHead, change: Change, text: str | bytes) -> Applied:
    """Put ``change`` in force without loading anything: pin the maps in force under the
    next generation with the new text (``bytes``: already encoded) and layout, write the
    run maps' unused copy and the counters of new rules, then switch (one ``ctl`` write,
    atomic for every hook)."""
    key, netns = live.key, live.netns
    d = open_dispatch(key, netns)
    if d is None or d.generation() != live.generation:
        raise StateError(f"{key.prefix} changed while the change was being prepared")
    try:
        start = time.perf_counter()
        gen = next_generation(live.generation, rebuild=False)
        copy = buffer_copy(gen)
        _clear_generations(key, netns, keep=live.generation)
        head = pin_name(key, f"g{live.generation}-map-")
        where = bpffs.pin_dir(netns, create=False)
        maps: dict[str, bpf.Map] = {}
        try:
            for entry in os.listdir(where):
                if entry.startswith(head):
                    name = entry[len(head):]
                    maps[name] = bpf.map_from_fd(bpf.obj_get(str(where / entry)), name)
                    bpffs.pin(maps[name], pin_name(key, f"g{gen}-map-{name}"), netns,
                              replace=True)
            with (store_blob(text) if isinstance(text, bytes) else store_text(text)) as tm:
                bpffs.pin(tm, pin_name(key, f"g{gen}-text"), netns, replace=True)
            # The layout names the keys about to be written: pinned first, so a killed run
            # leaves them to be rewritten.
            with store_blob(change.layout.dumps(), "bpfilter_layout") as lm:
                bpffs.pin(lm, pin_name(key, f"g{gen}-layout"), netns, replace=True)
            checkpoint("maps-pinned")
            written = time.perf_counter()
            _write_counters(maps.get(COUNTERS), change.counters)
            for name, writes in change.writes.items():
                m = maps.get(buffer_names(name)[copy])
                if m is None:
                    raise StateError(f"map {name} of {key.prefix} is missing")
                _write_entries(m, writes)
            checkpoint("maps-written")
            d.switch(gen)  # the commit point
            done = time.perf_counter()
            seconds, write_seconds = done - start, done - written
            checkpoint("maps-switched")
        finally:
            for m in maps.values():
                m.close()
        _clear_generations(key, netns, keep=gen)
        return Applied(gen, dict(live.prog_ids), change.entries_written, seconds, write_seconds)
    finally:
        d.close()


def _write_entries(m: bpf.Map, writes: dict[bytes, bytes | None]) -> None:
    puts = [(k, v) for k, v in writes.items() if v is not None]
    gone = [k for k, v in writes.items() if v is None]
    if len(puts) > 8:
        m.update_batch(puts)
    else:
        for k, v in puts:
            m.update(k, v)
    for k in gone:
        m.delete(k)  # False when already absent (a rewrite after a kill)


def _write_counters(m: bpf.Map | None, values: dict[int, tuple[int, int]]) -> None:
    if m is None or not values:
        return
    ncpu = bpf.possible_cpus()
    for slot, value in values.items():
        # All of it on CPU 0: the program only ever adds, so the sums stay right.
        m.update_percpu(struct.pack("<I", slot),
                        [_COUNTER.pack(*value)] + [bytes(16)] * (ncpu - 1))


def _seed_counters(programs: Programs, carry: dict[CounterKey, tuple[int, int]]) -> None:
    m = programs.maps.get(COUNTERS)
    if m is None:
        return
    ncpu = bpf.possible_cpus()
    for index, ref in programs.compiled.rule_index.items():
        value = carry.get((ref.table, ref.chain, ref.position))
        if value and any(value):
            # All of it on CPU 0: the program only ever adds, so the sums stay right.
            values = [struct.pack("<QQ", *value)] + [bytes(16)] * (ncpu - 1)
            m.update_percpu(struct.pack("<I", index), values)


def switch_map(key: TableKey, netns: str | None) -> bpf.Map:
    """The table's switch map (created when missing), for programs to link."""
    drop_stale(netns)
    claim(netns)
    return dispatch_switch_map(key, netns)


def _clear_generations(key: TableKey, netns: str | None, *, keep: int) -> None:
    d = bpffs.pin_dir(netns, create=False)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return
    for name in names:
        m = _GEN_PIN.match(name)
        if m and m.group(1) == key.prefix and int(m.group(2)) != keep:
            bpffs.unpin(d / name)


def carried_counters(old: Table | None, new: Table, old_counts: dict[CounterKey,
                     tuple[int, int]]) -> dict[CounterKey, tuple[int, int]]:
    """Counters for ``new`` taken over from ``old``: a chain's policy counter when the chain
    stays, and each rule's when the same rule (same text, same occurrence in its chain)
    stays."""
    if old is None:
        return {}
    out: dict[CounterKey, tuple[int, int]] = {}
    for nc in new.chains:
        oc = old.chain(nc.name)
        if oc is None:
            continue
        if nc.is_base and oc.is_base:
            out[(new.name, nc.name, 0)] = old_counts.get((old.name, oc.name, 0), (0, 0))
        positions: dict[Rule, list[int]] = {}
        for i, r in enumerate(oc.rules, 1):
            positions.setdefault(_rule_key(r), []).append(i)
        for i, r in enumerate(nc.rules, 1):
            left = positions.get(_rule_key(r))
            if left:
                out[(new.name, nc.name, i)] = old_counts.get((old.name, oc.name, left.pop(0)),
                                                             (0, 0))
    return out


def _rule_key(r: Rule) -> Rule:
    return replace(r, counters=None, line=0, col=0)


# --- removing -------------------------------------------------------------------------------

def remove(key: TableKey, netns: str | None) -> None:
    """Stop filtering ``key``'s table and forget it."""
    detach(key, netns)


def flush(netns: str | None) -> list[TableKey]:
    """Remove everything bpfilter loaded in ``netns``; returns the tables removed."""
    keys = tables(netns)
    for key in keys:
        detach(key, netns)
    bpffs.cleanup(netns)
    disable_conntrack(netns)
    return keys


# --- conntrack ------------------------------------------------------------------------------

# Conntrack runs in a namespace only while some netfilter user holds it (see
# bpfilter.loader.enable_conntrack): one fixed nftables table per namespace does, replaced in
# one nft transaction so conntrack never stops in between.
def ensure_conntrack(netns: str | None) -> None:
    """Make conntrack track packets in ``netns`` (idempotent)."""
    _nft(netns, f"add table inet {CONNTRACK_TABLE}\ndelete table inet {CONNTRACK_TABLE}\n"
         f"table inet {CONNTRACK_TABLE} {{\n  chain keep {{\n    ct state new\n  }}\n}}\n")


def disable_conntrack(netns: str | None) -> None:
    """Drop bpfilter's hold on conntrack in ``netns`` (nothing when there is none)."""
    # Look first (read-only), so a namespace where bpfilter never turned conntrack on
    # sees no nftables change at all.
    if _nft(netns, f"list table inet {CONNTRACK_TABLE}\n", check=False):
        _nft(netns, f"delete table inet {CONNTRACK_TABLE}\n", check=False)


def _nft(netns: str | None, script: str, *, check: bool = True) -> bool:
    import subprocess

    argv = ["nft", "-f", "-"]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    try:
        proc = subprocess.run(argv, input=script, capture_output=True, text=True,
                              timeout=NFT_TIMEOUT)
    except FileNotFoundError:
        if check:
            raise StateError("nft is needed to turn conntrack on for ct matches") from None
        return False
    if check and proc.returncode != 0:
        raise StateError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc.returncode == 0


# --- status ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ProgStatus:
    chain: str
    hook: str
    prog_id: int
    insns: int
    memlock: int


@dataclass(frozen=True, slots=True)
class TableStatus:
    """What ``bpfilter status`` shows of one table."""

    family: int
    table: str
    generation: int
    rules: int
    chains: int
    programs: tuple[ProgStatus, ...]
    maps: tuple[tuple[str, int, int], ...]  # (name, id, max_entries)
    pins: tuple[str, ...]


def status(netns: str | None) -> list[TableStatus]:
    """Every table bpfilter set up in ``netns``, with what is in force."""
    out: list[TableStatus] = []
    if stale(netns):
        return out
    for key in tables(netns):
        live = live_table(key, netns)
        gen = live.generation if live else 0
        progs = []
        if live is not None:
            for chain, pid in live.prog_ids.items():
                with bpf.prog_get_fd_by_id(pid) as prog:
                    info = prog.info()
                progs.append(ProgStatus(chain, key.hooks[chain].name, pid,
                                        _insns(info), _memlock(info)))
        maps = []
        for p in bpffs.pins(netns):
            head = pin_name(key, f"g{gen}-map-")
            if p.name.startswith(head):
                with bpf.map_from_fd(bpf.obj_get(str(p))) as m:
                    mi = m.info()
                maps.append((p.name[len(head):], mi.id, mi.max_entries))
        pins = tuple(p.name for p in bpffs.pins(netns) if p.name.startswith(key.prefix + "-"))
        rules = sum(len(c.rules) for c in live.table.chains) if live else 0
        nchains = len(live.table.chains) if live else 0
        out.append(TableStatus(key.family, key.table, gen, rules, nchains, tuple(progs),
                               tuple(maps), pins))
    return out


def _insns(info: bpf.ProgInfo) -> int:
    return info.xlated_insns


def _memlock(info: bpf.ProgInfo) -> int:
    return info.jited_len


__all__ = ["CONNTRACK_TABLE", "OWNER_PIN", "Dispatch", "LiveTable", "ProgStatus", "StateError",
           "TableStatus", "carried_counters", "claim", "commit", "disable_conntrack",
           "drop_stale", "ensure_conntrack", "flush", "live_ruleset", "live_table", "live_tables",
           "load_text", "namespaces", "remove", "require_root", "stale", "status",
           "store_text", "tables", "with_counters"]
