"""Golden lines: the disassembler writes what the kernel's print_bpf_insn (bpftool) writes."""

from __future__ import annotations

import pytest

from bpfilter.codegen import asm
from bpfilter.codegen.disasm import disassemble, format_insn, format_lines
from bpfilter.codegen.helpers import BpfFunc
from bpfilter.codegen.insn import FP, R0, R1, R2, R3, R4, R6, Insn, encode
from bpfilter.codegen.opcodes import Size

GOLDEN: list[tuple[Insn, str]] = [
    (asm.mov64(R0, 1), "(b7) r0 = 1"),
    (asm.mov64(R0, -1), "(b7) r0 = -1"),
    (asm.mov32(R0, R1), "(bc) w0 = w1"),
    (asm.mov64(R6, R1), "(bf) r6 = r1"),
    (asm.add64(R1, -4), "(07) r1 += -4"),
    (asm.sub32(R1, R2), "(1c) w1 -= w2"),
    (asm.mul64(R1, 3), "(27) r1 *= 3"),
    (asm.div64(R1, R2), "(3f) r1 /= r2"),
    (asm.sdiv64(R1, R2), "(3f) r1 s/= r2"),
    (asm.smod32(R1, 5), "(94) w1 s%= 5"),
    (asm.mod64(R1, 5), "(97) r1 %= 5"),
    (asm.or64(R1, 1), "(47) r1 |= 1"),
    (asm.and32(R1, 0xFFFF), "(54) w1 &= 65535"),
    (asm.lsh64(R1, 32), "(67) r1 <<= 32"),
    (asm.rsh64(R1, R3), "(7f) r1 >>= r3"),
    (asm.xor64(R1, R1), "(af) r1 ^= r1"),
    (asm.arsh32(R1, 31), "(c4) w1 s>>= 31"),
    (asm.neg64(R0), "(87) r0 = -r0"),
    (asm.neg32(R0), "(84) w0 = -w0"),
    (asm.movsx64(R0, R1, 8), "(bf) r0 = (s8)r1"),
    (asm.movsx64(R0, R1, 32), "(bf) r0 = (s32)r1"),
    (asm.movsx32(R0, R1, 16), "(bc) w0 = (s16)w1"),
    (asm.to_be(R1, 16), "(dc) r1 = be16 r1"),
    (asm.to_le(R1, 64), "(d4) r1 = le64 r1"),
    (asm.bswap(R1, 32), "(d7) r1 = bswap32 r1"),
    (asm.ldx(Size.DW, R1, R1, 8), "(79) r1 = *(u64 *)(r1 +8)"),
    (asm.ldx(Size.B, R2, R6, 0), "(71) r2 = *(u8 *)(r6 +0)"),
    (asm.ldsx(Size.H, R2, R6, -2), "(89) r2 = *(s16 *)(r6 -2)"),
    (asm.stx(Size.W, FP, -4, R1), "(63) *(u32 *)(r10 -4) = r1"),
    (asm.st(Size.H, FP, -2, -7), "(6a) *(u16 *)(r10 -2) = -7"),
    (asm.atomic_add(Size.DW, FP, -8, R1), "(db) lock *(u64 *)(r10 -8) += r1"),
    (asm.atomic_or(Size.W, FP, -8, R1), "(c3) lock *(u32 *)(r10 -8) |= r1"),
    (asm.atomic_and(Size.DW, R1, 0, R2, fetch=True),
     "(db) r2 = atomic64_fetch_and((u64 *)(r1 +0), r2)"),
    (asm.atomic_xor(Size.W, R1, 4, R2, fetch=True),
     "(c3) r2 = atomic_fetch_xor((u32 *)(r1 +4), r2)"),
    (asm.atomic_xchg(Size.DW, R1, 0, R3), "(db) r3 = atomic64_xchg((u64 *)(r1 +0), r3)"),
    (asm.atomic_cmpxchg(Size.W, R1, 0, R3), "(c3) r0 = atomic_cmpxchg((u32 *)(r1 +0), r0, r3)"),
    (asm.load_acquire(Size.W, R0, R1, 8), "(c3) r0 = load_acquire((u32 *)(r1 +8))"),
    (asm.store_release(Size.B, R1, 0, R2), "(d3) store_release((u8 *)(r1 +0), r2)"),
    (asm.ld_abs(Size.H, 12), "(28) r0 = *(u16 *)skb[12]"),
    (asm.ld_ind(Size.B, R3, 2), "(50) r0 = *(u8 *)skb[r3 + 2]"),
    (asm.ld_imm64(R1, 0x1122334455667788), "(18) r1 = 0x1122334455667788"),
    (asm.ld_imm64(R1, 0), "(18) r1 = 0x0"),
    (Insn(0x18, 1, 1, 0, 5), "(18) r1 = map[id:5]"),
    (Insn(0x18, 1, 2, 0, (8 << 32) | 5), "(18) r1 = map[id:5][0]+8"),
    (asm.ld_map_idx_value(R1, 2, 4), "(18) r1 = map[idx:2]+4"),
    (Insn(0x18, 2, 4, 0, 3), "(18) r2 = subprog[+3]"),
    (asm.jmp("jeq", R0, 0, 2), "(15) if r0 == 0x0 goto pc+2"),
    (asm.jmp("jne", R0, -1, -3), "(55) if r0 != 0xffffffff goto pc-3"),
    (asm.jmp("jgt", R1, R2, 1), "(2d) if r1 > r2 goto pc+1"),
    (asm.jmp("jsle", R1, R2, 1), "(dd) if r1 s<= r2 goto pc+1"),
    (asm.jmp("jset", R1, 8, 1), "(45) if r1 & 0x8 goto pc+1"),
    (asm.jmp32("jlt", R1, 4, 1), "(a6) if w1 < 0x4 goto pc+1"),
    (asm.jmp32("jsge", R1, R4, 0), "(7e) if w1 s>= w4 goto pc+0"),
    (asm.ja(-1), "(05) goto pc-1"),
    (asm.gotol(70000), "(06) gotol pc+70000"),
    (asm.may_goto(3), "(e5) may_goto pc+3"),
    (asm.call_helper(BpfFunc.map_lookup_elem), "(85) call bpf_map_lookup_elem#1"),
    (asm.call_helper(BpfFunc.ktime_get_ns), "(85) call bpf_ktime_get_ns#5"),
    (asm.call_helper(5000), "(85) call unknown#5000"),
    (asm.call_kfunc(99840), "(85) call kernel-function#99840"),
    (asm.call_local(4), "(85) call pc+4"),
    (asm.exit_(), "(95) exit"),
]


@pytest.mark.parametrize(("insn", "text"), GOLDEN, ids=[t for _, t in GOLDEN])
def test_golden(insn: Insn, text: str) -> None:
    assert format_lines([insn]) == [f"   0: {text}"]


def test_line_numbers_count_slots() -> None:
    code = encode([asm.ld_imm64(R1, 1), asm.mov64(R0, 1), asm.exit_()])
    assert disassemble(code) == ["   0: (18) r1 = 0x1", "   2: (b7) r0 = 1", "   3: (95) exit"]


def test_wide_line_numbers() -> None:
    lines = disassemble(encode([asm.exit_()] * 10001))
    assert lines[9999] == " 9999: (95) exit" and lines[10000] == " 10000: (95) exit"


def test_names_for_maps_and_kfuncs() -> None:
    code = encode([Insn(0x18, 1, 1, 0, 5), asm.call_kfunc(99840)])
    assert disassemble(code, map_names={5: "blocklist"},
                       kfunc_names={99840: "bpf_dynptr_from_skb"}) == [
        "   0: (18) r1 = map[blocklist]",
        "   2: (85) call bpf_dynptr_from_skb#99840",
    ]


def test_insn_str_shows_pending_reference() -> None:
    assert str(asm.jeq(R0, 0, "drop")) == "if r0 == 0x0 goto pc+0 <drop>"
    assert format_insn(asm.mov64(R0, 2)) == "r0 = 2"


def test_malformed_instructions_print_like_the_kernel() -> None:
    assert format_lines([Insn(0x39, 0, 0, 0, 0)]) == ["   0: (39) BUG_ldx_39"]
    assert format_lines([Insn(0xA2, 0, 0, 0, 0)]) == ["   0: (a2) BUG_st_a2"]
    assert format_lines([Insn(0xC2, 0, 0, 0, 0)]) == ["   0: (c2) nospec"]


def test_annotations_precede_their_instruction() -> None:
    code = encode([asm.ld_imm64(R1, 1), asm.exit_()])
    assert disassemble(code, annotations={2: "rule 7"}) == [
        "   0: (18) r1 = 0x1", "; rule 7", "   2: (95) exit"]
