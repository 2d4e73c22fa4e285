"""BPF_PROG_TEST_RUN verdicts for iprange, ttl/hl, tos, dscp and pkttype: packets that match
and packets that just miss, negated and not, IPv4 and IPv6."""

from __future__ import annotations

import ipaddress
import struct
import subprocess
from collections.abc import Iterator

import pytest

from bpfilter import bpf, loader, testbed
from bpfilter.codegen.compiler import CompiledRuleset, compile_ruleset
from bpfilter.codegen.uapi import NfHook, PacketType
from bpfilter.grammar.iptables import parse_restore

DROP, ACCEPT = 0, 1


def ip4(src: str = "198.18.0.1", dst: str = "198.18.0.2", *, ttl: int = 64,
        tos: int = 0) -> bytes:
    payload = struct.pack("!HHHH", 1234, 53, 12, 0) + b"xxxx"
    return struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(payload), 1, 0, ttl, 17, 0,
                       ipaddress.IPv4Address(src).packed,
                       ipaddress.IPv4Address(dst).packed) + payload


def ip6(src: str = "2001:db8::1", dst: str = "2001:db8::2", *, hl: int = 64,
        tclass: int = 0) -> bytes:
    payload = struct.pack("!HHHH", 1234, 53, 12, 0) + b"xxxx"
    return struct.pack("!IHBB16s16s", 6 << 28 | tclass << 20 | 0xABCDE, len(payload), 17, hl,
                       ipaddress.IPv6Address(src).packed,
                       ipaddress.IPv6Address(dst).packed) + payload


def compiled(rules: str, family: int) -> CompiledRuleset:
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
             *[r.strip() for r in rules.strip().splitlines()], "COMMIT", ""]
    return compile_ruleset(parse_restore("\n".join(lines), family=family), family)


def run(rules: str, packets: list[bytes], family: int,
        hook: NfHook = NfHook.LOCAL_IN) -> list[int]:
    with loader.TestRunner(compiled(rules, family)) as runner:
        return [runner.run(hook, p) for p in packets]


# (rule, [(packet, verdict), ...]): each rule DROPs what it matches under an ACCEPT policy.
Case = tuple[str, list[tuple[bytes, int]]]

IPRANGE4: list[Case] = [
    ("-m iprange --src-range 198.18.0.1-198.18.0.9",
     [(ip4("198.18.0.1"), DROP), (ip4("198.18.0.9"), DROP), (ip4("198.18.0.5"), DROP),
      (ip4("198.18.0.0"), ACCEPT), (ip4("198.18.0.10"), ACCEPT), (ip4("198.17.255.5"), ACCEPT),
      (ip4("198.19.0.5"), ACCEPT)]),
    ("-m iprange ! --src-range 198.18.0.1-198.18.0.9",
     [(ip4("198.18.0.1"), ACCEPT), (ip4("198.18.0.9"), ACCEPT), (ip4("198.18.0.0"), DROP),
      (ip4("198.18.0.10"), DROP)]),
    ("-m iprange --dst-range 198.18.0.2",
     [(ip4(dst="198.18.0.2"), DROP), (ip4(dst="198.18.0.3"), ACCEPT),
      (ip4(dst="198.18.0.1"), ACCEPT)]),
    # high bit set in the first byte: the comparisons are unsigned
    ("-m iprange --dst-range 0.0.0.0-128.0.0.0",
     [(ip4(dst="128.0.0.0"), DROP), (ip4(dst="128.0.0.1"), ACCEPT), (ip4(dst="1.2.3.4"), DROP)]),
    ("-m iprange --dst-range 128.0.0.1-255.255.255.255",
     [(ip4(dst="128.0.0.1"), DROP), (ip4(dst="128.0.0.0"), ACCEPT),
      (ip4(dst="255.255.255.255"), DROP)]),
    ("-m iprange --src-range 198.18.0.1-198.18.0.3 --dst-range 198.18.0.2-198.18.0.2",
     [(ip4(), DROP), (ip4(dst="198.18.0.3"), ACCEPT), (ip4(src="198.18.0.4"), ACCEPT)]),
    ("-m iprange --src-range 198.18.0.1-198.18.0.3 ! --dst-range 198.18.0.2-198.18.0.2",
     [(ip4(), ACCEPT), (ip4(dst="198.18.0.3"), DROP)]),
    # an empty range (first > last) matches nothing, and its negation everything
    ("-m iprange --src-range 198.18.0.9-198.18.0.1", [(ip4("198.18.0.5"), ACCEPT)]),
    ("-m iprange ! --src-range 198.18.0.9-198.18.0.1", [(ip4("198.18.0.5"), DROP)]),
]

IPRANGE6: list[Case] = [
    ("-m iprange --src-range 2001:db8::1-2001:db8::9",
     [(ip6("2001:db8::1"), DROP), (ip6("2001:db8::9"), DROP), (ip6("2001:db8::0"), ACCEPT),
      (ip6("2001:db8::a"), ACCEPT), (ip6("2001:db8:0:0:1::5"), ACCEPT),
      (ip6("2001:db7:ffff:ffff:ffff:ffff:ffff:5"), ACCEPT)]),
    ("-m iprange ! --src-range 2001:db8::1-2001:db8::9",
     [(ip6("2001:db8::1"), ACCEPT), (ip6("2001:db8::a"), DROP)]),
    # a range spanning word boundaries: the middle words decide
    ("-m iprange --dst-range 2001:db8:0:1:ffff::-2001:db8:0:3::1",
     [(ip6(dst="2001:db8:0:1:ffff::"), DROP), (ip6(dst="2001:db8:0:1:fffe:ffff:ffff:ffff"),
                                                 ACCEPT),
      (ip6(dst="2001:db8:0:2:1234::"), DROP), (ip6(dst="2001:db8:0:3::"), DROP),
      (ip6(dst="2001:db8:0:3::1"), DROP), (ip6(dst="2001:db8:0:3::2"), ACCEPT),
      (ip6(dst="2001:db8:0:4::"), ACCEPT), (ip6(dst="2001:db8:0:0:ffff::"), ACCEPT)]),
    ("-m iprange --dst-range ::-8000::",
     [(ip6(dst="8000::"), DROP), (ip6(dst="8000::1"), ACCEPT), (ip6(dst="2001:db8::2"), DROP)]),
    ("-m iprange ! --dst-range 8000::1-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
     [(ip6(dst="8000::"), DROP), (ip6(dst="8000::1"), ACCEPT),
      (ip6(dst="ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), ACCEPT)]),
]

TTL4: list[Case] = [
    ("-m ttl --ttl-eq 64", [(ip4(ttl=64), DROP), (ip4(ttl=63), ACCEPT), (ip4(ttl=65), ACCEPT)]),
    ("-m ttl ! --ttl-eq 64", [(ip4(ttl=64), ACCEPT), (ip4(ttl=63), DROP), (ip4(ttl=65), DROP)]),
    ("-m ttl --ttl-lt 64", [(ip4(ttl=63), DROP), (ip4(ttl=64), ACCEPT), (ip4(ttl=0), DROP)]),
    ("-m ttl --ttl-gt 64", [(ip4(ttl=65), DROP), (ip4(ttl=64), ACCEPT), (ip4(ttl=255), DROP)]),
    ("-m ttl --ttl-gt 255", [(ip4(ttl=255), ACCEPT)]),
    ("-m ttl --ttl-lt 0", [(ip4(ttl=0), ACCEPT)]),
    ("-m ttl --ttl-eq 200", [(ip4(ttl=200), DROP), (ip4(ttl=72), ACCEPT)]),
]

HL6: list[Case] = [
    ("-m hl --hl-eq 64", [(ip6(hl=64), DROP), (ip6(hl=63), ACCEPT), (ip6(hl=65), ACCEPT)]),
    ("-m hl ! --hl-eq 64", [(ip6(hl=64), ACCEPT), (ip6(hl=1), DROP)]),
    ("-m hl --hl-lt 2", [(ip6(hl=1), DROP), (ip6(hl=2), ACCEPT)]),
    ("-m hl --hl-gt 254", [(ip6(hl=255), DROP), (ip6(hl=254), ACCEPT)]),
]

TOS4: list[Case] = [
    ("-m tos --tos 0x10", [(ip4(tos=0x10), DROP), (ip4(tos=0x11), ACCEPT), (ip4(), ACCEPT)]),
    ("-m tos ! --tos 0x10", [(ip4(tos=0x10), ACCEPT), (ip4(tos=0x11), DROP)]),
    ("-m tos --tos 0x10/0x3f", [(ip4(tos=0xD0), DROP), (ip4(tos=0x90), DROP),
                                (ip4(tos=0x12), ACCEPT)]),
    ("-m tos --tos Minimize-Delay", [(ip4(tos=0x50), DROP), (ip4(tos=0x11), ACCEPT)]),
    # value bits outside the mask: (tos & mask) == value never holds
    ("-m tos --tos 0x11/0x10", [(ip4(tos=0x11), ACCEPT), (ip4(tos=0x10), ACCEPT)]),
    ("-m tos ! --tos 0x11/0x10", [(ip4(tos=0x11), DROP)]),
    ("-m tos --tos 0/0", [(ip4(tos=0xFF), DROP)]),
]

TCLASS6: list[Case] = [
    ("-m tos --tos 0x10", [(ip6(tclass=0x10), DROP), (ip6(tclass=0x11), ACCEPT),
                           (ip6(tclass=0x01), ACCEPT)]),
    ("-m tos ! --tos 0xb8/0xfc", [(ip6(tclass=0xBB), ACCEPT), (ip6(tclass=0xB4), DROP)]),
    ("-m tos --tos 0xff", [(ip6(tclass=0xFF), DROP), (ip6(tclass=0xFE), ACCEPT)]),
]

DSCP4: list[Case] = [
    ("-m dscp --dscp 46", [(ip4(tos=0xB8), DROP), (ip4(tos=0xBB), DROP), (ip4(tos=0xB4), ACCEPT),
                           (ip4(tos=0xBC), ACCEPT)]),
    ("-m dscp ! --dscp 46", [(ip4(tos=0xB8), ACCEPT), (ip4(tos=0), DROP)]),
    ("-m dscp --dscp-class AF41", [(ip4(tos=34 << 2), DROP), (ip4(tos=35 << 2), ACCEPT)]),
    ("-m dscp --dscp 0", [(ip4(tos=3), DROP), (ip4(tos=4), ACCEPT)]),
    ("-m dscp --dscp 63", [(ip4(tos=0xFC), DROP), (ip4(tos=0xF8), ACCEPT)]),
]

DSCP6: list[Case] = [
    ("-m dscp --dscp 46", [(ip6(tclass=0xB8), DROP), (ip6(tclass=0xBA), DROP),
                           (ip6(tclass=0xB4), ACCEPT), (ip6(tclass=0xBC), ACCEPT)]),
    ("-m dscp ! --dscp-class EF", [(ip6(tclass=0xB8), ACCEPT), (ip6(tclass=0x04), DROP)]),
    ("-m dscp --dscp 63", [(ip6(tclass=0xFC), DROP), (ip6(tclass=0x7C), ACCEPT)]),
]

ALL = [(4, c) for c in IPRANGE4 + TTL4 + TOS4 + DSCP4] + \
      [(6, c) for c in IPRANGE6 + HL6 + TCLASS6 + DSCP6]


@pytest.mark.parametrize(("family", "case"), ALL,
                         ids=[f"v{f}:{c[0]}" for f, c in ALL])
def test_match_verdicts(family: int, case: Case) -> None:
    rule, expected = case
    got = run(f"-A INPUT {rule} -j DROP", [p for p, _ in expected], family)
    assert got == [v for _, v in expected]


@pytest.mark.parametrize("hook", [NfHook.FORWARD, NfHook.LOCAL_OUT])
def test_other_hooks(hook: NfHook) -> None:
    chain = "FORWARD" if hook == NfHook.FORWARD else "OUTPUT"
    rules = (f"-A {chain} -m iprange --dst-range 198.18.0.2-198.18.0.4 -m ttl --ttl-lt 10 "
             f"-m dscp --dscp 46 -j DROP")
    packets = [ip4(ttl=9, tos=0xB8), ip4(ttl=10, tos=0xB8), ip4(ttl=9, tos=0xB4),
               ip4(dst="198.18.0.5", ttl=9, tos=0xB8)]
    assert run(rules, packets, 4, hook) == [DROP, ACCEPT, ACCEPT, ACCEPT]


def test_family_refusals() -> None:
    with pytest.raises(Exception, match="ttl"):
        compiled("-A INPUT -m ttl --ttl-eq 1 -j DROP", 6)


# pkttype: a netfilter test run passes the frame through eth_type_trans() on the loopback
# device (address and broadcast address 00:00:00:00:00:00) except at LOCAL_OUT, so the
# destination MAC picks skb->pkt_type: ff:ff:ff:ff:ff:ff is just multicast there, and neither
# PACKET_BROADCAST nor PACKET_LOOPBACK can be made in a test run.
MAC_TYPES = [
    (bytes(6), PacketType.HOST),
    (b"\xff" * 6, PacketType.MULTICAST),
    (bytes.fromhex("01005e000001"), PacketType.MULTICAST),
    (bytes.fromhex("333300000001"), PacketType.MULTICAST),
    (bytes.fromhex("020000000002"), PacketType.OTHERHOST),
]
PKT_NAMES = {"unicast": PacketType.HOST, "broadcast": PacketType.BROADCAST,
             "multicast": PacketType.MULTICAST}


def frame(dst_mac: bytes, packet: bytes, family: int) -> bytes:
    ethertype = 0x0800 if family == 4 else 0x86DD
    return dst_mac + bytes.fromhex("020000000001") + struct.pack("!H", ethertype) + packet


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("negated", [False, True])
@pytest.mark.parametrize("name", list(PKT_NAMES))
def test_pkttype_follows_the_destination_mac(family: int, negated: bool, name: str) -> None:
    bang = "! " if negated else ""
    c = compiled(f"-A INPUT -m pkttype {bang}--pkt-type {name} -j DROP", family)
    packet = ip4() if family == 4 else ip6()
    with loader.TestRunner(c) as runner:
        prog = runner.programs.progs[c.program(NfHook.LOCAL_IN, "filter")]
        ctx = loader.hook_context(NfHook.LOCAL_IN, family)
        for mac, kind in MAC_TYPES:
            got = bpf.prog_test_run(prog, frame(mac, packet, family), ctx_in=ctx).retval
            matched = (kind == PKT_NAMES[name]) != negated
            assert got == (DROP if matched else ACCEPT), (mac.hex(), kind.name, got)


@pytest.mark.parametrize("family", [4, 6])
def test_pkttype_at_local_out_is_host(family: int) -> None:
    packet = ip4() if family == 4 else ip6()
    rules = ("-A OUTPUT -m pkttype --pkt-type broadcast -j ACCEPT\n"
             "-A OUTPUT -m pkttype --pkt-type unicast -j DROP")
    assert run(rules, [packet], family, NfHook.LOCAL_OUT) == [DROP]


# PACKET_LOOPBACK: a broadcast or multicast datagram a host sends is looped back to itself
# (ip_mc_output / ip6_finish_output2 -> dev_loopback_xmit) and reaches LOCAL_IN with that
# pkt_type; xt_pkttype calls it multicast for IPv6 and for an IPv4 multicast destination, and
# broadcast for any other IPv4 one. Real traffic in a throwaway namespace (veth pair d0-d1).
SEND_RECEIVE = """
import socket, struct, sys
family, dst, local, ifname = sys.argv[1:]
af = socket.AF_INET if family == "4" else socket.AF_INET6
r = socket.socket(af, socket.SOCK_DGRAM)
r.bind(("0.0.0.0" if af == socket.AF_INET else "::", 5555))
r.settimeout(0.3)
s = socket.socket(af, socket.SOCK_DGRAM)
if af == socket.AF_INET:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(local))
    if dst.startswith("239."):
        r.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                     socket.inet_aton(dst) + socket.inet_aton(local))
elif dst.startswith("ff"):
    index = socket.if_nametoindex(ifname)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
    r.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
                 socket.inet_pton(af, dst) + struct.pack("@I", index))
s.sendto(b"pkttype", (dst, 5555))
try:
    r.recv(16)
    print("delivered")
except socket.timeout:
    print("dropped")
"""
LOCAL4, LOCAL6 = "198.18.5.1", "2001:db8:5::1"
LOOPED = [  # (family, destination, the type xt_pkttype sees at LOCAL_IN)
    (4, "198.18.5.255", "broadcast"),
    (4, "239.1.2.3", "multicast"),
    (4, LOCAL4, "unicast"),
    (6, "ff15::1234", "multicast"),
    (6, LOCAL6, "unicast"),
]


def _ns(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *args], check=True, capture_output=True,
                          text=True, timeout=10).stdout.strip()


@pytest.fixture
def loop_ns() -> Iterator[str]:
    ns = testbed.unique_name()
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in ("link set lo up", "link add d0 type veth peer name d1", "link set d0 up",
                    "link set d1 up", f"addr add {LOCAL4}/24 brd + dev d0",
                    f"-6 addr add {LOCAL6}/64 dev d0 nodad", "route add 224.0.0.0/4 dev d0"):
            subprocess.run(["ip", "-n", ns, *cmd.split()], check=True)
        yield ns
    finally:
        testbed.delete(ns)


def _delivered(ns: str, family: int, dst: str) -> bool:
    local = LOCAL4 if family == 4 else LOCAL6
    return _ns(ns, "python3", "-c", SEND_RECEIVE, str(family), dst, local, "d0") == "delivered"


def test_pkttype_of_looped_back_packets_follows_xt_pkttype(loop_ns: str) -> None:
    for family, dst, kind in LOOPED:
        assert _delivered(loop_ns, family, dst), dst
        for name in PKT_NAMES:
            for bang in ("", "! "):
                rule = f"-A INPUT -p udp --dport 5555 -m pkttype {bang}--pkt-type {name} -j DROP"
                with loader.load(compiled(rule, family), loop_ns, pin=False):
                    got = _delivered(loop_ns, family, dst)
                assert got == ((name == kind) == bool(bang)), (dst, rule)
