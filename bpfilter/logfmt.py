"""LOG/NFLOG events -> the kernel's LOG line (nf_log_syslog.c), as dmesg shows it, and JSON.

Pure: bytes in, text out. The line is what the kernel's ``nf_log_ip_packet`` /
``nf_log_ip6_packet`` print after the syslog marker: ``<prefix>IN=.. OUT=.. `` then the MAC
header (only with an input device), then ``dump_ipv4_packet`` / ``dump_ipv6_packet``, with
the same field order, spelling, number formats and trailing space. Where the kernel's
``skb_header_pointer`` would fail because the packet is short, this prints the same
``INCOMPLETE [N bytes]`` / ``TRUNCATED`` markers; where only bpfilter's capture is short (a
packet whose headers were not in the skb's linear part, or longer than the capture), the line
ends with `` [bpfilter: N bytes not captured]`` rather than a guess.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Any

from bpfilter.codegen import log as rec
from bpfilter.codegen.uapi import NfHook

LEVEL_NAMES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")

ARPHRD_ETHER = 1
ARPHRD_SIT = 776
ETH_HLEN = 14
VLAN_VID_MASK = 0x0FFF

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ESP = 50
IPPROTO_AH = 51
IPPROTO_ICMPV6 = 58
IPPROTO_UDPLITE = 136
# nf_ip6_ext_hdr(): the IPv6 extension headers the LOG walk steps over.
IPV6_HOPOPTS, IPV6_ROUTING, IPV6_FRAGMENT, IPV6_NONE, IPV6_DSTOPTS = 0, 43, 44, 59, 60
IPV6_EXT_HDRS = frozenset({IPV6_HOPOPTS, IPV6_ROUTING, IPV6_FRAGMENT, IPPROTO_ESP, IPPROTO_AH,
                           IPV6_NONE, IPV6_DSTOPTS})

IP_CE, IP_DF, IP_MF, IP_OFFSET = 0x8000, 0x4000, 0x2000, 0x1FFF
IPTOS_TOS_MASK, IPTOS_PREC_MASK = 0x1E, 0xE0

# dump_ipv4_packet's required_len[]: ICMP bytes a type needs before its fields are printed.
ICMP_REQUIRED = {0: 4, 3: 28, 4: 28, 5: 28, 8: 4, 11: 28, 12: 28, 13: 20, 14: 20, 17: 12, 18: 12}
NR_ICMP_TYPES = 18
ICMP_ECHOREPLY, ICMP_DEST_UNREACH, ICMP_SOURCE_QUENCH, ICMP_REDIRECT = 0, 3, 4, 5
ICMP_ECHO, ICMP_TIME_EXCEEDED, ICMP_PARAMETERPROB = 8, 11, 12
ICMP_FRAG_NEEDED = 4
ICMPV6_DEST_UNREACH, ICMPV6_PKT_TOOBIG, ICMPV6_TIME_EXCEED, ICMPV6_PARAMPROB = 1, 2, 3, 4
ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY = 128, 129
ICMPV6_MGM_QUERY, ICMPV6_MGM_REPORT, ICMPV6_MGM_REDUCTION = 130, 131, 132
TCP_HEADER, UDP_HEADER, ICMP_HEADER, IPV4_HEADER, IPV6_HEADER = 20, 8, 8, 20, 40


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class LogEvent:
    """One record of the ``log_events`` ring (layout: codegen/log)."""

    ts_ns: int
    table: str
    chain: str
    position: int
    hook: int
    family: int
    kind: int  # rec.KIND_LOG / rec.KIND_NFLOG
    level: int
    flags: int
    group: int
    copy_len: int
    threshold: int
    prefix: str
    skb_len: int
    mark: int
    indev: str
    outdev: str
    data_len: int
    mac_header: int
    network_header: int
    dev_type: int
    hard_header_len: int
    vlan_all: int
    uid: int | None  # fsuid and fsgid of the socket (--log-uid), None when not printed
    gid: int | None
    mac: bytes
    packet: bytes  # the captured bytes from the network header on

    @classmethod
    def parse(cls, raw: bytes) -> LogEvent:
        if len(raw) < rec.RECORD_SIZE:
            raise ValueError(f"log record of {len(raw)} bytes, expected {rec.RECORD_SIZE}")

        def u(off: int, fmt: str) -> int:
            return int(struct.unpack_from("<" + fmt, raw, off)[0])

        caplen = min(u(rec.OFF_CAPLEN, "I"), rec.CAPTURE)
        return cls(
            ts_ns=u(rec.OFF_TS, "Q"),
            table=_cstr(raw[rec.OFF_TABLE:rec.OFF_TABLE + rec.TABLE_MAX]),
            chain=_cstr(raw[rec.OFF_CHAIN:rec.OFF_CHAIN + rec.CHAIN_MAX]),
            position=u(rec.OFF_RULE, "I"), hook=u(rec.OFF_HOOK, "B"),
            family=u(rec.OFF_FAMILY, "B"), kind=u(rec.OFF_KIND, "B"),
            level=u(rec.OFF_LEVEL, "B"), flags=u(rec.OFF_FLAGS, "B"),
            group=u(rec.OFF_GROUP, "H"), copy_len=u(rec.OFF_COPY_LEN, "I"),
            threshold=u(rec.OFF_THRESHOLD, "H"),
            prefix=_cstr(raw[rec.OFF_PREFIX:rec.OFF_PREFIX + rec.PREFIX_MAX]),
            skb_len=u(rec.OFF_SKB_LEN, "I"), mark=u(rec.OFF_MARK, "I"),
            indev=_cstr(raw[rec.OFF_IN:rec.OFF_IN + 16]),
            outdev=_cstr(raw[rec.OFF_OUT:rec.OFF_OUT + 16]),
            data_len=u(rec.OFF_DATA_LEN, "I"), mac_header=u(rec.OFF_MAC_HEADER, "H"),
            network_header=u(rec.OFF_NETWORK_HEADER, "H"), dev_type=u(rec.OFF_DEV_TYPE, "H"),
            hard_header_len=u(rec.OFF_HH_LEN, "H"), vlan_all=u(rec.OFF_VLAN, "I"),
            uid=u(rec.OFF_UID, "I") if u(rec.OFF_UID_OK, "I") else None,
            gid=u(rec.OFF_GID, "I") if u(rec.OFF_UID_OK, "I") else None,
            mac=raw[rec.OFF_MAC:rec.OFF_MAC + rec.MAC_MAX],
            packet=raw[rec.OFF_PKT:rec.OFF_PKT + caplen],
        )

    @property
    def target(self) -> str:
        return "NFLOG" if self.kind == rec.KIND_NFLOG else "LOG"

    @property
    def logflags(self) -> int:
        """The flags the formatter applies: LOG's own; NFLOG (not a LOG type) gets
        NF_LOG_DEFAULT_MASK as the kernel's dump functions give non-LOG loggers."""
        return self.flags if self.kind == rec.KIND_LOG else NF_LOG_DEFAULT_MASK


NF_LOG_DEFAULT_MASK = 0x0F


class _NotCaptured(Exception):
    """The packet has the bytes but the capture does not."""

    def __init__(self, need: int) -> None:
        self.need = need


class _Packet:
    """skb_header_pointer() over the captured bytes of a packet of ``length`` bytes."""

    def __init__(self, data: bytes, length: int) -> None:
        self.data = data
        self.length = length

    def get(self, offset: int, size: int) -> bytes | None:
        """The bytes, or None where the kernel's skb_header_pointer fails (short packet)."""
        if offset + size > self.length:
            return None
        if offset + size > len(self.data):
            raise _NotCaptured(offset + size)
        return self.data[offset:offset + size]


class _Line:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.fields: dict[str, Any] = {}

    def add(self, text: str, **fields: Any) -> None:
        self.parts.append(text)
        for k, v in fields.items():
            self.fields.setdefault(k, v)

    def text(self) -> str:
        return "".join(self.parts)


def _mac_hex(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def _dump_mac(out: _Line, ev: LogEvent) -> None:
    """dump_mac_header(): ``skb->dev`` is the input device at the hooks that have one."""
    was_set = ev.mac_header != rec.MAC_UNSET
    mac_len = (ev.network_header - ev.mac_header) & 0xFFFF if was_set else 0
    if ev.kind == rec.KIND_LOG and ev.flags & rec.LOG_MACDECODE and ev.dev_type == ARPHRD_ETHER:
        if not was_set or mac_len < ETH_HLEN:
            return
        dst, src, proto = ev.mac[0:6], ev.mac[6:12], struct.unpack_from("!H", ev.mac, 12)[0]
        out.add(f"MACSRC={_mac_hex(src)} MACDST={_mac_hex(dst)} ", macsrc=_mac_hex(src),
                macdst=_mac_hex(dst))
        if ev.vlan_all:
            vproto = struct.unpack_from("!H", ev.vlan_all.to_bytes(4, "little"), 0)[0]
            tci = ev.vlan_all >> 16
            out.add(f"VPROTO={vproto:04x} VID={tci & VLAN_VID_MASK} ")
        out.add(f"MACPROTO={proto:04x} ", macproto=f"{proto:04x}")
        return
    out.add("MAC=")
    if ev.hard_header_len and was_set and mac_len != 0:
        n = ev.hard_header_len
        # A sit tunnel: the bytes start ETH_HLEN before the MAC header (none when that is
        # before skb->head: mac_header < ETH_HLEN), and
        # the outer IPv4 header at the MAC header follows as TUNNEL=.
        sit = ev.dev_type == ARPHRD_SIT
        shifted = sit and ev.mac_header >= ETH_HLEN
        if not sit or shifted:
            if n > len(ev.mac):
                raise _NotCaptured(0)
            out.add(_mac_hex(ev.mac[:n]), mac=_mac_hex(ev.mac[:n]))
        if sit:
            at = ETH_HLEN if shifted else 0
            out.add(f" TUNNEL={_ip4(ev.mac[at + 12:at + 16])}->{_ip4(ev.mac[at + 16:at + 20])}")
    out.add(" ")


def _ip4(a: bytes) -> str:
    return str(ipaddress.IPv4Address(a))


def _ip6(a: bytes) -> str:
    # %pI6 prints all eight groups, four hex digits each, no compression.
    return ":".join(f"{g:04x}" for g in struct.unpack("!8H", a))


def _tcp(out: _Line, pkt: _Packet, fragment: bool, offset: int, logflags: int) -> bool:
    """nf_log_dump_tcp_header(); True when the caller must stop (the kernel returns 1)."""
    out.add("PROTO=TCP ", proto="TCP")
    if fragment:
        return False
    th = pkt.get(offset, TCP_HEADER)
    if th is None:
        out.add(f"INCOMPLETE [{pkt.length - offset} bytes] ")
        return True
    sport, dport, seq, ack = struct.unpack_from("!HHII", th, 0)
    out.add(f"SPT={sport} DPT={dport} ", spt=sport, dpt=dport)
    if logflags & rec.LOG_TCPSEQ:
        out.add(f"SEQ={seq} ACK={ack} ", seq=seq, ack=ack)
    window, urgp = struct.unpack_from("!H", th, 14)[0], struct.unpack_from("!H", th, 18)[0]
    out.add(f"WINDOW={window} ", window=window)
    word = struct.unpack_from("!I", th, 12)[0]
    out.add(f"RES=0x{(word & 0x0E000000) >> 22:02x} ")
    names = []
    for bit, name in ((0x01000000, "AE"), (0x00800000, "CWR"), (0x00400000, "ECE"),
                      (0x00200000, "URG"), (0x00100000, "ACK"), (0x00080000, "PSH"),
                      (0x00040000, "RST"), (0x00020000, "SYN"), (0x00010000, "FIN")):
        if word & bit:
            names.append(name)
            out.add(f"{name} ")
    out.add(f"URGP={urgp} ", tcp_flags=names)
    doff = th[12] >> 4
    if logflags & rec.LOG_TCPOPT and doff * 4 > TCP_HEADER:
        size = doff * 4 - TCP_HEADER
        op = pkt.get(offset + TCP_HEADER, size)
        if op is None:
            out.add("OPT (TRUNCATED)")
            return True
        out.add("OPT (" + "".join(f"{b:02X}" for b in op) + ") ")
    return False


def _udp(out: _Line, pkt: _Packet, proto: int, fragment: bool, offset: int) -> bool:
    name = "UDP" if proto == IPPROTO_UDP else "UDPLITE"
    out.add(f"PROTO={name} ", proto=name)
    if fragment:
        return False
    uh = pkt.get(offset, UDP_HEADER)
    if uh is None:
        out.add(f"INCOMPLETE [{pkt.length - offset} bytes] ")
        return True
    sport, dport, length = struct.unpack_from("!HHH", uh, 0)
    out.add(f"SPT={sport} DPT={dport} LEN={length} ", spt=sport, dpt=dport)
    return False


def _ipv4(out: _Line, ev: LogEvent, pkt: _Packet, iphoff: int) -> None:
    """dump_ipv4_packet()."""
    logflags = ev.logflags
    ih = pkt.get(iphoff, IPV4_HEADER)
    if ih is None:
        out.add("TRUNCATED")
        return
    tos, tot_len, ident, frag_off, ttl, proto = struct.unpack_from("!xBHHHBB", ih, 0)
    src, dst = _ip4(ih[12:16]), _ip4(ih[16:20])
    out.add(f"SRC={src} DST={dst} ", src=src, dst=dst)
    # iph_totlen(): tot_len, except 0 for a BIG TCP GSO packet (then skb->len).
    length = tot_len or max(pkt.length - iphoff, 0)
    out.add(f"LEN={length} TOS=0x{tos & IPTOS_TOS_MASK:02X} PREC=0x{tos & IPTOS_PREC_MASK:02X} "
            f"TTL={ttl} ID={ident} ", len=length, ttl=ttl, id=ident)
    if frag_off & IP_CE:
        out.add("CE ")
    if frag_off & IP_DF:
        out.add("DF ")
    if frag_off & IP_MF:
        out.add("MF ")
    if frag_off & IP_OFFSET:
        out.add(f"FRAG:{frag_off & IP_OFFSET} ", frag=frag_off & IP_OFFSET)
    ihl = (ih[0] & 0x0F) * 4
    if logflags & rec.LOG_IPOPT and ihl > IPV4_HEADER:
        op = pkt.get(iphoff + IPV4_HEADER, ihl - IPV4_HEADER)
        if op is None:
            out.add("TRUNCATED")
            return
        out.add("OPT (" + "".join(f"{b:02X}" for b in op) + ") ")
    fragment = bool(frag_off & IP_OFFSET)
    l4 = iphoff + ihl
    if proto == IPPROTO_TCP:
        if _tcp(out, pkt, fragment, l4, logflags):
            return
    elif proto in (IPPROTO_UDP, IPPROTO_UDPLITE):
        if _udp(out, pkt, proto, fragment, l4):
            return
    elif proto == IPPROTO_ICMP:
        if _icmp4(out, ev, pkt, iphoff, l4, fragment):
            return
    elif proto == IPPROTO_AH:
        if not fragment:
            out.add("PROTO=AH ", proto="AH")
            ah = pkt.get(l4, 12)
            if ah is None:
                out.add(f"INCOMPLETE [{pkt.length - l4} bytes] ")
            else:
                out.add(f"SPI=0x{struct.unpack_from('!I', ah, 4)[0]:x} ")
    elif proto == IPPROTO_ESP:
        out.add("PROTO=ESP ", proto="ESP")
        if not fragment:
            eh = pkt.get(l4, 8)
            if eh is None:
                out.add(f"INCOMPLETE [{pkt.length - l4} bytes] ")
            else:
                out.add(f"SPI=0x{struct.unpack_from('!I', eh, 0)[0]:x} ")
    else:
        out.add(f"PROTO={proto} ", proto=proto)
    if iphoff == 0:
        _uid(out, ev)
    if iphoff == 0 and ev.mark:
        out.add(f"MARK=0x{ev.mark:x} ", mark=ev.mark)


def _uid(out: _Line, ev: LogEvent) -> None:
    if ev.logflags & rec.LOG_UID and ev.uid is not None:
        out.add(f"UID={ev.uid} GID={ev.gid} ", uid=ev.uid, gid=ev.gid)


def _icmp4(out: _Line, ev: LogEvent, pkt: _Packet, iphoff: int, l4: int,
           fragment: bool) -> bool:
    """The ICMP case of dump_ipv4_packet(); True where the kernel's ``break`` leaves the
    switch (then UID/MARK still follow), False likewise: both continue. Never stops."""
    out.add("PROTO=ICMP ", proto="ICMP")
    if fragment:
        return False
    ich = pkt.get(l4, ICMP_HEADER)
    if ich is None:
        out.add(f"INCOMPLETE [{pkt.length - l4} bytes] ")
        return False
    kind, code = ich[0], ich[1]
    out.add(f"TYPE={kind} CODE={code} ", type=kind, code=code)
    need = ICMP_REQUIRED.get(kind, 0) if kind <= NR_ICMP_TYPES else 0
    if need and pkt.length - l4 < need:
        out.add(f"INCOMPLETE [{pkt.length - l4} bytes] ")
        return False
    if kind in (ICMP_ECHOREPLY, ICMP_ECHO):
        ident, seq = struct.unpack_from("!HH", ich, 4)
        out.add(f"ID={ident} SEQ={seq} ", icmp_id=ident, icmp_seq=seq)
    elif kind == ICMP_PARAMETERPROB:
        out.add(f"PARAMETER={ich[4]} ")
    elif kind in (ICMP_REDIRECT, ICMP_DEST_UNREACH, ICMP_SOURCE_QUENCH, ICMP_TIME_EXCEEDED):
        if kind == ICMP_REDIRECT:
            out.add(f"GATEWAY={_ip4(ich[4:8])} ")
        if iphoff == 0:
            out.add("[")
            _ipv4(out, ev, pkt, l4 + ICMP_HEADER)
            out.add("] ")
        if kind == ICMP_DEST_UNREACH and code == ICMP_FRAG_NEEDED:
            out.add(f"MTU={struct.unpack_from('!H', ich, 6)[0]} ")
    return False


def _ipv6(out: _Line, ev: LogEvent, pkt: _Packet, ip6hoff: int, recurse: bool) -> None:
    """dump_ipv6_packet()."""
    logflags = ev.logflags
    ih = pkt.get(ip6hoff, IPV6_HEADER)
    if ih is None:
        out.add("TRUNCATED")
        return
    first, payload, nexthdr, hoplimit = struct.unpack_from("!IHBB", ih, 0)
    src, dst = _ip6(ih[8:24]), _ip6(ih[24:40])
    out.add(f"SRC={src} DST={dst} ", src=src, dst=dst)
    out.add(f"LEN={payload + IPV6_HEADER} TC={(first & 0x0FF00000) >> 20} HOPLIMIT={hoplimit} "
            f"FLOWLBL={first & 0x000FFFFF} ", len=payload + IPV6_HEADER, hoplimit=hoplimit)
    fragment = False
    ptr = ip6hoff + IPV6_HEADER
    current = nexthdr
    ipopt = bool(logflags & rec.LOG_IPOPT)
    while current != IPV6_NONE and current in IPV6_EXT_HDRS:
        hp = pkt.get(ptr, 2)
        if hp is None:
            out.add("TRUNCATED")
            return
        if ipopt:
            out.add("OPT ( ")
        if current == IPV6_FRAGMENT:
            out.add("FRAG:")
            fh = pkt.get(ptr, 8)
            if fh is None:
                out.add("TRUNCATED ")
                return
            frag_off, ident = struct.unpack_from("!HI", fh, 2)
            out.add(f"{frag_off & 0xFFF8} ")
            if frag_off & 0x0001:
                out.add("INCOMPLETE ")
            out.add(f"ID:{ident:08x} ")
            if frag_off & 0xFFF8:
                fragment = True
            hdrlen = 8
        elif current in (IPV6_DSTOPTS, IPV6_ROUTING, IPV6_HOPOPTS):
            if fragment:
                if ipopt:
                    out.add(")")
                return
            hdrlen = (hp[1] + 1) << 3
        elif current == IPPROTO_AH:
            if ipopt:
                out.add("AH ")
                if fragment:
                    out.add(")")
                    return
                ah = pkt.get(ptr, 12)
                if ah is None:
                    out.add(f"INCOMPLETE [{pkt.length - ptr} bytes] )")
                    return
                out.add(f"SPI=0x{struct.unpack_from('!I', ah, 4)[0]:x} ")
            hdrlen = (hp[1] + 2) << 2
        elif current == IPPROTO_ESP:
            if ipopt:
                out.add("ESP ")
                if fragment:
                    out.add(")")
                    return
                eh = pkt.get(ptr, 8)
                if eh is None:
                    out.add(f"INCOMPLETE [{pkt.length - ptr} bytes] )")
                    return
                out.add(f"SPI=0x{struct.unpack_from('!I', eh, 0)[0]:x} )")
            return
        else:
            out.add(f"Unknown Ext Hdr {current}")
            return
        if ipopt:
            out.add(") ")
        current = hp[0]
        ptr += hdrlen
    if current == IPPROTO_TCP:
        if _tcp(out, pkt, fragment, ptr, logflags):
            return
    elif current in (IPPROTO_UDP, IPPROTO_UDPLITE):
        if _udp(out, pkt, current, fragment, ptr):
            return
    elif current == IPPROTO_ICMPV6:
        out.add("PROTO=ICMPv6 ", proto="ICMPv6")
        if not fragment:
            ic = pkt.get(ptr, ICMP_HEADER)
            if ic is None:
                out.add(f"INCOMPLETE [{pkt.length - ptr} bytes] ")
                return
            kind, code = ic[0], ic[1]
            out.add(f"TYPE={kind} CODE={code} ", type=kind, code=code)
            if kind in (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY):
                ident, seq = struct.unpack_from("!HH", ic, 4)
                out.add(f"ID={ident} SEQ={seq} ", icmp_id=ident, icmp_seq=seq)
            elif kind in (ICMPV6_PARAMPROB, ICMPV6_DEST_UNREACH, ICMPV6_PKT_TOOBIG,
                          ICMPV6_TIME_EXCEED):
                if kind == ICMPV6_PARAMPROB:
                    out.add(f"POINTER={struct.unpack_from('!I', ic, 4)[0]:08x} ")
                if recurse:
                    out.add("[")
                    _ipv6(out, ev, pkt, ptr + ICMP_HEADER, False)
                    out.add("] ")
                if kind == ICMPV6_PKT_TOOBIG:
                    out.add(f"MTU={struct.unpack_from('!I', ic, 4)[0]} ")
    else:
        out.add(f"PROTO={current} ", proto=current)
    if recurse:
        _uid(out, ev)
    if recurse and ev.mark:
        out.add(f"MARK=0x{ev.mark:x} ", mark=ev.mark)


def render(ev: LogEvent) -> tuple[str, dict[str, Any]]:
    """The kernel's LOG line for ``ev`` (without the syslog level marker) and the fields of
    the outer packet it shows."""
    out = _Line()
    out.add(f"{ev.prefix}IN={ev.indev} OUT={ev.outdev} ")
    pkt = _Packet(ev.packet, ev.skb_len)
    try:
        if ev.indev:
            _dump_mac(out, ev)
        if ev.family == 4:
            _ipv4(out, ev, pkt, 0)
        else:
            _ipv6(out, ev, pkt, 0, True)
    except _NotCaptured:
        out.add(f"[bpfilter: {ev.skb_len - len(ev.packet)} bytes not captured]")
    return out.text(), out.fields


def format_line(ev: LogEvent) -> str:
    """The kernel's LOG line for ``ev``."""
    return render(ev)[0]


def _hook_name(hook: int) -> str:
    try:
        return NfHook(hook).name
    except ValueError:
        return str(hook)


def to_json(ev: LogEvent) -> dict[str, Any]:
    """A JSON-ready description of ``ev``: the rule, the line, the packet's fields."""
    line, fields = render(ev)
    doc: dict[str, Any] = {
        "time_ns": ev.ts_ns, "target": ev.target, "table": ev.table, "chain": ev.chain,
        "rule": ev.position, "hook": _hook_name(ev.hook), "family": ev.family,
        "prefix": ev.prefix, "in": ev.indev, "out": ev.outdev, "mark": ev.mark,
        "length": ev.skb_len, "captured": len(ev.packet), "line": line, "fields": fields,
    }
    if ev.kind == rec.KIND_NFLOG:
        size = len(ev.packet) if ev.copy_len == rec.NO_COPY_LEN else min(ev.copy_len,
                                                                          len(ev.packet))
        doc.update(group=ev.group, threshold=ev.threshold,
                   size=None if ev.copy_len == rec.NO_COPY_LEN else ev.copy_len,
                   payload=ev.packet[:size].hex())
    else:
        doc.update(level=ev.level, level_name=LEVEL_NAMES[ev.level & 7],
                   flags=[n for n, b in rec.LOG_FLAG_OPTIONS.items() if ev.flags & b])
    return doc
