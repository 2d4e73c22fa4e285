"""Verdicts for conntrack details (--ctproto, --ct{orig,repl}{src,dst}[port], --ctstatus,
--ctexpire, --ctdir), connmark, mac and sctp, and the refusals of what cannot be exact.

BPF_PROG_TEST_RUN gives a packet no conntrack entry and the loopback device (not Ethernet), so
those runs check the "no entry" and "no MAC header" answers; the answers that need a real
entry or a real Ethernet header come from traffic between two namespaces, with the compiled
ruleset attached in one of them (conntrack on, as for iptables' conntrack match)."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from bpfilter import loader, netns, testbed
from bpfilter.codegen import flavor_netfilter as nf
from bpfilter.codegen.compiler import CompiledRuleset, CompileError, compile_ruleset
from bpfilter.codegen.uapi import NfHook
from bpfilter.grammar.iptables import parse_restore

DROP, ACCEPT = 0, 1
IPPROTO_SCTP = 132


def ip4(proto: int = 17, payload: bytes | None = None, *, src: str = "198.18.0.1",
        dst: str = "198.18.0.2", frag: int = 0) -> bytes:
    if payload is None:
        payload = struct.pack("!HHHH", 1234, 53, 12, 0) + b"xxxx"
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, frag, 64, proto, 0,
                       ipaddress.IPv4Address(src).packed,
                       ipaddress.IPv4Address(dst).packed) + payload


def ip6(proto: int = 17, payload: bytes | None = None) -> bytes:
    if payload is None:
        payload = struct.pack("!HHHH", 1234, 53, 12, 0) + b"xxxx"
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), proto, 64,
                       ipaddress.IPv6Address("2001:db8::1").packed,
                       ipaddress.IPv6Address("2001:db8::2").packed) + payload


def sctp(sport: int, dport: int, chunk: bool = True) -> bytes:
    """An SCTP common header (ports, verification tag, checksum) and one INIT chunk."""
    head = struct.pack("!HHII", sport, dport, 0x01020304, 0)
    return head + (struct.pack("!BBH", 1, 0, 4) if chunk else b"")


V6_NAMES = {"198.18.0.0/15": "2001:db8::/32", "10.0.0.0/8": "fd00::/8",
            "198.18.0.1": "2001:db8::1", "198.18.0.2": "2001:db8::2"}


def for_family(rule: str, family: int) -> str:
    """``rule`` with its IPv4 addresses replaced by IPv6 ones for family 6."""
    if family == 4:
        return rule
    return " ".join(V6_NAMES.get(w, w) for w in rule.split(" "))


def table(rules: str, name: str = "filter") -> str:
    chains = {"filter": ["INPUT", "FORWARD", "OUTPUT"], "raw": ["PREROUTING", "OUTPUT"]}[name]
    return "\n".join([f"*{name}", *[f":{c} ACCEPT [0:0]" for c in chains],
                      *[r.strip() for r in rules.strip().splitlines()], "COMMIT", ""])


def compiled(rules: str, family: int = 4, name: str = "filter") -> CompiledRuleset:
    return compile_ruleset(parse_restore(table(rules, name), family=family), family)


def run(rules: str, packets: list[bytes], family: int = 4,
        hook: NfHook = NfHook.LOCAL_IN, name: str = "filter") -> list[int]:
    with loader.TestRunner(compiled(rules, family, name)) as runner:
        return [runner.run(hook, p, table=name) for p in packets]


# --- without a conntrack entry (test runs) ------------------------------------------------------

# (rule, verdict for a packet without conntrack entry: its state is INVALID)
NO_ENTRY = [
    # conntrack_mt: no entry and no --ctstate: no match, negated options or not
    ("-m conntrack --ctproto udp", ACCEPT),
    ("-m conntrack ! --ctproto udp", ACCEPT),
    ("-m conntrack --ctdir ORIGINAL", ACCEPT),
    ("-m conntrack --ctdir REPLY", ACCEPT),
    ("-m conntrack ! --ctorigsrc 198.18.0.0/15", ACCEPT),
    ("-m conntrack ! --ctstatus ASSURED", ACCEPT),
    ("-m conntrack ! --ctexpire 5:10", ACCEPT),
    ("-m conntrack ! --ctrepldstport 80", ACCEPT),
    # ... and with --ctstate, exactly the state decides
    ("-m conntrack --ctstate INVALID --ctproto tcp", DROP),
    ("-m conntrack --ctstate INVALID --ctdir REPLY --ctstatus ASSURED", DROP),
    ("-m conntrack ! --ctstate NEW --ctorigsrc 10.0.0.0/8 --ctexpire 99", DROP),
    ("-m conntrack --ctstate NEW --ctproto udp", ACCEPT),
    # connmark_mt: no entry never matches
    ("-m connmark --mark 0", ACCEPT),
    ("-m connmark ! --mark 0x5/0xff", ACCEPT),
]


@pytest.mark.parametrize(("rule", "verdict"), NO_ENTRY, ids=[r for r, _ in NO_ENTRY])
@pytest.mark.parametrize("family", [4, 6])
def test_without_conntrack_entry(family: int, rule: str, verdict: int) -> None:
    packet = ip4() if family == 4 else ip6()
    assert run(f"-A INPUT {for_family(rule, family)} -j DROP", [packet], family) == [verdict]


@pytest.mark.parametrize(("chain", "hook", "name"), [
    ("INPUT", NfHook.LOCAL_IN, "filter"), ("FORWARD", NfHook.FORWARD, "filter"),
    ("OUTPUT", NfHook.LOCAL_OUT, "filter"), ("PREROUTING", NfHook.PRE_ROUTING, "raw"),
    ("OUTPUT", NfHook.LOCAL_OUT, "raw")])
def test_every_conntrack_option_loads_at_every_hook(chain: str, hook: NfHook, name: str) -> None:
    # Everything the prologue reads for these (tuples, status, timeout, mark, direction)
    # passes the verifier at each hook; without an entry only --ctstate INVALID decides.
    rules = f"""-A {chain} -m conntrack --ctproto tcp --ctorigsrc 198.18.0.1 --ctorigdst 198.18.0.2
                   --ctreplsrc 198.18.0.2 --ctrepldst 198.18.0.1 --ctorigsrcport 1:2
                   --ctorigdstport 3 --ctreplsrcport 4 --ctrepldstport 5:6 --ctstatus ASSURED
                   --ctexpire 1:2 --ctdir REPLY -j DROP
                -A {chain} -m connmark ! --mark 1 -j DROP
                -A {chain} -m conntrack --ctstate INVALID --ctexpire 7 --ctdir ORIGINAL -j DROP"""
    rules = " ".join(rules.split()).replace(" -A ", "\n-A ")
    for family in (4, 6):
        packet = ip4() if family == 4 else ip6()
        text = "\n".join(for_family(r, family) for r in rules.splitlines())
        assert run(text, [packet], family, hook, name) == [DROP]
        assert run(text.rsplit("\n", 1)[0], [packet], family, hook, name) == [ACCEPT]


# mac: a test run presents the loopback device (ARPHRD_LOOPBACK), so xt_mac never matches,
# negated or not.
@pytest.mark.parametrize("rule", ["-m mac --mac-source 02:00:00:00:00:01",
                                  "-m mac ! --mac-source 02:00:00:00:00:01",
                                  "-m mac ! --mac-source 00:00:00:00:00:00"])
@pytest.mark.parametrize(("chain", "hook", "name"), [
    ("INPUT", NfHook.LOCAL_IN, "filter"), ("FORWARD", NfHook.FORWARD, "filter"),
    ("PREROUTING", NfHook.PRE_ROUTING, "raw")])
def test_mac_without_ethernet_never_matches(rule: str, chain: str, hook: NfHook,
                                            name: str) -> None:
    assert run(f"-A {chain} {rule} -j DROP", [ip4()], 4, hook, name) == [ACCEPT]


# --- sctp ---------------------------------------------------------------------------------------

SCTP_CASES = [
    ("--dport 80", [(sctp(1000, 80), DROP), (sctp(1000, 81), ACCEPT), (sctp(80, 1000), ACCEPT)]),
    ("! --dport 80", [(sctp(1000, 80), ACCEPT), (sctp(1000, 81), DROP)]),
    ("--sport 1000:2000", [(sctp(1000, 1), DROP), (sctp(2000, 1), DROP), (sctp(999, 1), ACCEPT),
                           (sctp(2001, 1), ACCEPT)]),
    ("! --sport 1000:2000 --dport 5", [(sctp(999, 5), DROP), (sctp(1500, 5), ACCEPT),
                                       (sctp(999, 6), ACCEPT)]),
    ("", [(sctp(1, 2), DROP)]),
    # the common header alone is enough (no chunk needed without --chunk-types)
    ("--dport 2", [(sctp(1, 2, chunk=False), DROP)]),
]


@pytest.mark.parametrize(("opts", "expected"), SCTP_CASES, ids=[c[0] for c in SCTP_CASES])
@pytest.mark.parametrize("family", [4, 6])
def test_sctp_ports(family: int, opts: str, expected: list[tuple[bytes, int]]) -> None:
    build = ip4 if family == 4 else ip6
    got = run(f"-A INPUT -p sctp -m sctp {opts} -j DROP",
              [build(IPPROTO_SCTP, p) for p, _ in expected], family)
    assert got == [v for _, v in expected]


def chunk(kind: int, length: int = 4, flags: int = 0) -> bytes:
    """An SCTP chunk header claiming ``length`` bytes, padded to 4 with zeros."""
    body = bytes(max(0, length - 4))
    return struct.pack("!BBH", kind, flags, length) + body + bytes(-len(body) % 4)


DATA, INIT, SACK, ABORT = 0, 1, 3, 6
COMMON = struct.pack("!HHII", 1, 2, 0x01020304, 0)
CHUNK_PACKETS = {
    "init": COMMON + chunk(INIT, 20),
    "data": COMMON + chunk(DATA, 17),  # a length that is not a multiple of 4: padded
    "data,init": COMMON + chunk(DATA, 17) + chunk(INIT, 20),
    "data,sack": COMMON + chunk(DATA) + chunk(SACK, 16),
    "init,zero": COMMON + chunk(INIT) + struct.pack("!BBH", DATA, 0, 0),
    "init,cut": COMMON + chunk(INIT) + b"\0\0",  # the next chunk header is cut short
    "none": COMMON,  # not even one chunk header
    "abort,big": COMMON + chunk(ABORT) + chunk(200, 8),
}
# (option, packets it matches, packets it hot-drops); the others it misses
CHUNK_CASES = [
    ("any INIT", {"init", "data,init", "init,zero", "init,cut"}, {"none"}),
    ("any DATA,SACK", {"data", "data,init", "data,sack"}, {"init,zero", "init,cut", "none"}),
    ("all INIT,DATA", {"data,init"}, {"init,zero", "init,cut", "none"}),
    ("all INIT", {"init", "data,init"}, {"init,zero", "init,cut", "none"}),
    ("only DATA,SACK", {"data", "data,sack"}, {"none"}),
    ("only INIT", {"init"}, {"init,zero", "init,cut", "none"}),
    ("any ALL", set(CHUNK_PACKETS) - {"none"}, {"none"}),
    ("all NONE", {"init", "data", "data,init", "data,sack", "abort,big"},
     {"init,zero", "init,cut", "none"}),
    ("only ABORT", set(), {"none"}),
]


@pytest.mark.parametrize(("opt", "hits", "hot"), CHUNK_CASES, ids=[c[0] for c in CHUNK_CASES])
@pytest.mark.parametrize("family", [4, 6])
def test_sctp_chunk_types(family: int, opt: str, hits: set[str], hot: set[str]) -> None:
    # A matching packet is dropped by the rule, a missing one by the policy-like last rule
    # after an ACCEPT: hot drops show as DROP under the rule's ACCEPT.
    build = ip4 if family == 4 else ip6
    names = list(CHUNK_PACKETS)
    packets = [build(IPPROTO_SCTP, CHUNK_PACKETS[n]) for n in names]
    accept = run(f"-A INPUT -p sctp -m sctp --chunk-types {opt} -j ACCEPT\n-A INPUT -j DROP",
                 packets, family)
    assert {n for n, v in zip(names, accept, strict=True) if v == ACCEPT} == hits
    drop = run(f"-A INPUT -p sctp -m sctp --chunk-types {opt} -j DROP", packets, family)
    assert {n for n, v in zip(names, drop, strict=True) if v == DROP} == hits | hot


def test_sctp_truncated_header_hot_drops_and_fragments_miss() -> None:
    # sctp_mt: fewer than 12 bytes of header -> hot drop (even under an ACCEPT rule);
    # a non-first fragment has no header -> the match fails.
    rules = "-A INPUT -p sctp -m sctp ! --dport 9 -j ACCEPT\n-A INPUT -j DROP"
    short = sctp(1, 2)[:8]
    later = ip4(IPPROTO_SCTP, sctp(1, 2), frag=1)
    assert run(rules, [ip4(IPPROTO_SCTP, short), later, ip4(IPPROTO_SCTP, sctp(1, 2))]) == \
        [DROP, DROP, ACCEPT]
    assert run("-A INPUT -p sctp -m sctp ! --dport 9 -j DROP",
               [ip4(IPPROTO_SCTP, sctp(1, 2), frag=1)]) == [ACCEPT]
    assert run("-A INPUT -p sctp --dport 2 -j ACCEPT\n-A INPUT -j DROP",
               [ip6(IPPROTO_SCTP, sctp(1, 2)[:11])], 6) == [DROP]


def test_conntrack_struct_sizes_match_btf() -> None:
    # The prologue copies tuples with constant sizes and steps over tuplehash[0] by one.
    btf = loader._btf()
    assert btf.struct_size("nf_conntrack_tuple") == nf.CT_TUPLE_SIZE
    assert btf.struct_size("nf_conntrack_tuple_hash") == nf.CT_TUPLE_HASH_SIZE
    assert loader.kernel_hz() > 0


# --- refusals -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "message"), [
    (table("-A INPUT -p sctp -m sctp ! --chunk-types any INIT -j DROP"),
     "line 5: match 'sctp' option '! --chunk-types' is not supported: when the chunk walk "
     "hot-drops, iptables still counts the rule (the negation holds), bpfilter cannot"),
    (table("-A INPUT -p sctp -m sctp --chunk-types any DATA:Be -j DROP"),
     "line 5: match 'sctp' option '--chunk-types' with chunk flags is not supported"),
    (table("-A PREROUTING -m rpfilter -j DROP", "raw"),
     "line 4: match 'rpfilter' is not supported: it needs a FIB lookup, and netfilter BPF "
     "programs have none (bpf_fib_lookup is for XDP and TC)"),
    (table("-A INPUT -m addrtype --dst-type LOCAL -j DROP"),
     "line 5: match 'addrtype' is not supported: it looks addresses up in the routing tables "
     "(inet_dev_addr_type, ip6_route_output), and netfilter BPF programs cannot "
     "(bpf_fib_lookup is for XDP and TC)"),
    (table("-A INPUT -p tcp -m connlimit --connlimit-above 4 -j DROP"),
     "line 5: match 'connlimit' is not supported: it counts the conntrack entries per address "
     "(nf_conncount), which a BPF program cannot enumerate"),
])
def test_refusals(text: str, message: str) -> None:
    with pytest.raises(CompileError) as e:
        compile_ruleset(parse_restore(text), 4)
    assert str(e.value) == message


# --- with real conntrack entries and Ethernet headers (two namespaces) --------------------------

@pytest.fixture
def pair() -> Iterator[testbed.NetnsPair]:
    with testbed.netns_pair() as p:
        yield p


def udp_to(pair: testbed.NetnsPair, port: int, family: int = 4) -> bool:
    """A datagram from a arrives at a socket on b's ``port``."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    addr = pair.ipv4_b if family == 4 else pair.ipv6_b
    with netns.entered(pair.b):
        rx = socket.socket(af, socket.SOCK_DGRAM)
    with rx:
        rx.bind((addr, port))
        rx.settimeout(0.5)
        with netns.entered(pair.a):
            tx = socket.socket(af, socket.SOCK_DGRAM)
        with tx:
            tx.bind(("" if family == 4 else "::", 0))
            tx.sendto(b"h3", (addr, port))
            try:
                return rx.recv(16) == b"h3"
            except TimeoutError:
                return False


def loaded(pair: testbed.NetnsPair, rules: str, family: int = 4) -> loader.Loaded:
    return loader.load(compiled(rules, family), netns=pair.b, pin=False)


def counts(handle: loader.Loaded, chain: str, n: int) -> list[int]:
    c = handle.counters()
    return [c[("filter", chain, i + 1)][0] for i in range(n)]


def matched(pair: testbed.NetnsPair, chain: str, rules: list[str],
            actions: list[Callable[[], object]], family: int = 4) -> list[list[bool]]:
    """For each action (sending traffic), which of the count-only ``rules`` counted a packet."""
    with loaded(pair, "\n".join(f"-A {chain} {r}" for r in rules), family) as handle:
        out = []
        before = counts(handle, chain, len(rules))
        for act in actions:
            act()
            after = counts(handle, chain, len(rules))
            out.append([x > y for x, y in zip(after, before, strict=True)])
            before = after
    return out


@pytest.mark.parametrize("family", [4, 6])
def test_tuple_options_with_real_entries(pair: testbed.NetnsPair, family: int) -> None:
    a = pair.ipv4_a if family == 4 else pair.ipv6_a
    b = pair.ipv4_b if family == 4 else pair.ipv6_b
    wide = "198.18.0.0/15" if family == 4 else "2001:db8::/32"
    other = "203.0.113.0/24" if family == 4 else "2001:db9::/32"
    cases = [
        (f"--ctproto udp --ctorigsrc {a} --ctorigdstport 40000", True),
        (f"--ctproto udp --ctorigsrc {a} --ctorigdstport 40001", False),
        ("! --ctproto udp --ctorigdstport 40000", False),
        ("--ctproto 17 ! --ctorigdstport 40001", True),
        (f"--ctorigdst {b} --ctreplsrc {b} --ctrepldst {a}", True),
        (f"--ctorigsrc {wide} ! --ctorigdst {other}", True),
        (f"--ctorigsrc {other}", False),
        (f"! --ctorigsrc {other} --ctreplsrcport 40000", True),
        ("--ctreplsrcport 39999", False),
        ("--ctreplsrcport 39000:40000 --ctrepldstport 1024:65535", True),
        ("! --ctrepldstport 1024:65535", False),
        ("--ctdir ORIGINAL --ctstate NEW", True),
        ("--ctdir REPLY", False),
        ("--ctstatus CONFIRMED", False),  # the first packet: not yet confirmed
        ("! --ctstatus CONFIRMED,ASSURED,SEEN_REPLY", True),
    ]
    rules = [f"-p udp -m conntrack {r}" for r, _ in cases]
    (got,) = matched(pair, "INPUT", rules, [lambda: udp_to(pair, 40000, family)], family)
    assert got == [m for _, m in cases]
    # and as a verdict
    with loaded(pair, f"-A INPUT -p udp -m conntrack {cases[0][0]} -j DROP", family):
        assert not udp_to(pair, 40000, family)
        assert udp_to(pair, 40001, family)


def test_direction_and_status_on_a_reply(pair: testbed.NetnsPair) -> None:
    # b pings a: the echo reply entering b is in the reply direction of an entry b's request
    # created, with SEEN_REPLY set; a's requests entering b are ORIGINAL, with no reply yet.
    a, b = pair.ipv4_a, pair.ipv4_b
    cases = [
        ("--ctdir REPLY", True, False), ("--ctdir ORIGINAL", False, True),
        ("--ctstatus SEEN_REPLY", True, False), ("! --ctstatus SEEN_REPLY", False, True),
        ("--ctstatus NONE", False, False), ("! --ctstatus NONE", True, True),
        ("--ctstate ESTABLISHED --ctdir REPLY --ctproto icmp", True, False),
        (f"--ctorigsrc {b} --ctreplsrc {a}", True, False),
        (f"--ctorigsrc {a} --ctorigdst {b} --ctreplsrc {b} --ctrepldst {a}", False, True),
        (f"! --ctrepldst {b}/32", False, True),
        ("--ctstate NEW --ctdir REPLY", False, False),
    ]
    rules = [f"-p icmp -m conntrack {r}" for r, _, _ in cases]
    reply, request = matched(pair, "INPUT", rules, [lambda: testbed.ping(pair.b, a),
                                                    lambda: testbed.ping(pair.a, b)])
    assert reply == [r for _, r, _ in cases]
    assert request == [q for _, _, q in cases]
    with loaded(pair, "-A INPUT -p icmp -m conntrack --ctdir REPLY -j DROP"):
        assert not testbed.ping(pair.b, a)
        assert testbed.ping(pair.a, b)


def test_ctexpire_counts_seconds_left(pair: testbed.NetnsPair) -> None:
    # The echo reply b receives finds the confirmed entry with about
    # nf_conntrack_icmp_timeout (30 s) left.
    rules = ["-p icmp -m conntrack --ctstate ESTABLISHED --ctexpire 25:30",
             "-p icmp -m conntrack --ctstate ESTABLISHED ! --ctexpire 25:30",
             "-p icmp -m conntrack --ctstate ESTABLISHED --ctexpire 31:4294967295",
             "-p icmp -m conntrack --ctstate ESTABLISHED ! --ctexpire 0:24"]
    (got,) = matched(pair, "INPUT", rules, [lambda: testbed.ping(pair.b, pair.ipv4_a)])
    assert got == [True, False, False, True]


def _nft(ns: str, script: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script, text=True,
                   check=True)


@pytest.mark.parametrize("family", [4, 6])
def test_connmark(pair: testbed.NetnsPair, family: int) -> None:
    # nftables in b marks the conntrack entry of udp flows to port 40000 (after conntrack at
    # -200, before the filter priority the program runs at).
    _nft(pair.b, "table inet bpft_h3 {\n chain pre {\n  type filter hook prerouting priority -150;"
                 "\n  udp dport 40000 ct mark set 0x1234\n }\n}\n")
    cases = [("--mark 0x1234", True, False), ("! --mark 0x1234", False, True),
             ("--mark 0x34/0xff", True, False), ("--mark 0x1200/0xff00", True, False),
             ("--mark 0x1235/0xff00", False, False),  # mark bits outside the mask never match
             ("--mark 0", False, True), ("! --mark 0/0xffff", True, False)]
    rules = [f"-p udp -m connmark {r}" for r, _, _ in cases]
    to_40000, to_40001 = matched(pair, "INPUT", rules, [lambda: udp_to(pair, 40000, family),
                                                        lambda: udp_to(pair, 40001, family)],
                                 family)
    assert to_40000 == [m for _, m, _ in cases]
    assert to_40001 == [m for _, _, m in cases]
    with loaded(pair, "-A INPUT -p udp -m connmark --mark 0x1234 -j DROP", family):
        assert not udp_to(pair, 40000, family)
        assert udp_to(pair, 40001, family)


def _mac(ns: str, ifname: str) -> str:
    out = testbed.run(ns, ["cat", f"/sys/class/net/{ifname}/address"]).stdout
    return out.strip()


@pytest.mark.parametrize("family", [4, 6])
def test_mac_source(pair: testbed.NetnsPair, family: int) -> None:
    mac_a = _mac(pair.a, pair.ifname(pair.a))
    other = "02:00:00:00:00:09" if mac_a != "02:00:00:00:00:09" else "02:00:00:00:00:0a"
    b = pair.ipv4_b if family == 4 else pair.ipv6_b
    echo = "-p icmp --icmp-type echo-request" if family == 4 else \
        "-p ipv6-icmp --icmpv6-type echo-request"
    cases = [(f"--mac-source {mac_a}", True), (f"--mac-source {other}", False),
             (f"! --mac-source {mac_a}", False), (f"! --mac-source {other}", True),
             (f"--mac-source {mac_a.upper()}", True)]
    rules = [f"{echo} -m mac {r}" for r, _ in cases]
    (got,) = matched(pair, "INPUT", rules, [lambda: testbed.ping(pair.a, b)], family)
    assert got == [m for _, m in cases]
    with loaded(pair, f"-A INPUT {echo} -m mac --mac-source {mac_a} -j DROP", family):
        assert not testbed.ping(pair.a, b)


# --- tcp --tcp-option and tcpmss (one walk of the options, as tcp_find_option/tcpmss_mt) --------

MSS_1460 = bytes([2, 4, 0x05, 0xB4])
TS = bytes([8, 10, 5, 5, 5, 5, 2, 4, 0, 1])  # the data holds bytes 5 and 2, 4: never options
OPTS = MSS_1460 + bytes([1, 1, 4, 2, 3, 3, 7, 1]) + TS + bytes([0, 0])  # 24 bytes


def tcp(options: bytes = b"", *, doff: int | None = None, cut: int = 0,
        flags: int = 0x02) -> bytes:
    """A TCP header with ``options`` (padded to 4 bytes), data offset ``doff`` (default:
    what the options need), the last ``cut`` bytes removed."""
    options += bytes(-len(options) % 4)
    if doff is None:
        doff = 5 + len(options) // 4
    head = struct.pack("!HHIIBBHHH", 1234, 80, 1, 0, doff << 4, flags, 1024, 0, 0)
    segment = head + options
    return segment[:len(segment) - cut] if cut else segment


OPTION_CASES = [
    (OPTS, {2: True, 1: True, 4: True, 3: True, 8: True, 0: True, 5: False, 30: False}),
    # a zero length advances by one byte, so the byte after it is read as a kind
    (bytes([9, 0, 30, 2, 1, 1, 1, 1]), {9: True, 30: True, 1: True}),
    # the walk goes on after End of Option List (kind 0)
    (bytes([0, 0, 6, 2]), {0: True, 6: True}),
    # an option whose length runs past the end: the walk stops there
    (bytes([7, 30, 5, 5]), {7: True, 5: False}),
    (b"", {2: False, 1: False}),
]


@pytest.mark.parametrize("family", [4, 6])
def test_tcp_option(family: int) -> None:
    # One count-only rule per kind and its negation; each packet's counter changes say which
    # matched. --tcp-option 0 is no test in tcp_mt: it matches, negated or not.
    build = ip4 if family == 4 else ip6
    kinds = sorted({k for _, found in OPTION_CASES for k in found})
    rules = [f"-A INPUT -p tcp {bang}--tcp-option {k}" for k in kinds for bang in ("", "! ")]
    with loader.TestRunner(compiled("\n".join(rules), family)) as runner:
        for options, found in OPTION_CASES:
            before = runner.counters()
            assert runner.run(NfHook.LOCAL_IN, build(6, tcp(options))) == ACCEPT
            after = runner.counters()
            hit = [after[("filter", "INPUT", i + 1)][0] > before[("filter", "INPUT", i + 1)][0]
                   for i in range(len(rules))]
            for i, k in enumerate(kinds):
                if k not in found:
                    continue
                want = (found[k], not found[k]) if k else (True, True)
                assert (hit[2 * i], hit[2 * i + 1]) == want, (options.hex(), k)


@pytest.mark.parametrize("family", [4, 6])
def test_tcp_option_hot_drops_and_zero(family: int) -> None:
    build = ip4 if family == 4 else ip6
    rule = "-A INPUT -p tcp ! --tcp-option 2 -j ACCEPT\n-A INPUT -p tcp -j ACCEPT"
    assert run(rule, [build(6, tcp(doff=4)), build(6, tcp(OPTS, cut=4)),
                      build(6, tcp(doff=5)), build(6, tcp(doff=4) + bytes(8))], family) == \
        [DROP, DROP, ACCEPT, DROP]
    # without an option test a bad data offset is not looked at
    assert run("-A INPUT -p tcp --dport 80 -j DROP", [build(6, tcp(doff=4))], family) == [DROP]
    # --tcp-option 0 is no test at all in tcp_mt (option 0 means "none")
    assert run("-A INPUT -p tcp ! --tcp-option 0 -j DROP", [build(6, tcp(OPTS))], family) == \
        [DROP]
    assert run("-A INPUT -p tcp --tcp-option 0 -j DROP", [build(6, tcp(doff=4))], family) == \
        [DROP]


def test_tcp_option_on_a_later_fragment_misses() -> None:
    later = ip4(6, tcp(OPTS), frag=2)
    assert run("-A INPUT -p tcp ! --tcp-option 5 -j DROP", [later]) == [ACCEPT]


MSS_CASES = [
    ("--mss 1460", [(OPTS, DROP), (bytes([2, 4, 0x05, 0xB5]), ACCEPT), (b"", ACCEPT)]),
    ("--mss 1400:1500", [(OPTS, DROP), (bytes([1, 2, 4, 0x05, 0xDC]), DROP),
                         (bytes([2, 4, 0x05, 0xDD]), ACCEPT)]),
    ("! --mss 1400:1500", [(OPTS, ACCEPT), (bytes([2, 4, 0x05, 0xDD]), DROP), (b"", DROP)]),
    ("--mss 0:65535", [(b"", ACCEPT), (bytes([1, 1, 1, 1]), ACCEPT), (OPTS, DROP)]),
    # kind 2 with a length other than 4 is stepped over; the next well-formed one decides
    ("--mss 536", [(bytes([2, 3, 0, 2, 4, 0x02, 0x18, 0]), DROP),
                   (bytes([2, 6, 0, 0, 0, 0, 2, 4, 0x02, 0x18]), DROP),
                   (bytes([2, 4, 0x02, 0x18, 2, 4, 0x05, 0xB4]), DROP),
                   (bytes([2, 4, 0x05, 0xB4, 2, 4, 0x02, 0x18]), ACCEPT)]),
    # an MSS option without its 4 bytes before the end of the options does not count
    ("! --mss 0:65535", [(bytes([1, 1, 2, 4]), DROP), (bytes([1, 1, 1, 1, 2, 4, 0, 1]), ACCEPT)]),
]


@pytest.mark.parametrize(("opts", "cases"), MSS_CASES, ids=[c[0] for c in MSS_CASES])
@pytest.mark.parametrize("family", [4, 6])
def test_tcpmss(family: int, opts: str, cases: list[tuple[bytes, int]]) -> None:
    build = ip4 if family == 4 else ip6
    got = run(f"-A INPUT -p tcp -m tcpmss {opts} -j DROP",
              [build(6, tcp(o)) for o, _ in cases], family)
    assert got == [v for _, v in cases]


@pytest.mark.parametrize("family", [4, 6])
def test_tcpmss_hot_drops(family: int) -> None:
    build = ip4 if family == 4 else ip6
    rules = "-A INPUT -p tcp -m tcpmss ! --mss 1:2 -j ACCEPT\n-A INPUT -j ACCEPT"
    assert run(rules, [build(6, tcp(OPTS)[:19]), build(6, tcp(doff=4)),
                       build(6, tcp(OPTS, cut=1)), build(6, tcp(OPTS))], family) == \
        [DROP, DROP, DROP, ACCEPT]


def test_tcpmss_reads_later_fragments_too() -> None:
    # tcpmss_mt has no fragment test: the bytes at the transport offset are taken as TCP
    later = ip4(6, tcp(OPTS), frag=2)
    assert run("-A INPUT -p tcp -m tcpmss --mss 1460 -j DROP", [later]) == [DROP]


@pytest.mark.parametrize(("chain", "hook", "name"), [
    ("FORWARD", NfHook.FORWARD, "filter"), ("OUTPUT", NfHook.LOCAL_OUT, "filter"),
    ("PREROUTING", NfHook.PRE_ROUTING, "raw"), ("OUTPUT", NfHook.LOCAL_OUT, "raw")])
def test_tcp_options_at_other_hooks(chain: str, hook: NfHook, name: str) -> None:
    rules = (f"-A {chain} -p tcp -m tcpmss --mss 1460 -m tcp --tcp-option 8 -j DROP\n"
             f"-A {chain} -p sctp --dport 80 -j DROP")
    packets = [ip4(6, tcp(OPTS)), ip4(6, tcp(MSS_1460)), ip4(IPPROTO_SCTP, sctp(1, 80))]
    assert run(rules, packets, 4, hook, name) == [DROP, ACCEPT, DROP]


# --- the option walk against real iptables-legacy ------------------------------------------------

ORACLE_RULES = [
    *[f"-p tcp -m tcp --tcp-option {k}" for k in (1, 2, 3, 4, 5, 6, 7, 8, 9, 30)],
    "-p tcp -m tcp ! --tcp-option 2",
    "-p tcp -m tcpmss --mss 1460", "-p tcp -m tcpmss --mss 536",
    "-p tcp -m tcpmss --mss 1400:1500", "-p tcp -m tcpmss ! --mss 0:65535",
]
ORACLE_SEGMENTS = [
    *[tcp(o) for o, _ in OPTION_CASES], *[tcp(o) for _, cases in MSS_CASES for o, _ in cases],
    tcp(OPTS, cut=4), tcp(doff=4), tcp(doff=4) + bytes(4), tcp(doff=15), tcp(OPTS)[:18],
]


def _legacy_counts(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "exec", ns, "iptables-legacy-save", "-c", "-t", "filter"],
                         capture_output=True, text=True, check=True).stdout
    return [int(line[1:].split(":", 1)[0]) for line in out.splitlines()
            if line.startswith("[") and " -A INPUT " in line]


def _send(pair: testbed.NetnsPair, segment: bytes, proto: int = 6) -> None:
    """``segment`` as the payload of an IPv4 packet from a to b (the kernel fills in the IP
    checksum and total length of an IPPROTO_RAW socket's packets)."""
    packet = ip4(proto, segment, src=pair.ipv4_a, dst=pair.ipv4_b)
    with netns.entered(pair.a):
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    with s:
        s.sendto(packet, (pair.ipv4_b, 0))


SENTINEL_PORT = 7  # a segment to this port is accepted by the first rule, counted there


def _counts_per_segment(pair: testbed.NetnsPair, read: Callable[[], list[int]],
                        segments: list[bytes] = ORACLE_SEGMENTS,
                        proto: int = 6) -> list[list[int]]:
    """Per segment, the counter changes of every rule but the first; a sentinel segment sent
    after each one (counted by the first rule, which accepts it) says it has been seen."""
    out = []
    before = read()
    sentinel = struct.pack("!HHIIBBHHH", 1234, SENTINEL_PORT, 1, 0, 5 << 4, 0x10, 1024, 0, 0)
    for segment in segments:
        _send(pair, segment, proto)
        _send(pair, sentinel)
        for _ in range(200):  # delivery over the veth is asynchronous, but in order
            after = read()
            if after[0] > before[0]:
                break
            time.sleep(0.005)
        else:
            raise AssertionError("the sentinel segment never arrived")
        out.append([x - y for x, y in zip(after[1:], before[1:], strict=True)])
        before = after
    return out


@pytest.mark.skipif(shutil.which("iptables-legacy-restore") is None,
                    reason="iptables-legacy not installed")
def test_tcp_options_as_iptables_legacy(pair: testbed.NetnsPair) -> None:
    # Per crafted segment, which rules counted it: bpfilter in b, then iptables-legacy in b
    # (whose filter table, once created, keeps priority 0 taken). A hot drop stops the walk
    # through the chain in both, so later rules stay at zero.
    a = pair.ipv4_a
    rules = "\n".join([f"-A INPUT -s {a} -p tcp --dport {SENTINEL_PORT} -j ACCEPT",
                       *[f"-A INPUT -s {a} {r}" for r in ORACLE_RULES]])
    with loaded(pair, rules) as handle:
        got = _counts_per_segment(pair, lambda: counts(handle, "INPUT", len(ORACLE_RULES) + 1))
    subprocess.run(["ip", "netns", "exec", pair.b, "iptables-legacy-restore"],
                   input=table(rules), text=True, check=True)
    reference = _counts_per_segment(pair, lambda: _legacy_counts(pair.b))
    assert any(any(row) for row in reference)
    for segment, want, have in zip(ORACLE_SEGMENTS, reference, got, strict=True):
        assert have == want, segment.hex()


# --- owner ---------------------------------------------------------------------------------------

# A test run's packet has no socket (skb->sk is NULL): owner_mt's "no socket" answer,
# (match ^ invert) == 0, that is every option negated.
OWNER_NO_SOCKET = [
    ("--uid-owner 0", ACCEPT), ("! --uid-owner 0", DROP), ("--socket-exists", ACCEPT),
    ("! --socket-exists", DROP), ("! --uid-owner 1 --gid-owner 2", ACCEPT),
    ("! --uid-owner 1 ! --gid-owner 2", DROP), ("! --socket-exists ! --gid-owner 0-9", DROP),
]


@pytest.mark.parametrize(("rule", "verdict"), OWNER_NO_SOCKET, ids=[r for r, _ in OWNER_NO_SOCKET])
@pytest.mark.parametrize("name", ["filter", "raw"])
def test_owner_without_socket(rule: str, verdict: int, name: str) -> None:
    for family in (4, 6):
        packet = ip4() if family == 4 else ip6()
        assert run(f"-A OUTPUT -m owner {rule} -j DROP", [packet], family,
                   NfHook.LOCAL_OUT, name) == [verdict]


def test_owner_supplementary_groups_are_refused() -> None:
    with pytest.raises(CompileError, match="option '--suppl-groups' is not supported: it walks"):
        compiled("-A OUTPUT -m owner --gid-owner 5 --suppl-groups -j DROP")


OWNER_RULES = [
    "--uid-owner 1234", "! --uid-owner 1234", "--uid-owner 1000-2000", "--gid-owner 2345",
    "! --gid-owner 0", "--socket-exists", "! --socket-exists", "--uid-owner 0 --gid-owner 0",
    "! --uid-owner 1234 ! --gid-owner 2345", "--socket-exists ! --uid-owner 0",
    "--uid-owner 0-4294967294 ! --gid-owner 2345",
]


def _udp_from_b(pair: testbed.NetnsPair, user: tuple[int, int] | None) -> bool:
    """A datagram sent from b (as root, or by a process with uid and gid ``user``) reaches
    a socket in a."""
    with netns.entered(pair.a):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with rx:
        rx.bind((pair.ipv4_a, 0))
        rx.settimeout(0.5)
        port = rx.getsockname()[1]
        send = (f"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
                f".sendto(b'h3', ('{pair.ipv4_a}', {port}))")
        who = [] if user is None else ["setpriv", f"--reuid={user[0]}", f"--regid={user[1]}",
                                       "--clear-groups"]
        # a datagram LOCAL_OUT drops fails with EPERM: the exit status is not looked at
        subprocess.run(["ip", "netns", "exec", pair.b, *who, sys.executable, "-c", send],
                       capture_output=True, timeout=10)
        try:
            return rx.recv(16) == b"h3"
        except TimeoutError:
            return False


def _reset_from_b(pair: testbed.NetnsPair) -> bool:
    """A connection from a to a closed port of b is refused: b's kernel socket (no file)
    sent the reset."""
    with netns.entered(pair.a):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with s:
        s.settimeout(0.5)
        try:
            s.connect((pair.ipv4_b, 9))
        except ConnectionRefusedError:
            return True
        except (TimeoutError, OSError):
            return False
    return False


LISTEN_PORT = 8080


def _synack_from_b(pair: testbed.NetnsPair, listener: subprocess.Popen[str]) -> bool:
    """a connects to the listener uid 1234 runs in b: b's SYN-ACK leaves from a request
    sock, which sk_to_full_sk() replaces by the listener. The socket stays open: its close
    would make b send more (and it is the last probe)."""
    assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
    with netns.entered(pair.a):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(2)
    s.connect((pair.ipv4_b, LISTEN_PORT))
    time.sleep(0.05)
    pair_sockets.append(s)
    return True


pair_sockets: list[socket.socket] = []


def _listener(pair: testbed.NetnsPair) -> subprocess.Popen[str]:
    code = (f"import socket, sys; s = socket.socket(); s.bind(('{pair.ipv4_b}', {LISTEN_PORT}));"
            " s.listen(); print('ready', flush=True); sys.stdin.read()")
    return subprocess.Popen(["ip", "netns", "exec", pair.b, "setpriv", "--reuid=1234",
                             "--regid=2345", "--clear-groups", sys.executable, "-c", code],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _owner_probes(pair: testbed.NetnsPair,
                  listener: subprocess.Popen[str]) -> list[Callable[[], bool]]:
    return [lambda: _udp_from_b(pair, None), lambda: _udp_from_b(pair, (1234, 2345)),
            lambda: _udp_from_b(pair, (1500, 0)), lambda: _reset_from_b(pair),
            lambda: testbed.ping(pair.a, pair.ipv4_b), lambda: _synack_from_b(pair, listener)]


def _legacy_output_counts(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "exec", ns, "iptables-legacy-save", "-c", "-t", "filter"],
                         capture_output=True, text=True, check=True).stdout
    return [int(line[1:].split(":", 1)[0]) for line in out.splitlines()
            if line.startswith("[") and " -A OUTPUT " in line]


def _owner_hits(pair: testbed.NetnsPair, read: Callable[[], list[int]]) -> list[list[int]]:
    out = []
    listener = _listener(pair)
    try:
        before = read()
        for probe in _owner_probes(pair, listener):
            assert probe()  # count-only rules: everything is delivered
            after = read()
            out.append([x - y for x, y in zip(after, before, strict=True)])
            before = after
    finally:
        listener.kill()
        listener.wait()
        while pair_sockets:
            pair_sockets.pop().close()
    return out


@pytest.mark.skipif(shutil.which("iptables-legacy-restore") is None or
                    shutil.which("setpriv") is None,
                    reason="iptables-legacy or setpriv not installed")
def test_owner_as_iptables_legacy() -> None:
    # Count-only owner rules in b's OUTPUT, iptables-legacy in one namespace pair and bpfilter
    # in another; per packet b sends (datagrams from root and from other users, a reset and
    # an echo reply from kernel sockets without a file), which rules counted it.
    with testbed.netns_pair() as ipt, testbed.netns_pair() as other:
        rules = [f"-A OUTPUT -d {{a}} -m owner {r}" for r in OWNER_RULES]
        subprocess.run(["ip", "netns", "exec", ipt.b, "iptables-legacy-restore"],
                       input=table("\n".join(r.format(a=ipt.ipv4_a) for r in rules)),
                       text=True, check=True)
        want = _owner_hits(ipt, lambda: _legacy_output_counts(ipt.b))
        text = "\n".join(r.format(a=other.ipv4_a) for r in rules)
        with loaded(other, text) as handle:
            got = _owner_hits(other, lambda: counts(handle, "OUTPUT", len(rules)))
    assert any(any(row) for row in want) and not all(all(row) for row in want)
    assert got == want


@pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare not installed")
def test_owner_is_refused_in_a_namespace_of_another_user_namespace() -> None:
    # xt_owner maps the rule's ids through the network namespace's user namespace
    # (make_kuid); bpfilter compares initial-namespace ids, so it refuses such a namespace.
    name = testbed.unique_name("bpft-h3u")
    proc = subprocess.Popen(["unshare", "--user", "--net", "--map-root-user", "sleep", "60"])
    mark = netns.NETNS_RUN_DIR / name
    try:
        ours = os.stat("/proc/self/ns/net").st_ino
        for _ in range(200):
            if os.stat(f"/proc/{proc.pid}/ns/net").st_ino != ours:
                break
            time.sleep(0.01)
        mark.touch()
        subprocess.run(["mount", "--bind", f"/proc/{proc.pid}/ns/net", str(mark)], check=True)
        with pytest.raises(netns.NetnsError, match="belongs to another user namespace"):
            loader.load_programs(compiled("-A OUTPUT -m owner --uid-owner 1 -j DROP"),
                                 netns=name)
        loader.load_programs(compiled("-A OUTPUT -p udp -j DROP"), netns=name).close()
    finally:
        subprocess.run(["umount", str(mark)], capture_output=True)
        mark.unlink(missing_ok=True)
        proc.kill()
        proc.wait()


CT_LEGACY_RULES = [
    "-p udp -m connmark --mark 0x1234", "-p udp -m connmark ! --mark 0x34/0xff",
    "-m connmark --mark 0", "-m conntrack --ctexpire 0", "-m conntrack --ctexpire 1:24",
    "-m conntrack --ctexpire 25:30", "-m conntrack ! --ctexpire 0:24",
    "-m conntrack --ctexpire 31:4294967295", "-m conntrack --ctstatus SEEN_REPLY",
    "-m conntrack --ctstatus CONFIRMED --ctdir REPLY", "-m conntrack ! --ctstatus ASSURED",
    "-m conntrack --ctstate NEW --ctproto udp --ctorigdstport 40000:40001",
    # For ICMP the tuple's "ports" are the echo id (random per ping run: not testable here)
    # and type << 8 | code of the original direction: 2048 for an echo request.
    "-m conntrack --ctstate ESTABLISHED --ctorigdstport 2048",
]


def _ct_probes(pair: testbed.NetnsPair) -> list[Callable[[], bool]]:
    return [lambda: udp_to(pair, 40000), lambda: udp_to(pair, 40001),
            lambda: testbed.ping(pair.b, pair.ipv4_a), lambda: testbed.ping(pair.a, pair.ipv4_b)]


def _ct_hits(pair: testbed.NetnsPair, read: Callable[[], list[int]]) -> list[list[int]]:
    out = []
    before = read()
    for probe in _ct_probes(pair):
        assert probe()
        after = read()
        out.append([x - y for x, y in zip(after, before, strict=True)])
        before = after
    return out


@pytest.mark.skipif(shutil.which("iptables-legacy-restore") is None,
                    reason="iptables-legacy not installed")
def test_conntrack_and_connmark_as_iptables_legacy() -> None:
    # Count-only rules in b's INPUT, iptables-legacy in one pair and bpfilter in another,
    # with the same conntrack mark set by nftables for flows to udp port 40000.
    mark = ("table inet bpft_h3 {\n chain pre {\n  type filter hook prerouting priority -150;"
            "\n  udp dport 40000 ct mark set 0x1234\n }\n}\n")
    rules = [f"-A INPUT -s {{a}} {r}" for r in CT_LEGACY_RULES]
    with testbed.netns_pair() as ipt, testbed.netns_pair() as other:
        _nft(ipt.b, mark)
        _nft(other.b, mark)
        subprocess.run(["ip", "netns", "exec", ipt.b, "iptables-legacy-restore"],
                       input=table("\n".join(r.format(a=ipt.ipv4_a) for r in rules)),
                       text=True, check=True)
        want = _ct_hits(ipt, lambda: _legacy_counts(ipt.b))
        text = "\n".join(r.format(a=other.ipv4_a) for r in rules)
        with loaded(other, text) as handle:
            got = _ct_hits(other, lambda: counts(handle, "INPUT", len(rules)))
    assert any(any(row) for row in want) and not all(all(row) for row in want)
    assert want[2][-1] == 1  # the echo reply b gets for its ping is ESTABLISHED, type 8 code 0
    assert got == want


@pytest.mark.skipif(shutil.which("iptables-legacy-restore") is None,
                    reason="iptables-legacy not installed")
def test_sctp_chunk_types_as_iptables_legacy(pair: testbed.NetnsPair) -> None:
    # As for the TCP options: per crafted SCTP packet, which count-only rules counted it, in
    # bpfilter and then in iptables-legacy (hot drops stop the chain in both).
    a = pair.ipv4_a
    rules = "\n".join([f"-A INPUT -s {a} -p tcp --dport {SENTINEL_PORT} -j ACCEPT",
                       f"-A INPUT -s {a} -p sctp -m sctp --dport 2",
                       *[f"-A INPUT -s {a} -p sctp -m sctp --chunk-types {opt}"
                         for opt, _, _ in CHUNK_CASES]])
    n = len(CHUNK_CASES) + 2
    segments = list(CHUNK_PACKETS.values())
    with loaded(pair, rules) as handle:
        got = _counts_per_segment(pair, lambda: counts(handle, "INPUT", n), segments,
                                  IPPROTO_SCTP)
    subprocess.run(["ip", "netns", "exec", pair.b, "iptables-legacy-restore"],
                   input=table(rules), text=True, check=True)
    reference = _counts_per_segment(pair, lambda: _legacy_counts(pair.b), segments,
                                    IPPROTO_SCTP)
    assert all(row[0] == 1 for row in reference)  # the ports rule sees every packet
    for name, want, have in zip(CHUNK_PACKETS, reference, got, strict=True):
        assert have == want, name
