"""A writer for relocatable ELF64 BPF objects (code sections, license, maps, map relocations)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from bpfilter.codegen.link import Linked
from bpfilter.codegen.spec import MapSpec

EM_BPF = 247
R_BPF_64_64 = 1  # a 64-bit immediate load that should point at the symbol (map fd at load time)

_ET_REL = 1
_SHT_PROGBITS, _SHT_SYMTAB, _SHT_STRTAB, _SHT_REL = 1, 2, 3, 9
_SHF_WRITE, _SHF_ALLOC, _SHF_EXECINSTR, _SHF_INFO_LINK = 0x1, 0x2, 0x4, 0x40
_STB_LOCAL, _STB_GLOBAL = 0, 1
_STT_NOTYPE, _STT_OBJECT, _STT_FUNC, _STT_SECTION = 0, 1, 2, 3
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM = struct.Struct("<IBBHQQ")
_REL = struct.Struct("<QQ")
# struct bpf_map_def (legacy "maps" section): type, key_size, value_size, max_entries, map_flags
MAP_DEF = struct.Struct("<IIIII")
# A BTF-defined map in ".maps" is a struct of five pointers: type, key_size, value_size,
# max_entries, map_flags; each value is the element count of the array the pointer points to.
BTF_MAP_FIELDS = ("type", "key_size", "value_size", "max_entries", "map_flags")
BTF_MAP_SIZE = 8 * len(BTF_MAP_FIELDS)

_BTF_MAGIC = 0xEB9F
_BTF_HDR = struct.Struct("<HBBIIIII")
_BTF_TYPE = struct.Struct("<III")  # name_off, info (kind << 24 | vlen), size or type
_BTF_INT, _BTF_PTR, _BTF_ARRAY, _BTF_STRUCT, _BTF_VAR, _BTF_DATASEC = 1, 2, 3, 4, 14, 15
_BTF_INT_SIGNED = 1 << 24  # encoding bits of the INT's extra word; low byte is the bit count
_BTF_VAR_GLOBAL_ALLOCATED = 1


@dataclass(frozen=True, slots=True)
class ElfProgram:
    """A program to place in the object: its symbol name, section and linked code.

    Link with ``maps=None`` so that map loads stay as relocations against map symbols.
    """

    name: str
    section: str
    linked: Linked


@dataclass(slots=True)
class _Section:
    name: str
    type: int
    flags: int
    data: bytes
    align: int
    link: int = 0
    info: int = 0
    entsize: int = 0


class _StrTab:
    def __init__(self) -> None:
        self.data = bytearray(b"\0")
        self.index: dict[str, int] = {"": 0}

    def add(self, s: str) -> int:
        if s not in self.index:
            self.index[s] = len(self.data)
            self.data += s.encode() + b"\0"
        return self.index[s]


def write_elf(
    programs: Sequence[ElfProgram],
    maps: Sequence[MapSpec] = (),
    *,
    license: str = "GPL",
    btf_maps: bool = True,
) -> bytes:
    """Build a relocatable little-endian ELF64 object for EM_BPF.

    Each distinct ``ElfProgram.section`` becomes one executable section holding its programs
    back to back, with a FUNC symbol per program. Each of ``maps`` gets an OBJECT symbol:
    BTF-defined in ``.maps`` described by a ``.BTF`` section (what libbpf 1.0+ reads), or with
    ``btf_maps=False`` a legacy ``struct bpf_map_def`` in ``maps``. Every map load the programs
    left unresolved gets an R_BPF_64_64 relocation in ``.rel<section>`` against the map symbol.
    """
    map_index = {m.name: i for i, m in enumerate(maps)}
    if len(map_index) != len(maps):
        raise ValueError("duplicate map names")
    if btf_maps and any(m.inner is not None for m in maps):
        raise ValueError("maps of maps are not supported by the ELF writer")
    strtab = _StrTab()
    sections: list[_Section] = [_Section("", 0, 0, b"", 0)]

    # Code sections, in first-appearance order.
    code_sections: dict[str, int] = {}
    code_data: dict[str, bytearray] = {}
    placements: list[tuple[ElfProgram, int]] = []  # program, offset within its section
    for prog in programs:
        if prog.section not in code_sections:
            code_sections[prog.section] = len(sections)
            code_data[prog.section] = bytearray()
            sections.append(_Section(prog.section, _SHT_PROGBITS,
                                     _SHF_ALLOC | _SHF_EXECINSTR, b"", 8))
        placements.append((prog, len(code_data[prog.section])))
        code_data[prog.section] += prog.linked.code
    for name, idx in code_sections.items():
        sections[idx].data = bytes(code_data[name])

    license_idx = len(sections)
    sections.append(_Section("license", _SHT_PROGBITS, _SHF_ALLOC | _SHF_WRITE,
                             license.encode() + b"\0", 1))
    maps_idx = 0
    map_size = BTF_MAP_SIZE if btf_maps else MAP_DEF.size
    if maps and btf_maps:
        maps_idx = len(sections)
        sections.append(_Section(".maps", _SHT_PROGBITS, _SHF_ALLOC | _SHF_WRITE,
                                 bytes(BTF_MAP_SIZE * len(maps)), 8))
        sections.append(_Section(".BTF", _SHT_PROGBITS, 0, maps_btf(maps), 4))
    elif maps:
        maps_idx = len(sections)
        defs = b"".join(MAP_DEF.pack(m.type, m.key_size, m.value_size, m.max_entries, m.flags)
                        for m in maps)
        sections.append(_Section("maps", _SHT_PROGBITS, _SHF_ALLOC | _SHF_WRITE, defs, 4))

    # Symbols: the null symbol and section symbols are local and come first, then globals.
    symbols: list[bytes] = [_SYM.pack(0, 0, 0, 0, 0, 0)]
    for idx in code_sections.values():
        symbols.append(_SYM.pack(0, _info(_STB_LOCAL, _STT_SECTION), 0, idx, 0, 0))
    first_global = len(symbols)
    for prog, offset in placements:
        symbols.append(_SYM.pack(strtab.add(prog.name), _info(_STB_GLOBAL, _STT_FUNC), 0,
                                 code_sections[prog.section], offset, len(prog.linked.code)))
    symbols.append(_SYM.pack(strtab.add("_license"), _info(_STB_GLOBAL, _STT_OBJECT), 0,
                             license_idx, 0, len(license.encode()) + 1))
    map_symbol: dict[str, int] = {}
    for i, m in enumerate(maps):
        map_symbol[m.name] = len(symbols)
        symbols.append(_SYM.pack(strtab.add(m.name), _info(_STB_GLOBAL, _STT_OBJECT), 0,
                                 maps_idx, i * map_size, map_size))

    # Relocations, one REL section per code section that needs them.
    rels: dict[str, bytearray] = {}
    for prog, offset in placements:
        for slot, map_name in prog.linked.relocations:
            sym = map_symbol.get(map_name)
            if sym is None:
                raise ValueError(f"program {prog.name}: insn {slot} loads map {map_name!r}, "
                                 "which is not among the maps given")
            rels.setdefault(prog.section, bytearray())
            rels[prog.section] += _REL.pack(offset + slot * 8, (sym << 32) | R_BPF_64_64)
    symtab_idx = len(sections) + len(rels)
    for name, data in rels.items():
        sections.append(_Section(".rel" + name, _SHT_REL, _SHF_INFO_LINK, bytes(data), 8,
                                 link=symtab_idx, info=code_sections[name], entsize=_REL.size))
    strtab_idx = symtab_idx + 1
    sections.append(_Section(".symtab", _SHT_SYMTAB, 0, b"".join(symbols), 8,
                             link=strtab_idx, info=first_global, entsize=_SYM.size))
    sections.append(_Section(".strtab", _SHT_STRTAB, 0, b"", 1))
    names = [strtab.add(s.name) for s in sections]  # one string table for symbols and sections
    sections[strtab_idx].data = bytes(strtab.data)

    # Layout: header, section contents (aligned), section header table.
    out = bytearray(_EHDR.size)
    offsets = []
    for s in sections:
        if s.align > 1:
            out += b"\0" * (-len(out) % s.align)
        offsets.append(len(out) if s.type else 0)
        out += s.data
    out += b"\0" * (-len(out) % 8)
    shoff = len(out)
    for s, name_off, off in zip(sections, names, offsets, strict=True):
        out += _SHDR.pack(name_off if s.type else 0, s.type, s.flags, 0, off, len(s.data), s.link,
                          s.info, s.align, s.entsize)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # ELFCLASS64, little-endian, version 1
    out[: _EHDR.size] = _EHDR.pack(ident, _ET_REL, EM_BPF, 1, 0, 0, shoff, 0, _EHDR.size, 0, 0,
                                   _SHDR.size, len(sections), strtab_idx)
    return bytes(out)


def _info(bind: int, typ: int) -> int:
    return (bind << 4) | typ


def maps_btf(maps: Sequence[MapSpec]) -> bytes:
    """Raw BTF describing ``maps`` as libbpf's BTF-defined maps (``__uint(field, value)``)."""
    strings = _StrTab()
    types: list[bytes] = []

    def add(name: str, kind: int, vlen: int, size_or_type: int, extra: bytes = b"") -> int:
        types.append(_BTF_TYPE.pack(strings.add(name), (kind << 24) | vlen, size_or_type) + extra)
        return len(types)  # type ids start at 1; 0 is void

    int_id = add("int", _BTF_INT, 0, 4, struct.pack("<I", _BTF_INT_SIGNED | 32))
    pointers: dict[int, int] = {}  # value -> id of "int (*)[value]"

    def uint(value: int) -> int:
        if value not in pointers:
            array = add("", _BTF_ARRAY, 0, 0, struct.pack("<III", int_id, int_id, value))
            pointers[value] = add("", _BTF_PTR, 0, array)
        return pointers[value]

    variables = []
    for m in maps:
        values = (m.type, m.key_size, m.value_size, m.max_entries, m.flags)
        members = b"".join(struct.pack("<III", strings.add(field), uint(value), 64 * i)
                           for i, (field, value) in enumerate(zip(BTF_MAP_FIELDS, values,
                                                                  strict=True)))
        struct_id = add("", _BTF_STRUCT, len(BTF_MAP_FIELDS), BTF_MAP_SIZE, members)
        variables.append(add(m.name, _BTF_VAR, 0, struct_id,
                             struct.pack("<I", _BTF_VAR_GLOBAL_ALLOCATED)))
    secinfo = b"".join(struct.pack("<III", var, i * BTF_MAP_SIZE, BTF_MAP_SIZE)
                       for i, var in enumerate(variables))
    add(".maps", _BTF_DATASEC, len(variables), BTF_MAP_SIZE * len(variables), secinfo)
    type_data = b"".join(types)
    header = _BTF_HDR.pack(_BTF_MAGIC, 1, 0, _BTF_HDR.size, 0, len(type_data), len(type_data),
                           len(strings.data))
    return header + type_data + bytes(strings.data)
