"""The replies REJECT sends, as bytes, against expectations derived by hand from the kernel's
nf_reject_ipv4.c / nf_reject_ipv6.c, __icmp_send and icmp6_send; plus the reject event
layout, the compiled REJECT action and the rate limiter."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from bpfilter import reject_reply as rr
from bpfilter.codegen import reject
from bpfilter.codegen.compiler import CompileError, compile_ruleset
from bpfilter.codegen.flavor_packet import IfTarget
from bpfilter.codegen.uapi import IfHook, MapType, NfHook
from bpfilter.grammar.iptables import parse_restore

A4, B4 = ipaddress.IPv4Address("198.18.0.1").packed, ipaddress.IPv4Address("198.18.0.2").packed
A6, B6 = (ipaddress.IPv6Address("2001:db8::1").packed,
          ipaddress.IPv6Address("2001:db8::2").packed)


def csum(data: bytes, start: int = 0) -> int:
    return ~rr.ones_sum(data, start) & 0xFFFF


def ip4(proto: int, body: bytes, *, tos: int = 0x10, ident: int = 0x4242, frag: int = 0x4000,
        src: bytes = A4, dst: bytes = B4) -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(body), ident, frag, 64, proto, 0,
                       src, dst)
    return head[:10] + struct.pack("!H", csum(head)) + head[12:] + body


def ip6(nexthdr: int, body: bytes, *, src: bytes = A6, dst: bytes = B6) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28 | 0xABCDE, len(body), nexthdr, 64, src,
                       dst) + body


def tcp(flags: int, *, seq: int = 1000, ack: int = 0, data: bytes = b"",
        doff: int = 5) -> bytes:
    return struct.pack("!HHIIBBHHH", 40000, 22, seq, ack, doff << 4, flags, 512, 0, 0) + \
        bytes(4 * (doff - 5)) + data


def udp(data: bytes = b"hello", check: int = 0x1234) -> bytes:
    return struct.pack("!HHHH", 40001, 53, 8 + len(data), check) + data


def orig(family: int, packet: bytes, code: int, **kw: object) -> rr.Original:
    hook = kw.pop("hook", NfHook.LOCAL_IN)
    assert isinstance(hook, NfHook)
    return rr.Original(family, hook, code, packet, len(packet), **kw)  # type: ignore[arg-type]


# --- IPv4 ICMP errors ---------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "code"), sorted(reject.ICMP_CODES.items()))
def test_ipv4_unreachable_codes(name: str, code: int) -> None:
    pkt = ip4(17, udp())
    r = rr.reply4(orig(4, pkt, code))
    assert r is not None
    # __icmp_send: from the original destination (RTCF_LOCAL), TOS = (tos & 0x1E) | 0xC0,
    # no DF (IP_PMTUDISC_DONT), the route's TTL and a generated id.
    assert (r.src, r.dst, r.proto, r.tos, r.df, r.ttl, r.ip_id) == (B4, A4, 1, 0xD0, False,
                                                                    None, None)
    msg = struct.pack("!BBHI", 3, code, 0, 0) + pkt
    assert r.payload == msg[:2] + struct.pack("!H", csum(msg)) + msg[4:]
    whole = r.packet(ttl=64, ip_id=7)
    assert whole[:12] == struct.pack("!BBHHHBBH", 0x45, 0xD0, 20 + 8 + len(pkt), 7, 0, 64, 1,
                                     0)[:10] + whole[10:12]
    assert csum(whole[:20]) == 0 and csum(whole[20:]) == 0


def test_ipv4_quote_is_cut_at_576_bytes() -> None:
    pkt = ip4(17, udp(bytes(1000)))
    r = rr.reply4(orig(4, pkt, 3))
    assert r is not None and r.payload[8:] == pkt[:548]
    assert len(r.packet(ttl=64)) == 576


def test_ipv4_forwarded_packet_is_answered_from_the_route_source() -> None:
    pkt = ip4(17, udp())
    r = rr.reply4(orig(4, pkt, 3, hook=NfHook.FORWARD, rt_flags=0))
    assert r is not None and r.src is None
    inbound = ipaddress.IPv4Address("198.18.9.9").packed
    r = rr.reply4(orig(4, pkt, 3, hook=NfHook.FORWARD, rt_flags=0), inbound_src=inbound)
    assert r is not None and r.src == inbound


@pytest.mark.parametrize(("what", "packet", "kw"), [
    ("later fragment", ip4(17, udp(), frag=0x2001), {}),
    ("broadcast route", ip4(17, udp()), {"rt_flags": rr.RTCF_LOCAL | rr.RTCF_BROADCAST}),
    ("multicast route", ip4(17, udp()), {"rt_flags": rr.RTCF_LOCAL | rr.RTCF_MULTICAST}),
    ("not for this host", ip4(17, udp()), {"pkt_type": 1}),
    ("an ICMP error", ip4(1, struct.pack("!BBHI", 3, 3, 0, 0) + ip4(17, udp())), {}),
    ("an unknown ICMP type", ip4(1, struct.pack("!BBHI", 42, 0, 0, 0)), {}),
    ("a bad UDP checksum", ip4(17, udp(check=0x1234)), {"ip_summed": rr.CHECKSUM_NONE}),
])
def test_ipv4_no_error(what: str, packet: bytes, kw: dict[str, object]) -> None:
    assert rr.reply4(orig(4, packet, 3, **kw)) is None, what


def _udp4_ok(data: bytes = b"hello") -> bytes:
    body = udp(data, check=0)
    pseudo = A4 + B4 + struct.pack("!HH", 17, len(body))
    c = csum(body, rr.ones_sum(pseudo))
    return ip4(17, body[:6] + struct.pack("!H", c) + body[8:])


def test_ipv4_checksum_checks() -> None:
    good = _udp4_ok()
    none = {"ip_summed": rr.CHECKSUM_NONE}
    assert rr.reply4(orig(4, good, 3, **none)) is not None
    # A zero UDP checksum means "none": never checked (nf_reject_verify_csum).
    assert rr.reply4(orig(4, ip4(17, udp(check=0)), 3, **none)) is not None
    # csum_valid or CHECKSUM_UNNECESSARY: not checked at all.
    bad = ip4(17, udp(check=0x1234))
    assert rr.reply4(orig(4, bad, 3, ip_summed=rr.CHECKSUM_NONE, csum_valid=True)) is not None
    # CHECKSUM_COMPLETE at INPUT: skb->csum (the sum of the whole packet) decides.
    total = rr.ones_sum(good)
    assert rr.reply4(orig(4, good, 3, ip_summed=rr.CHECKSUM_COMPLETE, csum=total)) is not None
    assert rr.reply4(orig(4, bad, 3, ip_summed=rr.CHECKSUM_COMPLETE,
                          csum=rr.ones_sum(bad))) is None
    # ... and at FORWARD it is trusted.
    assert rr.reply4(orig(4, bad, 3, hook=NfHook.FORWARD, rt_flags=0,
                          ip_summed=rr.CHECKSUM_COMPLETE, csum=0)) is not None


# --- IPv4 TCP resets ----------------------------------------------------------------------------

def _tcp4(flags: int, **kw: object) -> bytes:
    body = tcp(flags, **kw)  # type: ignore[arg-type]
    c = csum(body, rr.ones_sum(A4 + B4 + struct.pack("!HH", 6, len(body))))
    return ip4(6, body[:16] + struct.pack("!H", c) + body[18:])


@pytest.mark.parametrize(("flags", "data", "seq", "ack", "rst_flags"), [
    (0x02, b"", 0, 1001, 0x14),  # SYN: acknowledged, seq 0
    (0x01, b"abc", 0, 1004, 0x14),  # FIN with 3 bytes: 3 + 1
    (0x00, b"abcd", 0, 1004, 0x14),
    (0x10, b"", 5555, 0, 0x04),  # ACK: seq = its ack_seq, no ACK flag
    (0x18, b"xyz", 5555, 0, 0x04),
])
def test_ipv4_reset(flags: int, data: bytes, seq: int, ack: int, rst_flags: int) -> None:
    pkt = _tcp4(flags, data=data, ack=5555 if flags & 0x10 else 0)
    r = rr.reply4(orig(4, pkt, reject.TCP_RESET, ip_summed=rr.CHECKSUM_NONE), default_ttl=61)
    assert r is not None
    # nf_reject_iphdr_put: tos 0, id 0, DF, the original route's TTL, addresses swapped.
    whole = r.packet()
    assert whole[:20] == struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0x4000, 61, 6,
                                     csum(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0,
                                                      0x4000, 61, 6, 0, B4, A4)), B4, A4)
    body = struct.pack("!HHIIBBHHH", 22, 40000, seq, ack, 5 << 4, rst_flags, 0, 0, 0)
    c = csum(body, rr.ones_sum(B4 + A4 + struct.pack("!HH", 6, 20)))
    assert whole[20:] == body[:16] + struct.pack("!H", c) + body[18:]


def test_ipv4_reset_counts_data_after_options() -> None:
    pkt = _tcp4(0x02, data=b"12345", doff=8)
    r = rr.reply4(orig(4, pkt, reject.TCP_RESET))
    assert r is not None and struct.unpack_from("!I", r.payload, 8)[0] == 1000 + 1 + 5


@pytest.mark.parametrize(("what", "packet", "kw"), [
    ("a reset", _tcp4(0x04), {}),
    ("not TCP", _udp4_ok(), {}),
    ("later fragment", ip4(6, tcp(0x02), frag=0x0001), {}),
    ("short header", ip4(6, tcp(0x02)[:12]), {}),
    ("bad checksum", ip4(6, tcp(0x02)), {"ip_summed": rr.CHECKSUM_NONE}),
    ("broadcast", _tcp4(0x02), {"rt_flags": rr.RTCF_BROADCAST}),
])
def test_ipv4_no_reset(what: str, packet: bytes, kw: dict[str, object]) -> None:
    assert rr.reply4(orig(4, packet, reject.TCP_RESET, **kw)) is None, what


def test_reply_mark_follows_fwmark_reflect() -> None:
    pkt = _tcp4(0x02)
    assert rr.reply4(orig(4, pkt, reject.TCP_RESET, mark=7)).mark == 0  # type: ignore[union-attr]
    r = rr.reply4(orig(4, pkt, reject.TCP_RESET, mark=7), fwmark_reflect=True)
    assert r is not None and r.mark == 7


# --- IPv6 -----------------------------------------------------------------------------------------

def _l4_6(proto: int, body: bytes, at: int, src: bytes = A6, dst: bytes = B6) -> bytes:
    c = csum(body[:at] + b"\0\0" + body[at + 2:],
             rr.ones_sum(src + dst + struct.pack("!II", len(body), proto)))
    return body[:at] + struct.pack("!H", c) + body[at + 2:]


@pytest.mark.parametrize(("name", "code"), sorted(reject.ICMP6_CODES.items()))
def test_ipv6_unreachable_codes(name: str, code: int) -> None:
    pkt = ip6(17, _l4_6(17, udp(), 6))
    r = rr.reply6(orig(6, pkt, code, ip_summed=rr.CHECKSUM_NONE), local=frozenset({B6}))
    assert r is not None
    # icmp6_send: from the original destination (a local address), traffic class 0, the
    # route's hop limit, the automatic flow label.
    assert (r.src, r.dst, r.proto, r.tos, r.ttl, r.flowlabel) == (B6, A6, 58, 0, None, None)
    msg = struct.pack("!BBHI", 1, code, 0, 0) + pkt
    assert r.payload == _l4_6(58, msg, 2, B6, A6)
    whole = r.packet(ttl=64, flowlabel=5)
    assert whole[:8] == struct.pack("!IHBB", 6 << 28 | 5, len(msg), 58, 64)


def test_ipv6_quote_is_cut_at_the_minimum_mtu() -> None:
    pkt = ip6(17, udp(bytes(2000)))
    # Captured in part (the event holds CAPTURE bytes): the quote needs no more.
    r = rr.reply6(rr.Original(6, NfHook.LOCAL_IN, 4, pkt[:1500], len(pkt)),
                  local=frozenset({B6}))
    assert r is not None and r.payload[8:] == pkt[:1232]
    assert len(r.packet()) == 1280


def test_ipv6_source_not_local_left_to_the_route() -> None:
    r = rr.reply6(orig(6, ip6(17, udp()), 4, hook=NfHook.FORWARD))
    assert r is not None and r.src is None
    link_local = ipaddress.IPv6Address("fe80::1").packed
    r = rr.reply6(orig(6, ip6(17, udp(), src=link_local), 4, in_dev="veth0"))
    assert r is not None and r.oif == "veth0"


def _frag6(nexthdr: int, offset: int) -> bytes:
    return struct.pack("!BBHI", nexthdr, 0, offset << 3, 99)


@pytest.mark.parametrize(("what", "packet", "kw"), [
    ("multicast destination", ip6(17, udp(), dst=ipaddress.IPv6Address("ff02::1").packed), {}),
    ("not for this host", ip6(17, udp()), {"pkt_type": 2}),
    ("unspecified source", ip6(17, udp(), src=bytes(16)), {}),
    ("an ICMPv6 error", ip6(58, struct.pack("!BBHI", 1, 4, 0, 0)), {}),
    ("bad checksum", ip6(17, udp(check=0x1234)), {"ip_summed": rr.CHECKSUM_NONE}),
    ("later fragment", ip6(44, _frag6(17, 10) + bytes(16)), {"ip_summed": rr.CHECKSUM_NONE}),
])
def test_ipv6_no_error(what: str, packet: bytes, kw: dict[str, object]) -> None:
    assert rr.reply6(orig(6, packet, 4, **kw)) is None, what


def test_ipv6_echo_request_after_extension_headers_is_answered() -> None:
    hop = struct.pack("!BB6x", 58, 0)
    pkt = ip6(0, hop + _l4_6(58, struct.pack("!BBHHH", 128, 0, 0, 1, 1), 2))
    assert rr.reply6(orig(6, pkt, 4, ip_summed=rr.CHECKSUM_NONE)) is not None


@pytest.mark.parametrize(("flags", "seq", "ack", "rst_flags"), [
    (0x02, 0, 1001, 0x14), (0x10, 5555, 0, 0x04), (0x11, 5555, 0, 0x04)])
def test_ipv6_reset(flags: int, seq: int, ack: int, rst_flags: int) -> None:
    body = _l4_6(6, tcp(flags, ack=5555 if flags & 0x10 else 0), 16)
    r = rr.reply6(orig(6, ip6(6, body), reject.TCP_RESET, ip_summed=rr.CHECKSUM_NONE))
    assert r is not None
    # nf_reject_ip6hdr_put: traffic class 0, flow label 0, addresses swapped.
    assert (r.src, r.dst, r.tos, r.flowlabel, r.ttl) == (B6, A6, 0, 0, None)
    want = struct.pack("!HHIIBBHHH", 22, 40000, seq, ack, 5 << 4, rst_flags, 0, 0, 0)
    assert r.payload == _l4_6(6, want, 16, B6, A6)
    assert r.packet(ttl=64)[:8] == struct.pack("!IHBB", 6 << 28, 20, 6, 64)


@pytest.mark.parametrize(("what", "packet"), [
    ("multicast", ip6(6, tcp(0x02), dst=ipaddress.IPv6Address("ff02::1").packed)),
    ("a reset", ip6(6, _l4_6(6, tcp(0x04), 16))),
    ("later fragment", ip6(44, _frag6(6, 3) + tcp(0x02))),
    ("short", ip6(6, tcp(0x02)[:10])),
])
def test_ipv6_no_reset(what: str, packet: bytes) -> None:
    assert rr.reply6(orig(6, packet, reject.TCP_RESET)) is None, what


def test_skip_exthdr() -> None:
    hop = struct.pack("!BB6x", 43, 0)
    rt = struct.pack("!BB6x", 6, 0)
    pkt = ip6(0, hop + rt + tcp(0x02))
    assert rr.skip_exthdr(pkt, 40, 0) == (56, 6, 0)
    assert rr.skip_exthdr(ip6(59, b""), 40, 59)[0] == -1


# --- the event and the compiled action --------------------------------------------------------

def test_parse_event() -> None:
    raw = bytearray(reject.RECORD_SIZE)
    pkt = ip4(17, udp())
    struct.pack_into("<BBB", raw, reject.OFF_FAMILY, 4, NfHook.FORWARD, 13)
    struct.pack_into("<IIIIII", raw, reject.OFF_SKB_LEN, len(pkt), len(pkt),
                     (1 << 22) | (2 << 5) | 1, 0xABCD, 9, rr.RTCF_LOCAL)
    raw[reject.OFF_IN:reject.OFF_IN + 5] = b"eth0\0"
    raw[reject.OFF_PKT:reject.OFF_PKT + len(pkt)] = pkt
    o = rr.parse_event(bytes(raw))
    assert (o.family, o.hook, o.code, o.packet, o.skb_len) == (4, NfHook.FORWARD, 13, pkt,
                                                              len(pkt))
    assert (o.pkt_type, o.ip_summed, o.csum_valid, o.csum, o.mark, o.rt_flags, o.in_dev,
            o.out_dev) == (1, 2, True, 0xABCD, 9, rr.RTCF_LOCAL, "eth0", "")


FILTER = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n{}\nCOMMIT\n"


@pytest.mark.parametrize("family", [4, 6])
def test_reject_compiles_with_its_ring(family: int) -> None:
    rs = parse_restore(FILTER.format("-A INPUT -p tcp -j REJECT --reject-with tcp-reset\n"
                                     "-A FORWARD -j REJECT\n-A OUTPUT -j REJECT"), family=family)
    compiled = compile_ruleset(rs, family)
    specs = {m.name: m for m in compiled.maps}
    assert specs[reject.RING].type == MapType.RINGBUF
    assert specs[reject.RING].max_entries == reject.RING_BYTES
    assert {p.chain for p in compiled.programs} == {"INPUT", "FORWARD", "OUTPUT"}
    assert all(p.needs.skb and p.needs.devices and p.needs.mark for p in compiled.programs)


def test_reject_codes() -> None:
    rs = parse_restore(FILTER.format("-A INPUT -j REJECT --reject-with icmp-admin-prohibited"))
    t = rs.tables[0].chains[0].rules[0].target
    assert t is not None and reject.reject_code(t, 4) == 13
    rs = parse_restore(FILTER.format("-A INPUT -j REJECT"), family=6)
    t = rs.tables[0].chains[0].rules[0].target
    assert t is not None and reject.reject_code(t, 6) == 4


def test_reject_refused_at_xdp() -> None:
    rs = parse_restore(FILTER.format("-A INPUT -j REJECT"))
    with pytest.raises(CompileError, match="line 5: target 'REJECT' .*XDP"):
        compile_ruleset(rs, 4, target=IfTarget(IfHook.XDP, "INPUT", "eth0"))


# --- rate limits ------------------------------------------------------------------------------

def test_rate_limiter_per_peer_and_mask() -> None:
    lim = rr.RateLimiter(frozenset({3}), 1000)
    # A new peer may send six errors at once, then one a second.
    assert [lim.allow(3, A4, 100.0) for _ in range(7)] == [True] * 6 + [False]
    assert lim.allow(3, A4, 101.0) and not lim.allow(3, A4, 101.5)
    assert lim.allow(3, B4, 101.5)  # another peer has its own bucket
    assert lim.allow(8, A4, 101.5)  # types outside the mask are not limited
    assert lim.allow(3, A4, 101.5, loopback=True)
    assert all(rr.RateLimiter(frozenset({3}), 0).allow(3, A4, 1.0) for _ in range(40))


def test_parse_bitmap() -> None:
    assert rr.parse_bitmap("0-1,3-5\n") == frozenset({0, 1, 3, 4, 5})
    assert rr.parse_bitmap("") == frozenset()


def test_random_events_never_raise() -> None:
    """The responder must survive any packet: random bytes, truncations, every code."""
    import random

    rng = random.Random(7)
    seeds = [ip4(6, tcp(0x02)), ip4(17, udp()), ip4(1, struct.pack("!BBHI", 8, 0, 0, 0)),
             ip6(6, tcp(0x10)), ip6(17, udp()), ip6(0, struct.pack("!BB6x", 44, 0) +
                                                  _frag6(6, 0) + tcp(0x02))]
    for _ in range(3000):
        pkt = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(4)):
            pkt[rng.randrange(len(pkt))] = rng.randrange(256)
        pkt = pkt[:rng.randrange(len(pkt) + 1)]
        family = 4 if rng.random() < 0.5 else 6
        code = rng.choice([reject.TCP_RESET, *range(7)])
        o = rr.Original(family, rng.choice([NfHook.LOCAL_IN, NfHook.FORWARD, NfHook.LOCAL_OUT]),
                        code, bytes(pkt), len(pkt) + rng.choice([0, 0, 5, 3000]),
                        ip_summed=rng.randrange(4), csum=rng.randrange(1 << 32),
                        rt_flags=rng.choice([0, rr.RTCF_LOCAL]))
        r = rr.reply4(o) if family == 4 else rr.reply6(o)
        if r is not None:
            r.packet(src=bytes(4 if family == 4 else 16))
