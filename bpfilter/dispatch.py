"""The dispatcher: one attached program per (family, table, hook) that tail-calls the table's
current generation, so a whole table is replaced by one map write."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bpfilter import bpf, bpffs
from bpfilter.codegen.names import BUFFER_BIT, HOOKS, PRIORITY
from bpfilter.codegen.spec import MapSpec
from bpfilter.codegen.uapi import MapType, NfHook, NfProto

if TYPE_CHECKING:
    from bpfilter.codegen import asm
    from bpfilter.codegen.insn import Insn

# The code generator and the attach layer are imported where a dispatcher is built: a
# change of map entries only (bpfilter.fastcmd) reads and switches the maps, nothing more.

# How a table is switched (the invariant everything else relies on):
#
# - ``ctl`` is a one-entry array holding the table's generation number N. Every dispatcher
#   of the table reads it once per packet and tail-calls slot ``(N & 1) * SLOTS + hook`` of
#   the table's ``progs`` prog_array.
# - A new generation N+1 is written only into the slots of the other parity, which no
#   packet uses, and only after all of its programs are loaded. Then one write of ``ctl``
#   switches every hook of the table at once. The slots of generation N stay as they are
#   (a packet that read N just before the switch still finds N's programs there); they are
#   overwritten by generation N+2, a whole restore later, while a packet needs the
#   nanoseconds between its read of ``ctl`` and its tail call.
# - An empty slot makes ``bpf_tail_call`` return, and the dispatcher then answers ACCEPT:
#   the slot of a chain that needs no program (no rules, ACCEPT policy), and every slot of
#   generation 0, which is "no ruleset": the dispatchers are attached before the first
#   generation is switched in, and until then they change nothing.
# - Only the low bit of ``ctl`` picks the slots, and it lives in one byte, so even a torn
#   read of the counter gives the old or the new generation, never a mix.
# - Bit 1 (``lookup.BUFFER_BIT``) picks which copy of its runs' maps a program uses (each
#   program reads it once per packet). A change of map entries only (bpfilter.incremental)
#   writes the copy not in use and adds 2: the same programs stay in the same slots and
#   every run switches copy at once. A rebuild flips bit 0 and keeps bit 1, so a packet
#   still in an old program finds the copy it used (the new programs' two copies are equal).
#
# A prog_array drops all its entries when its last *user* reference goes away (the kernel's
# uref, held by fds from userspace and by pins, not by the programs that use the map): so
# ``progs`` is always pinned, and so are ``ctl`` and the links.

SLOTS = 8  # slots per parity; a hook's number (NfHook, 0-4) is its slot
CTL_KEY = struct.pack("<I", 0)
DISPATCHER_NAME = "bpfilter_disp"


@dataclass(frozen=True, slots=True)
class TableKey:
    """One table of one family in one network namespace's pin directory."""

    family: int
    table: str

    @property
    def prefix(self) -> str:
        """Prefix of every pin name of this table (``ip-filter``, ``ip6-raw``)."""
        return f"{'ip' if self.family == 4 else 'ip6'}-{self.table}"

    @property
    def pf(self) -> NfProto:
        return NfProto.IPV4 if self.family == 4 else NfProto.IPV6

    @property
    def hooks(self) -> dict[str, NfHook]:
        """Built-in chain -> hook of this table."""
        return HOOKS[self.table]

    @classmethod
    def parse(cls, prefix: str) -> TableKey | None:
        """The key whose ``prefix`` is ``prefix``, or None when it is not one."""
        fam, _, table = prefix.partition("-")
        if fam not in ("ip", "ip6") or table not in HOOKS:
            return None
        return cls(4 if fam == "ip" else 6, table)


# bpffs refuses names with a dot (EPERM, "reserved for future use"): pin names use dashes.
def next_generation(current: int, *, rebuild: bool) -> int:
    """The generation after ``current``: a rebuild uses the other slots (bit 0 flips, the
    copy bit stays), a map-only change the other copy of the run maps (bit 1 flips). Always
    larger than ``current``."""
    if rebuild:
        # even: +1 sets bit 0; odd: +3 clears bit 0, and its carry leaves bit 1 as it was
        return current + (1 if current % 2 == 0 else 3)
    return current + BUFFER_BIT


def buffer_copy(generation: int) -> int:
    """Which copy of the run maps (0 or 1, lookup.buffer_names) ``generation`` uses."""
    return 1 if generation & BUFFER_BIT else 0


def pin_name(key: TableKey, what: str) -> str:
    """Name of a pin of ``key``'s table: ``ctl``, ``progs``, ``link-CHAIN``, ``gN-…``."""
    return f"{key.prefix}-{what}"


CTL_SPEC = MapSpec("bpfilter_ctl", MapType.ARRAY, 4, 4, 1)
PROGS_SPEC = MapSpec("bpfilter_progs", MapType.PROG_ARRAY, 4, 4, 2 * SLOTS)


def dispatcher_code(hook: NfHook) -> list[Insn | asm.Label]:
    """The dispatcher of ``hook``: tail-call the current generation's program, else ACCEPT."""
    from bpfilter.codegen import asm
    from bpfilter.codegen.helpers import BpfFunc
    from bpfilter.codegen.insn import R0, R1, R2, R3, R6
    from bpfilter.codegen.opcodes import Size
    from bpfilter.codegen.uapi import NfVerdict

    return [
        asm.mov64(R6, R1, comment="ctx"),
        asm.ld_map_value(R2, "ctl", 0, comment="&generation"),
        asm.ldx(Size.W, R3, R2, 0),
        asm.and64(R3, 1, comment="parity picks the slots"),
        asm.mul64(R3, SLOTS),
        asm.add64(R3, int(hook)),
        asm.mov64(R1, R6),
        asm.ld_map_fd(R2, "progs"),
        asm.call_helper(BpfFunc.tail_call),
        # Only reached when the slot is empty.
        asm.mov64(R0, int(NfVerdict.ACCEPT)),
        asm.exit_(),
    ]


def load_dispatcher(hook: NfHook, ctl: bpf.Map, progs: bpf.Map) -> bpf.Prog:
    """Load (not attach) the dispatcher of ``hook`` over the table's ``ctl`` and ``progs``."""
    from bpfilter.codegen.link import link
    from bpfilter.codegen.spec import ProgramSpec
    from bpfilter.codegen.uapi import AttachType, ProgType

    linked = link(dispatcher_code(hook), maps={"ctl": ctl.fd, "progs": progs.fd})
    spec = ProgramSpec(DISPATCHER_NAME, ProgType.NETFILTER, linked.code,
                       expected_attach_type=AttachType.NETFILTER)
    return bpf.prog_load(spec)


def _get_map(name: str, netns: str | None, spec: MapSpec) -> bpf.Map | None:
    try:
        fd = bpffs.get(name, netns)
    except bpffs.BpffsError:
        return None
    m = bpf.map_from_fd(fd, spec.name)
    bpf.check_compatible(m, spec)
    return m


def switch_map(key: TableKey, netns: str | None) -> bpf.Map:
    """The table's ``ctl`` map, created and pinned when missing (nothing is attached):
    programs that read the copy bit link it before the table's dispatchers exist."""
    return _get_or_create(pin_name(key, "ctl"), netns, CTL_SPEC)


def _get_or_create(name: str, netns: str | None, spec: MapSpec) -> bpf.Map:
    m = _get_map(name, netns, spec)
    if m is None:
        m = bpf.map_create(spec)
        bpffs.pin(m, name, netns, replace=True)
    return m


@dataclass(slots=True)
class Dispatch:
    """The live switch of one table: its ``ctl`` and ``progs`` maps (owns the fds)."""

    key: TableKey
    netns: str | None
    ctl: bpf.Map
    progs: bpf.Map
    _closed: bool = field(default=False)

    def generation(self) -> int:
        """The generation in force (0: none, every packet accepted)."""
        raw = self.ctl.lookup(CTL_KEY)
        return struct.unpack("<I", raw)[0] if raw else 0

    def slot(self, generation: int, hook: NfHook) -> int:
        return (generation & 1) * SLOTS + int(hook)

    def prog_id(self, generation: int, hook: NfHook) -> int | None:
        """Id of the program in ``hook``'s slot of ``generation`` (None: empty slot)."""
        raw = self.progs.lookup(struct.pack("<I", self.slot(generation, hook)))
        return struct.unpack("<I", raw)[0] if raw else None

    def stage(self, generation: int, programs: dict[NfHook, bpf.Prog]) -> None:
        """Fill the slots of ``generation``'s parity; a hook with no program gets an empty
        slot (ACCEPT). Must never be the parity in force."""
        if (generation & 1) == (self.generation() & 1):
            raise ValueError(f"generation {generation} has the parity of the one in force")
        for hook in self.key.hooks.values():
            k = struct.pack("<I", self.slot(generation, hook))
            prog = programs.get(hook)
            if prog is None:
                self.progs.delete(k)
            else:
                self.progs.update(k, prog)

    def switch(self, generation: int) -> None:
        """The commit point: every later packet of every hook of the table runs
        ``generation``."""
        self.ctl.update(CTL_KEY, struct.pack("<I", generation))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.ctl.close()
            self.progs.close()


def open_dispatch(key: TableKey, netns: str | None) -> Dispatch | None:
    """The table's switch when it was set up before, else None (nothing is created)."""
    ctl = _get_map(pin_name(key, "ctl"), netns, CTL_SPEC)
    if ctl is None:
        return None
    progs = _get_map(pin_name(key, "progs"), netns, PROGS_SPEC)
    if progs is None:
        ctl.close()
        return None
    return Dispatch(key, netns, ctl, progs)


def ensure_dispatch(key: TableKey, netns: str | None) -> Dispatch:
    """The table's switch, set up first when needed: maps created and pinned, a dispatcher
    attached at every built-in chain's hook and its link pinned.

    Idempotent and safe to interrupt: what is pinned is reused; an attached but not yet
    pinned link dies with this process. Until a generation is switched in the dispatchers
    accept every packet, as if nothing were loaded.
    """
    from bpfilter.attach_netfilter import NetfilterOptions, attach_netfilter

    ctl = _get_or_create(pin_name(key, "ctl"), netns, CTL_SPEC)
    try:
        progs = _get_or_create(pin_name(key, "progs"), netns, PROGS_SPEC)
    except BaseException:
        ctl.close()
        raise
    d = Dispatch(key, netns, ctl, progs)
    try:
        for chain, hook in key.hooks.items():
            name = pin_name(key, f"link-{chain}")
            if bpffs.pin_path(name, netns).exists():
                continue
            with load_dispatcher(hook, ctl, progs) as prog:
                options = NetfilterOptions(key.pf, hook, PRIORITY[key.table])
                with attach_netfilter(prog, options, netns=netns) as nflink:
                    bpffs.pin(nflink, name, netns)
    except BaseException:
        d.close()
        raise
    return d


def detach(key: TableKey, netns: str | None) -> None:
    """Remove every pin of ``key``'s table: the dispatchers detach at once (their links
    lived on the pins), then the maps and programs go with their last reference."""
    d = bpffs.pin_dir(netns, create=False)
    if not d.is_dir():
        return
    pins = sorted(p for p in d.iterdir() if p.name.startswith(key.prefix + "-"))
    # Links first: from then on the table filters nothing, whatever else is left.
    for p in sorted(pins, key=lambda p: "-link-" not in p.name):
        bpffs.unpin(p)
