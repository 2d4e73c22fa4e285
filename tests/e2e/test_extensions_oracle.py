"""tests/unit/golden/extensions_more.txt against the real iptables-legacy: every rule, loaded
alone with (ip6)tables-legacy-restore in a throwaway namespace, is saved as the golden line
says (or refused where it says `!`). And the ecn and dccp matches bpfilter compiles give the
verdicts iptables-legacy gives on the same packets.

BPFILTER_REGEN=1 rewrites the golden file from what iptables-legacy does here instead; review
the diff before committing it.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest
from ipt_oracle import missing_tools, netns, restore

from bpfilter import loader
from bpfilter import netns as bns
from bpfilter.codegen.compiler import compile_ruleset
from bpfilter.codegen.uapi import NfHook
from bpfilter.grammar.iptables import parse_restore

pytestmark = pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")

GOLDEN = Path(__file__).resolve().parents[1] / "unit" / "golden" / "extensions_more.txt"
# The sets the golden SET target lines name (xt_SET checkentry looks them up).
IPSETS = ("foo hash:ip", "bar hash:ip,port", "m hash:ip skbinfo")
ESTIMATORS = ("RE1", "RE2")  # the rate estimators the golden rateest lines name


def _oracle(ns: str, family: int, table: str, chain: str, rule: str) -> str:
    # A rateest match needs its estimators: RATEEST rules ahead of it, left out of the result.
    setup = "".join(f"-A {chain} -j RATEEST --rateest-name {n} --rateest-interval 250.0ms "
                    "--rateest-ewmalog 500.0ms\n" for n in ESTIMATORS) if "-m rateest" in rule \
        else ""
    res = restore(ns, f"*{table}\n{setup}-A {chain} {rule}\nCOMMIT\n", family=family)
    out = "!"
    if res.rc == 0:
        lines = [x for x in res.tables.get(table, "").splitlines()
                 if x.startswith("-A ") and (not setup or "-j RATEEST" not in x)]
        assert len(lines) == 1, lines
        out = lines[0][len(f"-A {chain} "):]
    # Leave the table empty for the next rule.
    restore(ns, f"*{table}\nCOMMIT\n", family=family)
    return out


def test_golden_lines_are_what_iptables_legacy_saves() -> None:
    head = [x for x in GOLDEN.read_text().splitlines() if x.startswith("#")]
    cases = [x.split("\t") for x in GOLDEN.read_text().splitlines()
             if x and not x.startswith("#")]
    if shutil.which("ipset") is None:
        pytest.skip("ipset not installed (the SET target lines need its sets)")
    got = []
    with netns() as ns:
        for spec in IPSETS:
            subprocess.run(["ip", "netns", "exec", ns, "ipset", "create", *spec.split()],
                           check=True, capture_output=True)
        for fam, table, chain, rule, _ in cases:
            got.append(_oracle(ns, int(fam), table, chain, rule))
    if os.environ.get("BPFILTER_REGEN"):
        body = ["\t".join([*c[:4], g]) for c, g in zip(cases, got, strict=True)]
        GOLDEN.write_text("\n".join(head + body) + "\n")
        return
    diff = [f"{c[3]!r}: golden {c[4]!r}, iptables-legacy {g!r}"
            for c, g in zip(cases, got, strict=True) if c[4] != g]
    assert not diff, "\n".join(diff)


# --- ecn and dccp verdicts: iptables-legacy and bpfilter on the same packets ---------------------

A4, B4 = "198.18.0.1", "198.18.0.2"
A6, B6 = "2001:db8::1", "2001:db8::2"
IPV6_HDRINCL = 36  # linux/in6.h


def _ip4(proto: int, l4: bytes, *, tos: int = 0, frag: int = 0) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(l4), 1, frag, 64, proto, 0,
                       socket.inet_pton(socket.AF_INET, A4),
                       socket.inet_pton(socket.AF_INET, B4)) + l4


def _ip6(nexthdr: int, l4: bytes, *, tclass: int = 0) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28 | tclass << 20, len(l4), nexthdr, 64,
                       socket.inet_pton(socket.AF_INET6, A6),
                       socket.inet_pton(socket.AF_INET6, B6)) + l4


def _tcp(flags: int) -> bytes:
    return struct.pack("!HHIIBBHHH", 1234, 22, 0, 0, 5 << 4, flags, 1024, 0, 0)


def _dccp(sport: int, dport: int, kind: int, x: int = 1) -> bytes:
    return struct.pack("!HHBBHBBH", sport, dport, 3, 0, 0, kind << 1 | x, 0, 1)


VERDICT_CASES = [
    (4, "-m ecn --ecn-ip-ect 1", _ip4(6, _tcp(2), tos=1)),
    (4, "-m ecn --ecn-ip-ect 1", _ip4(6, _tcp(2), tos=2)),
    (4, "-m ecn ! --ecn-ip-ect 3", _ip4(6, _tcp(2), tos=0xBB)),
    (4, "-p tcp -m ecn --ecn-tcp-ece", _ip4(6, _tcp(0x42))),
    (4, "-p tcp -m ecn --ecn-tcp-ece", _ip4(6, _tcp(0x02))),
    (4, "-p tcp -m ecn --ecn-tcp-ece ! --ecn-tcp-cwr", _ip4(6, _tcp(0xC2))),
    (4, "-p tcp -m ecn ! --ecn-tcp-cwr", _ip4(6, _tcp(0x42))),
    (4, "-p tcp -m ecn ! --ecn-tcp-cwr", _ip4(6, _tcp(0x42)[:12])),
    (4, "-p tcp -m ecn --ecn-tcp-ece", _ip4(6, _tcp(0x40), frag=3)),
    (4, "-p tcp -m ecn --ecn-ip-ect 2 --ecn-tcp-ece", _ip4(6, _tcp(0x40), tos=1)),
    (4, "-p dccp -m dccp --dport 5000", _ip4(33, _dccp(1, 5000, 0))),
    (4, "-p dccp --sport 2:3", _ip4(33, _dccp(1, 5000, 0))),
    (4, "-p dccp -m dccp --dccp-types REQUEST,RESET", _ip4(33, _dccp(1, 2, 7))),
    (4, "-p dccp -m dccp --dccp-types REQUEST,RESET", _ip4(33, _dccp(1, 2, 1))),
    (4, "-p dccp -m dccp ! --dccp-types REQUEST", _ip4(33, _dccp(1, 2, 1, x=0))),
    (4, "-p dccp -m dccp --dccp-types INVALID", _ip4(33, _dccp(1, 2, 15))),
    (4, "-p dccp -m dccp --dccp-types INVALID", _ip4(33, _dccp(1, 2, 10))),
    (4, "-p dccp -m dccp --dccp-types SYNCACK", _ip4(33, _dccp(1, 2, 9))),
    (4, "-p dccp -m dccp ! --dccp-types SYNCACK,INVALID", _ip4(33, _dccp(1, 2, 12))),
    (4, "-p dccp -m dccp ! --dccp-types DATA", _ip4(33, _dccp(1, 2, 3)[:10])),
    (4, "-p dccp -m dccp ! --dport 9", _ip4(33, _dccp(1, 2, 0), frag=2)),
    (6, "-m ecn --ecn-ip-ect 2", _ip6(6, _tcp(2), tclass=2)),
    (6, "-m ecn --ecn-ip-ect 2", _ip6(6, _tcp(2), tclass=1)),
    (6, "-p tcp -m ecn --ecn-tcp-cwr", _ip6(6, _tcp(0x80))),
    (6, "-p tcp -m ecn ! --ecn-tcp-cwr", _ip6(6, _tcp(0x80))),
    (6, "-p dccp -m dccp --dport 5000 --dccp-types DATA", _ip6(33, _dccp(1, 5000, 2))),
    (6, "-p dccp -m dccp --dport 5000 --dccp-types DATA", _ip6(33, _dccp(1, 5000, 3))),
]


def _legacy_verdict(ns: str, family: int, rule: str, packet: bytes) -> int:
    """0 when iptables-legacy's OUTPUT chain drops the packet sent from a raw socket."""
    res = restore(ns, f"*filter\n-A OUTPUT {rule} -j DROP\nCOMMIT\n", family=family)
    assert res.rc == 0, res.stderr
    with bns.entered(ns):
        if family == 4:
            s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        else:
            s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_HDRINCL, 1)
        try:
            s.sendto(packet, (B4 if family == 4 else B6, 0))
        except PermissionError:  # NF_DROP at LOCAL_OUT
            return 0
        finally:
            s.close()
    return 1


def test_ecn_and_dccp_verdicts_match_iptables_legacy() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, raw sockets)")
    diff = []
    with netns() as ns:
        for cmd in (["link", "set", "lo", "up"], ["addr", "add", f"{B4}/32", "dev", "lo"],
                    ["addr", "add", f"{B6}/128", "dev", "lo", "nodad"]):
            subprocess.run(["ip", "-n", ns, *cmd], check=True, capture_output=True)
        for family, rule, packet in VERDICT_CASES:
            want = _legacy_verdict(ns, family, rule, packet)
            rs = parse_restore(f"*filter\n-A OUTPUT {rule} -j DROP\nCOMMIT\n", family=family)
            got = loader.test_run(compile_ruleset(rs, family), NfHook.LOCAL_OUT, packet,
                                  family=family)
            if got != want:
                diff.append(f"IPv{family} {rule!r}: iptables-legacy {want}, bpfilter {got}")
    assert not diff, "\n".join(diff)
