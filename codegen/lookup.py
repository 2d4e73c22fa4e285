"""Code and map contents for optimizer runs: map lookups that pick a run's first match.

A run's map maps a key built from the meta area to ``struct { u32 counter index; u32
action; }``: the counter of the first rule of the run that matches, and the index of its
target in the run's actions. A miss falls through to the rule after the run. A bit-vector
classifier uses eight maps (``classifier_maps``) and ends the same way.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from bpfilter.codegen import asm
from bpfilter.codegen import flavor_netfilter as nf
from bpfilter.codegen.asm import Label
from bpfilter.codegen.helpers import BpfFunc
from bpfilter.codegen.insn import FP, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9
from bpfilter.codegen.matchers import TCP_HEADER, UDP_HEADER, Emitter
from bpfilter.codegen.names import BUFFER_BIT, CTL_MAP, VALUE, buffer_names
from bpfilter.codegen.opcodes import Size
from bpfilter.codegen.spec import MapSpec
from bpfilter.codegen.uapi import IFNAMSIZ, MapFlag, MapType
from bpfilter.ir.optimizer import (
    EVERY_PROTO,
    HOTDROP,
    NOMATCH,
    NORMAL,
    PORT_SPACE,
    PROTOERR,
    Classifier,
    KeyField,
    PortField,
    Run,
)

Items = tuple[tuple[bytes, bytes], ...]
IPPROTO_TCP, IPPROTO_UDP = 6, 17

U32 = 0xFFFFFFFF
# The run maps' value layout, their two copies and the switch's copy bit: codegen.names.


def load_buffer_bit() -> list[nf.Item]:
    """Store the switch's buffer bit (0 or BUFFER_BIT) in the meta area (R7); R1 is used."""
    return [asm.ld_map_value(R1, CTL_MAP, 0, comment="&table switch"),
            asm.ldx(Size.W, R1, R1, 0),
            asm.and64(R1, BUFFER_BIT, comment="which copy of the lookup maps"),
            asm.stx(Size.W, R7, nf.LOOKUP_BUFFER, R1)]
KEY_SLOT = -24  # the key on the stack of the function doing the lookup (at most 20 bytes)
INDEX_REG = R6  # after a hit: the counter index of the matching rule
ACTION_REG = R8  # after a hit: its action number

# Offsets of the addresses in the IP header: (IPv4, IPv6).
_ADDR = {KeyField.SRC: (12, 8), KeyField.DST: (16, 24)}


def key_size(run: Run) -> int:
    """Bytes of the run's map key: u32 prefix length + address (a trie), an address masked
    to the run's one prefix length (a hash), or a u32 protocol or port (host order)."""
    if run.field.is_interface:
        return IFNAMSIZ
    if not run.field.is_prefix:
        return 4
    return run.bits // 8 + (0 if run.exact else 4)


def map_spec(name: str, run: Run) -> MapSpec:
    """The run's map, sized to its entries."""
    if not run.exact:
        return MapSpec(name, MapType.LPM_TRIE, key_size(run), VALUE.size, len(run.entries),
                       int(MapFlag.NO_PREALLOC))
    return MapSpec(name, MapType.HASH, key_size(run), VALUE.size, len(run.entries))


def map_contents(run: Run, first_index: int,
                 slots: Sequence[int] | None = None) -> tuple[tuple[bytes, bytes], ...]:
    """(key, value) pairs for the run's map; ``first_index`` is the counter index of the
    first rule of the run (rules of a chain have consecutive counter indices), unless
    ``slots`` gives rule k's counter index as ``slots[k]`` (a numbering kept across
    incremental changes, bpfilter.state)."""
    pack = VALUE.pack
    acts = run.action_of
    index: Sequence[int] = range(first_index, first_index + len(run.rules)) \
        if slots is None else slots
    if run.field.is_interface:
        return tuple((key.to_bytes(IFNAMSIZ, "big"), pack(index[k], acts[k]))
                     for key, _, k in run.entries)
    if not run.field.is_prefix:
        return tuple((struct.pack("<I", key), pack(index[k], acts[k]))
                     for key, _, k in run.entries)
    nbytes = run.bits // 8
    if run.exact:
        return tuple((addr.to_bytes(nbytes, "big"), pack(index[k], acts[k]))
                     for addr, _, k in run.entries)
    return tuple((length.to_bytes(4, "little") + addr.to_bytes(nbytes, "big"),
                  pack(index[k], acts[k]))
                 for addr, length, k in run.entries)


def emit_lookup(em: Emitter, run: Run, map_name: str) -> None:
    """Look the packet's key up; on a miss jump to ``em.fail``, on a hit leave the counter
    index in INDEX_REG and the action number in ACTION_REG (both callee-saved)."""
    if run.field.is_interface:
        # The name up to its NUL, zero-padded: bytes after the NUL may be left over from an
        # older, longer name, and iptables never compares them.
        base = nf.IN_NAME if run.field is KeyField.IIF else nf.OUT_NAME
        done = em.label("name")
        em.emit(asm.st(Size.DW, FP, KEY_SLOT, 0), asm.st(Size.DW, FP, KEY_SLOT + 8, 0))
        for i in range(IFNAMSIZ - 1):
            em.emit(asm.ldx(Size.B, R1, R7, base + i), asm.jmp("jeq", R1, 0, done),
                    asm.stx(Size.B, FP, KEY_SLOT + i, R1))
        em.emit(Label(done))
    elif run.field.is_port:
        # After the rest of the tcp/udp match: a later fragment or a short header has
        # already failed or hot-dropped.
        em.emit(asm.ldx(Size.H, R1, R7, nf.L4 + (0 if run.field is KeyField.SPORT else 2)),
                asm.to_be(R1, 16), asm.stx(Size.W, FP, KEY_SLOT, R1))
    elif run.field is KeyField.PROTO:
        if em.family == 6:
            # As emit_proto: an unparsable IPv6 header chain hot-drops a rule with -p.
            em.emit(asm.ldx(Size.W, R1, R7, nf.PROTO_ERROR), asm.jmp("jne", R1, 0, em.hot()))
        em.emit(asm.ldx(Size.W, R1, R7, nf.PROTO), asm.stx(Size.W, FP, KEY_SLOT, R1))
    else:
        v4, v6 = _ADDR[run.field]
        off = nf.L3 + (v4 if em.family == 4 else v6)
        at = KEY_SLOT
        if not run.exact:
            em.emit(asm.st(Size.W, FP, KEY_SLOT, run.bits, comment="key.prefixlen"))
            at += 4
            masks = [U32] * (run.bits // 32)
        else:  # one prefix length: the address masked to it
            n = run.key_length
            full = ((1 << n) - 1) << (run.bits - n)
            mask = full.to_bytes(run.bits // 8, "big")
            masks = [int.from_bytes(mask[i:i + 4], "little") for i in range(0, len(mask), 4)]
        for i, m in zip(range(0, run.bits // 8, 4), masks, strict=True):
            if m == 0:
                em.emit(asm.st(Size.W, FP, at + i, 0))
                continue
            em.emit(asm.ldx(Size.W, R1, R7, off + i))
            if m != U32:
                em.emit(asm.alu32("and", R1, m))
            em.emit(asm.stx(Size.W, FP, at + i, R1))
    # One lookup per copy, each ending in plain numbers: at the join no register holds a
    # pointer into either map, so the verifier's states from both sides compare equal and
    # the rest of the function is checked once.
    other, join = em.label("copy1"), em.label("copied")
    em.emit(asm.ldx(Size.W, R1, R7, nf.LOOKUP_BUFFER), asm.jmp("jne", R1, 0, other))
    for copy, name in enumerate(buffer_names(map_name)):
        if copy:
            em.emit(Label(other))
        em.emit(
            asm.ld_map_fd(R1, name),
            asm.mov64(R2, FP),
            asm.add64(R2, KEY_SLOT),
            asm.call_helper(BpfFunc.map_lookup_elem),
            asm.jmp("jeq", R0, 0, em.fail),
            asm.ldx(Size.W, INDEX_REG, R0, 0, comment="counter index of the first match"),
            asm.ldx(Size.W, ACTION_REG, R0, 4, comment="its action"),
        )
        if not copy:
            em.emit(asm.ja(join))
    em.emit(Label(join))


# --- bit-vector classifiers (ir/optimizer.Classifier) ------------------------------------------

ACTS = struct.Struct("<III")  # counter index, action, flags:
PORTED, HAS_PROTO = 1, 2  # the rule tests ports; the rule has -p
_CLASS_REG = R9  # the packet class (optimizer NORMAL / NOMATCH / HOTDROP)
_PTRS = (R3, R4, R5, R6, R8)  # bitmaps of src, dst, proto, sport, dport during the scan
_SPILL = (-32, -40, -48, -56, -64)  # where the bitmap pointers wait across the lookups
# (log2 of a step, mask of the bit positions that have that bit set)
_BIT_MASKS = ((5, 0xFFFFFFFF00000000), (4, 0xFFFF0000FFFF0000), (3, 0xFF00FF00FF00FF00),
              (2, 0xF0F0F0F0F0F0F0F0), (1, 0xCCCCCCCCCCCCCCCC), (0, 0xAAAAAAAAAAAAAAAA))
CLASSIFIER_MAPS = ("src", "dst", "proto", "sidx", "sbits", "didx", "dbits", "acts")


def classifier_maps(prefix: str, cls: Classifier,
                    first_index: int) -> list[tuple[MapSpec, tuple[tuple[bytes, bytes], ...]]]:
    """The classifier's maps (named ``prefix + "_" + CLASSIFIER_MAPS[i]``) and contents."""
    size = cls.words * 8
    u32 = struct.Struct("<I").pack

    def bitmap(b: int) -> bytes:
        return b.to_bytes(size, "little")

    width = cls.bits // 8

    def trie(kind: str, entries: tuple[tuple[int, int, int], ...]) -> tuple[MapSpec, Items]:
        spec = MapSpec(f"{prefix}_{kind}", MapType.LPM_TRIE, 4 + width, size, len(entries),
                       int(MapFlag.NO_PREALLOC))
        return spec, tuple((u32(n) + a.to_bytes(width, "big"), bitmap(b))
                           for a, n, b in entries)

    def array(kind: str, values: list[bytes], value_size: int) -> tuple[MapSpec, Items]:
        spec = MapSpec(f"{prefix}_{kind}", MapType.ARRAY, 4, value_size, len(values))
        return spec, tuple((u32(i), v) for i, v in enumerate(values))

    def port_index(field: PortField) -> list[bytes]:
        bounds = [*field.starts[1:], PORT_SPACE]
        out: list[bytes] = []
        for i, end in enumerate(bounds):
            out.extend([u32(i)] * (end - len(out)))
        return out

    acts = [ACTS.pack(first_index + k, a, (PORTED if p else 0) | (HAS_PROTO if h else 0))
            for k, (a, p, h) in enumerate(zip(cls.action_of, cls.ported, cls.has_proto,
                                              strict=True))]
    return [
        trie("src", cls.src),
        trie("dst", cls.dst),
        array("proto", [bitmap(b) for b in cls.proto], size),
        array("sidx", port_index(cls.sport), 4),
        array("sbits", [bitmap(b) for b in cls.sport.bitmaps], size),
        array("didx", port_index(cls.dport), 4),
        array("dbits", [bitmap(b) for b in cls.dport.bitmaps], size),
        array("acts", acts, ACTS.size),
    ]


def _lookup(em: Emitter, map_name: str, spill: int | None) -> None:
    """Look up the key at KEY_SLOT; a miss fails the block; keep the value pointer at
    ``spill`` (or in R0)."""
    em.emit(asm.ld_map_fd(R1, map_name), asm.mov64(R2, FP), asm.add64(R2, KEY_SLOT),
            asm.call_helper(BpfFunc.map_lookup_elem), asm.jmp("jeq", R0, 0, em.fail))
    if spill is not None:
        em.emit(asm.stx(Size.DW, FP, spill, R0))


def _packet_class(em: Emitter) -> None:
    classed, length, udp = em.label("classed"), em.label("len"), em.label("udp")
    em.emit(asm.mov64(_CLASS_REG, NORMAL))
    if em.family == 6:
        # The extension headers could not be walked: a rule with -p hot-drops.
        walked = em.label("walked")
        em.emit(asm.ldx(Size.W, R1, R7, nf.PROTO_ERROR), asm.jmp("jeq", R1, 0, walked),
                asm.mov64(_CLASS_REG, PROTOERR), asm.ja(classed), Label(walked))
    em.emit(
        asm.ldx(Size.W, R2, R7, nf.PROTO),
        asm.ldx(Size.W, R1, R7, nf.FRAG),
        asm.jmp("jeq", R1, 0, length),
        # A later fragment: port tests fail, except tcp_mt's hot drop at offset 1 (IPv4;
        # an IPv6 offset is in bytes, a multiple of 8).
        asm.mov64(_CLASS_REG, NOMATCH),
        asm.jmp("jne", R1, 1, classed),
        asm.jmp("jne", R2, IPPROTO_TCP, classed),
        asm.mov64(_CLASS_REG, HOTDROP),
        asm.ja(classed),
        Label(length),
        # A transport header too short for the tcp/udp match: it hot-drops.
        asm.ldx(Size.W, R1, R7, nf.L4_LEN),
        asm.jmp("jne", R2, IPPROTO_TCP, udp),
        asm.jmp("jge", R1, TCP_HEADER, classed),
        asm.mov64(_CLASS_REG, HOTDROP),
        asm.ja(classed),
        Label(udp),
        asm.jmp("jne", R2, IPPROTO_UDP, classed),
        asm.jmp("jge", R1, UDP_HEADER, classed),
        asm.mov64(_CLASS_REG, HOTDROP),
        Label(classed),
    )


def _port_bitmap(em: Emitter, cls: Classifier, names: dict[str, str], which: int,
                 idx: str, bits: str, spill: int) -> None:
    field = cls.sport if which == 0 else cls.dport
    have = em.label("interval")
    em.emit(asm.mov64(R1, len(field.bitmaps) - 1, comment="every rule: ports not looked at"),
            asm.jmp("jne", _CLASS_REG, NORMAL, have),
            asm.ldx(Size.H, R1, R7, nf.L4 + which), asm.to_be(R1, 16),
            asm.stx(Size.W, FP, KEY_SLOT, R1))
    _lookup(em, names[idx], None)
    em.emit(asm.ldx(Size.W, R1, R0, 0), Label(have), asm.stx(Size.W, FP, KEY_SLOT, R1))
    _lookup(em, names[bits], spill)


def emit_classifier(em: Emitter, cls: Classifier, names: dict[str, str]) -> None:
    """Bit-vector search: five lookups, AND of their bitmaps word by word, first set bit.
    On a hit INDEX_REG and ACTION_REG are set as for emit_lookup; no rule: ``em.fail``.
    ``names`` maps CLASSIFIER_MAPS kinds to map names."""
    _packet_class(em)
    for kind in ("src", "dst"):
        v4, v6 = _ADDR[KeyField.SRC if kind == "src" else KeyField.DST]
        off = nf.L3 + (v4 if em.family == 4 else v6)
        em.emit(asm.st(Size.W, FP, KEY_SLOT, cls.bits, comment=f"{kind} key.prefixlen"))
        for i in range(0, cls.bits // 8, 4):
            em.emit(asm.ldx(Size.W, R1, R7, off + i), asm.stx(Size.W, FP, KEY_SLOT + 4 + i, R1))
        _lookup(em, names[kind], _SPILL[0 if kind == "src" else 1])
    plain, keyed = em.label("proto"), em.label("proto_key")
    em.emit(asm.ldx(Size.W, R1, R7, nf.PROTO),
            asm.jmp("jne", _CLASS_REG, NOMATCH, plain),
            asm.add64(R1, 256, comment="bitmaps without the rules that test ports"),
            Label(plain),
            asm.jmp("jne", _CLASS_REG, PROTOERR, keyed),
            asm.mov64(R1, EVERY_PROTO, comment="every rule: the protocol is unknown"),
            Label(keyed), asm.stx(Size.W, FP, KEY_SLOT, R1))
    _lookup(em, names["proto"], _SPILL[2])
    _port_bitmap(em, cls, names, 0, "sidx", "sbits", _SPILL[3])
    _port_bitmap(em, cls, names, 2, "didx", "dbits", _SPILL[4])
    for reg, spill in zip(_PTRS, _SPILL, strict=True):
        em.emit(asm.ldx(Size.DW, reg, FP, spill))
    found = em.label("found")
    for i in range(cls.words):
        nxt = em.label("word")
        em.emit(asm.ldx(Size.DW, R1, _PTRS[0], 8 * i), asm.jmp("jeq", R1, 0, nxt))
        for reg in _PTRS[1:]:
            em.emit(asm.ldx(Size.DW, R2, reg, 8 * i), asm.and64(R1, R2),
                    asm.jmp("jeq", R1, 0, nxt))
        em.emit(asm.mov64(R0, 64 * i), asm.ja(found), Label(nxt))
    em.emit(asm.ja(em.fail), Label(found))
    # r0 += index of the lowest bit set in r1, without branches: the verifier would
    # otherwise walk every combination of them once per word that jumps here.
    em.emit(asm.mov64(R2, R1), asm.neg64(R2), asm.and64(R1, R2, comment="lowest set bit"))
    for shift, mask in _BIT_MASKS:
        em.emit(asm.ld_imm64(R2, mask), asm.and64(R2, R1),
                asm.mov64(R3, R2), asm.neg64(R3), asm.or64(R2, R3),
                asm.rsh64(R2, 63, comment="1 if the bit is in the mask's half"),
                asm.lsh64(R2, shift), asm.add64(R0, R2))
    em.emit(asm.stx(Size.W, FP, KEY_SLOT, R0))
    _lookup(em, names["acts"], None)
    ok, other = em.label("act"), em.label("protoerr")
    em.emit(asm.ldx(Size.W, INDEX_REG, R0, 0, comment="counter index of the first match"),
            asm.ldx(Size.W, ACTION_REG, R0, 4, comment="its action"),
            asm.ldx(Size.W, R1, R0, 8),
            asm.jmp("jne", _CLASS_REG, HOTDROP, other),
            asm.jmp("jset", R1, PORTED, em.hot()),
            Label(other),
            asm.jmp("jne", _CLASS_REG, PROTOERR, ok),
            asm.jmp("jset", R1, HAS_PROTO, em.hot()),
            Label(ok))
