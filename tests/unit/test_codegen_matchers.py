"""The matcher table and its emitters, without a kernel (verdicts: tests/kernel)."""

from __future__ import annotations

import pytest

from bpfilter.codegen import flavor_netfilter as nf
from bpfilter.codegen.asm import Label
from bpfilter.codegen.insn import Insn
from bpfilter.codegen.matchers import (
    HEADER,
    MATCHERS,
    Emitter,
    emit_conntrack,
    emit_src,
    emit_tcp,
    header_fields,
    interface_bytes,
    masked_words,
)
from bpfilter.codegen.opcodes import JmpOp
from bpfilter.codegen.uapi import IfHook, NfHook
from bpfilter.ir.matches import MATCHES
from bpfilter.ir.model import Match, Option, PortRange, Prefix, Rule


def emitter(family: int = 4) -> Emitter:
    return Emitter(family, "r", "r:next", "r:hot")


def jump_targets(em: Emitter) -> list[str]:
    return [it.ref for it in em.items if isinstance(it, Insn) and it.is_jump
            and it.ref is not None]


@pytest.mark.parametrize(("name", "value", "mask"), [
    ("eth0", b"eth0", 5),  # the NUL is compared too: eth0 does not match eth01
    ("eth+", b"eth+", 3),  # the + stays in the name but is not compared
    ("+", b"+", 0),
    ("a" * 15, b"a" * 15, 16),
])
def test_interface_bytes(name: str, value: bytes, mask: int) -> None:
    v, m = interface_bytes(name)
    assert v == value.ljust(16, b"\0")
    assert m == (b"\xff" * mask).ljust(16, b"\0")


def test_interface_names_fit_ifnamsiz() -> None:
    with pytest.raises(ValueError, match="longer than 15"):
        interface_bytes("a" * 16)


def test_masked_words_skip_what_the_mask_ignores() -> None:
    em = emitter()
    value = bytes([198, 18, 0, 0]) + bytes(12)
    mask = bytes([255, 254, 0, 0]) + bytes(12)
    masked_words(em, nf.L3 + 8, value, mask, em.fail)
    insns = [it for it in em.items if isinstance(it, Insn)]
    assert len(insns) == 3  # load, and, compare: the all-zero words cost nothing
    assert insns[2].imm == int.from_bytes(bytes([198, 18, 0, 0]), "little")
    em = emitter()
    masked_words(em, 0, b"\1\2\3\4", b"\xff" * 4, em.fail)
    assert len(em.items) == 2  # a full mask needs no and


def test_negation_jumps_to_fail_when_the_test_holds() -> None:
    em = emitter()
    rule = Rule(src=Prefix(0xC6120001, 0xFFFFFFFF, 32), src_neg=True)
    emit_src(em, rule, None)
    assert isinstance(em.items[-1], Label)
    ja = em.items[-2]
    assert isinstance(ja, Insn) and ja.op == JmpOp.JA and ja.ref == em.fail
    assert jump_targets(em)[0] == em.items[-1].name


def test_tcp_hot_drops_and_conntrack_does_not() -> None:
    em = emitter()
    tcp = Match("tcp", (Option("--dport", PortRange(22, 22)),))
    emit_tcp(em, Rule(proto=6), tcp)
    assert em.used_hotdrop and em.hotdrop in jump_targets(em)
    em = emitter()
    emit_conntrack(em, Rule(), Match("conntrack", (Option("--ctstate", 8),)))
    assert not em.used_hotdrop


def test_ipv6_tcp_has_no_evil_fragment_check() -> None:
    tcp = Match("tcp", (Option("--dport", PortRange(22, 22)),))
    v4, v6 = emitter(4), emitter(6)
    emit_tcp(v4, Rule(proto=6), tcp)
    emit_tcp(v6, Rule(proto=6), tcp)
    assert len(v4.items) > len(v6.items)


def test_header_fields_in_ip_packet_match_order() -> None:
    rule = Rule(src=Prefix(0, 0, 32), dst=Prefix(0, 0, 32), iif="a", oif="b", proto=6,
                fragment=False)
    assert header_fields(rule) == ["-s", "-d", "-i", "-o", "-p", "-f"]
    assert header_fields(Rule()) == []


def test_every_matcher_is_a_front_end_match() -> None:
    assert set(MATCHERS) <= set(MATCHES)
    for name, m in MATCHERS.items():
        assert m.options <= set(MATCHES[name].options), name


def test_refusals() -> None:
    tcp = MATCHERS["tcp"]
    assert tcp.refusal(Match("tcp", (Option("--dport", PortRange(1, 1)),)), 4) is None
    assert tcp.refusal(Match("tcp", (Option("--tcp-option", 2),)), 4) is None
    assert tcp.needs_for(Match("tcp", (Option("--tcp-option", 2),))) == \
        nf.Needs(tcp_options=True)
    assert MATCHERS["icmp"].refusal(Match("icmp"), 6) == "match 'icmp' is not supported for IPv6"
    assert HEADER["-f"].refusal(Match(""), 6) == "match '-f' is not supported for IPv6"
    # conntrack state runs at netfilter hooks and at TC egress (the sk_buff carries it)
    assert MATCHERS["state"].hooks == frozenset(NfHook) | {IfHook.TC_EGRESS}
    ct = MATCHERS["conntrack"]
    assert ct.refusal(Match("conntrack", (Option("--ctstate", 8 | 256),)), 4) is None
    assert ct.refusal(Match("conntrack", (Option("--ctdir", "REPLY"),)), 4) is None
    assert MATCHERS["mac"].refusal(Match("mac", (Option("--mac-source", "02:00:00:00:00:01"),)),
                                   4, NfHook.LOCAL_OUT) == \
        "match 'mac' is not supported at hook LOCAL_OUT"
    assert MATCHERS["sctp"].refusal(
        Match("sctp", (Option("--chunk-types", ("any", "INIT")),)), 4) is None
    assert MATCHERS["sctp"].refusal(
        Match("sctp", (Option("--chunk-types", ("any", "INIT"), negated=True),)), 4) \
        .startswith("match 'sctp' option '! --chunk-types' is not supported")
    assert MATCHERS["rpfilter"].refusal(Match("rpfilter", (Option("--loose", True),)), 4) \
        .startswith("match 'rpfilter' is not supported: it needs a FIB lookup")


def test_needs() -> None:
    assert HEADER["-i"].needs.devices and HEADER["-o"].needs.devices
    assert MATCHERS["mark"].needs.mark
    assert MATCHERS["conntrack"].needs.conntrack and MATCHERS["state"].needs.conntrack
    assert MATCHERS["tcp"].needs == nf.Needs()
    ct = MATCHERS["conntrack"]
    assert ct.needs_for(Match("conntrack", (Option("--ctstate", 8),))) == \
        nf.Needs(conntrack=True)
    assert ct.needs_for(Match("conntrack", (Option("--ctstate", 8 | 512),))) == \
        nf.Needs(conntrack=True, conntrack_nat=True)
    assert ct.needs_for(Match("conntrack", (Option("--ctdir", "REPLY"),
                                            Option("--ctproto", 6)))) == \
        nf.Needs(conntrack=True, ct_dir=True, ct_tuples=True)
    assert MATCHERS["connmark"].needs == nf.Needs(conntrack=True, ct_mark=True)


def test_kernel_layout_resolves_field_loads() -> None:
    layout = nf.KernelLayout({f: 100 + i for i, f in enumerate(nf.KField)})
    from bpfilter.codegen.insn import R1, R6
    from bpfilter.codegen.opcodes import Size
    (insn,) = layout.resolve([nf.FieldLoad(Size.DW, R1, R6, nf.KField.CTX_SKB, 8)])
    assert isinstance(insn, Insn) and insn.off == 100 + list(nf.KField).index(
        nf.KField.CTX_SKB) + 8
    with pytest.raises(ValueError, match="lacks"):
        nf.KernelLayout({})


def test_kernel_layout_resolves_hz_only_when_known() -> None:
    from bpfilter.codegen.insn import R2
    offsets = {f: 0 for f in nf.KField}
    (insn,) = nf.KernelLayout(offsets, hz=250).resolve([nf.KernelHz(R2)])
    assert isinstance(insn, Insn) and insn.imm == 250
    with pytest.raises(ValueError, match="HZ is unknown"):
        nf.KernelLayout(offsets).resolve([nf.KernelHz(R2)])


def test_conntrack_options_emit_in_kernel_order() -> None:
    # conntrack_mt's order whatever the input order: the entry check, --ctdir, --ctexpire.
    em = Emitter(4, "r", "fail", "hot")
    emit_conntrack(em, Rule(), Match("conntrack", (Option("--ctexpire", PortRange(1, 2)),
                                                   Option("--ctdir", "REPLY"))))
    assert not any(isinstance(it, nf.FieldLoad) for it in em.items)  # meta area only

    def where(pred: object) -> int:
        return next(i for i, it in enumerate(em.items) if pred(it))  # type: ignore[operator]

    state = where(lambda it: isinstance(it, Insn) and it.off == nf.CT_STATE)
    direction = where(lambda it: isinstance(it, Insn) and it.off == nf.CT_DIR)
    assert state < direction < where(lambda it: isinstance(it, nf.KernelHz))


def test_func_btf_and_hook_state() -> None:
    blob, ids = nf.func_btf([("bpfilter_main", nf.FuncKind.MAIN),
                             ("chain_0", nf.FuncKind.GLOBAL), ("count", nf.FuncKind.COUNT)])
    assert blob[:2] == nf.BTF_MAGIC.to_bytes(2, "little")
    assert len(ids) == 3 and ids == sorted(ids) and len(set(ids)) == 3
    assert nf.hook_state_context(NfHook.FORWARD, 10, 48) == bytes([2, 10]) + bytes(46)
