"""Real UDP traffic through statistic nth and limit rules: bpfilter attached in a namespace
delivers and counts exactly the datagrams iptables-legacy does with the same rules."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from bpfilter import loader, testbed
from bpfilter.codegen.compiler import compile_ruleset
from bpfilter.grammar.iptables import parse_restore

PORT = 40404
RULES = [
    f"-p udp --dport {PORT} -m statistic --mode nth --every 3 --packet 1 -j DROP",
    f"-p udp --dport {PORT} -m limit --limit 1/hour --limit-burst 4 -j ACCEPT",
    f"-p udp --dport {PORT} -j DROP",
]
RULESET = "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                     ":OUTPUT ACCEPT [0:0]", *[f"-A INPUT {r}" for r in RULES], "COMMIT", ""])
DATAGRAMS = 12
NEGATIVE_WAIT = 0.3  # a datagram on veth arrives in microseconds


def _deliveries(pair: testbed.NetnsPair) -> list[bool]:
    return [testbed.udp_reaches(pair.a, pair.b, pair.ipv4_b, PORT, timeout=NEGATIVE_WAIT,
                                payload=f"datagram {n}".encode()) for n in range(DATAGRAMS)]


def _legacy_counts(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "exec", ns, "iptables-legacy", "-L", "INPUT", "-v",
                          "-x", "-n"], check=True, capture_output=True, text=True,
                         timeout=20).stdout
    return [int(line.split()[0]) for line in out.splitlines()[2:] if line.strip()]


def test_nth_and_limit_deliver_what_iptables_legacy_delivers(
        netns_pair: testbed.NetnsPair) -> None:
    if shutil.which("iptables-legacy-restore") is None:
        pytest.skip("iptables-legacy is not installed")
    pair = netns_pair
    compiled = compile_ruleset(parse_restore(RULESET, family=4), 4)
    with loader.load(compiled, pair.b, pin=False) as handle:
        mine = _deliveries(pair)
        counters = handle.counters()
        my_counts = [counters[("filter", "INPUT", i + 1)][0] for i in range(len(RULES))]
    subprocess.run(["ip", "netns", "exec", pair.b, "iptables-legacy-restore"], input=RULESET,
                   text=True, check=True, timeout=20)
    try:
        theirs = _deliveries(pair)
        their_counts = _legacy_counts(pair.b)
    finally:
        subprocess.run(["ip", "netns", "exec", pair.b, "iptables-legacy", "-F"], check=False,
                       timeout=20)
    # nth drops datagrams 1, 4, 7, 10; the limit lets the first four others through
    assert theirs == [n in (0, 2, 3, 5) for n in range(DATAGRAMS)]
    assert mine == theirs
    assert my_counts == their_counts == [4, 4, 4]
