"""The matcher table: how each match kind (and each rule header field) compiles, per hook.

A matcher emits a test that falls through when the packet matches and jumps to the rule's
``fail`` label when it does not, or to its ``hotdrop`` label where iptables hot-drops the
packet (a truncated transport header, the "evil" TCP fragment at offset 8). Tests read only
the meta area the netfilter prologue filled (R7, see flavor_netfilter); R1-R3 are scratch.
Semantics follow the kernel's ip(6)_packet_match and the xt_* match functions.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from bpfilter.codegen import asm, sets, stateful
from bpfilter.codegen import flavor_netfilter as nf
from bpfilter.codegen.asm import Label
from bpfilter.codegen.helpers import BpfFunc
from bpfilter.codegen.insn import FP, R0, R1, R2, R7, Reg
from bpfilter.codegen.opcodes import Size
from bpfilter.codegen.spec import MapSpec
from bpfilter.codegen.uapi import IFNAMSIZ, Hook, IfHook, MapType, NfHook, PacketType
from bpfilter.ir.matches import MATCHES, SCTP_CHUNKS
from bpfilter.ir.model import Match, Option, PortRange, Prefix, Rule

ALL_HOOKS = frozenset(NfHook)
# The netfilter hooks and the interface hooks (XDP, TC; codegen/flavor_packet), whose
# prologues fill the packet's part of the meta area as the netfilter one does. A matcher or
# target runs at XDP/TC only when its ``hooks`` say so: the default is ALL_HOOKS.
PACKET_HOOKS: frozenset[Hook] = ALL_HOOKS | frozenset(IfHook)
SKB_HOOKS: frozenset[Hook] = ALL_HOOKS | {IfHook.TC_INGRESS, IfHook.TC_EGRESS}  # an sk_buff
# Conntrack state: at TC egress the sk_buff carries the entry netfilter gave it before.
CT_HOOKS: frozenset[Hook] = ALL_HOOKS | {IfHook.TC_EGRESS}
BOTH_FAMILIES = frozenset({4, 6})
IPPROTO_TCP = 6
TCP_HEADER = 20  # sizeof(struct tcphdr): tcp_mt hot-drops a shorter one
UDP_HEADER = 8  # sizeof(struct udphdr)
ICMP_HEADER = 8  # sizeof(struct icmphdr) / sizeof(struct icmp6hdr)
PORTS = 4  # multiport reads two 16-bit ports
TCP_FLAGS_OFFSET = 13
U16 = 0xFFFF
U32 = 0xFFFFFFFF
CT_SNAT_DNAT = nf.CT_SNAT | nf.CT_DNAT  # XT_CONNTRACK_STATE_SNAT / _DNAT


@dataclass(slots=True)
class Resources:
    """Maps shared by the matches and targets of one compiled ruleset (all its programs):
    declared by name while emitting, created by the loader with the lookup maps.

    ``slot`` hands out indices of ARRAY maps holding one zeroed value per key (per-rule
    state such as a token bucket); such a map is sized to its keys when the ruleset is done.
    """

    specs: dict[str, MapSpec] = field(default_factory=dict)
    contents: dict[str, tuple[tuple[bytes, bytes], ...]] = field(default_factory=dict)
    slots: dict[str, dict[Hashable, int]] = field(default_factory=dict)
    slot_sizes: dict[str, int] = field(default_factory=dict)
    # Settings of kernel objects shared by name (a recent list's mask, a hashlimit table's
    # configuration): the first rule's, with its line, so a differing rule can be refused.
    facts: dict[Hashable, tuple[object, int]] = field(default_factory=dict)

    def shared(self, spec: MapSpec, contents: Sequence[tuple[bytes, bytes]] = ()) -> str:
        """Declare ``spec`` once (a later declaration must be equal); returns its name."""
        known = self.specs.get(spec.name)
        if known is None:
            if spec.name in self.slots:
                raise ValueError(f"map {spec.name!r} is already a slot map")
            self.specs[spec.name] = spec
            if contents:
                self.contents[spec.name] = tuple(contents)
        elif known != spec:
            raise ValueError(f"map {spec.name!r} declared twice differently")
        return spec.name

    def slot(self, map_name: str, value_size: int, key: Hashable) -> int:
        """The index of ``key`` in the ARRAY map ``map_name`` (same key, same index)."""
        if map_name in self.specs:
            raise ValueError(f"map {map_name!r} is already declared")
        size = self.slot_sizes.setdefault(map_name, value_size)
        if size != value_size:
            raise ValueError(f"slot map {map_name!r} has {size}-byte values, not {value_size}")
        keys = self.slots.setdefault(map_name, {})
        return keys.setdefault(key, len(keys))

    def all_specs(self) -> list[MapSpec]:
        """Every map declared so far, slot maps sized to their keys."""
        out = list(self.specs.values())
        out.extend(MapSpec(name, MapType.ARRAY, 4, self.slot_sizes[name], len(keys))
                   for name, keys in self.slots.items())
        return out

    def __len__(self) -> int:
        return len(self.specs) + len(self.slots)


@dataclass(slots=True)
class Emitter:
    """Collects one rule's test code; hands out unique labels and per-rule state slots."""

    family: int
    prefix: str  # unique per rule in the table (the same wherever the chain is emitted)
    fail: str  # label after the rule: the rule does not match
    hotdrop: str  # label of `r0 = DROP; exit` for this rule
    items: list[nf.Item] = field(default_factory=list)
    used_hotdrop: bool = False
    _count: int = 0
    res: Resources = field(default_factory=Resources)
    table: str = "filter"
    hook: Hook | None = None
    _states: dict[str, int] = field(default_factory=dict)
    needs: nf.Needs = field(default_factory=nf.Needs)  # what the program's prologue gathers

    def label(self, what: str) -> str:
        self._count += 1
        return f"{self.prefix}:{what}{self._count}"

    def state(self, map_name: str, value_size: int) -> int:
        """This rule's slot in the shared ARRAY map ``map_name``: keyed by table, rule and
        call order, so a rule has one state wherever its chain is called from."""
        n = self._states[map_name] = self._states.get(map_name, 0) + 1
        return self.res.slot(map_name, value_size, (self.table, self.prefix, n))

    def emit(self, *items: nf.Item) -> None:
        self.items.extend(items)

    def hot(self) -> str:
        """The hot-drop label (remembering that the rule needs it)."""
        self.used_hotdrop = True
        return self.hotdrop


Test = Callable[[str], None]  # emits a test; argument: where to jump when it is false


def negatable(em: Emitter, negated: bool, test: Test) -> None:
    """Emit ``test``, or its negation: a negated test that holds is a miss."""
    if not negated:
        test(em.fail)
        return
    ok = em.label("neg")
    test(ok)
    em.emit(asm.ja(em.fail), Label(ok))


def masked_words(em: Emitter, offset: int, value: bytes, mask: bytes, on_false: str) -> None:
    """``(meta[offset:] & mask) == value`` in 32-bit words; all-zero mask words are skipped."""
    for i in range(0, len(value), 4):
        m = int.from_bytes(mask[i:i + 4], "little")
        v = int.from_bytes(value[i:i + 4], "little") & m
        if m == 0:
            continue
        em.emit(asm.ldx(Size.W, R1, R7, offset + i))
        if m != U32:
            em.emit(asm.alu32("and", R1, m))
        em.emit(asm.jmp32("jne", R1, v, on_false))


def in_range(em: Emitter, reg: Reg, lo: int, hi: int, maximum: int, on_false: str) -> None:
    """``lo <= reg <= hi`` for a value known to lie in [0, maximum] (maximum <= 2**32 - 1).
    Values from 2**31 up are compared in 32 bits: a 64-bit compare sign-extends its
    immediate."""
    assert maximum <= U32
    jmp = asm.jmp32 if maximum > 0x7FFFFFFF else asm.jmp
    if lo == hi:
        em.emit(jmp("jne", reg, lo, on_false))
        return
    if lo > 0:
        em.emit(jmp("jlt", reg, lo, on_false))
    if hi < maximum:
        em.emit(jmp("jgt", reg, hi, on_false))


def load_u32(em: Emitter, reg: Reg, offset: int) -> None:
    em.emit(asm.ldx(Size.W, reg, R7, offset))


def load_port(em: Emitter, reg: Reg, which: int) -> None:
    """Source (which=0) or destination (which=2) port in host order."""
    em.emit(asm.ldx(Size.H, reg, R7, nf.L4 + which), asm.to_be(reg, 16))


def not_fragment(em: Emitter, *, evil_tcp: bool = False) -> None:
    """A non-first fragment has no transport header: the match fails. tcp_mt additionally
    hot-drops an IPv4 fragment at offset 1 (8 bytes), which could rewrite the TCP flags."""
    load_u32(em, R1, nf.FRAG)
    if evil_tcp and em.family == 4:
        ok = em.label("first")
        em.emit(asm.jmp("jeq", R1, 0, ok), asm.jmp("jne", R1, 1, em.fail),
                asm.ja(em.hot()), Label(ok))
    else:
        em.emit(asm.jmp("jne", R1, 0, em.fail))


def need_l4(em: Emitter, size: int) -> None:
    """skb_header_pointer() of ``size`` transport bytes failing makes the match hot-drop."""
    load_u32(em, R1, nf.L4_LEN)
    em.emit(asm.jmp("jlt", R1, size, em.hot()))


# --- rule header fields (ip_packet_match / ip6_packet_match) ------------------------------------

def _addr_bytes(p: Prefix) -> tuple[bytes, bytes]:
    n = p.bits // 8
    return p.addr.to_bytes(n, "big"), p.mask.to_bytes(n, "big")


def _address(em: Emitter, p: Prefix, negated: bool, v4_off: int, v6_off: int) -> None:
    value, mask = _addr_bytes(p)
    off = nf.L3 + (v4_off if em.family == 4 else v6_off)
    negatable(em, negated, lambda f: masked_words(em, off, value, mask, f))


def emit_src(em: Emitter, rule: Rule, m: Match | None) -> None:
    assert rule.src is not None
    _address(em, rule.src, rule.src_neg, 12, 8)


def emit_dst(em: Emitter, rule: Rule, m: Match | None) -> None:
    assert rule.dst is not None
    _address(em, rule.dst, rule.dst_neg, 16, 24)


def interface_bytes(name: str) -> tuple[bytes, bytes]:
    """xtables_parse_interface: the name and a mask covering it and its NUL, or only the
    prefix before a trailing ``+`` (the ``+`` itself is kept in the name but not compared)."""
    raw = name.encode()
    if len(raw) >= IFNAMSIZ:
        raise ValueError(f"interface name {name!r} is longer than {IFNAMSIZ - 1} bytes")
    value = raw.ljust(IFNAMSIZ, b"\0")
    covered = len(raw) - 1 if raw.endswith(b"+") else len(raw) + 1
    return value, (b"\xff" * covered).ljust(IFNAMSIZ, b"\0")


def _interface(em: Emitter, name: str, negated: bool, offset: int) -> None:
    # An absent device compares as an all-zero name (nulldevname), as in ipt_do_table.
    value, mask = interface_bytes(name)
    negatable(em, negated, lambda f: masked_words(em, offset, value, mask, f))


def emit_iif(em: Emitter, rule: Rule, m: Match | None) -> None:
    assert rule.iif is not None
    _interface(em, rule.iif, rule.iif_neg, nf.IN_NAME)


def emit_oif(em: Emitter, rule: Rule, m: Match | None) -> None:
    assert rule.oif is not None
    _interface(em, rule.oif, rule.oif_neg, nf.OUT_NAME)


def emit_proto(em: Emitter, rule: Rule, m: Match | None) -> None:
    proto = rule.proto
    assert proto is not None
    if em.family == 6:
        # ipv6_find_hdr() failing with fragoff 0 hot-drops (a failure on a later fragment
        # cannot happen here: the prologue records fragoff only on success).
        load_u32(em, R1, nf.PROTO_ERROR)
        em.emit(asm.jmp("jne", R1, 0, em.hot()))
    if proto == 0:
        return  # `-p all`: no protocol check (the upper-layer protocol is never 0 after the walk)

    def test(on_false: str) -> None:
        load_u32(em, R1, nf.PROTO)
        em.emit(asm.jmp("jne", R1, proto, on_false))

    negatable(em, rule.proto_neg, test)


def emit_fragment(em: Emitter, rule: Rule, m: Match | None) -> None:
    # -f: a non-first fragment (IPv4 fragment offset != 0); ! -f: anything else.
    load_u32(em, R1, nf.FRAG)
    em.emit(asm.jmp("jeq" if rule.fragment else "jne", R1, 0, em.fail))


# --- match extensions ---------------------------------------------------------------------------

def _ports(em: Emitter, m: Match) -> None:
    for name, which in (("--sport", 0), ("--dport", 2)):
        o = m.get(name)
        if o is None:
            continue
        r = o.value
        assert isinstance(r, PortRange)

        def test(on_false: str, r: PortRange = r, which: int = which) -> None:
            if r.lo == 0 and r.hi == U16:
                return
            load_port(em, R1, which)
            in_range(em, R1, r.lo, r.hi, U16, on_false)

        negatable(em, o.negated, test)


def emit_tcp(em: Emitter, rule: Rule, m: Match | None) -> None:
    assert m is not None
    not_fragment(em, evil_tcp=True)
    need_l4(em, TCP_HEADER)
    _ports(em, m)
    o = m.get("--tcp-flags")
    if o is not None:
        mask, comp = o.value

        def test(on_false: str) -> None:
            em.emit(asm.ldx(Size.B, R1, R7, nf.L4 + TCP_FLAGS_OFFSET),
                    asm.and64(R1, mask), asm.jmp("jne", R1, comp & mask, on_false))
            if comp & ~mask:
                em.emit(asm.ja(on_false))  # compared bits outside the mask: never equal

        negatable(em, o.negated, test)
    o = m.get("--tcp-option")
    if o is not None and int(o.value) != 0:  # tcp_mt tests the option only when it is not 0
        _tcp_option(em, int(o.value), o.negated)


def _tcp_options_readable(em: Emitter) -> None:
    load_u32(em, R1, nf.TCP_OPT_STATE)
    em.emit(asm.jmp("jeq", R1, nf.TCP_OPT_BAD, em.hot()))


def _tcp_option(em: Emitter, kind: int, negated: bool) -> None:
    # tcp_find_option: doff < 5 or truncated options hot-drop; no options: the inversion
    _tcp_options_readable(em)

    def test(on_false: str) -> None:
        em.emit(asm.ldx(Size.B, R1, R7, nf.TCP_KINDS + kind // 8),
                asm.and64(R1, 1 << kind % 8), asm.jmp("jeq", R1, 0, on_false))

    negatable(em, negated, test)


def emit_tcpmss(em: Emitter, rule: Rule, m: Match | None) -> None:
    # tcpmss_mt: no fragment test; a short header, doff < 5 or truncated options hot-drop;
    # the first MSS option (kind 2, length 4) decides, none found gives the inversion.
    assert m is not None
    o = m.get("--mss")
    assert o is not None
    r = o.value
    assert isinstance(r, PortRange)
    need_l4(em, TCP_HEADER)
    _tcp_options_readable(em)

    def test(on_false: str) -> None:
        load_u32(em, R1, nf.TCP_MSS)
        em.emit(asm.jmp("jeq", R1, 0, on_false), asm.and64(R1, U16))
        in_range(em, R1, r.lo, r.hi, U16, on_false)

    negatable(em, o.negated, test)


def emit_udp(em: Emitter, rule: Rule, m: Match | None) -> None:
    assert m is not None
    not_fragment(em)
    need_l4(em, UDP_HEADER)
    _ports(em, m)


def _icmp(em: Emitter, m: Match, option: str, any_type: bool) -> None:
    not_fragment(em)
    need_l4(em, ICMP_HEADER)
    o = m.get(option)
    if o is None:
        return
    ty, lo, hi = o.value

    def test(on_false: str) -> None:
        if any_type and ty == 0xFF:
            return  # icmp_type_code_match: test_type 0xFF matches every type
        em.emit(asm.ldx(Size.B, R1, R7, nf.L4 + 0), asm.jmp("jne", R1, ty, on_false),
                asm.ldx(Size.B, R1, R7, nf.L4 + 1))
        in_range(em, R1, lo, hi, 0xFF, on_false)

    negatable(em, o.negated, test)


def emit_icmp(em: Emitter, rule: Rule, m: Match | None) -> None:
    assert m is not None
    _icmp(em, m, "--icmp-type", any_type=True)


def emit_icmp6(em: Emitter, rule: Rule, m: Match | None) -> None:
    assert m is not None
    _icmp(em, m, "--icmpv6-type", any_type=False)


def emit_multiport(em: Emitter, rule: Rule, m: Match | None) -> None:
    assert m is not None
    not_fragment(em)
    need_l4(em, PORTS)
    (o,) = m.options
    which = {"--sports": (0,), "--dports": (2,), "--ports": (0, 2)}[o.name]
    ranges: tuple[PortRange, ...] = o.value
    hit, done = em.label("mp_hit"), em.label("mp_done")
    for port in which:
        load_port(em, R1, port)
        for r in ranges:
            if r.lo == r.hi:
                em.emit(asm.jmp("jeq", R1, r.lo, hit))
            else:
                skip = em.label("mp_skip")
                em.emit(asm.jmp("jlt", R1, r.lo, skip), asm.jmp("jle", R1, r.hi, hit),
                        Label(skip))
    # ports_match_v1: a listed port gives !invert, none gives invert.
    em.emit(asm.ja(done if o.negated else em.fail), Label(hit))
    if o.negated:
        em.emit(asm.ja(em.fail))
    em.emit(Label(done))


def _state_bits(em: Emitter, mask: int, negated: bool) -> None:
    def test(on_false: str) -> None:
        load_u32(em, R1, nf.CT_STATE)
        em.emit(asm.and64(R1, mask), asm.jmp("jeq", R1, 0, on_false))

    negatable(em, negated, test)


def emit_state(em: Emitter, rule: Rule, m: Match | None) -> None:
    assert m is not None
    o = m.get("--state")
    assert o is not None
    _state_bits(em, int(o.value), o.negated)


def emit_mark(em: Emitter, rule: Rule, m: Match | None) -> None:
    assert m is not None
    o = m.get("--mark")
    assert o is not None
    value, mask = o.value
    masked_u32(em, nf.MARK, value, mask, o.negated)


def masked_u32(em: Emitter, offset: int, value: int, mask: int, negated: bool) -> None:
    """``(meta u32 at offset & mask) == value``, negated with `!` (mark_mt, connmark_mt)."""
    def test(on_false: str) -> None:
        load_u32(em, R1, offset)
        if mask != U32:
            em.emit(asm.alu32("and", R1, mask))
        em.emit(asm.jmp32("jne", R1, value, on_false))

    negatable(em, negated, test)


def emit_length(em: Emitter, rule: Rule, m: Match | None) -> None:
    assert m is not None
    o = m.get("--length")
    assert o is not None
    r = o.value
    assert isinstance(r, PortRange)

    def test(on_false: str) -> None:
        load_u32(em, R1, nf.IP_LEN)
        in_range(em, R1, r.lo, r.hi, U16, on_false)

    negatable(em, o.negated, test)


def _addr_words(value: int, bits: int) -> list[int]:
    """An address as host-order 32-bit words, most significant first."""
    return [(value >> (bits - 32 * (i + 1))) & U32 for i in range(bits // 32)]


def _addr_compare(em: Emitter, offset: int, bound: int, bits: int, op: str,
                  on_false: str) -> None:
    """``addr >= bound`` (op "ge") or ``addr <= bound`` (op "le"), comparing the address at
    ``meta[offset:]`` word by word from the most significant one (iprange_ipv6_lt)."""
    beyond, short = ("jgt", "jlt") if op == "ge" else ("jlt", "jgt")
    words = _addr_words(bound, bits)
    ok = em.label("range_ok")
    for i, w in enumerate(words):
        em.emit(asm.ldx(Size.W, R1, R7, offset + 4 * i), asm.to_be(R1, 32))
        em.emit(asm.jmp32(short, R1, w, on_false))
        if i + 1 < len(words):
            em.emit(asm.jmp32(beyond, R1, w, ok))
    em.emit(Label(ok))


def emit_iprange(em: Emitter, rule: Rule, m: Match | None) -> None:
    # iprange_mt4 / iprange_mt6: lo <= addr <= hi in host order (never true when lo > hi).
    assert m is not None
    bits = 32 if em.family == 4 else 128
    for name, v4_off, v6_off in (("--src-range", 12, 8), ("--dst-range", 16, 24)):
        o = m.get(name)
        if o is None:
            continue
        lo, hi = o.value
        off = nf.L3 + (v4_off if em.family == 4 else v6_off)

        def test(on_false: str, lo: int = lo, hi: int = hi, off: int = off) -> None:
            if lo > hi:
                em.emit(asm.ja(on_false))
                return
            if lo > 0:
                _addr_compare(em, off, lo, bits, "ge", on_false)
            if hi < (1 << bits) - 1:
                _addr_compare(em, off, hi, bits, "le", on_false)

        negatable(em, o.negated, test)


TTL_OFFSET = 8  # iphdr.ttl
HOP_LIMIT_OFFSET = 7  # ipv6hdr.hop_limit


def emit_ttl(em: Emitter, rule: Rule, m: Match | None) -> None:
    # ttl_mt / hl_mt6: eq, ne (`! --ttl-eq`), lt and gt, as unsigned bytes.
    assert m is not None
    (o,) = m.options
    value = int(o.value)
    op = o.name.rsplit("-", 1)[1]
    offset = nf.L3 + (TTL_OFFSET if em.family == 4 else HOP_LIMIT_OFFSET)

    def test(on_false: str) -> None:
        em.emit(asm.ldx(Size.B, R1, R7, offset))
        em.emit(asm.jmp("jne" if op == "eq" else "jge" if op == "lt" else "jle",
                        R1, value, on_false))

    negatable(em, o.negated, test)


def load_dsfield(em: Emitter, reg: Reg) -> None:
    """The IPv4 TOS byte or the IPv6 traffic class (ipv6_get_dsfield)."""
    if em.family == 4:
        em.emit(asm.ldx(Size.B, reg, R7, nf.L3 + 1))
        return
    em.emit(asm.ldx(Size.H, reg, R7, nf.L3 + 0), asm.to_be(reg, 16),
            asm.rsh64(reg, 4), asm.and64(reg, 0xFF))


def emit_tos(em: Emitter, rule: Rule, m: Match | None) -> None:
    # tos_mt: (dsfield & mask) == value, the value unmasked (bits outside the mask never match).
    assert m is not None
    o = m.get("--tos")
    assert o is not None
    value, mask = o.value

    def test(on_false: str) -> None:
        if value & ~mask:
            em.emit(asm.ja(on_false))
            return
        load_dsfield(em, R1)
        em.emit(asm.and64(R1, mask), asm.jmp("jne", R1, value, on_false))

    negatable(em, o.negated, test)


DSCP_SHIFT = 2  # XT_DSCP_SHIFT


def emit_dscp(em: Emitter, rule: Rule, m: Match | None) -> None:
    # dscp_mt / dscp_mt6: (dsfield >> XT_DSCP_SHIFT) == dscp.
    assert m is not None
    o = m.get("--dscp")
    assert o is not None
    value = int(o.value)

    def test(on_false: str) -> None:
        load_dsfield(em, R1)
        em.emit(asm.rsh64(R1, DSCP_SHIFT), asm.jmp("jne", R1, value, on_false))

    negatable(em, o.negated, test)


PKT_TYPES = {"unicast": PacketType.HOST, "broadcast": PacketType.BROADCAST,
             "multicast": PacketType.MULTICAST}  # libxt_pkttype's names
IPV4_MULTICAST = 0xE0  # 224.0.0.0/4: the top four bits of the first address byte
IPV4_CLASS_MASK = 0xF0


def emit_pkttype(em: Emitter, rule: Rule, m: Match | None) -> None:
    # pkttype_mt: skb->pkt_type, except that PACKET_LOOPBACK counts as multicast for IPv6
    # and for IPv4 to a multicast destination, and as broadcast for other IPv4.
    assert m is not None
    o = m.get("--pkt-type")
    assert o is not None
    wanted = PKT_TYPES[str(o.value)]

    def test(on_false: str) -> None:
        known = em.label("pkt_type")
        em.emit(asm.ldx(Size.W, R1, R7, nf.PKT_TYPE),
                asm.jmp("jne", R1, PacketType.LOOPBACK, known))
        if em.family == 6:
            em.emit(asm.mov64(R1, PacketType.MULTICAST))
        else:
            em.emit(asm.ldx(Size.B, R2, R7, nf.L3 + 16), asm.and64(R2, IPV4_CLASS_MASK),
                    asm.mov64(R1, PacketType.BROADCAST),
                    asm.jmp("jne", R2, IPV4_MULTICAST, known),
                    asm.mov64(R1, PacketType.MULTICAST))
        em.emit(Label(known), asm.jmp("jne", R1, wanted, on_false))

    negatable(em, o.negated, test)


RT_HDRLEN, RT_TYPE, RT_SEGSLEFT, RT_RESERVED = 1, 2, 3, 4  # struct ipv6_rt_hdr / rt0_hdr
RT_MAX_LEN = (0xFF + 1) * 8  # ipv6_optlen of the largest header; --rt-len is a u32


def emit_rt(em: Emitter, rule: Rule, m: Match | None) -> None:
    # rt_mt6: the first routing header (the prologue recorded it); none: no match; unreadable
    # or shorter than its length field: hot drop (the latter since Linux 6.x; checked against
    # ip6tables-legacy on the running kernel). Then segments left in range, length
    # ipv6_optlen == --rt-len, type == --rt-type (each ^ its `!`), and --rt-0-res: the reserved
    # word is zero (readable: the length check above covers it).
    assert m is not None
    em.emit(asm.ldx(Size.B, R1, R7, nf.RT_STATE), asm.jmp("jeq", R1, nf.HDR_NONE, em.fail),
            asm.jmp("jne", R1, nf.HDR_FOUND, em.hot()))
    em.emit(asm.ldx(Size.W, R1, R7, nf.SKB_LEN), asm.ldx(Size.H, R2, R7, nf.RT_OFF),
            asm.sub64(R1, R2),
            asm.ldx(Size.B, R2, R7, nf.RT + RT_HDRLEN), asm.add64(R2, 1), asm.lsh64(R2, 3),
            asm.jmp("jlt", R1, R2, em.hot()))
    o = m.get("--rt-segsleft")
    if o is not None:
        r = o.value
        assert isinstance(r, PortRange)

        def segsleft(on_false: str) -> None:
            if r.lo > r.hi or r.lo > 0xFF:
                em.emit(asm.ja(on_false))
                return
            em.emit(asm.ldx(Size.B, R1, R7, nf.RT + RT_SEGSLEFT))
            in_range(em, R1, r.lo, min(r.hi, 0xFF), 0xFF, on_false)

        negatable(em, o.negated, segsleft)
    o = m.get("--rt-len")
    if o is not None:
        length = int(o.value)

        def hdrlen(on_false: str) -> None:
            if length > RT_MAX_LEN:
                em.emit(asm.ja(on_false))
                return
            em.emit(asm.ldx(Size.B, R1, R7, nf.RT + RT_HDRLEN), asm.add64(R1, 1),
                    asm.lsh64(R1, 3), asm.jmp("jne", R1, length, on_false))

        negatable(em, o.negated, hdrlen)
    o = m.get("--rt-type")
    if o is not None:
        rt_type = int(o.value)

        def type_(on_false: str) -> None:
            if rt_type > 0xFF:
                em.emit(asm.ja(on_false))
                return
            em.emit(asm.ldx(Size.B, R1, R7, nf.RT + RT_TYPE),
                    asm.jmp("jne", R1, rt_type, on_false))

        negatable(em, o.negated, type_)
    if m.get("--rt-0-res") is not None:
        em.emit(asm.ldx(Size.W, R1, R7, nf.RT + RT_RESERVED), asm.jmp("jne", R1, 0, em.fail))


FH_RESERVED, FH_FRAG_OFF, FH_ID = 1, 2, 4  # struct frag_hdr
IP6_MF = 0x0001
IP6_OFFSET = 0xFFF8
FH_RES_BITS = 0x0006  # the two reserved bits of frag_off


def emit_frag(em: Emitter, rule: Rule, m: Match | None) -> None:
    # frag_mt6: the first fragment header (the prologue recorded it); none: no match; fewer
    # than 8 bytes of it: hot drop. Then the identification in range (^ its `!`), and each
    # flag option: --fragres reserved byte and bits zero, --fragfirst offset zero, --fragmore
    # MF set, --fraglast MF clear. --fraglen is parsed and saved but never tested by the
    # kernel, so it has no code here either.
    assert m is not None
    em.emit(asm.ldx(Size.B, R1, R7, nf.FH_STATE), asm.jmp("jeq", R1, nf.HDR_NONE, em.fail),
            asm.jmp("jne", R1, nf.HDR_FOUND, em.hot()))
    o = m.get("--fragid")
    if o is not None:
        r = o.value
        assert isinstance(r, PortRange)

        def ident(on_false: str) -> None:
            if r.lo > r.hi:
                em.emit(asm.ja(on_false))
                return
            em.emit(asm.ldx(Size.W, R1, R7, nf.FH + FH_ID), asm.to_be(R1, 32))
            if r.lo == r.hi:
                em.emit(asm.jmp32("jne", R1, r.lo, on_false))
                return
            if r.lo > 0:
                em.emit(asm.jmp32("jlt", R1, r.lo, on_false))
            if r.hi < U32:
                em.emit(asm.jmp32("jgt", R1, r.hi, on_false))

        negatable(em, o.negated, ident)
    tests = [(n, bits, want) for n, bits, want in (
        ("--fragres", FH_RES_BITS, 0), ("--fragfirst", IP6_OFFSET, 0),
        ("--fragmore", IP6_MF, IP6_MF), ("--fraglast", IP6_MF, 0)) if m.get(n) is not None]
    if m.get("--fragres") is not None:
        em.emit(asm.ldx(Size.B, R1, R7, nf.FH + FH_RESERVED), asm.jmp("jne", R1, 0, em.fail))
    if tests:
        em.emit(asm.ldx(Size.H, R1, R7, nf.FH + FH_FRAG_OFF), asm.to_be(R1, 16))
        for _, bits, want in tests:
            em.emit(asm.mov64(R2, R1), asm.and64(R2, bits), asm.jmp("jne", R2, want, em.fail))


def emit_ipv6header(em: Emitter, rule: Rule, m: Match | None) -> None:
    # ipv6header_mt6 on the prologue's walk (IPV6HDR): `!` sets invflags to 0xFF. --soft:
    # !((seen ^ matchflags ^ invflags) & matchflags); otherwise seen == matchflags (or !=).
    assert m is not None
    o = m.get("--header")
    assert o is not None
    flags, inv = int(o.value), 0xFF if o.negated else 0
    ok = em.label("v6h")
    em.emit(asm.ldx(Size.W, R1, R7, nf.IPV6HDR), asm.jmp("jlt", R1, nf.IPV6HDR_FALSE, ok),
            asm.jmp("jeq", R1, nf.IPV6HDR_FALSE, em.fail), asm.ja(em.hot()), Label(ok))
    if m.get("--soft") is not None:
        em.emit(asm.xor64(R1, flags ^ inv), asm.and64(R1, flags),
                asm.jmp("jne", R1, 0, em.fail))
    else:
        em.emit(asm.jmp("jeq" if inv else "jne", R1, flags, em.fail))


# --- esp, ah, mh (xt_esp, ipt_ah, ip6t_mh), cpu, quota -------------------------------------------

ESP_HEADER = 8  # sizeof(struct ip_esp_hdr): spi, seq_no
AH_HEADER = 12  # sizeof(struct ip_auth_hdr): nexthdr, hdrlen, reserved, spi, seq_no
AH_SPI = 4
MH_HEADER = 6  # sizeof(struct ip6_mh): proto, hdrlen, type, reserved, cksum
MH_TYPE = 2
IPPROTO_NONE = 59


def _spi(em: Emitter, m: Match, option: str, header: int, at: int) -> None:
    """esp_mt / ah_mt: no match on a later fragment, hot drop on a short header, then the
    SPI (host order) in the range, negated with `!`."""
    not_fragment(em)
    need_l4(em, header)
    o = m.get(option)
    if o is None:
        return
    lo, hi = o.value.lo, o.value.hi
    em.emit(asm.ldx(Size.W, R1, R7, nf.L4 + at), asm.to_be(R1, 32))

    negatable(em, o.negated, lambda f: in_range(em, R1, lo, hi, U32, f))


def emit_esp(em: Emitter, rule: Rule, m: Match | None) -> None:
    assert m is not None
    _spi(em, m, "--espspi", ESP_HEADER, 0)


def emit_ah(em: Emitter, rule: Rule, m: Match | None) -> None:
    assert m is not None
    _spi(em, m, "--ahspi", AH_HEADER, AH_SPI)


def emit_mh(em: Emitter, rule: Rule, m: Match | None) -> None:
    """mh_mt6: no match on a later fragment; a short header, or one whose payload protocol
    is not IPPROTO_NONE, hot-drops; then the type in the range."""
    assert m is not None
    not_fragment(em)
    need_l4(em, MH_HEADER)
    em.emit(asm.ldx(Size.B, R1, R7, nf.L4), asm.jmp("jne", R1, IPPROTO_NONE, em.hot()))
    o = m.get("--mh-type")
    if o is None:
        return
    lo, hi = o.value.lo, o.value.hi
    em.emit(asm.ldx(Size.B, R1, R7, nf.L4 + MH_TYPE))
    negatable(em, o.negated, lambda f: in_range(em, R1, lo, hi, 255, f))


def emit_cpu(em: Emitter, rule: Rule, m: Match | None) -> None:
    """cpu_mt: the CPU handling the packet is --cpu."""
    assert m is not None
    o = m.get("--cpu")
    assert o is not None
    cpu = int(o.value)
    em.emit(asm.call_helper(BpfFunc.get_smp_processor_id))
    negatable(em, o.negated, lambda f: em.emit(asm.jmp("jne", R0, cpu, f)))


QUOTA_MAP = "quota"  # one u64 per quota rule: bytes counted so far


def emit_quota(em: Emitter, rule: Rule, m: Match | None) -> None:
    """quota_mt: a packet that still fits takes its length off the quota and matches; one
    that does not empties it (later packets never fit). Kept as bytes consumed: an atomic
    add answers the old total, and the packet fits when old + len <= quota (a packet that
    did not fit leaves the total above the quota, as the kernel leaves it at zero)."""
    assert m is not None
    o = m.get("--quota")
    assert o is not None
    quota = int(o.value)
    slot = em.state(QUOTA_MAP, 8)
    em.emit(asm.st(Size.W, FP, QUOTA_KEY, slot), asm.ld_map_fd(R1, QUOTA_MAP),
            asm.mov64(R2, FP), asm.add64(R2, QUOTA_KEY),
            asm.call_helper(BpfFunc.map_lookup_elem),
            asm.jmp("jeq", R0, 0, em.fail),  # never: the slot exists
            asm.ldx(Size.W, R2, R7, nf.SKB_LEN), asm.mov64(R1, R2),
            asm.atomic_add(Size.DW, R0, 0, R1, fetch=True),
            asm.add64(R1, R2), asm.ld_imm64(R2, quota))
    negatable(em, o.negated, lambda f: em.emit(asm.jmp("jgt", R1, R2, f)))


QUOTA_KEY = -8  # the slot number, on the stack of the function running the rule


OPT_MATCHES = {"hbh": nf.NEXTHDR_HOP, "dst": nf.NEXTHDR_DEST}


def _opt_list(m: Match) -> tuple[int, tuple[int, ...]] | None:
    """(header type, the list as ip6t_opts.opts: type << 8 | length, 0xFF for any length)."""
    o = m.get(f"--{m.kind}-opts")
    if o is None:
        return None
    return OPT_MATCHES[m.kind], tuple(t << 8 | (0xFF if n is None else n) for t, n in o.value)


def emit_opts(em: Emitter, rule: Rule, m: Match | None) -> None:
    # hbh_mt6 (`-m hbh` and `-m dst`) on what the prologue gathered: no such header: no match;
    # unreadable or shorter than its length field: hot drop. Then --hbh-len == ipv6_optlen
    # (^ its `!`) and the option list's result (walked in the prologue).
    assert m is not None
    h = nf.OPT_HEADERS[OPT_MATCHES[m.kind]]
    em.emit(asm.ldx(Size.B, R1, R7, h.state), asm.jmp("jeq", R1, nf.HDR_NONE, em.fail),
            asm.jmp("jne", R1, nf.HDR_FOUND, em.hot()))
    opts = _opt_list(m)
    if opts is not None:
        k = nf.ext_opts_index(em.needs, *opts)
        em.emit(asm.ldx(Size.H, R1, R7, nf.OPTS_RESULT), asm.rsh64(R1, k),
                asm.and64(R1, 1), asm.jmp("jeq", R1, 0, em.fail))
    o = m.get(f"--{m.kind}-len")
    if o is not None:
        length = int(o.value)

        def hdrlen(on_false: str) -> None:
            if length > RT_MAX_LEN:
                em.emit(asm.ja(on_false))
                return
            em.emit(asm.ldx(Size.B, R1, R7, h.data + 1), asm.add64(R1, 1),
                    asm.lsh64(R1, 3), asm.jmp("jne", R1, length, on_false))

        negatable(em, o.negated, hdrlen)


def _opts_needs(m: Match) -> nf.Needs:
    opts = _opt_list(m)
    return nf.Needs() if opts is None else nf.Needs(ext_opts=frozenset({opts}))


def emit_nothing(em: Emitter, rule: Rule, m: Match | None) -> None:
    """comment: no code."""


# --- the table ------------------------------------------------------------------------------------

Emit = Callable[[Emitter, Rule, "Match | None"], None]


@dataclass(frozen=True, slots=True)
class Matcher:
    """How one match kind compiles: its code, the options it understands, where it runs."""

    name: str
    emit: Emit
    options: frozenset[str] = frozenset()
    hooks: frozenset[Hook] = ALL_HOOKS
    families: frozenset[int] = BOTH_FAMILIES
    needs: nf.Needs = nf.Needs()
    check: Callable[[Match], str | None] | None = None  # a refusal, or None
    extra_needs: Callable[[Match], nf.Needs] | None = None  # needs that depend on options

    def needs_for(self, m: Match | None) -> nf.Needs:
        """What the prologue must gather for this instance."""
        if m is None or self.extra_needs is None:
            return self.needs
        return self.needs | self.extra_needs(m)

    def refusal(self, m: Match, family: int, hook: Hook | None = None) -> str | None:
        """Why this match cannot compile (for ``family`` at ``hook``), or None."""
        if family not in self.families:
            return f"match '{self.name}' is not supported for IPv{family}"
        if hook is not None and hook not in self.hooks:
            return f"match '{self.name}' is not supported at hook {hook.name}"
        for o in m.options:
            if o.name not in self.options:
                return f"match '{self.name}' option '{o.name}' is not supported"
        return self.check(m) if self.check is not None else None


# --- conntrack details, connmark, mac, sctp (xt_conntrack v3, xt_connmark, xt_mac, xt_sctp) --

def _kernel_words(em: Emitter, fld: nf.KField, base: int, value: bytes, mask: bytes,
                  on_false: str) -> None:
    """``(member & mask) == value`` for a kernel struct copied to ``meta[base:]``, in words."""
    for i in range(0, len(value), 4):
        m = int.from_bytes(mask[i:i + 4], "little")
        v = int.from_bytes(value[i:i + 4], "little") & m
        if m == 0:
            continue
        em.emit(nf.FieldLoad(Size.W, R1, R7, fld, base + i))
        if m != U32:
            em.emit(asm.alu32("and", R1, m))
        em.emit(asm.jmp32("jne", R1, v, on_false))


CT_ADDRS = {"--ctorigsrc": (nf.CT_ORIG, nf.KField.TUPLE_SRC_ADDR),
            "--ctorigdst": (nf.CT_ORIG, nf.KField.TUPLE_DST_ADDR),
            "--ctreplsrc": (nf.CT_REPL, nf.KField.TUPLE_SRC_ADDR),
            "--ctrepldst": (nf.CT_REPL, nf.KField.TUPLE_DST_ADDR)}
CT_PORTS = {"--ctorigsrcport": (nf.CT_ORIG, nf.KField.TUPLE_SRC_PORT),
            "--ctorigdstport": (nf.CT_ORIG, nf.KField.TUPLE_DST_PORT),
            "--ctreplsrcport": (nf.CT_REPL, nf.KField.TUPLE_SRC_PORT),
            "--ctrepldstport": (nf.CT_REPL, nf.KField.TUPLE_DST_PORT)}
# conntrack_mt's order (no test has a side effect, but a reader can follow the kernel's).
CT_ORDER = ("--ctdir", *CT_ADDRS, "--ctproto", *CT_PORTS, "--ctstatus", "--ctexpire")


def _if_tracked(em: Emitter, otherwise: str) -> None:
    """Go to ``otherwise`` when the packet has no conntrack entry (INVALID, UNTRACKED)."""
    load_u32(em, R1, nf.CT_STATE)
    em.emit(asm.and64(R1, nf.CT_TRACKED), asm.jmp("jeq", R1, 0, otherwise))


def _ct_option(em: Emitter, o: Option) -> None:
    if o.name == "--ctdir":
        # CTINFO2DIR(ctinfo) == ORIGINAL, or == REPLY (libxt_conntrack sets the invert flag)
        load_u32(em, R1, nf.CT_DIR)
        em.emit(asm.jmp("jne" if o.value == "ORIGINAL" else "jeq", R1, 0, em.fail))
        return
    test: Test
    if o.name in CT_ADDRS:
        base, fld = CT_ADDRS[o.name]
        value, mask = _addr_bytes(o.value)  # conntrack_addrcmp: IPv4 compares u3.ip only

        def test(on_false: str) -> None:
            _kernel_words(em, fld, base, value, mask, on_false)
    elif o.name in CT_PORTS:
        base, fld = CT_PORTS[o.name]
        r = o.value
        assert isinstance(r, PortRange)

        def test(on_false: str) -> None:  # port_match: ntohs(u.all) in [min, max]
            em.emit(nf.FieldLoad(Size.H, R1, R7, fld, base), asm.to_be(R1, 16))
            in_range(em, R1, r.lo, r.hi, U16, on_false)
    elif o.name == "--ctproto":
        proto = int(o.value)

        def test(on_false: str) -> None:  # nf_ct_protonum(ct)
            em.emit(nf.FieldLoad(Size.B, R1, R7, nf.KField.TUPLE_PROTO, nf.CT_ORIG),
                    asm.jmp("jne", R1, proto, on_false))
    elif o.name == "--ctstatus":
        bits = int(o.value)

        def test(on_false: str) -> None:  # status_mask & ct->status
            if bits == 0:
                em.emit(asm.ja(on_false))
                return
            load_u32(em, R1, nf.CT_STATUS)
            em.emit(asm.and64(R1, bits), asm.jmp("jeq", R1, 0, on_false))
    else:
        assert o.name == "--ctexpire"
        r = o.value
        assert isinstance(r, PortRange)

        def test(on_false: str) -> None:
            # nf_ct_expires(ct) / HZ in [min, max], unsigned long arithmetic
            load_u32(em, R1, nf.CT_EXPIRES)
            em.emit(nf.KernelHz(R2), asm.div64(R1, R2))
            in_range(em, R1, r.lo, r.hi, U32, on_false)
    negatable(em, o.negated, test)


def emit_conntrack(em: Emitter, rule: Rule, m: Match | None) -> None:
    # conntrack_mt (revision 3): --ctstate first; then, without a conntrack entry, the match
    # holds exactly when --ctstate was given; with one, every other option must hold.
    assert m is not None
    state = m.get("--ctstate")
    if state is not None:
        _state_bits(em, int(state.value), state.negated)
    rest = sorted((o for o in m.options if o.name != "--ctstate"),
                  key=lambda o: CT_ORDER.index(o.name))
    if not rest:
        return
    done = em.label("ct_done")
    _if_tracked(em, done if state is not None else em.fail)
    for o in rest:
        _ct_option(em, o)
    em.emit(Label(done))


def _tcp_option_needs(m: Match) -> nf.Needs:
    return nf.Needs(tcp_options=m.get("--tcp-option") is not None)


def _ct_needs(m: Match) -> nf.Needs:
    names = {o.name for o in m.options}
    state = m.get("--ctstate")
    return nf.Needs(conntrack_nat=state is not None and bool(int(state.value) & CT_SNAT_DNAT),
                    ct_dir="--ctdir" in names, ct_status="--ctstatus" in names,
                    ct_expires="--ctexpire" in names,
                    ct_tuples=bool(names & ({"--ctproto"} | set(CT_ADDRS) | set(CT_PORTS))))


def emit_connmark(em: Emitter, rule: Rule, m: Match | None) -> None:
    # connmark_mt: no conntrack entry never matches, negated or not; else
    # ((ct->mark & mask) == mark) ^ invert (mark bits outside the mask never match).
    assert m is not None
    o = m.get("--mark")
    assert o is not None
    value, mask = o.value
    _if_tracked(em, em.fail)
    masked_u32(em, nf.CT_MARK, value, mask, o.negated)


def emit_mac(em: Emitter, rule: Rule, m: Match | None) -> None:
    # mac_mt: no Ethernet MAC header in place is a miss whatever the negation (MAC_OK).
    assert m is not None
    o = m.get("--mac-source")
    assert o is not None
    mac = bytes.fromhex(str(o.value).replace(":", ""))
    load_u32(em, R1, nf.MAC_OK)
    em.emit(asm.jmp("jeq", R1, 0, em.fail))

    def test(on_false: str) -> None:
        em.emit(asm.ldx(Size.W, R1, R7, nf.MAC_SRC),
                asm.jmp32("jne", R1, int.from_bytes(mac[:4], "little"), on_false),
                asm.ldx(Size.H, R1, R7, nf.MAC_SRC + 4),
                asm.jmp("jne", R1, int.from_bytes(mac[4:], "little"), on_false))

    negatable(em, o.negated, test)


SCTP_HEADER = nf.SCTP_COMMON_HEADER  # sctp_mt hot-drops a shorter one


def sctp_chunk_set(chunks: str) -> set[int]:
    """The chunk types of a --chunk-types list (libxt_sctp: ALL sets every bit, NONE none)."""
    if chunks == "ALL":
        return set(range(256))
    if chunks == "NONE":
        return set()
    return {SCTP_CHUNKS[name] for name in chunks.split(",")}


def _chunk_bytes(types: set[int]) -> list[int]:
    return [sum(1 << b for b in range(8) if 8 * j + b in types) for j in range(32)]


def _sctp_chunks(em: Emitter, how: str, types: set[int]) -> None:
    # match_packet, from the types seen before the walk ended (SCTP_TYPES) and whether it
    # ended on a bad chunk header (SCTP_BAD: hot drop, unless "any" met a listed type or
    # "only" an unlisted one first, which answer before reaching it).
    wanted = _chunk_bytes(types)
    hit = em.label("chunk_hit")

    def hot_if_bad() -> None:
        load_u32(em, R1, nf.SCTP_STATE)
        em.emit(asm.jmp("jeq", R1, nf.SCTP_BAD, em.hot()))

    def any_of(masks: list[int], target: str) -> None:
        for j, mask in enumerate(masks):
            if mask:
                em.emit(asm.ldx(Size.B, R1, R7, nf.SCTP_TYPES + j), asm.and64(R1, mask),
                        asm.jmp("jne", R1, 0, target))

    if how == "any":
        any_of(wanted, hit)
        hot_if_bad()
        em.emit(asm.ja(em.fail))
    elif how == "only":
        any_of([~w & 0xFF for w in wanted], em.fail)
        hot_if_bad()
    else:
        hot_if_bad()
        for j, mask in enumerate(wanted):
            if mask:
                em.emit(asm.ldx(Size.B, R1, R7, nf.SCTP_TYPES + j), asm.and64(R1, mask),
                        asm.jmp("jne", R1, mask, em.fail))
    em.emit(Label(hit))


def emit_sctp(em: Emitter, rule: Rule, m: Match | None) -> None:
    # sctp_mt: a later fragment misses, a truncated common header hot-drops, then the ports
    # and the chunk types.
    assert m is not None
    not_fragment(em)
    need_l4(em, SCTP_HEADER)
    _ports(em, m)
    o = m.get("--chunk-types")
    if o is not None:
        how, chunks = o.value
        _sctp_chunks(em, how, sctp_chunk_set(chunks))


def _check_sctp(m: Match) -> str | None:
    o = m.get("--chunk-types")
    if o is None:
        return None
    if o.negated:
        return ("match 'sctp' option '! --chunk-types' is not supported: when the chunk walk "
                "hot-drops, iptables still counts the rule (the negation holds), bpfilter "
                "cannot")
    if ":" in o.value[1]:
        return "match 'sctp' option '--chunk-types' with chunk flags is not supported"
    return None


def _sctp_needs(m: Match) -> nf.Needs:
    return nf.Needs(sctp_chunks=m.get("--chunk-types") is not None)


OWNER_IDS = {"--uid-owner": nf.OWNER_UID, "--gid-owner": nf.OWNER_GID}


def emit_owner(em: Emitter, rule: Rule, m: Match | None) -> None:
    # owner_mt, with info->match the options given and info->invert the negated ones: no
    # socket matches when (match ^ invert) == 0 (every option negated); with a socket,
    # `! --socket-exists` fails; without a file, ((match ^ invert) & (UID | GID)) == 0
    # decides; with one, fsuid and fsgid are compared (ids of the initial user namespace:
    # the loader refuses a network namespace owned by another one, where make_kuid maps).
    assert m is not None
    done, has_socket, has_file = em.label("own_done"), em.label("own_sk"), em.label("own_file")
    ids = [o for o in m.options if o.name in OWNER_IDS]
    load_u32(em, R1, nf.OWNER_STATE)
    em.emit(asm.jmp("jne", R1, nf.OWNER_NONE, has_socket),
            asm.ja(done if all(o.negated for o in m.options) else em.fail), Label(has_socket))
    sock = m.get("--socket-exists")
    if sock is not None and sock.negated:
        em.emit(asm.ja(em.fail))
    em.emit(asm.jmp("jne", R1, nf.OWNER_NO_FILE, has_file),
            asm.ja(done if all(o.negated for o in ids) else em.fail), Label(has_file))
    for o in ids:
        r = o.value
        assert isinstance(r, PortRange)

        def test(on_false: str, r: PortRange = r, offset: int = OWNER_IDS[o.name]) -> None:
            load_u32(em, R1, offset)
            in_range(em, R1, r.lo, r.hi, U32, on_false)

        negatable(em, o.negated, test)
    em.emit(Label(done))


ECN_IP_MASK = 3  # XT_ECN_IP_MASK: the ECN field of the TOS byte / traffic class
TCP_ECE, TCP_CWR = 0x40, 0x80  # in the TCP flags byte


def emit_ecn(em: Emitter, rule: Rule, m: Match | None) -> None:
    # ecn_mt4 / ecn_mt6: the IP ECN field, then ECE and CWR of the TCP header at thoff, read
    # without a fragment test; a transport header shorter than a TCP header is a miss
    # whatever the negations (match_tcp returns false).
    assert m is not None
    ect = m.get("--ecn-ip-ect")
    if ect is not None:
        value = int(ect.value)

        def test(on_false: str) -> None:
            load_dsfield(em, R1)
            em.emit(asm.and64(R1, ECN_IP_MASK), asm.jmp("jne", R1, value, on_false))

        negatable(em, ect.negated, test)
    bits = [(o, bit) for o, bit in ((m.get("--ecn-tcp-ece"), TCP_ECE),
                                    (m.get("--ecn-tcp-cwr"), TCP_CWR)) if o is not None]
    if not bits:
        return
    load_u32(em, R1, nf.L4_LEN)
    em.emit(asm.jmp("jlt", R1, TCP_HEADER, em.fail))
    for o, bit in bits:
        em.emit(asm.ldx(Size.B, R1, R7, nf.L4 + TCP_FLAGS_OFFSET), asm.and64(R1, bit),
                asm.jmp("jne" if o.negated else "jeq", R1, 0, em.fail))


DCCP_HEADER = 12  # sizeof(struct dccp_hdr): dccp_mt hot-drops a shorter one
DCCP_TYPE_OFFSET = 8  # the byte holding dccph_x (bit 0) and dccph_type (bits 1-4)
DCCP_PKT_INVALID = 10  # every type from 10 up matches --dccp-types INVALID


def emit_dccp(em: Emitter, rule: Rule, m: Match | None) -> None:
    # dccp_mt: a later fragment misses, a truncated header hot-drops, then the ports and the
    # packet type, typemask & (1 << type) with types 10-15 counted as INVALID (verified on
    # Linux 6.18 against iptables-legacy: tests/e2e/test_extensions_oracle.py).
    assert m is not None
    not_fragment(em)
    need_l4(em, DCCP_HEADER)
    _ports(em, m)
    o = m.get("--dccp-types")
    if o is None:
        return
    mask = int(o.value)

    def test(on_false: str) -> None:
        known = em.label("dccp_type")
        em.emit(asm.ldx(Size.B, R1, R7, nf.L4 + DCCP_TYPE_OFFSET), asm.rsh64(R1, 1),
                asm.and64(R1, 0xF), asm.jmp("jle", R1, DCCP_PKT_INVALID, known),
                asm.mov64(R1, DCCP_PKT_INVALID), Label(known),
                asm.mov64(R2, mask), asm.rsh64(R2, R1),
                asm.and64(R2, 1), asm.jmp("jeq", R2, 0, on_false))

    negatable(em, o.negated, test)


def _refuse_option(name: str, reason: str) -> Callable[[Match], str | None]:
    def check(m: Match) -> str | None:
        o = m.get(name)
        return None if o is None else f"match '{m.kind}' option '{name}' is not supported: {reason}"
    return check


def _refused(name: str, reason: str) -> Matcher:
    """A match bpfilter knows it cannot compile exactly: refused with ``reason``."""
    def never(em: Emitter, rule: Rule, m: Match | None) -> None:
        raise AssertionError(f"match '{name}' is refused and never emitted")

    return Matcher(name, never, check=lambda m: f"match '{name}' is not supported: {reason}",
                   options=frozenset(MATCHES[name].options))


# Rule header fields, evaluated first and in this order (as ip_packet_match does).
HEADER: dict[str, Matcher] = {
    "-s": Matcher("-s", emit_src, hooks=PACKET_HOOKS),
    "-d": Matcher("-d", emit_dst, hooks=PACKET_HOOKS),
    # At XDP/TC the device is the interface the program is attached to (flavor_packet).
    "-i": Matcher("-i", emit_iif, hooks=ALL_HOOKS | {IfHook.XDP, IfHook.TC_INGRESS},
                  needs=nf.Needs(devices=True)),
    "-o": Matcher("-o", emit_oif, hooks=ALL_HOOKS | {IfHook.TC_EGRESS},
                  needs=nf.Needs(devices=True)),
    "-p": Matcher("-p", emit_proto, hooks=PACKET_HOOKS),
    "-f": Matcher("-f", emit_fragment, hooks=PACKET_HOOKS, families=frozenset({4})),
}

MATCHERS: dict[str, Matcher] = {
    m.name: m for m in (
        # --tcp-option needs the option walk of the prologue (Needs.tcp_options).
        Matcher("tcp", emit_tcp, frozenset({"--sport", "--dport", "--tcp-flags",
                                            "--tcp-option"}),
                hooks=PACKET_HOOKS, extra_needs=_tcp_option_needs),
        Matcher("tcpmss", emit_tcpmss, frozenset({"--mss"}), hooks=PACKET_HOOKS,
                needs=nf.Needs(tcp_options=True)),
        Matcher("udp", emit_udp, frozenset({"--sport", "--dport"}), hooks=PACKET_HOOKS),
        Matcher("icmp", emit_icmp, frozenset({"--icmp-type"}), hooks=PACKET_HOOKS,
                families=frozenset({4})),
        Matcher("icmp6", emit_icmp6, frozenset({"--icmpv6-type"}), hooks=PACKET_HOOKS,
                families=frozenset({6})),
        Matcher("multiport", emit_multiport, frozenset({"--sports", "--dports", "--ports"}),
                hooks=PACKET_HOOKS),
        Matcher("conntrack", emit_conntrack,
                frozenset({"--ctstate", "--ctdir", "--ctproto", "--ctstatus", "--ctexpire",
                           *CT_ADDRS, *CT_PORTS}),
                hooks=CT_HOOKS, needs=nf.Needs(conntrack=True), extra_needs=_ct_needs),
        Matcher("state", emit_state, frozenset({"--state"}), hooks=CT_HOOKS,
                needs=nf.Needs(conntrack=True)),
        Matcher("mark", emit_mark, frozenset({"--mark"}), hooks=SKB_HOOKS,
                needs=nf.Needs(mark=True)),
        Matcher("length", emit_length, frozenset({"--length"}), hooks=PACKET_HOOKS),
        Matcher("iprange", emit_iprange, frozenset({"--src-range", "--dst-range"}),
                hooks=PACKET_HOOKS),
        Matcher("ttl", emit_ttl, frozenset({"--ttl-eq", "--ttl-lt", "--ttl-gt"}),
                hooks=PACKET_HOOKS, families=frozenset({4})),
        Matcher("hl", emit_ttl, frozenset({"--hl-eq", "--hl-lt", "--hl-gt"}),
                hooks=PACKET_HOOKS, families=frozenset({6})),
        Matcher("tos", emit_tos, frozenset({"--tos"}), hooks=PACKET_HOOKS),
        Matcher("dscp", emit_dscp, frozenset({"--dscp"}), hooks=PACKET_HOOKS),
        # At TC egress skb->pkt_type is not what netfilter's OUTPUT sees: ingress only.
        Matcher("pkttype", emit_pkttype, frozenset({"--pkt-type"}),
                hooks=ALL_HOOKS | {IfHook.TC_INGRESS}, needs=nf.Needs(pkt_type=True)),
        Matcher("comment", emit_nothing, frozenset({"--comment"}), hooks=PACKET_HOOKS),
        Matcher("connmark", emit_connmark, frozenset({"--mark"}), hooks=CT_HOOKS,
                needs=nf.Needs(conntrack=True, ct_mark=True)),
        Matcher("mac", emit_mac, frozenset({"--mac-source"}), hooks=frozenset(
            {NfHook.PRE_ROUTING, NfHook.LOCAL_IN, NfHook.FORWARD, IfHook.XDP,
             IfHook.TC_INGRESS}), needs=nf.Needs(mac=True)),
        Matcher("sctp", emit_sctp, frozenset({"--sport", "--dport", "--chunk-types"}),
                hooks=PACKET_HOOKS,
                check=_check_sctp, extra_needs=_sctp_needs),
        Matcher("owner", emit_owner, frozenset({"--uid-owner", "--gid-owner",
                                                "--socket-exists", "--suppl-groups"}),
                hooks=frozenset({NfHook.LOCAL_OUT, NfHook.POST_ROUTING}),
                needs=nf.Needs(owner=True),
                check=_refuse_option("--suppl-groups", "it walks the socket owner's "
                                     "supplementary groups, a list of any length")),
        # Verified on Linux 6.18: a netfilter program calling bpf_fib_lookup is refused
        # ("program of this type cannot use helper bpf_fib_lookup#69").
        _refused("rpfilter", "it needs a FIB lookup, and netfilter BPF programs have none "
                 "(bpf_fib_lookup is for XDP and TC)"),
        _refused("addrtype", "it looks addresses up in the routing tables "
                 "(inet_dev_addr_type, ip6_route_output), and netfilter BPF programs cannot "
                 "(bpf_fib_lookup is for XDP and TC)"),
        _refused("connlimit", "it counts the conntrack entries per address (nf_conncount), "
                 "which a BPF program cannot enumerate"),
        # --rt-0-addrs (a list of up to 16 addresses to compare) is not compiled.
        Matcher("rt", emit_rt, frozenset({"--rt-type", "--rt-segsleft", "--rt-len", "--rt-0-res"}),
                hooks=PACKET_HOOKS, families=frozenset({6}), needs=nf.Needs(routing=True)),
        # State in maps (codegen/stateful).
        Matcher("limit", stateful.emit_limit, stateful.LIMIT_OPTIONS, hooks=PACKET_HOOKS,
                check=stateful.check_limit),
        Matcher("statistic", stateful.emit_statistic, stateful.STATISTIC_OPTIONS,
                hooks=PACKET_HOOKS),
        Matcher("hashlimit", stateful.emit_hashlimit, stateful.HASHLIMIT_OPTIONS,
                hooks=PACKET_HOOKS, check=stateful.check_hashlimit),
        Matcher("recent", stateful.emit_recent, stateful.RECENT_OPTIONS, hooks=PACKET_HOOKS,
                check=stateful.check_recent),
        Matcher("frag", emit_frag, frozenset({"--fragid", "--fraglen", "--fragres",
                                              "--fragfirst", "--fragmore", "--fraglast"}),
                hooks=PACKET_HOOKS, families=frozenset({6}), needs=nf.Needs(fragment=True)),
        Matcher("hbh", emit_opts, frozenset({"--hbh-len", "--hbh-opts"}),
                families=frozenset({6}), needs=nf.Needs(hbh=True), extra_needs=_opts_needs),
        Matcher("dst", emit_opts, frozenset({"--dst-len", "--dst-opts"}),
                families=frozenset({6}), needs=nf.Needs(dst=True), extra_needs=_opts_needs),
        Matcher("ipv6header", emit_ipv6header, frozenset({"--header", "--soft"}),
                hooks=PACKET_HOOKS, families=frozenset({6}), needs=nf.Needs(ipv6header=True)),
        Matcher("esp", emit_esp, frozenset({"--espspi"}), hooks=PACKET_HOOKS),
        Matcher("ah", emit_ah, frozenset({"--ahspi"}), hooks=PACKET_HOOKS,
                families=frozenset({4})),
        Matcher("mh", emit_mh, frozenset({"--mh-type"}), hooks=PACKET_HOOKS,
                families=frozenset({6})),
        Matcher("cpu", emit_cpu, frozenset({"--cpu"}), hooks=PACKET_HOOKS),
        Matcher("quota", emit_quota, frozenset({"--quota"}), hooks=PACKET_HOOKS),
        _refused("helper", "it reads the conntrack helper extension of the packet's "
                 "connection, which bpfilter does not compile yet"),
        _refused("eui64", "it compares the Ethernet source with the IPv6 source's interface "
                 "identifier, which bpfilter does not compile yet"),
        # bpfilter's own sets (codegen/sets, `bpfilter set`): pinned maps opened at load.
        Matcher("set", sets.emit_set, frozenset({"--match-set"}), hooks=PACKET_HOOKS),
        Matcher("ecn", emit_ecn, frozenset({"--ecn-ip-ect", "--ecn-tcp-ece", "--ecn-tcp-cwr"}),
                hooks=PACKET_HOOKS),
        Matcher("dccp", emit_dccp, frozenset({"--sport", "--dport", "--dccp-types",
                                              "--dccp-option"}),
                hooks=PACKET_HOOKS,
                check=_refuse_option("--dccp-option", "dccp_mt walks the packet's DCCP "
                                     "options, up to 1,020 bytes, which bpfilter does not "
                                     "compile")),
        _refused("time", "it reads the wall clock and, with --kerneltz, the kernel's time "
                 "zone, which bpfilter does not compile yet"),
        _refused("string", "it runs a text search (Boyer-Moore or KMP) over the whole packet, "
                 "which a BPF program cannot bound"),
        _refused("u32", "its tests read packet words at computed offsets (`@`), which "
                 "bpfilter does not compile yet"),
        _refused("devgroup", "it reads the devices' group (net_device.group), which bpfilter "
                 "does not compile yet"),
        _refused("realm", "it reads the route's realm (dst.tclassid), which netfilter BPF "
                 "programs cannot reach"),
        _refused("connbytes", "it reads the conntrack accounting extension (nf_conn_acct), "
                 "which bpfilter does not compile yet"),
        _refused("nfacct", "it updates a named nfacct accounting object, which BPF programs "
                 "cannot reach"),
        _refused("physdev", "it reads the bridge ports of the packet (nf_bridge_info), which "
                 "bpfilter does not compile yet"),
        _refused("policy", "it walks the packet's IPsec state (sec_path, the route's xfrm "
                 "bundle), which BPF programs cannot reach"),
        _refused("socket", "it looks up the packet's socket (nf_sk_lookup_slow), which "
                 "netfilter BPF programs cannot call"),
        _refused("cgroup", "it reads the cgroup of the packet's socket, which bpfilter does "
                 "not compile yet"),
        _refused("connlabel", "it reads (and with --set writes) the conntrack labels "
                 "extension, which bpfilter does not compile yet"),
        _refused("osf", "it matches TCP SYN options against the nfnetlink_osf fingerprint "
                 "database, which BPF programs cannot reach"),
        _refused("srh", "it walks the IPv6 segment routing header and its segment list, "
                 "which bpfilter does not compile yet"),
        _refused("ipcomp", "bpfilter does not compile the IPComp header test yet"),
        _refused("rateest", "it reads the rate estimators of RATEEST targets (gen_estimator), "
                 "which BPF programs cannot reach"),
        _refused("bpf", "it runs a classic BPF program or a pinned socket filter, which "
                 "bpfilter does not translate yet"),
        _refused("cluster", "it hashes the conntrack entry's original source address "
                 "(jhash), which bpfilter does not compile yet"),
    )
}


def header_fields(rule: Rule) -> list[str]:
    """The rule header fields a rule uses, in evaluation order."""
    out = []
    if rule.src is not None:
        out.append("-s")
    if rule.dst is not None:
        out.append("-d")
    if rule.iif is not None:
        out.append("-i")
    if rule.oif is not None:
        out.append("-o")
    if rule.proto is not None:
        out.append("-p")
    if rule.fragment is not None:
        out.append("-f")
    return out
