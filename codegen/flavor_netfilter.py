"""The netfilter hook flavor: prologue that gathers packet facts on the stack, verdicts, epilogue.

Every generated function sees the packet through one *meta area* on the main program's stack
(register R7 points at it): the IP header, the first bytes of the transport header, device
names, mark, conntrack state and a few derived numbers. The prologue fills it once per packet
with ``bpf_dynptr_from_skb`` + ``bpf_dynptr_read`` and loads from the kernel structures
``bpf_nf_ctx``, ``nf_hook_state``, ``net_device``, ``sk_buff`` (and ``nf_conn``); rule code
then only reads the meta area, so chains can be global BPF functions taking its pointer (the
BTF declaring them comes from ``func_btf``).

Kernel struct offsets are not known to the pure code generator: loads of kernel fields are
emitted as ``FieldLoad`` items and resolved against a ``KernelLayout`` (built from BTF by the
loader) just before linking.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from bpfilter.codegen import asm
from bpfilter.codegen.asm import Label
from bpfilter.codegen.helpers import BpfFunc
from bpfilter.codegen.insn import FP, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, Insn, Reg
from bpfilter.codegen.opcodes import Size
from bpfilter.codegen.uapi import (
    IFNAMSIZ,
    IP_CT_IS_REPLY,
    IPS_DST_NAT,
    IPS_SRC_NAT,
    NFCT_INFOMASK,
    PKT_TYPE_MAX,
    IpCtInfo,
    NfVerdict,
)

# Byte-order note: rule code compares raw network-order bytes loaded from the stack with
# constants pre-swapped for a little-endian machine (x86-64, arm64), and byte-swaps with
# ``to_be`` where an ordered comparison (ranges) needs the host value.

# --- meta area: offsets from R7 ------------------------------------------------------------
L3 = 0  # IP header: 20 bytes (IPv4, options not copied) or 40 bytes (IPv6)
L4 = 40  # first L4_BYTES bytes of the transport header (zero past the end of the packet)
L4_BYTES = 20  # a TCP header without options; UDP/ICMP/ICMPv6 need 8, ports need 4
IN_NAME = 64  # state->in->name, zero when there is no input device
OUT_NAME = IN_NAME + IFNAMSIZ
MARK = 96  # u32 skb->mark
CT_STATE = 100  # u32 xt_conntrack state bit: INVALID 1, EST 2, RELATED 4, NEW 8, UNTRACKED 64
SKB_LEN = 104  # u32 skb->len: what iptables' byte counters add
L4_LEN = 108  # u32 bytes of the transport header present, at most L4_BYTES
PROTO = 112  # u32 IPv4 protocol / IPv6 upper-layer protocol after the extension headers
FRAG = 116  # u32 fragment offset: IPv4 in 8-byte units (IP_OFFSET), IPv6 in bytes (& ~7)
PROTO_ERROR = 120  # u32 IPv6: extension header walk failed; a rule with -p hot-drops
IP_LEN = 124  # u32 xt_length's length: IPv4 tot_len, IPv6 payload_len + 40
PKT_TYPE = 128  # u32 skb->pkt_type (PacketType)
META_SIZE = 136

# --- the main frame: meta area, dynptr, scratch -----------------------------------------------
META = -META_SIZE  # R7 = FP + META
DYNPTR = META - 16  # struct bpf_dynptr (16 bytes, 8-aligned)
SCRATCH = DYNPTR - 8  # IPv6 extension header bytes; nf_conn.status

IPV4_HEADER = 20
IPV6_HEADER = 40
IPV6_EXT_MAX = 8  # extension headers walked; more are treated as unparsable (hot drop)

# Upper-layer protocol numbers the code generator needs (IANA, as in linux/in.h, in6.h).
NEXTHDR_HOP = 0
NEXTHDR_ROUTING = 43
NEXTHDR_FRAGMENT = 44
NEXTHDR_AUTH = 51
NEXTHDR_NONE = 59
NEXTHDR_DEST = 60
IPV6_EXT = (NEXTHDR_HOP, NEXTHDR_ROUTING, NEXTHDR_FRAGMENT, NEXTHDR_AUTH, NEXTHDR_DEST)

CT_INVALID = 1
CT_UNTRACKED = 64
CT_SNAT = 256
CT_DNAT = 512

# Return codes of user-chain subprograms: the two verdicts, or "continue in the caller".
RET_DROP = NfVerdict.DROP
RET_ACCEPT = NfVerdict.ACCEPT
RET_CONTINUE = 2
RET_RETURN = 3  # from a part of a chain: RETURN (leave the chain; in a built-in chain: policy)


class KField(enum.Enum):
    """A kernel struct member the generated code reads; offsets come from BTF."""

    CTX_STATE = ("bpf_nf_ctx", "state")
    CTX_SKB = ("bpf_nf_ctx", "skb")
    STATE_IN = ("nf_hook_state", "in")
    STATE_OUT = ("nf_hook_state", "out")
    DEV_NAME = ("net_device", "name")
    SKB_MARK = ("sk_buff", "mark")
    SKB_NFCT = ("sk_buff", "_nfct")
    SKB_LEN = ("sk_buff", "len")
    CT_STATUS = ("nf_conn", "status")
    SKB_PKT_TYPE = ("sk_buff", "pkt_type")  # a bitfield starting on a byte (low bits)

    @property
    def struct(self) -> str:
        return self.value[0]

    @property
    def member(self) -> str:
        return self.value[1]


@dataclass(frozen=True, slots=True)
class FieldLoad:
    """``dst = *(size *)(src + offsetof(field) + extra)``, resolved by a KernelLayout."""

    size: Size
    dst: Reg
    src: Reg
    field: KField
    extra: int = 0
    comment: str | None = None


@dataclass(frozen=True, slots=True)
class FieldAddress:
    """``dst += offsetof(field)``: the address of a member of a struct at ``dst``."""

    dst: Reg
    field: KField


Item: TypeAlias = Insn | Label | FieldLoad | FieldAddress


@dataclass(frozen=True, slots=True)
class KernelLayout:
    """Byte offsets of every KField in the running kernel."""

    offsets: Mapping[KField, int]

    def __post_init__(self) -> None:
        missing = [f.name for f in KField if f not in self.offsets]
        if missing:
            raise ValueError(f"kernel layout lacks {', '.join(missing)}")

    def resolve(self, items: Iterable[Item]) -> list[Insn | Label]:
        """Replace every FieldLoad by the load instruction at its real offset."""
        out: list[Insn | Label] = []
        for it in items:
            if isinstance(it, FieldLoad):
                off = self.offsets[it.field] + it.extra
                out.append(asm.ldx(it.size, it.dst, it.src, off, comment=it.comment))
            elif isinstance(it, FieldAddress):
                out.append(asm.add64(it.dst, self.offsets[it.field]))
            else:
                out.append(it)
        return out


@dataclass(frozen=True, slots=True)
class Needs:
    """What the prologue must gather because some rule looks at it."""

    devices: bool = False
    mark: bool = False
    conntrack: bool = False
    conntrack_nat: bool = False  # the SNAT/DNAT state bits: nf_conn.status is read too
    pkt_type: bool = False

    def __or__(self, other: Needs) -> Needs:
        return Needs(self.devices or other.devices, self.mark or other.mark,
                     self.conntrack or other.conntrack,
                     self.conntrack_nat or other.conntrack_nat,
                     self.pkt_type or other.pkt_type)


def _dynptr_read(dst: Reg, dst_off: int, size: Reg | int, offset: list[Item]) -> list[Item]:
    """``r0 = bpf_dynptr_read(dst + dst_off, size, &dynptr, R4, 0)``; ``offset`` sets R4."""
    return [
        asm.mov64(R1, dst),
        asm.add64(R1, dst_off),
        asm.mov64(R2, size),
        asm.mov64(R3, FP),
        asm.add64(R3, DYNPTR),
        *offset,
        asm.mov64(R5, 0),
        asm.call_helper(BpfFunc.dynptr_read),
    ]


def _read(dst_off: int, size: Reg | int, offset: Reg | int) -> list[Item]:
    """``r0 = bpf_dynptr_read(R7 + dst_off, size, &dynptr, offset, 0)``."""
    return _dynptr_read(R7, dst_off, size, [asm.mov64(R4, offset)])


def _device(slot: int, which: KField) -> list[Item]:
    skip = f"prologue:{which.name}:none"
    return [
        FieldLoad(Size.DW, R1, R6, KField.CTX_STATE, comment="r1 = ctx->state"),
        FieldLoad(Size.DW, R1, R1, which),
        asm.jmp("jeq", R1, 0, skip),
        FieldLoad(Size.DW, R2, R1, KField.DEV_NAME, 0),
        asm.stx(Size.DW, R7, slot, R2),
        FieldLoad(Size.DW, R2, R1, KField.DEV_NAME, 8),
        asm.stx(Size.DW, R7, slot + 8, R2),
        Label(skip),
    ]


def _conntrack(nat: bool) -> list[Item]:
    # nf_ct_get(): _nfct is the nf_conn pointer with ctinfo in the low bits. No conntrack:
    # INVALID, unless ctinfo says UNTRACKED; otherwise xt_conntrack's
    # XT_CONNTRACK_STATE_BIT(ctinfo) = 1 << (ctinfo % IP_CT_IS_REPLY + 1), plus the SNAT and
    # DNAT bits from nf_conn.status (read with bpf_probe_read_kernel: the pointer is a plain
    # number to the verifier).
    nat_bits: list[Item] = [] if not nat else [
        asm.stx(Size.W, R7, CT_STATE, R1),
        asm.mov64(R3, R9),
        FieldAddress(R3, KField.CT_STATUS),
        asm.mov64(R1, FP),
        asm.add64(R1, SCRATCH),
        asm.mov64(R2, 8),
        asm.call_helper(BpfFunc.probe_read_kernel, comment="scratch = ct->status"),
        asm.ldx(Size.W, R1, R7, CT_STATE),
        asm.jmp("jne", R0, 0, "prologue:ct:nat_done"),
        asm.ldx(Size.DW, R2, FP, SCRATCH),
        asm.st(Size.DW, FP, SCRATCH, 0),
        asm.jmp("jset", R2, IPS_SRC_NAT, "prologue:ct:snat"),
        asm.ja("prologue:ct:dnat"),
        Label("prologue:ct:snat"),
        asm.or64(R1, CT_SNAT),
        Label("prologue:ct:dnat"),
        asm.jmp("jset", R2, IPS_DST_NAT, "prologue:ct:dnat_set"),
        asm.ja("prologue:ct:nat_done"),
        Label("prologue:ct:dnat_set"),
        asm.or64(R1, CT_DNAT),
        Label("prologue:ct:nat_done"),
    ]
    return [
        FieldLoad(Size.DW, R1, R8, KField.SKB_NFCT, comment="r1 = skb->_nfct"),
        asm.mov64(R2, R1),
        asm.and64(R2, NFCT_INFOMASK),
        asm.and64(R1, ~NFCT_INFOMASK),
        asm.jmp("jne", R1, 0, "prologue:ct:tracked"),
        asm.st(Size.W, R7, CT_STATE, CT_INVALID),
        asm.jmp("jne", R2, IpCtInfo.UNTRACKED, "prologue:ct:done"),
        asm.st(Size.W, R7, CT_STATE, CT_UNTRACKED),
        asm.ja("prologue:ct:done"),
        Label("prologue:ct:tracked"),
        asm.mov64(R9, R1, comment="r9 = ct"),
        asm.mod64(R2, IP_CT_IS_REPLY),
        asm.add64(R2, 1),
        asm.mov64(R1, 1),
        asm.lsh64(R1, R2),
        *nat_bits,
        asm.stx(Size.W, R7, CT_STATE, R1),
        Label("prologue:ct:done"),
    ]


def _ipv4_facts() -> list[Item]:
    return [
        *_read(L3, IPV4_HEADER, 0),
        asm.jmp("jne", R0, 0, "prologue:unreadable"),
        asm.ldx(Size.B, R9, R7, L3 + 0, comment="r9 = thoff = ihl * 4"),
        asm.and64(R9, 0x0F),
        asm.lsh64(R9, 2),
        asm.ldx(Size.B, R1, R7, L3 + 9),
        asm.stx(Size.W, R7, PROTO, R1),
        asm.ldx(Size.H, R1, R7, L3 + 6),
        asm.to_be(R1, 16),
        asm.and64(R1, 0x1FFF, comment="IP_OFFSET"),
        asm.stx(Size.W, R7, FRAG, R1),
        asm.ldx(Size.H, R1, R7, L3 + 2),
        asm.to_be(R1, 16),
        asm.stx(Size.W, R7, IP_LEN, R1),
    ]


def _ipv6_facts() -> list[Item]:
    # ipv6_find_hdr(skb, &thoff, -1, &fragoff, NULL) as ip6_packet_match calls it, unrolled:
    # R8 = next header, R9 = offset of the header it describes.
    out: list[Item] = [
        *_read(L3, IPV6_HEADER, 0),
        asm.jmp("jne", R0, 0, "prologue:unreadable"),
        asm.ldx(Size.H, R1, R7, L3 + 4),
        asm.to_be(R1, 16),
        asm.add64(R1, IPV6_HEADER),
        asm.and64(R1, 0xFFFF, comment="xt_length keeps IPv6 lengths in a u16"),
        asm.stx(Size.W, R7, IP_LEN, R1),
        asm.ldx(Size.B, R8, R7, L3 + 6, comment="r8 = nexthdr"),
        asm.mov64(R9, IPV6_HEADER),
    ]
    for i in range(IPV6_EXT_MAX):
        ext, nxt = f"prologue:ext{i}", f"prologue:ext{i}:next"
        out += [asm.jmp("jeq", R8, n, ext) for n in IPV6_EXT]
        out += [asm.ja("prologue:walked"), Label(ext)]
        # hp = skb_header_pointer(skb, start, 2): next header and length byte
        out += _read_scratch(2, 0)
        out += [
            asm.jmp("jne", R0, 0, "prologue:walk_error"),
            asm.jmp("jne", R8, NEXTHDR_FRAGMENT, f"{ext}:notfrag"),
            *_read_scratch(2, 2),
            asm.jmp("jne", R0, 0, "prologue:walk_error"),
            asm.ldx(Size.H, R1, FP, SCRATCH + 2),
            asm.to_be(R1, 16),
            asm.and64(R1, 0xFFF8),
            asm.mov64(R2, 8, comment="fragment header length"),
            asm.jmp("jeq", R1, 0, nxt),
            # A later fragment: its next header is the answer unless that is another
            # extension header (then ipv6_find_hdr fails with fragoff still 0: hot drop).
            asm.ldx(Size.B, R8, FP, SCRATCH),
            *[asm.jmp("jeq", R8, n, "prologue:walk_error") for n in IPV6_EXT],
            asm.stx(Size.W, R7, FRAG, R1),
            asm.ja("prologue:walked"),
            Label(f"{ext}:notfrag"),
            asm.ldx(Size.B, R2, FP, SCRATCH + 1),
            asm.jmp("jne", R8, NEXTHDR_AUTH, f"{ext}:opt"),
            asm.add64(R2, 2, comment="ipv6_authlen"),
            asm.lsh64(R2, 2),
            asm.ja(nxt),
            Label(f"{ext}:opt"),
            asm.add64(R2, 1, comment="ipv6_optlen"),
            asm.lsh64(R2, 3),
            Label(nxt),
            asm.ldx(Size.B, R8, FP, SCRATCH),
            asm.add64(R9, R2),
        ]
    out += [
        # Still an extension header after IPV6_EXT_MAX of them: treated as unparsable.
        *[asm.jmp("jeq", R8, n, "prologue:walk_error") for n in IPV6_EXT],
        Label("prologue:walked"),
        asm.stx(Size.W, R7, PROTO, R8),
        asm.ja("prologue:l4"),
        Label("prologue:walk_error"),
        asm.st(Size.W, R7, PROTO_ERROR, 1),
        asm.ja("prologue:l4done"),
    ]
    return out


def _read_scratch(size: int, at: int) -> list[Item]:
    """``bpf_dynptr_read(FP + SCRATCH + at, size, &dynptr, R9 + at, 0)``."""
    return _dynptr_read(FP, SCRATCH + at, size, [asm.mov64(R4, R9), asm.add64(R4, at)])


def prologue(family: int, needs: Needs) -> list[Item]:
    """Fill the meta area; afterwards R7 points at it and R6 holds the context."""
    out: list[Item] = [
        asm.mov64(R6, R1, comment="r6 = ctx (struct bpf_nf_ctx *)"),
        asm.mov64(R7, FP),
        asm.add64(R7, META, comment="r7 = meta area"),
        *[asm.st(Size.DW, R7, off, 0) for off in range(0, META_SIZE, 8)],
        asm.st(Size.DW, FP, SCRATCH, 0),
        FieldLoad(Size.DW, R8, R6, KField.CTX_SKB, comment="r8 = ctx->skb"),
        FieldLoad(Size.W, R1, R8, KField.SKB_LEN),
        asm.stx(Size.W, R7, SKB_LEN, R1),
    ]
    if needs.mark:
        out += [FieldLoad(Size.W, R1, R8, KField.SKB_MARK), asm.stx(Size.W, R7, MARK, R1)]
    if needs.pkt_type:
        out += [FieldLoad(Size.B, R1, R8, KField.SKB_PKT_TYPE), asm.and64(R1, PKT_TYPE_MAX),
                asm.stx(Size.W, R7, PKT_TYPE, R1)]
    if needs.conntrack or needs.conntrack_nat:
        out += _conntrack(needs.conntrack_nat)
    if needs.devices:
        out += _device(IN_NAME, KField.STATE_IN) + _device(OUT_NAME, KField.STATE_OUT)
    out += [
        asm.mov64(R1, R8),
        asm.mov64(R2, 0),
        asm.mov64(R3, FP),
        asm.add64(R3, DYNPTR),
        asm.call_kfunc("bpf_dynptr_from_skb", comment="dynptr over the packet, 0 = IP header"),
        asm.jmp("jne", R0, 0, "prologue:unreadable"),
    ]
    out += _ipv4_facts() if family == 4 else _ipv6_facts()
    out += [
        Label("prologue:l4"),
        # L4_LEN = clamp(skb->len - thoff, 0, L4_BYTES); copy that much of the L4 header.
        asm.ldx(Size.W, R2, R7, SKB_LEN),
        asm.sub64(R2, R9),
        asm.jmp("jsle", R2, 0, "prologue:l4done"),
        asm.jmp("jle", R2, L4_BYTES, "prologue:l4read"),
        asm.mov64(R2, L4_BYTES),
        Label("prologue:l4read"),
        asm.mov64(R8, R2),
        asm.mov64(R1, R7),
        asm.add64(R1, L4),
        asm.mov64(R3, FP),
        asm.add64(R3, DYNPTR),
        asm.mov64(R4, R9),
        asm.mov64(R5, 0),
        asm.call_helper(BpfFunc.dynptr_read),
        asm.jmp("jne", R0, 0, "prologue:l4done"),
        asm.stx(Size.W, R7, L4_LEN, R8),
        asm.ja("prologue:l4done"),
        # The IP header is always readable at the netfilter hooks (the stack validated it);
        # should it ever not be, the packet is let through untouched.
        Label("prologue:unreadable"),
        asm.mov64(R0, NfVerdict.ACCEPT),
        asm.exit_(),
        Label("prologue:l4done"),
    ]
    return out


def verdict(value: int, comment: str | None = None) -> list[Item]:
    """Leave the current function with ``value`` (a verdict or RET_CONTINUE)."""
    return [asm.mov64(R0, value, comment=comment), asm.exit_()]


def counter_subprog(label: str, map_name: str) -> list[Item]:
    """``count(r1 = counter index, r2 = meta)``: add one packet and skb->len bytes. A global
    function: the verifier checks it once instead of at every rule that calls it."""
    return [
        Label(label),
        asm.jmp("jeq", R2, 0, f"{label}:out"),  # BTF says the meta pointer may be NULL
        asm.stx(Size.W, FP, -8, R1),
        asm.mov64(R6, R2),
        asm.ld_map_fd(R1, map_name),
        asm.mov64(R2, FP),
        asm.add64(R2, -8),
        asm.call_helper(BpfFunc.map_lookup_elem),
        asm.jmp("jeq", R0, 0, f"{label}:out"),
        asm.mov64(R1, 1),
        asm.atomic_add(Size.DW, R0, 0, R1),
        asm.ldx(Size.W, R1, R6, SKB_LEN),
        asm.atomic_add(Size.DW, R0, 8, R1),
        Label(f"{label}:out"),
        asm.mov64(R0, 0),
        asm.exit_(),
    ]


class FuncKind(enum.Enum):
    """The signatures of the functions a program is made of (declared in its BTF)."""

    MAIN = "main"  # static int main(struct bpf_nf_ctx *ctx)
    GLOBAL = "global"  # global int f(struct bpfilter_meta *meta): verified once, on its own
    COUNT = "count"  # global int count(int index, struct bpfilter_meta *meta)


BTF_MAGIC = 0xEB9F
_BTF_HDR = struct.Struct("<HBBIIIII")
_BTF_TYPE = struct.Struct("<III")  # name_off, info (kind << 24 | vlen), size or type
_BTF_INT, _BTF_PTR, _BTF_ARRAY, _BTF_STRUCT, _BTF_FUNC, _BTF_FUNC_PROTO = 1, 2, 3, 4, 12, 13
_BTF_INT_SIGNED = 1 << 24
_LINKAGE = {FuncKind.MAIN: 0, FuncKind.GLOBAL: 1, FuncKind.COUNT: 1}  # static 0, global 1


def func_btf(funcs: Sequence[tuple[str, FuncKind]]) -> tuple[bytes, list[int]]:
    """A raw BTF blob declaring ``funcs`` (C identifiers) and the meta area type; returns
    it with each function's FUNC type id, for bpf_func_info."""
    strings = bytearray(b"\0")
    types = bytearray()
    count = 0

    def name(text: str) -> int:
        off = len(strings)
        strings.extend(text.encode() + b"\0")
        return off

    def add(name_off: int, kind: int, vlen: int, size_or_type: int, extra: bytes = b"") -> int:
        nonlocal count
        types.extend(_BTF_TYPE.pack(name_off, (kind << 24) | vlen, size_or_type) + extra)
        count += 1
        return count

    t_int = add(name("int"), _BTF_INT, 0, 4, struct.pack("<I", _BTF_INT_SIGNED | 32))
    t_u8 = add(name("unsigned char"), _BTF_INT, 0, 1, struct.pack("<I", 8))
    t_arr = add(0, _BTF_ARRAY, 0, 0, struct.pack("<III", t_u8, t_int, META_SIZE))
    t_meta = add(name("bpfilter_meta"), _BTF_STRUCT, 1, META_SIZE,
                 struct.pack("<III", name("bytes"), t_arr, 0))
    t_meta_ptr = add(0, _BTF_PTR, 0, t_meta)
    t_void_ptr = add(0, _BTF_PTR, 0, 0)
    params = {
        FuncKind.MAIN: [("ctx", t_void_ptr)],
        FuncKind.GLOBAL: [("meta", t_meta_ptr)],
        FuncKind.COUNT: [("index", t_int), ("meta", t_meta_ptr)],
    }
    protos = {}
    for kind, ps in params.items():
        extra = b"".join(struct.pack("<II", name(n), t) for n, t in ps)
        protos[kind] = add(0, _BTF_FUNC_PROTO, len(ps), t_int, extra)
    ids = [add(name(fname), _BTF_FUNC, _LINKAGE[kind], protos[kind]) for fname, kind in funcs]
    header = _BTF_HDR.pack(BTF_MAGIC, 1, 0, _BTF_HDR.size, 0, len(types), len(types),
                           len(strings))
    return header + bytes(types) + bytes(strings), ids


def hook_state_context(hook: int, pf: int, size: int, hook_offset: int = 0,
                       pf_offset: int = 1) -> bytes:
    """The ``struct nf_hook_state`` BPF_PROG_TEST_RUN takes: hook and pf, the rest zero."""
    ctx = bytearray(size)
    ctx[hook_offset] = hook
    ctx[pf_offset] = pf
    return bytes(ctx)
