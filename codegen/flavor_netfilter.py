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
from dataclasses import dataclass, fields
from typing import TypeAlias

from bpfilter.codegen import asm
from bpfilter.codegen.asm import Label
from bpfilter.codegen.helpers import BpfFunc
from bpfilter.codegen.insn import FP, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, Insn, Reg
from bpfilter.codegen.opcodes import Size
from bpfilter.codegen.uapi import (
    ARPHRD_ETHER,
    ETH_ALEN,
    ETH_HLEN,
    IFNAMSIZ,
    IP_CT_IS_REPLY,
    IPS_DST_NAT,
    IPS_SRC_NAT,
    NFCT_INFOMASK,
    PKT_TYPE_MAX,
    TCP_NEW_SYN_RECV,
    TCP_TIME_WAIT,
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
LOOKUP_BUFFER = 132  # u32 which copy of the runs' double-buffered maps (codegen/lookup) to use
RT = 320  # IPv6: the first routing header's first 8 bytes (ipv6_rt_hdr + rt0_hdr.reserved)
RT_OFF = RT + 8  # u16 its offset from the IPv6 header
DST_OFF = RT + 10  # u16 the destination options header's offset (Needs.dst)
# u8 each: what ipv6_find_hdr(TYPE) gives for the routing, fragment, hop-by-hop and
# destination options headers: HDR_NONE, HDR_FOUND or HDR_ERROR (Needs.routing, .fragment,
# .hbh, .dst; for the last two HDR_ERROR also when the header is longer than the packet)
RT_STATE = RT + 12
FH_STATE = RT + 13
HBH_STATE = RT + 14
DST_STATE = RT + 15
# Conntrack details, filled only when the packet has a conntrack entry (CT_STATE has one of
# the NEW, ESTABLISHED, RELATED bits), zero otherwise:
CT_DIR = 152  # u32 1 in the reply direction (ctinfo >= IP_CT_IS_REPLY)
CT_STATUS = 156  # u32 nf_conn.status (its low 32 bits: the IPS_* flags)
CT_MARK = 160  # u32 nf_conn.mark
CT_EXPIRES = 164  # u32 jiffies left before the entry times out (nf_ct_expires)
CT_ORIG = 168  # struct nf_conntrack_tuple of the original direction, as in the kernel
CT_REPL = 208  # struct nf_conntrack_tuple of the reply direction (read members: KField.TUPLE_*)
MAC_SRC = 248  # 6 bytes: the Ethernet source address, when MAC_OK
MAC_OK = 256  # u32 1 when xt_mac could read a MAC header (Ethernet device, header in place)
# u64 the sk_buff's address, a plain number to the verifier: targets that need more of the
# packet than the meta area holds (LOG) read it with bpf_probe_read_kernel.
SKB_ADDR = 136
# TCP options as tcp_find_option and tcpmss_mt walk them (Needs.tcp_options), for a TCP header
# that is fully there (L4_LEN = 20); zero otherwise:
TCP_OPT_STATE = 264  # u32 TCP_OPT_NONE, TCP_OPT_OK or TCP_OPT_BAD
TCP_MSS = 268  # u32 0x10000 | the value of the first well-formed MSS option, else 0
TCP_KINDS = 272  # 32 bytes: bit k set when the walk visits an option of kind k
# The same bytes for SCTP packets (a packet is one or the other): the chunks as sctp_mt's
# match_packet walks them (Needs.sctp_chunks), for a first fragment with a full common
# header: SCTP_STATE (SCTP_NONE, SCTP_OK, SCTP_BAD: a chunk header cut short or of length 0
# stopped the walk, where match_packet hot-drops) and SCTP_TYPES, bit t set when a chunk of
# type t comes before the end (or before the bad chunk). SCTP_CHUNK holds the chunk header
# being read during the walk.
SCTP_STATE = TCP_OPT_STATE
SCTP_CHUNK = TCP_MSS
SCTP_TYPES = TCP_KINDS
NET_ADDR = 144  # u64 the hook's struct net (state->net), a plain number (LOG --log-uid)
# The socket xt_owner looks at (Needs.owner): OWNER_NONE, OWNER_NO_FILE or OWNER_FILE, and
# with a file the fsuid and fsgid of its credentials.
OWNER_STATE = 304
OWNER_UID = 308
OWNER_GID = 312
HBH_OFF = 340  # u16 the hop-by-hop header's offset (Needs.hbh)
# u16 bit k set when the k-th --hbh-opts/--dst-opts list of the program (Needs.ext_opts, in
# sorted order) matched the packet's options
OPTS_RESULT = 342
FH = 344  # IPv6: the first fragment header (struct frag_hdr, 8 bytes) (Needs.fragment)
HBH_HDR = 352  # IPv6: the hop-by-hop header's struct ipv6_opt_hdr (2 bytes) (Needs.hbh)
DST_HDR = 354  # the destination options header's (Needs.dst)
# u32 ip6t_ipv6header's walk (Needs.ipv6header): the MASK_* bits of the headers seen, or
# IPV6HDR_FALSE / IPV6HDR_HOTDROP when the match gives that whatever its options.
IPV6HDR = 356
META_SIZE = 360

# --- the main frame: dynptr, scratch, then the meta area ----------------------------------------
# The verifier allows 512 bytes of stack for main and every function it calls, nested: the
# meta area is only as long as the fields the program's rules look at (``meta_size``), so
# that user chains keep room to nest.
DYNPTR = -16  # struct bpf_dynptr (16 bytes, 8-aligned)
SCRATCH = DYNPTR - 8  # IPv6 extension header bytes; nf_conn.status
TCP_OPT_I = SCRATCH - 8  # u64 the TCP option walk's index (Needs.tcp_options only)
FIXED_FRAME = -TCP_OPT_I  # bytes of main's frame above the meta area
BASE_END = LOOKUP_BUFFER + 4  # the fields every program has
TCP_OPT_MAX = 40  # 15 * 4 - sizeof(struct tcphdr)
IPPROTO_TCP = 6
TCP_OPT_NONE = 0  # no options (doff 5)
TCP_OPT_OK = 1
TCP_OPT_BAD = 2  # doff < 5 or the options cut short: tcp_mt and tcpmss_mt hot-drop
TCPOPT_MSS = 2
IPPROTO_SCTP = 132
SCTP_COMMON_HEADER = 12  # struct sctphdr
SCTP_NONE = 0
SCTP_OK = 1
SCTP_BAD = 2
SCTP_WALK_MAX = 1 << 24  # the walk's turns are bounded by SCTP_WALK_MAX / 4 (skb->len is less)
OWNER_NONE = 0  # no full socket, no struct socket, or one of another network namespace
OWNER_NO_FILE = 1  # a struct socket without a file (kernel sockets: RST and ICMP replies)
OWNER_FILE = 2
TCPOLEN_MSS = 4

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

# ipv6_find_hdr(skb, &ptr, TYPE, NULL, NULL) as ip6t_rt, ip6t_frag and ip6t_hbh call it,
# recorded by the prologue's walk (RT_STATE, FH_STATE, HBH_STATE, DST_STATE):
HDR_NONE = 0  # -ENOENT: no such header before the upper-layer one (or a later fragment)
HDR_FOUND = 1  # found, and the bytes the match reads at once are there
HDR_ERROR = 2  # -EBADMSG, a short header, or more than IPV6_EXT_MAX headers before it: the
#                match hot-drops

# ip6t_ipv6header.h: the header kinds a packet has, as bits.
MASK_HOPOPTS, MASK_DSTOPTS, MASK_ROUTING, MASK_FRAGMENT = 128, 64, 32, 16
MASK_AH, MASK_ESP, MASK_NONE, MASK_PROTO = 8, 4, 2, 1
OPTS_MAX_LISTS = 16  # option lists one program can test (a bit each in OPTS_RESULT)
IPV6HDR_FALSE = 0x100  # too short for the next extension header: no match
IPV6HDR_HOTDROP = 0x200  # unreadable (or more than IPV6_EXT_MAX headers): hot drop
NEXTHDR_ESP = 50
_IPV6HDR_BITS = {NEXTHDR_HOP: MASK_HOPOPTS, NEXTHDR_ROUTING: MASK_ROUTING,
                 NEXTHDR_FRAGMENT: MASK_FRAGMENT, NEXTHDR_AUTH: MASK_AH,
                 NEXTHDR_DEST: MASK_DSTOPTS}

CT_INVALID = 1
CT_TRACKED = 2 | 4 | 8  # ESTABLISHED, RELATED, NEW: the packet has a conntrack entry
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
    CT_TIMEOUT = ("nf_conn", "timeout")  # u32 jiffies (absolute once confirmed)
    CT_CONNMARK = ("nf_conn", "mark")
    CT_TUPLEHASH = ("nf_conn", "tuplehash")  # [IP_CT_DIR_ORIGINAL], then [IP_CT_DIR_REPLY]
    TUPLEHASH_TUPLE = ("nf_conntrack_tuple_hash", "tuple")
    TUPLE_SRC_ADDR = ("nf_conntrack_tuple", "src.u3")  # union nf_inet_addr (16 bytes)
    TUPLE_SRC_PORT = ("nf_conntrack_tuple", "src.u")  # __be16 port (ICMP: the id)
    TUPLE_DST_ADDR = ("nf_conntrack_tuple", "dst.u3")
    TUPLE_DST_PORT = ("nf_conntrack_tuple", "dst.u")  # __be16 port (ICMP: type, code)
    TUPLE_PROTO = ("nf_conntrack_tuple", "dst.protonum")  # u8
    SK_LISTENER = ("request_sock", "__req_common.skc_listener")  # rsk_listener
    # Read by LOG through bpf_probe_read_kernel from SKB_ADDR (codegen/log):
    SKB_DATA = ("sk_buff", "data")
    SKB_DATA_LEN = ("sk_buff", "data_len")
    SKB_HEAD = ("sk_buff", "head")
    SKB_MAC_HEADER = ("sk_buff", "mac_header")
    SKB_NETWORK_HEADER = ("sk_buff", "network_header")
    SKB_DEV = ("sk_buff", "dev")
    SKB_VLAN_ALL = ("sk_buff", "vlan_all")
    DEV_HARD_HEADER_LEN = ("net_device", "hard_header_len")
    DEV_TYPE = ("net_device", "type")
    # Read by REJECT the same way (codegen/reject):
    SKB_CSUM = ("sk_buff", "csum")  # __wsum: with CHECKSUM_COMPLETE, the packet's sum
    SKB_REFDST = ("sk_buff", "_skb_refdst")  # dst_entry pointer | SKB_DST_NOREF
    RT_FLAGS = ("rtable", "rt_flags")  # RTCF_*: struct rtable begins with its dst_entry
    # LOG --log-uid (codegen/log): skb->sk->sk_socket->file->f_cred->fsuid, as nf_log_syslog.
    STATE_NET = ("nf_hook_state", "net")
    SKB_SK = ("sk_buff", "sk")
    SOCK_STATE = ("sock", "__sk_common.skc_state")
    SOCK_NET = ("sock", "__sk_common.skc_net")
    SOCK_SOCKET = ("sock", "sk_socket")
    SOCKET_FILE = ("socket", "file")
    FILE_CRED = ("file", "f_cred")
    CRED_FSUID = ("cred", "fsuid")
    CRED_FSGID = ("cred", "fsgid")

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


@dataclass(frozen=True, slots=True)
class KernelHz:
    """``dst = HZ``, the kernel's jiffies per second (CONFIG_HZ), resolved by a KernelLayout."""

    dst: Reg


Item: TypeAlias = Insn | Label | FieldLoad | FieldAddress | KernelHz


@dataclass(frozen=True, slots=True)
class KernelLayout:
    """Byte offsets of every KField in the running kernel."""

    offsets: Mapping[KField, int]
    hz: int = 0  # CONFIG_HZ; 0 when unknown (code that needs it then cannot be resolved)

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
            elif isinstance(it, KernelHz):
                if self.hz <= 0:
                    raise ValueError("the kernel's HZ is unknown (needed by --ctexpire)")
                out.append(asm.mov64(it.dst, self.hz, comment="HZ"))
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
    routing: bool = False  # IPv6: RT, RT_OFF, RT_STATE
    fragment: bool = False  # IPv6: FH, FH_STATE
    ipv6header: bool = False  # IPv6: IPV6HDR
    hbh: bool = False  # IPv6: HBH_STATE, HBH_OFF, HBH_HDR
    dst: bool = False  # IPv6: DST_STATE, DST_OFF, DST_HDR
    # (NEXTHDR_HOP or NEXTHDR_DEST, option list as ip6t_opts.opts) tested: OPTS_RESULT
    ext_opts: frozenset[tuple[int, tuple[int, ...]]] = frozenset()

    ct_dir: bool = False  # CT_DIR (with conntrack)
    ct_status: bool = False  # CT_STATUS
    ct_mark: bool = False  # CT_MARK
    ct_expires: bool = False  # CT_EXPIRES
    ct_tuples: bool = False  # CT_ORIG, CT_REPL
    mac: bool = False  # MAC_SRC, MAC_OK
    tcp_options: bool = False  # TCP_OPT_STATE, TCP_MSS, TCP_KINDS
    owner: bool = False  # OWNER_STATE, OWNER_UID, OWNER_GID
    sctp_chunks: bool = False  # SCTP_STATE, SCTP_TYPES
    skb: bool = False  # SKB_ADDR
    hook_net: bool = False  # NET_ADDR

    def __or__(self, other: Needs) -> Needs:
        # `|`: or for the flags, union for the sets
        return Needs(**{f.name: getattr(self, f.name) | getattr(other, f.name)
                        for f in fields(Needs)})


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


# sizeof(struct nf_conntrack_tuple) and sizeof(struct nf_conntrack_tuple_hash): stable since
# 2.6 (tests/kernel check them against BTF); probe reads need constant sizes.
CT_TUPLE_SIZE = 40
CT_TUPLE_HASH_SIZE = 56


def _ct_read(meta_off: int, size: int, where: Sequence[Item], what: str) -> list[Item]:
    """``meta[meta_off:] = *(ct + where)`` for ``size`` bytes (R9 = ct), zeroed on a fault."""
    return [
        asm.mov64(R1, R7),
        asm.add64(R1, meta_off),
        asm.mov64(R2, size),
        asm.mov64(R3, R9),
        *where,
        asm.call_helper(BpfFunc.probe_read_kernel, comment=f"meta = ct->{what}"),
    ]


def _ct_details(needs: Needs) -> list[Item]:
    """The nf_conn fields xt_conntrack and xt_connmark read beyond the state (R9 = ct)."""
    out: list[Item] = []
    if needs.ct_status:
        out += _ct_read(CT_STATUS, 4, [FieldAddress(R3, KField.CT_STATUS)], "status")
    if needs.ct_mark:
        out += _ct_read(CT_MARK, 4, [FieldAddress(R3, KField.CT_CONNMARK)], "mark")
    if needs.ct_tuples:
        orig = [FieldAddress(R3, KField.CT_TUPLEHASH), FieldAddress(R3, KField.TUPLEHASH_TUPLE)]
        repl = [FieldAddress(R3, KField.CT_TUPLEHASH), asm.add64(R3, CT_TUPLE_HASH_SIZE),
                FieldAddress(R3, KField.TUPLEHASH_TUPLE)]
        out += _ct_read(CT_ORIG, CT_TUPLE_SIZE, orig, "tuplehash[ORIGINAL].tuple")
        out += _ct_read(CT_REPL, CT_TUPLE_SIZE, repl, "tuplehash[REPLY].tuple")
    if needs.ct_expires:
        # nf_ct_expires(): max((s32)(ct->timeout - (u32)jiffies), 0). An unconfirmed entry
        # holds a relative timeout there, and the kernel computes the same difference.
        out += _ct_read(CT_EXPIRES, 4, [FieldAddress(R3, KField.CT_TIMEOUT)], "timeout")
        out += [
            asm.call_helper(BpfFunc.jiffies64),
            asm.ldx(Size.W, R1, R7, CT_EXPIRES),
            asm.sub32(R1, R0),
            asm.jmp32("jsge", R1, 0, "prologue:ct:expires"),
            asm.mov32(R1, 0),
            Label("prologue:ct:expires"),
            asm.stx(Size.W, R7, CT_EXPIRES, R1),
        ]
    return out


def _mac_source() -> list[Item]:
    # xt_mac: a device of type ARPHRD_ETHER and a MAC header lying in front of skb->data
    # (skb_mac_header(skb) + ETH_HLEN <= skb->data; an unset mac_header, 0xffff, fails that),
    # else no match whatever the negation. head and data are plain numbers to the verifier.
    done = "prologue:mac:done"
    return [
        FieldLoad(Size.DW, R1, R8, KField.SKB_DEV, comment="r1 = skb->dev"),
        asm.jmp("jeq", R1, 0, done),
        FieldLoad(Size.H, R2, R1, KField.DEV_TYPE),
        asm.jmp("jne", R2, ARPHRD_ETHER, done),
        FieldLoad(Size.H, R2, R8, KField.SKB_MAC_HEADER),
        FieldLoad(Size.DW, R3, R8, KField.SKB_HEAD),
        FieldLoad(Size.DW, R4, R8, KField.SKB_DATA),
        asm.add64(R3, R2),
        asm.mov64(R5, R3),
        asm.add64(R5, ETH_HLEN),
        asm.jmp("jgt", R5, R4, done),
        asm.add64(R3, ETH_ALEN, comment="h_source"),
        asm.mov64(R1, R7),
        asm.add64(R1, MAC_SRC),
        asm.mov64(R2, ETH_ALEN),
        asm.call_helper(BpfFunc.probe_read_kernel, comment="meta = eth_hdr(skb)->h_source"),
        asm.jmp("jne", R0, 0, done),
        asm.st(Size.W, R7, MAC_OK, 1),
        Label(done),
    ]


def _kread(size: Size, dst: Reg, base: Reg, fld: KField) -> list[Item]:
    """``dst = *(base + offsetof(fld))`` through bpf_probe_read_kernel (0 on a fault): the
    socket chain holds plain numbers, and a request sock is not the struct sock BTF says."""
    return [
        asm.mov64(R3, base),
        FieldAddress(R3, fld),
        asm.mov64(R1, FP),
        asm.add64(R1, SCRATCH),
        asm.mov64(R2, size.nbytes),
        asm.call_helper(BpfFunc.probe_read_kernel, comment=f"{fld.struct}.{fld.member}"),
        asm.ldx(size, dst, FP, SCRATCH),
        asm.st(Size.DW, FP, SCRATCH, 0),
    ]


def _owner() -> list[Item]:
    # owner_mt: sk = skb_to_full_sk(skb) (a request sock stands for its listener, a
    # time-wait sock for none); no sk, no sk->sk_socket or another network namespace than
    # the hook's: OWNER_NONE; a socket without file: OWNER_NO_FILE; else the file's
    # f_cred->fsuid and fsgid. R9 walks the chain; `done` keeps the state written so far.
    done, full = "prologue:owner:done", "prologue:owner:full"
    return [
        FieldLoad(Size.DW, R9, R8, KField.SKB_SK, comment="r9 = skb->sk"),
        asm.jmp("jeq", R9, 0, done),
        *_kread(Size.B, R1, R9, KField.SOCK_STATE),
        asm.jmp("jne", R1, TCP_NEW_SYN_RECV, full),
        *_kread(Size.DW, R9, R9, KField.SK_LISTENER),
        asm.jmp("jeq", R9, 0, done),
        *_kread(Size.B, R1, R9, KField.SOCK_STATE),
        Label(full),
        asm.jmp("jeq", R1, TCP_TIME_WAIT, done),
        *_kread(Size.DW, R1, R9, KField.SOCK_NET),
        FieldLoad(Size.DW, R2, R6, KField.CTX_STATE),
        FieldLoad(Size.DW, R2, R2, KField.STATE_NET),
        asm.jmp("jne", R1, R2, done),
        *_kread(Size.DW, R9, R9, KField.SOCK_SOCKET),
        asm.jmp("jeq", R9, 0, done),
        asm.st(Size.W, R7, OWNER_STATE, OWNER_NO_FILE),
        *_kread(Size.DW, R9, R9, KField.SOCKET_FILE),
        asm.jmp("jeq", R9, 0, done),
        *_kread(Size.DW, R9, R9, KField.FILE_CRED),
        asm.jmp("jeq", R9, 0, done),
        *_kread(Size.W, R1, R9, KField.CRED_FSUID),
        asm.stx(Size.W, R7, OWNER_UID, R1),
        *_kread(Size.W, R1, R9, KField.CRED_FSGID),
        asm.stx(Size.W, R7, OWNER_GID, R1),
        asm.st(Size.W, R7, OWNER_STATE, OWNER_FILE),
        Label(done),
    ]


def _conntrack(needs: Needs) -> list[Item]:
    # nf_ct_get(): _nfct is the nf_conn pointer with ctinfo in the low bits. No conntrack:
    # INVALID, unless ctinfo says UNTRACKED; otherwise xt_conntrack's
    # XT_CONNTRACK_STATE_BIT(ctinfo) = 1 << (ctinfo % IP_CT_IS_REPLY + 1), plus the SNAT and
    # DNAT bits from nf_conn.status (read with bpf_probe_read_kernel: the pointer is a plain
    # number to the verifier). Then the details some rule needs (_ct_details).
    nat_bits: list[Item] = [] if not needs.conntrack_nat else [
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
        *([] if not needs.ct_dir else [
            asm.jmp("jlt", R2, IP_CT_IS_REPLY, "prologue:ct:original"),
            asm.st(Size.W, R7, CT_DIR, 1, comment="CTINFO2DIR: reply"),
            Label("prologue:ct:original"),
        ]),
        asm.mod64(R2, IP_CT_IS_REPLY),
        asm.add64(R2, 1),
        asm.mov64(R1, 1),
        asm.lsh64(R1, R2),
        *nat_bits,
        asm.stx(Size.W, R7, CT_STATE, R1),
        *_ct_details(needs),
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


@dataclass(frozen=True, slots=True)
class _Recorded:
    """An extension header a match finds with ipv6_find_hdr(TYPE): the first one of its
    type, recorded during the walk with the bytes the match reads."""

    nexthdr: int
    data: int  # meta offset of its first bytes
    state: int  # meta offset of its HDR_* state (u8)
    need: int  # bytes that must be there (else the match hot-drops)
    more: int = 0  # bytes after those, copied when present
    offset: int | None = None  # meta offset of its offset from the IPv6 header (u16)


_ROUTING = _Recorded(NEXTHDR_ROUTING, RT, RT_STATE, 4, 4, RT_OFF)  # ipv6_rt_hdr, reserved
_FRAGMENT = _Recorded(NEXTHDR_FRAGMENT, FH, FH_STATE, 8)  # struct frag_hdr
_HOP_OPTS = _Recorded(NEXTHDR_HOP, HBH_HDR, HBH_STATE, 2, 0, HBH_OFF)  # struct ipv6_opt_hdr
_DEST_OPTS = _Recorded(NEXTHDR_DEST, DST_HDR, DST_STATE, 2, 0, DST_OFF)
OPT_HEADERS = {NEXTHDR_HOP: _HOP_OPTS, NEXTHDR_DEST: _DEST_OPTS}


def ext_opts_index(needs: Needs, kind: int, opts: tuple[int, ...]) -> int:
    """The bit of OPTS_RESULT that says whether option list ``opts`` matched."""
    return sorted(needs.ext_opts).index((kind, opts))


def _opt_headers(needs: Needs) -> list[Item]:
    """hbh_mt6 past ipv6_find_hdr: a header shorter than its length field hot-drops (checked
    against ip6tables-legacy on Linux 6.18); then each option list of the program, walked as
    hbh_mt6 does: an option type or length byte missing, or an option (but the last) running
    past the header or the packet, ends the walk early and the list does not match. R8 =
    bytes of the header left, R9 = ptr, R3 = optlen."""
    out: list[Item] = []
    for kind, h, wanted in ((NEXTHDR_HOP, _HOP_OPTS, needs.hbh),
                            (NEXTHDR_DEST, _DEST_OPTS, needs.dst)):
        if not wanted:
            continue
        ok = f"prologue:opts{kind}:len"
        out += [
            asm.ldx(Size.B, R1, R7, h.state), asm.jmp("jne", R1, HDR_FOUND, ok),
            asm.ldx(Size.W, R1, R7, SKB_LEN), asm.ldx(Size.H, R2, R7, h.offset or 0),
            asm.sub64(R1, R2),
            asm.ldx(Size.B, R2, R7, h.data + 1), asm.add64(R2, 1), asm.lsh64(R2, 3),
            asm.jmp("jge", R1, R2, ok),
            asm.st(Size.B, R7, h.state, HDR_ERROR),
            Label(ok),
        ]
    lists = sorted(needs.ext_opts)
    assert len(lists) <= OPTS_MAX_LISTS, "the compiler refuses more (with the rule's line)"
    for k, (kind, opts) in enumerate(lists):
        h = OPT_HEADERS[kind]
        base = f"prologue:optlist{k}"
        false, done = f"{base}:false", f"{base}:done"
        out += [
            asm.ldx(Size.B, R1, R7, h.state), asm.jmp("jne", R1, HDR_FOUND, done),
            asm.ldx(Size.H, R9, R7, h.offset or 0), asm.add64(R9, 2),
            asm.ldx(Size.B, R8, R7, h.data + 1), asm.add64(R8, 1), asm.lsh64(R8, 3),
            asm.sub64(R8, 2),
        ]
        for t, spec in enumerate(opts):
            opt_type, spec_len = spec >> 8, spec & 0xFF
            out += [
                asm.jmp("jlt", R8, 1, false, comment=f"option {t}: no type byte: no match"),
                *_read_scratch(1, 0), asm.jmp("jne", R0, 0, false),
                asm.ldx(Size.B, R1, FP, SCRATCH), asm.jmp("jne", R1, opt_type, false),
            ]
            if opt_type:
                out += [asm.jmp("jlt", R8, 2, false), *_read_scratch(1, 1),
                        asm.jmp("jne", R0, 0, false), asm.ldx(Size.B, R3, FP, SCRATCH + 1)]
                if spec_len != 0xFF:
                    out.append(asm.jmp("jne", R3, spec_len, false))
                out.append(asm.add64(R3, 2))
            else:
                out.append(asm.mov64(R3, 1, comment="Pad1"))
            if t < len(opts) - 1:
                # ptr > skb->len - optlen (unsigned int) || hdrlen < optlen: stop, no match
                out += [asm.ldx(Size.W, R4, R7, SKB_LEN), asm.alu32("sub", R4, R3),
                        asm.jmp32("jgt", R9, R4, false), asm.jmp("jlt", R8, R3, false),
                        asm.add64(R9, R3), asm.sub64(R8, R3)]
        out += [
            asm.ldx(Size.H, R1, R7, OPTS_RESULT), asm.or64(R1, 1 << k),
            asm.stx(Size.H, R7, OPTS_RESULT, R1),
            Label(false),
            Label(done),
        ]
    return out


def _record_header(ext: str, h: _Recorded) -> list[Item]:
    """At extension header ``ext`` (R8 its type, R9 its offset): the first header of type
    ``h.nexthdr`` is where ipv6_find_hdr(h.nexthdr) stops; record it as the match reads it."""
    done, state = f"{ext}:{h.nexthdr}:done", f"{ext}:{h.nexthdr}:state"
    out: list[Item] = [
        asm.jmp("jne", R8, h.nexthdr, done),
        asm.ldx(Size.B, R1, R7, h.state),
        asm.jmp("jne", R1, HDR_NONE, done),
        *_read(h.data, h.need, R9),
        asm.mov64(R1, HDR_ERROR),
        asm.jmp("jne", R0, 0, state),
    ]
    if h.offset is not None:
        out.append(asm.stx(Size.H, R7, h.offset, R9))
    if h.more:
        # Unreadable only when the header is cut short, which the match checks first
        # (ip6t_rt: skb->len - ptr < hdrlen), so a failed read is never looked at.
        out += _dynptr_read(R7, h.data + h.need, h.more,
                            [asm.mov64(R4, R9), asm.add64(R4, h.need)])
    return [*out, asm.mov64(R1, HDR_FOUND), Label(state), asm.stx(Size.B, R7, h.state, R1),
            Label(done)]


def _ipv6header_walk() -> list[Item]:
    """ipv6header_mt6's own walk over every extension header (unlike ipv6_find_hdr it goes on
    past a later fragment and stops at ESP), unrolled; leaves IPV6HDR. R8 and R9 as in the
    main walk, which starts afresh after it."""
    end, finish = "prologue:v6h:end", "prologue:v6h:finish"
    out: list[Item] = [asm.ldx(Size.B, R8, R7, L3 + 6), asm.mov64(R9, IPV6_HEADER)]

    def set_bits(bits: int) -> list[Item]:
        return [asm.ldx(Size.W, R1, R7, IPV6HDR), asm.or64(R1, bits),
                asm.stx(Size.W, R7, IPV6HDR, R1)]

    for i in range(IPV6_EXT_MAX + 1):
        step = f"prologue:v6h:{i}"
        out += [asm.jmp("jeq", R8, NEXTHDR_NONE, "prologue:v6h:none")]
        out += [asm.jmp("jeq", R8, n, step) for n in (*_IPV6HDR_BITS, NEXTHDR_ESP)]
        out += [asm.ja(finish), Label(step)]
        if i == IPV6_EXT_MAX:  # still in the loop: more headers than the walk follows
            out += [asm.st(Size.W, R7, IPV6HDR, IPV6HDR_HOTDROP), asm.ja(end)]
            break
        have = f"{step}:len"
        out += [
            # len = skb->len - ptr: room for the 2-byte ipv6_opt_hdr, else no match
            asm.ldx(Size.W, R1, R7, SKB_LEN), asm.sub64(R1, R9),
            asm.jmp("jslt", R1, 2, "prologue:v6h:false"),
            asm.jmp("jeq", R8, NEXTHDR_ESP, "prologue:v6h:esp"),
            *_read_scratch(2, 0),
            asm.jmp("jne", R0, 0, "prologue:v6h:hotdrop"),
            asm.mov64(R2, 8, comment="fragment header length"),
            asm.jmp("jeq", R8, NEXTHDR_FRAGMENT, have),
            asm.ldx(Size.B, R2, FP, SCRATCH + 1),
            asm.jmp("jne", R8, NEXTHDR_AUTH, f"{step}:opt"),
            asm.add64(R2, 2, comment="ipv6_authlen"), asm.lsh64(R2, 2), asm.ja(have),
            Label(f"{step}:opt"),
            asm.add64(R2, 1, comment="ipv6_optlen"), asm.lsh64(R2, 3),
            Label(have),
            asm.ldx(Size.W, R1, R7, IPV6HDR),
        ]
        for n, bit in _IPV6HDR_BITS.items():
            skip = f"{step}:not{n}"
            out += [asm.jmp("jne", R8, n, skip), asm.or64(R1, bit), Label(skip)]
        out += [
            asm.stx(Size.W, R7, IPV6HDR, R1),
            asm.ldx(Size.B, R8, FP, SCRATCH),
            asm.add64(R9, R2),
            asm.ldx(Size.W, R1, R7, SKB_LEN),
            asm.jmp("jgt", R9, R1, finish, comment="ptr > skb->len: stop"),
        ]
    out += [
        Label("prologue:v6h:none"), *set_bits(MASK_NONE), asm.ja(end),
        Label("prologue:v6h:esp"), *set_bits(MASK_ESP), asm.ja(end),
        Label(finish),
        asm.jmp("jeq", R8, NEXTHDR_NONE, end),
        asm.jmp("jeq", R8, NEXTHDR_ESP, end),
        *set_bits(MASK_PROTO), asm.ja(end),
        Label("prologue:v6h:false"), asm.st(Size.W, R7, IPV6HDR, IPV6HDR_FALSE), asm.ja(end),
        Label("prologue:v6h:hotdrop"), asm.st(Size.W, R7, IPV6HDR, IPV6HDR_HOTDROP),
        Label(end),
    ]
    return out


def _ipv6_facts(needs: Needs | None = None) -> list[Item]:
    # ipv6_find_hdr(skb, &thoff, -1, &fragoff, NULL) as ip6_packet_match calls it, unrolled:
    # R8 = next header, R9 = offset of the header it describes. The walk also records the
    # headers ``needs`` asks for (ipv6_find_hdr with their type takes the same steps up to
    # them; after a later fragment it answers -ENOENT, not an error).
    recorded = [] if needs is None else [
        h for h, wanted in ((_ROUTING, needs.routing), (_FRAGMENT, needs.fragment),
                            (_HOP_OPTS, needs.hbh), (_DEST_OPTS, needs.dst)) if wanted]
    out: list[Item] = [
        *_read(L3, IPV6_HEADER, 0),
        asm.jmp("jne", R0, 0, "prologue:unreadable"),
        asm.ldx(Size.H, R1, R7, L3 + 4),
        asm.to_be(R1, 16),
        asm.add64(R1, IPV6_HEADER),
        asm.and64(R1, 0xFFFF, comment="xt_length keeps IPv6 lengths in a u16"),
        asm.stx(Size.W, R7, IP_LEN, R1),
        *(_ipv6header_walk() if needs is not None and needs.ipv6header else []),
        asm.ldx(Size.B, R8, R7, L3 + 6, comment="r8 = nexthdr"),
        asm.mov64(R9, IPV6_HEADER),
    ]
    for i in range(IPV6_EXT_MAX):
        ext, nxt = f"prologue:ext{i}", f"prologue:ext{i}:next"
        out += [asm.jmp("jeq", R8, n, ext) for n in IPV6_EXT]
        out += [asm.ja("prologue:walked"), Label(ext)]
        # hp = skb_header_pointer(skb, start, 2): next header and length byte
        out += _read_scratch(2, 0)
        out += [asm.jmp("jne", R0, 0, "prologue:walk_error")]
        for h in recorded:
            out += _record_header(ext, h)
        out += [
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
            *[asm.jmp("jeq", R8, n, "prologue:frag_error" if recorded else "prologue:walk_error")
              for n in IPV6_EXT],
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
    ]
    for h in recorded:
        # An error before the header is one for ipv6_find_hdr(its type) too.
        skip = f"prologue:walk_error:{h.nexthdr}"
        out += [
            asm.ldx(Size.B, R1, R7, h.state),
            asm.jmp("jne", R1, HDR_NONE, skip),
            asm.st(Size.B, R7, h.state, HDR_ERROR),
            Label(skip),
        ]
    if recorded:
        out.append(Label("prologue:frag_error"))
    out += [
        asm.st(Size.W, R7, PROTO_ERROR, 1),
        asm.ja("prologue:l4done"),
    ]
    return out


def _read_scratch(size: int, at: int) -> list[Item]:
    """``bpf_dynptr_read(FP + SCRATCH + at, size, &dynptr, R9 + at, 0)``."""
    return _dynptr_read(FP, SCRATCH + at, size, [asm.mov64(R4, R9), asm.add64(R4, at)])


def meta_size(needs: Needs) -> int:
    """Bytes of the meta area a program with ``needs`` uses: the fields every program fills,
    up to the end of the last field group some rule of it looks at. Fields of groups it does
    not need lie past that end, and neither the prologue nor any rule touches them (the
    verifier refuses a global function reading past the size its BTF declares)."""
    end = BASE_END
    for wanted, group_end in (
            (needs.routing or needs.fragment or needs.hbh or needs.dst, DST_STATE + 1),
            (needs.ct_dir, CT_DIR + 4), (needs.ct_status, CT_STATUS + 4),
            (needs.ct_mark, CT_MARK + 4), (needs.ct_expires, CT_EXPIRES + 4),
            (needs.ct_tuples, CT_REPL + 40), (needs.mac, MAC_OK + 4),
            (needs.skb, SKB_ADDR + 8), (needs.tcp_options or needs.sctp_chunks, TCP_KINDS + 32),
            (needs.hook_net, NET_ADDR + 8), (needs.owner, OWNER_GID + 4),
            (needs.hbh, max(HBH_OFF + 2, HBH_HDR + 2)), (needs.dst, max(DST_OFF + 2, DST_HDR + 2)),
            (bool(needs.ext_opts), OPTS_RESULT + 2), (needs.fragment, FH + 8),
            (needs.ipv6header, IPV6HDR + 4)):
        if wanted:
            end = max(end, group_end)
    return min(META_SIZE, (end + 7) & ~7)


def meta_frame(needs: Needs) -> list[Item]:
    """``R7 = FP - (FIXED_FRAME + meta_size)``, the meta area zeroed, SCRATCH zeroed."""
    size = meta_size(needs)
    return [
        asm.mov64(R7, FP),
        asm.add64(R7, -(FIXED_FRAME + size), comment="r7 = meta area"),
        *[asm.st(Size.DW, R7, off, 0) for off in range(0, size, 8)],
        asm.st(Size.DW, FP, SCRATCH, 0),
    ]


def prologue(family: int, needs: Needs) -> list[Item]:
    """Fill the meta area; afterwards R7 points at it and R6 holds the context."""
    out: list[Item] = [
        asm.mov64(R6, R1, comment="r6 = ctx (struct bpf_nf_ctx *)"),
        *meta_frame(needs),
        FieldLoad(Size.DW, R8, R6, KField.CTX_SKB, comment="r8 = ctx->skb"),
        FieldLoad(Size.W, R1, R8, KField.SKB_LEN),
        asm.stx(Size.W, R7, SKB_LEN, R1),
    ]
    if needs.skb:
        out += [asm.stx(Size.DW, R7, SKB_ADDR, R8)]
    if needs.hook_net:
        out += [FieldLoad(Size.DW, R1, R6, KField.CTX_STATE),
                FieldLoad(Size.DW, R1, R1, KField.STATE_NET), asm.stx(Size.DW, R7, NET_ADDR, R1)]
    if needs.mark:
        out += [FieldLoad(Size.W, R1, R8, KField.SKB_MARK), asm.stx(Size.W, R7, MARK, R1)]
    if needs.pkt_type:
        out += [FieldLoad(Size.B, R1, R8, KField.SKB_PKT_TYPE), asm.and64(R1, PKT_TYPE_MAX),
                asm.stx(Size.W, R7, PKT_TYPE, R1)]
    if needs.conntrack or needs.conntrack_nat:
        out += _conntrack(needs)
    if needs.mac:
        out += _mac_source()
    if needs.owner:
        out += _owner()
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
    out += _ipv4_facts() if family == 4 else _ipv6_facts(needs)
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
    if needs.tcp_options:
        out += _tcp_options()
    if needs.sctp_chunks:
        out += _sctp_chunks()
    if family == 6 and (needs.hbh or needs.dst):
        out += _opt_headers(needs)
    return out


ITER_KFUNCS = ("bpf_iter_num_new", "bpf_iter_num_next", "bpf_iter_num_destroy")


def kfuncs(needs: Needs) -> tuple[str, ...]:
    """The kfuncs a netfilter program with these needs calls."""
    return ("bpf_dynptr_from_skb", *(ITER_KFUNCS if needs.sctp_chunks else ()))


def _iter(kfunc: str, *args: Item) -> list[Item]:
    """A bpf_iter_num call on the iterator in SCRATCH."""
    return [asm.mov64(R1, FP), asm.add64(R1, SCRATCH), *args, asm.call_kfunc(kfunc)]


def _sctp_chunks() -> list[Item]:
    """match_packet's walk: from thoff + 12, read each 4-byte chunk header (type, flags,
    length), stop on a missing header or a zero length, go on by the length rounded up to 4
    while the offset is below skb->len. The chunk count has no small bound, so the loop is a
    bpf_iter_num (at most one turn per 4 bytes up to SCTP_WALK_MAX), which the verifier checks
    once. R9 = thoff, R8 the offset."""
    done, bad, loop, end = ("prologue:sctp:" + n for n in ("done", "bad", "loop", "end"))
    return [
        asm.ldx(Size.W, R1, R7, PROTO),
        asm.jmp("jne", R1, IPPROTO_SCTP, done),
        asm.ldx(Size.W, R1, R7, FRAG),
        asm.jmp("jne", R1, 0, done),
        asm.ldx(Size.W, R1, R7, L4_LEN),
        asm.jmp("jlt", R1, SCTP_COMMON_HEADER, done),
        asm.st(Size.W, R7, SCTP_STATE, SCTP_OK),
        asm.mov64(R8, R9),
        asm.add64(R8, SCTP_COMMON_HEADER),
        *_iter("bpf_iter_num_new", asm.mov64(R2, 0), asm.mov64(R3, SCTP_WALK_MAX // 4)),
        Label(loop),
        *_iter("bpf_iter_num_next"),
        asm.jmp("jeq", R0, 0, end),
        *_read(SCTP_CHUNK, 4, R8),
        asm.jmp("jne", R0, 0, bad),
        asm.ldx(Size.H, R2, R7, SCTP_CHUNK + 2),
        asm.to_be(R2, 16),
        asm.jmp("jeq", R2, 0, bad),
        asm.ldx(Size.B, R1, R7, SCTP_CHUNK, comment="chunk type"),
        asm.mov64(R5, R1),
        asm.rsh64(R5, 3),
        asm.add64(R5, R7),
        asm.and64(R1, 7),
        asm.mov64(R0, 1),
        asm.lsh64(R0, R1),
        asm.ldx(Size.B, R1, R5, SCTP_TYPES),
        asm.or64(R1, R0),
        asm.stx(Size.B, R5, SCTP_TYPES, R1),
        asm.add64(R2, 3, comment="SCTP_PAD4(length)"),
        asm.and64(R2, ~3),
        asm.add64(R8, R2),
        asm.ldx(Size.W, R1, R7, SKB_LEN),
        asm.jmp("jlt", R8, R1, loop),
        asm.ja(end),
        Label(bad),
        asm.st(Size.W, R7, SCTP_STATE, SCTP_BAD),
        Label(end),
        *_iter("bpf_iter_num_destroy"),
        asm.st(Size.DW, FP, SCRATCH, 0),
        asm.st(Size.W, R7, SCTP_CHUNK, 0),
        Label(done),
    ]


def _tcp_options() -> list[Item]:
    """Walk the TCP options once as tcp_find_option and tcpmss_mt do: kinds 0 and 1 take one
    byte, others their length byte (a zero length counts as one). The options are read a
    byte or two at a time into SCRATCH, the index i spilled whole in TCP_OPT_I so that the
    verifier keeps its bounds (a copy of all 40 bytes would cost the stack room the call
    frames need). R9 = thoff, R8 = optlen."""
    done, bad, loop, step, one = ("prologue:tcpopt:" + n for n in
                                  ("done", "bad", "loop", "step", "one"))

    def read(at: int, size: int) -> list[Item]:
        """SCRATCH[at:] = ``size`` option bytes from index i + at."""
        return _dynptr_read(FP, SCRATCH + max(at, 0), size, [
            asm.ldx(Size.DW, R4, FP, TCP_OPT_I), asm.add64(R4, R9),
            asm.add64(R4, L4_BYTES + at)])

    return [
        asm.ldx(Size.W, R1, R7, PROTO),
        asm.jmp("jne", R1, IPPROTO_TCP, done),
        asm.ldx(Size.W, R1, R7, L4_LEN),
        asm.jmp("jne", R1, L4_BYTES, done),
        asm.ldx(Size.B, R2, R7, L4 + 12, comment="doff << 4"),
        asm.rsh64(R2, 4),
        asm.lsh64(R2, 2),
        asm.jmp("jlt", R2, L4_BYTES, bad),
        asm.sub64(R2, L4_BYTES, comment="optlen"),
        asm.jmp("jeq", R2, 0, done),
        asm.mov64(R8, R2),
        # skb_header_pointer(optlen bytes) fails exactly when the last of them is missing
        asm.stx(Size.DW, FP, TCP_OPT_I, R8),
        *read(-1, 1),
        asm.jmp("jne", R0, 0, bad),
        asm.st(Size.W, R7, TCP_OPT_STATE, TCP_OPT_OK),
        asm.st(Size.DW, FP, TCP_OPT_I, 0),
        Label(loop),
        asm.ldx(Size.DW, R3, FP, TCP_OPT_I, comment="i"),
        asm.jmp("jge", R3, R8, done),
        asm.jmp("jge", R3, TCP_OPT_MAX, done),
        *read(0, 1),
        asm.ldx(Size.B, R1, FP, SCRATCH, comment="op[i]"),
        asm.mov64(R5, R1),
        asm.rsh64(R5, 3),
        asm.add64(R5, R7),
        asm.mov64(R2, R1),
        asm.and64(R2, 7),
        asm.mov64(R0, 1),
        asm.lsh64(R0, R2),
        asm.ldx(Size.B, R2, R5, TCP_KINDS),
        asm.or64(R2, R0),
        asm.stx(Size.B, R5, TCP_KINDS, R2),
        asm.jmp("jlt", R1, 2, one),
        # op[i + 1] lies past the options only for i = optlen - 1, where any value ends the
        # walk (the kernel reads a byte of its copy's tail there)
        asm.ldx(Size.DW, R3, FP, TCP_OPT_I),
        asm.add64(R3, 1),
        asm.jmp("jge", R3, R8, done),
        *read(1, 1),
        asm.ldx(Size.B, R1, FP, SCRATCH),
        asm.ldx(Size.B, R2, FP, SCRATCH + 1, comment="op[i + 1]"),
        asm.ldx(Size.DW, R3, FP, TCP_OPT_I),
        # tcpmss_mt takes the first MSS option with length 4 and 4 bytes left
        asm.jmp("jne", R1, TCPOPT_MSS, step),
        asm.ldx(Size.W, R0, R7, TCP_MSS),
        asm.jmp("jne", R0, 0, step),
        asm.mov64(R4, R8),
        asm.sub64(R4, R3),
        asm.jmp("jlt", R4, TCPOLEN_MSS, step),
        asm.jmp("jne", R2, TCPOLEN_MSS, step),
        *read(2, 2),
        asm.ldx(Size.H, R2, FP, SCRATCH + 2),
        asm.to_be(R2, 16),
        asm.or64(R2, 0x10000),
        asm.stx(Size.W, R7, TCP_MSS, R2),
        asm.ldx(Size.B, R2, FP, SCRATCH + 1),
        asm.ldx(Size.DW, R3, FP, TCP_OPT_I),
        Label(step),
        asm.jmp("jeq", R2, 0, one),
        asm.add64(R3, R2),
        asm.stx(Size.DW, FP, TCP_OPT_I, R3),
        asm.ja(loop),
        Label(one),
        asm.ldx(Size.DW, R3, FP, TCP_OPT_I),
        asm.add64(R3, 1),
        asm.stx(Size.DW, FP, TCP_OPT_I, R3),
        asm.ja(loop),
        Label(bad),
        asm.st(Size.W, R7, TCP_OPT_STATE, TCP_OPT_BAD),
        Label(done),
        asm.st(Size.DW, FP, SCRATCH, 0),
    ]


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


def func_btf(funcs: Sequence[tuple[str, FuncKind]],
             meta: int = META_SIZE) -> tuple[bytes, list[int]]:
    """A raw BTF blob declaring ``funcs`` (C identifiers) and the meta area type, ``meta``
    bytes long (meta_size of the program); returns it with each function's FUNC type id, for
    bpf_func_info."""
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
    t_arr = add(0, _BTF_ARRAY, 0, 0, struct.pack("<III", t_u8, t_int, meta))
    t_meta = add(name("bpfilter_meta"), _BTF_STRUCT, 1, meta,
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
