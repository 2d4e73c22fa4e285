"""IPv6 extension header matches, `-m rt` (routing header), `-m frag` (fragment header),
`-m hbh` and `-m dst` (options headers) and `-m ipv6header` (which headers a packet has):
BPF_PROG_TEST_RUN verdicts for crafted packets, and the same packets through ip6tables-legacy
in a throwaway namespace as the reference (match, no match or hot drop, seen in the rule
counters)."""

from __future__ import annotations

import ipaddress
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpfilter import loader, netns, testbed
from bpfilter.codegen.compiler import CompileError, compile_ruleset
from bpfilter.codegen.uapi import NfHook
from bpfilter.grammar.iptables import parse_restore
from bpfilter.ir.iptables_save import to_iptables_save

DROP, ACCEPT = 0, 1
MATCH, NOMATCH, HOTDROP = "match", "no match", "hot drop"
HOP, ROUTING, FRAGMENT, DEST, UDP, NONE, ESP, AH = 0, 43, 44, 60, 17, 59, 50, 51
SRC, DST = "2001:db8::1", "2001:db8::2"
UDP_PAYLOAD = struct.pack("!HHHH", 1234, 53, 12, 0) + b"xxxx"


def routing(rt_type: int = 0, segsleft: int = 1, units: int = 2, reserved: int = 0,
            cut: int | None = None) -> tuple[int, bytes]:
    """A routing header (next-header byte filled in by ``ip6``): ``units`` 8-byte units after
    the first 8 (hdrlen), optionally cut to ``cut`` bytes."""
    body = bytes(8 * units)
    data = struct.pack("!BBBBI", 0, units, rt_type, segsleft, reserved) + body
    return ROUTING, data if cut is None else data[:cut]


def options(kind: int) -> tuple[int, bytes]:
    return kind, b"\0\0\x01\x04\0\0\0\0"  # PadN filling 8 bytes


def fragment(offset: int = 0, *, more: bool = False, ident: int = 0x1234, reserved: int = 0,
             resbits: int = 0, cut: int | None = None) -> tuple[int, bytes]:
    data = struct.pack("!BBHI", 0, reserved, offset << 3 | resbits << 1 | more, ident)
    return FRAGMENT, data if cut is None else data[:cut]


def ip6(*exts: tuple[int, bytes], upper: int = UDP, payload: bytes = UDP_PAYLOAD) -> bytes:
    chain = bytearray()
    kinds = [k for k, _ in exts] + [upper]
    for i, (_, data) in enumerate(exts):
        chain += bytes([kinds[i + 1]]) + data[1:] if data else b""
    body = bytes(chain) + payload
    return struct.pack("!IHBB16s16s", 6 << 28, len(body), kinds[0], 64,
                       ipaddress.IPv6Address(SRC).packed, ipaddress.IPv6Address(DST).packed) + body


# (rule options, [(packet, outcome), ...])
CASES: list[tuple[str, list[tuple[bytes, str]]]] = [
    ("-m rt --rt-type 0",
     [(ip6(routing(0)), MATCH), (ip6(routing(2)), NOMATCH), (ip6(), NOMATCH),
      (ip6(options(HOP), options(DEST), routing(0)), MATCH),
      # the first routing header decides
      (ip6(routing(2), routing(0)), NOMATCH),
      # after a later fragment ipv6_find_hdr stops with -ENOENT: no match, no hot drop
      (ip6(fragment(8), routing(0)), NOMATCH),
      (ip6(fragment(0), routing(0)), MATCH),
      # 2 or 3 bytes of it: the 4-byte ipv6_rt_hdr is unreadable
      (ip6(routing(0, cut=2), upper=NONE, payload=b""), HOTDROP),
      (ip6(routing(0, cut=3), upper=NONE, payload=b""), HOTDROP),
      # shorter than its length field: hot drop (ip6t_rt since Linux 6.x)
      (ip6(routing(0, units=2, cut=16), upper=NONE, payload=b""), HOTDROP),
      (ip6(routing(0, units=1, cut=8), upper=NONE, payload=b""), HOTDROP),
      (ip6(routing(0, units=0), upper=NONE, payload=b""), MATCH),
      # an unreadable header before it: hot drop
      (ip6((DEST, b"\0"), upper=NONE, payload=b""), HOTDROP),
      (ip6(upper=NONE, payload=b""), NOMATCH)]),
    ("-m rt ! --rt-type 0",
     [(ip6(routing(0)), NOMATCH), (ip6(routing(2)), MATCH), (ip6(), NOMATCH),
      (ip6(routing(0, cut=3), upper=NONE, payload=b""), HOTDROP)]),
    ("-m rt --rt-type 300", [(ip6(routing(44)), NOMATCH)]),
    ("-m rt ! --rt-type 300", [(ip6(routing(44)), MATCH)]),
    ("-m rt --rt-segsleft 2",
     [(ip6(routing(0, segsleft=2)), MATCH), (ip6(routing(0, segsleft=3)), NOMATCH)]),
    ("-m rt --rt-segsleft 2:4",
     [(ip6(routing(0, segsleft=1)), NOMATCH), (ip6(routing(0, segsleft=2)), MATCH),
      (ip6(routing(0, segsleft=4)), MATCH), (ip6(routing(0, segsleft=5)), NOMATCH)]),
    ("-m rt ! --rt-segsleft 2:4",
     [(ip6(routing(0, segsleft=1)), MATCH), (ip6(routing(0, segsleft=3)), NOMATCH),
      (ip6(routing(0, segsleft=255)), MATCH), (ip6(), NOMATCH)]),
    ("-m rt --rt-segsleft 200:", [(ip6(routing(0, segsleft=255)), MATCH),
                                  (ip6(routing(0, segsleft=199)), NOMATCH)]),
    ("-m rt --rt-segsleft 7:3", [(ip6(routing(0, segsleft=5)), NOMATCH)]),
    ("-m rt ! --rt-segsleft 7:3", [(ip6(routing(0, segsleft=5)), MATCH)]),
    ("-m rt --rt-segsleft 256:300", [(ip6(routing(0, segsleft=255)), NOMATCH)]),
    ("-m rt --rt-len 24",
     [(ip6(routing(0, units=2)), MATCH), (ip6(routing(0, units=1)), NOMATCH)]),
    ("-m rt ! --rt-len 24",
     [(ip6(routing(0, units=2)), NOMATCH), (ip6(routing(0, units=1)), MATCH)]),
    ("-m rt --rt-len 2048", [(ip6(routing(0, units=255)), MATCH)]),
    ("-m rt --rt-len 4294967295", [(ip6(routing(0, units=255)), NOMATCH)]),
    ("-m rt --rt-type 0 --rt-0-res",
     [(ip6(routing(0)), MATCH), (ip6(routing(0, reserved=1)), NOMATCH),
      (ip6(routing(0, reserved=0x80000000)), NOMATCH), (ip6(routing(2)), NOMATCH)]),
    ("-m rt --rt-type 0 --rt-segsleft 0 --rt-len 8",
     [(ip6(routing(0, segsleft=0, units=0)), MATCH), (ip6(routing(0, segsleft=0)), NOMATCH),
      (ip6(routing(0, segsleft=1, units=0)), NOMATCH)]),
    ("-p udp -m rt --rt-type 2",
     [(ip6(routing(2)), MATCH), (ip6(routing(2), upper=NONE, payload=b""), NOMATCH)]),
]
FRAG_CASES: list[tuple[str, list[tuple[bytes, str]]]] = [
    ("-m frag",
     [(ip6(fragment()), MATCH), (ip6(fragment(8)), MATCH), (ip6(), NOMATCH),
      (ip6(options(HOP), routing(0), fragment(8, more=True)), MATCH),
      (ip6(routing(0, cut=3), fragment(), upper=NONE, payload=b""), HOTDROP),
      # ipv6_find_hdr reads frag_off (bytes 2-3), frag_mt6 all 8 bytes
      (ip6(fragment(cut=2), upper=NONE, payload=b""), HOTDROP),
      (ip6(fragment(cut=4), upper=NONE, payload=b""), HOTDROP),
      (ip6(fragment(cut=7), upper=NONE, payload=b""), HOTDROP),
      (ip6(fragment(), upper=NONE, payload=b""), MATCH),
      # the first fragment header decides; a routing header after a later fragment is not
      # walked to, but the fragment header itself is found
      (ip6(fragment(16), fragment(0)), MATCH)]),
    ("-m frag --fragid 0x1234",
     [(ip6(fragment()), MATCH), (ip6(fragment(ident=0x1235)), NOMATCH), (ip6(), NOMATCH)]),
    ("-m frag ! --fragid 5:10",
     [(ip6(fragment(ident=4)), MATCH), (ip6(fragment(ident=5)), NOMATCH),
      (ip6(fragment(ident=10)), NOMATCH), (ip6(fragment(ident=11)), MATCH), (ip6(), NOMATCH)]),
    ("-m frag --fragid 0x80000000:",
     [(ip6(fragment(ident=0x7FFFFFFF)), NOMATCH), (ip6(fragment(ident=0x80000000)), MATCH),
      (ip6(fragment(ident=0xFFFFFFFF)), MATCH)]),
    ("-m frag --fragid 0xfffffffe", [(ip6(fragment(ident=0xFFFFFFFE)), MATCH),
                                     (ip6(fragment(ident=0xFFFFFFFF)), NOMATCH)]),
    ("-m frag --fragid 9:3", [(ip6(fragment(ident=5)), NOMATCH)]),
    ("-m frag ! --fragid 9:3", [(ip6(fragment(ident=5)), MATCH)]),
    ("-m frag --fraglen 99", [(ip6(fragment()), MATCH)]),
    ("-m frag --fragres",
     [(ip6(fragment()), MATCH), (ip6(fragment(reserved=1)), NOMATCH),
      (ip6(fragment(resbits=1)), NOMATCH), (ip6(fragment(resbits=2)), NOMATCH),
      (ip6(fragment(8, more=True)), MATCH)]),
    ("-m frag --fragfirst",
     [(ip6(fragment(0, more=True)), MATCH), (ip6(fragment(1)), NOMATCH),
      (ip6(fragment(0, resbits=3)), MATCH)]),
    ("-m frag --fragmore",
     [(ip6(fragment(8, more=True)), MATCH), (ip6(fragment(8)), NOMATCH)]),
    ("-m frag --fraglast",
     [(ip6(fragment(8, more=True)), NOMATCH), (ip6(fragment(8)), MATCH)]),
    ("-m frag --fragid 0x1234 --fragres --fragfirst --fragmore",
     [(ip6(fragment(0, more=True)), MATCH), (ip6(fragment(0)), NOMATCH),
      (ip6(fragment(0, more=True, ident=1)), NOMATCH)]),
    ("-m frag -m rt --rt-type 2",
     [(ip6(fragment(), routing(2)), MATCH), (ip6(routing(2), fragment()), MATCH),
      (ip6(fragment(8), routing(2)), NOMATCH), (ip6(routing(2)), NOMATCH)]),
]
CASES += FRAG_CASES


def auth(words: int = 1) -> tuple[int, bytes]:
    """An AH header: (payload length + 2) 4-byte words."""
    return AH, struct.pack("!BBHII", 0, words, 0, 1, 1) + bytes(4 * (words - 1))


def dest_claiming(length_units: int) -> tuple[int, bytes]:
    """A destination options header whose length field says more than the packet holds (a
    hop-by-hop one would be dropped by ipv6_parse_hopopts before PREROUTING)."""
    return DEST, struct.pack("!BB", 0, length_units) + b"\x01\x04\0\0\0\0"


V6H_PACKETS = [
    ip6(), ip6(options(HOP)), ip6(options(HOP), options(DEST), routing(0), fragment()),
    ip6(upper=NONE, payload=b""), ip6(upper=ESP, payload=bytes(8)),
    ip6(upper=ESP, payload=b"\0"),  # too short for the next header: no match at all
    ip6(fragment(8), options(DEST)),  # the walk goes on past a later fragment
    ip6(options(DEST), (DEST, b"\0"), upper=NONE, payload=b""),  # 1 byte left: no match
    ip6(auth(), options(DEST)), ip6(auth(3), upper=NONE, payload=b""),
    ip6(dest_claiming(8), payload=b""),  # ptr > skb->len stops the walk
    ip6(routing(2), upper=ESP, payload=bytes(4)),
]
# (rule, the MASK_* bits each packet has, or None for "no match whatever the options")
V6H_SEEN = [0x01, 0x81, 0xF1, 0x02, 0x04, None, 0x51, None, 0x49, 0x0A, 0x41, 0x24]


def _v6h_expect(flags: int, negated: bool, soft: bool) -> list[tuple[bytes, str]]:
    out = []
    for p, seen in zip(V6H_PACKETS, V6H_SEEN, strict=True):
        if seen is None:
            hit = False
        elif soft:
            hit = not ((seen ^ flags ^ (0xFF if negated else 0)) & flags)
        else:
            hit = (seen != flags) if negated else (seen == flags)
        out.append((p, MATCH if hit else NOMATCH))
    return out


V6H_RULES = [("--header protocol", 0x01), ("--header hop-by-hop,protocol", 0x81),
             ("--header hop --soft", 0x80), ("! --header hop --soft", 0x80),
             ("--header ipv6-frag,dst,protocol", 0x51), ("! --header none", 0x02),
             ("--header esp", 0x04), ("--header auth,esp --soft", 0x0C),
             ("! --header route,esp --soft", 0x24), ("--header ah,none", 0x0A)]
V6H_CASES = [(f"-m ipv6header {rule}",
              _v6h_expect(flags, rule.startswith("!"), rule.endswith("--soft")))
             for rule, flags in V6H_RULES]
CASES += V6H_CASES


def opts_header(kind: int, body: bytes, units: int | None = None,
                cut: int | None = None) -> tuple[int, bytes]:
    """A hop-by-hop or destination options header holding the option bytes ``body`` (padded
    with zeros, Pad1, to whole 8-byte units; ``units`` overrides the length field)."""
    size = -(-(len(body) + 2) // 8) * 8
    data = bytes([0, size // 8 - 1 if units is None else units]) + body.ljust(size - 2, b"\0")
    return kind, data if cut is None else data[:cut]


PADN4 = b"\x01\x04\0\0\0\0"  # PadN filling 6 bytes
# (ipv6_parse_hopopts, before PREROUTING, drops a hop-by-hop header with more than 7 bytes of
# padding in a row)
RTALERT = b"\x05\x02\0\0"  # router alert (MLD) then Pad1 Pad1
OPTS_CASES: list[tuple[str, list[tuple[bytes, str]]]] = [
    ("-m hbh",
     [(ip6(opts_header(HOP, PADN4)), MATCH), (ip6(), NOMATCH),
      (ip6(options(DEST)), NOMATCH)]),
    ("-m hbh --hbh-len 8",
     [(ip6(opts_header(HOP, PADN4)), MATCH), (ip6(opts_header(HOP, RTALERT + PADN4 + RTALERT)),
                                              NOMATCH)]),
    ("-m hbh ! --hbh-len 8",
     [(ip6(opts_header(HOP, PADN4)), NOMATCH), (ip6(opts_header(HOP, RTALERT + PADN4 + RTALERT)),
                                                MATCH), (ip6(), NOMATCH)]),
    ("-m hbh --hbh-opts 1:4", [(ip6(opts_header(HOP, PADN4)), MATCH),
                               (ip6(opts_header(HOP, RTALERT)), NOMATCH)]),
    ("-m hbh --hbh-opts 1", [(ip6(opts_header(HOP, PADN4)), MATCH)]),
    ("-m hbh --hbh-opts 1:3", [(ip6(opts_header(HOP, PADN4)), NOMATCH)]),
    ("-m hbh --hbh-opts 5:2,0,0", [(ip6(opts_header(HOP, RTALERT)), MATCH),
                                   (ip6(opts_header(HOP, PADN4)), NOMATCH)]),
    # the list goes past the header: no match
    ("-m hbh --hbh-opts 5:2,0,0,0", [(ip6(opts_header(HOP, RTALERT)), NOMATCH)]),
    ("-m hbh --hbh-len 8 --hbh-opts 1:4", [(ip6(opts_header(HOP, PADN4)), MATCH)]),
    ("-m dst",
     [(ip6(options(DEST)), MATCH), (ip6(routing(2), options(DEST)), MATCH),
      (ip6(opts_header(HOP, PADN4)), NOMATCH),
      (ip6(fragment(8), options(DEST)), NOMATCH),
      # shorter than its length field, unreadable: hot drop
      (ip6(opts_header(DEST, PADN4, units=1), upper=NONE, payload=b""), HOTDROP),
      (ip6((DEST, b"\0"), upper=NONE, payload=b""), HOTDROP)]),
    ("-m dst --dst-opts 0,0,0,0,0,0", [(ip6(opts_header(DEST, bytes(6))), MATCH)]),
    ("-m dst --dst-opts 0,0,0,0,0,0,0", [(ip6(opts_header(DEST, bytes(6))), NOMATCH)]),
    # an option running past the header: fine for the last one of the list, not before
    ("-m dst --dst-opts 1", [(ip6(opts_header(DEST, b"\x01\x08" + bytes(4))), MATCH)]),
    ("-m dst --dst-opts 1,0", [(ip6(opts_header(DEST, b"\x01\x08" + bytes(4))), NOMATCH)]),
    # a length byte past the header: no match
    ("-m dst --dst-opts 0,0,0,0,0,1", [(ip6(opts_header(DEST, bytes(5) + b"\x01")), NOMATCH)]),
    ("-m dst --dst-len 16 --dst-opts 1",
     [(ip6(opts_header(DEST, b"\x01\x08" + bytes(4))), NOMATCH),
      (ip6(opts_header(DEST, PADN4 + PADN4)), MATCH), (ip6(opts_header(DEST, PADN4)), NOMATCH)]),
    ("-m dst --dst-opts 1:4 -m hbh --hbh-opts 5",
     [(ip6(opts_header(HOP, RTALERT), opts_header(DEST, PADN4)), MATCH),
      (ip6(opts_header(HOP, PADN4), opts_header(DEST, PADN4)), NOMATCH)]),
]
# hbh and dst compile at the netfilter hooks only: kept out of CASES, which the XDP/TC
# flavour tests (tests/kernel/test_flavor_verdicts.py) run too.
NETFILTER_CASES = CASES + OPTS_CASES


def ruleset(rule: str, target: str, policy: str, table: str = "filter",
            chain: str = "INPUT") -> str:
    chains = {"filter": ("INPUT", "FORWARD", "OUTPUT"), "raw": ("PREROUTING", "OUTPUT")}[table]
    return "\n".join([f"*{table}", *[f":{c} {policy} [0:0]" for c in chains],
                      f"-A {chain} {rule} -j {target}", "COMMIT", ""])


def outcomes(rule: str, packets: list[bytes], *, table: str = "filter",
             hook: NfHook = NfHook.LOCAL_IN) -> list[str]:
    """Run the rule as `-j DROP` under ACCEPT and as `-j ACCEPT` under DROP: a match flips the
    verdict, a hot drop drops in both."""
    chain = "PREROUTING" if hook == NfHook.PRE_ROUTING else "INPUT"
    verdicts = []
    for target, policy in (("DROP", "ACCEPT"), ("ACCEPT", "DROP")):
        text = ruleset(rule, target, policy, table, chain)
        with loader.TestRunner(compile_ruleset(parse_restore(text, family=6), 6)) as runner:
            verdicts.append([runner.run(hook, p, table=table) for p in packets])
    out = []
    for as_drop, as_accept in zip(*verdicts, strict=True):
        out.append({(DROP, ACCEPT): MATCH, (ACCEPT, DROP): NOMATCH,
                    (DROP, DROP): HOTDROP}[(as_drop, as_accept)])
    return out


@pytest.mark.parametrize(("rule", "expected"), NETFILTER_CASES,
                         ids=[c[0] for c in NETFILTER_CASES])
def test_rt_verdicts(rule: str, expected: list[tuple[bytes, str]]) -> None:
    got = outcomes(rule, [p for p, _ in expected])
    assert got == [w for _, w in expected]


def test_rt_in_a_user_chain_and_other_hooks() -> None:
    text = "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                      ":OUTPUT ACCEPT [0:0]", ":sub - [0:0]", "-A INPUT -j sub",
                      "-A FORWARD -j sub", "-A OUTPUT -m rt --rt-segsleft 1 -j DROP",
                      "-A sub -m rt --rt-type 0 -j DROP", "COMMIT", ""])
    packets = [ip6(routing(0)), ip6(routing(2, segsleft=0)), ip6(routing(2, segsleft=1))]
    with loader.TestRunner(compile_ruleset(parse_restore(text, family=6), 6)) as runner:
        for hook, want in ((NfHook.LOCAL_IN, [DROP, ACCEPT, ACCEPT]),
                           (NfHook.FORWARD, [DROP, ACCEPT, ACCEPT]),
                           (NfHook.LOCAL_OUT, [DROP, ACCEPT, DROP])):
            assert [runner.run(hook, p) for p in packets] == want, hook


def test_rt_addresses_are_refused_by_name() -> None:
    text = ruleset("-m rt --rt-type 0 --rt-0-addrs 2001:db8::1", "DROP", "ACCEPT")
    with pytest.raises(CompileError, match="line 5: match 'rt' option '--rt-0-addrs' is not"):
        compile_ruleset(parse_restore(text, family=6), 6)


def test_rt_is_ipv6_only() -> None:
    with pytest.raises(Exception, match="rt"):
        parse_restore(ruleset("-m rt --rt-type 0", "DROP", "ACCEPT"), family=4)


# --- the reference: the same packets through ip6tables-legacy's raw PREROUTING -------------

RX, TX = "h8rx", "h8tx"


def _ns(ns: str, *args: str, check: bool = True) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *args], check=check, capture_output=True,
                          text=True, timeout=20).stdout


@pytest.fixture(scope="module")
def wire() -> Iterator[tuple[str, bytes]]:
    if shutil.which("ip6tables-legacy-restore") is None:
        pytest.skip("ip6tables-legacy is not installed")
    ns = testbed.unique_name("h8rt")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        # MTU 9000: the longest routing header (2048 bytes) fits in one frame
        for cmd in (f"link add {TX} mtu 9000 type veth peer name {RX} mtu 9000",
                    f"link set {TX} up", f"link set {RX} up",
                    f"-6 addr add {DST}/64 dev {RX} nodad"):
            subprocess.run(["ip", "-n", ns, *cmd.split()], check=True)
        mac = bytes.fromhex(_ns(ns, "cat", f"/sys/class/net/{RX}/address").strip()
                            .replace(":", ""))
        yield ns, mac
    finally:
        testbed.delete(ns)




def _iptables_outcome(ns: str, mac: bytes, packet: bytes) -> str:
    _ns(ns, "ip6tables-legacy", "-t", "raw", "-Z")
    with netns.entered(ns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    with sock:
        sock.bind((TX, 0))
        sock.send(mac + bytes.fromhex("020000000001") + struct.pack("!H", 0x86DD) + packet)
    for _ in range(100):
        arrived, matched, missed = [int(line.split()[0]) for line in _ns(
            ns, "ip6tables-legacy", "-t", "raw", "-L", "PREROUTING", "-v", "-x", "-n"
        ).splitlines()[2:]]
        if matched or missed:
            return MATCH if matched else NOMATCH
        if arrived:
            return HOTDROP  # counted on arrival, then by neither rule: the match hot-dropped it
        time.sleep(0.01)
    raise AssertionError(f"packet {packet.hex()} never reached raw PREROUTING")


def test_rt_agrees_with_ip6tables_legacy(wire: tuple[str, bytes]) -> None:
    ns, mac = wire
    mismatches = []
    for rule, packets in NETFILTER_CASES:
        if "-p udp" in rule:
            continue  # needs a UDP checksum; covered above
        text = "\n".join(["*raw", ":PREROUTING ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
                          f"-A PREROUTING -s {SRC}/128",
                          f"-A PREROUTING -s {SRC}/128 {rule} -j DROP",
                          f"-A PREROUTING -s {SRC}/128 -j ACCEPT", "COMMIT", ""])
        subprocess.run(["ip", "netns", "exec", ns, "ip6tables-legacy-restore"], input=text,
                       text=True, check=True, timeout=20)
        got = outcomes(f"-s {SRC}/128 {rule}", [p for p, _ in packets], table="raw",
                       hook=NfHook.PRE_ROUTING)
        for (p, want), mine in zip(packets, got, strict=True):
            ref = _iptables_outcome(ns, mac, p)
            if ref != mine or ref != want:
                mismatches.append((rule, p.hex(), want, ref, mine))
    assert not mismatches, mismatches


UFW6 = "conformance/realworld/ufw/emulated-ufw-enabled.ip6tables-save.legacy.txt"


def _tables(text: str) -> str:
    return "".join(line + "\n" for line in text.splitlines() if not line.startswith("#"))


def test_ufw6_dump_prints_as_ip6tables_legacy_save(shared_dir: Path) -> None:
    # No golden file exists for ufw's IPv6 dump (it uses -m rt): the reference is made here.
    if shutil.which("ip6tables-legacy-restore") is None:
        pytest.skip("ip6tables-legacy is not installed")
    text = (shared_dir / UFW6).read_text()
    ns = testbed.unique_name("h8ufw")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip6tables-legacy-restore"], input=text,
                       text=True, check=True, timeout=20)
        want = _ns(ns, "ip6tables-legacy-save")
    finally:
        testbed.delete(ns)
    assert "-m rt --rt-type 0" in want
    assert _tables(to_iptables_save(parse_restore(text, family=6))) == _tables(want)


def test_every_extension_header_match_together_in_nested_chains_loads() -> None:
    # The prologue's facts live on the main program's stack, which the verifier adds to the
    # frames of the chain functions called from it (at most 512 bytes in all): the deepest
    # nesting with every IPv6 walk of this module, conntrack and a stateful match.
    rules = ["-m rt --rt-type 0", "-m frag --fragmore", "-m hbh --hbh-opts 1,5:2",
             "-m dst --dst-len 8 --dst-opts 0,1", "-m ipv6header --header hop,dst --soft",
             "-m conntrack --ctstate NEW", "-m limit --limit 5/s"]
    depth = 5
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
             *[f":c{i} - [0:0]" for i in range(depth)], "-A INPUT -j c0"]
    for i in range(depth):
        lines += [f"-A c{i} {r} -j RETURN" for r in rules]
        if i + 1 < depth:
            lines.append(f"-A c{i} -j c{i + 1}")
    lines += ["-A c4 -m rt --rt-type 0 -j DROP", "COMMIT", ""]
    with loader.TestRunner(compile_ruleset(parse_restore("\n".join(lines), family=6), 6)) as r:
        assert r.run(NfHook.LOCAL_IN, ip6(routing(0))) == ACCEPT  # RETURNs first, at c0
        assert r.run(NfHook.LOCAL_IN, ip6()) == ACCEPT


def test_too_many_option_lists_are_refused_with_the_line() -> None:
    rules = "\n".join(f"-A INPUT -m dst --dst-opts {n} -j DROP" for n in range(1, 18))
    text = ruleset("-p udp", "ACCEPT", "ACCEPT").replace("-A INPUT -p udp -j ACCEPT", rules)
    with pytest.raises(CompileError, match="line 21: a program tests at most 16 different"):
        compile_ruleset(parse_restore(text, family=6), 6)
