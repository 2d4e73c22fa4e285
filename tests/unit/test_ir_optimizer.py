"""The optimizer's runs and tables, evaluated in Python, against a linear first-match reference."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from bpfilter.ir.model import Match, Option, PortRange, Prefix, Rule, Target, TargetKind
from bpfilter.ir.optimizer import (
    HOTDROP,
    NOMATCH,
    NORMAL,
    PROTOERR,
    Classifier,
    KeyField,
    Run,
    build_classifier,
    build_run,
    classifiable,
    explain,
    find_runs,
    first_containing,
    interface_key,
    plan,
    port_key,
    rest_matches,
)

ACCEPT = Target(TargetKind.VERDICT, "ACCEPT")
DROP = Target(TargetKind.VERDICT, "DROP")
RETURN = Target(TargetKind.VERDICT, "RETURN")
GOTO_X = Target(TargetKind.GOTO, "X")
JUMP_X = Target(TargetKind.JUMP, "X")
TCP22 = Match("tcp", (Option("--dport", PortRange(22, 22)),))


U32 = 0xFFFFFFFF


def prefix(addr: int, length: int, bits: int = 32) -> Prefix:
    full = (1 << bits) - 1
    mask = (full << (bits - length)) & full
    return Prefix(addr & mask, mask, bits)


def contains(p: Prefix, addr: int) -> bool:
    return addr & p.mask == p.addr


def linear(rules: list[Rule], field: KeyField, key: int) -> int | None:
    """The first rule whose key field matches (the other fields are shared by the run)."""
    for k, r in enumerate(rules):
        if field is KeyField.PROTO:
            if r.proto == key:
                return k
            continue
        p = r.src if field is KeyField.SRC else r.dst
        assert p is not None
        if contains(p, key):
            return k
    return None


# Addresses drawn from a small space so that prefixes overlap often.
def _prefixes(bits: int) -> st.SearchStrategy[Prefix]:
    top = 0xC612_0000 if bits == 32 else 0x2001_0DB8 << 96
    return st.builds(lambda low, n: prefix(top | low, bits - 16 + n, bits),
                     st.integers(0, 0xFFFF), st.integers(0, 16))


def _packets(bits: int) -> st.SearchStrategy[int]:
    top = 0xC612_0000 if bits == 32 else 0x2001_0DB8 << 96
    return st.one_of(st.integers(0, 0xFFFF).map(lambda low: top | low),
                     st.integers(0, (1 << bits) - 1))


@settings(max_examples=300, deadline=None)
@given(st.data(), st.sampled_from([32, 128]), st.sampled_from([KeyField.SRC, KeyField.DST]))
def test_prefix_runs_give_the_first_match(data: st.DataObject, bits: int,
                                          field: KeyField) -> None:
    prefixes = data.draw(st.lists(_prefixes(bits), min_size=1, max_size=40))
    targets = data.draw(st.lists(st.sampled_from([ACCEPT, DROP, RETURN]),
                                 min_size=len(prefixes), max_size=len(prefixes)))
    rules = [Rule(**{"src" if field is KeyField.SRC else "dst": p}, target=t, line=10 + k)
             for k, (p, t) in enumerate(zip(prefixes, targets, strict=True))]
    run = build_run(rules, field)
    assert [run.actions[a] for a in run.action_of] == targets
    for key in data.draw(st.lists(_packets(bits), min_size=1, max_size=30)):
        assert run.first_match(key) == linear(rules, field, key)
    # Every rule's own address is decided by that rule or an earlier one containing it.
    for k, p in enumerate(prefixes):
        got = run.first_match(p.addr)
        assert got is not None and got <= k and contains(prefixes[got], p.addr)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 255), min_size=1, max_size=30), st.integers(0, 255))
def test_protocol_runs_give_the_first_match(protos: list[int], probe: int) -> None:
    rules = [Rule(proto=p, target=ACCEPT if k % 2 else DROP) for k, p in enumerate(protos)]
    run = build_run(rules, KeyField.PROTO)
    assert run.first_match(probe) == linear(rules, KeyField.PROTO, probe)
    assert len(run.entries) == len(set(protos))


def test_overlapping_prefixes_keep_the_first_rule() -> None:
    # 10.0.0.0/8 DROP first, then a /24 ACCEPT inside it, then a /16 before... the /24's
    # entry must answer rule 0 (the /8 contains it); an address outside the /8 finds nothing.
    net = 0x0A00_0000
    prefixes = [prefix(net, 8), prefix(net | 0x0101_00, 24), prefix(0x0B00_0000, 16)]
    table = {(a, n): k for a, n, k in first_containing(prefixes, 32)}
    # The /24 would answer rule 0 like the /8 around it: no entry of its own.
    assert table == {(net, 8): 0, (0x0B00_0000, 16): 2}
    # Reversed order: the longer prefix comes first and wins inside itself only.
    table = {(a, n): k for a, n, k in first_containing(prefixes[1::-1], 32)}
    assert table == {(net | 0x0101_00, 24): 0, (net, 8): 1}
    # A duplicate prefix keeps its first rule.
    assert first_containing([prefix(net, 8), prefix(net, 8)], 32) == ((net, 8, 0),)


def test_first_containing_agrees_with_a_linear_search() -> None:
    """Random overlapping prefixes: the longest stored prefix answers the first rule whose
    prefix contains the address (or nothing), with shadowed prefixes left out."""
    rng = random.Random(7)
    for _ in range(50):
        prefixes = []
        for _ in range(rng.randrange(1, 60)):
            n = rng.choice((0, 1, 2, 4, 8, 9, 16, 24, 31, 32))
            prefixes.append(prefix(rng.getrandbits(32) & (U32 << (32 - n)) & U32, n))
        entries = first_containing(prefixes, 32)
        assert len({(a, n) for a, n, _ in entries}) == len(entries)
        for _ in range(200):
            addr = rng.choice(prefixes).addr | rng.getrandbits(32 - rng.choice((0, 8, 24, 32)))
            want = next((k for k, p in enumerate(prefixes) if addr & p.mask == p.addr), None)
            hits = [(n, k) for a, n, k in entries if n == 0 or addr >> (32 - n) == a >> (32 - n)]
            assert (max(hits)[1] if hits else None) == want, (prefixes, addr)


def _blocklist(n: int, **kw: object) -> list[Rule]:
    return [Rule(src=prefix(0xC612_0000 + k, 32), target=DROP, line=k + 1, **kw)
            for k in range(n)]


def test_find_runs_cuts_at_different_shapes() -> None:
    rules = [*_blocklist(5), Rule(src=prefix(1, 32), proto=6, matches=(TCP22,), target=DROP),
             *_blocklist(4, proto=6, matches=(TCP22,))]
    runs = find_runs(rules, 4)
    assert [(r.field, r.start, r.stop) for r in runs] == [(KeyField.SRC, 0, 5),
                                                          (KeyField.SRC, 5, 10)]


def test_find_runs_leaves_ineligible_rules_linear() -> None:
    negated = [Rule(src=prefix(k, 32), src_neg=True, target=DROP) for k in range(8)]
    odd_mask = [Rule(src=Prefix(k, 0xFF00FF00, 32), target=DROP) for k in range(8)]
    counting = [Rule(src=prefix(k, 32)) for k in range(8)]  # no target: later rules see it
    jumps = [Rule(src=prefix(k, 32), target=JUMP_X) for k in range(8)]
    any_proto = [Rule(proto=0, target=DROP) for _ in range(8)]
    for rules in (negated, odd_mask, counting, jumps, any_proto):
        assert find_runs(rules, 4) == []


def test_find_runs_min_run_and_longest_field() -> None:
    assert find_runs(_blocklist(31)) == []  # MIN_RUN is 32
    assert len(find_runs(_blocklist(32))) == 1
    assert find_runs(_blocklist(3), 4) == []
    assert len(find_runs(_blocklist(3), min_run=3)) == 1
    # Same source, different destinations: the destination gives the longer run.
    rules = [Rule(src=prefix(1, 32), dst=prefix(k, 32), target=DROP) for k in range(6)]
    (run,) = find_runs(rules, 4)
    assert run.field is KeyField.DST and (run.start, run.stop) == (0, 6)


def test_find_runs_mixes_terminal_targets() -> None:
    rules = [Rule(proto=p, target=t) for p, t in
             zip(range(1, 9), [ACCEPT, DROP, RETURN, GOTO_X] * 2, strict=True)]
    (run,) = find_runs(rules, 4)
    assert run.field is KeyField.PROTO
    assert run.actions == (ACCEPT, DROP, RETURN, GOTO_X)
    assert run.action_of == (0, 1, 2, 3, 0, 1, 2, 3)


def test_explain_names_lines_and_tables() -> None:
    rules = _blocklist(6)
    text = explain(find_runs(rules, 4))
    assert text == ["lookup 0: rules 1-6 (lines 1-6) -> hash on -s, 6 entries, "
                    "1 action(s): DROP"]
    mixed = [Rule(src=prefix(k, 32), dst=prefix(k << 8, 24), proto=6, matches=(TCP22,),
                  target=ACCEPT if k % 2 else GOTO_X, line=k + 1) for k in range(70)]
    (line,) = explain(plan(mixed, min_run=4))
    assert line == ("lookup 0: rules 1-70 (lines 1-70) -> bit-vector classifier, 2 words per "
                    "bitmap: -s lpm_trie 71 entries, -d lpm_trie 71 entries, -p array, "
                    "--sport 1 intervals, --dport 3 intervals; 2 action(s): -g X, ACCEPT")


def test_large_blocklist_is_one_run() -> None:
    rules = _blocklist(20_000)
    (run,) = find_runs(rules, 4)
    assert len(run.entries) == 20_000
    assert run.first_match(0xC612_0000 + 12_345) == 12_345


# --- bit-vector classifiers -------------------------------------------------------------------

PORTS = (0, 21, 22, 23, 1023, 1024, 65535)


@st.composite
def _cb_rules(draw: st.DrawFn, bits: int = 32) -> Rule:
    src = draw(st.none() | _prefixes(bits))
    dst = draw(st.none() | _prefixes(bits))
    proto = draw(st.sampled_from([None, 6, 17, 47, 0]))
    matches: tuple[Match, ...] = ()
    if proto in (6, 17) and draw(st.booleans()):
        opts = []
        for name in ("--sport", "--dport"):
            if draw(st.booleans()):
                lo, hi = sorted(draw(st.lists(st.sampled_from(PORTS), min_size=2, max_size=2)))
                opts.append(Option(name, PortRange(lo, hi)))
        matches = (Match("tcp" if proto == 6 else "udp", tuple(opts)),)
    target = draw(st.sampled_from([ACCEPT, DROP, RETURN]))
    return Rule(src=src, dst=dst, proto=proto, matches=matches, target=target)


def _cb_linear(rules: list[Rule], src: int, dst: int, proto: int, sport: int, dport: int,
               klass: int) -> tuple[int, bool] | None:
    for k, r in enumerate(rules):
        if r.src is not None and not contains(r.src, src):
            continue
        if r.dst is not None and not contains(r.dst, dst):
            continue
        if klass == PROTOERR:  # ip6_packet_match: -p (even -p all) hot-drops
            return k, r.proto is not None
        if r.proto and r.proto != proto:
            continue
        if r.matches:
            if klass == HOTDROP:
                return k, True
            if klass == NOMATCH:
                continue
            m = r.matches[0]
            ok = True
            for name, port in (("--sport", sport), ("--dport", dport)):
                o = m.get(name)
                if o is not None:
                    assert isinstance(o.value, PortRange)
                    ok = ok and o.value.lo <= port <= o.value.hi
            if not ok:
                continue
        return k, False
    return None


@settings(max_examples=200, deadline=None)
@given(st.data(), st.sampled_from([32, 128]))
def test_classifier_gives_the_first_match(data: st.DataObject, bits: int) -> None:
    rules = data.draw(st.lists(_cb_rules(bits), min_size=1, max_size=150))
    assert all(classifiable(r, bits) for r in rules)
    cls = build_classifier(rules, bits=bits)
    assert cls.words == (len(rules) + 63) // 64
    classes = [NORMAL, NOMATCH, HOTDROP] + ([PROTOERR] if bits == 128 else [])
    for _ in range(20):
        src, dst = data.draw(_packets(bits)), data.draw(_packets(bits))
        proto = data.draw(st.sampled_from([6, 17, 47, 1]))
        sport, dport = data.draw(st.sampled_from(PORTS)), data.draw(st.integers(0, 65535))
        klass = data.draw(st.sampled_from(classes))
        assert (cls.decide(src, dst, proto, sport, dport, klass)
                == _cb_linear(rules, src, dst, proto, sport, dport, klass))


def test_classifiable_refuses_other_shapes() -> None:
    ok = Rule(src=prefix(1, 32), proto=6, matches=(TCP22,), target=DROP)
    assert classifiable(ok)
    for bad in (Rule(src=prefix(1, 32), src_neg=True, target=DROP),
                Rule(src=Prefix(1, 0xFF00FF00, 32), target=DROP),
                Rule(iif="eth0", target=DROP),
                Rule(fragment=True, target=DROP),
                Rule(proto=17, matches=(TCP22,), target=DROP),
                Rule(proto=6, matches=(Match("tcp", (Option("--dport", PortRange(1, 2),
                                                             negated=True),)),), target=DROP),
                Rule(proto=6, matches=(TCP22, Match("comment", (Option("--comment", "x"),))),
                     target=DROP),
                Rule(src=prefix(1, 32), target=JUMP_X),
                Rule(src=prefix(1 << 100, 64, 128), target=DROP)):
        assert not classifiable(bad), bad
    assert classifiable(Rule(src=prefix(1 << 100, 64, 128), target=DROP), 128)


def test_plan_prefers_one_single_field_run_and_cuts_classifiers() -> None:
    block = _blocklist(100)
    (run,) = plan(block, min_run=4)
    assert isinstance(run, Run)
    mixed = [Rule(src=prefix(k, 32), dst=prefix(k * 7, 24), target=DROP) for k in range(80)]
    counting = Rule(src=prefix(1, 32))  # no target: not classifiable
    segs = plan([*_blocklist(5), counting, *mixed, counting, *mixed[:10]], min_run=4)
    assert [(type(s).__name__, s.start, s.stop) for s in segs] == [
        ("Run", 0, 5), ("Classifier", 6, 86), ("Run", 87, 97)]
    assert plan(mixed, family=6, min_run=4) == find_runs(mixed, 4)  # IPv4 rules
    mixed6 = [Rule(src=prefix(k << 64, 64, 128), dst=prefix(k * 7, 120, 128), target=DROP)
              for k in range(80)]
    (cls,) = plan(mixed6, family=6, min_run=4)
    assert isinstance(cls, Classifier) and cls.bits == 128
    # A long stretch: classifiers of at most max_classifier rules, a short tail stays linear.
    many = [Rule(src=prefix(k, 32), dst=prefix(k * 7, 24), target=DROP) for k in range(300)]
    segs = plan(many, max_classifier=100, min_run=4)
    assert [(type(s).__name__, s.start, s.stop) for s in segs] == [
        ("Classifier", 0, 100), ("Classifier", 100, 200), ("Classifier", 200, 300)]
    segs = plan(many[:250], max_classifier=100, min_run=1000)
    assert [(s.start, s.stop) for s in segs] == [(0, 100), (100, 200)]
    assert all(isinstance(s, Run) for s in plan(mixed, min_classifier=100, min_run=4))


def _tcp(**ports: PortRange) -> Match:
    return Match("tcp", tuple(Option(f"--{k}", v) for k, v in ports.items()))


def test_port_runs_keep_the_rest_of_the_match() -> None:
    rules = [Rule(proto=6, matches=(_tcp(sport=PortRange(1000, 2000), dport=PortRange(p, p)),),
                  target=DROP if p % 2 else ACCEPT) for p in (22, 80, 443, 22, 8080)]
    (run,) = find_runs(rules, 4)
    assert run.field is KeyField.DPORT and not run.field.is_prefix and run.exact
    assert sorted(run.entries) == [(22, 0, 0), (80, 0, 1), (443, 0, 2), (8080, 0, 4)]
    assert run.first_match(443) == 2 and run.first_match(23) is None
    assert rest_matches(rules[0], KeyField.DPORT) == (_tcp(sport=PortRange(1000, 2000)),)
    assert rest_matches(rules[0], KeyField.SRC) == rules[0].matches


def test_port_ranges_and_negated_ports_stay_linear() -> None:
    ranges = [Rule(proto=6, matches=(_tcp(dport=PortRange(p, p + 1)),), target=DROP)
              for p in range(8)]
    negated = [Rule(proto=6, matches=(Match("tcp", (Option("--dport", PortRange(p, p),
                                                           negated=True),)),), target=DROP)
               for p in range(8)]
    assert find_runs(ranges, 4) == [] and find_runs(negated, 4) == []
    assert port_key(ranges[0], KeyField.DPORT) is None
    assert port_key(Rule(proto=6, matches=(_tcp(sport=PortRange(5, 5)),)), KeyField.SPORT) == 5


def test_interface_runs_use_exact_names_only() -> None:
    names = ["eth0", "lo", "eth1", "lo", "veth-a"]
    rules = [Rule(iif=n, target=DROP if k % 2 else ACCEPT) for k, n in enumerate(names)]
    (run,) = find_runs(rules, 4)
    assert run.field is KeyField.IIF and run.exact
    key = interface_key("lo", False)
    assert key == int.from_bytes(b"lo" + bytes(14), "big")
    assert run.first_match(key) == 1
    assert len(run.entries) == 4
    (out,) = find_runs([Rule(oif=n, target=DROP) for n in names], 4)
    assert out.field is KeyField.OIF
    for bad in ([Rule(iif="eth+", target=DROP)] * 5,
                [Rule(iif="eth0", iif_neg=True, target=DROP)] * 5):
        assert find_runs(bad, 4) == []
    assert interface_key(None, False) is None
