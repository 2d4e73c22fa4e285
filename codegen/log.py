"""LOG and NFLOG targets: one event per logged packet in a ring buffer, read by `bpfilter log`.

Both are non-terminal (XT_CONTINUE): the event is pushed and the next rule runs. The event is
self-describing (the target's prefix, level and flags are constants written into it), so
`bpfilter log` formats it without the ruleset that produced it, whatever generation that was.

Rule code runs in global functions that see the packet only through the meta area, so the
parts of the packet the kernel's LOG prints and the meta area lacks (IP and TCP options, an
ICMP error's quoted packet, the MAC header) are read with ``bpf_probe_read_kernel`` from the
sk_buff whose address the prologue keeps in the meta area (``Needs.skb``). That reads the
linear part of the skb only: at the netfilter hooks the IP stack has pulled the IP header
there, and in practice the transport header too; an event whose headers were not linear
records a shorter capture (``caplen``) and `bpfilter log` says so instead of guessing.
``--log-uid`` walks skb->sk the same way and compares the socket's namespace with the hook's
(``Needs.hook_net``), as nf_log_dump_sk_uid_gid does.

Each LOG costs about 185 instructions where it stands and the verifier walks them for every
rule (about 415 verified instructions each): some 2,000 LOG rules fit in one program's budget
of a million (2,100 loaded here in 26 s of verification); past that the loader refuses the
program naming the rule's line.

A full ring drops the event (the packet is unaffected) and counts it in ``log_drops``
(per-CPU array, key 0), which `bpfilter log` reports.
"""

from __future__ import annotations

from bpfilter.codegen import asm
from bpfilter.codegen import flavor_netfilter as nf
from bpfilter.codegen.actions import Action
from bpfilter.codegen.asm import Label
from bpfilter.codegen.helpers import BpfFunc
from bpfilter.codegen.insn import FP, R0, R1, R2, R3, R7
from bpfilter.codegen.matchers import Emitter
from bpfilter.codegen.opcodes import Size
from bpfilter.codegen.spec import MapSpec
from bpfilter.codegen.uapi import MapType
from bpfilter.ir.model import Rule, Target

RING = "log_events"  # the ring buffer map (one per compiled ruleset)
DROPS = "log_drops"  # per-CPU u64 count of events lost to a full ring
RING_BYTES = 1 << 20
RING_SPEC = MapSpec(RING, MapType.RINGBUF, 0, 0, RING_BYTES)
DROPS_SPEC = MapSpec(DROPS, MapType.PERCPU_ARRAY, 4, 8, 1)

KIND_LOG = 0
KIND_NFLOG = 1

# xt_LOG.h logflags
LOG_TCPSEQ = 0x01
LOG_TCPOPT = 0x02
LOG_IPOPT = 0x04
LOG_UID = 0x08
LOG_MACDECODE = 0x20
LOG_FLAG_OPTIONS = {"--log-tcp-sequence": LOG_TCPSEQ, "--log-tcp-options": LOG_TCPOPT,
                    "--log-ip-options": LOG_IPOPT, "--log-uid": LOG_UID,
                    "--log-macdecode": LOG_MACDECODE}
TCP_TIME_WAIT = 6  # sk_state values that are not full sockets (sk_fullsock)
TCP_NEW_SYN_RECV = 12
DEFAULT_LEVEL = 4  # xt_LOG: warning
NO_COPY_LEN = 0xFFFFFFFF  # NFLOG without --nflog-size: the whole packet

# --- the event record (little-endian, as the program writes it) -----------------------------
OFF_TS = 0  # u64 bpf_ktime_get_ns()
OFF_RULE = 8  # u32 the rule's position in its chain (from 1, as iptables -L --line-numbers)
OFF_HOOK = 12  # u8 NfHook
OFF_FAMILY = 13  # u8 4 or 6
OFF_KIND = 14  # u8 KIND_LOG / KIND_NFLOG
OFF_LEVEL = 15  # u8 --log-level
OFF_SKB_LEN = 16  # u32 skb->len
OFF_MARK = 20  # u32 skb->mark
OFF_IN = 24  # char[16] input device name (zero when none)
OFF_OUT = 40  # char[16] output device name
OFF_CAPLEN = 56  # u32 packet bytes captured from the network header (<= CAPTURE)
OFF_DATA_LEN = 60  # u32 skb->data_len (bytes outside the linear part)
OFF_DATA = 64  # u64 scratch: skb->data, zeroed before submit
OFF_HEAD = 72  # u64 scratch: skb->head, zeroed before submit
OFF_DEV = 80  # u64 scratch: skb->dev, zeroed before submit
OFF_MAC_HEADER = 88  # u16 skb->mac_header (0xffff: not set)
OFF_NETWORK_HEADER = 90  # u16 skb->network_header
OFF_DEV_TYPE = 92  # u16 skb->dev->type (ARPHRD_*)
OFF_HH_LEN = 94  # u16 skb->dev->hard_header_len
OFF_VLAN = 96  # u32 skb->vlan_all: vlan_proto (network order) then vlan_tci
OFF_FLAGS = 100  # u8 LOG logflags
OFF_GROUP = 102  # u16 --nflog-group
OFF_COPY_LEN = 104  # u32 --nflog-size (NO_COPY_LEN when not given)
OFF_THRESHOLD = 108  # u16 --nflog-threshold
OFF_PREFIX = 112  # char[64] --log-prefix / --nflog-prefix, NUL padded
PREFIX_MAX = 64
OFF_TABLE = 176  # char[8] the rule's table
TABLE_MAX = 8
OFF_CHAIN = 184  # char[32] the rule's chain
CHAIN_MAX = 32
OFF_UID = 216  # u32 fsuid of the socket's file (--log-uid), when OFF_UID_OK
OFF_GID = 220  # u32 its fsgid
OFF_UID_OK = 224  # u32 1 when nf_log_dump_sk_uid_gid() would print UID= and GID=
OFF_MAC = 232  # MAC_MAX bytes from skb->head + skb->mac_header
MAC_MAX = 64
OFF_PKT = 296  # CAPTURE bytes from the network header
CAPTURE = 256  # IPv4: 60 + 8 + 60 + 60 (ICMP error quoting a TCP header with options)
RECORD_SIZE = OFF_PKT + CAPTURE
MAC_UNSET = 0xFFFF
ARPHRD_SIT = 776  # if_arp.h: an IPv6-in-IPv4 tunnel
ETH_HLEN = 14

RECORD_SLOT = -8  # the reserved record's address, spilled on the global function's stack


def probe(off: int, size: int, field: nf.KField, base_off: int | None = None) -> list[nf.Item]:
    """``bpf_probe_read_kernel(rec + off, size, base + offsetof(field))``; base is the sk_buff
    (from the meta area) or, with ``base_off``, a pointer already stored in the record."""
    src: list[nf.Item]
    if base_off is None:
        src = [asm.ldx(Size.DW, R3, R7, nf.SKB_ADDR)]
    else:
        src = [asm.ldx(Size.DW, R3, FP, RECORD_SLOT), asm.ldx(Size.DW, R3, R3, base_off)]
    return [*src, nf.FieldAddress(R3, field),
            asm.ldx(Size.DW, R1, FP, RECORD_SLOT), asm.add64(R1, off), asm.mov64(R2, size),
            asm.call_helper(BpfFunc.probe_read_kernel)]


def capture_linear(em: Emitter, what: str, capture: int, *, skb_len: int, data_len: int,
                   caplen: int, data: int, pkt: int) -> list[nf.Item]:
    """Copy min(skb_headlen, ``capture``) bytes from skb->data to record offset ``pkt`` and
    store the count at ``caplen`` (0 when the read fails); the record already holds
    skb->len, skb->data_len and skb->data at the given offsets (LOG and REJECT records)."""
    no_pkt, sized = em.label(f"{what}_nopkt"), em.label(f"{what}_sized")
    return [asm.ldx(Size.DW, R1, FP, RECORD_SLOT),
            asm.ldx(Size.W, R2, R1, skb_len), asm.ldx(Size.W, R3, R1, data_len),
            asm.jmp("jge", R3, R2, no_pkt),
            asm.sub64(R2, R3),
            asm.jmp("jle", R2, capture, sized),
            asm.mov64(R2, capture),
            Label(sized),
            asm.stx(Size.W, R1, caplen, R2),
            asm.ldx(Size.DW, R3, R1, data),
            asm.add64(R1, pkt),
            asm.call_helper(BpfFunc.probe_read_kernel),
            asm.jmp("jeq", R0, 0, no_pkt),
            asm.ldx(Size.DW, R1, FP, RECORD_SLOT), asm.st(Size.W, R1, caplen, 0),
            Label(no_pkt)]


def _string(rec: list[nf.Item], off: int, size: int, text: str) -> None:
    raw = text.encode()[:size - 1].ljust(size, b"\0")
    for i in range(0, size, 4):
        word = int.from_bytes(raw[i:i + 4], "little")
        rec.append(asm.st(Size.W, R0, off + i, asm.imm32(word)))


def _constants(rec: list[nf.Item], kind: int, level: int, flags: int, group: int,
               copy_len: int, threshold: int, prefix: str) -> None:
    rec += [asm.st(Size.B, R0, OFF_KIND, kind), asm.st(Size.B, R0, OFF_LEVEL, level),
            asm.st(Size.B, R0, OFF_FLAGS, flags), asm.st(Size.H, R0, OFF_GROUP, group),
            asm.st(Size.W, R0, OFF_COPY_LEN, asm.imm32(copy_len)),
            asm.st(Size.H, R0, OFF_THRESHOLD, threshold)]
    _string(rec, OFF_PREFIX, PREFIX_MAX, prefix)


def emit_event(em: Emitter, kind: int, level: int = DEFAULT_LEVEL, flags: int = 0,
               group: int = 0, copy_len: int = NO_COPY_LEN, threshold: int = 1,
               prefix: str = "") -> None:
    """Reserve, fill and submit one event; on a full ring count a drop. Uses R0-R5 and the
    stack slot at FP-8 only, so it can sit anywhere a rule's action goes."""
    ring = em.res.shared(RING_SPEC)
    drops = em.res.shared(DROPS_SPEC)
    dropped, done = em.label("log_drop"), em.label("log_done")
    hook = int(em.hook) if em.hook is not None else 0xFF
    # Emitter.prefix is "<chain>#<position>", the same wherever the chain is emitted.
    chain, _, pos = em.prefix.rpartition("#")
    position = int(pos) if pos.isdigit() else 0
    out: list[nf.Item] = [
        asm.ld_map_fd(R1, ring), asm.mov64(R2, RECORD_SIZE), asm.mov64(R3, 0),
        asm.call_helper(BpfFunc.ringbuf_reserve),
        asm.jmp("jeq", R0, 0, dropped),
        asm.stx(Size.DW, FP, RECORD_SLOT, R0),
        asm.st(Size.W, R0, OFF_RULE, position),
        asm.st(Size.B, R0, OFF_HOOK, hook), asm.st(Size.B, R0, OFF_FAMILY, em.family),
        # mac_header, network_header (read below), dev type and hard_header_len (without a
        # device: zero).
        asm.st(Size.DW, R0, OFF_MAC_HEADER, 0),
        asm.st(Size.W, R0, OFF_VLAN, 0),
        asm.st(Size.W, R0, OFF_CAPLEN, 0),
        asm.st(Size.W, R0, OFF_UID_OK, 0),
    ]
    _constants(out, kind, level, flags, group, copy_len, threshold, prefix)
    _string(out, OFF_TABLE, TABLE_MAX, em.table)
    _string(out, OFF_CHAIN, CHAIN_MAX, chain)
    for off, meta in ((OFF_SKB_LEN, nf.SKB_LEN), (OFF_MARK, nf.MARK)):
        out += [asm.ldx(Size.W, R1, R7, meta), asm.stx(Size.W, R0, off, R1)]
    for off, meta in ((OFF_IN, nf.IN_NAME), (OFF_OUT, nf.OUT_NAME)):
        out += [asm.ldx(Size.DW, R1, R7, meta), asm.stx(Size.DW, R0, off, R1),
                asm.ldx(Size.DW, R1, R7, meta + 8), asm.stx(Size.DW, R0, off + 8, R1)]
    out += [
        *probe(OFF_DATA, 8, nf.KField.SKB_DATA),
        *probe(OFF_HEAD, 8, nf.KField.SKB_HEAD),
        *probe(OFF_DEV, 8, nf.KField.SKB_DEV),
        *probe(OFF_DATA_LEN, 4, nf.KField.SKB_DATA_LEN),
        *probe(OFF_MAC_HEADER, 2, nf.KField.SKB_MAC_HEADER),
        *probe(OFF_NETWORK_HEADER, 2, nf.KField.SKB_NETWORK_HEADER),
        *probe(OFF_VLAN, 4, nf.KField.SKB_VLAN_ALL),
    ]
    no_dev = em.label("log_nodev")
    out += [asm.ldx(Size.DW, R1, FP, RECORD_SLOT), asm.ldx(Size.DW, R1, R1, OFF_DEV),
            asm.jmp("jeq", R1, 0, no_dev),
            *probe(OFF_DEV_TYPE, 2, nf.KField.DEV_TYPE, OFF_DEV),
            *probe(OFF_HH_LEN, 2, nf.KField.DEV_HARD_HEADER_LEN, OFF_DEV),
            Label(no_dev)]
    # The MAC header: MAC_MAX bytes from head + mac_header, when it was set. dump_mac_header
    # prints a sit tunnel's bytes from ETH_HLEN before it (none when that is before head).
    no_mac, plain = em.label("log_nomac"), em.label("log_mac")
    out += [asm.ldx(Size.DW, R1, FP, RECORD_SLOT), asm.ldx(Size.H, R3, R1, OFF_MAC_HEADER),
            asm.jmp("jeq", R3, MAC_UNSET, no_mac),
            asm.ldx(Size.H, R2, R1, OFF_DEV_TYPE), asm.jmp("jne", R2, ARPHRD_SIT, plain),
            asm.jmp("jlt", R3, ETH_HLEN, plain),
            asm.sub64(R3, ETH_HLEN),
            Label(plain),
            asm.ldx(Size.DW, R2, R1, OFF_HEAD), asm.add64(R3, R2),
            asm.add64(R1, OFF_MAC), asm.mov64(R2, MAC_MAX),
            asm.call_helper(BpfFunc.probe_read_kernel),
            Label(no_mac)]
    # The packet: min(skb_headlen, CAPTURE) bytes from skb->data (the network header here).
    out += capture_linear(em, "log", CAPTURE, skb_len=OFF_SKB_LEN, data_len=OFF_DATA_LEN,
                          caplen=OFF_CAPLEN, data=OFF_DATA, pkt=OFF_PKT)
    if flags & LOG_UID:
        out += _uid(em)
    out += [
        asm.call_helper(BpfFunc.ktime_get_ns),
        asm.ldx(Size.DW, R1, FP, RECORD_SLOT),
        asm.stx(Size.DW, R1, OFF_TS, R0),
        asm.st(Size.DW, R1, OFF_DATA, 0), asm.st(Size.DW, R1, OFF_HEAD, 0),
        asm.st(Size.DW, R1, OFF_DEV, 0),
        asm.mov64(R2, 0),
        asm.call_helper(BpfFunc.ringbuf_submit),
        asm.ja(done),
        Label(dropped),
        asm.st(Size.W, FP, RECORD_SLOT, 0),
        asm.ld_map_fd(R1, drops), asm.mov64(R2, FP), asm.add64(R2, RECORD_SLOT),
        asm.call_helper(BpfFunc.map_lookup_elem),
        asm.jmp("jeq", R0, 0, done),
        asm.mov64(R1, 1),
        asm.atomic_add(Size.DW, R0, 0, R1),
        Label(done),
    ]
    em.emit(*out)


def _uid(em: Emitter) -> list[nf.Item]:
    """nf_log_dump_sk_uid_gid(): skb->sk, when a full socket of the hook's namespace, gives
    sk_socket->file->f_cred->fsuid/fsgid (values in the initial user namespace, as
    from_kuid_munged(&init_user_ns) prints them). The pointer chain is walked with probe
    reads into the record's scratch words (OFF_DATA), which are zeroed before submit."""
    done = em.label("log_uid_done")

    def step(field: nf.KField, size: int = 8, to: int = OFF_DATA) -> list[nf.Item]:
        return probe(to, size, field, OFF_DATA)

    return [
        *probe(OFF_DATA, 8, nf.KField.SKB_SK),
        asm.ldx(Size.DW, R1, FP, RECORD_SLOT), asm.ldx(Size.DW, R2, R1, OFF_DATA),
        asm.jmp("jeq", R2, 0, done),
        asm.st(Size.DW, R1, OFF_HEAD, 0),
        *step(nf.KField.SOCK_STATE, 1, OFF_HEAD),
        asm.ldx(Size.DW, R1, FP, RECORD_SLOT), asm.ldx(Size.B, R2, R1, OFF_HEAD),
        asm.jmp("jeq", R2, TCP_TIME_WAIT, done), asm.jmp("jeq", R2, TCP_NEW_SYN_RECV, done),
        *step(nf.KField.SOCK_NET, 8, OFF_HEAD),
        asm.ldx(Size.DW, R1, FP, RECORD_SLOT), asm.ldx(Size.DW, R2, R1, OFF_HEAD),
        asm.ldx(Size.DW, R3, R7, nf.NET_ADDR),
        asm.jmp("jne", R2, R3, done),
        *step(nf.KField.SOCK_SOCKET),
        asm.ldx(Size.DW, R1, FP, RECORD_SLOT), asm.ldx(Size.DW, R2, R1, OFF_DATA),
        asm.jmp("jeq", R2, 0, done),
        *step(nf.KField.SOCKET_FILE),
        asm.ldx(Size.DW, R1, FP, RECORD_SLOT), asm.ldx(Size.DW, R2, R1, OFF_DATA),
        asm.jmp("jeq", R2, 0, done),
        *step(nf.KField.FILE_CRED),
        asm.ldx(Size.DW, R1, FP, RECORD_SLOT), asm.ldx(Size.DW, R2, R1, OFF_DATA),
        asm.jmp("jeq", R2, 0, done),
        *step(nf.KField.CRED_FSUID, 4, OFF_UID),
        *step(nf.KField.CRED_FSGID, 4, OFF_GID),
        asm.ldx(Size.DW, R1, FP, RECORD_SLOT), asm.st(Size.W, R1, OFF_UID_OK, 1),
        Label(done),
    ]


def _value(t: Target, name: str, default: int) -> int:
    o = t.get(name)
    return default if o is None else int(o.value)


def emit_log(em: Emitter, rule: Rule, target: Target) -> None:
    flags = 0
    for name, bit in LOG_FLAG_OPTIONS.items():
        if target.get(name) is not None:
            flags |= bit
    o = target.get("--log-prefix")
    emit_event(em, KIND_LOG, level=_value(target, "--log-level", DEFAULT_LEVEL), flags=flags,
               prefix="" if o is None else str(o.value))


def emit_nflog(em: Emitter, rule: Rule, target: Target) -> None:
    o = target.get("--nflog-prefix")
    size = target.get("--nflog-size")
    emit_event(em, KIND_NFLOG, group=_value(target, "--nflog-group", 0),
               copy_len=NO_COPY_LEN if size is None else int(size.value),
               threshold=_value(target, "--nflog-threshold", 1),
               prefix="" if o is None else str(o.value))


_NEEDS = nf.Needs(devices=True, mark=True, skb=True, hook_net=True)

# Netfilter hooks only (Action's default): the events are read from the hook's sk_buff.
_WHY_NOT = "its events are read from the sk_buff and state of a netfilter hook"

ACTIONS = (
    Action("LOG", emit_log, frozenset({"--log-level", "--log-prefix", *LOG_FLAG_OPTIONS}),
           needs=_NEEDS, terminal=False, why_not=_WHY_NOT),
    Action("NFLOG", emit_nflog, frozenset({"--nflog-group", "--nflog-prefix", "--nflog-range",
                                           "--nflog-size", "--nflog-threshold"}),
           needs=_NEEDS, terminal=False, why_not=_WHY_NOT),
)
