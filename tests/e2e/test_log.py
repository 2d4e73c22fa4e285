"""`bpfilter log` with real traffic in namespace pairs: LOG/NFLOG events of ping, TCP and UDP
over IPv4 and IPv6 with the next rule still deciding, `--follow` across a ruleset
replacement, and the lines compared byte for byte with the kernel log lines iptables-legacy's
LOG writes for the same packets at INPUT, OUTPUT and FORWARD (dmesg; nf_log_all_netns is set
only while iptables-legacy logs)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bpfilter import netns, testbed

BIN = Path(sys.executable).parent
TIMEOUT = 60
LOG_ALL_NETNS = Path("/proc/sys/net/netfilter/nf_log_all_netns")
MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


@pytest.fixture
def pair() -> Iterator[testbed.NetnsPair]:
    with testbed.netns_pair(prefix="bplg") as p:
        yield p


def run(tool: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / tool), *args], input=stdin, capture_output=True,
                          text=True, timeout=TIMEOUT)


def restore(ns: str, family: int, text: str) -> None:
    r = run("bpfilter-restore" if family == 4 else "bpfilter6-restore", "--netns", ns,
            stdin=text)
    assert r.returncode == 0, r.stderr


def table(rules: str) -> str:
    return ("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            + "".join(line.strip() + "\n" for line in rules.strip().splitlines()) + "COMMIT\n")


def log_json(ns: str) -> list[dict[str, Any]]:
    r = run("bpfilter", "log", "--json", "--netns", ns)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def tcp_connects(pair: testbed.NetnsPair, family: int, port: int) -> bool:
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    addr = pair.address(pair.b, af)
    with netns.entered(pair.b):
        srv = socket.socket(af, socket.SOCK_STREAM)
    with srv:
        srv.bind((addr, port))
        srv.listen(1)
        with netns.entered(pair.a):
            cli = socket.socket(af, socket.SOCK_STREAM)
        with cli:
            cli.settimeout(2)
            try:
                cli.connect((addr, port))
            except OSError:
                return False
            return True


@pytest.mark.parametrize("family", [4, 6])
def test_log_events_of_real_traffic(pair: testbed.NetnsPair, family: int) -> None:
    icmp = "icmp" if family == 4 else "ipv6-icmp"
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    a, b = pair.address(pair.a, af), pair.address(pair.b, af)
    restore(pair.b, family, table(f"""
        -A INPUT -p {icmp} -j LOG --log-prefix "icmp: "
        -A INPUT -p tcp --dport 7100 -j LOG --log-prefix "tcp: " --log-level 6
        -A INPUT -p udp -j NFLOG --nflog-group 3 --nflog-prefix udp
        -A INPUT -p udp --dport 7201 -j DROP
    """))
    assert testbed.ping(pair.a, b, timeout=2)
    assert tcp_connects(pair, family, 7100)
    assert testbed.udp_reaches(pair.a, pair.b, b, 7200, timeout=1)
    assert not testbed.udp_reaches(pair.a, pair.b, b, 7201, timeout=0.5)  # logged, then DROP
    docs = log_json(pair.b)
    by = {(d["prefix"], d["fields"].get("dpt")): d for d in docs}
    echo = next(d for d in docs if d["prefix"] == "icmp: " and d["fields"].get("type") in (8, 128))
    assert (echo["fields"]["src"], echo["fields"]["dst"]) == tuple(
        log_addr(x, family) for x in (a, b))
    assert echo["hook"] == "LOCAL_IN" and echo["in"] == pair.if_b and echo["family"] == family
    assert echo["level_name"] == "warning" and echo["line"].startswith(
        f"icmp: IN={pair.if_b} OUT= MAC=")
    tcp = [d for d in docs if d["prefix"] == "tcp: "]
    assert all(d["level"] == 6 and d["fields"]["dpt"] == 7100 for d in tcp)
    assert tcp[0]["fields"]["tcp_flags"] == ["SYN"]  # the handshake's first segment
    for port in (7200, 7201):
        d = by[("udp", port)]
        assert d["target"] == "NFLOG" and d["group"] == 3 and d["fields"]["proto"] == "UDP"
        assert d["rule"] == 3 and d["chain"] == "INPUT"
    # Read once: the events are consumed.
    assert not [d for d in log_json(pair.b) if d["prefix"] == "tcp: "]


def log_addr(addr: str, family: int) -> str:
    """An address as the LOG line prints it (%pI4 / %pI6: IPv6 uncompressed)."""
    ip = ipaddress.ip_address(addr)
    if family == 4:
        return str(ip)
    return ":".join(f"{g:04x}" for g in struct.unpack("!8H", ip.packed))


def test_follow_reads_across_a_replacement(pair: testbed.NetnsPair) -> None:
    rules = table('-A INPUT -p icmp -j LOG --log-prefix "gen{n}: "')
    restore(pair.b, 4, rules.format(n=1))
    proc = subprocess.Popen([str(BIN / "bpfilter"), "log", "-f", "--json", "--netns", pair.b],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        assert testbed.ping(pair.a, pair.ipv4_b, timeout=2)
        restore(pair.b, 4, rules.format(n=2))
        time.sleep(1.5)  # the reader looks for new generations' rings every second
        assert testbed.ping(pair.a, pair.ipv4_b, timeout=2)
        seen: set[str] = set()
        data = b""
        deadline = time.monotonic() + 10
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while seen != {"gen1: ", "gen2: "} and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                data += os.read(fd, 65536)
                *lines, rest = data.split(b"\n")
                data = rest
                seen.update(json.loads(line)["prefix"] for line in lines)
        assert seen == {"gen1: ", "gen2: "}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --- byte for byte against the kernel's own LOG ---------------------------------------------

def _ip4(src: str, dst: str, proto: int, payload: bytes, *, opts: bytes = b"", tos: int = 0,
         ident: int = 4321, frag: int = 0x4000) -> bytes:
    ihl = 5 + len(opts) // 4
    return struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos, 4 * ihl + len(payload), ident, frag,
                       64, proto, 0, ipaddress.IPv4Address(src).packed,
                       ipaddress.IPv4Address(dst).packed) + opts + payload


def _ip6(src: str, dst: str, nexthdr: int, payload: bytes, *, flow: int = 0x12345,
         tc: int = 0) -> bytes:
    return struct.pack("!IHBB16s16s", (6 << 28) | (tc << 20) | flow, len(payload), nexthdr,
                       64, ipaddress.IPv6Address(src).packed,
                       ipaddress.IPv6Address(dst).packed) + payload


TCP_OPTS = bytes([2, 4, 5, 0xB4, 1, 1, 4, 2])


def _tcp(sport: int, flags: int, opts: bytes = b"", res: int = 0) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, 9, 1000, 7, (((20 + len(opts)) // 4) << 4) | res,
                       flags, 512, 0, 3) + opts


def _packets(family: int, a: str, b: str) -> list[bytes]:
    udp = struct.pack("!HHHH", 5000, 53, 12, 0) + b"abcd"
    if family == 4:
        inner = _ip4(b, a, 17, struct.pack("!HHHH", 53, 5000, 12, 0), ident=99)
        return [
            _ip4(a, b, 1, struct.pack("!BBHHH", 8, 0, 0, 77, 5) + b"x" * 8),
            _ip4(a, b, 6, _tcp(40000, 0x42, TCP_OPTS), opts=bytes([1, 1, 1, 0]), tos=0xB8),
            _ip4(a, b, 6, _tcp(40001, 0x91, res=0x0F)),
            _ip4(a, b, 17, udp, frag=0),
            _ip4(a, b, 1, struct.pack("!BBHHH", 3, 4, 0, 0, 1400) + inner, tos=0xC0),
            _ip4(a, b, 6, _tcp(40002, 0x02)[:12], ident=5),
        ]
    hop = struct.pack("!BB", 17, 0) + b"\x01\x04\0\0\0\0"
    inner = _ip6(b, a, 17, struct.pack("!HHHH", 53, 5000, 12, 0))
    return [
        _ip6(a, b, 58, struct.pack("!BBHHH", 128, 0, 0, 77, 5) + b"x" * 8),
        _ip6(a, b, 6, _tcp(40000, 0x12, TCP_OPTS), tc=0xB8),
        _ip6(a, b, 0, hop + udp),
        _ip6(a, b, 58, struct.pack("!BBHI", 1, 4, 0, 0) + inner),
    ]


def _rules(family: int, tag: str) -> str:
    icmp = "icmp" if family == 4 else "ipv6-icmp"
    # Neighbour discovery passes unlogged, so only the crafted packets are logged.
    nd = "".join(f"-A INPUT -p ipv6-icmp -m icmp6 --icmpv6-type {t} -j ACCEPT\n"
                 for t in (133, 134, 135, 136)) if family == 6 else ""
    return table(nd + f"""
        -A INPUT -p {icmp} -j LOG --log-prefix "{tag}i: " --log-level 6
        -A INPUT -p tcp -j LOG --log-prefix "{tag}t: " --log-tcp-options --log-tcp-sequence \
            --log-ip-options
        -A INPUT -p udp -j LOG --log-prefix "{tag}u: " --log-macdecode --log-ip-options
        -A INPUT -p tcp -j DROP
        -A INPUT -p udp -j DROP
        -A OUTPUT -p udp --dport 7300 -j LOG --log-prefix "{tag}o: " --log-uid
    """)


def _send(pair: testbed.NetnsPair, family: int) -> None:
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    a, b = pair.address(pair.a, af), pair.address(pair.b, af)
    with netns.entered(pair.a):
        s = socket.socket(af, socket.SOCK_RAW, socket.IPPROTO_RAW)  # header included
    with s:
        for packet in _packets(family, a, b):
            s.sendto(packet, (b, 0))
            time.sleep(0.02)
    # A datagram from a socket of uid 1234, gid 2345, logged at OUTPUT with --log-uid.
    send = ("import socket,sys; s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else "
            "socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[2], 7301)); "
            "s.sendto(b'uid', (sys.argv[1], 7300))")
    with netns.entered(pair.a):
        sink = socket.socket(af, socket.SOCK_DGRAM)  # no port unreachable comes back
    with sink:
        sink.bind((a, 7300))
        pair.run(pair.b, ["setpriv", "--reuid=1234", "--regid=2345", "--clear-groups",
                          sys.executable, "-c", send, a, b])
        time.sleep(0.05)


@contextlib.contextmanager
def _pair_with_macs(subnet: testbed.Subnet) -> Iterator[testbed.NetnsPair]:
    with testbed.netns_pair(prefix="bplg", subnet=subnet) as p:
        for ns, ifname, mac in ((p.a, p.if_a, MAC_A), (p.b, p.if_b, MAC_B)):
            subprocess.run(["ip", "-n", ns, "link", "set", "dev", ifname, "address", mac],
                           check=True, timeout=TIMEOUT)
        # Neighbours resolved before any rule is loaded: only the crafted packets are logged.
        assert testbed.ping(p.a, p.ipv4_b, timeout=2) and testbed.ping(p.a, p.ipv6_b, timeout=2)
        yield p


@pytest.mark.skipif(shutil.which("iptables-legacy-restore") is None or shutil.which("setpriv")
                    is None or not LOG_ALL_NETNS.exists(),
                    reason="needs iptables-legacy, setpriv and nf_log")
@pytest.mark.parametrize("family", [4, 6])
def test_lines_equal_the_kernel_log(family: int) -> None:
    tag = secrets.token_hex(4)
    subnet = testbed.random_subnet()
    # Same addresses, device names and MACs in two pairs: iptables' filter table keeps its
    # hook priority in the first, so bpfilter gets a pair of its own.
    legacy = "iptables-legacy-restore" if family == 4 else "ip6tables-legacy-restore"
    with _pair_with_macs(subnet) as p:
        before = LOG_ALL_NETNS.read_text()
        try:
            LOG_ALL_NETNS.write_text("1")
            subprocess.run(["ip", "netns", "exec", p.b, legacy], input=_rules(family, tag),
                           text=True, check=True, timeout=TIMEOUT)
            _send(p, family)
            time.sleep(0.3)
        finally:
            LOG_ALL_NETNS.write_text(before)
        kmsg = subprocess.run(["dmesg", "-t"], capture_output=True, text=True, check=True,
                              timeout=TIMEOUT).stdout
    kernel = [line[line.index(tag):] for line in kmsg.splitlines() if tag in line]
    with _pair_with_macs(subnet) as p:
        restore(p.b, family, _rules(family, tag))
        _send(p, family)
        out = run("bpfilter", "log", "--netns", p.b)
        assert out.returncode == 0, out.stderr
    ours = [line[line.index(tag):] for line in out.stdout.splitlines() if tag in line]
    assert len(kernel) == len(_packets(family, "198.18.0.1" if family == 4 else "::1",
                                       "198.18.0.2" if family == 4 else "::2")) + 1, kmsg[-2000:]
    assert "UID=1234 GID=2345 " in kernel[-1]
    # That datagram's IP ID (IPv4) is random per socket: the one field not compared.
    assert [_no_id(line) for line in ours] == [_no_id(line) for line in kernel]


def _no_id(line: str) -> str:
    return re.sub(r" ID=\d+ ", " ID=* ", line) if "o: IN=" in line else line




# --- FORWARD: a router namespace between two others ------------------------------------------

@contextlib.contextmanager
def _router(left: testbed.Subnet, right: testbed.Subnet) -> Iterator[tuple[str, str, str]]:
    """Namespaces a - r - c: r forwards between left (a .1, r .2) and right (r .1, c .2);
    fixed MACs, neighbours resolved. Always deleted."""
    a, r, c = (testbed.unique_name("bplf") for _ in range(3))
    try:
        for ns in (a, r, c):
            subprocess.run(["ip", "netns", "add", ns], check=True, timeout=TIMEOUT)
            # No duplicate address detection: link-local addresses usable at once.
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                            "net.ipv6.conf.default.accept_dad=0",
                            "net.ipv6.conf.all.accept_dad=0"], check=True, timeout=TIMEOUT)
        links = ((a, "in0", r, "fw-in", left), (r, "fw-out", c, "out0", right))
        for x, dx, y, dy, net in links:
            subprocess.run(["ip", "-n", x, "link", "add", dx, "address", MAC_A, "type", "veth",
                            "peer", "name", dy, "address", MAC_B, "netns", y], check=True,
                           timeout=TIMEOUT)
            for ns, dev, host in ((x, dx, 1), (y, dy, 2)):
                subprocess.run(["ip", "-n", ns, "addr", "add", f"{net.ipv4(host)}/24", "dev",
                                dev], check=True, timeout=TIMEOUT)
                subprocess.run(["ip", "-n", ns, "addr", "add", f"{net.ipv6(host)}/64", "dev",
                                dev, "nodad"], check=True, timeout=TIMEOUT)
                subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True,
                               timeout=TIMEOUT)
        subprocess.run(["ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1",
                        "net.ipv6.conf.all.forwarding=1"], check=True, timeout=TIMEOUT)
        # a reaches the right subnet through r (.2 on the left), c the left one (r is .1).
        for ns, net, via, gw_host in ((a, right, left, 2), (c, left, right, 1)):
            subprocess.run(["ip", "-n", ns, "route", "add", f"{net.ipv4(0)}/24", "via",
                            via.ipv4(gw_host)], check=True, timeout=TIMEOUT)
            subprocess.run(["ip", "-n", ns, "-6", "route", "add", f"{net.ipv6(0)}/64", "via",
                            via.ipv6(gw_host)], check=True, timeout=TIMEOUT)
        time.sleep(0.2)
        for addr in (right.ipv4(2), right.ipv6(2)):
            assert testbed.ping(a, addr, timeout=2), addr
        yield a, r, c
    finally:
        testbed.delete_all((a, r, c))


def _forward_rules(family: int, tag: str) -> str:
    return table(f"""
        -A FORWARD -p udp -j LOG --log-prefix "{tag}f: " --log-ip-options
        -A FORWARD -p udp --dport 9 -j DROP
    """)


def _send_forward(a: str, family: int, src: str, dst: str) -> None:
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    udp = struct.pack("!HHHH", 5000, 9, 12, 0) + b"abcd"
    packet = (_ip4(src, dst, 17, udp, opts=bytes([1, 1, 1, 0])) if family == 4
              else _ip6(src, dst, 17, udp))
    with netns.entered(a):
        s = socket.socket(af, socket.SOCK_RAW, socket.IPPROTO_RAW)
    with s:
        s.sendto(packet, (dst, 0))
    time.sleep(0.1)


@pytest.mark.skipif(shutil.which("iptables-legacy-restore") is None
                    or not LOG_ALL_NETNS.exists(), reason="needs iptables-legacy and nf_log")
@pytest.mark.parametrize("family", [4, 6])
def test_forward_lines_equal_the_kernel_log(family: int) -> None:
    tag = secrets.token_hex(4)
    left, right = testbed.random_subnet(), testbed.random_subnet()
    while right == left:
        right = testbed.random_subnet()
    src, dst = ((left.ipv4(1), right.ipv4(2)) if family == 4
                else (left.ipv6(1), right.ipv6(2)))
    legacy = "iptables-legacy-restore" if family == 4 else "ip6tables-legacy-restore"
    with _router(left, right) as (a, r, _):
        before = LOG_ALL_NETNS.read_text()
        try:
            LOG_ALL_NETNS.write_text("1")
            subprocess.run(["ip", "netns", "exec", r, legacy], input=_forward_rules(family, tag),
                           text=True, check=True, timeout=TIMEOUT)
            _send_forward(a, family, src, dst)
        finally:
            LOG_ALL_NETNS.write_text(before)
        kmsg = subprocess.run(["dmesg", "-t"], capture_output=True, text=True, check=True,
                              timeout=TIMEOUT).stdout
    kernel = [line[line.index(tag):] for line in kmsg.splitlines() if tag in line]
    with _router(left, right) as (a, r, _):
        restore(r, family, _forward_rules(family, tag))
        _send_forward(a, family, src, dst)
        out = run("bpfilter", "log", "--netns", r)
        assert out.returncode == 0, out.stderr
    ours = [line[line.index(tag):] for line in out.stdout.splitlines() if tag in line]
    assert len(kernel) == 1 and "IN=fw-in OUT=fw-out MAC=" in kernel[0], kmsg[-1000:]
    assert ours == kernel
