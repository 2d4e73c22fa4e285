"""REJECT: drop the packet and have the responder send the reply iptables would send.

A netfilter BPF program can only answer NF_DROP or NF_ACCEPT: the verifier refuses every
helper that sends, clones or rewrites a packet (bpf_clone_redirect, bpf_skb_store_bytes,
bpf_redirect: "program of this type cannot use helper", checked on this kernel) and its skb
dynptr is read-only. So REJECT compiles to: push a *reject event* into a ring buffer, then
DROP (iptables' REJECT drops the original too). The event carries what nf_send_unreach /
nf_send_reset (and their IPv6 twins) look at: the hook, the reply type, skb->len, the
checksum state of the skb (ip_summed, csum_valid, csum), the mark, the route's RTCF_* flags
(IPv4), the device names and the packet from its network header. A per-namespace responder
process (bpfilter/responder.py) reads the ring and sends the reply from a raw socket; the
reply itself is computed by the pure functions of bpfilter/reject_reply.py.

Limits, by construction: the reply leaves microseconds after the drop, from user space; when
the responder is not running REJECT degrades to DROP (loading commands start it and fail
when they cannot; `bpfilter status` shows it). Packet bytes are read with
``bpf_probe_read_kernel`` from the linear part of the skb (as codegen/log does), so an skb
whose payload sits in pages records a shorter capture (``caplen``) and the ICMP error quotes
less of it than the kernel would.

A full ring loses the event (the packet is still dropped) and counts it in ``reject_drops``.
"""

from __future__ import annotations

from bpfilter.codegen import asm
from bpfilter.codegen import flavor_netfilter as nf
from bpfilter.codegen.actions import Action
from bpfilter.codegen.asm import Label
from bpfilter.codegen.helpers import BpfFunc
from bpfilter.codegen.insn import FP, R0, R1, R2, R3, R7
from bpfilter.codegen.log import RECORD_SLOT, capture_linear, probe
from bpfilter.codegen.matchers import Emitter
from bpfilter.codegen.opcodes import Size
from bpfilter.codegen.spec import MapSpec
from bpfilter.codegen.uapi import MapType, NfHook, NfVerdict
from bpfilter.ir.model import Rule, Target

RING = "reject_events"  # the ring buffer map (one per compiled ruleset)
DROPS = "reject_drops"  # per-CPU u64 count of events lost to a full ring
RING_BYTES = 2 << 20  # about 6,000 events of small packets, 1,300 of large ones
RING_SPEC = MapSpec(RING, MapType.RINGBUF, 0, 0, RING_BYTES)
DROPS_SPEC = MapSpec(DROPS, MapType.PERCPU_ARRAY, 4, 8, 1)

# xt_REJECT's hooks (reject_tg_reg.hooks): the responder also relies on the packet having
# been routed (its dst says local/broadcast/multicast).
HOOKS = frozenset({NfHook.LOCAL_IN, NfHook.FORWARD, NfHook.LOCAL_OUT})

TCP_RESET = 0xFF  # the event's code for --reject-with tcp-reset
# --reject-with -> ICMP destination-unreachable code, as reject_tg / reject_tg6 send them.
ICMP_CODES = {
    "icmp-net-unreachable": 0,  # ICMP_NET_UNREACH
    "icmp-host-unreachable": 1,  # ICMP_HOST_UNREACH
    "icmp-proto-unreachable": 2,  # ICMP_PROT_UNREACH
    "icmp-port-unreachable": 3,  # ICMP_PORT_UNREACH
    "icmp-net-prohibited": 9,  # ICMP_NET_ANO
    "icmp-host-prohibited": 10,  # ICMP_HOST_ANO
    "icmp-admin-prohibited": 13,  # ICMP_PKT_FILTERED
}
ICMP6_CODES = {
    "icmp6-no-route": 0,  # ICMPV6_NOROUTE
    "icmp6-adm-prohibited": 1,  # ICMPV6_ADM_PROHIBITED
    "icmp6-addr-unreachable": 3,  # ICMPV6_ADDR_UNREACH
    "icmp6-port-unreachable": 4,  # ICMPV6_PORT_UNREACH
    "icmp6-policy-fail": 5,  # ICMPV6_POLICY_FAIL
    "icmp6-reject-route": 6,  # ICMPV6_REJECT_ROUTE
}

# --- the event record (little-endian, as the program writes it) -----------------------------
OFF_FAMILY = 0  # u8 4 or 6
OFF_HOOK = 1  # u8 NfHook
OFF_CODE = 2  # u8 ICMP/ICMPv6 code, or TCP_RESET
OFF_SKB_LEN = 4  # u32 skb->len
OFF_CAPLEN = 8  # u32 packet bytes captured from the network header (<= CAPTURE)
OFF_SKB_BITS = 12  # u32 the 4 sk_buff bytes from pkt_type's: pkt_type, ip_summed, csum_valid
OFF_CSUM = 16  # u32 skb->csum
OFF_MARK = 20  # u32 skb->mark
OFF_RT_FLAGS = 24  # u32 IPv4: rt_flags of the skb's route (0 without one); IPv6: 0
OFF_DATA_LEN = 28  # u32 skb->data_len (bytes outside the linear part)
OFF_DST = 32  # u64 scratch: the dst pointer, zeroed before submit
OFF_DATA = 40  # u64 scratch: skb->data, zeroed before submit
OFF_IN = 48  # char[16] input device name (zero when none)
OFF_OUT = 64  # char[16] output device name
OFF_PKT = 80  # CAPTURE bytes from the network header
# Enough for any quote (IPv6: 1232 bytes) and, at the usual 1500-byte MTU, the whole packet,
# which a checksum check of a CHECKSUM_NONE skb sums.
CAPTURE = 1500
RECORD_SIZE = OFF_PKT + CAPTURE
SMALL_CAPTURE = 256  # the record of a packet this short holds all of it in 336 bytes
SKB_DST_PTRMASK = ~1  # _skb_refdst's low bit is SKB_DST_NOREF



def reject_code(target: Target, family: int) -> int:
    """The event's code for this REJECT target (the front end filled in the default)."""
    o = target.get("--reject-with")
    name = str(o.value) if o is not None else (
        "icmp-port-unreachable" if family == 4 else "icmp6-port-unreachable")
    if name == "tcp-reset":
        return TCP_RESET
    return (ICMP_CODES if family == 4 else ICMP6_CODES)[name]


def _record(em: Emitter, target: Target, capture: int, lost: str, drop: str) -> list[nf.Item]:
    """Reserve a record with room for ``capture`` packet bytes, fill and submit it, then
    jump to ``drop`` (to ``lost`` when the ring is full)."""
    hook = int(em.hook) if em.hook is not None else 0xFF
    out: list[nf.Item] = [
        asm.ld_map_fd(R1, em.res.shared(RING_SPEC)), asm.mov64(R2, OFF_PKT + capture),
        asm.mov64(R3, 0),
        asm.call_helper(BpfFunc.ringbuf_reserve),
        asm.jmp("jeq", R0, 0, lost),
        asm.stx(Size.DW, FP, RECORD_SLOT, R0),
        asm.st(Size.B, R0, OFF_FAMILY, em.family), asm.st(Size.B, R0, OFF_HOOK, hook),
        asm.st(Size.B, R0, OFF_CODE, reject_code(target, em.family)),
        asm.st(Size.B, R0, OFF_CODE + 1, 0),
        asm.st(Size.W, R0, OFF_CAPLEN, 0),
        asm.st(Size.DW, R0, OFF_RT_FLAGS, 0),  # rt_flags and data_len, filled below
        asm.st(Size.DW, R0, OFF_DST, 0),
    ]
    for off, meta in ((OFF_SKB_LEN, nf.SKB_LEN), (OFF_MARK, nf.MARK)):
        out += [asm.ldx(Size.W, R1, R7, meta), asm.stx(Size.W, R0, off, R1)]
    for off, meta in ((OFF_IN, nf.IN_NAME), (OFF_OUT, nf.OUT_NAME)):
        out += [asm.ldx(Size.DW, R1, R7, meta), asm.stx(Size.DW, R0, off, R1),
                asm.ldx(Size.DW, R1, R7, meta + 8), asm.stx(Size.DW, R0, off + 8, R1)]
    out += [
        *probe(OFF_SKB_BITS, 4, nf.KField.SKB_PKT_TYPE),
        *probe(OFF_CSUM, 4, nf.KField.SKB_CSUM),
        *probe(OFF_DATA, 8, nf.KField.SKB_DATA),
        *probe(OFF_DATA_LEN, 4, nf.KField.SKB_DATA_LEN),
    ]
    if em.family == 4:
        # skb_rtable(skb)->rt_flags: icmp_send and nf_send_reset look at RTCF_LOCAL,
        # RTCF_BROADCAST and RTCF_MULTICAST.
        no_dst = em.label("reject_nodst")
        out += [
            *probe(OFF_DST, 8, nf.KField.SKB_REFDST),
            asm.ldx(Size.DW, R1, FP, RECORD_SLOT), asm.ldx(Size.DW, R2, R1, OFF_DST),
            asm.and64(R2, SKB_DST_PTRMASK),
            asm.jmp("jeq", R2, 0, no_dst),
            asm.stx(Size.DW, R1, OFF_DST, R2),
            *probe(OFF_RT_FLAGS, 4, nf.KField.RT_FLAGS, OFF_DST),
            Label(no_dst),
        ]
    # The packet: min(skb_headlen, capture) bytes from skb->data (the network header at
    # these hooks).
    out += capture_linear(em, "reject", capture, skb_len=OFF_SKB_LEN, data_len=OFF_DATA_LEN,
                          caplen=OFF_CAPLEN, data=OFF_DATA, pkt=OFF_PKT)
    out += [
        asm.ldx(Size.DW, R1, FP, RECORD_SLOT),
        # Kernel addresses never reach user space.
        asm.st(Size.DW, R1, OFF_DST, 0), asm.st(Size.DW, R1, OFF_DATA, 0),
        asm.mov64(R2, 0),
        asm.call_helper(BpfFunc.ringbuf_submit),
        asm.ja(drop),
    ]
    return out


def emit_reject(em: Emitter, rule: Rule, target: Target) -> None:
    """Push one event, then DROP. A packet of at most SMALL_CAPTURE bytes (a SYN, a probe)
    takes a small record, so a burst of them fits the ring several times over; a full ring
    counts a lost event."""
    drops = em.res.shared(DROPS_SPEC)
    lost, drop, big = em.label("reject_lost"), em.label("reject_drop"), em.label("reject_big")
    out: list[nf.Item] = [
        asm.ldx(Size.W, R1, R7, nf.SKB_LEN),
        asm.jmp("jgt", R1, SMALL_CAPTURE, big),
        *_record(em, target, SMALL_CAPTURE, lost, drop),
        Label(big),
        *_record(em, target, CAPTURE, lost, drop),
        Label(lost),
        asm.st(Size.W, FP, RECORD_SLOT, 0),
        asm.ld_map_fd(R1, drops), asm.mov64(R2, FP), asm.add64(R2, RECORD_SLOT),
        asm.call_helper(BpfFunc.map_lookup_elem),
        asm.jmp("jeq", R0, 0, drop),
        asm.mov64(R1, 1),
        asm.atomic_add(Size.DW, R0, 0, R1),
        Label(drop),
        *nf.verdict(NfVerdict.DROP, "REJECT (the responder sends the reply)"),
    ]
    em.emit(*out)


def _check(t: Target) -> str | None:
    o = t.get("--reject-with")
    if o is not None and str(o.value) not in (*ICMP_CODES, *ICMP6_CODES, "tcp-reset"):
        return f"target 'REJECT' --reject-with {o.value} is not supported"
    return None


ACTIONS = (
    Action("REJECT", emit_reject, frozenset({"--reject-with"}), hooks=frozenset(HOOKS),
           needs=nf.Needs(devices=True, mark=True, skb=True), check=_check,
           why_not="xt_REJECT runs at INPUT, FORWARD and OUTPUT only"),
)
