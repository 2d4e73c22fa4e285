"""limit, hashlimit, statistic and recent: BPF_PROG_TEST_RUN sequences on crafted packets
(bursts, per-key buckets, nth sequences, recent lists), refusals, and the same packet
sequences through iptables-legacy in a throwaway namespace as the reference."""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator

import pytest

from bpfilter import loader, testbed
from bpfilter.codegen import stateful
from bpfilter.codegen.compiler import CompiledRuleset, compile_ruleset
from bpfilter.codegen.uapi import IfHook, NfHook
from bpfilter.grammar.iptables import parse_restore

DROP, ACCEPT = 0, 1
S1, S2, S3, DST = "198.18.0.1", "198.18.0.2", "198.18.1.1", "198.18.0.9"


def udp4(src: str = S1, dst: str = DST, *, sport: int = 1234, dport: int = 53,
         ttl: int = 64) -> bytes:
    payload = struct.pack("!HHHH", sport, dport, 12, 0) + b"xxxx"
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, ttl, 17, 0,
                       ipaddress.IPv4Address(src).packed,
                       ipaddress.IPv4Address(dst).packed) + payload


def ip4(proto: int, payload: bytes, src: str = S1, dst: str = DST) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0,
                       ipaddress.IPv4Address(src).packed,
                       ipaddress.IPv4Address(dst).packed) + payload


def udp6(src: str = "2001:db8::1", dst: str = "2001:db8::9", *, sport: int = 1234,
         dport: int = 53, hl: int = 64) -> bytes:
    payload = struct.pack("!HHHH", sport, dport, 12, 0) + b"xxxx"
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), 17, hl,
                       ipaddress.IPv6Address(src).packed,
                       ipaddress.IPv6Address(dst).packed) + payload


def ruleset(rules: str, *, policy: str = "ACCEPT", table: str = "filter") -> str:
    chains = {"filter": ("INPUT", "FORWARD", "OUTPUT"), "raw": ("PREROUTING", "OUTPUT")}[table]
    return "\n".join([f"*{table}", *[f":{c} {policy} [0:0]" for c in chains],
                      *[r.strip() for r in rules.strip().splitlines()], "COMMIT", ""])


def compiled(rules: str, family: int = 4, **kw: str) -> CompiledRuleset:
    return compile_ruleset(parse_restore(ruleset(rules, **kw), family=family), family)


def verdicts(rules: str, packets: list[bytes], family: int = 4, *,
             hook: NfHook = NfHook.LOCAL_IN, policy: str = "ACCEPT") -> list[int]:
    with loader.TestRunner(compiled(rules, family, policy=policy)) as r:
        return [r.run(hook, p) for p in packets]


# --- limit ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", [4, 6])
def test_limit_burst_then_refill(family: int) -> None:
    pkt = udp4() if family == 4 else udp6()
    with loader.TestRunner(compiled("-A INPUT -m limit --limit 1/sec --limit-burst 3 -j ACCEPT",
                                    family, policy="DROP")) as r:
        assert [r.run(NfHook.LOCAL_IN, pkt) for _ in range(8)] == [ACCEPT] * 3 + [DROP] * 5
        time.sleep(1.5)  # 1.5 periods: one packet's worth, not two
        assert [r.run(NfHook.LOCAL_IN, pkt) for _ in range(3)] == [ACCEPT, DROP, DROP]


def test_limit_default_burst_is_5_and_rules_have_their_own_buckets() -> None:
    rules = """
        -A INPUT -s 198.18.0.1 -m limit --limit 1/hour -j ACCEPT
        -A INPUT -s 198.18.0.2 -m limit --limit 1/hour --limit-burst 2 -j ACCEPT
    """
    with loader.TestRunner(compiled(rules, policy="DROP")) as r:
        assert [r.run(NfHook.LOCAL_IN, udp4(S1)) for _ in range(7)] == [ACCEPT] * 5 + [DROP] * 2
        assert [r.run(NfHook.LOCAL_IN, udp4(S2)) for _ in range(3)] == [ACCEPT] * 2 + [DROP]


def test_limit_state_is_per_rule_across_hooks() -> None:
    # One rule of a user chain called from INPUT and FORWARD has one bucket, as in iptables.
    rules = """
        :lim - [0:0]
        -A INPUT -j lim
        -A FORWARD -j lim
        -A lim -m limit --limit 1/hour --limit-burst 3 -j ACCEPT
        -A lim -j DROP
    """
    c = compiled(rules)
    slots = [s for s in c.maps if s.name == stateful.STATE_MAP]
    assert [s.max_entries for s in slots] == [1]
    with loader.TestRunner(c) as r:
        got = [r.run(h, udp4()) for h in (NfHook.LOCAL_IN, NfHook.FORWARD, NfHook.LOCAL_IN,
                                          NfHook.FORWARD, NfHook.LOCAL_IN)]
    assert got == [ACCEPT, ACCEPT, ACCEPT, DROP, DROP]


def test_limit_burst_wraps_as_in_the_kernel() -> None:
    # 1/day is 864000000 in 1/10000 s; times 6 it wraps a u32 to 889032704: the kernel's
    # bucket holds 1.03 packets' worth, so the burst is 1.
    rules = "-A INPUT -m limit --limit 1/day --limit-burst 6 -j ACCEPT"
    assert verdicts(rules, [udp4()] * 3, policy="DROP") == [ACCEPT, DROP, DROP]


# --- statistic ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("every", "packet"), [(1, 0), (3, 0), (3, 1), (3, 2), (5, 4)])
@pytest.mark.parametrize("negated", [False, True])
def test_statistic_nth_sequence(every: int, packet: int, negated: bool) -> None:
    neg = "! " if negated else ""
    got = verdicts(f"-A INPUT -m statistic --mode nth {neg}--every {every} --packet {packet} "
                   "-j DROP", [udp4()] * 12)
    want = [DROP if (n % every == packet) != negated else ACCEPT for n in range(12)]
    assert got == want


def test_statistic_nth_counter_is_shared_by_hooks() -> None:
    rules = """
        :nth - [0:0]
        -A INPUT -j nth
        -A OUTPUT -j nth
        -A nth -m statistic --mode nth --every 2 --packet 1 -j DROP
    """
    with loader.TestRunner(compiled(rules)) as r:
        got = [r.run(h, udp4()) for h in (NfHook.LOCAL_IN, NfHook.LOCAL_OUT) * 3]
    assert got == [ACCEPT, DROP] * 3


@pytest.mark.parametrize(("prob", "negated", "want"),
                         [("0", False, ACCEPT), ("1", False, DROP), ("0", True, DROP),
                          ("1", True, ACCEPT), ("0.0000000001", False, ACCEPT)])
def test_statistic_random_extremes(prob: str, negated: bool, want: int) -> None:
    neg = "! " if negated else ""
    got = verdicts(f"-A INPUT -m statistic --mode random {neg}--probability {prob} -j DROP",
                   [udp4()] * 200)
    assert got == [want] * 200


def test_statistic_random_half() -> None:
    got = verdicts("-A INPUT -m statistic --mode random --probability 0.5 -j DROP",
                   [udp4()] * 2000)
    # binomial(2000, 0.5): sd 22; a bound of 9 sd never fails by chance
    assert 800 <= got.count(DROP) <= 1200


# --- hashlimit ------------------------------------------------------------------------------------

def test_hashlimit_buckets_per_source() -> None:
    rules = ("-A INPUT -m hashlimit --hashlimit-upto 1/hour --hashlimit-burst 2 "
             "--hashlimit-mode srcip --hashlimit-name per_src -j ACCEPT")
    with loader.TestRunner(compiled(rules, policy="DROP")) as r:
        got = [r.run(NfHook.LOCAL_IN, udp4(s)) for s in (S1, S1, S1, S2, S2, S2, S1)]
    assert got == [ACCEPT, ACCEPT, DROP, ACCEPT, ACCEPT, DROP, DROP]


@pytest.mark.parametrize("family", [4, 6])
def test_hashlimit_masks_ports_and_above(family: int) -> None:
    if family == 4:
        rules = ("-A INPUT -p udp -m hashlimit --hashlimit-above 1/hour --hashlimit-burst 1 "
                 "--hashlimit-mode srcip,dstport --hashlimit-srcmask 24 --hashlimit-name m "
                 "-j DROP")
        same = [udp4(S1), udp4(S2, sport=9)]  # one /24, one destination port
        other = [udp4(S3), udp4(S1, dport=54)]
    else:
        rules = ("-A INPUT -p udp -m hashlimit --hashlimit-above 1/hour --hashlimit-burst 1 "
                 "--hashlimit-mode srcip,dstport --hashlimit-srcmask 64 --hashlimit-name m "
                 "-j DROP")
        same = [udp6("2001:db8::1"), udp6("2001:db8::ffff:1", sport=9)]
        other = [udp6("2001:db8:0:1::1"), udp6("2001:db8::1", dport=54)]
    with loader.TestRunner(compiled(rules, family)) as r:
        assert [r.run(NfHook.LOCAL_IN, p) for p in same] == [ACCEPT, DROP]
        assert [r.run(NfHook.LOCAL_IN, p) for p in other] == [ACCEPT, ACCEPT]
        assert [r.run(NfHook.LOCAL_IN, p) for p in other] == [DROP, DROP]


def test_hashlimit_without_mode_is_one_bucket_shared_by_rules_naming_it() -> None:
    limit = "-m hashlimit --hashlimit-upto 1/hour --hashlimit-burst 3 --hashlimit-name all"
    rules = f"""
        -A INPUT -s 198.18.0.1 {limit} -j ACCEPT
        -A INPUT -s 198.18.0.2 {limit} -j ACCEPT
    """
    with loader.TestRunner(compiled(rules, policy="DROP")) as r:
        got = [r.run(NfHook.LOCAL_IN, udp4(s)) for s in (S1, S2, S1, S2)]
    assert got == [ACCEPT, ACCEPT, ACCEPT, DROP]


def test_hashlimit_entries_expire() -> None:
    rules = ("-A INPUT -m hashlimit --hashlimit-upto 1/hour --hashlimit-burst 1 "
             "--hashlimit-mode srcip --hashlimit-name e --hashlimit-htable-expire 1000 -j ACCEPT")
    with loader.TestRunner(compiled(rules, policy="DROP")) as r:
        assert [r.run(NfHook.LOCAL_IN, udp4()) for _ in range(2)] == [ACCEPT, DROP]
        time.sleep(0.3)
        assert r.run(NfHook.LOCAL_IN, udp4()) == DROP  # seen again: expiry postponed
        time.sleep(1.5)
        assert [r.run(NfHook.LOCAL_IN, udp4()) for _ in range(2)] == [ACCEPT, DROP]


# --- recent ---------------------------------------------------------------------------------------

def run_seq(rules: str, packets: list[bytes], family: int = 4,
            hook: NfHook = NfHook.LOCAL_IN) -> list[int]:
    return verdicts(rules, packets, family, hook=hook)


@pytest.mark.parametrize("family", [4, 6])
def test_recent_set_then_rcheck(family: int) -> None:
    rules = """
        -A INPUT -m recent --rcheck --name L -j DROP
        -A INPUT -m recent --set --name L
    """
    a, b = (udp4(S1), udp4(S2)) if family == 4 else (udp6("2001:db8::1"), udp6("2001:db8::2"))
    assert run_seq(rules, [a, a, b, a, b], family) == [ACCEPT, DROP, ACCEPT, DROP, DROP]


def test_recent_hitcount_and_remove() -> None:
    rules = """
        -A INPUT -d 198.18.0.8 -m recent --remove --name L -j ACCEPT
        -A INPUT -m recent --rcheck --hitcount 3 --name L -j DROP
        -A INPUT -m recent --set --name L
    """
    bye = udp4(S1, "198.18.0.8")
    got = run_seq(rules, [udp4()] * 4 + [bye, bye, udp4(), udp4()])
    # set, set, set (3 stamps), drop; removed; nothing to remove (falls to the set: 1 stamp)
    assert got == [ACCEPT, ACCEPT, ACCEPT, DROP, ACCEPT, ACCEPT, ACCEPT, ACCEPT]


def test_recent_seconds_and_update() -> None:
    rules = """
        -A INPUT -m recent --update --seconds 2 --name L -j DROP
        -A INPUT -m recent --set --name L
    """
    with loader.TestRunner(compiled(rules)) as r:
        assert [r.run(NfHook.LOCAL_IN, udp4()) for _ in range(2)] == [ACCEPT, DROP]
        time.sleep(1.2)
        assert r.run(NfHook.LOCAL_IN, udp4()) == DROP  # --update refreshed the stamp
        time.sleep(1.2)
        assert r.run(NfHook.LOCAL_IN, udp4()) == DROP  # 1.2 s after the last update
        time.sleep(2.5)
        assert r.run(NfHook.LOCAL_IN, udp4()) == ACCEPT  # stale: no update, then set again
        assert r.run(NfHook.LOCAL_IN, udp4()) == DROP


def test_recent_rcheck_does_not_refresh() -> None:
    rules = """
        -A INPUT -m recent --rcheck --seconds 2 --name L -j DROP
        -A INPUT -m recent --set --name L
    """
    with loader.TestRunner(compiled(rules)) as r:
        assert [r.run(NfHook.LOCAL_IN, udp4()) for _ in range(2)] == [ACCEPT, DROP]
        time.sleep(1.0)
        assert r.run(NfHook.LOCAL_IN, udp4()) == DROP
        time.sleep(1.5)
        assert r.run(NfHook.LOCAL_IN, udp4()) == ACCEPT


def test_recent_hitcount_within_seconds() -> None:
    rules = """
        -A INPUT -m recent --rcheck --seconds 1 --hitcount 2 --name L -j DROP
        -A INPUT -m recent --set --name L
    """
    with loader.TestRunner(compiled(rules)) as r:
        assert r.run(NfHook.LOCAL_IN, udp4()) == ACCEPT
        time.sleep(1.5)
        assert r.run(NfHook.LOCAL_IN, udp4()) == ACCEPT  # one stamp
        # two stamps, one within the second: no; then three, two within it: yes
        assert [r.run(NfHook.LOCAL_IN, udp4()) for _ in range(2)] == [ACCEPT, DROP]


def test_recent_rttl_rdest_and_mask() -> None:
    rules = """
        -A INPUT -s 198.18.0.1 -m recent --set --name T
        -A INPUT -m recent --rcheck --rttl --name T -j DROP
    """
    assert run_seq(rules, [udp4(ttl=64), udp4(S2, ttl=64)]) == [DROP, ACCEPT]
    for rttl, want in (("--rttl", [ACCEPT, ACCEPT, DROP]), ("", [ACCEPT, DROP, DROP])):
        rules = f"""
            -A INPUT -m ttl --ttl-eq 64 -m recent --set --name T -j ACCEPT
            -A INPUT -m recent --rcheck {rttl} --name T -j DROP
        """
        # listed with TTL 64: with --rttl a TTL 63 packet from that address is not found,
        # a TTL 0 one is (0 is the lookup's wildcard)
        assert run_seq(rules, [udp4(ttl=64), udp4(ttl=63), udp4(ttl=0)]) == want, rttl
    rules = """
        -A INPUT -s 198.18.0.1 -m recent --set --rdest --name D -j ACCEPT
        -A INPUT -m recent --rcheck --rdest --name D -j DROP
    """
    assert run_seq(rules, [udp4(S1, DST), udp4(S2, DST), udp4(S2, S1)]) == [ACCEPT, DROP, ACCEPT]
    rules = """
        -A INPUT -s 198.18.0.1 -m recent --set --mask 255.255.255.0 --name M -j ACCEPT
        -A INPUT -m recent --rcheck --mask 255.255.255.0 --name M -j DROP
    """
    assert run_seq(rules, [udp4(S1), udp4(S2), udp4(S3)]) == [ACCEPT, DROP, ACCEPT]


def test_recent_rttl_counts_the_ttl_before_forwarding() -> None:
    rules = """
        -A INPUT -m recent --set --name T -j ACCEPT
        -A FORWARD -m recent --rcheck --rttl --name T -j DROP
        -A OUTPUT -m recent --rcheck --rttl --name T -j DROP
    """
    with loader.TestRunner(compiled(rules)) as r:
        assert r.run(NfHook.LOCAL_IN, udp4(ttl=64)) == ACCEPT
        # at FORWARD a packet counts with ttl + 1; at OUTPUT (a local socket) as it is
        assert [r.run(NfHook.FORWARD, udp4(ttl=t)) for t in (63, 64)] == [DROP, ACCEPT]
        assert [r.run(NfHook.LOCAL_OUT, udp4(ttl=t)) for t in (63, 64)] == [ACCEPT, DROP]


@pytest.mark.parametrize(("cmd", "want"), [
    # from S2 (never set), S1 (set by the rule before), S2
    ("--rcheck", [ACCEPT, DROP, ACCEPT]),
    ("! --rcheck", [DROP, ACCEPT, DROP]),
    ("! --update", [DROP, ACCEPT, DROP]),
    ("! --set", [ACCEPT, ACCEPT, ACCEPT]),
    ("--remove", [ACCEPT, DROP, ACCEPT]),
    ("! --remove", [DROP, ACCEPT, DROP]),
])
def test_recent_negated(cmd: str, want: list[int]) -> None:
    rules = f"""
        -A INPUT -s 198.18.0.1 -m recent --set --name N
        -A INPUT -m recent {cmd} --name N -j DROP
    """
    assert run_seq(rules, [udp4(S2), udp4(S1), udp4(S2)]) == want


def test_recent_negated_update_stamps_a_stale_entry() -> None:
    rules = """
        -A INPUT -m recent --set --name N
        -A INPUT -m recent ! --update --seconds 5 --hitcount 3 --name N -j DROP
    """
    # 1: set (1 stamp); stale: the negated match holds and stamps (2 stamps): DROP
    # 2: set (3 stamps): a hit, so no match: ACCEPT (without the stamp it would be stale)
    assert run_seq(rules, [udp4()] * 3) == [DROP, ACCEPT, ACCEPT]


# --- the reference: the same packet sequences through iptables-legacy's raw PREROUTING --------

RX, TX = "h4rx", "h4tx"
SEND = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
for frame in sys.argv[2:]:
    s.send(bytes.fromhex(frame))
"""


def _ns(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *args], check=True, capture_output=True,
                          text=True, timeout=20).stdout


def _with_checksum(packet: bytes) -> bytes:
    """ip_rcv checks the IPv4 header checksum (the UDP one may be 0: none)."""
    header = bytearray(packet[:20])
    header[10:12] = testbed.checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + packet[20:]


@pytest.fixture(scope="module")
def wire() -> Iterator[tuple[str, bytes]]:
    if shutil.which("iptables-legacy-restore") is None:
        pytest.skip("iptables-legacy is not installed")
    ns = testbed.unique_name("h4st")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (f"link add {TX} type veth peer name {RX}", f"link set {TX} up",
                    f"link set {RX} up", f"addr add {DST}/24 dev {RX}"):
            subprocess.run(["ip", "-n", ns, *cmd.split()], check=True)
        mac = bytes.fromhex(_ns(ns, "cat", f"/sys/class/net/{RX}/address").strip()
                            .replace(":", ""))
        yield ns, mac
    finally:
        testbed.delete(ns)


TOOLS = {4: "iptables-legacy", 6: "ip6tables-legacy"}
ARRIVALS = {4: "-s 198.18.0.0/15", 6: "-s 2001:db8::/32"}  # our packets only (not ND, MLD)
OURS = {4: "-m iprange --src-range 198.18.0.0-198.19.255.255",  # the same, beside any -s
        6: "-m iprange --src-range 2001:db8::-2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"}
ETHERTYPE = {4: 0x0800, 6: 0x86DD}


def _family(packets: list[bytes]) -> int:
    return packets[0][0] >> 4


def _legacy_counts(ns: str, family: int) -> list[int]:
    out = _ns(ns, TOOLS[family], "-t", "raw", "-L", "PREROUTING", "-v", "-x", "-n")
    return [int(line.split()[0]) for line in out.splitlines()[2:] if line.strip()]


def _legacy_sequence(ns: str, mac: bytes, rules: list[str], packets: list[bytes]) -> list[
        list[int]]:
    """Per packet, the rule counters it incremented, in iptables-legacy (rules in raw
    PREROUTING behind a first rule counting arrivals)."""
    family = _family(packets)
    # every rule looks at our packets only: the namespace has its own IPv6 chatter
    text = ruleset("\n".join([f"-A PREROUTING {ARRIVALS[family]}",
                              *[f"-A PREROUTING {OURS[family]} {r}" for r in rules]]),
                   table="raw")
    # Flushed first: recent lists and hashlimit tables outlive a restore that names them again.
    _ns(ns, TOOLS[family], "-t", "raw", "-F")
    subprocess.run(["ip", "netns", "exec", ns, f"{TOOLS[family]}-restore"], input=text,
                   text=True, check=True, timeout=20)
    out = []
    before = _legacy_counts(ns, family)
    for p in packets:
        frame = mac + bytes.fromhex("020000000001") + struct.pack("!H", ETHERTYPE[family])
        _ns(ns, "python3", "-c", SEND, TX,
            (frame + (_with_checksum(p) if family == 4 else p)).hex())
        for _ in range(200):
            now = _legacy_counts(ns, family)
            if now[0] != before[0]:
                break
            time.sleep(0.005)
        else:
            raise AssertionError(f"packet {p.hex()} never reached raw PREROUTING")
        # a read may land while the packet is still between rules (on another CPU)
        while (again := _legacy_counts(ns, family)) != now:
            now = again
        out.append([b - a for a, b in zip(before, now, strict=True)][1:])
        before = now
    return out


def _bpfilter_sequence(rules: list[str], packets: list[bytes]) -> list[list[int]]:
    family = _family(packets)
    text = ruleset("\n".join(f"-A PREROUTING {OURS[family]} {r}" for r in rules),
                   table="raw")
    compiled_ = compile_ruleset(parse_restore(text, family=family), family)
    keys = [("raw", "PREROUTING", i + 1) for i in range(len(rules))]
    out = []
    with loader.TestRunner(compiled_) as r:
        before = r.counters()
        for p in packets:
            r.run(NfHook.PRE_ROUTING, p, table="raw")
            now = r.counters()
            out.append([now[k][0] - before.get(k, (0, 0))[0] for k in keys])
            before = now
    return out


def ip6x(*exts: tuple[int, bytes], upper: int = 17, payload: bytes = b"",
         src: str = "2001:db8::1") -> bytes:
    """IPv6 with extension headers ``(type, bytes)`` (their next-header bytes filled in)."""
    kinds = [k for k, _ in exts] + [upper]
    body = b"".join(bytes([kinds[i + 1]]) + data[1:] for i, (_, data) in enumerate(exts))
    body += payload
    return struct.pack("!IHBB16s16s", 6 << 28, len(body), kinds[0], 64,
                       ipaddress.IPv6Address(src).packed,
                       ipaddress.IPv6Address("2001:db8::9").packed) + body


DEST_OPTS = (60, b"\0\0\x01\x04\0\0\0\0")  # PadN to 8 bytes


def frag(offset: int) -> tuple[int, bytes]:
    return 44, struct.pack("!BBHI", 0, 0, offset << 3, 7)


def _pool(seed: int, n: int, **choices: list[object]) -> list[bytes]:
    rng = random.Random(seed)
    return [udp4(**{k: rng.choice(v) for k, v in choices.items()}) for _ in range(n)]  # type: ignore[arg-type]


MASK64 = "--mask ffff:ffff:ffff:ffff::"
REFERENCE_CASES: list[tuple[str, list[str], list[bytes]]] = [
    ("nth", ["-m statistic --mode nth --every 3 --packet 1 -j DROP",
             "-m statistic --mode nth ! --every 4 --packet 0",
             "-m statistic --mode nth --every 2 --packet 0"], [udp4()] * 13),
    ("limit", ["-m limit --limit 1/hour --limit-burst 4 -j DROP",
               "-m limit --limit 3/min"], [udp4()] * 10),
    ("hashlimit", ["-m hashlimit --hashlimit-upto 1/hour --hashlimit-burst 2 --hashlimit-mode "
                   "srcip,dstport --hashlimit-srcmask 31 --hashlimit-name hr -j DROP",
                   "-m hashlimit --hashlimit-above 1/hour --hashlimit-burst 3 --hashlimit-mode "
                   "dstip --hashlimit-name ha"],
     _pool(4, 30, src=["198.18.0.1", "198.18.0.2", "198.18.0.3", "198.18.0.4"],
           dst=["198.18.0.9", "198.18.0.10"], dport=[53, 54])),
    # ports as proto_ports_offset() finds them (ESP's SPI, AH's at 4), none for ICMP, a hot
    # drop when they are cut off (the second rule counts what was not dropped)
    ("hashlimit-ports", ["-m hashlimit --hashlimit-upto 1/hour --hashlimit-burst 1 "
                         "--hashlimit-mode srcport,dstport --hashlimit-name hp", ""],
     [udp4(sport=1), udp4(sport=1), udp4(sport=2), ip4(1, bytes(8)), ip4(1, bytes(8)),
      ip4(17, b"\0\1"), ip4(50, b"\0\1\0\1xxxx"), ip4(50, b"\0\1\0\2xxxx"),
      ip4(50, b"\0\1\0\1yyyy"), ip4(51, b"\0\0\0\0\0\1\0\1"),
      ip4(51, b"\1\1\1\1\0\1\0\1"), ip4(51, b"\0\0\0\0\0\1"), ip4(6, b"\0\1\0")]),
    ("hashlimit6", ["-m hashlimit --hashlimit-upto 1/hour --hashlimit-burst 1 "
                    "--hashlimit-mode srcip,srcport,dstport --hashlimit-srcmask 64 "
                    "--hashlimit-name h6", ""],
     [udp6(sport=1), udp6("2001:db8::2", sport=1), udp6("2001:db8:1::1", sport=1),
      ip6x(DEST_OPTS, payload=b"\0\2\0\5xxxx"), ip6x(DEST_OPTS, payload=b"\0\2\0\5yyyy"),
      ip6x(frag(0), payload=b"\0\3\0\5xxxx"), ip6x(frag(1), payload=b"\0\4\0\5xxxx"),
      ip6x(frag(2), payload=b"\0\x09\0\5xxxx"), ip6x(upper=58, payload=bytes(8)),
      ip6x(upper=59), ip6x(payload=b"\0\1")]),
    ("recent6", [f"-m recent --rcheck {MASK64} --hitcount 2 --name L6 -j DROP",
                 f"-m recent --set {MASK64} --name L6"],
     [udp6(s) for s in ("2001:db8::1", "2001:db8::2", "2001:db8:1::1", "2001:db8::3",
                        "2001:db8:1::2", "2001:db8:2::1", "2001:db8:1::1")]),
    ("recent", ["-d 198.18.0.8 -m recent --remove --name L -j DROP",
                "-m recent --rcheck --seconds 60 --hitcount 3 --name L -j DROP",
                "-m recent --set --name L"],
     _pool(7, 40, src=["198.18.0.1", "198.18.0.2", "198.18.0.3"],
           dst=["198.18.0.8", "198.18.0.9", "198.18.0.9"])),
    ("recent-rttl", ["-m recent ! --rcheck --rttl --name T",
                     "-m recent --update --rttl --hitcount 2 --name T",
                     "-m ttl --ttl-eq 64 -m recent --set --name T"],
     _pool(8, 40, src=["198.18.0.1", "198.18.0.2"], ttl=[0, 63, 64, 64])),
    ("recent-negated", ["-m recent ! --update --hitcount 3 --name U",
                        "-s 198.18.0.1 -m recent --set --name U",
                        "-s 198.18.0.2 -m recent ! --remove --name U"],
     _pool(9, 40, src=["198.18.0.1", "198.18.0.1", "198.18.0.2"])),
    ("recent-rdest", ["-m recent --set --rdest --mask 255.255.255.252 --name D",
                      "-m recent --rcheck --rdest --mask 255.255.255.252 --hitcount 4 --name D"],
     _pool(10, 30, dst=["198.18.0.8", "198.18.0.9", "198.18.0.10", "198.18.0.13"])),
]


@pytest.mark.skipif(socket.AF_PACKET is None, reason="no AF_PACKET")
@pytest.mark.parametrize(("name", "rules", "packets"), REFERENCE_CASES,
                         ids=[c[0] for c in REFERENCE_CASES])
def test_sequences_agree_with_iptables_legacy(wire: tuple[str, bytes], name: str,
                                              rules: list[str], packets: list[bytes]) -> None:
    ns, mac = wire
    want = _legacy_sequence(ns, mac, rules, packets)
    got = _bpfilter_sequence(rules, packets)
    assert got == want
    assert any(any(row) for row in want)  # the rules did match something


# --- XDP and TC ingress: the same matchers over the flavors' meta area -------------------------

@pytest.mark.parametrize("hook", [IfHook.XDP, IfHook.TC_INGRESS])
def test_stateful_matches_at_interface_hooks(hook: IfHook) -> None:
    import test_flavor_verdicts as fv

    rules = """
        -A INPUT -d 198.18.0.7 -m statistic --mode nth --every 3 --packet 2 -j DROP
        -A INPUT -d 198.18.0.8 -m limit --limit 1/hour --limit-burst 2 -j DROP
        -A INPUT -d 198.18.0.9 -p udp -m hashlimit --hashlimit-above 1/hour --hashlimit-burst 1 \
            --hashlimit-mode srcip,dstport --hashlimit-name h -j DROP
        -A INPUT -d 198.18.0.10 -m recent --rcheck --name r -j DROP
        -A INPUT -d 198.18.0.10 -m recent --set --name r
    """
    r = fv.Runner(fv.compiled(rules, hook))
    try:
        def run(*packets: bytes) -> list[int]:
            return [r.run(fv.frame(p)) for p in packets]

        nth = udp4(dst="198.18.0.7")
        assert run(*[nth] * 6) == [ACCEPT, ACCEPT, DROP] * 2
        lim = udp4(dst="198.18.0.8")
        assert run(*[lim] * 4) == [DROP, DROP, ACCEPT, ACCEPT]
        assert run(udp4(S1, "198.18.0.9"), udp4(S2, "198.18.0.9"), udp4(S1, "198.18.0.9"),
                   udp4(S1, "198.18.0.9", dport=54)) == [ACCEPT, ACCEPT, DROP, ACCEPT]
        assert run(udp4(S1, "198.18.0.10"), udp4(S2, "198.18.0.10"),
                   udp4(S1, "198.18.0.10")) == [ACCEPT, ACCEPT, DROP]
    finally:
        r.tr.close()


def random_rules(rng: random.Random) -> list[str]:
    """A few stateful rules whose answers do not depend on time (1/hour rates, 60 s windows
    that a test never outlasts), to compare sequences with iptables-legacy."""
    masks = {"A": rng.choice(["", "--mask 255.255.255.254"]), "B": ""}
    out = []
    for n in range(rng.randint(3, 6)):
        kind = rng.choice(["nth", "limit", "hashlimit", "recent", "recent", "recent"])
        neg = "! " if rng.random() < 0.3 else ""
        if kind == "nth":
            every = rng.randint(1, 4)
            rule = (f"-m statistic --mode nth {neg}--every {every} "
                    f"--packet {rng.randrange(every)}")
        elif kind == "limit":
            rule = f"-m limit --limit 1/hour --limit-burst {rng.randint(1, 4)}"
        elif kind == "hashlimit":
            modes = [m for m in ("srcip", "dstip", "srcport", "dstport") if rng.random() < 0.5]
            rule = (f"-m hashlimit --hashlimit-{rng.choice(['upto', 'above'])} 1/hour "
                    f"--hashlimit-burst {rng.randint(1, 3)} --hashlimit-name h{n}")
            if modes:
                rule += f" --hashlimit-mode {','.join(modes)}"
            if "srcip" in modes and rng.random() < 0.5:
                rule += " --hashlimit-srcmask 31"
        else:
            name = rng.choice("AB")
            cmd = rng.choice(["--set", "--rcheck", "--update", "--remove"])
            rule = f"-m recent {neg}{cmd} --name {name} {masks[name]}"
            if cmd in ("--rcheck", "--update"):
                if rng.random() < 0.5:
                    rule += f" --hitcount {rng.randint(1, 3)}"
                if rng.random() < 0.3:
                    rule += " --seconds 60"
                if rng.random() < 0.3:
                    rule += " --rttl"
            if rng.random() < 0.3:
                rule += " --rdest"
        target = rng.choice(["", "", "", " -j DROP", " -j ACCEPT"])
        out.append(rule.strip() + target)
    return out


def random_packets(rng: random.Random, n: int) -> list[bytes]:
    return [udp4(rng.choice([S1, S2, S3]), rng.choice([DST, "198.18.0.10", S1]),
                 sport=rng.choice([1, 2]), dport=rng.choice([53, 54]), ttl=rng.choice([63, 64]))
            for _ in range(n)]


SEEDS = list(range(int(os.environ.get("BPFILTER_SOAK", "0")) or 4))


@pytest.mark.skipif(socket.AF_PACKET is None, reason="no AF_PACKET")
@pytest.mark.parametrize("seed", SEEDS)
def test_random_sequences_agree_with_iptables_legacy(wire: tuple[str, bytes],
                                                     seed: int) -> None:
    """Random stateful rules and packets (BPFILTER_SOAK=N runs N seeds)."""
    ns, mac = wire
    rng = random.Random(seed)
    rules, packets = random_rules(rng), random_packets(rng, 30)
    assert _bpfilter_sequence(rules, packets) == _legacy_sequence(ns, mac, rules, packets), rules
