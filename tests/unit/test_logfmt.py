"""bpfilter.logfmt: LOG events -> the kernel's LOG line, checked against lines derived by hand
from net/netfilter/nf_log_syslog.c (dump_mac_header, dump_ipv4_packet, dump_ipv6_packet,
nf_log_dump_tcp_header, nf_log_dump_udp_header) for crafted packets; the record parser
against the layout codegen/log writes."""

from __future__ import annotations

import dataclasses
import ipaddress
import struct

import pytest

from bpfilter import logfmt
from bpfilter.codegen import log as rec
from bpfilter.codegen.uapi import NfHook

A4, B4 = "198.18.0.1", "198.18.0.2"
A6, B6 = "2001:db8::1", "2001:db8::2"
MAC_A, MAC_B = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
ETH_IP = MAC_B + MAC_A + b"\x08\x00"


def ip4(proto: int, payload: bytes, *, src: str = A4, dst: str = B4, tos: int = 0,
        ident: int = 1, frag: int = 0x4000, ttl: int = 64, opts: bytes = b"",
        tot_len: int | None = None) -> bytes:
    ihl = 5 + len(opts) // 4
    length = 4 * ihl + len(payload) if tot_len is None else tot_len
    return struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos, length, ident, frag, ttl, proto, 0,
                       ipaddress.IPv4Address(src).packed,
                       ipaddress.IPv4Address(dst).packed) + opts + payload


def ip6(nexthdr: int, payload: bytes, *, src: str = A6, dst: str = B6, tc: int = 0,
        flow: int = 0, hlim: int = 64) -> bytes:
    return struct.pack("!IHBB16s16s", (6 << 28) | (tc << 20) | flow, len(payload), nexthdr,
                       hlim, ipaddress.IPv6Address(src).packed,
                       ipaddress.IPv6Address(dst).packed) + payload


def tcp(sport: int = 40000, dport: int = 22, seq: int = 1000, ack: int = 0,
        flags: int = 0x02, window: int = 512, urgp: int = 0, opts: bytes = b"",
        res: int = 0) -> bytes:
    doff = (20 + len(opts)) // 4
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (doff << 4) | res, flags, window,
                       0, urgp) + opts


def udp(sport: int = 5000, dport: int = 53, payload: bytes = b"abcd") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def event(packet: bytes, *, family: int = 4, indev: str = "veth-b", outdev: str = "",
          prefix: str = "", flags: int = 0, kind: int = rec.KIND_LOG, mark: int = 0,
          mac: bytes = ETH_IP, skb_len: int | None = None, capture: int | None = None,
          dev_type: int = logfmt.ARPHRD_ETHER, vlan_all: int = 0,
          uid: int | None = None) -> logfmt.LogEvent:
    return logfmt.LogEvent(
        ts_ns=1, table="filter", chain="INPUT", position=1, hook=int(NfHook.LOCAL_IN),
        family=family, kind=kind, level=4, flags=flags, group=0, copy_len=rec.NO_COPY_LEN,
        threshold=1, prefix=prefix, skb_len=len(packet) if skb_len is None else skb_len,
        mark=mark, indev=indev, outdev=outdev, data_len=0, mac_header=64,
        network_header=64 + len(mac), dev_type=dev_type, hard_header_len=len(mac),
        vlan_all=vlan_all, uid=uid, gid=None if uid is None else uid + 1,
        mac=mac.ljust(rec.MAC_MAX, b"\0"),
        packet=packet if capture is None else packet[:capture])


MAC_TEXT = "MAC=02:00:00:00:00:02:02:00:00:00:00:01:08:00 "
HEAD4 = f"IN=veth-b OUT= {MAC_TEXT}SRC={A4} DST={B4} "


def test_icmp_echo() -> None:
    pkt = ip4(1, struct.pack("!BBHHH", 8, 0, 0, 77, 5) + b"x" * 8, ident=4321)
    assert logfmt.format_line(event(pkt, prefix="ping: ")) == (
        f"ping: {HEAD4}LEN=36 TOS=0x00 PREC=0x00 TTL=64 ID=4321 DF PROTO=ICMP TYPE=8 CODE=0 "
        "ID=77 SEQ=5 ")


def test_tcp_flags_seq_options_and_ip_options() -> None:
    # TOS 0xb8: TOS bits 0x18, precedence 0xa0; options as upper-case hex without spaces.
    pkt = ip4(6, tcp(flags=0x02 | 0x40, opts=bytes([2, 4, 5, 0xB4, 1, 1, 4, 2])),
              opts=bytes([1, 1, 1, 0]), tos=0xB8, ident=9)
    flags = rec.LOG_TCPSEQ | rec.LOG_TCPOPT | rec.LOG_IPOPT
    assert logfmt.format_line(event(pkt, flags=flags)) == (
        f"{HEAD4}LEN=52 TOS=0x18 PREC=0xA0 TTL=64 ID=9 DF OPT (01010100) PROTO=TCP "
        "SPT=40000 DPT=22 SEQ=1000 ACK=0 WINDOW=512 RES=0x00 ECE SYN URGP=0 "
        "OPT (020405B401010402) ")


def test_tcp_without_flags_options_hidden_and_all_flag_names() -> None:
    # The AE bit (low bit of byte 12) is a flag of its own; RES shows the other three bits.
    pkt = ip4(6, tcp(flags=0xFF, res=0x0F, urgp=7, opts=b"\x01" * 4))
    assert logfmt.format_line(event(pkt)) == (
        f"{HEAD4}LEN=44 TOS=0x00 PREC=0x00 TTL=64 ID=1 DF PROTO=TCP SPT=40000 DPT=22 "
        "WINDOW=512 RES=0x38 AE CWR ECE URG ACK PSH RST SYN FIN URGP=7 ")


def test_udp_macdecode_mark_ce_mf() -> None:
    pkt = ip4(17, udp(), frag=0x8000 | 0x2000)
    line = logfmt.format_line(event(pkt, flags=rec.LOG_MACDECODE, mark=0x2A))
    assert line == (
        "IN=veth-b OUT= MACSRC=02:00:00:00:00:01 MACDST=02:00:00:00:00:02 MACPROTO=0800 "
        f"SRC={A4} DST={B4} LEN=32 TOS=0x00 PREC=0x00 TTL=64 ID=1 CE MF PROTO=UDP SPT=5000 "
        "DPT=53 LEN=12 MARK=0x2a ")


def test_uid_before_mark_only_with_the_flag() -> None:
    pkt = ip4(17, udp())
    tail = "PROTO=UDP SPT=5000 DPT=53 LEN=12 "
    assert logfmt.format_line(event(pkt, uid=1000, flags=rec.LOG_UID, mark=1)).endswith(
        tail + "UID=1000 GID=1001 MARK=0x1 ")
    assert logfmt.format_line(event(pkt, uid=1000, mark=1)).endswith(tail + "MARK=0x1 ")
    assert logfmt.format_line(event(pkt, flags=rec.LOG_UID)).endswith(tail)


def test_vlan_tag_with_macdecode() -> None:
    # skb->vlan_all: vlan_proto (network order) then vlan_tci; VID is tci & 0xfff.
    vlan = int.from_bytes(b"\x81\x00" + struct.pack("<H", 0x2005), "little")
    line = logfmt.format_line(event(ip4(17, udp()), flags=rec.LOG_MACDECODE, vlan_all=vlan))
    assert "MACDST=02:00:00:00:00:02 VPROTO=8100 VID=5 MACPROTO=0800 " in line


def test_no_input_device_no_mac() -> None:
    pkt = ip4(17, udp())
    assert logfmt.format_line(event(pkt, indev="", outdev="veth-a")).startswith(
        f"IN= OUT=veth-a SRC={A4} ")


def test_mac_header_not_set_prints_empty_mac() -> None:
    ev = dataclasses.replace(event(ip4(17, udp())), mac_header=rec.MAC_UNSET)
    assert logfmt.format_line(ev).startswith(f"IN=veth-b OUT= MAC= SRC={A4} ")


def test_sit_tunnel_mac_and_tunnel_addresses() -> None:
    # codegen/log captures from ETH_HLEN before the MAC header of a sit device.
    outer = ip4(41, b"", src="192.0.2.1", dst="192.0.2.2")
    mac = bytes(range(14)) + outer
    ev = dataclasses.replace(event(ip4(17, udp()), mac=mac, dev_type=logfmt.ARPHRD_SIT),
                             hard_header_len=14, mac_header=64, network_header=84)
    assert logfmt.format_line(ev).startswith(
        "IN=veth-b OUT= MAC=00:01:02:03:04:05:06:07:08:09:0a:0b:0c:0d "
        f"TUNNEL=192.0.2.1->192.0.2.2 SRC={A4} ")


def test_later_fragment_has_no_ports() -> None:
    pkt = ip4(6, b"\0" * 16, frag=0x0003)
    assert logfmt.format_line(event(pkt)) == (
        f"{HEAD4}LEN=36 TOS=0x00 PREC=0x00 TTL=64 ID=1 FRAG:3 PROTO=TCP ")


def test_incomplete_tcp_stops_before_mark() -> None:
    # nf_log_dump_tcp_header() returns 1: dump_ipv4_packet returns before MARK.
    pkt = ip4(6, tcp()[:12], ident=5)
    assert logfmt.format_line(event(pkt, mark=1)) == (
        f"{HEAD4}LEN=32 TOS=0x00 PREC=0x00 TTL=64 ID=5 DF PROTO=TCP INCOMPLETE [12 bytes] ")


def test_icmp_error_quotes_inner_packet_once() -> None:
    inner = ip4(17, udp(53, 5000), src=B4, dst=A4, ident=99)
    pkt = ip4(1, struct.pack("!BBHHH", 3, 4, 0, 0, 1400) + inner, tos=0xC0, ident=7)
    assert logfmt.format_line(event(pkt, mark=3)) == (
        f"{HEAD4}LEN=60 TOS=0x00 PREC=0xC0 TTL=64 ID=7 DF PROTO=ICMP TYPE=3 CODE=4 "
        f"[SRC={B4} DST={A4} LEN=32 TOS=0x00 PREC=0x00 TTL=64 ID=99 DF PROTO=UDP SPT=53 "
        "DPT=5000 LEN=12 ] MTU=1400 MARK=0x3 ")


def test_icmp_shorter_than_required_length() -> None:
    # A destination unreachable needs 8 + 20 bytes (required_len[]).
    pkt = ip4(1, struct.pack("!BBHHH", 3, 1, 0, 0, 0) + b"\0" * 4)
    assert logfmt.format_line(event(pkt)).endswith(
        "PROTO=ICMP TYPE=3 CODE=1 INCOMPLETE [12 bytes] ")


def test_other_protocols() -> None:
    assert logfmt.format_line(event(ip4(47, b"\0" * 8))).endswith(" DF PROTO=47 ")
    esp = ip4(50, struct.pack("!II", 0x1234ABCD, 1))
    assert logfmt.format_line(event(esp)).endswith(" DF PROTO=ESP SPI=0x1234abcd ")


def test_ipv6_icmp_echo() -> None:
    pkt = ip6(58, struct.pack("!BBHHH", 128, 0, 0, 9, 2) + b"x" * 4, tc=0x12, flow=0xABCDE)
    mac = MAC_B + MAC_A + b"\x86\xdd"
    assert logfmt.format_line(event(pkt, family=6, mac=mac, prefix="v6 ")) == (
        "v6 IN=veth-b OUT= MAC=02:00:00:00:00:02:02:00:00:00:00:01:86:dd "
        "SRC=2001:0db8:0000:0000:0000:0000:0000:0001 DST=2001:0db8:0000:0000:0000:0000:0000:0002 "
        f"LEN=52 TC=18 HOPLIMIT=64 FLOWLBL={0xABCDE} PROTO=ICMPv6 TYPE=128 CODE=0 ID=9 SEQ=2 ")


def test_ipv6_extension_headers_with_ip_options() -> None:
    hop = struct.pack("!BB", 44, 0) + b"\x01\x04\0\0\0\0"
    frag = struct.pack("!BBHI", 17, 0, (0 << 3) | 1, 0xBEEF)
    pkt = ip6(0, hop + frag + udp(), hlim=1)
    line = logfmt.format_line(event(pkt, family=6, indev="", flags=rec.LOG_IPOPT))
    assert line.endswith(
        "LEN=68 TC=0 HOPLIMIT=1 FLOWLBL=0 OPT ( ) OPT ( FRAG:0 INCOMPLETE ID:0000beef ) "
        "PROTO=UDP SPT=5000 DPT=53 LEN=12 ")
    assert logfmt.format_line(event(pkt, family=6, indev="")).endswith(
        "FLOWLBL=0 FRAG:0 INCOMPLETE ID:0000beef PROTO=UDP SPT=5000 DPT=53 LEN=12 ")


def test_ipv6_later_fragment_and_unreachable_quote() -> None:
    frag = struct.pack("!BBHI", 6, 0, 185 << 3, 7)
    line = logfmt.format_line(event(ip6(44, frag + b"\0" * 8), family=6, indev=""))
    assert line.endswith("FRAG:1480 ID:00000007 PROTO=TCP ")
    inner = ip6(17, udp(), src=B6, dst=A6)
    err = ip6(58, struct.pack("!BBHI", 1, 4, 0, 0) + inner)
    line = logfmt.format_line(event(err, family=6, indev=""))
    assert "PROTO=ICMPv6 TYPE=1 CODE=4 [SRC=2001:0db8:0000:0000:0000:0000:0000:0002 " in line
    assert line.endswith("PROTO=UDP SPT=5000 DPT=53 LEN=12 ] ")


def test_truncated_packet_and_short_capture() -> None:
    assert logfmt.format_line(event(b"\x45" * 10, indev="")) == "IN= OUT= TRUNCATED"
    # The packet has the TCP header but the capture stopped before it: said, not guessed.
    pkt = ip4(6, tcp())
    line = logfmt.format_line(event(pkt, capture=24, indev=""))
    assert line.endswith("PROTO=TCP [bpfilter: 16 bytes not captured]")


def test_json_fields_and_nflog() -> None:
    pkt = ip4(17, udp())
    doc = logfmt.to_json(event(pkt, prefix="p "))
    assert doc["target"] == "LOG" and doc["level_name"] == "warning"
    assert doc["hook"] == "LOCAL_IN" and doc["chain"] == "INPUT" and doc["rule"] == 1
    f = doc["fields"]
    assert (f["src"], f["dst"], f["proto"], f["spt"], f["dpt"]) == (A4, B4, "UDP", 5000, 53)
    nf = dataclasses.replace(event(pkt), kind=rec.KIND_NFLOG, group=7, copy_len=10)
    doc = logfmt.to_json(nf)
    assert doc["target"] == "NFLOG" and doc["group"] == 7 and doc["size"] == 10
    assert doc["payload"] == pkt[:10].hex()


def test_parse_reads_the_layout_codegen_writes() -> None:
    raw = bytearray(rec.RECORD_SIZE)
    pkt = ip4(17, udp())

    def put(off: int, fmt: str, value: int) -> None:
        struct.pack_into("<" + fmt, raw, off, value)

    put(rec.OFF_TS, "Q", 123)
    put(rec.OFF_RULE, "I", 3)
    put(rec.OFF_HOOK, "B", int(NfHook.FORWARD))
    put(rec.OFF_FAMILY, "B", 4)
    put(rec.OFF_KIND, "B", rec.KIND_NFLOG)
    put(rec.OFF_GROUP, "H", 5)
    put(rec.OFF_SKB_LEN, "I", len(pkt))
    put(rec.OFF_CAPLEN, "I", len(pkt))
    put(rec.OFF_MAC_HEADER, "H", rec.MAC_UNSET)
    raw[rec.OFF_PREFIX:rec.OFF_PREFIX + 3] = b"abc"
    raw[rec.OFF_TABLE:rec.OFF_TABLE + 3] = b"raw"
    raw[rec.OFF_CHAIN:rec.OFF_CHAIN + 5] = b"CHAIN"
    raw[rec.OFF_IN:rec.OFF_IN + 2] = b"e0"
    raw[rec.OFF_PKT:rec.OFF_PKT + len(pkt)] = pkt
    ev = logfmt.LogEvent.parse(bytes(raw))
    assert (ev.ts_ns, ev.position, ev.hook, ev.kind, ev.group, ev.prefix, ev.table, ev.chain,
            ev.indev, ev.packet) == (123, 3, NfHook.FORWARD, rec.KIND_NFLOG, 5, "abc", "raw",
                                      "CHAIN", "e0", pkt)
    with pytest.raises(ValueError):
        logfmt.LogEvent.parse(bytes(10))
