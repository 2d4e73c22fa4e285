"""One eBPF instruction as a value, registers by name, and the byte encoding of both."""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from bpfilter.codegen.opcodes import (
    CLASS_MASK,
    INSN_SIZE,
    MODE_MASK,
    OP_MASK,
    SIZE_MASK,
    SRC_MASK,
    Class,
    JmpOp,
    Mode,
    PseudoCall,
    PseudoSrc,
    Size,
)


class Reg(enum.IntEnum):
    """The eleven registers: R0 result, R1-R5 arguments, R6-R9 callee-saved, R10 frame."""

    R0 = 0
    R1 = 1
    R2 = 2
    R3 = 3
    R4 = 4
    R5 = 5
    R6 = 6
    R7 = 7
    R8 = 8
    R9 = 9
    R10 = 10


R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = Reg
FP = R10  # read-only frame pointer; the stack grows down from it (512 bytes)

LD_IMM64 = Class.LD | Size.DW | Mode.IMM  # the one opcode that occupies two slots
CALL = Class.JMP | JmpOp.CALL
EXIT = Class.JMP | JmpOp.EXIT

_SLOT = struct.Struct("<BBhi")
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True, slots=True)
class Insn:
    """A single instruction: the raw fields plus what the link pass must still fill in.

    ``dst`` and ``src`` are register numbers (``src`` also carries the pseudo values of calls and
    64-bit immediate loads). ``off`` is signed 16-bit. ``imm`` is signed 32-bit, except for
    LD_IMM64 where it holds the whole unsigned 64-bit constant (low half in the first slot, high
    half in the second; for MAP_VALUE loads the high half is the value offset).

    ``ref`` names what the link pass resolves: a label for jumps, local calls and FUNC loads, a
    map name for MAP_FD/MAP_VALUE loads, a kfunc name for kfunc calls. ``comment`` is a free
    annotation (e.g. the source rule) carried into ``Linked.annotations``.
    """

    opcode: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0
    ref: str | None = None
    comment: str | None = field(default=None, compare=False)

    @property
    def cls(self) -> Class:
        return Class(self.opcode & CLASS_MASK)

    @property
    def op(self) -> int:
        """The operation field of ALU/JMP opcodes (compare with AluOp / JmpOp)."""
        return self.opcode & OP_MASK

    @property
    def source(self) -> int:
        """The K/X (or TO_LE/TO_BE) bit of ALU/JMP opcodes (compare with Source)."""
        return self.opcode & SRC_MASK

    @property
    def size(self) -> Size:
        """The access width of a load/store."""
        return Size(self.opcode & SIZE_MASK)

    @property
    def mode(self) -> int:
        """The addressing mode of a load/store (compare with Mode)."""
        return self.opcode & MODE_MASK

    @property
    def is_ld_imm64(self) -> bool:
        return self.opcode == LD_IMM64

    @property
    def slots(self) -> int:
        """How many 8-byte slots the instruction takes (2 for a 64-bit immediate load)."""
        return 2 if self.opcode == LD_IMM64 else 1

    @property
    def is_jump(self) -> bool:
        """A JMP/JMP32 whose target is an offset (everything but call and exit)."""
        if self.opcode & CLASS_MASK not in (Class.JMP, Class.JMP32):
            return False
        op = self.opcode & OP_MASK
        return op not in (JmpOp.CALL, JmpOp.EXIT)

    @property
    def is_local_call(self) -> bool:
        return self.opcode == CALL and self.src == PseudoCall.CALL

    @property
    def is_kfunc_call(self) -> bool:
        return self.opcode == CALL and self.src == PseudoCall.KFUNC_CALL

    @property
    def is_map_load(self) -> bool:
        return self.opcode == LD_IMM64 and self.src in (PseudoSrc.MAP_FD, PseudoSrc.MAP_VALUE)

    def encode(self) -> bytes:
        """The 8 (or 16) bytes of this instruction."""
        return encode([self])

    def __str__(self) -> str:
        from bpfilter.codegen.disasm import format_insn

        text = format_insn(self)
        return f"{text} <{self.ref}>" if self.ref is not None else text


def encode(insns: Iterable[Insn]) -> bytes:
    """Encode instructions into the byte form BPF_PROG_LOAD takes."""
    out = bytearray()
    pack = _SLOT.pack
    slot = 0
    for insn in insns:
        try:
            if (insn.dst | insn.src) & ~0x0F:
                raise ValueError(f"register fields are 4 bits (dst={insn.dst}, src={insn.src})")
            regs = (insn.src << 4) | insn.dst
            if insn.opcode == LD_IMM64:
                imm = insn.imm & _U64 if -(1 << 63) <= insn.imm <= _U64 else None
                if imm is None:
                    raise ValueError(f"64-bit immediate {insn.imm:#x} out of range")
                lo, hi = imm & _U32, imm >> 32
                out += pack(insn.opcode, regs, insn.off, lo - (lo >> 31 << 32))
                out += pack(0, 0, 0, hi - (hi >> 31 << 32))
                slot += 2
            else:
                out += pack(insn.opcode, regs, insn.off, insn.imm)
                slot += 1
        except (struct.error, ValueError, TypeError) as e:
            raise ValueError(f"insn {slot} ({insn!r}) cannot be encoded: {e}") from None
    return bytes(out)


def decode(code: bytes) -> list[Insn]:
    """Decode instruction bytes; a 64-bit immediate load becomes one Insn with a 64-bit imm."""
    if len(code) % INSN_SIZE:
        raise ValueError(f"code length {len(code)} is not a multiple of {INSN_SIZE}")
    out: list[Insn] = []
    slots = list(_SLOT.iter_unpack(code))
    i = 0
    n = len(slots)
    while i < n:
        op, regs, off, imm = slots[i]
        if op == LD_IMM64:
            if i + 1 >= n:
                raise ValueError(f"insn {i}: 64-bit immediate load is missing its second slot")
            imm = ((slots[i + 1][3] & _U32) << 32) | (imm & _U32)
            i += 2
        else:
            i += 1
        out.append(Insn(op, regs & 0x0F, regs >> 4, off, imm))
    return out
