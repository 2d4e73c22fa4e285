"""The optimizer's runs and tables, evaluated in Python, against a linear first-match reference."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bpfilter.ir.model import Match, Option, PortRange, Prefix, Rule, Target, TargetKind
from bpfilter.ir.optimizer import KeyField, build_run, explain, find_runs, first_containing

ACCEPT = Target(TargetKind.VERDICT, "ACCEPT")
DROP = Target(TargetKind.VERDICT, "DROP")
RETURN = Target(TargetKind.VERDICT, "RETURN")
GOTO_X = Target(TargetKind.GOTO, "X")
JUMP_X = Target(TargetKind.JUMP, "X")
TCP22 = Match("tcp", (Option("--dport", PortRange(22, 22)),))


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
    assert table == {(net, 8): 0, (net | 0x0101_00, 24): 0, (0x0B00_0000, 16): 2}
    # Reversed order: the longer prefix comes first and wins inside itself only.
    table = {(a, n): k for a, n, k in first_containing(prefixes[1::-1], 32)}
    assert table == {(net | 0x0101_00, 24): 0, (net, 8): 1}
    # A duplicate prefix keeps its first rule.
    assert first_containing([prefix(net, 8), prefix(net, 8)], 32) == ((net, 8, 0),)


def _blocklist(n: int, **kw: object) -> list[Rule]:
    return [Rule(src=prefix(0xC612_0000 + k, 32), target=DROP, line=k + 1, **kw)
            for k in range(n)]


def test_find_runs_cuts_at_different_shapes() -> None:
    rules = [*_blocklist(5), Rule(src=prefix(1, 32), proto=6, matches=(TCP22,), target=DROP),
             *_blocklist(4, proto=6, matches=(TCP22,))]
    runs = find_runs(rules)
    assert [(r.field, r.start, r.stop) for r in runs] == [(KeyField.SRC, 0, 5),
                                                          (KeyField.SRC, 5, 10)]


def test_find_runs_leaves_ineligible_rules_linear() -> None:
    negated = [Rule(src=prefix(k, 32), src_neg=True, target=DROP) for k in range(8)]
    odd_mask = [Rule(src=Prefix(k, 0xFF00FF00, 32), target=DROP) for k in range(8)]
    counting = [Rule(src=prefix(k, 32)) for k in range(8)]  # no target: later rules see it
    jumps = [Rule(src=prefix(k, 32), target=JUMP_X) for k in range(8)]
    any_proto = [Rule(proto=0, target=DROP) for _ in range(8)]
    for rules in (negated, odd_mask, counting, jumps, any_proto):
        assert find_runs(rules) == []


def test_find_runs_min_run_and_longest_field() -> None:
    assert find_runs(_blocklist(3)) == []
    assert len(find_runs(_blocklist(3), min_run=3)) == 1
    # Same source, different destinations: the destination gives the longer run.
    rules = [Rule(src=prefix(1, 32), dst=prefix(k, 32), target=DROP) for k in range(6)]
    (run,) = find_runs(rules)
    assert run.field is KeyField.DST and (run.start, run.stop) == (0, 6)


def test_find_runs_mixes_terminal_targets() -> None:
    rules = [Rule(proto=p, target=t) for p, t in
             zip(range(1, 9), [ACCEPT, DROP, RETURN, GOTO_X] * 2, strict=True)]
    (run,) = find_runs(rules)
    assert run.field is KeyField.PROTO
    assert run.actions == (ACCEPT, DROP, RETURN, GOTO_X)
    assert run.action_of == (0, 1, 2, 3, 0, 1, 2, 3)


def test_explain_names_lines_and_tables() -> None:
    rules = _blocklist(6)
    text = explain(rules, find_runs(rules))
    assert text == ["table 0: rules 1-6 (lines 1-6) -> lpm_trie on -s, 6 entries, "
                    "1 action(s): DROP"]


def test_large_blocklist_is_one_run() -> None:
    rules = _blocklist(20_000)
    (run,) = find_runs(rules)
    assert len(run.entries) == 20_000
    assert run.first_match(0xC612_0000 + 12_345) == 12_345
