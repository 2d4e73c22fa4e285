"""Optimized and linear programs give the same verdicts and per-rule counters (BPF_PROG_TEST_RUN
on random rulesets and packets), and ClassBench traces give a linear reference's verdicts."""

from __future__ import annotations

import ipaddress
import random
import struct
from collections import Counter
from dataclasses import replace
from pathlib import Path

import classbench as cb
import pytest

from bpfilter import loader
from bpfilter.codegen.compiler import RESERVED_MAPS, CompiledRuleset, compile_ruleset
from bpfilter.codegen.uapi import MAX_USED_MAPS, NfHook
from bpfilter.grammar.iptables import parse_restore
from bpfilter.ir.optimizer import MAX_CLASSIFIER, Classifier

DROP, ACCEPT = 0, 1
NET4 = "198.18.{}.{}"
NET6 = "2001:db8::{:x}:{:x}"
VERDICTS = ("ACCEPT", "DROP", "RETURN")


# --- random rulesets made of runs --------------------------------------------------------------

def _addr(rng: random.Random, family: int) -> str:
    a, b = rng.randrange(4), rng.randrange(8)
    return NET4.format(a, b) if family == 4 else NET6.format(a, b)


def _prefix(rng: random.Random, family: int, full: bool = False,
            length: int | None = None) -> str:
    """Prefixes of a small space, so that they overlap and nest often (``full``: hosts;
    ``length``: that length only)."""
    a, b = rng.randrange(4), rng.randrange(8)
    if family == 4:
        n = length or (32 if full else rng.choice([22, 24, 29, 30, 32]))
        return f"{NET4.format(a, b)}/{n}"
    n = length or (128 if full else rng.choice([94, 96, 125, 126, 128]))
    return f"{NET6.format(a, b)}/{n}"


def _run(rng: random.Random, family: int, chain: str, user: bool) -> list[str]:
    """A run the optimizer should take (same shape, one key field varying), sometimes with
    extra shared tests that can hot-drop (tcp) or fail."""
    field = rng.choice(["-s", "-d", "-p", "--sport", "--dport", "-i"])
    other = "-s" if field == "-d" else "-d"
    shared = rng.choice(["", "-p tcp -m tcp --dport 22", "-p udp",
                         f"! {other} {_prefix(rng, family)}", "-m length --length 0:100"])
    if field == "-p":
        shared = rng.choice(["", "-s " + _prefix(rng, family)])
    if field.startswith("--"):
        # One port of a tcp/udp match varies; the match's other tests are shared.
        other_port = "--dport 22:80" if field == "--sport" else "--sport 1000:2000"
        shared = rng.choice(["-p tcp -m tcp", "-p udp -m udp", f"-p tcp -m tcp {other_port}",
                             f"-s {_prefix(rng, family)} -p udp -m udp"])
    targets = list(VERDICTS if user or rng.random() < 0.5 else VERDICTS[:2])
    if chain == "SUB" and rng.random() < 0.3:
        targets.append("-g LEAF")
    out = []
    hosts = rng.random() < 0.3  # only full-length prefixes: a hash table instead of a trie
    # One shorter length: a hash keyed by the masked address.
    length = rng.choice([None, None, 24, 29] if family == 4 else [None, None, 96, 125])
    for _ in range(rng.randrange(4, 14)):
        t = rng.choice(targets)
        action = t if t.startswith("-g") else "-j " + t
        if field.startswith("--"):
            port = rng.choice([7, 22, 53, 80, 1500, 40000])
            out.append(f"-A {chain} {shared} {field} {port} {action}")
            continue
        if field == "-i":  # test runs see the loopback device "lo"
            key = rng.choice(["lo", "lo0", "l", "eth0", "veth-1"])
        elif field == "-p":
            key = str(rng.choice([6, 17, 47, 50, 58 if family == 6 else 1]))
        else:
            key = _prefix(rng, family, hosts, length)
        out.append(f"-A {chain} {field} {key} {shared} {action}")
    return out


def _filler(rng: random.Random, family: int, chain: str) -> str:
    """A rule that stays linear and may or may not let the packet go on."""
    return rng.choice([
        f"-A {chain} -s {_prefix(rng, family)}",
        f"-A {chain} ! -s {_prefix(rng, family)} -j DROP",
        f"-A {chain} -p tcp -m tcp --sport 1000:2000 -j ACCEPT",
        f"-A {chain} -d {_prefix(rng, family)} -j {'SUB' if chain == 'INPUT' else 'RETURN'}",
    ])


def random_ruleset(seed: int, family: int) -> str:
    rng = random.Random(seed)
    rules: list[str] = []
    for chain, user in (("INPUT", False), ("SUB", True), ("LEAF", True)):
        for _ in range(rng.randrange(1, 4)):
            rules += _run(rng, family, chain, user)
            if chain != "SUB":
                rules += [_filler(rng, family, chain) for _ in range(rng.randrange(3))]
    policy = rng.choice(["ACCEPT", "DROP"])
    head = ["*filter", f":INPUT {policy} [0:0]", ":FORWARD ACCEPT [0:0]",
            ":OUTPUT ACCEPT [0:0]", ":LEAF - [0:0]", ":SUB - [0:0]"]
    # Every run of INPUT may be preceded by a jump into SUB; LEAF is only reached by goto.
    rules.insert(0, "-A INPUT -j SUB")
    return "\n".join([*head, *(" ".join(r.split()) for r in rules), "COMMIT", ""])


def random_packet(rng: random.Random, family: int) -> bytes:
    proto = rng.choice([6, 6, 17, 47, 1 if family == 4 else 58])
    if proto == 6:
        l4 = struct.pack("!HHIIBBHHH", rng.choice([1500, 40000]), rng.choice([22, 80]), 0, 0,
                         5 << 4, 0x02, 1024, 0, 0)
        if rng.random() < 0.1:
            l4 = l4[:12]  # too short for the tcp match: it hot-drops
    elif proto == 17:
        l4 = struct.pack("!HHHH", 53, rng.choice([22, 53]), 12, 0) + bytes(rng.randrange(100))
    else:
        l4 = bytes(8)
    src = ipaddress.ip_address(_addr(rng, family)).packed
    dst = ipaddress.ip_address(_addr(rng, family)).packed
    if family == 4:
        return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0,
                           src, dst) + l4
    return struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, src, dst) + l4


def _verdicts(compiled: CompiledRuleset, packets: list[bytes]) -> tuple[list[int], dict]:
    with loader.TestRunner(compiled) as runner:
        got = [runner.run(NfHook.LOCAL_IN, p) for p in packets]
        return got, runner.counters()


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("seed", range(12))
def test_optimized_and_linear_programs_agree(seed: int, family: int) -> None:
    text = random_ruleset(seed, family)
    ruleset = parse_restore(text, family=family)
    optimized = compile_ruleset(ruleset, family, min_run=4)
    linear = compile_ruleset(ruleset, family, optimize=False)
    assert optimized.lookups, "the generator is meant to produce runs"
    assert not linear.lookups
    rng = random.Random(1000 + seed)
    packets = [random_packet(rng, family) for _ in range(150)]
    got, got_counters = _verdicts(optimized, packets)
    want, want_counters = _verdicts(linear, packets)
    assert got == want
    assert got_counters == want_counters
    assert sum(p for p, _ in got_counters.values()) >= len(packets)  # counters did count


def test_hundred_thousand_rules_load_and_decide() -> None:
    """A 100,000-rule blocklist is one lookup: it loads and decides by its first match."""
    rules = [f"-A INPUT -s 198.{18 + (k >> 16)}.{(k >> 8) & 255}.{k & 255}/32 -j "
             f"{'DROP' if k % 2 else 'ACCEPT'}" for k in range(100_000)]
    rules.insert(50_000, "-A INPUT -s 198.18.0.0/16 -j DROP")  # shadows the rest of 198.18
    text = "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                      ":OUTPUT ACCEPT [0:0]", *rules, "COMMIT", ""])
    compiled = compile_ruleset(parse_restore(text), 4)
    assert len(compiled.lookups) == 1
    pkt = cb.packet
    cases = [  # (address, verdict, counter position)
        (0xC6120000 + 2, ACCEPT, 3),  # rule 3: 198.18.0.2 ACCEPT
        (0xC6120000 + 3, DROP, 4),
        (0xC6120000 + 60_001, DROP, 50_001),  # the /16 inserted before the /32s
        (0xC6130000 + 5, DROP, 65_536 + 5 + 1 + 1),  # 198.19.0.5 is rule 65,538
        (0xC6140000, ACCEPT, 0),  # no rule: the policy
    ]
    with loader.TestRunner(compiled) as runner:
        for addr, verdict, _ in cases:
            assert runner.run(NfHook.LOCAL_IN, pkt(cb.CbPacket(addr, 1, 0, 0, 47))) == verdict
        counters = runner.counters()
    hit = {pos for (_, chain, pos), (n, _) in counters.items() if n and chain == "INPUT"}
    assert hit == {pos for _, _, pos in cases}


# --- bit-vector classifiers -----------------------------------------------------------------------

PORTS = (0, 21, 22, 23, 1023, 1024, 8080, 65535)


def _port_range(rng: random.Random) -> str:
    lo, hi = sorted(rng.sample(PORTS, 2))
    return rng.choice([f"{lo}:{hi}", str(lo), f"{lo}:"])


def classifier_ruleset(seed: int, family: int = 4) -> str:
    """ClassBench-shaped rules: prefixes, protocols, tcp/udp port ranges, terminal targets."""
    rng = random.Random(seed)
    rules = []
    for _ in range(rng.randrange(70, 200)):
        parts = []
        for flag in ("-s", "-d"):
            if rng.random() < 0.8:
                parts.append(f"{flag} {_prefix(rng, family)}")
        proto = rng.choice(["", "tcp", "tcp", "udp", "udp", "47", "all"])
        if proto:
            parts.append(f"-p {proto}")
        if proto in ("tcp", "udp") and rng.random() < 0.8:
            parts.append(f"-m {proto}")
            for opt in ("--sport", "--dport"):
                if rng.random() < 0.6:
                    parts.append(f"{opt} {_port_range(rng)}")
        parts.append("-j " + rng.choice(["ACCEPT", "DROP", "ACCEPT", "DROP", "RETURN"]))
        rules.append("-A INPUT " + " ".join(parts))
    policy = rng.choice(["ACCEPT", "DROP"])
    return "\n".join(["*filter", f":INPUT {policy} [0:0]", ":FORWARD ACCEPT [0:0]",
                      ":OUTPUT ACCEPT [0:0]", *rules, "COMMIT", ""])


def classifier_packet(rng: random.Random, family: int = 4) -> bytes:
    proto = rng.choice([6, 6, 17, 17, 47, 1 if family == 4 else 58])
    sport, dport = rng.choice(PORTS), rng.choice(PORTS)
    if proto == 6:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 5 << 4, 0x02, 1024, 0, 0)
    elif proto == 17:
        l4 = struct.pack("!HHHH", sport, dport, 12, 0) + b"abcd"
    else:
        l4 = bytes(8)
    kind = rng.random()
    frag = 0
    if kind < 0.1:
        l4 = l4[:rng.choice([2, 6, 12])]  # too short for the tcp/udp match: hot drop
    elif kind < 0.2:
        frag = rng.choice([1, 1, 2, 100])  # a later fragment (offset 1: tcp's hot drop)
    src = ipaddress.ip_address(_addr(rng, family)).packed
    dst = ipaddress.ip_address(_addr(rng, family)).packed
    if family == 4:
        return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, frag, 64, proto, 0,
                           src, dst) + l4
    nexthdr = proto
    if frag:  # a fragment header in front (offset in 8-byte units)
        l4 = struct.pack("!BBHI", proto, 0, frag << 3, 7) + l4
        nexthdr = 44
    elif rng.random() < 0.1:  # a hop-by-hop header cut short: the walk fails
        l4, nexthdr = b"", 0
    return struct.pack("!IHBB16s16s", 6 << 28, len(l4), nexthdr, 64, src, dst) + l4


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("seed", range(15))
def test_classifier_and_linear_programs_agree(seed: int, family: int) -> None:
    ruleset = parse_restore(classifier_ruleset(seed, family), family=family)
    # Every third seed cuts the stretch into several classifiers, one after the other.
    most = 40 if seed % 3 == 0 else 1000
    optimized = compile_ruleset(ruleset, family, min_classifier=16, max_classifier=most)
    classifiers = [run for _, _, run, _ in optimized.lookups if isinstance(run, Classifier)]
    assert classifiers and all(len(c.rules) <= most for c in classifiers)
    linear = compile_ruleset(ruleset, family, optimize=False)
    rng = random.Random(2000 + seed)
    packets = [classifier_packet(rng, family) for _ in range(300)]
    got, got_counters = _verdicts(optimized, packets)
    want, want_counters = _verdicts(linear, packets)
    assert got == want
    assert got_counters == want_counters


# --- ClassBench ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["acl1", "fw1", "ipc1"])
def test_classbench_traces_match_the_reference(shared_dir: Path, name: str) -> None:
    base = shared_dir / "classbench"
    rules = cb.read_rules(base / f"{name}_1k")
    trace = cb.read_trace(base / f"{name}_1k_trace")
    compiled = compile_ruleset(parse_restore(cb.restore_text(rules)), 4)
    assert [type(run) for _, _, run, _ in compiled.lookups] == [Classifier]
    want = [cb.first_match(rules, p) for p in trace]
    with loader.TestRunner(compiled) as runner:
        got = [runner.run(NfHook.LOCAL_IN, cb.packet(p)) for p in trace]
        counters = runner.counters()
    assert got == [DROP if k is None else int(cb.verdict_of(k) == "ACCEPT") for k in want]
    hits = Counter(0 if k is None else k + 1 for k in want)
    assert {pos: n for (_, c, pos), (n, _) in counters.items() if c == "INPUT" and n} == hits


def test_hundred_thousand_classbench_rules_load_and_decide(shared_dir: Path) -> None:
    """acl1 10k ten times over (sources moved per copy): classifiers one after the other,
    well inside the verifier's limits, verdicts as the reference's."""
    base = cb.read_rules(shared_dir / "classbench" / "acl1_10k")
    rules = [replace(r, src=(r.src[0] ^ (k << 24), r.src[1]) if r.src[1] >= 8 else r.src)
             for k in range(11) for r in base][:100_000]
    compiled = compile_ruleset(parse_restore(cb.restore_text(rules)), 4)
    classifiers = [run for _, _, run, _ in compiled.lookups if isinstance(run, Classifier)]
    assert len(classifiers) >= 100_000 // MAX_CLASSIFIER
    rng = random.Random(7)
    packets = [cb.CbPacket(r.src[0], r.dst[0], r.sport[1], r.dport[0], r.proto or 17)
               for r in rng.sample(rules, 150)]
    packets += [cb.CbPacket(rng.getrandbits(32), rng.getrandbits(32), rng.randrange(65536),
                            rng.randrange(65536), rng.choice([6, 17, 1])) for _ in range(50)]
    with loader.TestRunner(compiled) as runner:
        got = [runner.run(NfHook.LOCAL_IN, cb.packet(p)) for p in packets]
    want = [cb.first_match(rules, p) for p in packets]
    assert got == [DROP if k is None else int(cb.verdict_of(k) == "ACCEPT") for k in want]


def test_more_runs_than_a_program_may_use_maps() -> None:
    """80 runs: 27 become lookups (the kernel's limit is 64 maps per program: the counters, the
    table's switch and RESERVED_MAPS for matches and targets take 10, and a run's map has two
    copies), the rest stay linear; it loads and agrees with the linear program."""
    rules = []
    for g in range(80):
        rules += [f"-A INPUT -s 198.18.{g}.{i} -j {'DROP' if i % 2 else 'ACCEPT'}"
                  for i in range(4 + g % 5)]
        rules.append(f"-A INPUT -d 198.19.{g}.0/24")
    text = "\n".join(["*filter", ":INPUT DROP [0:0]", ":FORWARD ACCEPT [0:0]",
                      ":OUTPUT ACCEPT [0:0]", *rules, "COMMIT", ""])
    ruleset = parse_restore(text)
    optimized = compile_ruleset(ruleset, 4, min_run=4)
    assert len(optimized.lookups) == (MAX_USED_MAPS - 2 - RESERVED_MAPS) // 2 == 27
    rng = random.Random(5)
    packets = [cb.packet(cb.CbPacket(0xC6120000 | rng.randrange(80) << 8 | rng.randrange(10),
                                     0xC6130000 | rng.randrange(90) << 8, 1, 2, 17))
               for _ in range(200)]
    got = _verdicts(optimized, packets)
    want = _verdicts(compile_ruleset(ruleset, 4, optimize=False), packets)
    assert got == want


@pytest.mark.parametrize("family", [4, 6])
def test_interface_runs_at_forward(family: int) -> None:
    """-i and -o runs at FORWARD, where a test run shows the loopback device as the output
    device (and no input device a name could match)."""
    names = ["eth0", "lo0", "l", "lo", "lo", "veth-1", "lo-x"]
    rules = [f"-A FORWARD -i {n} -j {'ACCEPT' if k % 2 else 'DROP'}" for k, n in enumerate(names)]
    rules += [f"-A FORWARD -o {n} -j {'ACCEPT' if k % 3 else 'DROP'}"
              for k, n in enumerate(reversed(names))]
    text = "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD DROP [0:0]",
                      ":OUTPUT ACCEPT [0:0]", *rules, "COMMIT", ""])
    ruleset = parse_restore(text, family=family)
    optimized = compile_ruleset(ruleset, family, min_run=4)
    assert sorted(run.field.value for _, _, run, _ in optimized.lookups) == ["-i", "-o"]
    packet = random_packet(random.Random(3), family)
    results = []
    for compiled in (optimized, compile_ruleset(ruleset, family, optimize=False)):
        with loader.TestRunner(compiled) as runner:
            results.append((runner.run(NfHook.FORWARD, packet), runner.counters()))
    assert results[0] == results[1]
    verdict, counters = results[0]
    assert verdict == 1
    assert {pos for (_, c, pos), (n, _) in counters.items() if n} == {10}  # first "-o lo"
