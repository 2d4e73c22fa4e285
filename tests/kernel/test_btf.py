"""Tests for bpfilter.btf against the running kernel's BTF, cross-checked with bpftool."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from bpfilter.btf import VMLINUX, ArrayInfo, Btf, BtfError, IntInfo, Kind
from bpfilter.codegen import uapi

# --- an independent reading of the same BTF: bpftool's raw dump ------------------------------


@dataclass
class RawType:
    kind: str
    name: str
    attrs: str
    members: list[tuple[str, int, int, int]] = field(default_factory=list)  # name type bits size


_HEAD = re.compile(r"^\[(\d+)\] (\w+) '([^']*)'(.*)$")
_MEMBER = re.compile(r"^\t'([^']*)' type_id=(\d+) bits_offset=(\d+)(?: bitfield_size=(\d+))?")


@pytest.fixture(scope="module")
def raw() -> dict[int, RawType]:
    """bpftool btf dump file vmlinux format raw, parsed into id -> type."""
    if shutil.which("bpftool") is None:
        pytest.skip("bpftool not installed (apt install bpftool)")
    text = subprocess.run(
        ["bpftool", "btf", "dump", "file", VMLINUX, "format", "raw"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    types: dict[int, RawType] = {}
    current: RawType | None = None
    for line in text.splitlines():
        head = _HEAD.match(line)
        if head:
            current = types[int(head[1])] = RawType(head[2], head[3], head[4])
            continue
        member = _MEMBER.match(line)
        if member and current is not None and current.kind in ("STRUCT", "UNION"):
            name, type_id, bits, size = member.groups()
            current.members.append((name, int(type_id), int(bits), int(size or 0)))
    return types


def raw_resolve(raw: dict[int, RawType], type_id: int) -> int:
    while raw[type_id].kind in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
        type_id = int(re.search(r"type_id=(\d+)", raw[type_id].attrs)[1])  # type: ignore[index]
    return type_id


def raw_member(raw: dict[int, RawType], struct_name: str, name: str) -> tuple[int, int]:
    """(bit offset, bitfield size) of ``name`` in ``struct_name``, looking into anonymous
    members, computed from bpftool's text alone."""

    def search(type_id: int) -> tuple[int, int] | None:
        members = raw[type_id].members
        for m_name, _, bits, size in members:
            if m_name == name:
                return bits, size
        for m_name, m_type, bits, _ in members:
            inner = raw_resolve(raw, m_type)
            if m_name == "(anon)" and raw[inner].kind in ("STRUCT", "UNION"):
                found = search(inner)
                if found is not None:
                    return bits + found[0], found[1]
        return None

    ids = [i for i, t in raw.items() if t.name == struct_name and t.kind == "STRUCT"]
    found = search(ids[0])
    assert found is not None
    return found


@pytest.fixture(scope="module")
def btf() -> Btf:
    return Btf.load()


# --- the kernel's BTF ------------------------------------------------------------------------


def test_load_is_cached(btf: Btf) -> None:
    assert Btf.load() is btf
    assert Btf.load(VMLINUX) is btf


@pytest.mark.parametrize("name", ["bpf_dynptr_from_skb", "bpf_dynptr_slice", "bpf_skb_ct_lookup"])
def test_kfunc_ids_match_bpftool(btf: Btf, raw: dict[int, RawType], name: str) -> None:
    expected = [i for i, t in raw.items() if t.kind == "FUNC" and t.name == name]
    assert expected, f"bpftool shows no FUNC {name}"
    assert btf.kfunc_id(name) == expected[0]
    assert btf.type(expected[0]).kind == Kind.FUNC
    assert btf.kind(btf.type(expected[0]).type_id) == Kind.FUNC_PROTO


def test_unknown_names_raise(btf: Btf) -> None:
    with pytest.raises(BtfError, match="no function"):
        btf.kfunc_id("bpf_no_such_kfunc")
    with pytest.raises(BtfError, match="no struct"):
        btf.struct_size("no_such_struct")
    with pytest.raises(BtfError, match="no member 'nope'"):
        btf.member_offset("sk_buff", "nope")
    with pytest.raises(BtfError, match="non-struct"):
        btf.member_offset("bpf_nf_ctx", "skb.len")  # a pointer is not followed
    with pytest.raises(BtfError):
        btf.type(btf.type_count)


@pytest.mark.parametrize(
    ("struct_name", "member"),
    [("bpf_nf_ctx", "skb"), ("sk_buff", "_nfct"), ("nf_hook_state", "hook"),
     ("nf_hook_state", "pf"), ("sk_buff", "protocol"), ("sk_buff", "len"), ("sk_buff", "dev")],
)  # fmt: skip
def test_member_offsets_match_bpftool(
    btf: Btf, raw: dict[int, RawType], struct_name: str, member: str
) -> None:
    bits, size = raw_member(raw, struct_name, member)
    loc = btf.member(struct_name, member)
    assert (loc.bit_offset, loc.bitfield_size) == (bits, size)
    assert btf.member_offset(struct_name, member) * 8 == bits


def test_known_offsets(btf: Btf) -> None:
    assert btf.member_offset("bpf_nf_ctx", "skb") == 8
    assert btf.member_offset("nf_hook_state", "hook") == 0
    assert btf.member_offset("nf_hook_state", "pf") == 1
    assert btf.struct_size("nf_hook_state") == 48
    assert btf.struct_size("bpf_nf_ctx") == 16
    # Dotted paths through named and anonymous struct/union members of union bpf_attr.
    assert btf.member_offset("bpf_attr", "link_create.netfilter.priority") == 24
    assert btf.member_offset("bpf_attr", "link_create.tcx.expected_revision") == 24
    assert btf.member_offset("bpf_attr", "test.ctx_in") == 48
    assert btf.member_offset("bpf_attr", "log_true_size") == 140


def test_bitfield_reports_bits(btf: Btf, raw: dict[int, RawType]) -> None:
    bits, size = raw_member(raw, "sk_buff", "pkt_type")
    loc = btf.member("sk_buff", "pkt_type")
    assert size > 0 and (loc.bit_offset, loc.bitfield_size) == (bits, size)
    if bits % 8:
        with pytest.raises(BtfError, match="byte boundary"):
            _ = loc.offset
    else:
        assert loc.offset == bits // 8


def test_struct_size_matches_bpftool(btf: Btf, raw: dict[int, RawType]) -> None:
    for name in ("sk_buff", "nf_conn", "bpf_prog_info", "__sk_buff"):
        (attrs,) = [t.attrs for t in raw.values() if t.kind == "STRUCT" and t.name == name]
        assert f"size={btf.struct_size(name)} " in attrs + " "


def test_every_type_decodes_like_bpftool(btf: Btf, raw: dict[int, RawType]) -> None:
    assert btf.type_count - 1 == max(raw)
    kinds_seen = set()
    for type_id, expected in raw.items():
        t = btf.type(type_id)
        kinds_seen.add(t.kind)
        assert (t.kind.name, t.name or "(anon)") == (expected.kind, expected.name), type_id
        if t.kind in (Kind.STRUCT, Kind.UNION):
            ours = [
                (m.name or "(anon)", m.type_id, m.bit_offset, m.bitfield_size) for m in t.members
            ]
            assert ours == expected.members, type_id
    # vmlinux uses nearly every kind; the rest are covered by the synthetic blob below.
    assert {Kind.INT, Kind.STRUCT, Kind.UNION, Kind.FUNC, Kind.FUNC_PROTO, Kind.ENUM} <= kinds_seen


@pytest.mark.parametrize(
    ("enum_name", "prefix", "ours"),
    [
        ("bpf_cmd", "BPF_", uapi.Cmd),
        ("bpf_map_type", "BPF_MAP_TYPE_", uapi.MapType),
        ("bpf_prog_type", "BPF_PROG_TYPE_", uapi.ProgType),
        ("bpf_attach_type", "BPF_", uapi.AttachType),
        ("bpf_link_type", "BPF_LINK_TYPE_", uapi.LinkType),
        ("nf_inet_hooks", "NF_INET_", uapi.NfHook),
        ("xdp_action", "XDP_", uapi.XdpAction),
    ],
)
def test_uapi_enums_agree_with_kernel(
    btf: Btf, enum_name: str, prefix: str, ours: type[uapi.enum.IntEnum]
) -> None:
    """codegen/uapi.py's numbers are the running kernel's (decoded from its BTF enums)."""
    (type_id,) = btf.find(enum_name, Kind.ENUM)
    kernel = {e.name.removeprefix(prefix): e.value for e in btf.type(type_id).enumerators}
    for member in ours:
        assert kernel.get(member.name) == member.value, member


# --- a synthetic blob with every kind ---------------------------------------------------------


def string_table(names: list[str]) -> tuple[bytes, dict[str, int]]:
    """A BTF string section holding ``names`` and each name's offset in it."""
    table, offsets = b"\0", {}
    for name in names:
        offsets[name] = len(table)
        table += name.encode() + b"\0"
    return table, offsets


def build_btf(types: Sequence[tuple[int, int, int, int, bytes]], strings: bytes) -> bytes:
    """Raw BTF from (name offset, kind, vlen | kind_flag << 31, size/type, kind-specific data)."""
    body = b"".join(
        struct.pack("<III", name, kind << 24 | low, size_or_type) + extra
        for name, kind, low, size_or_type, extra in types
    )
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(body), len(body), len(strings))
    return header + body + strings


def test_synthetic_blob_covers_every_kind() -> None:
    names = ["int", "s", "a", "bf", "u", "x", "e", "NEG", "e64", "BIG", "f", "p", "v", ".data",
             "fwd", "td", "tag", "float"]  # fmt: skip
    strings, n = string_table(names)
    kf = 1 << 31
    types = [
        (n["int"], Kind.INT, 0, 4, struct.pack("<I", 1 << 24 | 32)),  # 1: signed 32-bit int
        (0, Kind.PTR, 0, 1, b""),  # 2
        (0, Kind.ARRAY, 0, 0, struct.pack("<III", 1, 1, 4)),  # 3: int[4]
        # 4: struct s { int a; int bf:3 (at bit 35); union { int x; }; } with kind_flag
        (n["s"], Kind.STRUCT, kf | 3, 12,
         struct.pack("<III", n["a"], 1, 0) + struct.pack("<III", n["bf"], 1, 3 << 24 | 35)
         + struct.pack("<III", 0, 5, 64)),
        (0, Kind.UNION, 1, 4, struct.pack("<III", n["x"], 1, 0)),  # 5: anonymous union
        (n["e"], Kind.ENUM, kf | 1, 4, struct.pack("<Ii", n["NEG"], -3)),  # 6: signed enum
        (n["e64"], Kind.ENUM64, 1, 8, struct.pack("<III", n["BIG"], 1, 2)),  # 7
        (0, Kind.FUNC_PROTO, 1, 1, struct.pack("<II", n["p"], 2)),  # 8: int (*)(void *p)
        (n["f"], Kind.FUNC, 1, 8, b""),  # 9: global linkage in vlen
        (n["v"], Kind.VAR, 0, 1, struct.pack("<I", 1)),  # 10
        (n[".data"], Kind.DATASEC, 1, 4, struct.pack("<III", 10, 0, 4)),  # 11
        (n["fwd"], Kind.FWD, 0, 0, b""),  # 12
        (n["td"], Kind.TYPEDEF, 0, 4, b""),  # 13
        (0, Kind.VOLATILE, 0, 13, b""),  # 14
        (0, Kind.CONST, 0, 14, b""),  # 15
        (0, Kind.RESTRICT, 0, 2, b""),  # 16
        (n["tag"], Kind.DECL_TAG, 0, 4, struct.pack("<i", 1)),  # 17
        (n["tag"], Kind.TYPE_TAG, 0, 1, b""),  # 18
        (n["float"], Kind.FLOAT, 0, 8, b""),  # 19
    ]  # fmt: skip
    btf = Btf(build_btf(types, strings))
    assert btf.type_count == 20
    assert [btf.kind(i) for i in range(1, 20)] == [Kind(k) for _, k, *_ in types]
    assert btf.type(1).int_info == IntInfo(encoding=1, bit_offset=0, bits=32)
    assert btf.type(3).array == ArrayInfo(elem_type=1, index_type=1, nelems=4)
    assert btf.size_of(3) == 16 and btf.size_of(2) == 8 and btf.size_of(15) == 12
    assert btf.struct_size("s") == 12
    assert btf.member("s", "bf").bit_offset == 35 and btf.member("s", "bf").bitfield_size == 3
    assert btf.member_offset("s", "x") == 8  # found inside the anonymous union
    assert btf.type(6).enumerators[0].value == -3
    assert btf.type(7).enumerators[0].value == 2 << 32 | 1
    assert btf.type(8).params[0].name == "p" and btf.type(9).linkage == 1
    assert btf.type(10).linkage == 1 and btf.type(11).secinfo[0].size == 4
    assert btf.type(17).component_idx == 1 and btf.type(19).size == 8
    assert btf.resolve(15) == 4 and btf.find("tag") == [17, 18]
    assert btf.kfunc_id("f") == 9
    with pytest.raises(BtfError):
        btf.kfunc_id("s")
    with pytest.raises(BtfError, match="no size"):
        _ = btf.type(2).size


def test_malformed_blobs_are_refused() -> None:
    strings, n = string_table(["int"])
    good = build_btf([(n["int"], Kind.INT, 0, 4, struct.pack("<I", 32))], strings)
    with pytest.raises(BtfError, match="magic"):
        Btf(b"\xeb\x9f" + good[2:])
    with pytest.raises(BtfError):
        Btf(good[:10])
    with pytest.raises(BtfError, match="unknown BTF kind"):
        Btf(build_btf([(n["int"], 25, 0, 4, b"")], strings))
    with pytest.raises(BtfError, match="record boundary"):
        Btf(build_btf([(n["int"], Kind.INT, 0, 4, b"")], strings))  # INT without its 4 bytes
