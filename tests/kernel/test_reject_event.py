"""REJECT through BPF_PROG_TEST_RUN: the verdict is DROP and exactly one reject event, with
the packet and the skb facts the reply depends on, reaches the ring buffer; rules that do not
REJECT push none; a user chain's REJECT and each reject type's code arrive as compiled."""

from __future__ import annotations

import dataclasses
import ipaddress
import struct

import pytest

from bpfilter import bpf, loader, responder
from bpfilter import reject_reply as rr
from bpfilter.codegen import reject
from bpfilter.codegen.compiler import CompiledRuleset, compile_ruleset
from bpfilter.codegen.uapi import NfHook
from bpfilter.grammar.iptables import parse_restore

DROP, ACCEPT = 0, 1
A4, B4 = "198.18.0.1", "198.18.0.2"
A6, B6 = "2001:db8::1", "2001:db8::2"


def ip4(proto: int, payload: bytes) -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 7, 0x4000, 64, proto, 0,
                       ipaddress.IPv4Address(A4).packed, ipaddress.IPv4Address(B4).packed)
    return head[:10] + struct.pack("!H", ~rr.ones_sum(head) & 0xFFFF) + head[12:] + payload


def ip6(nexthdr: int, payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), nexthdr, 64,
                       ipaddress.IPv6Address(A6).packed,
                       ipaddress.IPv6Address(B6).packed) + payload


def udp(dport: int, data: bytes = b"x" * 100) -> bytes:
    return struct.pack("!HHHH", 1234, dport, 8 + len(data), 0) + data


def tcp(dport: int, src: str = A4, dst: str = B4) -> bytes:
    """A SYN with a valid checksum (a test run's skb is CHECKSUM_NONE: it is checked)."""
    seg = struct.pack("!HHIIBBHHH", 1234, dport, 1, 0, 5 << 4, 0x02, 1024, 0, 0)
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    pseudo = s + d + (struct.pack("!HH", 6, 20) if len(s) == 4 else struct.pack("!II", 20, 6))
    c = ~rr.ones_sum(seg, rr.ones_sum(pseudo)) & 0xFFFF
    return seg[:16] + struct.pack("!H", c) + seg[18:]


RULES = ("-A INPUT -p udp -m udp --dport 53 -j ACCEPT\n"
         "-A INPUT -p tcp -m tcp --dport 22 -j REJECT --reject-with tcp-reset\n"
         "-A INPUT -p udp -m udp --dport 7 -j SUB\n"
         "-A INPUT -p udp -j REJECT\n"
         "-A SUB -j REJECT --reject-with {sub}\n")


def _compiled(family: int) -> CompiledRuleset:
    text = ("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            ":SUB - [0:0]\n"
            + RULES.format(sub="icmp-net-prohibited" if family == 4 else "icmp6-no-route")
            + "COMMIT\n")
    return compile_ruleset(parse_restore(text, family=family), family)


@pytest.fixture(scope="module")
def bits() -> rr.SkbBits:
    return responder._skb_bits()


@pytest.mark.parametrize("family", [4, 6])
def test_reject_drops_and_pushes_one_event(family: int, bits: rr.SkbBits) -> None:
    compiled = _compiled(family)
    make = ip4 if family == 4 else ip6
    with loader.TestRunner(compiled) as t:
        ring = bpf.RingBuffer(t.programs.maps[reject.RING])
        try:
            assert t.run(NfHook.LOCAL_IN, make(17, udp(53))) == ACCEPT
            assert ring.read() == []
            cases = [(make(6, tcp(22) if family == 4 else tcp(22, A6, B6)), reject.TCP_RESET),
                     (make(17, udp(7)), 9 if family == 4 else 0),
                     (make(17, udp(9, b"y" * 2000)), 3 if family == 4 else 4)]
            for packet, code in cases:
                assert t.run(NfHook.LOCAL_IN, packet) == DROP
                (raw,) = ring.read()
                o = rr.parse_event(raw, bits)
                assert (o.family, o.hook, o.code, o.skb_len) == (family, NfHook.LOCAL_IN, code,
                                                                 len(packet))
                # The whole packet, up to CAPTURE bytes, from the network header.
                assert o.packet == packet[:reject.CAPTURE]
                # A test run's skb: no checksum offload, no route, the loopback device.
                assert (o.ip_summed, o.rt_flags, o.out_dev) == (rr.CHECKSUM_NONE, 0, "lo")
        finally:
            ring.close()


def test_reply_from_a_test_run_event(bits: rr.SkbBits) -> None:
    """The event feeds reply4 as the kernel's skb would feed nf_send_reset."""
    compiled = _compiled(4)
    with loader.TestRunner(compiled) as t:
        ring = bpf.RingBuffer(t.programs.maps[reject.RING])
        try:
            packet = ip4(6, tcp(22))
            assert t.run(NfHook.LOCAL_IN, packet) == DROP
            (raw,) = ring.read()
        finally:
            ring.close()
    # A test run's skb has no route and is PACKET_OTHERHOST: give it a local delivery's.
    o = dataclasses.replace(rr.parse_event(raw, bits), pkt_type=rr.PACKET_HOST,
                            rt_flags=rr.RTCF_LOCAL)
    r = rr.reply4(o, default_ttl=64)
    assert r is not None and r.proto == rr.IPPROTO_TCP
    assert r.payload[:4] == struct.pack("!HH", 22, 1234)
    assert struct.unpack_from("!I", r.payload, 8)[0] == 2  # SYN seq 1 + 1


def test_reject_blocklist_becomes_one_lookup(bits: rr.SkbBits) -> None:
    """REJECT is terminal: a fail2ban-style list of REJECT rules (with other verdicts and
    reject types mixed in) is decided by one map lookup, first match and counters kept."""
    rules = "".join(f"-A INPUT -s 198.18.{i // 250}.{i % 250 + 1}/32 -j REJECT\n"
                    for i in range(100))
    rules += "".join(f"-A INPUT -s 198.19.0.{i + 1}/32 -j REJECT --reject-with "
                     "icmp-host-prohibited\n" for i in range(20))
    rules += "".join(f"-A INPUT -s 198.19.0.{i + 1}/32 -j DROP\n" for i in range(40))
    text = ("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            + rules + "COMMIT\n")
    compiled = compile_ruleset(parse_restore(text), 4)
    assert [len(run.rules) for _, _, run, _ in compiled.lookups] == [160]

    def packet(src: str) -> bytes:
        head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 7, 0x4000, 64, 17, 0,
                           ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(B4).packed)
        return head[:10] + struct.pack("!H", ~rr.ones_sum(head) & 0xFFFF) + head[12:] + \
            udp(9, b"")

    with loader.TestRunner(compiled) as t:
        ring = bpf.RingBuffer(t.programs.maps[reject.RING])
        try:
            for src, verdict, codes, position in (("198.18.0.50", DROP, [3], 50),
                                                  ("198.19.0.7", DROP, [10], 107),
                                                  ("198.19.0.30", DROP, [], 150),
                                                  ("198.20.0.1", ACCEPT, [], 0)):
                assert t.run(NfHook.LOCAL_IN, packet(src)) == verdict, src
                assert [rr.parse_event(r, bits).code for r in ring.read()] == codes, src
                assert t.counters()[("filter", "INPUT", position)][0] == 1, src
        finally:
            ring.close()
