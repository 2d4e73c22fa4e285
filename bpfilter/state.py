"""What bpfilter has loaded in a network namespace, kept in bpffs next to the pins.

Layout of ``<bpffs>/bpfilter/<netns or "host">/`` (directory mode 0700, so root only):

- ``ip-filter-ctl``, ``ip-filter-progs``, ``ip-filter-link-INPUT`` ...: the table's switch
  and its attached dispatchers (see bpfilter.dispatch); ``ip6-`` for IPv6, ``raw`` likewise;
- ``ip-filter-gN-text``: the canonical iptables-save text of generation N of the table (no
  counters), in an array map of TEXT_CHUNK-byte values, since bpffs holds only BPF objects;
- ``ip-filter-gN-map-NAME``: the maps of generation N (``counters`` and any lookup maps).

- ``owner``: the inode of the named network namespace the pins belong to. A namespace
  deleted and created again under the same name is a different namespace: the pins of the
  old one are stale (their links filter a namespace that is gone) and are dropped.

The ``ctl`` value says which generation is in force; a generation's pins are complete before
it is switched in, and pins of other generations are leftovers of an interrupted or earlier
run, removed by the next commit. So a process killed at any point leaves the old or the new
ruleset in force, each with its text, and the state stays readable.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
from dataclasses import dataclass, replace

from bpfilter import bpf, bpffs
from bpfilter import netns as netns_mod
from bpfilter.codegen.compiler import COUNTERS, CompiledRuleset, compile_ruleset
from bpfilter.codegen.spec import MapSpec
from bpfilter.codegen.uapi import MapType, NfHook
from bpfilter.dispatch import Dispatch, TableKey, detach, ensure_dispatch, open_dispatch, pin_name
from bpfilter.grammar.iptables import parse_restore
from bpfilter.ir.model import Rule, Ruleset, Table
from bpfilter.loader import CounterKey, Programs, read_counters

TEXT_CHUNK = 16384
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


# --- the text of a generation ---------------------------------------------------------------

def store_text(text: str) -> bpf.Map:
    """A new array map holding ``text`` (8-byte length, then the UTF-8 bytes)."""
    data = text.encode("utf-8", "surrogateescape")
    data = _LEN.pack(len(data)) + data
    n = max(1, -(-len(data) // TEXT_CHUNK))
    m = bpf.map_create(MapSpec("bpfilter_text", MapType.ARRAY, 4, TEXT_CHUNK, n))
    try:
        items = [(struct.pack("<I", i), data[i * TEXT_CHUNK:(i + 1) * TEXT_CHUNK]
                  .ljust(TEXT_CHUNK, b"\0")) for i in range(n)]
        m.update_batch(items)
    except BaseException:
        m.close()
        raise
    return m


def load_text(m: bpf.Map) -> str:
    """The text ``store_text`` put in ``m``."""
    chunks = [v for _, v in sorted(m.lookup_batch(64), key=lambda kv: struct.unpack("<I", kv[0]))]
    data = b"".join(chunks)
    (size,) = _LEN.unpack_from(data)
    return data[_LEN.size:_LEN.size + size].decode("utf-8", "surrogateescape")


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

    def compiled(self) -> CompiledRuleset:
        """The table compiled again (deterministic: the counter indices of the live maps)."""
        return compile_ruleset(Ruleset((self.table,)), self.key.family)

    def counters(self) -> dict[CounterKey, tuple[int, int]]:
        """(table, chain, position) -> (packets, bytes) from the live counter map."""
        try:
            fd = bpffs.get(pin_name(self.key, f"g{self.generation}-map-{COUNTERS}"),
                           self.netns)
        except bpffs.BpffsError:
            return {}
        with bpf.map_from_fd(fd, COUNTERS) as m:
            return read_counters(self.compiled(), m)


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
        ids = {chain: pid for chain, hook in key.hooks.items()
               if (pid := d.prog_id(gen, hook)) is not None}
    parsed = parse_restore(text, family=key.family, filename=pin_name(key, f"g{gen}-text"))
    table = parsed.table(key.table)
    if table is None:
        raise StateError(f"the stored text of {key.prefix} holds no table {key.table}")
    return LiveTable(key, gen, text, table, ids, netns)


def live_ruleset(netns: str | None, family: int) -> Ruleset:
    """Every table in force in ``netns`` for ``family``, as IR."""
    out = []
    for key in tables(netns, family):
        live = live_table(key, netns)
        if live is not None:
            out.append(live.table)
    return Ruleset(tuple(out))


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
           carry: dict[CounterKey, tuple[int, int]] | None = None) -> int:
    """Put a loaded generation of ``key``'s table in force; returns its number.

    ``programs`` are loaded, not attached; ``text`` is the table's canonical
    iptables-save text. ``carry`` gives initial counters (packets, bytes) by (table, chain,
    position) of the new table, written before the switch.
    """
    drop_stale(netns)
    claim(netns)
    d = ensure_dispatch(key, netns)
    try:
        gen = d.generation() + 1
        _clear_generations(key, netns, keep=d.generation())
        prefix = f"g{gen}"
        for name, m in programs.maps.items():
            bpffs.pin(m, pin_name(key, f"{prefix}-map-{name}"), netns, replace=True)
        if carry:
            _seed_counters(programs, carry)
        with store_text(text) as tm:
            bpffs.pin(tm, pin_name(key, f"{prefix}-text"), netns, replace=True)
        if programs.compiled.needs_conntrack:
            ensure_conntrack(netns)
        by_hook: dict[NfHook, bpf.Prog] = {p.hook: prog for p, prog in programs.progs.items()
                                           if p.table == key.table}
        d.stage(gen, by_hook)
        d.switch(gen)  # the commit point
        _clear_generations(key, netns, keep=gen)
        return gen
    finally:
        d.close()


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


def _clear_generations(key: TableKey, netns: str | None, *, keep: int) -> None:
    d = bpffs.pin_dir(netns, create=False)
    if not d.is_dir():
        return
    for p in d.iterdir():
        m = _GEN_PIN.match(p.name)
        if m and m.group(1) == key.prefix and int(m.group(2)) != keep:
            bpffs.unpin(p)


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
           "drop_stale", "ensure_conntrack", "flush", "live_ruleset", "live_table",
           "load_text", "namespaces", "remove", "require_root", "stale", "status",
           "store_text", "tables", "with_counters"]
