"""The opcode enums match the kernel's bit layout (linux/bpf_common.h, linux/bpf.h)."""

from __future__ import annotations

import pytest

from bpfilter.codegen.opcodes import (
    CLASS_MASK,
    MODE_MASK,
    OP_MASK,
    SIZE_MASK,
    SRC_MASK,
    AluOp,
    AtomicOp,
    Class,
    JmpOp,
    Mode,
    PseudoCall,
    PseudoSrc,
    Size,
    Source,
    opcode,
)


def test_fields_stay_inside_their_masks() -> None:
    assert all(c & ~CLASS_MASK == 0 for c in Class)
    assert all(s & ~SIZE_MASK == 0 for s in Size)
    assert all(m & ~MODE_MASK == 0 for m in Mode)
    assert all(s & ~SRC_MASK == 0 for s in Source)
    assert all(o & ~OP_MASK == 0 for o in AluOp)
    assert all(o & ~OP_MASK == 0 for o in JmpOp)


def test_well_known_opcodes() -> None:
    # Values straight from the instruction-set document's opcode table.
    assert opcode(Class.ALU64, AluOp.MOV, Source.K) == 0xB7
    assert opcode(Class.ALU, AluOp.MOV, Source.X) == 0xBC
    assert opcode(Class.LDX, Size.DW, Mode.MEM) == 0x79
    assert opcode(Class.LD, Size.DW, Mode.IMM) == 0x18
    assert opcode(Class.STX, Size.DW, Mode.ATOMIC) == 0xDB
    assert opcode(Class.JMP, JmpOp.CALL) == 0x85
    assert opcode(Class.JMP, JmpOp.EXIT) == 0x95
    assert opcode(Class.JMP32, JmpOp.JA) == 0x06
    assert opcode(Class.ALU64, AluOp.END, Source.TO_LE) == 0xD7
    assert opcode(Class.LDX, Size.B, Mode.MEMSX) == 0x91


def test_atomic_and_pseudo_values() -> None:
    assert AtomicOp.XCHG == 0xE1 and AtomicOp.CMPXCHG == 0xF1
    assert AtomicOp.FETCH_ADD == AtomicOp.ADD | 1
    assert (AtomicOp.LOAD_ACQ, AtomicOp.STORE_REL) == (0x11, 0x22)
    assert [p.value for p in PseudoSrc] == [0, 1, 2, 3, 4, 5, 6]
    assert (PseudoCall.CALL, PseudoCall.KFUNC_CALL) == (1, 2)


@pytest.mark.parametrize(("size", "nbytes"), [(Size.B, 1), (Size.H, 2), (Size.W, 4), (Size.DW, 8)])
def test_size_bytes(size: Size, nbytes: int) -> None:
    assert size.nbytes == nbytes
    assert Size.of_bytes(nbytes) is size


def test_size_of_bad_width() -> None:
    with pytest.raises(ValueError, match="3 bytes"):
        Size.of_bytes(3)
