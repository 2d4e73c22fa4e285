"""REJECT against iptables-legacy with real packets: the same ruleset in two namespace pairs
with the same addresses, one filtered by iptables-legacy, the other by bpfilter (and its
responder); crafted TCP SYNs, UDP datagrams and ICMP echoes from side a, the replies captured
on a's veth with a packet socket and compared byte for byte.

Fields that legitimately differ are masked: the IPv4 id of an ICMP error (ip_select_ident's
per-destination generator, salted per boot), hence the IPv4 header checksum, and the IPv6
flow label of an ICMPv6 error (automatic flow labels hash the flow with a per-namespace random
secret). A TCP reset's id (0) and flow label (0) are compared.
"""

from __future__ import annotations

import contextlib
import ipaddress
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpfilter import netns, responder, testbed
from bpfilter import reject_reply as rr
from bpfilter.reject_reply import ones_sum

BIN = Path(sys.executable).parent
TIMEOUT = 60

# The reference: scripts/dev.sh installs it; without it these tests have nothing to compare.
pytestmark = pytest.mark.skipif(
    shutil.which("iptables-legacy-restore") is None
    or shutil.which("ip6tables-legacy-restore") is None, reason="iptables-legacy missing")
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SOL_PACKET = 263
PACKET_AUXDATA = 8
TP_STATUS_CSUMNOTREADY = 8  # the skb is CHECKSUM_PARTIAL: its checksum field is not final
WAIT = 1.0  # seconds to wait for a reply that should come
QUIET = 0.3  # seconds to wait for a reply that should not

V4_TYPES = ("icmp-net-unreachable", "icmp-host-unreachable", "icmp-proto-unreachable",
            "icmp-port-unreachable", "icmp-net-prohibited", "icmp-host-prohibited",
            "icmp-admin-prohibited")
V6_TYPES = ("icmp6-no-route", "icmp6-adm-prohibited", "icmp6-addr-unreachable",
            "icmp6-port-unreachable", "icmp6-policy-fail", "icmp6-reject-route")
TCP_RESET_PORT = 1000
TCP_ICMP_PORT = 1001
UDP_BASE = 2000  # UDP port UDP_BASE + i: the i-th reject type


def ruleset(family: int) -> str:
    types = V4_TYPES if family == 4 else V6_TYPES
    # Echo requests only: neighbour discovery must get through.
    icmp = ("icmp -m icmp --icmp-type echo-request" if family == 4
            else "ipv6-icmp -m icmp6 --icmpv6-type echo-request")
    lines = [f"-A INPUT -p tcp -m tcp --dport {TCP_RESET_PORT} -j REJECT --reject-with tcp-reset",
             f"-A INPUT -p tcp -m tcp --dport {TCP_ICMP_PORT} -j REJECT"]
    lines += [f"-A INPUT -p udp -m udp --dport {UDP_BASE + i} -j REJECT --reject-with {t}"
              for i, t in enumerate(types)]
    lines += [f"-A INPUT -p {icmp} -j REJECT"]
    return ("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            + "".join(line + "\n" for line in lines) + "COMMIT\n")


def _sysctls(ns: str) -> None:
    # The kernel's ICMP rate limits off, so every probe is answered on both sides.
    for k, v in (("net.ipv4.icmp_ratelimit", "0"), ("net.ipv6.icmp.ratelimit", "0"),
                 ("net.ipv4.icmp_ratemask", "0")):
        testbed.run(ns, ["sysctl", "-qw", f"{k}={v}"])


@contextlib.contextmanager
def _pairs() -> Iterator[tuple[testbed.NetnsPair, testbed.NetnsPair]]:
    subnet = testbed.random_subnet()
    with testbed.netns_pair("bpfrj", subnet) as ipt, testbed.netns_pair("bpfrj", subnet) as ours:
        try:
            yield ipt, ours
        finally:
            subprocess.run([str(BIN / "bpfilter"), "flush", "--netns", ours.b],
                           capture_output=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def loaded() -> Iterator[tuple[testbed.NetnsPair, testbed.NetnsPair]]:
    """Both pairs with the v4 and v6 rulesets in force in side b."""
    with _pairs() as (ipt, ours):
        for p in (ipt, ours):
            _sysctls(p.a)
            _sysctls(p.b)
        for family in (4, 6):
            tool = "ip6tables-legacy-restore" if family == 6 else "iptables-legacy-restore"
            r = subprocess.run(["ip", "netns", "exec", ipt.b, tool], input=ruleset(family),
                               capture_output=True, text=True, timeout=TIMEOUT)
            if r.returncode != 0:
                pytest.fail(f"the reference refused the ruleset: {tool}: {r.stderr.strip()}")
            tool = "bpfilter6-restore" if family == 6 else "bpfilter-restore"
            r = subprocess.run([str(BIN / tool), "--netns", ours.b], input=ruleset(family),
                               capture_output=True, text=True, timeout=TIMEOUT)
            assert r.returncode == 0, r.stderr
        yield ipt, ours


# --- probes -----------------------------------------------------------------------------------

def _addr(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def _l4(family: int, proto: int, src: bytes, dst: bytes, body: bytes, at: int) -> bytes:
    length = len(body)
    pseudo = (src + dst + struct.pack("!HH", proto, length) if family == 4
              else src + dst + struct.pack("!II", length, proto))
    if family == 4 and proto == 1:
        pseudo = b""
    csum = ~ones_sum(body[:at] + b"\0\0" + body[at + 2:], ones_sum(pseudo)) & 0xFFFF
    return body[:at] + struct.pack("!H", csum) + body[at + 2:]


def probe(family: int, kind: str, src: str, dst: str, port: int = 0, flags: int = 0x02,
          payload: bytes = b"bpfilter-reject") -> bytes:
    """A whole IP packet: kind "tcp" (flags), "udp" or "icmp" (an echo request)."""
    s, d = _addr(src), _addr(dst)
    if kind == "tcp":
        proto = 6
        body = _l4(family, proto, s, d, struct.pack("!HHIIBBHHH", 40000, port, 0x1000,
                                                     0x2000 if flags & 0x10 else 0, 5 << 4,
                                                     flags, 1024, 0, 0) + payload, 16)
    elif kind == "udp":
        proto = 17
        body = _l4(family, proto, s, d, struct.pack("!HHHH", 40001, port, 8 + len(payload), 0)
                   + payload, 6)
    else:
        proto = 1 if family == 4 else 58
        body = _l4(family, proto, s, d, struct.pack("!BBHHH", 8 if family == 4 else 128, 0, 0,
                                                     0x77, 1) + payload, 2)
    if family == 4:
        head = struct.pack("!BBHHHBBH4s4s", 0x45, 0x10, 20 + len(body), 0x4242, 0x4000, 64,
                           proto, 0, s, d)
        head = head[:10] + struct.pack("!H", ~ones_sum(head) & 0xFFFF) + head[12:]
        return head + body
    return struct.pack("!IHBB16s16s", 6 << 28 | 0x12345, len(body), proto, 64, s, d) + body


def exchange(pair: testbed.NetnsPair, family: int, packet: bytes) -> list[bytes]:
    """Send ``packet`` from side a; the IP packets a receives on its veth within WAIT."""
    with netns.entered(pair.a):
        cap = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        tx = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_RAW,
                           socket.IPPROTO_RAW)
    with cap, tx:
        cap.bind((pair.if_a, 0))
        cap.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        dst = str(ipaddress.ip_address(packet[16:20] if family == 4 else packet[24:40]))
        tx.sendto(packet, (dst, 0))
        out = []
        deadline = time.monotonic() + WAIT
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([cap], [], [], left)
            if not ready:
                break
            data, anc, _, addr = cap.recvmsg(65535, socket.CMSG_SPACE(32))
            if addr[2] == PACKET_OUTGOING or (data[0] >> 4) != family:
                continue
            status = next((struct.unpack_from("I", d)[0] for lvl, kind, d in anc
                           if (lvl, kind) == (SOL_PACKET, PACKET_AUXDATA)), 0)
            if status & TP_STATUS_CSUMNOTREADY:
                data = finalized(family, data)
            if family == 6 and (data[24] == 0xFF or data[6] == 58 and 133 <= data[40] <= 137):
                continue  # neighbour discovery and MLD
            out.append(data)
            deadline = min(deadline, time.monotonic() + QUIET)  # a second one would be a bug
        return out


def finalized(family: int, packet: bytes) -> bytes:
    """A CHECKSUM_PARTIAL packet (a veth passes it on so) with the transport checksum filled
    in as a NIC would: the field holds the pseudo-header sum, the sum of the segment is due."""
    hdr = (packet[0] & 0x0F) * 4 if family == 4 else 40
    proto = packet[9] if family == 4 else packet[6]
    at = hdr + {6: 16, 17: 6, 58: 2}[proto]
    total = ~ones_sum(packet[hdr:]) & 0xFFFF
    if proto == 17 and total == 0:
        total = 0xFFFF  # UDP sends a zero sum as all ones
    return packet[:at] + struct.pack("!H", total) + packet[at + 2:]


def masked(family: int, reply: bytes) -> bytes:
    """``reply`` with the fields that legitimately differ zeroed (see the module doc)."""
    b = bytearray(reply)
    if family == 4 and b[9] == 1:
        b[4:6] = b"\0\0"
        b[10:12] = b"\0\0"
    if family == 6 and b[6] == 58:
        b[1] &= 0xF0
        b[2:4] = b"\0\0"
    return bytes(b)


def _compare(loaded: tuple[testbed.NetnsPair, testbed.NetnsPair], family: int,
             packet: bytes) -> bytes:
    ipt, ours = loaded
    want = exchange(ipt, family, packet)
    got = exchange(ours, family, packet)
    assert len(want) == 1, f"iptables sent {len(want)} replies"
    assert [masked(family, g) for g in got] == [masked(family, want[0])]
    return want[0]


CASES4 = ([("tcp", TCP_RESET_PORT, 0x02), ("tcp", TCP_RESET_PORT, 0x10),
           ("tcp", TCP_RESET_PORT, 0x11), ("tcp", TCP_ICMP_PORT, 0x02)]
          + [("udp", UDP_BASE + i, 0) for i in range(len(V4_TYPES))] + [("icmp", 0, 0)])
CASES6 = ([("tcp", TCP_RESET_PORT, 0x02), ("tcp", TCP_RESET_PORT, 0x10),
           ("tcp", TCP_RESET_PORT, 0x11), ("tcp", TCP_ICMP_PORT, 0x02)]
          + [("udp", UDP_BASE + i, 0) for i in range(len(V6_TYPES))] + [("icmp", 0, 0)])


@pytest.mark.parametrize(("kind", "port", "flags"), CASES4)
def test_ipv4_replies_match_iptables(loaded: tuple[testbed.NetnsPair, testbed.NetnsPair],
                                     kind: str, port: int, flags: int) -> None:
    ipt, _ = loaded
    reply = _compare(loaded, 4, probe(4, kind, ipt.ipv4_a, ipt.ipv4_b, port, flags))
    assert reply[9] == (6 if port == TCP_RESET_PORT else 1)


@pytest.mark.parametrize(("kind", "port", "flags"), CASES6)
def test_ipv6_replies_match_ip6tables(loaded: tuple[testbed.NetnsPair, testbed.NetnsPair],
                                      kind: str, port: int, flags: int) -> None:
    ipt, _ = loaded
    reply = _compare(loaded, 6, probe(6, kind, ipt.ipv6_a, ipt.ipv6_b, port, flags))
    assert reply[6] == (6 if port == TCP_RESET_PORT else 58)


def test_long_datagram_quote_is_cut_as_the_kernel_cuts_it(
        loaded: tuple[testbed.NetnsPair, testbed.NetnsPair]) -> None:
    ipt, _ = loaded
    r4 = _compare(loaded, 4, probe(4, "udp", ipt.ipv4_a, ipt.ipv4_b, UDP_BASE + 3,
                                   payload=bytes(range(256)) * 5))
    assert len(r4) == 576
    r6 = _compare(loaded, 6, probe(6, "udp", ipt.ipv6_a, ipt.ipv6_b, UDP_BASE + 3,
                                   payload=bytes(range(256)) * 5))
    assert len(r6) == 1280


@pytest.mark.parametrize("family", [4, 6])
def test_no_reply_to_a_reset_or_an_icmp_error(
        loaded: tuple[testbed.NetnsPair, testbed.NetnsPair], family: int) -> None:
    ipt, ours = loaded
    a, b = (ipt.ipv4_a, ipt.ipv4_b) if family == 4 else (ipt.ipv6_a, ipt.ipv6_b)
    rst = probe(family, "tcp", a, b, TCP_RESET_PORT, flags=0x04)
    err = bytearray(probe(family, "icmp", a, b))
    hdr = 20 if family == 4 else 40
    err[hdr] = 3 if family == 4 else 1  # destination unreachable: an error, not a request
    s, d = (err[12:20], 20) if family == 4 else (err[8:40], 40)
    del s, d
    for packet in (rst, bytes(err)):
        assert exchange(ipt, family, packet) == [] == exchange(ours, family, packet)


def test_status_shows_the_responder_and_flush_stops_it() -> None:
    with _pairs() as (_, ours):
        r = subprocess.run([str(BIN / "bpfilter-restore"), "--netns", ours.b], input=ruleset(4),
                           capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr
        pid = responder.running(ours.b)
        assert pid is not None
        st = subprocess.run([str(BIN / "bpfilter"), "status", "--netns", ours.b],
                            capture_output=True, text=True, timeout=TIMEOUT)
        assert f"REJECT responder: running, pid {pid}" in st.stdout
        # Killed, it is started again by the next loading command.
        subprocess.run(["kill", "-9", str(pid)], check=True)
        time.sleep(0.1)
        st = subprocess.run([str(BIN / "bpfilter"), "status", "--netns", ours.b],
                            capture_output=True, text=True, timeout=TIMEOUT)
        assert "REJECT responder: NOT RUNNING" in st.stdout
        r = subprocess.run([str(BIN / "bpfilter-restore"), "--netns", ours.b], input=ruleset(4),
                           capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr
        again = responder.running(ours.b)
        assert again is not None and again != pid
        r = subprocess.run([str(BIN / "bpfilter"), "flush", "--netns", ours.b],
                           capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr
        assert responder.running(ours.b) is None


# --- OUTPUT: the host rejects its own packets --------------------------------------------------

OUTPUT_RULES = ("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
                "-A OUTPUT -p udp -m udp --dport 3000 -j REJECT\n"
                "-A OUTPUT -p udp -m udp --dport 3002 -j REJECT --reject-with {host}\n"
                "-A OUTPUT -p tcp -m tcp --dport 3001 -j REJECT --reject-with tcp-reset\n"
                "COMMIT\n")


def _output_case(pair: testbed.NetnsPair, family: int, kind: str,
                 port: int) -> tuple[int, int, list[bytes]]:
    """From side b to side a: the error the sending socket sees, the error a second call
    sees, and the replies captured on b's loopback."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    dst = pair.ipv4_a if family == 4 else pair.ipv6_a
    with netns.entered(pair.b):
        cap = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        s = socket.socket(af, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
    with cap, s:
        cap.bind(("lo", 0))
        cap.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        s.settimeout(WAIT * 3)
        first = second = 0
        try:
            if kind == "udp":
                s.connect((dst, port))
                s.send(b"bpfilter-output")
            else:
                s.connect((dst, port))
        except OSError as e:
            first = e.errno or -1
        if kind == "udp":
            try:
                s.recv(100)
            except OSError as e:
                second = e.errno or -1
        out = []
        while select.select([cap], [], [], QUIET)[0]:
            data, anc, _, addr = cap.recvmsg(65535, socket.CMSG_SPACE(32))
            if addr[2] == PACKET_OUTGOING or (data[0] >> 4) != family:
                continue
            status = next((struct.unpack_from("I", d)[0] for lvl, k, d in anc
                           if (lvl, k) == (SOL_PACKET, PACKET_AUXDATA)), 0)
            out.append(finalized(family, data) if status & TP_STATUS_CSUMNOTREADY else data)
        return first, second, out


def masked_output(family: int, reply: bytes) -> bytes:
    """``masked``, and also what a socket picks at random in the original: its IP id (and
    the header checksum) or IPv6 flow label, its source port, a SYN's initial sequence
    number, and the checksums that cover them."""
    b = bytearray(masked(family, reply))
    hdr = 20 if family == 4 else 40
    if b[9 if family == 4 else 6] == 6:  # a reset: to the ephemeral port, acking the ISN
        b[hdr + 2:hdr + 4] = b[hdr + 16:hdr + 18] = b"\0\0"
        b[hdr + 8:hdr + 12] = bytes(4)
        return bytes(b)
    b[hdr + 2:hdr + 4] = b"\0\0"  # the ICMP checksum covers the quote
    q = hdr + 8
    if family == 4:
        b[q + 4:q + 6] = b[q + 10:q + 12] = b"\0\0"
        q += 20
    else:
        b[q + 1] &= 0xF0  # the automatic flow label of the original
        b[q + 2:q + 4] = b"\0\0"
        q += 40
    b[q:q + 2] = b[q + 6:q + 8] = b"\0\0"  # UDP source port and checksum
    return bytes(b)


@pytest.mark.parametrize("family", [4, 6])
def test_output_rejects_match_iptables(family: int) -> None:
    host = "icmp-host-unreachable" if family == 4 else "icmp6-addr-unreachable"
    with _pairs() as (ipt, ours):
        for p in (ipt, ours):
            _sysctls(p.b)
        restore = "ip6tables-legacy-restore" if family == 6 else "iptables-legacy-restore"
        r = subprocess.run(["ip", "netns", "exec", ipt.b, restore],
                           input=OUTPUT_RULES.format(host=host), capture_output=True,
                           text=True, timeout=TIMEOUT)
        if r.returncode != 0:
            pytest.fail(f"the reference refused the ruleset: {restore}: {r.stderr.strip()}")
        tool = "bpfilter6-restore" if family == 6 else "bpfilter-restore"
        r = subprocess.run([str(BIN / tool), "--netns", ours.b],
                           input=OUTPUT_RULES.format(host=host), capture_output=True,
                           text=True, timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr
        for kind, port in (("udp", 3000), ("udp", 3002), ("tcp", 3001)):
            want = _output_case(ipt, family, kind, port)
            got = _output_case(ours, family, kind, port)
            assert want[:2] == got[:2], (kind, port)
            assert want[0] or want[1], "iptables' reject reached no socket"
            assert [masked_output(family, g) for g in got[2]] == \
                [masked_output(family, w) for w in want[2]]


# --- FORWARD: a router rejects what it would forward ------------------------------------------

FORWARD_RULES = ("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
                 "-A FORWARD -p udp -m udp --dport 4000 -j REJECT\n"
                 "-A FORWARD -p udp -m udp --dport 4002 -j REJECT --reject-with {other}\n"
                 "-A FORWARD -p tcp -m tcp --dport 4001 -j REJECT --reject-with tcp-reset\n"
                 "COMMIT\n")


@contextlib.contextmanager
def _routed(s1: testbed.Subnet, s2: testbed.Subnet) -> Iterator[tuple[testbed.NetnsPair, str]]:
    """a -- router -- server: pair one's b routes between pair one's a and the far end of
    pair two, whose a-end moves into the router. Yields pair one and the server namespace."""
    with testbed.netns_pair("bpfrj", s1) as left, testbed.netns_pair("bpfrj", s2) as right:
        router, server = left.b, right.b
        testbed.run(right.a, ["ip", "link", "set", right.if_a, "netns", router])
        for cmd in (["ip", "addr", "add", f"{s2.ipv4(1)}/24", "dev", right.if_a],
                    ["ip", "addr", "add", f"{s2.ipv6(1)}/64", "dev", right.if_a, "nodad"],
                    ["ip", "link", "set", right.if_a, "up"],
                    ["sysctl", "-qw", "net.ipv4.ip_forward=1"],
                    ["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]):
            testbed.run(router, cmd)
        testbed.run(left.a, ["ip", "route", "add", f"{s2.ipv4(0)}/24", "via", s1.ipv4(2)])
        testbed.run(left.a, ["ip", "-6", "route", "add", f"{s2.ipv6(0)}/64", "via", s1.ipv6(2)])
        testbed.run(server, ["ip", "route", "add", f"{s1.ipv4(0)}/24", "via", s2.ipv4(1)])
        testbed.run(server, ["ip", "-6", "route", "add", f"{s1.ipv6(0)}/64", "via",
                             s2.ipv6(1)])
        for ns in (left.a, router, server):
            _sysctls(ns)
        try:
            yield left, server
        finally:
            subprocess.run([str(BIN / "bpfilter"), "flush", "--netns", router],
                           capture_output=True, timeout=TIMEOUT)


@pytest.mark.parametrize("family", [4, 6])
def test_forward_rejects_match_iptables(family: int) -> None:
    s1 = testbed.random_subnet()
    s2 = testbed.Subnet((s1.index + 1) % testbed.SUBNETS)
    other = "icmp-net-prohibited" if family == 4 else "icmp6-adm-prohibited"
    text = FORWARD_RULES.format(other=other)
    with _routed(s1, s2) as (ipt, _), _routed(s1, s2) as (ours, _):
        restore = "ip6tables-legacy-restore" if family == 6 else "iptables-legacy-restore"
        r = subprocess.run(["ip", "netns", "exec", ipt.b, restore], input=text,
                           capture_output=True, text=True, timeout=TIMEOUT)
        if r.returncode != 0:
            pytest.fail(f"the reference refused the ruleset: {restore}: {r.stderr.strip()}")
        tool = "bpfilter6-restore" if family == 6 else "bpfilter-restore"
        r = subprocess.run([str(BIN / tool), "--netns", ours.b], input=text,
                           capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr
        src = s1.ipv4(1) if family == 4 else s1.ipv6(1)
        dst = s2.ipv4(2) if family == 4 else s2.ipv6(2)
        for kind, port, flags in (("udp", 4000, 0), ("udp", 4002, 0), ("tcp", 4001, 0x02),
                                  ("tcp", 4001, 0x10)):
            packet = probe(family, kind, src, dst, port, flags)
            want = exchange(ipt, family, packet)
            got = exchange(ours, family, packet)
            assert len(want) == 1, (kind, port, flags)
            assert [masked(family, g) for g in got] == [masked(family, want[0])]
            # The reset claims to come from the server; the ICMP error from the router.
            reply_src = want[0][12:16] if family == 4 else want[0][8:24]
            router = s1.ipv4(2) if family == 4 else s1.ipv6(2)
            assert reply_src == _addr(dst if kind == "tcp" else router)


# --- rate limits --------------------------------------------------------------------------------

def _burst(pair: testbed.NetnsPair, family: int, packets: list[bytes]) -> int:
    """Send ``packets`` back to back from side a; how many ICMP errors come back."""
    with netns.entered(pair.a):
        cap = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        tx = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_RAW,
                           socket.IPPROTO_RAW)
    with cap, tx:
        cap.bind((pair.if_a, 0))
        dst = str(ipaddress.ip_address(packets[0][16:20] if family == 4 else packets[0][24:40]))
        for p in packets:
            tx.sendto(p, (dst, 0))
        errors = 0
        deadline = time.monotonic() + WAIT
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([cap], [], [], left)[0]:
                break
            data, addr = cap.recvfrom(65535)
            if addr[2] == PACKET_OUTGOING or (data[0] >> 4) != family:
                continue
            if (data[9] == 1 and data[20] == 3) if family == 4 else (
                    data[6] == 58 and data[40] == 1):
                errors += 1
        return errors


@pytest.mark.parametrize("family", [4, 6])
def test_default_icmp_rate_limits_match(family: int) -> None:
    """With the kernel's default limits a new peer gets XRLIM_BURST_FACTOR errors at once."""
    with _pairs() as (ipt, ours):
        for p in (ipt, ours):
            testbed.run(p.b, ["sysctl", "-qw", "net.ipv4.icmp_ratelimit=1000"])
        text = ruleset(family)
        restore = "ip6tables-legacy-restore" if family == 6 else "iptables-legacy-restore"
        r = subprocess.run(["ip", "netns", "exec", ipt.b, restore], input=text,
                           capture_output=True, text=True, timeout=TIMEOUT)
        if r.returncode != 0:
            pytest.fail(f"the reference refused the ruleset: {restore}: {r.stderr.strip()}")
        tool = "bpfilter6-restore" if family == 6 else "bpfilter-restore"
        r = subprocess.run([str(BIN / tool), "--netns", ours.b], input=text,
                           capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr
        a, b = (ipt.ipv4_a, ipt.ipv4_b) if family == 4 else (ipt.ipv6_a, ipt.ipv6_b)
        packets = [probe(family, "udp", a, b, UDP_BASE + 3, payload=bytes([i]) * 8)
                   for i in range(10)]
        want = _burst(ipt, family, packets)
        assert want == rr.XRLIM_BURST_FACTOR
        assert _burst(ours, family, packets) == want


# --- checksums: no reply to a corrupt packet --------------------------------------------------

SIOCETHTOOL = 0x8946
ETHTOOL_SRXCSUM = 0x15  # legacy command: NETIF_F_RXCSUM on or off


def _rx_checksum_off(ns: str, ifname: str) -> None:
    """Turn off a veth's receive checksum offload, so frames from a raw socket arrive as
    CHECKSUM_NONE (veth_xmit otherwise marks them CHECKSUM_UNNECESSARY) and the kernel
    checks their checksums where REJECT asks it to."""
    import array
    import fcntl

    value = array.array("I", [ETHTOOL_SRXCSUM, 0])
    addr, _ = value.buffer_info()
    ifreq = struct.pack("16sP", ifname.encode(), addr)
    with netns.entered(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifreq)


def _corrupt(family: int, packet: bytes) -> bytes:
    """``packet`` with its transport checksum off by one."""
    hdr = 20 if family == 4 else 40
    at = hdr + {6: 16, 17: 6, 1: 2, 58: 2}[packet[9] if family == 4 else packet[6]]
    value = struct.unpack_from("!H", packet, at)[0] ^ 0x0100
    return packet[:at] + struct.pack("!H", value) + packet[at + 2:]


@pytest.mark.parametrize("family", [4, 6])
def test_corrupt_packets_get_no_reply(family: int) -> None:
    with _pairs() as (ipt, ours):
        for p in (ipt, ours):
            _sysctls(p.a)
            _sysctls(p.b)
            _rx_checksum_off(p.b, p.if_b)
        restore = "ip6tables-legacy-restore" if family == 6 else "iptables-legacy-restore"
        r = subprocess.run(["ip", "netns", "exec", ipt.b, restore], input=ruleset(family),
                           capture_output=True, text=True, timeout=TIMEOUT)
        if r.returncode != 0:
            pytest.fail(f"the reference refused the ruleset: {restore}: {r.stderr.strip()}")
        tool = "bpfilter6-restore" if family == 6 else "bpfilter-restore"
        r = subprocess.run([str(BIN / tool), "--netns", ours.b], input=ruleset(family),
                           capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr
        a, b = (ipt.ipv4_a, ipt.ipv4_b) if family == 4 else (ipt.ipv6_a, ipt.ipv6_b)
        for kind, port, flags in (("udp", UDP_BASE + 3, 0), ("tcp", TCP_RESET_PORT, 0x02),
                                  ("tcp", TCP_ICMP_PORT, 0x02), ("icmp", 0, 0)):
            good = probe(family, kind, a, b, port, flags)
            bad = _corrupt(family, good)
            assert len(exchange(ipt, family, good)) == 1, (kind, port)
            assert [masked(family, g) for g in exchange(ours, family, good)] == \
                [masked(family, w) for w in exchange(ipt, family, good)]
            assert exchange(ipt, family, bad) == [], (kind, port)
            assert exchange(ours, family, bad) == [], (kind, port)


def test_reset_ttl_ignores_a_local_route_hoplimit() -> None:
    """nf_send_reset takes the TTL of the original's route; a local delivery's input route
    carries no metrics, so a hoplimit on the local route does not show (a forwarded
    packet's does: test_forward_reset_ttl_follows_the_route_hoplimit)."""
    with _pairs() as (ipt, ours):
        for p in (ipt, ours):
            testbed.run(p.b, ["ip", "route", "replace", "local", p.ipv4_b, "dev", p.if_b,
                              "table", "local", "hoplimit", "33"])
        r = subprocess.run(["ip", "netns", "exec", ipt.b, "iptables-legacy-restore"],
                           input=ruleset(4), capture_output=True, text=True, timeout=TIMEOUT)
        if r.returncode != 0:
            pytest.fail(f"iptables-legacy-restore refused the ruleset: {r.stderr.strip()}")
        r = subprocess.run([str(BIN / "bpfilter-restore"), "--netns", ours.b], input=ruleset(4),
                           capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr
        reply = _compare((ipt, ours), 4, probe(4, "tcp", ipt.ipv4_a, ipt.ipv4_b,
                                               TCP_RESET_PORT))
        assert reply[8] == 64


def test_forward_reset_ttl_follows_the_route_hoplimit() -> None:
    s1 = testbed.random_subnet()
    s2 = testbed.Subnet((s1.index + 1) % testbed.SUBNETS)
    text = FORWARD_RULES.format(other="icmp-net-prohibited")
    with _routed(s1, s2) as (ipt, _), _routed(s1, s2) as (ours, _):
        for p in (ipt, ours):
            testbed.run(p.b, ["ip", "route", "replace", f"{s2.ipv4(0)}/24", "dev", "veth-a",
                              "hoplimit", "33"])
        r = subprocess.run(["ip", "netns", "exec", ipt.b, "iptables-legacy-restore"],
                           input=text, capture_output=True, text=True, timeout=TIMEOUT)
        if r.returncode != 0:
            pytest.fail(f"iptables-legacy-restore refused the ruleset: {r.stderr.strip()}")
        r = subprocess.run([str(BIN / "bpfilter-restore"), "--netns", ours.b], input=text,
                           capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr
        reply = _compare((ipt, ours), 4, probe(4, "tcp", s1.ipv4(1), s2.ipv4(2), 4001))
        assert reply[8] == 33
