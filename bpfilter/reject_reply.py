"""The reply iptables' REJECT sends for a packet: pure functions from a reject event to bytes.

Follows net/ipv4/netfilter/nf_reject_ipv4.c (nf_send_unreach, nf_send_reset),
net/ipv6/netfilter/nf_reject_ipv6.c (nf_send_unreach6, nf_send_reset6), the checks of
__icmp_send / icmp6_send that decide whether an ICMP error goes out at all, and
nf_ip_checksum / nf_ip6_checksum for "no reply to a packet with a bad checksum".

A ``Reply`` says what to send and which header fields the kernel fills in when the responder
sends it (bpfilter/responder.py): ``ttl=None`` is the route's hop limit, ``src=None`` the
route's preferred source (icmp_send with saddr 0), ``ip_id=None`` the kernel's ID generator.
``Reply.packet`` renders the whole IP packet with given values for those, for tests.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

from bpfilter.codegen import reject as layout
from bpfilter.codegen.uapi import NfHook

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
# nf_reject_verify_csum(): protocols whose checksum is not a plain 16-bit one's complement sum
# of the whole payload are not checked (UDP only when its checksum is zero, i.e. absent).
_NO_CSUM_CHECK = frozenset({47, 51, 50, 132, 136, 33})  # GRE AH ESP SCTP UDPLITE DCCP

ICMP_DEST_UNREACH = 3
NR_ICMP_TYPES = 18
ICMP_ERRORS = frozenset({3, 4, 5, 11, 12})  # icmp_pointers[].error
ICMPV6_DEST_UNREACH = 1
ICMPV6_INFOMSG_MASK = 0x80
IP_DF = 0x4000
IP_OFFSET = 0x1FFF
IPTOS_TOS_MASK = 0x1E
IPTOS_PREC_INTERNETCONTROL = 0xC0
ICMP_ROOM = 576  # an ICMPv4 error is at most 576 bytes (RFC 1812), quote included
IPV6_MIN_MTU = 1280
IPV4_HEADER = 20
IPV6_HEADER = 40
ICMP_HEADER = 8
TCP_HEADER = 20

RTCF_BROADCAST = 0x10000000
RTCF_MULTICAST = 0x20000000
RTCF_LOCAL = 0x80000000

CHECKSUM_NONE, CHECKSUM_UNNECESSARY, CHECKSUM_COMPLETE, CHECKSUM_PARTIAL = range(4)
PACKET_HOST = 0

TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10
_IPV6_EXT = frozenset({0, 43, 44, 51, 59, 60})  # ipv6_ext_hdr(): HOP ROUTING FRAG AUTH NONE DEST
_NEXTHDR_FRAGMENT, _NEXTHDR_AUTH, _NEXTHDR_NONE = 44, 51, 59


@dataclass(frozen=True, slots=True)
class Original:
    """The rejected packet as the event describes it."""

    family: int
    hook: NfHook
    code: int  # ICMP / ICMPv6 code, or layout.TCP_RESET
    packet: bytes  # from the network header; the first ``caplen`` bytes of the skb
    skb_len: int
    ip_summed: int = CHECKSUM_UNNECESSARY
    csum_valid: bool = False
    csum: int = 0  # skb->csum, meaningful with CHECKSUM_COMPLETE
    pkt_type: int = PACKET_HOST
    mark: int = 0
    rt_flags: int = RTCF_LOCAL  # IPv4: the route's RTCF_* flags
    in_dev: str = ""
    out_dev: str = ""

    @property
    def truncated(self) -> bool:
        return len(self.packet) < self.skb_len


@dataclass(frozen=True, slots=True)
class Reply:
    """One reply to send: an ICMP/ICMPv6 error or a TCP reset."""

    family: int
    proto: int  # IPPROTO_ICMP, IPPROTO_ICMPV6 or IPPROTO_TCP
    src: bytes | None  # None: the route's preferred source address
    dst: bytes
    payload: bytes  # the ICMP message or the TCP header, checksum filled in
    tos: int = 0  # IPv4 TOS / IPv6 traffic class
    ttl: int | None = None  # None: the route's hop limit, as the kernel's own sockets
    df: bool = False
    ip_id: int | None = None  # IPv4: 0 for a reset (DF set, no socket); None: generated
    flowlabel: int | None = None  # IPv6: 0 for a reset; None: the kernel's automatic label
    mark: int = 0
    oif: str = ""  # IPv6: the device a link-local destination is reached through

    def packet(self, src: bytes | None = None, ttl: int = 64, ip_id: int = 0,
               flowlabel: int = 0) -> bytes:
        """The whole IP packet, with ``src``/``ttl``/``ip_id``/``flowlabel`` standing in for
        what the kernel fills in when this reply leaves (ICMP checksums fixed up for ``src``)."""
        s = self.src if self.src is not None else src
        assert s is not None, "the reply's source is the route's: pass one"
        hop = self.ttl if self.ttl is not None else ttl
        payload = self.payload
        if self.src is None and self.proto == IPPROTO_ICMPV6:
            payload = _with_checksum(payload, 2, _pseudo6(s, self.dst, len(payload),
                                                          IPPROTO_ICMPV6))
        if self.family == 4:
            ident = self.ip_id if self.ip_id is not None else ip_id
            head = struct.pack("!BBHHHBBH4s4s", 0x45, self.tos, IPV4_HEADER + len(payload),
                               ident, IP_DF if self.df else 0, hop, self.proto, 0, s,
                               self.dst)
            return _with_checksum(head, 10, 0) + payload
        label = self.flowlabel if self.flowlabel is not None else flowlabel
        word = (6 << 28) | (self.tos << 20) | label
        return struct.pack("!IHBB16s16s", word, len(payload), self.proto, hop, s,
                           self.dst) + payload


# --- checksums -------------------------------------------------------------------------------

def ones_sum(data: bytes, start: int = 0) -> int:
    """The 16-bit one's complement sum of ``data`` added to ``start`` (not complemented)."""
    if len(data) % 2:
        data += b"\0"
    total = start + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def fold32(csum: int) -> int:
    """A 32-bit __wsum folded to 16 bits (not complemented)."""
    while csum > 0xFFFF:
        csum = (csum & 0xFFFF) + (csum >> 16)
    return csum


def _pseudo4(src: bytes, dst: bytes, length: int, proto: int) -> int:
    return ones_sum(src + dst + struct.pack("!HH", proto, length & 0xFFFF))


def _pseudo6(src: bytes, dst: bytes, length: int, proto: int) -> int:
    return ones_sum(src + dst + struct.pack("!II", length & 0xFFFFFFFF, proto))


def _with_checksum(data: bytes, at: int, start: int) -> bytes:
    zeroed = data[:at] + b"\0\0" + data[at + 2:]
    value = ~ones_sum(zeroed, start) & 0xFFFF
    return zeroed[:at] + struct.pack("!H", value) + zeroed[at + 2:]


def _csum_unnecessary(o: Original) -> bool:
    # skb_csum_unnecessary(); a CHECKSUM_PARTIAL skb's csum_start lies in it at these hooks.
    return o.ip_summed in (CHECKSUM_UNNECESSARY, CHECKSUM_PARTIAL) or o.csum_valid


def _checksum_ok(o: Original, dataoff: int, proto: int, pseudo: int | None) -> bool:
    """nf_ip_checksum / nf_ip6_checksum(skb, hook, dataoff, proto) == 0. ``pseudo`` is the
    pseudo-header sum the kernel seeds the check with (None: IPv4 non-TCP/UDP, no seed)."""
    if o.ip_summed not in (CHECKSUM_NONE, CHECKSUM_COMPLETE):
        return True
    if o.ip_summed == CHECKSUM_COMPLETE:
        if o.hook not in (NfHook.PRE_ROUTING, NfHook.LOCAL_IN):
            return True
        if o.family == 4:
            # skb->csum covers the packet from the IP header, whose own sum is 0xffff.
            if pseudo is None and fold32(o.csum) == 0xFFFF:
                return True
            if fold32(o.csum + _pseudo4(o.packet[12:16], o.packet[16:20],
                                        o.skb_len - dataoff, proto)) == 0xFFFF:
                return True
        else:
            assert pseudo is not None
            # csum_sub(skb->csum, sum of the headers) + the pseudo header.
            head = ones_sum(o.packet[:dataoff])
            if fold32(fold32(o.csum) + (~head & 0xFFFF) + pseudo) == 0xFFFF:
                return True
    if o.truncated:
        # The rest of the packet was not captured: the check cannot be redone here. Such
        # skbs (no checksum offload and larger than CAPTURE, or paged) are answered.
        return True
    if o.family == 4:
        # __skb_checksum_complete over the whole packet from the IP header.
        return ones_sum(o.packet[:o.skb_len], pseudo or 0) == 0xFFFF
    assert pseudo is not None
    return ones_sum(o.packet[dataoff:o.skb_len], pseudo) == 0xFFFF


def _verify_csum(o: Original, dataoff: int, proto: int) -> bool:
    """nf_reject_verify_csum()."""
    if proto == IPPROTO_UDP:
        check = o.packet[dataoff + 6:dataoff + 8]
        return len(check) < 2 or check != b"\0\0"
    return proto not in _NO_CSUM_CHECK


# --- IPv4 ------------------------------------------------------------------------------------

def _ihl(pkt: bytes) -> int:
    return (pkt[0] & 0x0F) * 4


def reply4(o: Original, *, default_ttl: int = 64, fwmark_reflect: bool = False,
           inbound_src: bytes | None = None) -> Reply | None:
    """What iptables' REJECT sends for IPv4 packet ``o``, or None when it sends nothing.

    ``default_ttl`` is the hop limit of the original's route (net.ipv4.ip_default_ttl unless
    the route sets one); ``inbound_src`` the address icmp_errors_use_inbound_ifaddr picks
    on a forwarded packet's input device (None when that sysctl is off).
    """
    pkt = o.packet
    # ip_rcv / __ip_local_out validated these for any packet a hook sees.
    if len(pkt) < IPV4_HEADER or not IPV4_HEADER <= _ihl(pkt) <= min(len(pkt), o.skb_len):
        return None
    frag_off = struct.unpack_from("!H", pkt, 6)[0]
    if frag_off & IP_OFFSET:
        return None
    mark = o.mark if fwmark_reflect else 0  # IP4_REPLY_MARK
    if o.code == layout.TCP_RESET:
        return _reset4(o, default_ttl, mark)
    return _unreach4(o, mark, inbound_src)


def _unreach4(o: Original, mark: int, inbound_src: bytes | None) -> Reply | None:
    pkt = o.packet
    ihl, proto = _ihl(pkt), pkt[9]
    # nf_send_unreach: a packet with a bad checksum gets no error.
    if not _csum_unnecessary(o) and _verify_csum(o, ihl, proto):
        seed = _pseudo4(pkt[12:16], pkt[16:20], o.skb_len - ihl, proto) \
            if proto in (IPPROTO_TCP, IPPROTO_UDP) else None
        if not _checksum_ok(o, ihl, proto, seed):
            return None
    # __icmp_send
    if o.pkt_type != PACKET_HOST:
        return None
    if o.rt_flags & (RTCF_BROADCAST | RTCF_MULTICAST):
        return None
    if proto == IPPROTO_ICMP:
        if len(pkt) <= ihl:
            return None
        if pkt[ihl] > NR_ICMP_TYPES or pkt[ihl] in ICMP_ERRORS:
            return None  # never an error about an error (or an unknown type)
    src: bytes | None = pkt[16:20] if o.rt_flags & RTCF_LOCAL else inbound_src
    tos = (pkt[1] & IPTOS_TOS_MASK) | IPTOS_PREC_INTERNETCONTROL
    room = ICMP_ROOM - IPV4_HEADER - ICMP_HEADER
    quote = pkt[:min(o.skb_len, room)]
    msg = _with_checksum(struct.pack("!BBHI", ICMP_DEST_UNREACH, o.code, 0, 0) + quote, 2, 0)
    return Reply(4, IPPROTO_ICMP, src, pkt[12:16], msg, tos=tos, mark=mark)


def _tcp_reset(sport: int, dport: int, seq: int, ack_seq: int, flags: int,
               datalen: int) -> bytes:
    """nf_reject_ip(6)_tcphdr_put with the checksum left zero: a 20-byte RST to a segment
    with ``datalen`` bytes of data. An ACK is answered from its acknowledgment number;
    anything else is acknowledged (SYN and FIN count one each), window and options empty."""
    if flags & TCP_ACK:
        return struct.pack("!HHIIBBHHH", dport, sport, ack_seq, 0, 5 << 4, TCP_RST, 0, 0, 0)
    ack = (seq + bool(flags & TCP_SYN) + bool(flags & TCP_FIN) + datalen) & 0xFFFFFFFF
    return struct.pack("!HHIIBBHHH", dport, sport, 0, ack, 5 << 4, TCP_RST | TCP_ACK, 0, 0, 0)


def _reset4(o: Original, ttl: int, mark: int) -> Reply | None:
    pkt = o.packet
    ihl = _ihl(pkt)
    # nf_reject_ip_tcphdr_get
    if pkt[9] != IPPROTO_TCP or len(pkt) < ihl + TCP_HEADER:
        return None
    sport, dport, seq, ack_seq, off, flags = struct.unpack_from("!HHIIBB", pkt, ihl)
    if flags & TCP_RST:
        return None
    seed = _pseudo4(pkt[12:16], pkt[16:20], o.skb_len - ihl, IPPROTO_TCP)
    if not _checksum_ok(o, ihl, IPPROTO_TCP, seed):
        return None
    # nf_send_reset
    if o.rt_flags & (RTCF_BROADCAST | RTCF_MULTICAST):
        return None
    src, dst = pkt[16:20], pkt[12:16]
    tcp = _tcp_reset(sport, dport, seq, ack_seq, flags, o.skb_len - ihl - ((off >> 4) << 2))
    tcp = _with_checksum(tcp, 16, _pseudo4(src, dst, TCP_HEADER, IPPROTO_TCP))
    return Reply(4, IPPROTO_TCP, src, dst, tcp, tos=0, ttl=ttl, df=True, ip_id=0, mark=mark)


# --- IPv6 ------------------------------------------------------------------------------------

def skip_exthdr(pkt: bytes, start: int, nexthdr: int) -> tuple[int, int, int]:
    """ipv6_skip_exthdr(): (offset of the upper-layer header or -1, its protocol, the
    fragment offset field seen on the way, host order)."""
    frag_off = 0
    while nexthdr in _IPV6_EXT:
        if nexthdr == _NEXTHDR_NONE or start + 2 > len(pkt):
            return -1, nexthdr, frag_off
        if nexthdr == _NEXTHDR_FRAGMENT:
            if start + 4 > len(pkt):
                return -1, nexthdr, frag_off
            frag_off = struct.unpack_from("!H", pkt, start + 2)[0]
            if frag_off & ~7:
                break
            hdrlen = 8
        elif nexthdr == _NEXTHDR_AUTH:
            hdrlen = (pkt[start + 1] + 2) << 2
        else:
            hdrlen = (pkt[start + 1] + 1) << 3
        nexthdr = pkt[start]
        start += hdrlen
    return start, nexthdr, frag_off


def _addr6(raw: bytes) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(raw)


def _unicast6(a: ipaddress.IPv6Address) -> bool:
    # ipv6_addr_type() & IPV6_ADDR_UNICAST: not ::, not multicast.
    return not a.is_unspecified and not a.is_multicast


def reply6(o: Original, *, local: frozenset[bytes] = frozenset(),
           fwmark_reflect: bool = False) -> Reply | None:
    """What ip6tables' REJECT sends for IPv6 packet ``o``, or None when it sends nothing.
    ``local`` holds the namespace's own addresses (icmp6_send answers from the original
    destination when it is one of them)."""
    pkt = o.packet
    if len(pkt) < IPV6_HEADER:
        return None
    mark = o.mark if fwmark_reflect else 0  # IP6_REPLY_MARK
    if o.code == layout.TCP_RESET:
        return _reset6(o, mark)
    return _unreach6(o, local, mark)


def _unreach6(o: Original, local: frozenset[bytes], mark: int) -> Reply | None:
    pkt = o.packet
    # reject6_csum_ok
    if not _csum_unnecessary(o):
        thoff, proto, fo = skip_exthdr(pkt, IPV6_HEADER, pkt[6])
        if thoff < 0 or thoff >= o.skb_len or fo & ~7:
            return None
        if _verify_csum(o, thoff, proto) and not _checksum_ok(
                o, thoff, proto, _pseudo6(pkt[8:24], pkt[24:40], o.skb_len - thoff, proto)):
            return None
    # icmp6_send
    saddr, daddr = _addr6(pkt[8:24]), _addr6(pkt[24:40])
    if daddr.is_multicast or o.pkt_type != PACKET_HOST:
        return None
    if saddr.is_unspecified or saddr.is_multicast:
        return None
    if _ineligible6(o):
        return None
    src = pkt[24:40] if pkt[24:40] in local else None
    oif = ""
    if saddr.is_link_local:  # __ipv6_addr_needs_scope_id: icmp6_iif(skb)
        oif = o.in_dev or o.out_dev
    quote = pkt[:min(o.skb_len, IPV6_MIN_MTU - IPV6_HEADER - ICMP_HEADER)]
    msg = struct.pack("!BBHI", ICMPV6_DEST_UNREACH, o.code, 0, 0) + quote
    if src is not None:
        msg = _with_checksum(msg, 2, _pseudo6(src, pkt[8:24], len(msg), IPPROTO_ICMPV6))
    return Reply(6, IPPROTO_ICMPV6, src, pkt[8:24], msg, tos=0, mark=mark, oif=oif)


def _ineligible6(o: Original) -> bool:
    """is_ineligible(): no ICMPv6 error about an ICMPv6 error."""
    pkt = o.packet
    ptr, nexthdr, frag_off = skip_exthdr(pkt, IPV6_HEADER, pkt[6])
    if ptr < 0:
        return False
    if nexthdr == IPPROTO_ICMPV6:
        readable = ptr < len(pkt) and ptr < o.skb_len
        if not readable and frag_off != 0:
            return False
        if not readable or not pkt[ptr] & ICMPV6_INFOMSG_MASK:
            return True
    return False


def _reset6(o: Original, mark: int) -> Reply | None:
    pkt = o.packet
    if not _unicast6(_addr6(pkt[8:24])) or not _unicast6(_addr6(pkt[24:40])):
        return None
    # nf_reject_ip6_tcphdr_get
    tcphoff, proto, _ = skip_exthdr(pkt, IPV6_HEADER, pkt[6])
    if tcphoff < 0 or tcphoff > o.skb_len:
        return None
    otcplen = o.skb_len - tcphoff
    if proto != IPPROTO_TCP or otcplen < TCP_HEADER or len(pkt) < tcphoff + TCP_HEADER:
        return None
    sport, dport, seq, ack_seq, off, flags = struct.unpack_from("!HHIIBB", pkt, tcphoff)
    if flags & TCP_RST:
        return None
    if not _checksum_ok(o, tcphoff, IPPROTO_TCP,
                        _pseudo6(pkt[8:24], pkt[24:40], otcplen, IPPROTO_TCP)):
        return None
    src, dst = pkt[24:40], pkt[8:24]
    tcp = _tcp_reset(sport, dport, seq, ack_seq, flags, otcplen - ((off >> 4) << 2))
    tcp = _with_checksum(tcp, 16, _pseudo6(src, dst, TCP_HEADER, IPPROTO_TCP))
    return Reply(6, IPPROTO_TCP, src, dst, tcp, tos=0, flowlabel=0, mark=mark)


# --- the event --------------------------------------------------------------------------------

_HEAD = struct.Struct("<BBBxIIIIIII")
assert _HEAD.size == layout.OFF_DST


@dataclass(frozen=True, slots=True)
class SkbBits:
    """Where pkt_type, ip_summed and csum_valid sit in the event's OFF_SKB_BITS word (bit
    offsets from BTF, relative to the byte holding pkt_type)."""

    pkt_type: int = 0
    ip_summed: int = 5
    csum_valid: int = 22


def parse_event(raw: bytes, bits: SkbBits = SkbBits()) -> Original:
    """A reject event record (codegen/reject's layout) as an Original."""
    (family, hook, code, skb_len, caplen, word, csum, mark, rt_flags,
     _data_len) = _HEAD.unpack_from(raw)
    def name(off: int) -> str:
        return raw[off:off + 16].split(b"\0", 1)[0].decode("ascii", "replace")
    caplen = min(caplen, layout.CAPTURE, max(0, len(raw) - layout.OFF_PKT))
    return Original(
        family, NfHook(hook) if hook in NfHook._value2member_map_ else NfHook.LOCAL_IN, code,
        raw[layout.OFF_PKT:layout.OFF_PKT + caplen], skb_len,
        ip_summed=(word >> bits.ip_summed) & 3, csum_valid=bool((word >> bits.csum_valid) & 1),
        csum=csum, pkt_type=(word >> bits.pkt_type) & 7, mark=mark, rt_flags=rt_flags,
        in_dev=name(layout.OFF_IN), out_dev=name(layout.OFF_OUT))


# --- ICMP rate limits -------------------------------------------------------------------------

XRLIM_BURST_FACTOR = 6  # inet_peer_xrlim_allow: a peer may save up six timeouts


def parse_bitmap(text: str) -> frozenset[int]:
    """A proc_do_large_bitmap value (net.ipv6.icmp.ratemask): ``0-1,3-127``."""
    out: set[int] = set()
    for part in text.replace("\n", "").split(","):
        if not part.strip():
            continue
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(out)


@dataclass(slots=True)
class RateLimiter:
    """The limits icmp_send / icmp6_send apply to the errors they send, for one family:
    types outside ``mask`` are never limited; the others take one credit of the namespace's
    bucket (``per_sec`` a second, at most ``burst``) and one token of their destination's
    bucket (one per ``timeout_ms``, at most XRLIM_BURST_FACTOR saved; a new peer starts
    full). Errors to the host itself (routed over loopback) are never limited.

    The kernel's global bucket is shared with the ICMP errors the kernel sends itself and
    consumes a random 0-2 credits per message; this one is the responder's own and
    consumes one."""

    mask: frozenset[int]
    timeout_ms: int
    per_sec: int = 1000
    burst: int = 50
    credit: float = 50.0
    stamp: float = 0.0
    peers: dict[bytes, tuple[float, float]] = field(default_factory=dict)

    def allow(self, icmp_type: int, peer: bytes, now: float, *, loopback: bool = False,
              scale: int = 0) -> bool:
        """Whether an error of ``icmp_type`` to ``peer`` may leave at ``now`` (seconds);
        ``scale`` shifts the peer timeout right (IPv6: (128 - route prefix length) >> 5)."""
        if icmp_type not in self.mask or loopback:
            return True
        if self.credit <= 0:
            delta = min(now - self.stamp, 1.0)
            if delta < 0.02:
                return False
            incr = int(self.per_sec * delta)
            if not incr:
                return False
            self.stamp = now
            self.credit = min(self.credit + incr, self.burst)
        timeout = (self.timeout_ms >> scale) / 1000.0
        tokens, last = self.peers.get(peer, (XRLIM_BURST_FACTOR * timeout, now))
        tokens = min(tokens + (now - last), XRLIM_BURST_FACTOR * timeout)
        ok = tokens >= timeout
        if ok:
            tokens -= timeout
            self.credit -= 1
        self.peers[peer] = (tokens, now)
        if len(self.peers) > 65536:
            self.peers.clear()  # as inetpeer's garbage collection, roughly
        return ok
