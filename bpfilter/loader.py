"""Load a compiled ruleset: maps, programs (verifier errors named by rule line), netfilter
links in a network namespace, pins, counters, conntrack activation, unload."""

from __future__ import annotations

import bisect
import fcntl
import functools
import gzip
import os
import re
import secrets
import struct
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType

from bpfilter import bpf, bpffs, netns, sets
from bpfilter.attach_netfilter import NetfilterOptions, attach_netfilter
from bpfilter.btf import Btf
from bpfilter.btf_cache import BtfFacts
from bpfilter.codegen import lookup
from bpfilter.codegen.compiler import COUNTERS, CompiledProgram, CompiledRuleset
from bpfilter.codegen.flavor_netfilter import (
    KernelLayout,
    KField,
    func_btf,
    hook_state_context,
    meta_size,
)
from bpfilter.codegen.link import Linked, link
from bpfilter.codegen.spec import ProgramSpec
from bpfilter.codegen.uapi import NS_GET_USERNS, NfHook, NfProto
from bpfilter.ir.optimizer import Run

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
NFT_TIMEOUT = 10.0
_COUNTER = struct.Struct("<QQ")
_INSN_LINE = re.compile(r"^(\d+): ")


class LoadError(RuntimeError):
    """The verifier refused a program; names the rule lines it points at and keeps the log."""

    def __init__(self, program: str, lines: list[int], log: str, cause: str) -> None:
        self.program = program
        self.lines = lines
        self.log = log
        where = f" (rule at line {', '.join(map(str, lines))})" if lines else ""
        super().__init__(f"program {program} refused by the verifier{where}: {cause}")


@functools.cache
def kernel_layout() -> KernelLayout:
    """Offsets of the kernel fields generated code reads, from /sys/kernel/btf/vmlinux
    (through the on-disk cache of bpfilter.btf_cache)."""
    facts = _facts()
    layout = KernelLayout({f: facts.member_offset(f.struct, f.member) for f in KField},
                          hz=kernel_hz())
    facts.save()
    return layout


@functools.cache
def _facts() -> BtfFacts:
    return BtfFacts(load=_btf)


def check_owner_namespace(name: str | None) -> None:
    """The owner match compares socket ids with the rule's as ids of the initial user
    namespace; xt_owner maps the rule's through the network namespace's owning user
    namespace (make_kuid), so a namespace owned by another one is refused (NetnsError)."""
    where = str(netns.path(name)) if name is not None else "/proc/self/ns/net"
    fd = os.open(where, os.O_RDONLY)
    try:
        user_fd = fcntl.ioctl(fd, NS_GET_USERNS)
    finally:
        os.close(fd)
    try:
        theirs = os.fstat(user_fd)
    finally:
        os.close(user_fd)
    ours = os.stat("/proc/self/ns/user")
    if (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino):
        raise netns.NetnsError(
            f"network namespace {name or '(current)'} belongs to another user namespace: "
            "the owner match compares ids of the initial one and cannot map them there")


def kernel_hz() -> int:
    """CONFIG_HZ of the running kernel (/proc/config.gz, else /boot/config-RELEASE), 0 when
    neither can be read; only --ctexpire needs it."""
    for path, opener in (("/proc/config.gz", gzip.open), (f"/boot/config-{os.uname().release}",
                                                          open)):
        try:
            with opener(path, "rt") as f:
                for line in f:
                    if line.startswith("CONFIG_HZ="):
                        return int(line.split("=", 1)[1])
        except OSError:
            continue
    return 0


@functools.cache
def _btf() -> Btf:
    return Btf.load()


def _kfuncs(names: tuple[str, ...]) -> dict[str, int]:
    facts = _facts()
    ids = {n: facts.kfunc_id(n) for n in names}
    facts.save()
    return ids


@dataclass(frozen=True, slots=True)
class LinkedProgram:
    """A program's linked code and the slot of each rule's first instruction."""

    program: CompiledProgram
    linked: Linked
    rule_slots: tuple[tuple[int, int], ...]  # sorted (slot, counter index)
    btf: bytes  # declares the program's functions
    func_info: bytes  # packed struct bpf_func_info records, by instruction

    def rules_at(self, slot: int) -> int | None:
        """Counter index of the rule whose code holds instruction ``slot``."""
        i = bisect.bisect_right(self.rule_slots, (slot, 1 << 62)) - 1
        return self.rule_slots[i][1] if i >= 0 else None


def link_program(program: CompiledProgram, maps: dict[str, int]) -> LinkedProgram:
    """Resolve kernel offsets, kfunc ids and map fds of one compiled program."""
    linked = link(program.code(kernel_layout()), maps=maps, kfuncs=_kfuncs(program.kfuncs))
    slots = sorted((linked.labels[label], index) for label, index in program.rule_labels)
    btf, ids = func_btf([(name, kind) for _, name, kind in program.funcs],
                        meta_size(program.needs))
    infos = sorted((linked.labels[label], type_id)
                   for (label, _, _), type_id in zip(program.funcs, ids, strict=True))
    func_info = b"".join(struct.pack("<II", slot, type_id) for slot, type_id in infos)
    return LinkedProgram(program, linked, tuple(slots), btf, func_info)


def _verifier_lines(lp: LinkedProgram, compiled: CompiledRuleset, log: str) -> list[int]:
    """Lines of the rules whose code the verifier was looking at when it gave up."""
    slots = [int(m.group(1)) for line in log.splitlines() if (m := _INSN_LINE.match(line))]
    for slot in reversed(slots):
        index = lp.rules_at(slot)
        if index is not None:
            return [compiled.rule_index[index].line]
    return []


def _load_one(lp: LinkedProgram, compiled: CompiledRuleset) -> bpf.Prog:
    spec = ProgramSpec(lp.program.name, lp.program.prog_type, lp.linked.code,
                       expected_attach_type=lp.program.attach_type)
    btf = bpf.btf_load(lp.btf)
    try:
        return bpf.prog_load(spec, func_info=(btf, lp.func_info))
    except bpf.VerifierError as e:
        raise LoadError(lp.program.name, _verifier_lines(lp, compiled, e.log), e.log,
                        str(e)) from e
    finally:
        btf.close()  # the program keeps its own reference


@dataclass(slots=True)
class Programs:
    """Maps and loaded (not attached) programs of a compiled ruleset; owns their fds."""

    compiled: CompiledRuleset
    maps: dict[str, bpf.Map] = field(default_factory=dict)
    progs: dict[CompiledProgram, bpf.Prog] = field(default_factory=dict)
    linked: dict[CompiledProgram, LinkedProgram] = field(default_factory=dict)
    # bpfilter sets the rules name (bpfilter.sets): opened from their pins, never pinned
    # with a generation (they outlive it).
    sets: dict[str, bpf.Map] = field(default_factory=dict)
    # Ids of the ``shared`` maps the programs were linked with (load_programs), by name.
    shared_ids: dict[str, int] = field(default_factory=dict)

    def close(self) -> None:
        for p in self.progs.values():
            p.close()
        for m in (*self.maps.values(), *self.sets.values()):
            m.close()
        self.progs.clear()
        self.maps.clear()
        self.sets.clear()


def capacity(entries: int) -> int:
    """max_entries for a map that incremental changes may grow (counters, run maps): room
    for as many again, so that a change outgrowing it (and rebuilt instead) is rare."""
    return max(64, 2 * entries)


def growable(compiled: CompiledRuleset) -> frozenset[str]:
    """The maps created with ``capacity`` headroom: the counters and both copies of every
    run's map (the entries incremental changes edit in place)."""
    names = {COUNTERS}
    for _, _, run, name in compiled.lookups:
        if isinstance(run, Run):
            names.update(lookup.buffer_names(name))
    return frozenset(names)


def load_programs(compiled: CompiledRuleset,
                  shared: Mapping[str, bpf.Map] | None = None, *,
                  netns: str | None = None) -> Programs:
    """Create the maps and load every program (nothing is attached). ``shared`` maps are
    linked instead of created (the table's switch, ``lookup.CTL_MAP``); they stay the
    caller's and are not in ``Programs.maps``. Sets (maps with a ``pin``) are opened from
    ``netns``'s pins; a missing one raises CompileError with the line of its first rule."""
    if any(p.needs.owner for p in compiled.programs):
        check_owner_namespace(netns)
    out = Programs(compiled)
    shared = shared or {}
    grow = growable(compiled)
    try:
        for spec in compiled.maps:
            if spec.pin is not None:
                out.sets[spec.name] = sets.open_for_rule(spec, netns)
                continue
            if spec.name in shared:
                bpf.check_compatible(shared[spec.name], spec)
                out.shared_ids[spec.name] = shared[spec.name].info().id
                continue
            if spec.name in grow:
                spec = replace(spec, max_entries=capacity(spec.max_entries))
            out.maps[spec.name] = bpf.map_create(spec)
            contents = compiled.contents.get(spec.name)
            if contents:  # lookup tables of optimized rule runs, filled before any program
                out.maps[spec.name].update_batch(contents)
        fds = {name: m.fd for name, m in (*out.maps.items(), *out.sets.items())}
        fds.update((name, m.fd) for name, m in shared.items())
        for program in compiled.programs:
            lp = link_program(program, fds)
            out.linked[program] = lp
            out.progs[program] = _load_one(lp, compiled)
    except BaseException:
        out.close()
        raise
    return out


CounterKey = tuple[str, str, int]


def read_counters(compiled: CompiledRuleset,
                  counters: bpf.Map) -> dict[CounterKey, tuple[int, int]]:
    """(table, chain, position) -> (packets, bytes), summed over CPUs; position 0 is a
    built-in chain's policy, rules count from 1."""
    out: dict[CounterKey, tuple[int, int]] = {}
    for index, ref in compiled.rule_index.items():
        values = counters.lookup_percpu(struct.pack("<I", index)) or []
        packets = total = 0
        for v in values:
            p, b = _COUNTER.unpack_from(v)
            packets += p
            total += b
        out[(ref.table, ref.chain, ref.position)] = (packets, total)
    return out


@dataclass(slots=True)
class Loaded:
    """A ruleset attached in a network namespace; ``unload()`` (or leaving ``with``) undoes
    everything: links, pins, maps, programs and the conntrack helper table."""

    compiled: CompiledRuleset
    netns: str | None
    programs: Programs
    links: list[bpf.Link] = field(default_factory=list)
    pins: list[Path] = field(default_factory=list)
    conntrack_table: str | None = None
    _closed: bool = False

    def counters(self) -> dict[CounterKey, tuple[int, int]]:
        """(table, chain, position) -> (packets, bytes); position 0 is the policy."""
        return read_counters(self.compiled, self.programs.maps["counters"])

    def unload(self) -> None:
        """Detach and forget everything; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for p in self.pins:
            bpffs.unpin(p)
        if self.pins:
            _remove_empty_dirs(self.pins[0].parent)
        for link_ in self.links:
            link_.close()
        self.links.clear()
        self.programs.close()
        if self.conntrack_table is not None:
            _nft(self.netns, f"delete table inet {self.conntrack_table}\n", check=False)
            self.conntrack_table = None

    def __enter__(self) -> Loaded:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.unload()


def _remove_empty_dirs(d: Path) -> None:
    for level in (d, d.parent):
        try:
            level.rmdir()
        except OSError:
            return


def load(compiled: CompiledRuleset, netns: str | None = None, *, pin: bool = True) -> Loaded:
    """Create maps, load and attach every program at its hook and priority in ``netns``
    (None: the caller's namespace), pin links and maps under
    ``<bpffs>/bpfilter/<netns or host>/`` and make sure conntrack runs there if a rule
    looks at conntrack state."""
    programs = load_programs(compiled, netns=netns)
    handle = Loaded(compiled, netns, programs)
    try:
        if compiled.needs_conntrack:
            handle.conntrack_table = enable_conntrack(netns)
        for program, prog in programs.progs.items():
            options = NetfilterOptions(program.pf, program.hook, program.priority)
            nflink = attach_netfilter(prog, options, netns=netns)
            handle.links.append(nflink)
            if pin:
                handle.pins.append(bpffs.pin(nflink, f"link_{program.name}", netns,
                                             replace=True))
        if pin:
            for name, m in programs.maps.items():
                handle.pins.append(bpffs.pin(m, f"map_{name}{compiled.family}", netns,
                                             replace=True))
    except BaseException:
        handle.unload()
        raise
    return handle


# Conntrack runs in a namespace only while some netfilter user holds a reference
# (nf_ct_netns_get); a BPF netfilter link takes none. An nftables `ct` expression takes one
# when the rule is created, even in a regular chain that no hook ever runs: so a table
# with one unhooked chain holding `ct state new` turns conntrack on for both families at
# no per-packet cost, and deleting the table turns it off again.
def enable_conntrack(netns: str | None) -> str:
    """Make conntrack track packets in ``netns``; returns the helper table's name."""
    name = f"bpfilter_ct_{secrets.token_hex(4)}"
    _nft(netns, f"table inet {name} {{\n  chain keep {{\n    ct state new\n  }}\n}}\n")
    return name


def _nft(netns: str | None, script: str, *, check: bool = True) -> None:
    argv = ["nft", "-f", "-"]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    proc = subprocess.run(argv, input=script, capture_output=True, text=True,
                          timeout=NFT_TIMEOUT)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")


# --- BPF_PROG_TEST_RUN ----------------------------------------------------------------------

def ethernet_frame(packet: bytes, family: int) -> bytes:
    """``packet`` (starting at the IP header) behind an Ethernet header, as test runs need."""
    ethertype = ETH_P_IP if family == 4 else ETH_P_IPV6
    return b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + \
        struct.pack("!H", ethertype) + packet


def test_run_data(packet: bytes, hook: NfHook, family: int) -> bytes:
    """What a netfilter test run takes as data: the kernel strips an Ethernet header with
    eth_type_trans() except at LOCAL_OUT, where it takes the IP packet as it is."""
    return packet if hook == NfHook.LOCAL_OUT else ethernet_frame(packet, family)


test_run_data.__test__ = False  # type: ignore[attr-defined]


@functools.cache
def _hook_state_shape() -> tuple[int, int, int]:
    facts = _facts()
    shape = (facts.struct_size("nf_hook_state"), facts.member_offset("nf_hook_state", "hook"),
             facts.member_offset("nf_hook_state", "pf"))
    facts.save()
    return shape


def hook_context(hook: NfHook, family: int) -> bytes:
    """The 48-byte ``struct nf_hook_state`` a netfilter test run takes (hook and pf set)."""
    size, hook_off, pf_off = _hook_state_shape()
    pf = NfProto.IPV4 if family == 4 else NfProto.IPV6
    return hook_state_context(hook, pf, size, hook_off, pf_off)


class TestRunner:
    """Load a compiled ruleset once (no attach) and run packets through its programs."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, compiled: CompiledRuleset) -> None:
        self.compiled = compiled
        self.programs = load_programs(compiled)

    def run(self, hook: NfHook, packet: bytes, *, table: str = "filter") -> int:
        """The verdict (0 DROP, 1 ACCEPT) for ``packet`` (an IP packet, no link layer) at
        ``hook``. The kernel presents the loopback device as the input (PRE_ROUTING,
        LOCAL_IN, FORWARD) and output (FORWARD, LOCAL_OUT) device and no conntrack state."""
        program = self.compiled.program(hook, table)
        if program is None:
            return 1  # no rules and an ACCEPT policy: no program is attached at all
        ctx = hook_context(hook, self.compiled.family)
        result = bpf.prog_test_run(self.programs.progs[program],
                                   test_run_data(packet, hook, self.compiled.family),
                                   ctx_in=ctx)
        return result.retval

    def counters(self) -> dict[CounterKey, tuple[int, int]]:
        return read_counters(self.compiled, self.programs.maps["counters"])

    def close(self) -> None:
        self.programs.close()

    def __enter__(self) -> TestRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def test_run(compiled: CompiledRuleset, hook: NfHook, packet: bytes, *, family: int = 4,
             ifname_in: str | None = None, table: str = "filter") -> int:
    """BPF_PROG_TEST_RUN of the program at ``hook`` on ``packet`` (an IP packet, no link
    layer); returns the verdict, 0 DROP or 1 ACCEPT. The kernel always presents the loopback
    device in a test run, so ``ifname_in`` may only be None or "lo"."""
    if family != compiled.family:
        raise ValueError(f"the ruleset was compiled for IPv{compiled.family}, not IPv{family}")
    if ifname_in not in (None, "lo"):
        raise ValueError("test runs always see the loopback device; test -i/-o with "
                         "real traffic (loader.load in a namespace)")
    with TestRunner(compiled) as runner:
        return runner.run(hook, packet, table=table)


test_run.__test__ = False  # type: ignore[attr-defined]
