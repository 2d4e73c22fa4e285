"""Builders put each operand in the right field and refuse what the kernel would refuse."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bpfilter.codegen import asm
from bpfilter.codegen.asm import Label
from bpfilter.codegen.helpers import BpfFunc
from bpfilter.codegen.insn import FP, R0, R1, R2, R3, Insn
from bpfilter.codegen.opcodes import AtomicOp, PseudoCall, PseudoSrc, Size


def test_mov_immediate_and_register() -> None:
    assert asm.mov64(R0, 1) == Insn(0xB7, 0, 0, 0, 1)
    assert asm.mov64(R0, R1) == Insn(0xBF, 0, 1, 0, 0)
    assert asm.mov32(R2, R3) == Insn(0xBC, 2, 3, 0, 0)


def test_named_shortcuts_match_generic_builders() -> None:
    for op in ("add", "sub", "mul", "div", "sdiv", "or", "and", "lsh", "rsh", "mod", "smod",
               "xor", "mov", "arsh"):
        assert getattr(asm, f"{op}64")(R1, R2) == asm.alu64(op, R1, R2)
        assert getattr(asm, f"{op}32")(R1, 9) == asm.alu32(op, R1, 9)
    for op in ("jeq", "jne", "jgt", "jge", "jlt", "jle", "jset", "jsgt", "jsge", "jslt", "jsle"):
        assert getattr(asm, op)(R1, 3, "x") == asm.jmp(op, R1, 3, "x")


def test_signed_division_sets_offset_one() -> None:
    assert asm.sdiv64(R1, R2).off == 1 and asm.div64(R1, R2).off == 0
    assert asm.smod32(R1, 3).off == 1 and asm.smod32(R1, 3).opcode == 0x94


def test_unsigned_immediates_become_signed() -> None:
    assert asm.and64(R1, 0xFFFFFFFF).imm == -1
    assert asm.jeq(R1, 0x80000000, "x").imm == -(1 << 31)


@pytest.mark.parametrize("bad", [1 << 32, -(1 << 31) - 1])
def test_immediate_range(bad: int) -> None:
    with pytest.raises(ValueError, match="32 bits"):
        asm.mov64(R0, bad)


def test_offset_range() -> None:
    with pytest.raises(ValueError, match="16 bits"):
        asm.ldx(Size.W, R0, R1, 1 << 15)


def test_memory_operand_order() -> None:
    insn = asm.stx(Size.DW, FP, -8, R1)
    assert (insn.dst, insn.src, insn.off) == (10, 1, -8)
    insn = asm.ldx(Size.B, R0, R1, 3)
    assert (insn.dst, insn.src, insn.off, insn.opcode) == (0, 1, 3, 0x71)
    insn = asm.st(Size.H, FP, -2, 0x1234)
    assert (insn.dst, insn.off, insn.imm, insn.opcode) == (10, -2, 0x1234, 0x6A)


def test_atomics() -> None:
    assert asm.atomic_add(Size.DW, FP, -8, R1).imm == AtomicOp.ADD
    assert asm.atomic_xor(Size.W, R1, 0, R2, fetch=True).imm == AtomicOp.FETCH_XOR
    assert asm.atomic_cmpxchg(Size.DW, R1, 0, R2).imm == AtomicOp.CMPXCHG
    with pytest.raises(ValueError, match="4 or 8 bytes"):
        asm.atomic_add(Size.B, R1, 0, R2)
    with pytest.raises(ValueError, match="unknown atomic"):
        asm.atomic("sub", Size.W, R1, 0, R2)
    assert asm.load_acquire(Size.B, R0, R1, 0).opcode == 0xD3


def test_calls() -> None:
    helper = asm.call_helper(BpfFunc.map_lookup_elem)
    assert (helper.opcode, helper.src, helper.imm) == (0x85, PseudoCall.HELPER, 1)
    kfunc = asm.call_kfunc("bpf_dynptr_from_skb")
    assert (kfunc.src, kfunc.ref, kfunc.imm, kfunc.off) == (2, "bpf_dynptr_from_skb", 0, 0)
    local = asm.call_local("sub")
    assert (local.src, local.ref) == (PseudoCall.CALL, "sub")


def test_jumps_keep_labels() -> None:
    assert asm.jmp("jeq", R0, 0, "drop").ref == "drop"
    assert asm.jmp32("jgt", R0, R1, "x").opcode == 0x2E
    assert asm.gotol("far").opcode == 0x06
    assert asm.ja(-1) == Insn(0x05, 0, 0, -1, 0)


def test_immediate_loads() -> None:
    assert asm.ld_map_fd(R1, "m").src == PseudoSrc.MAP_FD
    value = asm.ld_map_value(R1, "m", 12)
    assert (value.src, value.imm >> 32, value.ref) == (PseudoSrc.MAP_VALUE, 12, "m")
    assert asm.ld_imm64(R1, -1).imm == (1 << 64) - 1
    assert asm.ld_func(R2, "cb").src == PseudoSrc.FUNC


@pytest.mark.parametrize(
    "build",
    [
        lambda: asm.alu64("neg", R1, 1),
        lambda: asm.alu64("pow", R1, 1),
        lambda: asm.jmp("jxx", R1, 1, "x"),
        lambda: asm.movsx64(R0, R1, 64),
        lambda: asm.movsx32(R0, R1, 32),
        lambda: asm.bswap(R0, 8),
        lambda: asm.ldsx(Size.DW, R0, R1, 0),
        lambda: asm.ld_abs(Size.DW, 0),
        lambda: asm.mov64(11, 0),
        lambda: asm.ld_imm64(R0, 1 << 64),
    ],
)
def test_invalid_forms_are_refused(build: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        build()


def test_label_is_a_value() -> None:
    assert Label("a") == Label("a")
