"""ELF objects: read back by pyelftools, and decoded by llvm-objdump-19 as an independent check."""

from __future__ import annotations

import io
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import Section, SymbolTableSection

from bpfilter.codegen import asm
from bpfilter.codegen.asm import Label
from bpfilter.codegen.elf import (
    BTF_MAP_SIZE,
    EM_BPF,
    MAP_DEF,
    R_BPF_64_64,
    ElfProgram,
    maps_btf,
    write_elf,
)
from bpfilter.codegen.insn import FP, R0, R1, R2, R3, Insn
from bpfilter.codegen.link import link
from bpfilter.codegen.opcodes import Size
from bpfilter.codegen.spec import MapSpec
from bpfilter.codegen.uapi import MapFlag, MapType


def llvm_objdump() -> str:
    """Path of llvm-objdump-19 (older ones cannot decode cpu v4 instructions), or skip."""
    found = shutil.which("llvm-objdump-19")
    if found is None:
        pytest.skip("llvm-objdump-19 is not installed (apt install llvm-19)")
    return found

ALU = [("add", "+="), ("sub", "-="), ("mul", "*="), ("div", "/="), ("sdiv", "s/="), ("or", "|="),
       ("and", "&="), ("lsh", "<<="), ("rsh", ">>="), ("mod", "%="), ("smod", "s%="),
       ("xor", "^="), ("mov", "="), ("arsh", "s>>=")]
JMP = [("jeq", "=="), ("jgt", ">"), ("jge", ">="), ("jset", "&"), ("jne", "!="), ("jsgt", "s>"),
       ("jsge", "s>="), ("jlt", "<"), ("jle", "<="), ("jslt", "s<"), ("jsle", "s<=")]
WIDTH = {Size.B: "u8", Size.H: "u16", Size.W: "u32", Size.DW: "u64"}
SIGNED = {Size.B: "s8", Size.H: "s16", Size.W: "s32"}


def catalog() -> list[tuple[Insn, str]]:
    """Every instruction form with the text llvm-objdump-19 --mcpu=v4 prints for it.

    llvm-19 prints sub-64-bit loads/stores through w registers, omits LD_IND's immediate, spells
    the 32-bit xchg/cmpxchg ``xchg32_32``/``cmpxchg32_32`` and shows pseudo loads raw. It cannot
    decode load-acquire/store-release (LLVM 20), so those are left to the other tests.
    """
    out: list[tuple[Insn, str]] = []
    for op, sym in ALU:
        out += [(asm.alu64(op, R1, R2), f"r1 {sym} r2"), (asm.alu64(op, R1, -7), f"r1 {sym} -7"),
                (asm.alu32(op, R3, R0), f"w3 {sym} w0"), (asm.alu32(op, R3, 9), f"w3 {sym} 9")]
    out += [(asm.neg64(R1), "r1 = -r1"), (asm.neg32(R2), "w2 = -w2")]
    out += [(asm.movsx64(R0, R1, b), f"r0 = (s{b})r1") for b in (8, 16, 32)]
    out += [(asm.movsx32(R0, R1, b), f"w0 = (s{b})w1") for b in (8, 16)]
    for bits in (16, 32, 64):
        out += [(asm.to_le(R1, bits), f"r1 = le{bits} r1"),
                (asm.to_be(R1, bits), f"r1 = be{bits} r1"),
                (asm.bswap(R1, bits), f"r1 = bswap{bits} r1")]
    for size, w in WIDTH.items():
        reg = "r" if size == Size.DW else "w"
        out += [(asm.ldx(size, R1, R2, -8), f"{reg}1 = *({w} *)(r2 - 8)"),
                (asm.stx(size, FP, 16, R3), f"*({w} *)(r10 + 16) = {reg}3"),
                (asm.st(size, FP, -4, -1), f"*({w} *)(r10 - 4) = -1")]
        if size in SIGNED:
            out += [(asm.ldsx(size, R1, R2, 4), f"r1 = *({SIGNED[size]} *)(r2 + 4)"),
                    (asm.ld_abs(size, 14), f"r0 = *({w} *)skb[14]"),
                    (asm.ld_ind(size, R3, 2), f"r0 = *({w} *)skb[r3]")]
    for size in (Size.W, Size.DW):
        w, reg = WIDTH[size], "w" if size == Size.W else "r"
        for op, sym in [("add", "+="), ("or", "|="), ("and", "&="), ("xor", "^=")]:
            out += [(asm.atomic(op, size, R1, 8, R2), f"lock *({w} *)(r1 + 8) {sym} {reg}2"),
                    (asm.atomic(op, size, R1, -8, R2, fetch=True),
                     f"{reg}2 = atomic_fetch_{op}(({w} *)(r1 - 8), {reg}2)")]
    out += [(asm.atomic_xchg(Size.W, R1, 0, R2), "w2 = xchg32_32(r1 + 0, w2)"),
            (asm.atomic_cmpxchg(Size.W, R1, 4, R2), "w0 = cmpxchg32_32(r1 + 4, w0, w2)"),
            (asm.atomic_xchg(Size.DW, R1, 0, R2), "r2 = xchg_64(r1 + 0, r2)"),
            (asm.atomic_cmpxchg(Size.DW, R1, 4, R2), "r0 = cmpxchg_64(r1 + 4, r0, r2)")]
    for op, sym in JMP:
        out += [(asm.jmp(op, R1, R2, 5), f"if r1 {sym} r2 goto +5"),
                (asm.jmp(op, R1, -1, -3), f"if r1 {sym} -1 goto -3"),
                (asm.jmp32(op, R1, R2, 7), f"if w1 {sym} w2 goto +7"),
                (asm.jmp32(op, R1, 100, -2), f"if w1 {sym} 100 goto -2")]
    out += [(asm.ja(3), "goto +3"), (asm.gotol(-10), "gotol -10"), (asm.may_goto(2), "may_goto +2"),
            (asm.exit_(), "exit"), (asm.call_helper(1), "call 1"),
            (asm.call_kfunc(12345), "call 12345"), (asm.call_local(-4), "call -4")]
    out += [(asm.ld_imm64(R1, 0x1122334455667788), "r1 = 1234605616436508552 ll"),
            (asm.ld_imm64(R2, -1), "r2 = -1 ll"),
            (asm.ld_map_idx(R1, 3), "ld_pseudo r1, 5, 3"),
            (asm.ld_map_idx_value(R1, 2, 16), "ld_pseudo r1, 6, 2"),
            (asm.ld_btf_id(R1, 777), "ld_pseudo r1, 3, 777")]
    return out


def objdump(path: Path) -> list[tuple[int, bytes, str]]:
    """(slot, raw bytes, text) for each instruction llvm-objdump-19 decodes."""
    result = subprocess.run(
        [llvm_objdump(), "-d", "--mcpu=v4", "--no-print-imm-hex", str(path)],
        check=True, capture_output=True, text=True,
    )
    rows = []
    for line in result.stdout.splitlines():
        m = re.match(r"^\s*(\d+):\t((?:[0-9a-f]{2} )*[0-9a-f]{2})\s+(.*)$", line)
        if m:
            text = re.sub(r"\s+<[^<>\s]+>$", "", m.group(3))  # drop "<prog+0x..>" jump annotations
            rows.append((int(m.group(1)), bytes.fromhex(m.group(2)), " ".join(text.split())))
    return rows


def test_every_instruction_form_matches_llvm_objdump(tmp_path: Path) -> None:
    cases = catalog()
    insns = [insn for insn, _ in cases]
    linked = link(insns)
    path = tmp_path / "all.o"
    path.write_bytes(write_elf([ElfProgram("all", ".text", linked)]))
    rows = objdump(path)
    assert len(rows) == len(cases)
    slot = 0
    for (insn, expected), (at, raw, text) in zip(cases, rows, strict=True):
        assert at == slot
        assert raw == insn.encode(), f"slot {slot}: {expected}"
        assert text == expected, f"slot {slot}: raw {raw.hex()}"
        slot += insn.slots


def test_every_class_is_in_the_catalog() -> None:
    assert {insn.cls for insn, _ in catalog()} == set(range(8))


def section(elf: ELFFile, name: str) -> Section:
    found = elf.get_section_by_name(name)
    assert found is not None, f"no section {name}"
    return found


def _program() -> tuple[list[Insn | Label], list[MapSpec]]:
    prog: list[Insn | Label] = [
        asm.mov64(R0, 0),
        asm.ld_map_fd(R1, "counters"),
        asm.ld_map_value(R2, "config", 4),
        asm.jeq(R0, 0, "out"),
        asm.ld_map_fd(R3, "config"),
        Label("out"),
        asm.exit_(),
    ]
    maps = [MapSpec("counters", MapType.ARRAY, 4, 8, 16),
            MapSpec("config", MapType.HASH, 4, 4, 64, int(MapFlag.NO_PREALLOC))]
    return prog, maps


def test_pyelftools_reads_sections_symbols_and_relocations() -> None:
    prog, maps = _program()
    linked = link(prog)
    second = link([asm.mov64(R0, 2), asm.exit_()])
    data = write_elf([ElfProgram("xdp_main", "xdp", linked), ElfProgram("other", "xdp", second),
                      ElfProgram("nf", "netfilter", second)], maps, btf_maps=False)
    elf = ELFFile(io.BytesIO(data))
    assert (elf.elfclass, elf.little_endian) == (64, True)
    assert elf["e_machine"] == "EM_BPF" and elf.header["e_type"] == "ET_REL"
    names = [s.name for s in elf.iter_sections()]
    assert names == ["", "xdp", "netfilter", "license", "maps", ".relxdp", ".symtab", ".strtab"]
    xdp = section(elf, "xdp")
    assert xdp.data() == linked.code + second.code
    assert xdp["sh_flags"] & 0x6 == 0x6  # alloc + exec
    assert section(elf, "license").data() == b"GPL\0"
    defs = section(elf, "maps").data()
    assert [MAP_DEF.unpack_from(defs, i * MAP_DEF.size) for i in range(2)] == [
        (MapType.ARRAY, 4, 8, 16, 0), (MapType.HASH, 4, 4, 64, 1)]

    symtab = section(elf, ".symtab")
    assert isinstance(symtab, SymbolTableSection)
    syms = {s.name: s for s in symtab.iter_symbols() if s.name}
    assert syms["xdp_main"]["st_info"]["type"] == "STT_FUNC"
    assert syms["xdp_main"]["st_size"] == len(linked.code)
    assert syms["other"]["st_value"] == len(linked.code)
    assert elf.get_section(syms["nf"]["st_shndx"]).name == "netfilter"
    assert syms["config"]["st_info"]["type"] == "STT_OBJECT"
    assert syms["config"]["st_value"] == MAP_DEF.size
    assert elf.get_section(syms["config"]["st_shndx"]).name == "maps"
    assert symtab["sh_info"] == min(i for i, s in enumerate(symtab.iter_symbols())
                                    if s["st_info"]["bind"] == "STB_GLOBAL")

    rel = section(elf, ".relxdp")
    assert isinstance(rel, RelocationSection) and not rel.is_RELA()
    assert elf.get_section(rel["sh_info"]).name == "xdp"
    got = [(r["r_offset"], symtab.get_symbol(r["r_info_sym"]).name, r["r_info_type"])
           for r in rel.iter_relocations()]
    assert got == [(8, "counters", R_BPF_64_64), (24, "config", R_BPF_64_64),
                   (48, "config", R_BPF_64_64)]


def test_llvm_objdump_shows_map_relocations(tmp_path: Path) -> None:
    prog, maps = _program()
    path = tmp_path / "maps.o"
    path.write_bytes(write_elf([ElfProgram("prog", "xdp", link(prog))], maps))
    out = subprocess.run([llvm_objdump(), "-dr", "--mcpu=v4", str(path)], check=True,
                         capture_output=True, text=True).stdout
    relocs = re.findall(r"([0-9a-f]+):\s+R_BPF_64_64\s+(\w+)", out)
    assert [(int(off, 16), name) for off, name in relocs] == [
        (8, "counters"), (24, "config"), (48, "config")]


def test_relocation_against_missing_map() -> None:
    with pytest.raises(ValueError, match="insn 0 loads map 'nope'"):
        write_elf([ElfProgram("p", "xdp", link([asm.ld_map_fd(R1, "nope"), asm.exit_()]))])


def test_btf_defined_maps() -> None:
    prog, maps = _program()
    data = write_elf([ElfProgram("xdp_main", "xdp", link(prog))], maps, license="Dual BSD/GPL")
    elf = ELFFile(io.BytesIO(data))
    assert section(elf, "license").data() == b"Dual BSD/GPL\0"
    assert section(elf, ".maps").data() == bytes(2 * BTF_MAP_SIZE)
    symtab = section(elf, ".symtab")
    assert isinstance(symtab, SymbolTableSection)
    config = symtab.get_symbol_by_name("config")
    assert config is not None
    assert (config[0]["st_value"], config[0]["st_size"]) == (BTF_MAP_SIZE, BTF_MAP_SIZE)
    btf = section(elf, ".BTF").data()
    assert btf == maps_btf(maps)
    magic, version, _, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
        "<HBBIIIII", btf)
    assert (magic, version, hdr_len, type_off) == (0xEB9F, 1, 24, 0)
    assert str_off == type_len and len(btf) == hdr_len + type_len + str_len
    strings = btf[hdr_len + str_off:].split(b"\0")
    assert {b"int", b"counters", b"config", b".maps", b"max_entries"} <= set(strings)


def bpftool() -> str:
    found = shutil.which("bpftool") or ("/usr/sbin/bpftool" if Path("/usr/sbin/bpftool").exists()
                                        else None)
    if found is None:
        pytest.skip("bpftool is not installed")
    return found


def test_libbpf_reads_the_btf_maps(tmp_path: Path) -> None:
    """libbpf (through bpftool's skeleton generator, which only parses) finds maps and relocs."""
    prog, maps = _program()
    path = tmp_path / "maps.o"
    path.write_bytes(write_elf([ElfProgram("xdp_main", "xdp", link(prog))], maps))
    done = subprocess.run([bpftool(), "-d", "gen", "skeleton", str(path), "name", "t"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    log = done.stderr
    assert "map 'config': found type = 1." in log
    assert "map 'config': found max_entries = 64." in log
    assert "map 'config': found map_flags = 0x1." in log
    assert "map 'counters': found value_size = 8." in log
    assert "found map 1 (config, sec 3, off 40) for insn #3" in log
    dump = subprocess.run([bpftool(), "btf", "dump", "file", str(path)], check=True,
                          capture_output=True, text=True).stdout
    assert "DATASEC '.maps' size=80 vlen=2" in dump
    assert "VAR 'counters' type_id=" in dump


def test_legacy_maps_are_refused_by_libbpf_1(tmp_path: Path) -> None:
    prog, maps = _program()
    path = tmp_path / "legacy.o"
    path.write_bytes(write_elf([ElfProgram("p", "xdp", link(prog))], maps, btf_maps=False))
    done = subprocess.run([bpftool(), "gen", "skeleton", str(path), "name", "t"],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "legacy map definitions" in done.stderr


def test_maps_of_maps_are_refused() -> None:
    inner = MapSpec("inner", MapType.ARRAY, 4, 4, 1)
    outer = MapSpec("outer", MapType.ARRAY_OF_MAPS, 4, 4, 1, inner=inner)
    with pytest.raises(ValueError, match="maps of maps"):
        write_elf([ElfProgram("p", "xdp", link([asm.exit_()]))], [outer])


def test_machine_number() -> None:
    assert EM_BPF == 247 and R_BPF_64_64 == 1
