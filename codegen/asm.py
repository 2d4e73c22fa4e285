"""Instruction builders: one function per eBPF instruction form, jumps and calls by label."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from bpfilter.codegen.insn import LD_IMM64, Insn, Reg
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


@dataclass(frozen=True, slots=True)
class Label:
    """A jump target placed in the instruction list; it takes no space."""

    name: str


Operand: TypeAlias = Reg | int  # a register, or a 32-bit immediate
Target: TypeAlias = str | int  # a label, or an already resolved relative offset

_ALU_OPS = {op.name.lower(): op for op in AluOp}
_ALU_OPS.update({"sdiv": AluOp.DIV, "smod": AluOp.MOD})
_SIGNED = frozenset({"sdiv", "smod"})
_JMP_OPS = {
    op.name.lower(): op
    for op in JmpOp
    if op not in (JmpOp.JA, JmpOp.CALL, JmpOp.EXIT, JmpOp.JCOND)
}
_ATOMIC_OPS = {"add": AtomicOp.ADD, "or": AtomicOp.OR, "and": AtomicOp.AND, "xor": AtomicOp.XOR}


def imm32(value: int) -> int:
    """Validate a 32-bit immediate; values in [2**31, 2**32) are taken as their signed twin."""
    if not -(1 << 31) <= value < (1 << 32):
        raise ValueError(f"immediate {value} does not fit in 32 bits")
    return value - (1 << 32) if value >= (1 << 31) else value


def off16(value: int) -> int:
    """Validate a signed 16-bit offset."""
    if not -(1 << 15) <= value < (1 << 15):
        raise ValueError(f"offset {value} does not fit in 16 bits")
    return value


def _reg(r: int) -> int:
    if not 0 <= r <= 10:
        raise ValueError(f"no register r{r}")
    return r


def _alu(cls: Class, op: str, dst: Reg, src: Operand, comment: str | None) -> Insn:
    try:
        code = _ALU_OPS[op]
    except KeyError:
        raise ValueError(f"unknown ALU operation {op!r}") from None
    if code in (AluOp.NEG, AluOp.END):
        raise ValueError(f"{op} has its own builder (neg64/neg32, to_le/to_be/bswap)")
    signed = 1 if op in _SIGNED else 0
    if isinstance(src, Reg):
        return Insn(cls | code | Source.X, _reg(dst), src, signed, 0, None, comment)
    return Insn(cls | code | Source.K, _reg(dst), 0, signed, imm32(src), None, comment)


def alu64(op: str, dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    """64-bit ``dst op= src``; op is add sub mul div sdiv or and lsh rsh mod smod xor mov arsh."""
    return _alu(Class.ALU64, op, dst, src, comment)


def alu32(op: str, dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    """32-bit ``wdst op= wsrc``; the result is zero-extended into the 64-bit register."""
    return _alu(Class.ALU, op, dst, src, comment)


def add64(dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    return _alu(Class.ALU64, "add", dst, src, comment)


def sub64(dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    return _alu(Class.ALU64, "sub", dst, src, comment)


def mul64(dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    return _alu(Class.ALU64, "mul", dst, src, comment)


def div64(dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    return _alu(Class.ALU64, "div", dst, src, comment)


def sdiv64(dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    return _alu(Class.ALU64, "sdiv", dst, src, comment)


def or64(dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    return _alu(Class.ALU64, "or", dst, src, comment)


def and64(dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    return _alu(Class.ALU64, "and", dst, src, comment)


def lsh64(dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    return _alu(Class.ALU64, "lsh", dst, src, comment)


def rsh64(dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    return _alu(Class.ALU64, "rsh", dst, src, comment)


def mod64(dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    return _alu(Class.ALU64, "mod", dst, src, comment)


def smod64(dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    return _alu(Class.ALU64, "smod", dst, src, comment)


def xor64(dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    return _alu(Class.ALU64, "xor", dst, src, comment)


def mov64(dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    return _alu(Class.ALU64, "mov", dst, src, comment)


def arsh64(dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    return _alu(Class.ALU64, "arsh", dst, src, comment)


def add32(dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    return _alu(Class.ALU, "add", dst, src, comment)


def sub32(dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    return _alu(Class.ALU, "sub", dst, src, comment)


def mul32(dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    return _alu(Class.ALU, "mul", dst, src, comment)


def div32(dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    return _alu(Class.ALU, "div", dst, src, comment)


def sdiv32(dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    return _alu(Class.ALU, "sdiv", dst, src, comment)


def or32(dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    return _alu(Class.ALU, "or", dst, src, comment)


def and32(dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    return _alu(Class.ALU, "and", dst, src, comment)


def lsh32(dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    return _alu(Class.ALU, "lsh", dst, src, comment)


def rsh32(dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    return _alu(Class.ALU, "rsh", dst, src, comment)


def mod32(dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    return _alu(Class.ALU, "mod", dst, src, comment)


def smod32(dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    return _alu(Class.ALU, "smod", dst, src, comment)


def xor32(dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    return _alu(Class.ALU, "xor", dst, src, comment)


def mov32(dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    return _alu(Class.ALU, "mov", dst, src, comment)


def arsh32(dst: Reg, src: Operand, *, comment: str | None = None) -> Insn:
    return _alu(Class.ALU, "arsh", dst, src, comment)


def neg64(dst: Reg) -> Insn:
    """``dst = -dst``."""
    return Insn(Class.ALU64 | AluOp.NEG | Source.K, _reg(dst))


def neg32(dst: Reg) -> Insn:
    return Insn(Class.ALU | AluOp.NEG | Source.K, _reg(dst))


def movsx64(dst: Reg, src: Reg, bits: int) -> Insn:
    """``dst = (s8/s16/s32) src``: sign-extend the low ``bits`` of src into 64 bits."""
    if bits not in (8, 16, 32):
        raise ValueError(f"movsx64 extends 8, 16 or 32 bits, not {bits}")
    return Insn(Class.ALU64 | AluOp.MOV | Source.X, _reg(dst), _reg(src), bits)


def movsx32(dst: Reg, src: Reg, bits: int) -> Insn:
    """``wdst = (s8/s16) wsrc``."""
    if bits not in (8, 16):
        raise ValueError(f"movsx32 extends 8 or 16 bits, not {bits}")
    return Insn(Class.ALU | AluOp.MOV | Source.X, _reg(dst), _reg(src), bits)


def _end(cls: Class, order: Source, dst: Reg, bits: int) -> Insn:
    if bits not in (16, 32, 64):
        raise ValueError(f"byte swaps are 16, 32 or 64 bits, not {bits}")
    return Insn(cls | AluOp.END | order, _reg(dst), 0, 0, bits)


def to_le(dst: Reg, bits: int) -> Insn:
    """Convert dst between host and little-endian order (truncates to ``bits``)."""
    return _end(Class.ALU, Source.TO_LE, dst, bits)


def to_be(dst: Reg, bits: int) -> Insn:
    """Convert dst between host and big-endian (network) order (truncates to ``bits``)."""
    return _end(Class.ALU, Source.TO_BE, dst, bits)


def bswap(dst: Reg, bits: int) -> Insn:
    """Unconditionally reverse the low ``bits`` of dst (ALU64 END, cpu v4)."""
    return _end(Class.ALU64, Source.TO_LE, dst, bits)


# Memory -------------------------------------------------------------------------------------


def ldx(size: Size, dst: Reg, src: Reg, off: int, *, comment: str | None = None) -> Insn:
    """``dst = *(size *)(src + off)``, zero-extended."""
    return Insn(Class.LDX | size | Mode.MEM, _reg(dst), _reg(src), off16(off), 0, None, comment)


def ldsx(size: Size, dst: Reg, src: Reg, off: int) -> Insn:
    """``dst = *(s8/s16/s32 *)(src + off)``, sign-extended (cpu v4)."""
    if size == Size.DW:
        raise ValueError("sign-extending loads are 1, 2 or 4 bytes")
    return Insn(Class.LDX | size | Mode.MEMSX, _reg(dst), _reg(src), off16(off))


def stx(size: Size, dst: Reg, off: int, src: Reg, *, comment: str | None = None) -> Insn:
    """``*(size *)(dst + off) = src``."""
    return Insn(Class.STX | size | Mode.MEM, _reg(dst), _reg(src), off16(off), 0, None, comment)


def st(size: Size, dst: Reg, off: int, imm: int, *, comment: str | None = None) -> Insn:
    """``*(size *)(dst + off) = imm``."""
    return Insn(Class.ST | size | Mode.MEM, _reg(dst), 0, off16(off), imm32(imm), None, comment)


def atomic(op: str, size: Size, dst: Reg, off: int, src: Reg, *, fetch: bool = False) -> Insn:
    """``lock *(size *)(dst + off) op= src``; op is add, or, and, xor (W or DW only).

    With ``fetch`` the old value is returned in src.
    """
    try:
        code = _ATOMIC_OPS[op] | (1 if fetch else 0)
    except KeyError:
        raise ValueError(f"unknown atomic operation {op!r}") from None
    return _atomic(size, dst, off, src, code)


def _atomic(size: Size, dst: Reg, off: int, src: Reg, imm: int) -> Insn:
    if size not in (Size.W, Size.DW) and imm not in (AtomicOp.LOAD_ACQ, AtomicOp.STORE_REL):
        raise ValueError("atomic read-modify-write operations are 4 or 8 bytes")
    return Insn(Class.STX | size | Mode.ATOMIC, _reg(dst), _reg(src), off16(off), imm)


def atomic_add(size: Size, dst: Reg, off: int, src: Reg, *, fetch: bool = False) -> Insn:
    return atomic("add", size, dst, off, src, fetch=fetch)


def atomic_or(size: Size, dst: Reg, off: int, src: Reg, *, fetch: bool = False) -> Insn:
    return atomic("or", size, dst, off, src, fetch=fetch)


def atomic_and(size: Size, dst: Reg, off: int, src: Reg, *, fetch: bool = False) -> Insn:
    return atomic("and", size, dst, off, src, fetch=fetch)


def atomic_xor(size: Size, dst: Reg, off: int, src: Reg, *, fetch: bool = False) -> Insn:
    return atomic("xor", size, dst, off, src, fetch=fetch)


def atomic_xchg(size: Size, dst: Reg, off: int, src: Reg) -> Insn:
    """``src = xchg(*(size *)(dst + off), src)``."""
    return _atomic(size, dst, off, src, AtomicOp.XCHG)


def atomic_cmpxchg(size: Size, dst: Reg, off: int, src: Reg) -> Insn:
    """``r0 = cmpxchg(*(size *)(dst + off), r0, src)``: store src if the old value equals r0."""
    return _atomic(size, dst, off, src, AtomicOp.CMPXCHG)


def load_acquire(size: Size, dst: Reg, src: Reg, off: int) -> Insn:
    """``dst = load_acquire((size *)(src + off))`` (kernel 6.15+)."""
    return _atomic(size, dst, off, src, AtomicOp.LOAD_ACQ)


def store_release(size: Size, dst: Reg, off: int, src: Reg) -> Insn:
    """``store_release((size *)(dst + off), src)`` (kernel 6.15+)."""
    return _atomic(size, dst, off, src, AtomicOp.STORE_REL)


def ld_abs(size: Size, imm: int) -> Insn:
    """Legacy ``r0 = ntoh(*(size *)(skb->data + imm))``; socket filters and TC only."""
    if size == Size.DW:
        raise ValueError("legacy packet loads are 1, 2 or 4 bytes")
    return Insn(Class.LD | size | Mode.ABS, 0, 0, 0, imm32(imm))


def ld_ind(size: Size, src: Reg, imm: int) -> Insn:
    """Legacy ``r0 = ntoh(*(size *)(skb->data + src + imm))``."""
    if size == Size.DW:
        raise ValueError("legacy packet loads are 1, 2 or 4 bytes")
    return Insn(Class.LD | size | Mode.IND, 0, _reg(src), 0, imm32(imm))


# 64-bit immediates ---------------------------------------------------------------------------


def _imm64(dst: Reg, src: int, imm: int, ref: str | None, comment: str | None) -> Insn:
    return Insn(LD_IMM64, _reg(dst), src, 0, imm, ref, comment)


def ld_imm64(dst: Reg, imm: int, *, comment: str | None = None) -> Insn:
    """``dst = imm`` for any 64-bit constant (two slots)."""
    if not -(1 << 63) <= imm < (1 << 64):
        raise ValueError(f"immediate {imm} does not fit in 64 bits")
    return _imm64(dst, PseudoSrc.NONE, imm & 0xFFFFFFFFFFFFFFFF, None, comment)


def ld_map_fd(dst: Reg, map_name: str, *, comment: str | None = None) -> Insn:
    """``dst = &map``; the link pass fills in the map's fd (or records a relocation)."""
    return _imm64(dst, PseudoSrc.MAP_FD, 0, map_name, comment)


def ld_map_value(dst: Reg, map_name: str, offset: int = 0, *, comment: str | None = None) -> Insn:
    """``dst = &map.value[0] + offset`` for array maps (e.g. global data)."""
    if not 0 <= offset < (1 << 32):
        raise ValueError(f"map value offset {offset} out of range")
    return _imm64(dst, PseudoSrc.MAP_VALUE, offset << 32, map_name, comment)


def ld_map_idx(dst: Reg, index: int) -> Insn:
    """``dst = &fd_array[index]`` (BPF_PSEUDO_MAP_IDX)."""
    return _imm64(dst, PseudoSrc.MAP_IDX, index & 0xFFFFFFFF, None, None)


def ld_map_idx_value(dst: Reg, index: int, offset: int = 0) -> Insn:
    """``dst = &fd_array[index].value[0] + offset`` (BPF_PSEUDO_MAP_IDX_VALUE)."""
    return _imm64(dst, PseudoSrc.MAP_IDX_VALUE, (offset << 32) | (index & 0xFFFFFFFF), None, None)


def ld_btf_id(dst: Reg, btf_id: int) -> Insn:
    """``dst = &kernel_variable`` by its vmlinux BTF id (BPF_PSEUDO_BTF_ID)."""
    return _imm64(dst, PseudoSrc.BTF_ID, btf_id & 0xFFFFFFFF, None, None)


def ld_func(dst: Reg, label: str) -> Insn:
    """``dst = &subprog`` for callback arguments (BPF_PSEUDO_FUNC)."""
    return _imm64(dst, PseudoSrc.FUNC, 0, label, None)


# Jumps and calls ----------------------------------------------------------------------------


def _jump(cls: Class, op: str, dst: Reg, src: Operand, target: Target, comment: str | None) -> Insn:
    try:
        code = _JMP_OPS[op]
    except KeyError:
        raise ValueError(f"unknown conditional jump {op!r}") from None
    ref, off = (target, 0) if isinstance(target, str) else (None, off16(target))
    if isinstance(src, Reg):
        return Insn(cls | code | Source.X, _reg(dst), src, off, 0, ref, comment)
    return Insn(cls | code | Source.K, _reg(dst), 0, off, imm32(src), ref, comment)


def jmp(op: str, dst: Reg, src: Operand, target: Target, *, comment: str | None = None) -> Insn:
    """``if dst op src goto target`` (64-bit compare); op is jeq jgt jge jset jne jsgt jsge
    jlt jle jslt jsle. ``target`` is a label (or an already resolved offset)."""
    return _jump(Class.JMP, op, dst, src, target, comment)


def jmp32(op: str, dst: Reg, src: Operand, target: Target, *, comment: str | None = None) -> Insn:
    """``if wdst op wsrc goto target`` (32-bit compare)."""
    return _jump(Class.JMP32, op, dst, src, target, comment)


def jeq(dst: Reg, src: Operand, target: Target, *, comment: str | None = None) -> Insn:
    return _jump(Class.JMP, "jeq", dst, src, target, comment)


def jne(dst: Reg, src: Operand, target: Target, *, comment: str | None = None) -> Insn:
    return _jump(Class.JMP, "jne", dst, src, target, comment)


def jgt(dst: Reg, src: Operand, target: Target, *, comment: str | None = None) -> Insn:
    return _jump(Class.JMP, "jgt", dst, src, target, comment)


def jge(dst: Reg, src: Operand, target: Target, *, comment: str | None = None) -> Insn:
    return _jump(Class.JMP, "jge", dst, src, target, comment)


def jlt(dst: Reg, src: Operand, target: Target, *, comment: str | None = None) -> Insn:
    return _jump(Class.JMP, "jlt", dst, src, target, comment)


def jle(dst: Reg, src: Operand, target: Target, *, comment: str | None = None) -> Insn:
    return _jump(Class.JMP, "jle", dst, src, target, comment)


def jset(dst: Reg, src: Operand, target: Target, *, comment: str | None = None) -> Insn:
    return _jump(Class.JMP, "jset", dst, src, target, comment)


def jsgt(dst: Reg, src: Operand, target: Target, *, comment: str | None = None) -> Insn:
    return _jump(Class.JMP, "jsgt", dst, src, target, comment)


def jsge(dst: Reg, src: Operand, target: Target, *, comment: str | None = None) -> Insn:
    return _jump(Class.JMP, "jsge", dst, src, target, comment)


def jslt(dst: Reg, src: Operand, target: Target, *, comment: str | None = None) -> Insn:
    return _jump(Class.JMP, "jslt", dst, src, target, comment)


def jsle(dst: Reg, src: Operand, target: Target, *, comment: str | None = None) -> Insn:
    return _jump(Class.JMP, "jsle", dst, src, target, comment)


def ja(target: Target, *, comment: str | None = None) -> Insn:
    """``goto target`` within +-32767 instructions."""
    if isinstance(target, str):
        return Insn(Class.JMP | JmpOp.JA, 0, 0, 0, 0, target, comment)
    return Insn(Class.JMP | JmpOp.JA, 0, 0, off16(target), 0, None, comment)


def gotol(target: Target, *, comment: str | None = None) -> Insn:
    """``gotol target``: unconditional jump with a 32-bit offset in imm (JMP32 JA, cpu v4)."""
    if isinstance(target, str):
        return Insn(Class.JMP32 | JmpOp.JA, 0, 0, 0, 0, target, comment)
    return Insn(Class.JMP32 | JmpOp.JA, 0, 0, 0, imm32(target), None, comment)


def may_goto(target: Target) -> Insn:
    """``may_goto target``: jump once the verifier-bounded loop budget is used up."""
    if isinstance(target, str):
        return Insn(Class.JMP | JmpOp.JCOND, 0, 0, 0, 0, target)
    return Insn(Class.JMP | JmpOp.JCOND, 0, 0, off16(target), 0)


def call_helper(func: int, *, comment: str | None = None) -> Insn:
    """Call a helper by id (BpfFunc); arguments in r1-r5, result in r0."""
    return Insn(Class.JMP | JmpOp.CALL, 0, PseudoCall.HELPER, 0, imm32(func), None, comment)


def call_kfunc(func: str | int, *, comment: str | None = None) -> Insn:
    """Call a kernel function by name (resolved to its BTF id at link time) or by BTF id."""
    if isinstance(func, str):
        return Insn(Class.JMP | JmpOp.CALL, 0, PseudoCall.KFUNC_CALL, 0, 0, func, comment)
    return Insn(Class.JMP | JmpOp.CALL, 0, PseudoCall.KFUNC_CALL, 0, imm32(func), None, comment)


def call_local(target: Target, *, comment: str | None = None) -> Insn:
    """BPF-to-BPF call of the subprogram starting at ``target``."""
    if isinstance(target, str):
        return Insn(Class.JMP | JmpOp.CALL, 0, PseudoCall.CALL, 0, 0, target, comment)
    return Insn(Class.JMP | JmpOp.CALL, 0, PseudoCall.CALL, 0, imm32(target), None, comment)


def exit_(*, comment: str | None = None) -> Insn:
    """Return r0."""
    return Insn(Class.JMP | JmpOp.EXIT, 0, 0, 0, 0, None, comment)
