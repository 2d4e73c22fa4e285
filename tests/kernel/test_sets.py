"""`-m set --match-set` with bpfilter's own sets: verdicts by BPF_PROG_TEST_RUN for every set
type, flag count and family; element changes seen by the loaded program without a reload;
missing sets and sets of the other family refused with the rule's line; `bpfilter set`."""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from bpfilter import bpf, bpffs, loader, netns, sets, testbed
from bpfilter.codegen.compiler import CompileError, compile_ruleset
from bpfilter.codegen.sets import SetError, SetType
from bpfilter.codegen.uapi import NfHook
from bpfilter.grammar.iptables import parse_restore

DROP, ACCEPT = 0, 1
TCP, UDP, ICMP = 6, 17, 1


def ip4(src: str = "198.18.0.1", dst: str = "198.18.0.2", *, proto: int = UDP,
        sport: int = 1234, dport: int = 53, frag: int = 0, l4: bytes | None = None) -> bytes:
    if l4 is None:
        l4 = (struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 0x50, 2, 0, 0, 0) if proto == TCP
              else struct.pack("!HHHH", sport, dport, 8, 0))
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, frag, 64, proto, 0,
                       ipaddress.IPv4Address(src).packed,
                       ipaddress.IPv4Address(dst).packed) + l4


def ip6(src: str = "2001:db8::1", dst: str = "2001:db8::2", *, proto: int = UDP,
        sport: int = 1234, dport: int = 53) -> bytes:
    l4 = (struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 0x50, 2, 0, 0, 0) if proto == TCP
          else struct.pack("!HHHH", sport, dport, 8, 0))
    return struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64,
                       ipaddress.IPv6Address(src).packed,
                       ipaddress.IPv6Address(dst).packed) + l4


@pytest.fixture
def ns() -> Iterator[str]:
    name = testbed.unique_name("h8set")
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        bpffs.cleanup(name)
        testbed.delete(name)


def ruleset(rules: str) -> str:
    return "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                      ":OUTPUT ACCEPT [0:0]", *[r.strip() for r in rules.strip().splitlines()],
                      "COMMIT", ""])


class Runner:
    """A compiled ruleset loaded (not attached) with the sets of a namespace."""

    def __init__(self, rules: str, family: int, netns: str) -> None:
        self.family = family
        self.compiled = compile_ruleset(parse_restore(ruleset(rules), family=family), family)
        self.programs = loader.load_programs(self.compiled, netns=netns)
        self.program = self.compiled.program(NfHook.LOCAL_IN, "filter")
        assert self.program is not None

    def run(self, packet: bytes) -> int:
        prog = self.programs.progs[self.program]
        return bpf.prog_test_run(prog, loader.test_run_data(packet, NfHook.LOCAL_IN,
                                                            self.family),
                                 ctx_in=loader.hook_context(NfHook.LOCAL_IN,
                                                            self.family)).retval

    def close(self) -> None:
        self.programs.close()


def verdicts(ns: str, rules: str, packets: list[bytes], family: int = 4) -> list[int]:
    r = Runner(rules, family, ns)
    try:
        return [r.run(p) for p in packets]
    finally:
        r.close()


def test_hash_ip_src_and_dst(ns: str) -> None:
    sets.create("blk", SetType("hash:ip", 4), ns)
    sets.add("blk", ["198.18.0.1", "198.18.9.0/30"], ns)
    packets = [ip4(), ip4("198.18.0.3"), ip4("198.18.9.3"), ip4("198.18.9.4"),
               ip4("198.18.7.7", "198.18.0.1")]
    assert verdicts(ns, "-A INPUT -m set --match-set blk src -j DROP", packets) == \
        [DROP, ACCEPT, DROP, ACCEPT, ACCEPT]
    assert verdicts(ns, "-A INPUT -m set --match-set blk dst -j DROP", packets) == \
        [ACCEPT, ACCEPT, ACCEPT, ACCEPT, DROP]
    assert verdicts(ns, "-A INPUT -m set ! --match-set blk src -j DROP", packets) == \
        [ACCEPT, DROP, ACCEPT, DROP, DROP]
    # extra flags beyond the set's dimension are ignored (ip_set_test)
    assert verdicts(ns, "-A INPUT -m set --match-set blk src,dst -j DROP", packets) == \
        [DROP, ACCEPT, DROP, ACCEPT, ACCEPT]


def test_hash_net_longest_prefix(ns: str) -> None:
    sets.create("nets", SetType("hash:net", 4), ns)
    sets.add("nets", ["198.18.0.0/16", "198.19.128.0/17", "10.0.0.1"], ns)
    packets = [ip4("198.18.200.1"), ip4("198.19.200.1"), ip4("198.19.1.1"), ip4("10.0.0.1"),
               ip4("10.0.0.2")]
    assert verdicts(ns, "-A INPUT -m set --match-set nets src -j DROP", packets) == \
        [DROP, DROP, ACCEPT, DROP, ACCEPT]


def test_hash_ip_port(ns: str) -> None:
    sets.create("svc", SetType("hash:ip,port", 4), ns)
    sets.add("svc", ["198.18.0.2,udp:53", "198.18.0.2,80", "198.18.0.1,udp:1234"], ns)
    packets = [ip4(), ip4(dport=54), ip4(proto=TCP, dport=80), ip4(proto=TCP, dport=53),
               ip4("198.18.0.9", proto=TCP, dport=80),
               ip4(frag=1, l4=struct.pack("!HHHH", 1234, 53, 8, 0)),  # a later fragment
               ip4(proto=TCP, dport=80, l4=struct.pack("!HHI", 1234, 80, 0)),  # short TCP
               ip4(proto=ICMP, l4=struct.pack("!BBHHH", 8, 0, 0, 1, 1))]
    rule = "-A INPUT -m set --match-set svc dst,dst -j DROP"
    assert verdicts(ns, rule, packets) == \
        [DROP, ACCEPT, DROP, ACCEPT, DROP, ACCEPT, ACCEPT, ACCEPT]
    # source address with destination port; then source port
    assert verdicts(ns, "-A INPUT -m set --match-set svc src,src -j DROP", packets) == \
        [DROP, DROP, ACCEPT, ACCEPT, ACCEPT, ACCEPT, ACCEPT, ACCEPT]
    # one flag for a two-dimension set: never a match (ip_set_test), negated: always
    assert verdicts(ns, "-A INPUT -m set --match-set svc dst -j DROP", packets) == \
        [ACCEPT] * len(packets)
    assert verdicts(ns, "-A INPUT -m set ! --match-set svc dst -j DROP", packets) == \
        [DROP] * len(packets)


def test_hash_net_port_ipv6(ns: str) -> None:
    sets.create("v6", SetType("hash:net,port", 6), ns)
    sets.add("v6", ["2001:db8::/64,udp:53", "2001:db8:1::/48,tcp:22"], ns)
    packets = [ip6(), ip6(dport=54), ip6("2001:db8:1:2::5", proto=TCP, sport=22),
               ip6("2001:db8:2::5", proto=TCP, sport=22)]
    assert verdicts(ns, "-A INPUT -m set --match-set v6 dst,dst -j DROP", packets, 6) == \
        [DROP, ACCEPT, ACCEPT, ACCEPT]
    assert verdicts(ns, "-A INPUT -m set --match-set v6 src,src -j DROP", packets, 6) == \
        [ACCEPT, ACCEPT, DROP, ACCEPT]


def test_elements_change_without_reload(ns: str) -> None:
    sets.create("live", SetType("hash:ip", 4), ns)
    r = Runner("-A INPUT -m set --match-set live src -j DROP", 4, ns)
    try:
        prog_id = r.programs.progs[r.program].id
        assert r.run(ip4()) == ACCEPT
        sets.add("live", ["198.18.0.1"], ns)
        assert r.run(ip4()) == DROP
        sets.delete("live", ["198.18.0.1"], ns)
        assert r.run(ip4()) == ACCEPT
        assert r.programs.progs[r.program].id == prog_id
        assert sets.users("live", ns) == [prog_id]
        with pytest.raises(SetError, match="in use"):
            sets.destroy("live", ns)
    finally:
        r.close()
    sets.destroy("live", ns)
    assert not sets.exists("live", ns)


def test_missing_set_and_wrong_family_are_refused_with_the_line(ns: str) -> None:
    rules = "-A INPUT -p tcp -j ACCEPT\n-A INPUT -m set --match-set nope src -j DROP"
    with pytest.raises(CompileError, match=r"line 6: Set nope doesn't exist\."):
        Runner(rules, 4, ns)
    sets.create("six", SetType("hash:ip", 6), ns)
    with pytest.raises(CompileError,
                       match="line 5: The protocol family of set six is IPv6, which is not"):
        Runner("-A INPUT -m set --match-set six src -j DROP", 4, ns)


def test_unsupported_options_are_refused_by_name() -> None:
    text = ruleset("-A INPUT -m set --match-set s src --return-nomatch -j DROP")
    with pytest.raises(CompileError, match="match 'set' option '--return-nomatch' is not"):
        compile_ruleset(parse_restore(text), 4)


def test_element_syntax() -> None:
    t = SetType("hash:net,port", 4)
    with pytest.raises(SetError, match="ADDR,"):
        t.keys("198.18.0.0/24")
    with pytest.raises(SetError, match="icmp"):
        t.keys("198.18.0.0/24,icmp:8")
    with pytest.raises(SetError, match="inet address"):
        SetType("hash:ip", 4).keys("2001:db8::1")
    assert len(SetType("hash:ip", 4).keys("198.18.0.0/24")) == 256
    keys = t.keys("198.18.0.0/24,udp:10-12")
    assert [t.format_key(k) for k in keys] == [f"198.18.0.0/24,udp:{p}" for p in (10, 11, 12)]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bpfilter", "set", *args],
                          capture_output=True, text=True, timeout=60)


def test_cli(ns: str) -> None:
    assert _cli("create", "web", "hash:ip,port", "family", "inet", "maxelem", "3",
                "--netns", ns).returncode == 0
    r = _cli("create", "web", "hash:ip", "--netns", ns)
    assert r.returncode == 1 and "already exists" in r.stderr
    assert _cli("add", "web", "198.18.0.2,80", "198.18.0.2,udp:53", "--netns", ns).returncode == 0
    r = _cli("add", "web", "198.18.0.3,80-81", "--netns", ns)
    assert r.returncode == 1 and "full" in r.stderr
    r = _cli("list", "web", "--netns", ns, "--json")
    (listed,) = json.loads(r.stdout)["sets"]
    assert listed["maxelem"] == 3 and listed["type"] == "hash:ip,port"
    assert set(listed["elements"]) >= {"198.18.0.2,tcp:80", "198.18.0.2,udp:53"}
    assert _cli("test", "web", "198.18.0.2,udp:53", "--netns", ns).returncode == 0
    assert _cli("del", "web", "198.18.0.2,udp:53", "--netns", ns).returncode == 0
    assert _cli("test", "web", "198.18.0.2,udp:53", "--netns", ns).returncode == 1
    r = _cli("del", "web", "198.18.0.2,udp:53", "--netns", ns)
    assert r.returncode == 1 and "not added" in r.stderr
    assert _cli("flush", "web", "--netns", ns).returncode == 0
    assert "Number of entries: 0" in _cli("list", "web", "--netns", ns).stdout
    assert _cli("destroy", "web", "--netns", ns).returncode == 0
    r = _cli("list", "web", "--netns", ns)
    assert r.returncode == 1 and "does not exist" in r.stderr


# --- the reference: the same sets in ipset, the same rules in iptables-legacy ------------------

RX, TX = "h8rx", "h8tx"


def _in(ns: str, *args: str, stdin: str | None = None) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *args], check=True, capture_output=True,
                          text=True, timeout=30, input=stdin).stdout


def _with_checksum(packet: bytes) -> bytes:
    # ip_rcv() checks the IPv4 header checksum before PREROUTING.
    if packet[0] >> 4 != 4:
        return packet
    return packet[:10] + struct.pack("!H", testbed.checksum(packet[:20])) + packet[12:]


SETS4 = [("h4ip", "hash:ip", ["198.18.0.1", "198.18.9.0/30"]),
         ("h4net", "hash:net", ["198.18.0.0/16", "198.19.128.0/17"]),
         ("h4ipp", "hash:ip,port", ["198.18.0.2,udp:53", "198.18.0.2,tcp:80",
                                    "198.18.0.1,udp:1234", "198.18.0.2,sctp:9",
                                    "198.18.0.1,udplite:53"]),
         ("h4netp", "hash:net,port", ["198.18.0.0/24,udp:53", "198.19.0.0/16,tcp:1234"])]
PACKETS4 = [
    ip4(), ip4("198.18.0.3"), ip4("198.18.9.3"), ip4("198.19.200.1", "198.18.0.2"),
    ip4(dport=54), ip4(proto=TCP, dport=80), ip4(proto=TCP, dport=53),
    ip4("198.19.1.1", proto=TCP, sport=1234, dport=80),
    ip4(proto=TCP, dport=80, l4=struct.pack("!HHI", 1234, 80, 0)),  # TCP header cut short
    ip4(proto=132, sport=1, dport=9, l4=struct.pack("!HHII", 1, 9, 0, 0)),  # SCTP
    ip4(proto=132, sport=1, dport=9, l4=struct.pack("!HHI", 1, 9, 0)),  # SCTP cut short
    ip4(proto=136, sport=1234, dport=53),  # UDP-Lite
    ip4(frag=1, l4=struct.pack("!HHHH", 1234, 53, 8, 0)),  # a later fragment
    ip4(frag=0x2000),  # a first fragment (more fragments): ports are there
    ip4(proto=ICMP, l4=struct.pack("!BBHHH", 8, 0, 0, 1, 1)),
    ip4(proto=47, l4=b"\0" * 8),  # GRE: no ports
]
FLAGS4 = ["src", "dst", "src,dst", "dst,dst", "src,src", "dst,src", "dst,dst,src"]

SETS6 = [("h6ip", "hash:ip", ["2001:db8::1"]),
         ("h6netp", "hash:net,port", ["2001:db8::/64,udp:53", "2001:db8:1::/48,tcp:22"])]
DEST_OPTS = 60


def _ip6_ext(*, fragment: int | None = None) -> bytes:
    """UDP 1234 -> 53 behind a destination options header, or behind a fragment header."""
    udp_ = struct.pack("!HHHH", 1234, 53, 8, 0)
    if fragment is None:
        ext = struct.pack("!BB6s", UDP, 0, b"\x01\x04\0\0\0\0")
        nh = DEST_OPTS
    else:
        ext = struct.pack("!BBHI", UDP, 0, fragment << 3, 7)
        nh = 44
    body = ext + udp_
    return struct.pack("!IHBB16s16s", 6 << 28, len(body), nh, 64,
                       ipaddress.IPv6Address("2001:db8::1").packed,
                       ipaddress.IPv6Address("2001:db8::2").packed) + body


PACKETS6 = [ip6(), ip6("2001:db8::5"), ip6(dport=54), ip6("2001:db8:1:2::5", proto=TCP, sport=22),
            _ip6_ext(), _ip6_ext(fragment=0), _ip6_ext(fragment=1)]
FLAGS6 = ["src", "dst", "dst,dst", "src,src", "src,dst"]


@pytest.fixture
def wire() -> Iterator[tuple[str, bytes]]:
    import shutil

    if shutil.which("ipset") is None or shutil.which("iptables-legacy-restore") is None:
        pytest.skip("ipset or iptables-legacy is not installed")
    name = testbed.unique_name("h8ips")
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (f"link add {TX} type veth peer name {RX}", f"link set {TX} up",
                    f"link set {RX} up", f"addr add 198.18.0.2/24 dev {RX}",
                    f"-6 addr add 2001:db8::2/64 dev {RX} nodad"):
            subprocess.run(["ip", "-n", name, *cmd.split()], check=True)
        mac = bytes.fromhex(_in(name, "cat", f"/sys/class/net/{RX}/address").strip()
                            .replace(":", ""))
        yield name, mac
    finally:
        bpffs.cleanup(name)
        testbed.delete(name)


def _reference(ns: str, mac: bytes, family: int, set_name: str, flags: str,
               packets: list[bytes]) -> list[bool]:
    """Which packets `-m set --match-set SET FLAGS` matches in iptables-legacy (raw
    PREROUTING rule counters, read after each packet)."""
    tool = "iptables-legacy" if family == 4 else "ip6tables-legacy"
    net = "198.18.0.0/15" if family == 4 else "2001:db8::/32"
    _in(ns, f"{tool}-restore", stdin="\n".join([
        "*raw", ":PREROUTING ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
        f"-A PREROUTING -s {net}", f"-A PREROUTING -s {net} -m set --match-set {set_name} "
        f"{flags} -j DROP", "COMMIT", ""]))
    ethertype = struct.pack("!H", 0x0800 if family == 4 else 0x86DD)
    with netns.entered(ns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((TX, 0))
    out = []
    for p in packets:
        _in(ns, tool, "-t", "raw", "-Z")
        sock.send(mac + bytes.fromhex("020000000001") + ethertype + _with_checksum(p))
        for _ in range(100):
            arrived, matched = (int(line.split()[0]) for line in _in(
                ns, tool, "-t", "raw", "-L", "PREROUTING", "-v", "-x", "-n").splitlines()[2:])
            if arrived:
                break
            time.sleep(0.01)
        assert arrived, f"packet {p.hex()} never reached raw PREROUTING"
        out.append(bool(matched))
    sock.close()
    return out


@pytest.mark.parametrize("family", [4, 6])
def test_sets_agree_with_ipset_and_iptables_legacy(wire: tuple[str, bytes], family: int) -> None:
    ns, mac = wire
    table, packets, flag_list = ((SETS4, PACKETS4, FLAGS4) if family == 4
                                 else (SETS6, PACKETS6, FLAGS6))
    mismatches = []
    hits = 0
    for name, kind, elements in table:
        _in(ns, "ipset", "create", name, kind, "family", "inet" if family == 4 else "inet6")
        for e in elements:
            _in(ns, "ipset", "add", name, e)
        sets.create(name, SetType(kind, family), ns)
        sets.add(name, elements, ns)
        for flags in flag_list:
            ref = _reference(ns, mac, family, name, flags, packets)
            got = verdicts(ns, f"-A INPUT -m set --match-set {name} {flags} -j DROP", packets,
                           family)
            hits += sum(ref)
            for p, r, g in zip(packets, ref, got, strict=True):
                if r != (g == DROP):
                    mismatches.append((name, flags, p.hex(), "ipset" if r else "-", g))
    assert not mismatches, mismatches
    assert 0 < hits < len(table) * len(flag_list) * len(packets) // 2
