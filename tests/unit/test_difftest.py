"""The pure parts of the differential harness: packets, tags, aiming at rules, reports."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import replace
from typing import Any

import difftest
import pytest
from difftest import (
    BED_SUBNET,
    DIFF_FEATURES,
    FWD_TOS,
    MARK_TTL,
    MAX_FRAME_PAYLOAD,
    NET4,
    NET6,
    OPEN_MARK,
    PROTO_ICMP,
    PROTO_ICMP6,
    PROTO_OTHER,
    PROTO_TCP,
    PROTO_UDP,
    RX_IFACES,
    TCP_ACK,
    TCP_SYN,
    WITHHELD,
    CaseResult,
    Constraint,
    Mismatch,
    Observed,
    Probe,
    checksum,
    compare,
    constraints,
    delivered_source,
    delivered_tag,
    hints,
    make_probes,
    make_ruleset,
    mark_map,
    mark_table,
    report,
    save_coverage,
    seeds,
)
from iptgen import FEATURES, GenRule, GenRuleset, GenTable

NONCE = b"\x01\x02\x03\x04"


def _ruleset(family: int, rules: list[GenRule], policy: str = "ACCEPT") -> GenRuleset:
    chains = (("INPUT", policy), ("FORWARD", "ACCEPT"), ("OUTPUT", "ACCEPT"))
    users = tuple((r.target[1], None) for r in rules
                  if len(r.target) == 2 and r.target[1].startswith("U"))
    return GenRuleset(family, 0, (GenTable("filter", chains + users, tuple(rules)),))


def _probe(family: int = 4, proto: int = PROTO_TCP, **kw: Any) -> Probe:
    src, dst = ("198.18.1.5", "198.19.2.7") if family == 4 else ("2001:db8:1::5", "2001:db8:2::7")
    base = Probe(tag=77, family=family, proto=proto, src=src, dst=dst, sport=1234, dport=80,
                 flags=TCP_SYN, icmp_type=8 if family == 4 else 128, pad=5)
    return replace(base, **kw)


def _l4(p: Probe, packet: bytes) -> bytes:
    return packet[20:] if p.family == 4 else packet[40:]


def _pseudo(p: Probe, l4: bytes) -> bytes:
    s, d = ipaddress.ip_address(p.src).packed, ipaddress.ip_address(p.dst).packed
    if p.family == 4:
        return s + d + struct.pack("!BBH", 0, p.proto, len(l4))
    return s + d + struct.pack("!IxxxB", len(l4), p.proto)


# -- packets ------------------------------------------------------------------------------------


def test_checksum_rfc1071_example() -> None:
    # RFC 1071 section 3: the sum of these words is ddf2, so the checksum is its complement.
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0xFFFF - 0xDDF2
    assert checksum(b"\x01") == 0xFFFF - 0x0100  # odd length: padded with a zero byte


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("proto", [PROTO_TCP, PROTO_UDP, "icmp", PROTO_OTHER])
def test_packets_have_valid_lengths_and_checksums(family: int, proto: object) -> None:
    if proto == "icmp":
        proto = PROTO_ICMP if family == 4 else PROTO_ICMP6
    assert isinstance(proto, int)
    p = _probe(family, proto)
    packet = p.packet(NONCE)
    l4 = _l4(p, packet)
    if family == 4:
        assert packet[0] == 0x45 and struct.unpack("!H", packet[2:4])[0] == len(packet)
        assert packet[9] == proto and checksum(packet[:20]) == 0
        assert packet[12:16] == ipaddress.ip_address(p.src).packed
    else:
        assert packet[0] >> 4 == 6 and struct.unpack("!H", packet[4:6])[0] == len(l4)
        assert packet[6] == proto and packet[8:24] == ipaddress.ip_address(p.src).packed
    if proto in (PROTO_TCP, PROTO_UDP, PROTO_ICMP6):
        assert checksum(_pseudo(p, l4) + l4) == 0
    elif proto == PROTO_ICMP:
        assert checksum(l4) == 0
    if proto == PROTO_UDP:
        assert struct.unpack("!H", l4[4:6])[0] == len(l4)


def test_tcp_header_fields() -> None:
    p = _probe(flags=TCP_SYN | TCP_ACK, sport=4000, dport=443)
    l4 = _l4(p, p.packet(NONCE))
    sport, dport, _, _, offset, flags = struct.unpack("!HHIIBB", l4[:14])
    assert (sport, dport, offset >> 4, flags) == (4000, 443, 5, TCP_SYN | TCP_ACK)


@pytest.mark.parametrize("family", [4, 6])
def test_tag_survives_and_other_nonces_do_not_match(family: int) -> None:
    p = _probe(family, PROTO_UDP, tag=0xDEADBEEF, pad=33)
    packet = p.packet(NONCE)
    seen = packet if family == 4 else packet[40:]  # raw IPv6 sockets return the payload only
    assert delivered_tag(seen, NONCE) == 0xDEADBEEF
    assert delivered_tag(seen, b"\x09\x09\x09\x09") is None
    assert delivered_tag(seen[:-p.pad - 2], NONCE) is None  # cut inside the tag


def test_delivered_source() -> None:
    p = _probe(4)
    assert delivered_source(4, p.packet(NONCE), "198.18.9.9") == p.src  # from the header
    assert delivered_source(6, b"", "2001:db8::1%veth-b") == "2001:db8::1"


@pytest.mark.parametrize("family", [4, 6])
def test_opener_is_the_reverse_packet(family: int) -> None:
    assert _probe(family, flow="new").opener() is None
    for proto in (PROTO_TCP, PROTO_UDP):
        p = _probe(family, proto, flow="reply")
        opener = p.opener()
        assert opener is not None
        head = 20 if family == 4 else 40
        src_at = 12 if family == 4 else 8
        width = 4 if family == 4 else 16
        assert opener[src_at : src_at + width] == ipaddress.ip_address(p.dst).packed
        assert struct.unpack("!HH", opener[head : head + 4]) == (p.dport, p.sport)
        if proto == PROTO_TCP:
            assert opener[head + 13] == TCP_SYN
    icmp = PROTO_ICMP if family == 4 else PROTO_ICMP6
    p = _probe(family, icmp, flow="reply", icmp_type=0 if family == 4 else 129, sport=99)
    opener = p.opener()
    assert opener is not None
    head = 20 if family == 4 else 40
    assert opener[head] == (8 if family == 4 else 128)
    assert struct.unpack("!H", opener[head + 4 : head + 6])[0] == 99  # the echo identifier


@pytest.mark.parametrize("family", [4, 6])
def test_related_error_quotes_the_opener(family: int) -> None:
    icmp = PROTO_ICMP if family == 4 else PROTO_ICMP6
    p = _probe(family, icmp, flow="related", icmp_type=3 if family == 4 else 1)
    opener = p.opener()
    assert opener is not None and opener[9 if family == 4 else 6] == PROTO_UDP
    head = 20 if family == 4 else 40
    quoted = p.packet(NONCE)[head + 8 :]
    assert quoted.startswith(opener[: head + 8])


def test_describe_names_everything_needed_to_rebuild() -> None:
    text = _probe(4, PROTO_TCP, flags=TCP_SYN | TCP_ACK, iface=1, flow="reply").describe()
    for part in ("#77", "IPv4 tcp", "198.18.1.5 -> 198.19.2.7", "sport 1234", "dport 80",
                 "SYN,ACK", f"in {RX_IFACES[1]}", "flow reply", "ttl 64"):
        assert part in text


# -- rulesets and aiming -------------------------------------------------------------------------


def test_features_are_iptgen_features() -> None:
    assert DIFF_FEATURES <= FEATURES
    assert set(WITHHELD) <= FEATURES
    assert not DIFF_FEATURES & set(WITHHELD)


@pytest.mark.parametrize("family", [4, 6])
def test_rulesets_stay_in_the_compiled_subset(family: int) -> None:
    raw = 0
    for seed, _ in seeds(1000, 40):
        gen = make_ruleset(seed, family)
        text = gen.render()
        assert [t.name for t in gen.tables] in (["filter"], ["raw", "filter"])
        raw += len(gen.tables) == 2
        for word in ("-m limit", "-m recent", "-m hashlimit", "*mangle",
                     "*nat", "-m statistic", "NOTRACK", "-j CT"):
            assert word not in text, (seed, word)
        for table in gen.tables:
            chains = {r.chain for r in table.body if isinstance(r, GenRule)}
            assert table.name == "filter" or chains <= {"PREROUTING", "OUTPUT"}
    assert 4 <= raw <= 24
    assert make_ruleset(5, family).render() == make_ruleset(5, family).render()


def test_constraints_read_negation_and_arity() -> None:
    rule = GenRule("INPUT", (
        ("!", "-s", "198.18.0.0/16"), ("-p", "tcp"),
        ("-m", "tcp", "!", "--dport", "80:90", "--tcp-flags", "SYN,ACK", "SYN"),
        ("-m", "comment", "--comment", "-j DROP"), ("!", "-f")))
    assert constraints(rule) == [
        Constraint(True, "-s", ("198.18.0.0/16",)), Constraint(False, "-p", ("tcp",)),
        Constraint(True, "--dport", ("80:90",)),
        Constraint(False, "--tcp-flags", ("SYN,ACK", "SYN")),
        Constraint(False, "--comment", ("-j DROP",)), Constraint(True, "-f", ())]


def test_hints_collect_addresses_ports_protocols() -> None:
    rules = [GenRule("INPUT", (("-s", "198.18.3.0/255.255.255.0"), ("-p", "udp"),
                               ("--dport", "ntp:200"))),
             GenRule("INPUT", (("-p", "tcp"), ("-m", "multiport", "--ports", "22,1000:2000"))),
             GenRule("INPUT", (("-p", "icmp"), ("--icmp-type", "port-unreachable")))]
    h = hints(_ruleset(4, rules))
    assert ipaddress.ip_network("198.18.3.0/24") in h.prefixes
    assert {123, 200, 22, 1000, 2000} <= set(h.ports)
    assert {PROTO_UDP, PROTO_TCP, PROTO_ICMP} <= set(h.protos)
    assert (3, 3) in h.icmp


def _addresses_ok(p: Probe) -> bool:
    net = NET4 if p.family == 4 else NET6
    bed = ipaddress.ip_network(f"{BED_SUBNET.ipv4(0)}/24" if p.family == 4
                               else f"{BED_SUBNET.ipv6(0)}/48")
    return all(ipaddress.ip_address(a) in net and ipaddress.ip_address(a) not in bed
               for a in (p.src, p.dst))


@pytest.mark.parametrize("family", [4, 6])
def test_probes_are_deterministic_valid_and_varied(family: int) -> None:
    gen = make_ruleset(11, family)
    probes = make_probes(gen, 11, 400)
    assert probes == make_probes(gen, 11, 400)
    assert [p.tag for p in probes] == list(range(1, 401))
    for p in probes:
        assert _addresses_ok(p), p
        assert len(p.packet(NONCE)) <= MAX_FRAME_PAYLOAD
    assert {p.flow for p in probes} == {"new", "reply", "related"}
    assert {p.forward for p in probes} == {True, False}
    for p in probes:
        assert (p.tos == FWD_TOS) == p.forward
        assert not p.forward or (p.flow == "new" and p.ttl >= 2)
    assert {p.iface for p in probes} == set(range(len(RX_IFACES)))
    assert len({p.proto for p in probes}) >= 3
    assert sum(p.src != p.dst for p in probes) >= 340  # equal only where a rule says so


@pytest.mark.parametrize("family", [4, 6])
def test_aimed_probes_hit_a_rule_and_nearly_miss_it(family: int) -> None:
    prefix = "198.18.2.0/24" if family == 4 else "2001:db8:2::/64"
    rule = GenRule("INPUT", (("-s", prefix), ("-p", "udp"), ("--dport", "1000:2000"),
                             ("-i", "eth+"), ("-m", "conntrack", "--ctstate", "ESTABLISHED")),
                   ("-j", "DROP"))
    probes = make_probes(_ruleset(family, [rule]), 3, 400)
    net = ipaddress.ip_network(prefix)

    def hits(p: Probe) -> bool:
        return (ipaddress.ip_address(p.src) in net and p.proto == PROTO_UDP
                and 1000 <= p.dport <= 2000 and RX_IFACES[p.iface].startswith("eth")
                and p.flow == "reply")

    hit = sum(map(hits, probes))
    assert 0.2 * len(probes) < hit < 0.8 * len(probes)
    # Near misses: every condition but one holds.
    near = [p for p in probes if not hits(p) and ipaddress.ip_address(p.src) in net
            and p.proto == PROTO_UDP and p.flow == "reply"]
    assert near


def test_probes_aim_at_forward_rules() -> None:
    rule = GenRule("FORWARD", (("-p", "udp"), ("-o", "eth0"), ("--sport", "7")), ("-j", "DROP"))
    probes = make_probes(_ruleset(4, [rule]), 2, 300)
    aimed = [p for p in probes if p.forward and p.proto == PROTO_UDP and p.sport == 7]
    assert len(aimed) > 100


def test_aimed_probes_try_to_slip_past_earlier_rules() -> None:
    rules = [GenRule("INPUT", (("-s", "198.18.1.0/24"),), ("-j", "DROP")),
             GenRule("INPUT", (("-p", "udp"),), ("-j", "ACCEPT"))]
    probes = make_probes(_ruleset(4, rules), 8, 400)
    net = ipaddress.ip_network("198.18.1.0/24")
    udp = [p for p in probes if p.proto == PROTO_UDP]
    # Without slipping past rule 1 about 30% would lie outside its prefix.
    assert sum(ipaddress.ip_address(p.src) not in net for p in udp) > 0.45 * len(udp)
    assert any(ipaddress.ip_address(p.src) in net for p in probes)


def test_aimed_probes_follow_jumps_and_tcp_flags() -> None:
    rules = [GenRule("INPUT", (("-p", "tcp"),), ("-j", "Uchain")),
             GenRule("Uchain", (("-p", "tcp"), ("--tcp-flags", "SYN,ACK,FIN", "ACK")),
                     ("-j", "DROP"))]
    probes = make_probes(_ruleset(4, rules), 9, 300)
    assert sum(p.proto == PROTO_TCP and p.flags & 0x13 == TCP_ACK for p in probes) > 50


@pytest.mark.parametrize("family", [4, 6])
def test_marks_are_encoded_in_the_ttl(family: int) -> None:
    rule = GenRule("INPUT", (("-m", "mark", "!", "--mark", "0x1200/0xff00"),), ("-j", "DROP"))
    probes = make_probes(_ruleset(family, [rule]), 4, 300)
    marked = [p for p in probes if p.mark]
    assert any(p.mark & 0xFF00 == 0x1200 for p in marked)
    assert any(p.mark & 0xFF00 != 0x1200 for p in marked)
    assert all(p.mark != OPEN_MARK for p in marked)
    mapping = mark_map(probes)
    assert all(mapping[p.ttl] == p.mark for p in marked)
    assert all(p.ttl not in mapping for p in probes if not p.mark)
    assert all(p.packet(NONCE)[8 if family == 4 else 7] == p.ttl for p in probes)
    text = mark_table(mapping)
    assert "ip ttl map {" in text and "ip6 hoplimit map {" in text
    assert f"{MARK_TTL} : {mapping[MARK_TTL]:#x}" in text
    assert "map" not in mark_table({})  # only deletes the table


# -- verdicts and reports ------------------------------------------------------------------------


def test_compare_lists_only_differences() -> None:
    probes = [_probe(tag=t) for t in (1, 2, 3, 4)]
    got = compare(probes, {1, 2}, {2, 3})
    assert got == [Mismatch(probes[0], True, False), Mismatch(probes[2], False, True)]


def test_report_has_seed_ruleset_packet_verdicts_and_reproduction() -> None:
    p = _probe(tag=5)
    text = report(42, 4, "*filter\n-A INPUT -j DROP\nCOMMIT\n", [Mismatch(p, True, False)],
                  "iptables", "bpfilter", "BPFILTER_DIFF_CASE=42:4 pytest x")
    assert "seed 42" in text and "-A INPUT -j DROP" in text and p.describe() in text
    assert "iptables ACCEPT, bpfilter DROP" in text
    assert text.splitlines()[-1] == "reproduce: BPFILTER_DIFF_CASE=42:4 pytest x"


def test_refused_or_failed_cases_have_no_mismatches_to_count() -> None:
    probes = (_probe(tag=1),)
    base = CaseResult(1, 4, "", probes, Observed(frozenset({1})), Observed())
    assert len(base.mismatches) == 1
    assert replace(base, refused="no").mismatches == []
    assert replace(base, error="boom").mismatches == []


def test_opener_verdicts_are_compared_first() -> None:
    probes = (_probe(tag=1, flow="reply"), _probe(tag=2, flow="new"), _probe(tag=3))
    ref = Observed(frozenset({1, 2, 3}), frozenset())
    cand = Observed(frozenset({2, 3}), frozenset({1, 2}))  # 2 has no opener: not compared
    got = CaseResult(1, 4, "", probes, ref, cand).mismatches
    assert got == [Mismatch(probes[0], True, False, "OUTPUT"), Mismatch(probes[0], True, False)]
    text = report(1, 4, "", got, "iptables", "bpfilter", "x")
    assert "its flow opener at OUTPUT: iptables ACCEPT, bpfilter DROP" in text


def test_forward_verdicts_are_compared_by_arrival_at_the_far_side() -> None:
    probes = (_probe(tag=1, forward=True), _probe(tag=2))
    ref = Observed(frozenset({2}), frozenset(), frozenset({1}))
    cand = Observed(frozenset({2}), frozenset(), frozenset())
    got = CaseResult(1, 4, "", probes, ref, cand).mismatches
    assert got == [Mismatch(probes[0], True, False, "FORWARD")]


def test_save_coverage_counts_reachable_rules_only() -> None:
    save = "\n".join([
        "*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":Ua - [0:0]", ":Ub - [0:0]",
        "[3:120] -A INPUT -s 198.18.0.1/32 -j Ua",
        "[0:0] -A INPUT -p tcp -m comment --comment \"-j Ub\"",
        "[1:40] -A Ua -j ACCEPT", "[0:0] -A Ua -p udp -g Ua",
        "[9:900] -A Ub -j DROP",  # unreachable: only named inside a comment
        "[0:0] -A FORWARD -j DROP", "COMMIT"])
    assert save_coverage(save) == (2, 5)


def test_seeds_mix_families() -> None:
    cases = list(seeds(100, 9))
    assert [s for s, _ in cases] == list(range(100, 109))
    assert {f for _, f in cases} == {4, 6}


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("proto", [PROTO_TCP, PROTO_UDP])
def test_fragments_reassemble_to_the_packet(family: int, proto: int) -> None:
    p = _probe(family, proto, fragmented=True, pad=40)
    whole = p.packet(NONCE)
    first, second = p.wire(NONCE)
    head = 20 if family == 4 else 48
    if family == 4:
        assert checksum(first[:20]) == 0 and checksum(second[:20]) == 0
        assert struct.unpack("!H", first[6:8])[0] == 0x2000  # MF, offset 0
        offset = struct.unpack("!H", second[6:8])[0]
        assert offset & 0x2000 == 0 and (offset & 0x1FFF) * 8 == len(first) - 20
        assert struct.unpack("!H", first[2:4])[0] == len(first)
    else:
        assert first[6] == second[6] == 44 and first[40] == second[40] == proto
        assert struct.unpack("!H", first[42:44])[0] == 1  # offset 0, more fragments
        assert struct.unpack("!H", second[42:44])[0] == len(first) - head
        assert struct.unpack("!H", first[4:6])[0] == len(first) - 40
    assert first[head:] + second[head:] == whole[20 if family == 4 else 40:]
    assert delivered_tag(first, NONCE) is None  # the tag is in the second fragment
    assert _probe(family, proto).wire(NONCE) == [_probe(family, proto).packet(NONCE)]


@pytest.mark.parametrize("proto", [PROTO_TCP, PROTO_UDP, PROTO_ICMP6])
def test_ipv6_extension_headers_chain_to_the_transport_header(proto: int) -> None:
    plain = _probe(6, proto)
    for count, chain in ((1, [60]), (2, [0, 60])):
        p = replace(plain, options=count)
        packet = p.packet(NONCE)
        assert packet[6] == chain[0] and len(packet) == len(plain.packet(NONCE)) + 8 * count
        assert struct.unpack("!H", packet[4:6])[0] == len(packet) - 40
        for i in range(count):  # each header names the next; the last names the protocol
            assert packet[40 + 8 * i] == ([*chain[1:], proto])[i]
        assert packet[40 + 8 * count :] == plain.packet(NONCE)[40:]  # same transport bytes


def test_ipv4_options_grow_the_header() -> None:
    plain = _probe(4, PROTO_UDP)
    p = replace(plain, options=2)
    packet = p.packet(NONCE)
    assert packet[0] == 0x47 and checksum(packet[:28]) == 0
    assert packet[20:28] == b"\x01" * 8 and packet[28:] == plain.packet(NONCE)[20:]
    assert struct.unpack("!H", packet[2:4])[0] == len(packet)
    assert delivered_tag(packet, NONCE) == p.tag


def test_a_missing_compiler_is_a_skip_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> object:
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(difftest.importlib, "import_module", missing)
    reason = difftest.bpfilter_unavailable()
    assert reason is not None and "bpfilter.codegen.compiler" in reason
