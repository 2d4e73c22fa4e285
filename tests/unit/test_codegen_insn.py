"""Encoding and decoding: every instruction class and operation survives a round trip."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bpfilter.codegen import asm
from bpfilter.codegen.insn import FP, R0, R1, R2, R3, R10, Insn, Reg, decode, encode
from bpfilter.codegen.opcodes import Class, Size

ALU_OPS = ["add", "sub", "mul", "div", "sdiv", "or", "and", "lsh", "rsh", "mod", "smod", "xor",
           "mov", "arsh"]
JMP_OPS = ["jeq", "jgt", "jge", "jset", "jne", "jsgt", "jsge", "jlt", "jle", "jslt", "jsle"]
SIZES = [Size.B, Size.H, Size.W, Size.DW]


def every_form() -> list[Insn]:
    """One instruction of every form the assembler can build."""
    out: list[Insn] = []
    for op in ALU_OPS:
        out += [asm.alu64(op, R1, R2), asm.alu64(op, R1, -7), asm.alu32(op, R3, R0),
                asm.alu32(op, R3, 0x7FFFFFFF)]
    out += [asm.neg64(R1), asm.neg32(R2)]
    out += [asm.movsx64(R0, R1, b) for b in (8, 16, 32)] + [asm.movsx32(R0, R1, b) for b in (8, 16)]
    for bits in (16, 32, 64):
        out += [asm.to_le(R1, bits), asm.to_be(R1, bits), asm.bswap(R1, bits)]
    for size in SIZES:
        out += [asm.ldx(size, R1, R2, -8), asm.stx(size, FP, 16, R3), asm.st(size, FP, -4, -1),
                asm.load_acquire(size, R0, R1, 2), asm.store_release(size, R1, -2, R0)]
        if size != Size.DW:
            out += [asm.ldsx(size, R1, R2, 4), asm.ld_abs(size, 14), asm.ld_ind(size, R3, 2)]
    for size in (Size.W, Size.DW):
        for op in ("add", "or", "and", "xor"):
            out += [asm.atomic(op, size, R1, 8, R2), asm.atomic(op, size, R1, -8, R2, fetch=True)]
        out += [asm.atomic_xchg(size, R1, 0, R2), asm.atomic_cmpxchg(size, R1, 4, R2)]
    for op in JMP_OPS:
        out += [asm.jmp(op, R1, R2, 5), asm.jmp(op, R1, -1, -3), asm.jmp32(op, R1, R2, 32767),
                asm.jmp32(op, R1, 0x80000000, -32768)]
    out += [asm.ja(3), asm.gotol(-100000), asm.may_goto(2), asm.exit_(), asm.call_helper(1),
            asm.call_kfunc(12345), asm.call_local(-4)]
    out += [asm.ld_imm64(R1, 0x1122334455667788), asm.ld_imm64(R2, -1), asm.ld_map_idx(R1, 3),
            asm.ld_map_idx_value(R1, 2, 16), asm.ld_btf_id(R1, 777),
            Insn(0x18, 1, 1, 0, 42), Insn(0x18, 1, 2, 0, (8 << 32) | 42), Insn(0x18, 1, 4, 0, 5)]
    return out


FORMS = every_form()


@pytest.mark.parametrize("insn", FORMS, ids=lambda i: f"{i.opcode:02x}:{i.imm & 0xffff:x}")
def test_round_trip(insn: Insn) -> None:
    code = insn.encode()
    assert len(code) == 8 * insn.slots
    (back,) = decode(code)
    assert back == insn


def test_every_class_is_covered() -> None:
    assert {i.cls for i in FORMS} == set(Class)


def test_program_round_trip() -> None:
    code = encode(FORMS)
    assert len(code) == 8 * sum(i.slots for i in FORMS)
    assert decode(code) == FORMS


def test_known_bytes() -> None:
    # Reference encodings (little-endian; dst in the low nibble of byte 1).
    assert asm.mov64(R0, 1).encode() == bytes.fromhex("b700000001000000")
    assert asm.ldx(Size.DW, Reg.R6, R1, 8).encode() == bytes.fromhex("7916080000000000")
    assert asm.stx(Size.W, FP, -4, R1).encode() == bytes.fromhex("631afcff00000000")
    assert asm.sdiv64(R1, R2).encode() == bytes.fromhex("3f21010000000000")
    assert asm.ld_imm64(R1, 0x1122334455667788).encode() == bytes.fromhex(
        "1801000088776655" "0000000044332211")
    assert asm.exit_().encode() == bytes.fromhex("9500000000000000")


def test_ld_imm64_high_bits_are_unsigned() -> None:
    (back,) = decode(asm.ld_imm64(R1, -2).encode())
    assert back.imm == 0xFFFFFFFFFFFFFFFE


def test_comment_does_not_change_identity() -> None:
    assert asm.mov64(R0, 1, comment="rule 3") == asm.mov64(R0, 1)


def test_decode_rejects_partial_code() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        decode(b"\x00" * 12)
    with pytest.raises(ValueError, match="second slot"):
        decode(bytes.fromhex("1801000000000000"))


def test_encode_rejects_out_of_range_fields() -> None:
    with pytest.raises(ValueError, match="insn 1"):
        encode([asm.exit_(), Insn(0xB7, 0, 0, 0, 1 << 40)])
    with pytest.raises(ValueError, match="insn 0"):
        encode([Insn(0x05, 0, 0, 40000, 0)])
    with pytest.raises(ValueError, match="4 bits"):
        encode([Insn(0xBF, 16, 0, 0, 0)])


def test_register_aliases() -> None:
    assert FP is R10 is Reg.R10
    assert [int(r) for r in Reg] == list(range(11))


@given(st.integers(0, 255).filter(lambda op: op != 0x18), st.integers(0, 15),
       st.integers(0, 15), st.integers(-(1 << 15), (1 << 15) - 1),
       st.integers(-(1 << 31), (1 << 31) - 1))
def test_any_single_slot_round_trips(op: int, dst: int, src: int, off: int, imm: int) -> None:
    insn = Insn(op, dst, src, off, imm)
    assert decode(insn.encode()) == [insn]


@given(st.integers(0, (1 << 64) - 1), st.integers(0, 10), st.integers(0, 6))
def test_any_imm64_round_trips(imm: int, dst: int, src: int) -> None:
    insn = Insn(0x18, dst, src, 0, imm)
    assert decode(insn.encode()) == [insn]
