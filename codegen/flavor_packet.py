"""What the XDP and TC flavors share: the prologue over an Ethernet frame, the verdict mapping
at the main function's exit, and the reasons a rule cannot run at an interface hook.

An XDP or TC program of a ruleset runs one built-in chain of the filter table (the user
names it; ``IfTarget``) on every frame of one interface, and fills the same meta area as the
netfilter prologue (flavor_netfilter), so every matcher and the rest of the program are the
netfilter ones. What differs:

- the packet: the Ethernet header by direct packet access (EtherType, MAC source), then a
  dynptr over the frame (``bpf_dynptr_from_xdp`` / ``bpf_dynptr_from_skb``), narrowed with
  ``bpf_dynptr_adjust`` to the IP packet exactly as the IP layer trims it (``tot_len`` /
  ``payload_len + 40`` bytes after the Ethernet header), so offset 0 is the IP header and
  reads past the IP length fail as ``skb_header_pointer`` does at netfilter;
- frames iptables never sees are passed untouched and not counted: not the ruleset's IP
  version (ARP, the other family), VLAN-tagged (a tag in the frame, or at TC one the driver
  took out into ``skb->vlan_tci``: iptables would see them on the VLAN device), IP headers
  the IP layer would discard (version, header length, a length beyond the frame), and at
  TC ingress frames for another host (``PACKET_OTHERHOST``, dropped by ip_rcv);
- SKB_LEN, which the byte counters add, is the IP length: what ``skb->len`` is at the
  netfilter hooks, so ``-c`` counters agree with netfilter's;
- devices are constants: the input device at ingress, the output device at TC egress, both
  the interface the program is attached to;
- the internal verdicts (NfVerdict DROP 0 / ACCEPT 1, and RET_CONTINUE 2 which equals
  XDP_PASS) are mapped to the hook's return codes once, at the main function's exit.

Conntrack: at TC egress the packet went through conntrack (LOCAL_OUT or PRE_ROUTING) and the
sk_buff carries its entry and ctinfo, read as the netfilter prologue reads them (flavor_tc);
what changes after the filter table (SNAT binding, confirmation, timeout) is refused there
(NEED_WHY). At XDP and TC ingress conntrack has not seen the packet: the lookup kfuncs find an
entry but cannot tell NEW from INVALID or RELATED the way conntrack will, so conntrack
matches are refused. Also refused (``refusal``): the output device at ingress, the input
device at egress, and whatever a hook cannot see (XDP has no sk_buff: no mark, no packet
type).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

from bpfilter.codegen import asm
from bpfilter.codegen import flavor_netfilter as nf
from bpfilter.codegen.asm import Label
from bpfilter.codegen.helpers import BpfFunc
from bpfilter.codegen.insn import EXIT, FP, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, Insn, Reg
from bpfilter.codegen.opcodes import Size
from bpfilter.codegen.uapi import (
    ETH_ALEN,
    ETH_HLEN,
    ETH_P_IP,
    ETH_P_IPV6,
    ETH_TYPE_OFFSET,
    IFNAMSIZ,
    AttachType,
    IfHook,
    NfVerdict,
    ProgType,
)
from bpfilter.ir.model import Rule

PASS = "prologue:pass"  # leave the frame to the stack, uncounted
MAIN_EXIT = "main:exit"
IPV4_VERSION, IPV6_VERSION = 4, 6
IPV4_MIN_HEADER = 20


def be16(value: int) -> int:
    """A 16-bit network-order constant as a little-endian 16-bit load reads it."""
    return int.from_bytes(value.to_bytes(2, "big"), "little")


@dataclass(frozen=True, slots=True)
class IfTarget:
    """Where an XDP or TC program of a ruleset runs: the hook, the built-in chain of the
    filter table it runs, and the interface (its name is what -i or -o compare with; None
    when unknown, which refuses rules with -i/-o)."""

    hook: IfHook
    chain: str
    ifname: str | None = None

    def __post_init__(self) -> None:
        if self.ifname is not None and not 0 < len(self.ifname.encode()) < IFNAMSIZ:
            raise ValueError(f"interface name {self.ifname!r} must be 1-{IFNAMSIZ - 1} bytes")

    @property
    def ingress(self) -> bool:
        return self.hook is not IfHook.TC_EGRESS


DEFAULT_CHAIN = {IfHook.XDP: "INPUT", IfHook.TC_INGRESS: "INPUT", IfHook.TC_EGRESS: "OUTPUT"}

_WALK = ("routing", "fragment", "ipv6header", "tcp_options")  # from the packet's own bytes
# Needs (flavor_netfilter.Needs fields) each interface hook can fill; anything else a rule
# needs there is refused by the matcher's or target's hooks before the prologue is built.
SUPPORTED_NEEDS: dict[IfHook, frozenset[str]] = {
    IfHook.XDP: frozenset({"devices", *_WALK, "mac"}),
    IfHook.TC_INGRESS: frozenset({"devices", *_WALK, "mac", "mark", "pkt_type"}),
    IfHook.TC_EGRESS: frozenset({"devices", *_WALK, "mark", "conntrack", "ct_dir", "ct_mark"}),
}
# Why some facts are not gathered at TC egress: there the sk_buff's conntrack entry is as it
# is after every netfilter hook, and what the filter table saw differs for these.
_AFTER_FILTER = ("at TC egress the conntrack entry is seen after POSTROUTING, where the "
                 "entry is confirmed and SNAT bound: {what} is not what the filter table saw")
NEED_WHY = {
    ("conntrack_nat", IfHook.TC_EGRESS): _AFTER_FILTER.format(what="--ctstate SNAT"),
    ("ct_status", IfHook.TC_EGRESS): _AFTER_FILTER.format(what="--ctstatus"),
    ("ct_expires", IfHook.TC_EGRESS): _AFTER_FILTER.format(what="--ctexpire"),
    ("ct_tuples", IfHook.TC_EGRESS): _AFTER_FILTER.format(what="the reply tuple"),
}
CONNTRACK_NEEDS = ("conntrack", "conntrack_nat", "ct_dir", "ct_status", "ct_mark",
                   "ct_expires", "ct_tuples")

_CONNTRACK = ("conntrack state is not available at {hook}: the conntrack lookup kfuncs "
              "find an existing entry, but cannot tell NEW from INVALID or RELATED as "
              "conntrack does before the filter table sees a packet")
# Reasons for refusals bpfilter can explain, by match or target name and hook.
_WHY: dict[tuple[str, IfHook], str] = {}
for _h in (IfHook.XDP, IfHook.TC_INGRESS):  # at TC egress the sk_buff carries the entry
    for _name in ("conntrack", "state", "connmark", "CONNMARK"):
        _WHY[(_name, _h)] = _CONNTRACK
_WHY[("mark", IfHook.XDP)] = "XDP programs run before an sk_buff exists: there is no mark"
_WHY[("MARK", IfHook.XDP)] = "XDP programs run before an sk_buff exists: there is no mark"
_WHY[("pkttype", IfHook.XDP)] = "XDP programs run before the packet type is known"
_WHY[("pkttype", IfHook.TC_EGRESS)] = ("the packet type of an outgoing packet is not the one "
                                       "netfilter sees")
_WHY[("-o", IfHook.XDP)] = "there is no output device at ingress"
_WHY[("-o", IfHook.TC_INGRESS)] = "there is no output device at ingress"
_WHY[("-i", IfHook.TC_EGRESS)] = "the input device of a packet is not known at TC egress"


def needs_refusal(rule: Rule, target: IfTarget) -> str | None:
    """Why a match or target of ``rule`` cannot run at ``target``'s hook because it needs a
    fact (flavor_netfilter.Needs) this hook's prologue does not gather; else None."""
    from bpfilter.codegen.actions import actions  # actions imports the TC flavor module
    from bpfilter.codegen.matchers import MATCHERS

    parts = [(f"match '{m.kind}'", MATCHERS[m.kind].needs_for(m)) for m in rule.matches
             if m.kind in MATCHERS]
    t = rule.target
    if t is not None and t.name in actions():
        parts.append((f"target '{t.name}'", actions()[t.name].needs))
    supported = SUPPORTED_NEEDS[target.hook]
    for what, needs in parts:
        extra = [f.name for f in fields(nf.Needs)
                 if getattr(needs, f.name) and f.name not in supported]
        if extra:
            why = NEED_WHY.get((extra[0], target.hook))
            if why is not None:
                return f"{what} cannot run at {target.hook.name}: {why}"
            return (f"{what} cannot run at {target.hook.name}: it needs {', '.join(extra)}, "
                    "which the prologue there does not gather")
    return None


def refusal(rule: Rule, names: Sequence[str], target: IfTarget) -> str | None:
    """Why ``rule`` (its header fields and match/target ``names``) cannot run at
    ``target``'s hook, when bpfilter knows a reason beyond "not supported"; else None."""
    where = target.hook.name
    for name in names:
        why = _WHY.get((name, target.hook))
        if why is not None:
            kind = ("" if name.startswith("-") else
                    "target " if name[:1].isupper() else "match ")
            label = name if not kind else f"'{name}'"
            return f"{kind}{label} cannot run at {where}: {why.format(hook=where)}"
        if name in ("-i", "-o") and target.ifname is None:
            return f"{name} needs the interface the program is attached to (none given)"
    return None


@dataclass(frozen=True, slots=True)
class PacketFlavor:
    """One interface hook's strategy: program type, context facts, verdict values."""

    hook: IfHook
    prog_type: ProgType
    attach_type: AttachType
    dynptr_kfunc: str  # bpf_dynptr_from_xdp / bpf_dynptr_from_skb (ctx, flags, dynptr)
    accept: int  # the return value for ACCEPT
    drop: int  # the return value for DROP
    ctx_data: int  # context offsets of the data / data_end pointers (direct packet access)
    ctx_data_end: int
    extra_kfuncs: tuple[str, ...] = ()

    @property
    def kfuncs(self) -> tuple[str, ...]:
        return (self.dynptr_kfunc, "bpf_dynptr_size", "bpf_dynptr_adjust", *self.extra_kfuncs)

    def context_facts(self, needs: nf.Needs) -> list[nf.Item]:
        """Facts read from the context (R6) before the packet: the TC flavor's skb fields."""
        return []

    def before_exit(self, needs: nf.Needs) -> list[nf.Item]:
        """Code at the main function's exit before the verdict is mapped (R6 = ctx)."""
        return []

    def prologue(self, family: int, needs: nf.Needs, target: IfTarget) -> list[nf.Item]:
        """Fill the meta area; afterwards R7 points at it and R6 holds the context."""
        extra = [f.name for f in fields(nf.Needs)
                 if getattr(needs, f.name) and f.name not in SUPPORTED_NEEDS[self.hook]]
        if extra:  # the hooks of matchers and targets should have refused the rule
            raise ValueError(f"{self.hook.name} programs cannot gather {', '.join(extra)}")
        out: list[nf.Item] = [
            asm.mov64(R6, R1, comment="r6 = ctx"),
            *nf.meta_frame(needs),
            *self.context_facts(needs),
        ]
        if needs.devices:
            assert target.ifname is not None  # refused per rule (refusal) otherwise
            name = target.ifname.encode().ljust(IFNAMSIZ, b"\0")
            slot = nf.IN_NAME if target.ingress else nf.OUT_NAME
            for i in range(0, IFNAMSIZ, 8):
                out += [asm.ld_imm64(R1, int.from_bytes(name[i:i + 8], "little")),
                        asm.stx(Size.DW, R7, slot + i, R1)]
        out += [
            # The EtherType by direct packet access (the Ethernet header is in the linear
            # part at both hooks): frames of another protocol leave before any helper call.
            asm.ldx(Size.W, R2, R6, self.ctx_data),
            asm.ldx(Size.W, R3, R6, self.ctx_data_end),
            asm.mov64(R1, R2),
            asm.add64(R1, ETH_HLEN),
            asm.jmp("jgt", R1, R3, PASS),
            asm.ldx(Size.H, R1, R2, ETH_TYPE_OFFSET, comment="EtherType"),
            asm.jmp("jne", R1, be16(ETH_P_IP if family == 4 else ETH_P_IPV6), PASS,
                    comment="not this IP version (VLAN tags included): not ours"),
        ]
        if needs.mac:
            # xt_mac: an Ethernet device (attach refuses others) with its header in place.
            out += [asm.ldx(Size.W, R1, R2, ETH_ALEN), asm.stx(Size.W, R7, nf.MAC_SRC, R1),
                    asm.ldx(Size.H, R1, R2, ETH_ALEN + 4),
                    asm.stx(Size.H, R7, nf.MAC_SRC + 4, R1),
                    asm.st(Size.W, R7, nf.MAC_OK, 1)]
        out += [
            asm.mov64(R1, R6),
            asm.mov64(R2, 0),
            asm.mov64(R3, FP),
            asm.add64(R3, nf.DYNPTR),
            asm.call_kfunc(self.dynptr_kfunc, comment="dynptr over the frame"),
            asm.jmp("jne", R0, 0, PASS),
        ]
        out += [
            asm.mov64(R1, FP),
            asm.add64(R1, nf.DYNPTR),
            asm.call_kfunc("bpf_dynptr_size"),
            asm.mov64(R8, R0),
            asm.sub64(R8, ETH_HLEN, comment="r8 = bytes after the Ethernet header"),
        ]
        if family == 4:
            # The header is read once, by the netfilter facts, from a dynptr starting at it;
            # then it is checked and the dynptr cut to tot_len (no read went past it).
            out += [*_adjust(ETH_HLEN, R8, add=ETH_HLEN), *nf._ipv4_facts(), *_ipv4_checks()]
        else:
            # The extension header walk must not read past payload_len: cut first.
            out += [*_ipv6_length(), *_adjust(ETH_HLEN, R9, add=ETH_HLEN),
                    asm.stx(Size.W, R7, nf.SKB_LEN, R9, comment="skb->len at the IP layer"),
                    *nf._ipv6_facts(needs)]
        out += [
            Label("prologue:l4"),
            # L4_LEN = clamp(ip length - thoff, 0, L4_BYTES); copy that much of the header.
            asm.ldx(Size.W, R2, R7, nf.SKB_LEN),
            asm.sub64(R2, R9),
            asm.jmp("jsle", R2, 0, "prologue:l4done"),
            asm.jmp("jle", R2, nf.L4_BYTES, "prologue:l4read"),
            asm.mov64(R2, nf.L4_BYTES),
            Label("prologue:l4read"),
            asm.mov64(R8, R2),
            asm.mov64(R1, R7),
            asm.add64(R1, nf.L4),
            asm.mov64(R3, FP),
            asm.add64(R3, nf.DYNPTR),
            asm.mov64(R4, R9),
            asm.mov64(R5, 0),
            asm.call_helper(BpfFunc.dynptr_read),
            asm.jmp("jne", R0, 0, "prologue:l4done"),
            asm.stx(Size.W, R7, nf.L4_LEN, R8),
            asm.ja("prologue:l4done"),
            Label("prologue:unreadable"),
            Label(PASS),
            asm.mov64(R0, NfVerdict.ACCEPT, comment="not an IP packet iptables would see"),
            asm.exit_(),
            Label("prologue:l4done"),
        ]
        if needs.tcp_options:
            out += nf._tcp_options()  # R9 = thoff, the dynptr as at netfilter
        return out

    def map_exits(self, main: list[nf.Item], needs: nf.Needs) -> list[nf.Item]:
        """The main function's code with every exit going through one epilogue that maps
        NfVerdict DROP/ACCEPT to this hook's return values (other functions keep returning
        the internal codes, whose RET_CONTINUE would read as XDP_PASS)."""
        out: list[nf.Item] = []
        for it in main:
            if isinstance(it, Insn) and it.opcode == EXIT:
                out.append(asm.ja(MAIN_EXIT, comment=it.comment))
            else:
                out.append(it)
        out += [
            Label(MAIN_EXIT),
            *self.before_exit(needs),
            asm.jmp("jeq", R0, NfVerdict.DROP, f"{MAIN_EXIT}:drop"),
            asm.mov64(R0, self.accept, comment="ACCEPT"),
            asm.exit_(),
            Label(f"{MAIN_EXIT}:drop"),
            asm.mov64(R0, self.drop, comment="DROP"),
            asm.exit_(),
        ]
        return out


def _frame_read(dst: Reg, dst_off: int, size: int, offset: int) -> list[nf.Item]:
    """``r0 = bpf_dynptr_read(dst + dst_off, size, &dynptr, offset, 0)``."""
    return [
        asm.mov64(R1, dst),
        asm.add64(R1, dst_off),
        asm.mov64(R2, size),
        asm.mov64(R3, FP),
        asm.add64(R3, nf.DYNPTR),
        asm.mov64(R4, offset),
        asm.mov64(R5, 0),
        asm.call_helper(BpfFunc.dynptr_read),
    ]


def _adjust(start: int, end: Reg, add: int = 0) -> list[nf.Item]:
    """``bpf_dynptr_adjust(&dynptr, start, end + add)``; a failure passes the frame."""
    return [
        asm.mov64(R3, end),
        *([asm.add64(R3, add)] if add else []),
        asm.mov64(R1, FP),
        asm.add64(R1, nf.DYNPTR),
        asm.mov64(R2, start),
        asm.call_kfunc("bpf_dynptr_adjust"),
        asm.jmp("jne", R0, 0, PASS),
    ]


def _ipv4_checks() -> list[nf.Item]:
    """After the netfilter facts (R9 = ihl * 4, IP_LEN = tot_len; R8 = bytes after the
    Ethernet header): ip_rcv's checks before any netfilter hook (a packet failing them goes
    to the stack, which drops it), then the dynptr cut to tot_len as ip_rcv trims the skb."""
    return [
        asm.ldx(Size.B, R1, R7, nf.L3 + 0),
        asm.rsh64(R1, 4),
        asm.jmp("jne", R1, IPV4_VERSION, PASS, comment="version"),
        asm.jmp("jlt", R9, IPV4_MIN_HEADER, PASS, comment="ihl < 5"),
        asm.ldx(Size.W, R1, R7, nf.IP_LEN),
        asm.jmp("jlt", R1, R9, PASS, comment="tot_len < ihl * 4"),
        asm.jmp("jgt", R1, R8, PASS, comment="longer than the frame"),
        asm.stx(Size.W, R7, nf.SKB_LEN, R1, comment="skb->len at the IP layer"),
        *_adjust(0, R1),
    ]


def _ipv6_length() -> list[nf.Item]:
    """R9 = payload_len + 40, after ipv6_rcv's checks (version, length within the frame);
    R8 = bytes after the Ethernet header."""
    return [
        asm.jmp("jslt", R8, nf.IPV6_HEADER, PASS),
        *_frame_read(R7, nf.L3, nf.IPV6_HEADER, ETH_HLEN),
        asm.jmp("jne", R0, 0, PASS),
        asm.ldx(Size.B, R1, R7, nf.L3 + 0),
        asm.rsh64(R1, 4),
        asm.jmp("jne", R1, IPV6_VERSION, PASS, comment="version"),
        asm.ldx(Size.H, R9, R7, nf.L3 + 4),
        asm.to_be(R9, 16),
        asm.add64(R9, nf.IPV6_HEADER),
        asm.jmp("jgt", R9, R8, PASS, comment="longer than the frame"),
    ]
