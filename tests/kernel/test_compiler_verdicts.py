"""BPF_PROG_TEST_RUN verdicts of compiled rulesets on crafted packets: every supported match
and target, negations, IPv4 and IPv6, chains, policies, fragments, hot drops, counters."""

from __future__ import annotations

import ipaddress
import re
import struct
import time

import pytest

from bpfilter import bpf, loader
from bpfilter.codegen.compiler import CompiledRuleset, compile_ruleset
from bpfilter.codegen.spec import ProgramSpec
from bpfilter.codegen.uapi import AttachType, LogLevel, NfHook, ProgType
from bpfilter.grammar.iptables import parse_restore

DROP, ACCEPT = 0, 1
A4, B4 = "198.18.0.1", "198.18.0.2"
A6, B6 = "2001:db8::1", "2001:db8::2"

# --- packets ---------------------------------------------------------------------------------


def ip4(proto: int, payload: bytes, src: str = A4, dst: str = B4, *, frag: int = 0,
        more: bool = False) -> bytes:
    flags = (0x2000 if more else 0) | frag
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, flags, 64, proto, 0,
                       ipaddress.IPv4Address(src).packed,
                       ipaddress.IPv4Address(dst).packed) + payload


def ip6(nexthdr: int, payload: bytes, src: str = A6, dst: str = B6) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), nexthdr, 64,
                       ipaddress.IPv6Address(src).packed,
                       ipaddress.IPv6Address(dst).packed) + payload


def ext(nexthdr: int, body: bytes = b"\0" * 6) -> bytes:
    """A hop-by-hop / destination options / routing header (8-byte units)."""
    assert (len(body) + 2) % 8 == 0
    return struct.pack("!BB", nexthdr, (len(body) + 2) // 8 - 1) + body


def frag6(nexthdr: int, offset: int = 0, more: bool = False) -> bytes:
    return struct.pack("!BBHI", nexthdr, 0, (offset << 3) | int(more), 1234)


def tcp(sport: int = 1234, dport: int = 22, flags: int = 0x02) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 5 << 4, flags, 1024, 0, 0)


def udp(sport: int = 1234, dport: int = 53, payload: bytes = b"x" * 4) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def icmp(kind: int = 8, code: int = 0) -> bytes:
    return struct.pack("!BBHHH", kind, code, 0, 1, 1)


def esp(spi: int) -> bytes:
    return struct.pack("!II", spi, 1) + b"\0" * 8


def ah(spi: int) -> bytes:
    return struct.pack("!BBHII", 59, 4, 0, spi, 1) + b"\0" * 12


def mh(kind: int, proto: int = 59) -> bytes:
    return struct.pack("!BBBBH", proto, 1, kind, 0, 0) + b"\0" * 10


def dccp(sport: int, dport: int, kind: int, x: int = 1) -> bytes:
    """struct dccp_hdr (12 bytes): the type in bits 1-4 of byte 8, the X bit in bit 0."""
    return struct.pack("!HHBBHBBH", sport, dport, 3, 0, 0, (kind << 1) | x, 0, 1)


def tos4(packet: bytes, tos: int) -> bytes:
    return packet[:1] + bytes([tos]) + packet[2:]


def tclass6(packet: bytes, tclass: int) -> bytes:
    word = struct.unpack("!I", packet[:4])[0] | tclass << 20
    return struct.pack("!I", word) + packet[4:]


# --- rulesets --------------------------------------------------------------------------------

def ruleset(rules: str, *, family: int = 4, policy: str = "ACCEPT", chains: str = "",
            table: str = "filter") -> CompiledRuleset:
    builtin = {"filter": ("INPUT", "FORWARD", "OUTPUT"), "raw": ("PREROUTING", "OUTPUT")}[table]
    lines = [f"*{table}"] + [f":{c} {policy} [0:0]" for c in builtin]
    lines += [f":{c} - [0:0]" for c in chains.split()]
    lines += [r.strip() for r in rules.strip().splitlines()] + ["COMMIT", ""]
    return compile_ruleset(parse_restore("\n".join(lines), family=family), family)


def verdict(rules: str, packet: bytes, *, family: int = 4, hook: NfHook = NfHook.LOCAL_IN,
            **kw: str) -> int:
    compiled = ruleset(rules, family=family, **kw)
    table = kw.get("table", "filter")
    return loader.test_run(compiled, hook, packet, family=family, table=table)


P4_TCP = ip4(6, tcp())
P4_UDP = ip4(17, udp())
P6_TCP = ip6(6, tcp())

CASES4 = [
    # addresses: exact, prefix, non-contiguous mask, negation
    ("-A INPUT -s 198.18.0.1 -j DROP", P4_TCP, DROP),
    ("-A INPUT -s 198.18.0.3 -j DROP", P4_TCP, ACCEPT),
    ("-A INPUT -s 198.18.0.0/24 -j DROP", P4_TCP, DROP),
    ("-A INPUT -s 198.19.0.0/16 -j DROP", P4_TCP, ACCEPT),
    ("-A INPUT -s 198.0.0.1/255.0.0.255 -j DROP", P4_TCP, DROP),
    ("-A INPUT -s 198.0.0.2/255.0.0.255 -j DROP", P4_TCP, ACCEPT),
    ("-A INPUT ! -s 198.18.0.1 -j DROP", P4_TCP, ACCEPT),
    ("-A INPUT ! -s 198.18.0.9 -j DROP", P4_TCP, DROP),
    ("-A INPUT -d 198.18.0.2/31 -j DROP", P4_TCP, DROP),
    ("-A INPUT -d 198.18.0.4/31 -j DROP", P4_TCP, ACCEPT),
    ("-A INPUT ! -d 198.18.0.4/31 -j DROP", P4_TCP, DROP),
    ("-A INPUT -s 198.18.0.1 -d 198.18.0.3 -j DROP", P4_TCP, ACCEPT),
    # protocols
    ("-A INPUT -p tcp -j DROP", P4_TCP, DROP),
    ("-A INPUT -p udp -j DROP", P4_TCP, ACCEPT),
    ("-A INPUT ! -p udp -j DROP", P4_TCP, DROP),
    ("-A INPUT ! -p tcp -j DROP", P4_TCP, ACCEPT),
    ("-A INPUT -p 47 -j DROP", ip4(47, b"\0" * 8), DROP),
    ("-A INPUT -p all -j DROP", P4_UDP, DROP),
    # fragments
    ("-A INPUT -f -j DROP", ip4(6, b"\0" * 8, frag=3), DROP),
    ("-A INPUT -f -j DROP", ip4(6, tcp(), more=True), ACCEPT),
    ("-A INPUT ! -f -j DROP", ip4(6, tcp(), more=True), DROP),
    ("-A INPUT ! -f -j DROP", ip4(6, b"\0" * 8, frag=3), ACCEPT),
    # tcp
    ("-A INPUT -p tcp --dport 22 -j DROP", P4_TCP, DROP),
    ("-A INPUT -p tcp --dport 23 -j DROP", P4_TCP, ACCEPT),
    ("-A INPUT -p tcp ! --dport 23 -j DROP", P4_TCP, DROP),
    ("-A INPUT -p tcp --dport 20:30 -j DROP", P4_TCP, DROP),
    ("-A INPUT -p tcp --dport 23:30 -j DROP", P4_TCP, ACCEPT),
    ("-A INPUT -p tcp ! --dport 20:30 -j DROP", P4_TCP, ACCEPT),
    ("-A INPUT -p tcp --sport 1234 --dport 22 -j DROP", P4_TCP, DROP),
    ("-A INPUT -p tcp --sport 1000: -j DROP", P4_TCP, DROP),
    ("-A INPUT -p tcp --sport :1000 -j DROP", P4_TCP, ACCEPT),
    ("-A INPUT -p tcp --syn -j DROP", P4_TCP, DROP),
    ("-A INPUT -p tcp --syn -j DROP", ip4(6, tcp(flags=0x12)), ACCEPT),
    ("-A INPUT -p tcp ! --syn -j DROP", ip4(6, tcp(flags=0x10)), DROP),
    ("-A INPUT -p tcp --tcp-flags SYN,ACK SYN,ACK -j DROP", ip4(6, tcp(flags=0x12)), DROP),
    ("-A INPUT -p tcp --tcp-flags ALL NONE -j DROP", ip4(6, tcp(flags=0)), DROP),
    ("-A INPUT -p tcp --tcp-flags ALL NONE -j DROP", P4_TCP, ACCEPT),
    # tcp on fragments: no match on later fragments, hot drop at offset 1 or when truncated
    ("-A INPUT -p tcp --dport 22 -j DROP", ip4(6, tcp(), frag=2), ACCEPT),
    ("-A INPUT -p tcp ! --dport 22 -j DROP", ip4(6, tcp(), frag=2), ACCEPT),
    ("-A INPUT -p tcp --dport 22 -j ACCEPT", ip4(6, tcp(), frag=1), DROP),
    ("-A INPUT -p tcp --dport 22 -j ACCEPT", ip4(6, tcp()[:19]), DROP),
    ("-A INPUT -p tcp --dport 23 -j ACCEPT", ip4(6, tcp()[:19]), DROP),
    ("-A INPUT -s 198.18.0.9 -p tcp --dport 22 -j ACCEPT", ip4(6, tcp()[:19]), ACCEPT),
    ("-A INPUT -p tcp --dport 22 -j DROP", ip4(6, tcp(), more=True), DROP),
    # udp
    ("-A INPUT -p udp --dport 53 -j DROP", P4_UDP, DROP),
    ("-A INPUT -p udp --dport 54 -j DROP", P4_UDP, ACCEPT),
    ("-A INPUT -p udp ! --sport 1234 -j DROP", P4_UDP, ACCEPT),
    ("-A INPUT -p udp --sport 1234 --dport 50:60 -j DROP", P4_UDP, DROP),
    ("-A INPUT -p udp --dport 53 -j ACCEPT", ip4(17, udp(payload=b"")[:7]), DROP),
    ("-A INPUT -p udp --dport 53 -j DROP", ip4(17, udp(payload=b"")), DROP),
    ("-A INPUT -p udp --dport 53 -j DROP", ip4(17, udp(), frag=1), ACCEPT),
    # iptables 1.8.9's udp cuts port numbers to 16 bits (65589 is port 53)
    ("-A INPUT -p udp --dport 65589 -j DROP", P4_UDP, DROP),
    ("-A INPUT -p udp --dport 65589:65600 -j DROP", P4_UDP, DROP),
    # icmp
    ("-A INPUT -p icmp --icmp-type echo-request -j DROP", ip4(1, icmp(8)), DROP),
    ("-A INPUT -p icmp --icmp-type echo-request -j DROP", ip4(1, icmp(0)), ACCEPT),
    ("-A INPUT -p icmp ! --icmp-type echo-request -j DROP", ip4(1, icmp(0)), DROP),
    ("-A INPUT -p icmp --icmp-type any -j DROP", ip4(1, icmp(13)), DROP),
    ("-A INPUT -p icmp --icmp-type port-unreachable -j DROP", ip4(1, icmp(3, 3)), DROP),
    ("-A INPUT -p icmp --icmp-type port-unreachable -j DROP", ip4(1, icmp(3, 1)), ACCEPT),
    ("-A INPUT -p icmp --icmp-type 3 -j DROP", ip4(1, icmp(3, 1)), DROP),
    ("-A INPUT -p icmp --icmp-type 3/1 -j DROP", ip4(1, icmp(3, 1)), DROP),
    ("-A INPUT -p icmp --icmp-type 8 -j ACCEPT", ip4(1, icmp(8)[:4]), DROP),
    ("-A INPUT -p icmp --icmp-type any -j DROP", ip4(1, icmp(8), frag=5), ACCEPT),
    # multiport
    ("-A INPUT -p tcp -m multiport --dports 1,22,80 -j DROP", P4_TCP, DROP),
    ("-A INPUT -p tcp -m multiport --dports 1,21,80 -j DROP", P4_TCP, ACCEPT),
    ("-A INPUT -p tcp -m multiport --dports 1,20:25 -j DROP", P4_TCP, DROP),
    ("-A INPUT -p tcp -m multiport ! --dports 1,20:25 -j DROP", P4_TCP, ACCEPT),
    ("-A INPUT -p tcp -m multiport ! --dports 1,23:25 -j DROP", P4_TCP, DROP),
    ("-A INPUT -p tcp -m multiport --sports 1234 -j DROP", P4_TCP, DROP),
    ("-A INPUT -p tcp -m multiport --ports 1234 -j DROP", P4_TCP, DROP),
    ("-A INPUT -p tcp -m multiport --ports 22 -j DROP", P4_TCP, DROP),
    ("-A INPUT -p tcp -m multiport --ports 23,1000:1200 -j DROP", P4_TCP, ACCEPT),
    ("-A INPUT -p udp -m multiport --dports 53 -j DROP", ip4(17, udp(), frag=1), ACCEPT),
    ("-A INPUT -p udp -m multiport --dports 9 -j ACCEPT", ip4(17, udp()[:3]), DROP),
    # conntrack: a test run has no conntrack entry, so the state is INVALID
    ("-A INPUT -m conntrack --ctstate INVALID -j DROP", P4_TCP, DROP),
    ("-A INPUT -m conntrack --ctstate NEW,ESTABLISHED -j DROP", P4_TCP, ACCEPT),
    ("-A INPUT -m conntrack ! --ctstate NEW -j DROP", P4_TCP, DROP),
    ("-A INPUT -m conntrack ! --ctstate INVALID,UNTRACKED -j DROP", P4_TCP, ACCEPT),
    ("-A INPUT -m conntrack --ctstate SNAT -j DROP", P4_TCP, ACCEPT),
    ("-A INPUT -m conntrack --ctstate SNAT,DNAT,INVALID -j DROP", P4_TCP, DROP),
    ("-A INPUT -m conntrack ! --ctstate DNAT -j DROP", P4_TCP, DROP),
    ("-A INPUT -m state --state INVALID -j DROP", P4_TCP, DROP),
    ("-A INPUT -m state --state RELATED -j DROP", P4_TCP, ACCEPT),
    ("-A INPUT -m state ! --state RELATED -j DROP", P4_TCP, DROP),
    # mark: 0 in a test run
    ("-A INPUT -m mark --mark 0 -j DROP", P4_TCP, DROP),
    ("-A INPUT -m mark --mark 1 -j DROP", P4_TCP, ACCEPT),
    ("-A INPUT -m mark ! --mark 0x10/0xf0 -j DROP", P4_TCP, DROP),
    ("-A INPUT -m mark --mark 0x0/0xf0 -j DROP", P4_TCP, DROP),
    # length: tot_len (40 for P4_TCP)
    ("-A INPUT -m length --length 40 -j DROP", P4_TCP, DROP),
    ("-A INPUT -m length --length 41:1500 -j DROP", P4_TCP, ACCEPT),
    ("-A INPUT -m length ! --length 41:1500 -j DROP", P4_TCP, DROP),
    ("-A INPUT -m length --length :40 -j DROP", P4_TCP, DROP),
    # comment: no effect on matching
    ('-A INPUT -m comment --comment "no effect" -j DROP', P4_TCP, DROP),
    # interfaces: a test run has no input device (see test_interfaces_in_test_runs)
    ("-A INPUT -i lo -j DROP", P4_TCP, ACCEPT),
    ("-A INPUT ! -i lo -j DROP", P4_TCP, DROP),
    ("-A INPUT -i + -j DROP", P4_TCP, DROP),  # `+` masks every byte: even no device matches
    ("-A INPUT ! -i + -j DROP", P4_TCP, ACCEPT),
    # esp / ah: the SPI (host order) in a range; no match on later fragments, hot drop when
    # the header is short
    ("-A INPUT -p esp -m esp --espspi 256 -j DROP", ip4(50, esp(256)), DROP),
    ("-A INPUT -p esp -m esp --espspi 257:300 -j DROP", ip4(50, esp(256)), ACCEPT),
    ("-A INPUT -p esp -m esp ! --espspi 257:300 -j DROP", ip4(50, esp(256)), DROP),
    ("-A INPUT -p esp -m esp --espspi 0x80000000: -j DROP", ip4(50, esp(0x90000000)), DROP),
    ("-A INPUT -p esp -m esp -j DROP", ip4(50, esp(1)), DROP),
    ("-A INPUT -p esp -m esp ! --espspi 1 -j DROP", ip4(50, esp(1), frag=2), ACCEPT),
    ("-A INPUT -p esp -m esp --espspi 1 -j ACCEPT", ip4(50, esp(1)[:7]), DROP),
    ("-A INPUT -p ah -m ah --ahspi 7 -j DROP", ip4(51, ah(7)), DROP),
    ("-A INPUT -p ah -m ah ! --ahspi 7 -j DROP", ip4(51, ah(7)), ACCEPT),
    ("-A INPUT -p ah -m ah --ahspi 8:9 -j ACCEPT", ip4(51, ah(7)[:11]), DROP),
    # cpu: a test run runs on some CPU: exactly one of `--cpu N` and `! --cpu N` matches
    # (see test_cpu_match); an impossible CPU never does
    ("-A INPUT -m cpu --cpu 4000000 -j DROP", P4_TCP, ACCEPT),
    ("-A INPUT -m cpu ! --cpu 4000000 -j DROP", P4_TCP, DROP),
    # several matches: all must hold, evaluated in order
    ("-A INPUT -s 198.18.0.1 -p tcp --dport 22 -m length --length 40 -j DROP", P4_TCP, DROP),
    ("-A INPUT -s 198.18.0.1 -p tcp --dport 22 -m length --length 41 -j DROP", P4_TCP, ACCEPT),
    # ecn: the ECN bits of the TOS byte; ECE/CWR read at thoff with no fragment test, and a
    # short transport header is a miss (not a hot drop) whatever the negation
    ("-A INPUT -m ecn --ecn-ip-ect 1 -j DROP", tos4(P4_TCP, 0x01), DROP),
    ("-A INPUT -m ecn --ecn-ip-ect 1 -j DROP", tos4(P4_TCP, 0x02), ACCEPT),
    ("-A INPUT -m ecn --ecn-ip-ect 0 -j DROP", tos4(P4_TCP, 0xB8), DROP),
    ("-A INPUT -m ecn ! --ecn-ip-ect 3 -j DROP", tos4(P4_TCP, 0xBB), ACCEPT),
    ("-A INPUT -p tcp -m ecn --ecn-tcp-ece -j DROP", ip4(6, tcp(flags=0x42)), DROP),
    ("-A INPUT -p tcp -m ecn --ecn-tcp-ece -j DROP", P4_TCP, ACCEPT),
    ("-A INPUT -p tcp -m ecn --ecn-tcp-ece ! --ecn-tcp-cwr -j DROP", ip4(6, tcp(flags=0xC2)),
     ACCEPT),
    ("-A INPUT -p tcp -m ecn ! --ecn-tcp-cwr -j DROP", ip4(6, tcp(flags=0x42)), DROP),
    ("-A INPUT -p tcp -m ecn ! --ecn-tcp-cwr -j DROP", ip4(6, tcp()[:12]), ACCEPT),
    ("-A INPUT -p tcp -m ecn --ecn-tcp-ece -j DROP", ip4(6, tcp(flags=0x40), frag=3), DROP),
    ("-A INPUT -p tcp -m ecn --ecn-ip-ect 2 --ecn-tcp-ece -j DROP",
     tos4(ip4(6, tcp(flags=0x40)), 0x01), ACCEPT),
    # dccp: ports and the packet type; a later fragment misses, a short header hot-drops
    ("-A INPUT -p dccp -m dccp --dport 5000 -j DROP", ip4(33, dccp(1, 5000, 0)), DROP),
    ("-A INPUT -p dccp --sport 2:3 -j DROP", ip4(33, dccp(1, 5000, 0)), ACCEPT),
    ("-A INPUT -p dccp -m dccp --dccp-types REQUEST,RESET -j DROP", ip4(33, dccp(1, 2, 7)),
     DROP),
    ("-A INPUT -p dccp -m dccp --dccp-types REQUEST,RESET -j DROP", ip4(33, dccp(1, 2, 1)),
     ACCEPT),
    ("-A INPUT -p dccp -m dccp ! --dccp-types REQUEST -j DROP", ip4(33, dccp(1, 2, 1, x=0)),
     DROP),
    ("-A INPUT -p dccp -m dccp --dccp-types INVALID -j DROP", ip4(33, dccp(1, 2, 15)), DROP),
    ("-A INPUT -p dccp -m dccp --dccp-types SYNCACK -j DROP", ip4(33, dccp(1, 2, 12)), ACCEPT),
    ("-A INPUT -p dccp -m dccp --dccp-types SYNCACK -j DROP", ip4(33, dccp(1, 2, 9)), DROP),
    ("-A INPUT -p dccp -m dccp -j ACCEPT", ip4(33, dccp(1, 2, 0)[:10]), DROP),
    ("-A INPUT -p dccp -m dccp ! --dport 9 -j DROP", ip4(33, dccp(1, 2, 0), frag=2), ACCEPT),
]


@pytest.mark.parametrize(("rules", "packet", "expected"), CASES4,
                         ids=[f"{i}:{c[0][9:]}" for i, c in enumerate(CASES4)])
def test_ipv4_matches(rules: str, packet: bytes, expected: int) -> None:
    assert verdict(rules, packet) == expected


HBH, DSTOPT, ROUTING, FRAGMENT, AUTH, NONE = 0, 60, 43, 44, 51, 59

CASES6 = [
    ("-A INPUT -s 2001:db8::1 -j DROP", P6_TCP, DROP),
    ("-A INPUT -s 2001:db8::3 -j DROP", P6_TCP, ACCEPT),
    ("-A INPUT -s 2001:db8::/64 -j DROP", P6_TCP, DROP),
    ("-A INPUT -s 2001:db9::/32 -j DROP", P6_TCP, ACCEPT),
    ("-A INPUT ! -s 2001:db8::/64 -j DROP", P6_TCP, ACCEPT),
    ("-A INPUT -d 2001:db8::2/127 -j DROP", P6_TCP, DROP),
    ("-A INPUT -d ::2/::ffff -j DROP", P6_TCP, DROP),
    ("-A INPUT -d ::2/ffff:: -j DROP", P6_TCP, ACCEPT),
    ("-A INPUT ! -d 2001:db8::1 -j DROP", P6_TCP, DROP),
    ("-A INPUT -p tcp -j DROP", P6_TCP, DROP),
    ("-A INPUT ! -p tcp -j DROP", P6_TCP, ACCEPT),
    ("-A INPUT -p udp -j DROP", P6_TCP, ACCEPT),
    # the upper-layer protocol after extension headers
    ("-A INPUT -p tcp --dport 22 -j DROP", ip6(HBH, ext(DSTOPT) + ext(6) + tcp()), DROP),
    ("-A INPUT -p tcp --dport 22 -j DROP",
     ip6(ROUTING, ext(AUTH, b"\0" * 6) + struct.pack("!BB", 6, 1) + b"\0" * 10 + tcp()), DROP),
    ("-A INPUT -p 0 -j DROP", ip6(HBH, ext(6) + tcp()), DROP),
    ("-A INPUT -p 60 -j DROP", ip6(HBH, ext(DSTOPT) + ext(6) + tcp()), ACCEPT),
    ("-A INPUT -p 59 -j DROP", ip6(DSTOPT, ext(NONE)), DROP),
    ("-A INPUT -p esp -j DROP", ip6(50, b"\0" * 16), DROP),
    # fragments: a first fragment is parsed through; a later one has no transport header
    ("-A INPUT -p tcp --dport 22 -j DROP", ip6(FRAGMENT, frag6(6, 0, True) + tcp()), DROP),
    ("-A INPUT -p tcp -j DROP", ip6(FRAGMENT, frag6(6, 100) + b"\0" * 8), DROP),
    ("-A INPUT -p tcp --dport 0:65535 -j DROP", ip6(FRAGMENT, frag6(6, 100) + tcp()), ACCEPT),
    ("-A INPUT -p tcp ! --dport 22 -j DROP", ip6(FRAGMENT, frag6(6, 1) + tcp()), ACCEPT),
    # a later fragment followed by an extension header, or a truncated one: hot drop on -p
    ("-A INPUT -p udp -j ACCEPT", ip6(FRAGMENT, frag6(DSTOPT, 100) + ext(6)), DROP),
    ("-A INPUT -p tcp -j ACCEPT", ip6(HBH, b"\x06"), DROP),
    ("-A INPUT ! -p tcp -j ACCEPT", ip6(HBH, b"\x06"), DROP),
    ("-A INPUT -s 2001:db8::9 -p tcp -j ACCEPT", ip6(HBH, b"\x06"), ACCEPT),
    ("-A INPUT -j DROP", ip6(HBH, b"\x06"), DROP),
    ("-A INPUT -m length --length 48 -j DROP", ip6(HBH, b"\x06"), ACCEPT),
    # more extension headers than the walk follows: treated as unparsable (hot drop)
    ("-A INPUT -p tcp -j ACCEPT", ip6(HBH, b"".join(ext(DSTOPT) for _ in range(8)) + ext(6)
                                      + tcp()), DROP),
    ("-A INPUT -p tcp -j DROP", ip6(HBH, b"".join(ext(DSTOPT) for _ in range(7)) + ext(6)
                                    + tcp()), DROP),
    # l4 matches
    ("-A INPUT -p tcp --syn --sport 1234 -j DROP", P6_TCP, DROP),
    ("-A INPUT -p tcp --dport 22 -j ACCEPT", ip6(6, tcp()[:12]), DROP),
    ("-A INPUT -p udp --dport 53 -j DROP", ip6(17, udp()), DROP),
    ("-A INPUT -p udp -m multiport --dports 50:60 -j DROP", ip6(17, udp()), DROP),
    ("-A INPUT -p ipv6-icmp --icmpv6-type echo-request -j DROP", ip6(58, icmp(128)), DROP),
    ("-A INPUT -p ipv6-icmp --icmpv6-type echo-request -j DROP", ip6(58, icmp(129)), ACCEPT),
    ("-A INPUT -p ipv6-icmp ! --icmpv6-type echo-request -j DROP", ip6(58, icmp(129)), DROP),
    ("-A INPUT -p ipv6-icmp --icmpv6-type port-unreachable -j DROP", ip6(58, icmp(1, 4)),
     DROP),
    ("-A INPUT -p ipv6-icmp --icmpv6-type 1/3 -j DROP", ip6(58, icmp(1, 4)), ACCEPT),
    ("-A INPUT -p ipv6-icmp --icmpv6-type 1 -j DROP", ip6(58, icmp(1, 4)), DROP),
    # length = payload length + 40
    ("-A INPUT -m length --length 60 -j DROP", P6_TCP, DROP),
    ("-A INPUT -m length ! --length 60 -j DROP", P6_TCP, ACCEPT),
    ("-A INPUT -m conntrack --ctstate INVALID -j DROP", P6_TCP, DROP),
    ("-A INPUT -m mark --mark 0 -j DROP", P6_TCP, DROP),
    ("-A INPUT -p esp -m esp --espspi 5 -j DROP", ip6(50, esp(5)), DROP),
    ("-A INPUT -p esp -m esp --espspi 5 -j DROP", ip6(HBH, ext(50) + esp(5)), DROP),
    ("-A INPUT -p esp -m esp --espspi 6 -j DROP", ip6(50, esp(5)), ACCEPT),
    # mh: the type in a range; a payload protocol other than IPPROTO_NONE hot-drops
    ("-A INPUT -p mh -m mh --mh-type binding-update -j DROP", ip6(135, mh(5)), DROP),
    ("-A INPUT -p mh -m mh --mh-type 0:4 -j DROP", ip6(135, mh(5)), ACCEPT),
    ("-A INPUT -p mh -m mh ! --mh-type 0:4 -j DROP", ip6(135, mh(5)), DROP),
    ("-A INPUT -p mh -m mh -j ACCEPT", ip6(135, mh(5, proto=6)), DROP),
    ("-A INPUT -p mh -m mh --mh-type 5 -j ACCEPT", ip6(135, mh(5)[:5]), DROP),
    ("-A INPUT ! -i lo -s 2001:db8::1 -j DROP", P6_TCP, DROP),
    ("-A INPUT -i eth0 -j DROP", P6_TCP, ACCEPT),
    # ecn: the ECN bits of the traffic class; ECE/CWR of the TCP header after the extensions
    ("-A INPUT -m ecn --ecn-ip-ect 2 -j DROP", tclass6(P6_TCP, 0x02), DROP),
    ("-A INPUT -m ecn --ecn-ip-ect 2 -j DROP", tclass6(P6_TCP, 0x01), ACCEPT),
    ("-A INPUT -m ecn ! --ecn-ip-ect 2 -j DROP", tclass6(P6_TCP, 0xB9), DROP),
    ("-A INPUT -p tcp -m ecn --ecn-tcp-cwr -j DROP", ip6(HBH, ext(6) + tcp(flags=0x80)), DROP),
    ("-A INPUT -p tcp -m ecn --ecn-tcp-cwr -j DROP", ip6(HBH, ext(6) + tcp()), ACCEPT),
    ("-A INPUT -p dccp -m dccp --dport 5000 --dccp-types DATA -j DROP",
     ip6(33, dccp(1, 5000, 2)), DROP),
    ("-A INPUT -p dccp -m dccp --dport 5000 --dccp-types DATA -j DROP",
     ip6(33, dccp(1, 5000, 3)), ACCEPT),
]


@pytest.mark.parametrize(("rules", "packet", "expected"), CASES6,
                         ids=[f"{i}:{c[0][9:]}" for i, c in enumerate(CASES6)])
def test_ipv6_matches(rules: str, packet: bytes, expected: int) -> None:
    assert verdict(rules, packet, family=6) == expected


# Every header and match case again at the other hooks of the filter and raw tables: they
# read nothing that differs between hooks in a test run (the devices, which do, are tested
# below), so each must give the verdict it gives at INPUT. -o is refused at PREROUTING and
# -i at OUTPUT, so interface cases stay at INPUT.
OTHER_HOOKS = [("filter", "FORWARD", NfHook.FORWARD), ("filter", "OUTPUT", NfHook.LOCAL_OUT),
               ("raw", "PREROUTING", NfHook.PRE_ROUTING), ("raw", "OUTPUT", NfHook.LOCAL_OUT)]
HOOK_CASES = [(family, *case) for family, cases in ((4, CASES4), (6, CASES6))
              for case in cases if not re.search(r" -[io] ", case[0])]


@pytest.mark.parametrize(("family", "rules", "packet", "expected"), HOOK_CASES,
                         ids=[f"{c[0]}:{i}:{c[1][9:]}" for i, c in enumerate(HOOK_CASES)])
def test_matches_at_every_hook(family: int, rules: str, packet: bytes, expected: int) -> None:
    assert rules.startswith("-A INPUT ")
    for table, chain, hook in OTHER_HOOKS:
        compiled = ruleset(f"-A {chain} " + rules[len("-A INPUT "):], family=family,
                           table=table)
        got = loader.test_run(compiled, hook, packet, family=family, table=table)
        assert got == expected, (table, chain)


# The kernel's test run picks the devices by its default hook, LOCAL_OUT, before it copies
# the hook from the context (verify_and_copy_hook_state, Linux 6.18): whatever the hook, the
# output device is the loopback device and there is no input device.
DEVICES = [
    ("-o lo", DROP), ("-o l+", DROP), ("-o lo+", DROP), ("-o lo0", ACCEPT), ("-o l", ACCEPT),
    ("! -o lo", ACCEPT), ("! -o eth+", DROP), ("-o +", DROP), ("-i lo", ACCEPT),
    ("! -i eth0", DROP), ("-i lo -o lo", ACCEPT),
]


@pytest.mark.parametrize(("match", "expected"), DEVICES, ids=[d[0] for d in DEVICES])
def test_interfaces_in_test_runs(match: str, expected: int) -> None:
    assert verdict(f"-A FORWARD {match} -j DROP", P4_TCP, hook=NfHook.FORWARD) == expected
    if "-i" not in match:  # iptables refuses -i in OUTPUT
        assert verdict(f"-A OUTPUT {match} -j DROP", P4_TCP, hook=NfHook.LOCAL_OUT) == expected


# --- targets, chains, policies -----------------------------------------------------------------

CHAINS = [
    # (rules, user chains, policy, expected verdict for P4_TCP)
    ("-A INPUT -j ACCEPT", "", "DROP", ACCEPT),
    ("-A INPUT -j DROP", "", "ACCEPT", DROP),
    ("", "", "DROP", DROP),
    ("-A INPUT -p udp -j ACCEPT", "", "DROP", DROP),
    ("-A INPUT -p tcp\n-A INPUT -j DROP", "", "ACCEPT", DROP),  # no target: counts, goes on
    ("-A INPUT -j RETURN\n-A INPUT -j DROP", "", "ACCEPT", ACCEPT),  # RETURN in base: policy
    ("-A INPUT -j RETURN\n-A INPUT -j ACCEPT", "", "DROP", DROP),
    # jump: RETURN and falling off the end continue after the jump
    ("-A INPUT -j X\n-A INPUT -j DROP\n-A X -j RETURN\n-A X -j ACCEPT", "X", "ACCEPT", DROP),
    ("-A INPUT -j X\n-A INPUT -j DROP\n-A X -p udp -j ACCEPT", "X", "ACCEPT", DROP),
    ("-A INPUT -j X\n-A INPUT -j DROP\n-A X -p tcp -j ACCEPT", "X", "DROP", ACCEPT),
    ("-A INPUT -j X\n-A INPUT -j ACCEPT\n-A X -j DROP", "X", "ACCEPT", DROP),
    ("-A INPUT -p udp -j X\n-A INPUT -j ACCEPT\n-A X -j DROP", "X", "DROP", ACCEPT),
    # nested jumps
    ("-A INPUT -j X\n-A INPUT -j DROP\n-A X -j Y\n-A X -j ACCEPT\n-A Y -j RETURN",
     "X Y", "DROP", ACCEPT),
    ("-A INPUT -j X\n-A INPUT -j ACCEPT\n-A X -j Y\n-A X -j ACCEPT\n-A Y -j DROP",
     "X Y", "ACCEPT", DROP),
    # goto: RETURN from the goto'd chain returns to the caller of the chain that did the goto
    ("-A INPUT -j X\n-A INPUT -j DROP\n-A X -g Y\n-A X -j ACCEPT\n-A Y -j RETURN",
     "X Y", "ACCEPT", DROP),
    ("-A INPUT -j X\n-A INPUT -j ACCEPT\n-A X -g Y\n-A X -j ACCEPT\n-A Y -p udp -j ACCEPT",
     "X Y", "DROP", ACCEPT),
    ("-A INPUT -j X\n-A INPUT -j DROP\n-A X -g Y\n-A Y -p tcp -j ACCEPT", "X Y", "DROP",
     ACCEPT),
    # goto from a built-in chain: RETURN lands on the policy
    ("-A INPUT -g Y\n-A INPUT -j ACCEPT\n-A Y -j RETURN", "Y", "DROP", DROP),
    ("-A INPUT -g Y\n-A INPUT -j DROP\n-A Y -p udp -j DROP", "Y", "ACCEPT", ACCEPT),
    ("-A INPUT -g Y\n-A INPUT -j ACCEPT\n-A Y -j DROP", "Y", "ACCEPT", DROP),
    # one chain called from several places
    ("-A INPUT -j X\n-A INPUT -j Y\n-A INPUT -j ACCEPT\n-A X -p udp -j DROP\n-A Y -j X\n"
     "-A Y -p tcp -j DROP", "X Y", "ACCEPT", DROP),
    # deep nesting (5 levels) still works
    ("-A INPUT -j C1\n-A INPUT -j ACCEPT\n" + "\n".join(f"-A C{i} -j C{i + 1}"
                                                       for i in range(1, 5))
     + "\n-A C5 -j DROP", "C1 C2 C3 C4 C5", "ACCEPT", DROP),
]


@pytest.mark.parametrize(("rules", "chains", "policy", "expected"), CHAINS,
                         ids=[str(i) for i in range(len(CHAINS))])
def test_chains_and_targets(rules: str, chains: str, policy: str, expected: int) -> None:
    assert verdict(rules, P4_TCP, chains=chains, policy=policy) == expected


@pytest.mark.parametrize("family", [4, 6])
def test_other_hooks_and_tables(family: int) -> None:
    packet = P4_TCP if family == 4 else P6_TCP
    rules = """-A FORWARD -o lo -j DROP
               -A OUTPUT -o lo -p tcp -j DROP
               -A INPUT -p udp -j DROP"""
    compiled = ruleset(rules, family=family)
    with loader.TestRunner(compiled) as run:
        assert run.run(NfHook.FORWARD, packet) == DROP
        assert run.run(NfHook.LOCAL_OUT, packet) == DROP
        assert run.run(NfHook.LOCAL_IN, packet) == ACCEPT
    raw = ruleset("-A PREROUTING ! -i lo -j DROP\n-A OUTPUT -o lo -p udp -j DROP",
                  family=family, table="raw")
    assert [p.priority for p in raw.programs] == [-300, -300]
    with loader.TestRunner(raw) as run:
        assert run.run(NfHook.PRE_ROUTING, packet, table="raw") == DROP
        assert run.run(NfHook.LOCAL_OUT, packet, table="raw") == ACCEPT


def test_counters_follow_iptables() -> None:
    rules = """-A INPUT -p tcp
               -A INPUT -j X
               -A INPUT -p udp -j DROP
               -A X -p udp -j RETURN
               -A X -p icmp -j ACCEPT"""
    compiled = ruleset(rules, chains="X", policy="ACCEPT")
    with loader.TestRunner(compiled) as run:
        assert run.run(NfHook.LOCAL_IN, P4_TCP) == ACCEPT
        assert run.run(NfHook.LOCAL_IN, P4_UDP) == DROP
        assert run.run(NfHook.LOCAL_IN, ip4(1, icmp())) == ACCEPT
        assert run.run(NfHook.LOCAL_IN, ip4(6, tcp(), frag=1)) == ACCEPT  # -p tcp: no hot drop
        assert run.run(NfHook.LOCAL_OUT, P4_TCP) == ACCEPT  # an empty ACCEPT chain: no program
        counters = run.counters()
    tcp_len, udp_len, icmp_len = len(P4_TCP), len(P4_UDP), len(ip4(1, icmp()))
    assert counters[("filter", "INPUT", 1)] == (2, 2 * tcp_len)
    assert counters[("filter", "INPUT", 2)] == (4, 2 * tcp_len + udp_len + icmp_len)
    assert counters[("filter", "INPUT", 3)] == (1, udp_len)
    assert counters[("filter", "X", 1)] == (1, udp_len)
    assert counters[("filter", "X", 2)] == (1, icmp_len)
    assert counters[("filter", "INPUT", 0)] == (2, 2 * tcp_len)  # the policy
    assert counters[("filter", "OUTPUT", 0)] == (0, 0)


def test_hot_drop_is_not_counted() -> None:
    compiled = ruleset("-A INPUT -p tcp --dport 22 -j ACCEPT", policy="ACCEPT")
    with loader.TestRunner(compiled) as run:
        assert run.run(NfHook.LOCAL_IN, ip4(6, tcp()[:10])) == DROP
        assert run.counters()[("filter", "INPUT", 1)] == (0, 0)
        assert run.counters()[("filter", "INPUT", 0)] == (0, 0)


def test_empty_accept_chain_needs_no_program() -> None:
    compiled = ruleset("-A INPUT -j DROP")
    assert [(p.table, p.chain) for p in compiled.programs] == [("filter", "INPUT")]
    assert loader.test_run(compiled, NfHook.LOCAL_OUT, P4_TCP) == ACCEPT


def test_test_run_refuses_other_devices() -> None:
    compiled = ruleset("-A INPUT -i veth-b -j DROP")
    with pytest.raises(ValueError, match="loopback"):
        loader.test_run(compiled, NfHook.LOCAL_IN, P4_TCP, ifname_in="veth-b")


# --- scale ---------------------------------------------------------------------------------------

def _processed(log: str) -> int:
    m = re.search(r"processed (\d+) insns", log)
    assert m, log[-500:]
    return int(m.group(1))


@pytest.mark.parametrize("count", [1_000, 10_000])
def test_linear_rules_pass_the_verifier(count: int, capsys: pytest.CaptureFixture[str]) -> None:
    rules = "\n".join(f"-A INPUT -s 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255} -p tcp "
                      f"--dport {1 + i % 60000} -j DROP" for i in range(count))
    text = f"*filter\n:INPUT ACCEPT [0:0]\n{rules}\nCOMMIT\n"
    t0 = time.perf_counter()
    compiled = compile_ruleset(parse_restore(text), 4, optimize=False)  # linear on purpose
    t1 = time.perf_counter()
    program = compiled.programs[0]
    with bpf.map_create(compiled.maps[0]) as counters:
        lp = loader.link_program(program, {"counters": counters.fd})
        t2 = time.perf_counter()
        spec = ProgramSpec(program.name, ProgType.NETFILTER, lp.linked.code,
                           expected_attach_type=AttachType.NETFILTER)
        with bpf.btf_load(lp.btf) as btf, \
                bpf.prog_load(spec, log_level=LogLevel.STATS, func_info=(btf, lp.func_info)) \
                as prog:
            t3 = time.perf_counter()
            processed = _processed(prog.log)
            packet = ip4(6, tcp(dport=1 + (count - 1) % 60000),
                         src=f"10.{(count - 1) >> 16 & 255}.{(count - 1) >> 8 & 255}."
                             f"{(count - 1) & 255}")
            ctx = loader.hook_context(NfHook.LOCAL_IN, 4)
            assert bpf.prog_test_run(prog, loader.ethernet_frame(packet, 4),
                                     ctx_in=ctx).retval == DROP
            assert bpf.prog_test_run(prog, loader.ethernet_frame(P4_TCP, 4),
                                     ctx_in=ctx).retval == ACCEPT
    assert processed < 1_000_000
    with capsys.disabled():
        print(f"\n{count} rules: {len(lp.linked)} insns, verifier processed {processed}; "
              f"parse+compile {t1 - t0:.3f}s, link {t2 - t1:.3f}s, load {t3 - t2:.3f}s")


def test_long_user_chain_is_split_into_parts() -> None:
    blocklist = "\n".join(f"-A X -s 10.0.{i >> 8}.{i & 255} -p tcp --dport {i + 1} -j DROP"
                          for i in range(3000))
    rules = f"""-A INPUT -j X
                -A INPUT -j DROP
                {blocklist}
                -A X -p icmp -g Y
                -A X -p tcp --dport 22 -j RETURN
                -A X -j ACCEPT
                -A Y -j RETURN"""
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
             ":X - [0:0]", ":Y - [0:0]", *(r.strip() for r in rules.strip().splitlines()),
             "COMMIT", ""]
    # Linear on purpose (the optimizer would make the blocklist one lookup).
    compiled = compile_ruleset(parse_restore("\n".join(lines)), 4, optimize=False)
    funcs = [name for _, name, _ in compiled.programs[0].funcs]
    assert sum(name.startswith("chain_0_part_") for name in funcs) > 1
    with loader.TestRunner(compiled) as run:
        assert run.run(NfHook.LOCAL_IN, P4_TCP) == DROP  # RETURN from the last part
        assert run.run(NfHook.LOCAL_IN, P4_UDP) == ACCEPT
        assert run.run(NfHook.LOCAL_IN, ip4(1, icmp())) == DROP  # goto Y, RETURN: INPUT goes on
        hit = ip4(6, tcp(dport=2501), src="10.0.9.196")
        assert run.run(NfHook.LOCAL_IN, hit) == DROP
        assert run.counters()[("filter", "X", 2501)][0] == 1


def test_cpu_match() -> None:
    """Each test run runs on one CPU: `--cpu N` for every N < CPUs drops it exactly once."""
    import os
    cpus = os.cpu_count() or 1
    rules = "\n".join(f"-A INPUT -m cpu --cpu {n} -j DROP" for n in range(cpus))
    assert verdict(rules, P4_TCP) == DROP
    assert verdict(f"-A INPUT -m cpu --cpu {cpus} -j DROP", P4_TCP) == ACCEPT


def test_quota_counts_bytes_until_it_is_used_up() -> None:
    """quota_mt: a packet matches while it fits in what is left (skb->len: 40 + 14 for a
    test run's frame? no: the IP length the prologue counts), then never again; `!` inverts
    the match, not the counting."""
    size = len(P4_TCP)
    for negated, want in ((False, (DROP, DROP, ACCEPT, ACCEPT)),
                          (True, (ACCEPT, ACCEPT, DROP, DROP))):
        bang = "! " if negated else ""
        compiled = ruleset(f"-A INPUT -m quota {bang}--quota {2 * size + size // 2} -j DROP")
        with loader.TestRunner(compiled) as run:
            got = tuple(run.run(NfHook.LOCAL_IN, P4_TCP) for _ in range(4))
        assert got == want, negated
