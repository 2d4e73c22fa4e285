"""The loader with real traffic: attach compiled rulesets in a throwaway namespace pair and
check delivery, interfaces, conntrack states, counters, pins and clean unloading."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
from collections.abc import Iterator

import pytest

from bpfilter import bpf, bpffs, loader, netns, testbed
from bpfilter.codegen import asm, matchers
from bpfilter.codegen.compiler import CompiledRuleset, compile_ruleset
from bpfilter.codegen.insn import R1, R7
from bpfilter.codegen.opcodes import Size
from bpfilter.codegen.uapi import LinkType
from bpfilter.grammar.iptables import parse_restore


@pytest.fixture
def pair() -> Iterator[testbed.NetnsPair]:
    with testbed.netns_pair() as p:
        yield p


def compiled(rules: str, *, family: int = 4, policy: str = "ACCEPT") -> CompiledRuleset:
    body = "\n".join(r.strip() for r in rules.strip().splitlines())
    text = (f"*filter\n:INPUT {policy} [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            f"{body}\nCOMMIT\n")
    return compile_ruleset(parse_restore(text, family=family), family)


def netfilter_links() -> set[int]:
    out = set()
    for link_id in bpf.link_ids():
        try:
            with bpf.link_get_fd_by_id(link_id) as link:
                if bpf.link_info(link).type == LinkType.NETFILTER:
                    out.add(link_id)
        except FileNotFoundError:
            continue
    return out


def nft_tables(ns: str) -> str:
    return testbed.run(ns, ["nft", "list", "tables"]).stdout


def test_drop_and_pass_with_counters_pins_and_unload(pair: testbed.NetnsPair) -> None:
    before = netfilter_links()
    ruleset = compiled("-A INPUT -p icmp -j DROP\n-A INPUT -p udp")
    handle = loader.load(ruleset, netns=pair.b)
    try:
        assert not testbed.ping(pair.a, pair.ipv4_b, count=2)
        assert testbed.udp_reaches(pair.a, pair.b, pair.ipv4_b)
        counters = handle.counters()
        assert counters[("filter", "INPUT", 1)][0] >= 2
        assert counters[("filter", "INPUT", 2)][0] >= 1
        assert counters[("filter", "INPUT", 2)][1] >= 28 + len(b"bpfilter-testbed")
        names = {p.name for p in bpffs.pins(pair.b)}
        assert names == {"link_filter_INPUT4", "map_counters4"}
        assert len(netfilter_links() - before) == 1
    finally:
        handle.unload()
    handle.unload()  # idempotent
    assert testbed.ping(pair.a, pair.ipv4_b)
    assert bpffs.pins(pair.b) == []
    assert not bpffs.pin_dir(pair.b, create=False).exists()
    assert netfilter_links() <= before


def test_context_manager_and_policy_drop(pair: testbed.NetnsPair) -> None:
    ruleset = compiled("-A INPUT -p udp -j ACCEPT", policy="DROP")
    with loader.load(ruleset, netns=pair.b, pin=False) as handle:
        assert not testbed.ping(pair.a, pair.ipv4_b)
        assert testbed.udp_reaches(pair.a, pair.b, pair.ipv4_b)
        assert handle.counters()[("filter", "INPUT", 0)][0] >= 1
        assert bpffs.pins(pair.b) == []
    assert testbed.ping(pair.a, pair.ipv4_b)


@pytest.mark.parametrize(("rule", "dropped"), [
    ("-i veth-b", True), ("-i veth+", True), ("-i veth-a", False), ("! -i veth-b", False),
    ("! -i lo", True), ("-i +", True),
])
def test_input_interface(pair: testbed.NetnsPair, rule: str, dropped: bool) -> None:
    with loader.load(compiled(f"-A INPUT {rule} -p icmp -j DROP"), netns=pair.b, pin=False):
        assert testbed.ping(pair.a, pair.ipv4_b) is not dropped


@pytest.mark.parametrize(("rule", "dropped"), [
    ("-o veth-b", True), ("-o veth-a", False), ("! -o veth-a", True),
])
def test_output_interface(pair: testbed.NetnsPair, rule: str, dropped: bool) -> None:
    with loader.load(compiled(f"-A OUTPUT {rule} -p icmp -j DROP"), netns=pair.b, pin=False):
        assert testbed.ping(pair.b, pair.ipv4_a) is not dropped


def test_ctstate_established_lets_replies_in(pair: testbed.NetnsPair) -> None:
    rules = """-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
               -A INPUT -p icmp -j DROP"""
    with loader.load(compiled(rules), netns=pair.b, pin=False) as handle:
        assert "bpfilter_ct_" in nft_tables(pair.b)
        assert not testbed.ping(pair.a, pair.ipv4_b)  # NEW: dropped
        assert testbed.ping(pair.b, pair.ipv4_a)  # the reply is ESTABLISHED
        assert handle.counters()[("filter", "INPUT", 1)][0] >= 1
    assert "bpfilter_ct_" not in nft_tables(pair.b)


def test_state_new_and_invalid(pair: testbed.NetnsPair) -> None:
    rules = """-A INPUT -m state --state INVALID -j DROP
               -A INPUT -m conntrack --ctstate SNAT,DNAT -j DROP
               -A INPUT -p udp -m conntrack --ctstate NEW -j DROP"""
    with loader.load(compiled(rules), netns=pair.b, pin=False) as handle:
        assert not testbed.udp_reaches(pair.a, pair.b, pair.ipv4_b)
        assert testbed.ping(pair.a, pair.ipv4_b)
        assert handle.counters()[("filter", "INPUT", 1)] == (0, 0)  # tracked: never INVALID
        assert handle.counters()[("filter", "INPUT", 2)] == (0, 0)  # no NAT here


def test_ipv6(pair: testbed.NetnsPair) -> None:
    rules = "-A INPUT -p ipv6-icmp --icmpv6-type echo-request -s " + pair.ipv6_a + " -j DROP"
    with loader.load(compiled(rules, family=6), netns=pair.b, pin=False):
        assert not testbed.ping(pair.a, pair.ipv6_b)
        assert testbed.udp_reaches(pair.a, pair.b, pair.ipv6_b)
    assert testbed.ping(pair.a, pair.ipv6_b)


def test_verifier_errors_name_the_rule_line() -> None:
    ruleset = compiled("-A INPUT -p tcp --dport 22 -j ACCEPT\n-A INPUT -s 198.18.0.1 -j DROP")
    with bpf.map_create(ruleset.maps[0]) as counters:
        lp = loader.link_program(ruleset.programs[0], {"counters": counters.fd})
    second = dict((i, s) for s, i in lp.rule_slots)[2]
    log = f"0: (bf) r6 = r1\n{second + 1}: (61) r1 = *(u32 *)(r7 +12)\ninvalid access\n"
    assert loader._verifier_lines(lp, ruleset, log) == [6]
    assert loader._verifier_lines(lp, ruleset, "0: (bf) r6 = r1\nbad\n") == []


def _udp_via(pair: testbed.NetnsPair, send_port: int, recv_port: int) -> bool:
    """A datagram from a to b's send_port arrives at a socket on b's recv_port."""
    with netns.entered(pair.b):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with rx:
        rx.bind((pair.ipv4_b, recv_port))
        rx.settimeout(1.0)
        with netns.entered(pair.a):
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with tx:
            tx.sendto(b"nat", (pair.ipv4_b, send_port))
            try:
                return rx.recv(16) == b"nat"
            except TimeoutError:
                return False


def test_ctstate_dnat(pair: testbed.NetnsPair) -> None:
    # nftables rewrites udp port 40000 to 40001 in b: that flow's conntrack entry has
    # IPS_DST_NAT, which --ctstate DNAT reports.
    nat = ("table ip bpft_nat {\n chain pre {\n  type nat hook prerouting priority -100;\n"
           "  udp dport 40000 dnat to :40001\n }\n}\n")
    subprocess.run(["ip", "netns", "exec", pair.b, "nft", "-f", "-"], input=nat, text=True,
                   check=True)
    assert _udp_via(pair, 40000, 40001)
    rules = "-A INPUT -p udp -m conntrack --ctstate DNAT -j DROP"
    with loader.load(compiled(rules), netns=pair.b, pin=False) as handle:
        assert not _udp_via(pair, 40000, 40001)
        assert _udp_via(pair, 40001, 40001)
        assert handle.counters()[("filter", "INPUT", 1)][0] == 1


def test_a_refused_program_names_the_rule_and_leaves_nothing(
        monkeypatch: pytest.MonkeyPatch, pair: testbed.NetnsPair) -> None:
    # A deliberately broken matcher: it reads far past the meta area.
    def broken(em: matchers.Emitter, rule: object, m: object) -> None:
        em.emit(asm.ldx(Size.DW, R1, R7, 4096))

    monkeypatch.setitem(matchers.MATCHERS, "mark",
                        dataclasses.replace(matchers.MATCHERS["mark"], emit=broken))
    ruleset = compiled("-A INPUT -p udp -j ACCEPT\n-A INPUT -m mark --mark 1 -j DROP")
    before = netfilter_links()
    with pytest.raises(loader.LoadError) as e:
        loader.load(ruleset, netns=pair.b)
    assert e.value.lines == [6]
    assert "rule at line 6" in str(e.value)
    assert "invalid access" in e.value.log
    assert netfilter_links() <= before
    assert bpffs.pins(pair.b) == []
