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

from bpfilter.codegen import asm
from bpfilter.codegen import flavor_netfilter as nf
from bpfilter.codegen.asm import Label
from bpfilter.codegen.insn import R1, R2, R7, Reg
from bpfilter.codegen.opcodes import Size
from bpfilter.codegen.spec import MapSpec
from bpfilter.codegen.uapi import IFNAMSIZ, MapType, NfHook, PacketType
from bpfilter.ir.model import Match, PortRange, Prefix, Rule

ALL_HOOKS = frozenset(NfHook)
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
    hook: NfHook | None = None
    _states: dict[str, int] = field(default_factory=dict)

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
    """``lo <= reg <= hi`` for a value known to lie in [0, maximum]."""
    if lo == hi:
        em.emit(asm.jmp("jne", reg, lo, on_false))
        return
    if lo > 0:
        em.emit(asm.jmp("jlt", reg, lo, on_false))
    if hi < maximum:
        em.emit(asm.jmp("jgt", reg, hi, on_false))


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


def emit_conntrack(em: Emitter, rule: Rule, m: Match | None) -> None:
    assert m is not None
    o = m.get("--ctstate")
    assert o is not None
    _state_bits(em, int(o.value), o.negated)


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

    def test(on_false: str) -> None:
        load_u32(em, R1, nf.MARK)
        if mask != U32:
            em.emit(asm.alu32("and", R1, mask))
        em.emit(asm.jmp32("jne", R1, value, on_false))

    negatable(em, o.negated, test)


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
    hooks: frozenset[NfHook] = ALL_HOOKS
    families: frozenset[int] = BOTH_FAMILIES
    needs: nf.Needs = nf.Needs()
    check: Callable[[Match], str | None] | None = None  # a refusal, or None
    extra_needs: Callable[[Match], nf.Needs] | None = None  # needs that depend on options

    def needs_for(self, m: Match | None) -> nf.Needs:
        """What the prologue must gather for this instance."""
        if m is None or self.extra_needs is None:
            return self.needs
        return self.needs | self.extra_needs(m)

    def refusal(self, m: Match, family: int, hook: NfHook | None = None) -> str | None:
        """Why this match cannot compile (for ``family`` at ``hook``), or None."""
        if family not in self.families:
            return f"match '{self.name}' is not supported for IPv{family}"
        if hook is not None and hook not in self.hooks:
            return f"match '{self.name}' is not supported at hook {hook.name}"
        for o in m.options:
            if o.name not in self.options:
                return f"match '{self.name}' option '{o.name}' is not supported"
        return self.check(m) if self.check is not None else None


def _check_ctstate(m: Match) -> str | None:
    if m.get("--ctstate") is None:
        return f"match '{m.kind}' needs --ctstate (the only option supported)"
    return None


def _ct_nat(m: Match) -> nf.Needs:
    o = m.get("--ctstate")
    return nf.Needs(conntrack_nat=o is not None and bool(int(o.value) & CT_SNAT_DNAT))


# Rule header fields, evaluated first and in this order (as ip_packet_match does).
HEADER: dict[str, Matcher] = {
    "-s": Matcher("-s", emit_src),
    "-d": Matcher("-d", emit_dst),
    "-i": Matcher("-i", emit_iif, needs=nf.Needs(devices=True)),
    "-o": Matcher("-o", emit_oif, needs=nf.Needs(devices=True)),
    "-p": Matcher("-p", emit_proto),
    "-f": Matcher("-f", emit_fragment, families=frozenset({4})),
}

MATCHERS: dict[str, Matcher] = {
    m.name: m for m in (
        Matcher("tcp", emit_tcp, frozenset({"--sport", "--dport", "--tcp-flags"})),
        Matcher("udp", emit_udp, frozenset({"--sport", "--dport"})),
        Matcher("icmp", emit_icmp, frozenset({"--icmp-type"}), families=frozenset({4})),
        Matcher("icmp6", emit_icmp6, frozenset({"--icmpv6-type"}), families=frozenset({6})),
        Matcher("multiport", emit_multiport, frozenset({"--sports", "--dports", "--ports"})),
        Matcher("conntrack", emit_conntrack, frozenset({"--ctstate"}),
                needs=nf.Needs(conntrack=True), check=_check_ctstate, extra_needs=_ct_nat),
        Matcher("state", emit_state, frozenset({"--state"}), needs=nf.Needs(conntrack=True)),
        Matcher("mark", emit_mark, frozenset({"--mark"}), needs=nf.Needs(mark=True)),
        Matcher("length", emit_length, frozenset({"--length"})),
        Matcher("iprange", emit_iprange, frozenset({"--src-range", "--dst-range"})),
        Matcher("ttl", emit_ttl, frozenset({"--ttl-eq", "--ttl-lt", "--ttl-gt"}),
                families=frozenset({4})),
        Matcher("hl", emit_ttl, frozenset({"--hl-eq", "--hl-lt", "--hl-gt"}),
                families=frozenset({6})),
        Matcher("tos", emit_tos, frozenset({"--tos"})),
        Matcher("dscp", emit_dscp, frozenset({"--dscp"})),
        Matcher("pkttype", emit_pkttype, frozenset({"--pkt-type"}),
                needs=nf.Needs(pkt_type=True)),
        Matcher("comment", emit_nothing, frozenset({"--comment"})),
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
