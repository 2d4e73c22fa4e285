"""A disassembler printing the syntax of the kernel's print_bpf_insn, as bpftool shows it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from bpfilter.codegen.helpers import BpfFunc
from bpfilter.codegen.insn import LD_IMM64, Insn, decode
from bpfilter.codegen.opcodes import (
    AluOp,
    AtomicOp,
    Class,
    JmpOp,
    Mode,
    PseudoCall,
    PseudoSrc,
    Size,
    Source,
)

_ALU = {
    AluOp.ADD: "+=", AluOp.SUB: "-=", AluOp.MUL: "*=", AluOp.DIV: "/=", AluOp.OR: "|=",
    AluOp.AND: "&=", AluOp.LSH: "<<=", AluOp.RSH: ">>=", AluOp.NEG: "neg", AluOp.MOD: "%=",
    AluOp.XOR: "^=", AluOp.MOV: "=", AluOp.ARSH: "s>>=", AluOp.END: "endian",
}  # fmt: skip
_ALU_SIGNED = {AluOp.DIV: "s/=", AluOp.MOD: "s%="}
_MOVSX = {8: "(s8)", 16: "(s16)", 32: "(s32)"}
_ATOMIC_ALU = {AtomicOp.ADD: "add", AtomicOp.AND: "and", AtomicOp.OR: "or", AtomicOp.XOR: "xor"}
_LDST = {Size.W: "u32", Size.H: "u16", Size.B: "u8", Size.DW: "u64"}
_LDSX = {Size.W: "s32", Size.H: "s16", Size.B: "s8"}
_JMP = {
    JmpOp.JA: "jmp", JmpOp.JEQ: "==", JmpOp.JGT: ">", JmpOp.JLT: "<", JmpOp.JGE: ">=",
    JmpOp.JLE: "<=", JmpOp.JSGT: "s>", JmpOp.JSLT: "s<", JmpOp.JSGE: "s>=", JmpOp.JSLE: "s<=",
    JmpOp.JSET: "&", JmpOp.JNE: "!=", JmpOp.CALL: "call", JmpOp.EXIT: "exit",
}  # fmt: skip
_HELPERS = {f.value: f.kernel_name for f in BpfFunc}
_ADDR_SPACE_CAST = 1  # off of an ALU64 MOV X that converts between address spaces (arena)
_NOSPEC = 0xC0  # ST mode the verifier inserts as a speculation barrier; not in the UAPI
_NULL = "(null)"  # what the kernel's printf shows for a missing table entry


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def format_insn(
    insn: Insn,
    *,
    map_names: Mapping[int, str] | None = None,
    kfunc_names: Mapping[int, str] | None = None,
) -> str:
    """One instruction as print_bpf_insn writes it, without the ``(code)`` prefix.

    ``map_names`` (map id or fd -> name) prints map loads as ``map[name]`` instead of
    ``map[id:N]``; ``kfunc_names`` (BTF id -> name) names kfunc calls like bpftool does.
    """
    code, dst, src, off = insn.opcode, insn.dst, insn.src, insn.off
    cls = insn.cls
    if cls in (Class.ALU, Class.ALU64):
        imm = _s32(insn.imm)
        op = insn.op
        r = "w" if cls == Class.ALU else "r"
        if op == AluOp.END:
            if cls == Class.ALU64:
                return f"r{dst} = bswap{imm} r{dst}"
            order = "be" if insn.source == Source.TO_BE else "le"
            return f"r{dst} = {order}{imm} r{dst}"
        if op == AluOp.NEG:
            return f"{r}{dst} = -{r}{dst}"
        if code == Class.ALU64 | AluOp.MOV | Source.X and off == _ADDR_SPACE_CAST:
            return f"r{dst} = addr_space_cast(r{src}, {(imm & 0xFFFFFFFF) >> 16}, {imm & 0xFFFF})"
        sym = _ALU_SIGNED[op] if off == 1 and op in _ALU_SIGNED else _ALU.get(op, _NULL)
        if insn.source == Source.X:
            sx = _MOVSX[off] if op == AluOp.MOV and off in _MOVSX else ""
            return f"{r}{dst} {sym} {sx}{r}{src}"
        return f"{r}{dst} {sym} {imm}"
    size, mode = insn.size, insn.mode
    if cls == Class.STX:
        imm = insn.imm
        w = _LDST[size]
        if mode == Mode.MEM:
            return f"*({w} *)(r{dst} {off:+d}) = r{src}"
        if mode == Mode.ATOMIC:
            bits = "64" if size == Size.DW else ""
            if imm in _ATOMIC_ALU:
                return f"lock *({w} *)(r{dst} {off:+d}) {_ALU[AluOp(imm)]} r{src}"
            if imm & ~1 in _ATOMIC_ALU and imm & 1:
                name = _ATOMIC_ALU[AtomicOp(imm & ~1)]
                return f"r{src} = atomic{bits}_fetch_{name}(({w} *)(r{dst} {off:+d}), r{src})"
            if imm == AtomicOp.CMPXCHG:
                return f"r0 = atomic{bits}_cmpxchg(({w} *)(r{dst} {off:+d}), r0, r{src})"
            if imm == AtomicOp.XCHG:
                return f"r{src} = atomic{bits}_xchg(({w} *)(r{dst} {off:+d}), r{src})"
            if imm == AtomicOp.LOAD_ACQ:
                return f"r{dst} = load_acquire(({w} *)(r{src} {off:+d}))"
            if imm == AtomicOp.STORE_REL:
                return f"store_release(({w} *)(r{dst} {off:+d}), r{src})"
        return f"BUG_{code:02x}"
    if cls == Class.ST:
        if mode == Mode.MEM:
            return f"*({_LDST[size]} *)(r{dst} {off:+d}) = {_s32(insn.imm)}"
        if mode == _NOSPEC:
            return "nospec"
        return f"BUG_st_{code:02x}"
    if cls == Class.LDX:
        if mode == Mode.MEM:
            return f"r{dst} = *({_LDST[size]} *)(r{src} {off:+d})"
        if mode == Mode.MEMSX:
            return f"r{dst} = *({_LDSX.get(size, _NULL)} *)(r{src} {off:+d})"
        return f"BUG_ldx_{code:02x}"
    if cls == Class.LD:
        if mode == Mode.ABS:
            return f"r0 = *({_LDST[size]} *)skb[{_s32(insn.imm)}]"
        if mode == Mode.IND:
            return f"r0 = *({_LDST[size]} *)skb[r{src} + {_s32(insn.imm)}]"
        if code == LD_IMM64:
            return f"r{dst} = {_imm64(insn, map_names)}"
        return f"BUG_ld_{code:02x}"
    # JMP and JMP32
    op = insn.op
    imm = _s32(insn.imm)
    if op == JmpOp.CALL:
        if src == PseudoCall.CALL:
            return f"call pc{imm:+d}"
        if src == PseudoCall.HELPER:
            name = _HELPERS.get(imm, "unknown")
        elif src == PseudoCall.KFUNC_CALL:
            name = (kfunc_names or {}).get(imm, "kernel-function")
        else:
            name = "unknown"
        return f"call {name}#{imm}"
    if code == Class.JMP | JmpOp.JA:
        return f"goto pc{off:+d}"
    if code == Class.JMP | JmpOp.JCOND and src == 0:
        return f"may_goto pc{off:+d}"
    if code == Class.JMP32 | JmpOp.JA:
        return f"gotol pc{imm:+d}"
    if code == Class.JMP | JmpOp.EXIT:
        return "exit"
    r = "w" if cls == Class.JMP32 else "r"
    sym = _JMP.get(op, _NULL)
    if insn.source == Source.X:
        return f"if {r}{dst} {sym} {r}{src} goto pc{off:+d}"
    return f"if {r}{dst} {sym} {imm & 0xFFFFFFFF:#x} goto pc{off:+d}"


def _imm64(insn: Insn, map_names: Mapping[int, str] | None) -> str:
    full = insn.imm & 0xFFFFFFFFFFFFFFFF
    lo, hi = full & 0xFFFFFFFF, full >> 32
    src = insn.src
    if src in (PseudoSrc.MAP_FD, PseudoSrc.MAP_VALUE):
        name = map_names.get(lo) if map_names else None
        ref = f"map[{name}]" if name is not None else f"map[id:{lo}]"
        return ref if src == PseudoSrc.MAP_FD else f"{ref}[0]+{hi}"
    if src == PseudoSrc.MAP_IDX_VALUE:
        return f"map[idx:{lo}]+{hi}"
    if src == PseudoSrc.FUNC:
        return f"subprog[{_s32(lo):+d}]"
    return f"{full:#x}" if full else "0x0"


def format_lines(
    insns: Iterable[Insn],
    *,
    map_names: Mapping[int, str] | None = None,
    kfunc_names: Mapping[int, str] | None = None,
    annotations: Mapping[int, str] | None = None,
) -> list[str]:
    """Lines as ``bpftool prog dump xlated`` prints them: ``   0: (b7) r0 = 1``.

    ``annotations`` (slot -> text, e.g. ``Linked.annotations``) adds a ``; text`` line before
    the instruction, the way bpftool shows source lines.
    """
    lines = []
    slot = 0
    for insn in insns:
        if annotations and slot in annotations:
            lines.append(f"; {annotations[slot]}")
        text = format_insn(insn, map_names=map_names, kfunc_names=kfunc_names)
        lines.append(f"{slot: 4d}: ({insn.opcode:02x}) {text}")
        slot += insn.slots
    return lines


def disassemble(
    code: bytes,
    *,
    map_names: Mapping[int, str] | None = None,
    kfunc_names: Mapping[int, str] | None = None,
    annotations: Mapping[int, str] | None = None,
) -> list[str]:
    """Disassemble encoded instructions into bpftool-style lines (one per instruction)."""
    return format_lines(decode(code), map_names=map_names, kfunc_names=kfunc_names,
                        annotations=annotations)
