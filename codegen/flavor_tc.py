"""The TC flavor (sched_cls at tcx ingress or egress), and the MARK target it makes possible.

A TC program sees the sk_buff through ``struct __sk_buff``: the mark (readable and writable),
the packet type, and whether the driver took a VLAN tag out of the frame. DROP is
TC_ACT_SHOT; ACCEPT is TCX_NEXT (TC_ACT_UNSPEC): like an iptables ACCEPT, it ends this
ruleset's say and leaves the packet to whatever runs after it (other tcx programs, clsact
filters), which pass it when there is nothing. See flavor_packet for the prologue.

MARK (``--set-xmark``, which the front end makes of every MARK option) changes the meta
area's copy of the mark, so later ``-m mark`` tests see it as they see xt_MARK's write to
skb->mark; the main function's exit stores the copy into ``__sk_buff.mark``. Netfilter BPF
programs cannot write skb->mark (their context is read-only), so MARK runs at TC only.
"""

from __future__ import annotations

from dataclasses import dataclass

from bpfilter.codegen import asm
from bpfilter.codegen import flavor_netfilter as nf
from bpfilter.codegen.actions import Action
from bpfilter.codegen.flavor_packet import CONNTRACK_NEEDS, PASS, PacketFlavor
from bpfilter.codegen.insn import R0, R1, R6, R7, R8
from bpfilter.codegen.matchers import Emitter
from bpfilter.codegen.opcodes import Size
from bpfilter.codegen.uapi import (
    PKT_TYPE_MAX,
    AttachType,
    IfHook,
    PacketType,
    ProgType,
    SkBuffCtx,
    TcAction,
)
from bpfilter.ir.model import Rule, Target

U32 = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class TcFlavor(PacketFlavor):
    """TC: facts from ``__sk_buff`` (R6) and the mark written back at the exit."""

    def context_facts(self, needs: nf.Needs) -> list[nf.Item]:
        out: list[nf.Item] = [
            asm.ldx(Size.W, R1, R6, SkBuffCtx.VLAN_PRESENT),
            asm.jmp("jne", R1, 0, PASS, comment="VLAN-tagged: filtered on the VLAN device"),
        ]
        if any(getattr(needs, n) for n in CONNTRACK_NEEDS):
            # At egress the packet went through conntrack at LOCAL_OUT or PRE_ROUTING: the
            # sk_buff holds the entry and ctinfo the filter table saw, read as at netfilter.
            assert self.hook is IfHook.TC_EGRESS  # refused at ingress (flavor_packet)
            out += [asm.mov64(R1, R6),
                    asm.call_kfunc("bpf_cast_to_kern_ctx", comment="r0 = (struct sk_buff *)"),
                    asm.mov64(R8, R0, comment="r8 = skb"),
                    *nf._conntrack(needs)]
        if self.hook is IfHook.TC_INGRESS:
            out += [
                asm.ldx(Size.W, R1, R6, SkBuffCtx.PKT_TYPE),
                asm.jmp("jeq", R1, PacketType.OTHERHOST, PASS,
                        comment="for another host: ip_rcv drops it"),
            ]
            if needs.pkt_type:
                out += [asm.and64(R1, PKT_TYPE_MAX), asm.stx(Size.W, R7, nf.PKT_TYPE, R1)]
        if needs.mark:
            out += [asm.ldx(Size.W, R1, R6, SkBuffCtx.MARK), asm.stx(Size.W, R7, nf.MARK, R1)]
        return out

    def before_exit(self, needs: nf.Needs) -> list[nf.Item]:
        if not needs.mark:
            return []
        # Unchanged unless a MARK target ran: the meta copy was loaded from the context first.
        return [asm.ldx(Size.W, R1, R7, nf.MARK), asm.stx(Size.W, R6, SkBuffCtx.MARK, R1,
                                                            comment="skb->mark = meta mark")]


TC_INGRESS = TcFlavor(IfHook.TC_INGRESS, ProgType.SCHED_CLS, AttachType.TCX_INGRESS,
                      "bpf_dynptr_from_skb", accept=TcAction.NEXT, drop=TcAction.SHOT,
                      ctx_data=SkBuffCtx.DATA, ctx_data_end=SkBuffCtx.DATA_END)
TC_EGRESS = TcFlavor(IfHook.TC_EGRESS, ProgType.SCHED_CLS, AttachType.TCX_EGRESS,
                     "bpf_dynptr_from_skb", accept=TcAction.NEXT, drop=TcAction.SHOT,
                     ctx_data=SkBuffCtx.DATA, ctx_data_end=SkBuffCtx.DATA_END,
                     extra_kfuncs=("bpf_cast_to_kern_ctx",))


def emit_mark(em: Emitter, rule: Rule, target: Target) -> None:
    # xt_MARK (mark_tg): skb->mark = (skb->mark & ~mask) ^ mark.
    o = target.get("--set-xmark")
    assert o is not None
    mark, mask = o.value
    em.emit(asm.ldx(Size.W, R1, R7, nf.MARK))
    if mask != 0:
        em.emit(asm.alu32("and", R1, ~mask & U32))
    if mark != 0:
        em.emit(asm.alu32("xor", R1, mark))
    em.emit(asm.stx(Size.W, R7, nf.MARK, R1))


ACTIONS = (
    Action("MARK", emit_mark, frozenset({"--set-xmark"}),
           hooks=frozenset({IfHook.TC_INGRESS, IfHook.TC_EGRESS}), needs=nf.Needs(mark=True),
           terminal=False,
           why_not="netfilter BPF programs cannot write skb->mark (their context is "
                   "read-only); MARK runs in TC programs (bpfilter attach --tc-ingress)"),
)
