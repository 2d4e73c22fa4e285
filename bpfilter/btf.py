"""Reader for the kernel's raw BTF: kfunc ids, struct sizes and member offsets by name."""

from __future__ import annotations

import enum
import struct
from array import array
from dataclasses import dataclass
from pathlib import Path

VMLINUX = "/sys/kernel/btf/vmlinux"
BTF_MAGIC = 0xEB9F
_HEADER = struct.Struct(
    "<HBBIIIII"
)  # magic version flags hdr_len type_off type_len str_off str_len
_TYPE = struct.Struct("<III")  # name_off, info, size/type


class BtfError(LookupError):
    """A name or path is not in the BTF, or the BTF itself is malformed."""


class Kind(enum.IntEnum):
    """BTF_KIND_*."""

    UNKN = 0
    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


# Bytes of kind-specific data after the 12-byte btf_type: (fixed, per vlen entry).
_EXTRA: dict[int, tuple[int, int]] = {
    Kind.INT: (4, 0),
    Kind.ARRAY: (12, 0),
    Kind.STRUCT: (0, 12),
    Kind.UNION: (0, 12),
    Kind.ENUM: (0, 8),
    Kind.FUNC_PROTO: (0, 8),
    Kind.VAR: (4, 0),
    Kind.DATASEC: (0, 12),
    Kind.DECL_TAG: (4, 0),
    Kind.ENUM64: (0, 12),
}
_SIZED = frozenset(
    {Kind.INT, Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.DATASEC, Kind.FLOAT, Kind.ENUM64}
)
# Kinds that only qualify or rename another type.
_ALIASES = frozenset(
    {Kind.TYPEDEF, Kind.VOLATILE, Kind.CONST, Kind.RESTRICT, Kind.TYPE_TAG, Kind.DECL_TAG}
)


@dataclass(frozen=True, slots=True)
class Member:
    """A struct or union member; anonymous members have the name ''."""

    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int = 0  # 0: not a bitfield


@dataclass(frozen=True, slots=True)
class Param:
    """A FUNC_PROTO parameter (type_id 0 with no name: the variadic '...')."""

    name: str
    type_id: int


@dataclass(frozen=True, slots=True)
class Enumerator:
    name: str
    value: int


@dataclass(frozen=True, slots=True)
class ArrayInfo:
    elem_type: int
    index_type: int
    nelems: int


@dataclass(frozen=True, slots=True)
class IntInfo:
    encoding: int  # bit 0 signed, bit 1 char, bit 2 bool
    bit_offset: int
    bits: int


@dataclass(frozen=True, slots=True)
class VarSecinfo:
    type_id: int
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class BtfType:
    """One decoded type record. ``size_or_type`` is a size for sized kinds, else a type id."""

    id: int
    kind: Kind
    name: str
    vlen: int
    kind_flag: bool
    size_or_type: int
    members: tuple[Member, ...] = ()  # STRUCT, UNION
    params: tuple[Param, ...] = ()  # FUNC_PROTO
    enumerators: tuple[Enumerator, ...] = ()  # ENUM, ENUM64
    array: ArrayInfo | None = None  # ARRAY
    int_info: IntInfo | None = None  # INT
    linkage: int = 0  # FUNC (from vlen), VAR
    secinfo: tuple[VarSecinfo, ...] = ()  # DATASEC
    component_idx: int = -1  # DECL_TAG

    @property
    def size(self) -> int:
        if self.kind not in _SIZED:
            raise BtfError(f"BTF type {self.id} ({self.kind.name}) has no size of its own")
        return self.size_or_type

    @property
    def type_id(self) -> int:
        if self.kind in _SIZED:
            raise BtfError(f"BTF type {self.id} ({self.kind.name}) refers to no type")
        return self.size_or_type


@dataclass(frozen=True, slots=True)
class MemberLocation:
    """Where a member (found through a dotted path) lives inside the outer struct."""

    bit_offset: int
    bitfield_size: int
    type_id: int

    @property
    def offset(self) -> int:
        """The byte offset; an error for a bitfield that does not start on a byte."""
        if self.bit_offset % 8:
            raise BtfError(f"member starts at bit {self.bit_offset}, not on a byte boundary")
        return self.bit_offset // 8


_cache: dict[str, Btf] = {}


class Btf:
    """Raw BTF (kernel or module). Types are decoded on demand; names are indexed on first use."""

    def __init__(self, data: bytes) -> None:
        if len(data) < _HEADER.size:
            raise BtfError("BTF data shorter than its header")
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(
            data
        )
        if magic != BTF_MAGIC:
            raise BtfError(f"bad BTF magic {magic:#x} (big-endian BTF is not supported)")
        if version != 1:
            raise BtfError(f"unsupported BTF version {version}")
        self._data = data
        self._types_start = hdr_len + type_off
        self._types_end = self._types_start + type_len
        self._strings = data[hdr_len + str_off : hdr_len + str_off + str_len]
        if self._types_end > len(data) or len(self._strings) != str_len:
            raise BtfError("BTF sections run past the end of the data")
        # _offsets[i] is where type id i starts; id 0 is void and has no record.
        self._offsets = array("I", [0])
        self._name_offs = array("I", [0])
        self._scan()
        self._by_name: dict[str, list[int]] | None = None
        self._decoded: dict[int, BtfType] = {}

    @classmethod
    def load(cls, path: str = VMLINUX) -> Btf:
        """Read and index raw BTF from ``path``; cached per path for the process."""
        btf = _cache.get(path)
        if btf is None:
            btf = _cache[path] = cls(Path(path).read_bytes())
        return btf

    def _scan(self) -> None:
        """One pass over the type section recording where each record starts."""
        data, pos, end = self._data, self._types_start, self._types_end
        unpack = _TYPE.unpack_from
        extra = _EXTRA
        offsets, name_offs = self._offsets, self._name_offs
        while pos < end:
            if pos + 12 > end:
                raise BtfError(f"truncated BTF type record at type {len(offsets)}")
            name_off, info, _ = unpack(data, pos)
            kind = (info >> 24) & 0x1F
            offsets.append(pos)
            name_offs.append(name_off)
            fixed_per = extra.get(kind)
            pos += 12
            if fixed_per is not None:
                pos += fixed_per[0] + fixed_per[1] * (info & 0xFFFF)
            elif kind > Kind.ENUM64:
                raise BtfError(f"unknown BTF kind {kind} at type {len(offsets) - 1}")
        if pos != end:
            raise BtfError("BTF type section does not end on a record boundary")

    @property
    def type_count(self) -> int:
        """Number of type ids, void (0) included."""
        return len(self._offsets)

    def string(self, offset: int) -> str:
        end = self._strings.find(b"\0", offset)
        if end < 0:
            raise BtfError(f"BTF string offset {offset} out of range")
        return self._strings[offset:end].decode()

    def _index(self) -> dict[str, list[int]]:
        if self._by_name is None:
            by_off: dict[int, list[int]] = {}
            for type_id, off in enumerate(self._name_offs):
                if off:
                    by_off.setdefault(off, []).append(type_id)
            self._by_name = {self.string(off): ids for off, ids in by_off.items()}
        return self._by_name

    def find(self, name: str, kind: Kind | None = None) -> list[int]:
        """Ids of every type named ``name`` (of ``kind`` when given)."""
        ids = self._index().get(name, [])
        if kind is None:
            return list(ids)
        return [i for i in ids if self.kind(i) == kind]

    def kind(self, type_id: int) -> Kind:
        if type_id == 0:
            return Kind.UNKN
        info = _TYPE.unpack_from(self._data, self._offsets[type_id])[1]
        return Kind((info >> 24) & 0x1F)

    def type(self, type_id: int) -> BtfType:
        """Decode the record of ``type_id``."""
        if not 0 < type_id < len(self._offsets):
            raise BtfError(f"BTF type id {type_id} out of range")
        cached = self._decoded.get(type_id)
        if cached is not None:
            return cached
        t = self._decode(type_id)
        self._decoded[type_id] = t
        return t

    def _decode(self, type_id: int) -> BtfType:
        data, pos = self._data, self._offsets[type_id]
        name_off, info, size_or_type = _TYPE.unpack_from(data, pos)
        kind = Kind((info >> 24) & 0x1F)
        vlen = info & 0xFFFF
        kind_flag = bool(info >> 31)
        pos += 12
        common = {
            "id": type_id,
            "kind": kind,
            "name": self.string(name_off),
            "vlen": vlen,
            "kind_flag": kind_flag,
            "size_or_type": size_or_type,
        }
        if kind == Kind.INT:
            (word,) = struct.unpack_from("<I", data, pos)
            return BtfType(
                **common, int_info=IntInfo(word >> 24 & 0xF, word >> 16 & 0xFF, word & 0xFF)
            )
        if kind == Kind.ARRAY:
            return BtfType(**common, array=ArrayInfo(*struct.unpack_from("<III", data, pos)))
        if kind in (Kind.STRUCT, Kind.UNION):
            members = []
            for name, mtype, moff in struct.iter_unpack("<III", data[pos : pos + 12 * vlen]):
                # With kind_flag the offset packs (bitfield size << 24) | bit offset.
                bits, size = (moff & 0xFFFFFF, moff >> 24) if kind_flag else (moff, 0)
                members.append(Member(self.string(name), mtype, bits, size))
            return BtfType(**common, members=tuple(members))
        if kind == Kind.ENUM:
            fmt = "<Ii" if kind_flag else "<II"  # kind_flag: signed values
            values = struct.iter_unpack(fmt, data[pos : pos + 8 * vlen])
            return BtfType(
                **common, enumerators=tuple(Enumerator(self.string(n), v) for n, v in values)
            )
        if kind == Kind.ENUM64:
            enums = []
            for n, lo, hi in struct.iter_unpack("<III", data[pos : pos + 12 * vlen]):
                value = hi << 32 | lo
                if kind_flag and value >= 1 << 63:
                    value -= 1 << 64
                enums.append(Enumerator(self.string(n), value))
            return BtfType(**common, enumerators=tuple(enums))
        if kind == Kind.FUNC_PROTO:
            params = struct.iter_unpack("<II", data[pos : pos + 8 * vlen])
            return BtfType(**common, params=tuple(Param(self.string(n), t) for n, t in params))
        if kind == Kind.FUNC:
            return BtfType(**common, linkage=vlen)
        if kind == Kind.VAR:
            return BtfType(**common, linkage=struct.unpack_from("<I", data, pos)[0])
        if kind == Kind.DATASEC:
            infos = struct.iter_unpack("<III", data[pos : pos + 12 * vlen])
            return BtfType(**common, secinfo=tuple(VarSecinfo(*i) for i in infos))
        if kind == Kind.DECL_TAG:
            return BtfType(**common, component_idx=struct.unpack_from("<i", data, pos)[0])
        return BtfType(**common)

    # --- queries used by the code generator ---------------------------------------------------

    def resolve(self, type_id: int) -> int:
        """Follow typedefs and qualifiers to the underlying type id."""
        seen = 0
        while type_id and self.kind(type_id) in _ALIASES:
            type_id = self.type(type_id).type_id
            seen += 1
            if seen > 64:
                raise BtfError(f"BTF type {type_id}: qualifier chain too long")
        return type_id

    def size_of(self, type_id: int) -> int:
        """Size in bytes of any sized type (pointers are 8 bytes)."""
        t = self.type(self.resolve(type_id))
        if t.kind == Kind.PTR:
            return 8
        if t.kind == Kind.ARRAY:
            assert t.array is not None
            return t.array.nelems * self.size_of(t.array.elem_type)
        return t.size

    def struct_id(self, name: str) -> int:
        """Id of the struct (or union) named ``name``; forward declarations do not count."""
        for type_id in self.find(name):
            if self.kind(type_id) in (Kind.STRUCT, Kind.UNION):
                return type_id
        raise BtfError(f"no struct or union {name!r} in BTF")

    def struct_size(self, name: str) -> int:
        """sizeof(struct name)."""
        return self.type(self.struct_id(name)).size

    def kfunc_id(self, name: str) -> int:
        """BTF id of the FUNC record ``name`` (what a kfunc call instruction carries in imm)."""
        ids = self.find(name, Kind.FUNC)
        if not ids:
            raise BtfError(f"no function {name!r} in BTF (is the kfunc built into this kernel?)")
        return ids[0]

    def member(self, struct: str | int, path: str) -> MemberLocation:
        """Locate ``path`` (dotted, e.g. ``"headers.protocol"`` or just ``"protocol"``) in a
        struct given by name or type id; members of anonymous structs and unions are found as
        if they were direct members (the first match wins)."""
        type_id = self.struct_id(struct) if isinstance(struct, str) else self.resolve(struct)
        struct_name = struct if isinstance(struct, str) else self.type(type_id).name
        bit_offset = 0
        loc: MemberLocation | None = None
        for part in path.split("."):
            if loc is not None:
                type_id = self.resolve(loc.type_id)
                if self.kind(type_id) not in (Kind.STRUCT, Kind.UNION):
                    raise BtfError(f"{struct_name}.{path}: {part!r} follows a non-struct member")
            found = self._find_member(type_id, part)
            if found is None:
                raise BtfError(f"{struct_name}.{path}: no member {part!r}")
            bits, member = found
            bit_offset += bits
            loc = MemberLocation(bit_offset, member.bitfield_size, member.type_id)
        if loc is None:
            raise BtfError(f"{struct_name}: empty member path")
        return loc

    def _find_member(self, type_id: int, name: str) -> tuple[int, Member] | None:
        """(bit offset relative to ``type_id``, member), searching anonymous members too."""
        for m in self.type(type_id).members:
            if m.name == name:
                return m.bit_offset, m
        for m in self.type(type_id).members:
            inner = self.resolve(m.type_id)
            if not m.name and self.kind(inner) in (Kind.STRUCT, Kind.UNION):
                found = self._find_member(inner, name)
                if found is not None:
                    return m.bit_offset + found[0], found[1]
        return None

    def member_offset(self, struct: str | int, path: str) -> int:
        """Byte offset of ``path`` inside ``struct`` (see member() for bitfields)."""
        return self.member(struct, path).offset
