"""Commit-time checks: jump graph, hooks a target may run at, protocol requirements."""

from __future__ import annotations

from bpfilter.codegen.uapi import NfHook
from bpfilter.ir.checks import check_table, find_loop, reachable_hooks
from bpfilter.ir.model import Chain, Family, Match, Option, Rule, Table, Target, TargetKind


def jump(name: str, line: int = 1) -> Rule:
    return Rule(target=Target(TargetKind.JUMP, name), line=line, col=1)


def table(*chains: Chain, name: str = "filter") -> Table:
    return Table(Family.IP, name, chains)


def test_reachable_hooks_follow_jumps() -> None:
    t = table(Chain("INPUT", (jump("A"),), NfHook.LOCAL_IN, 0, "ACCEPT"),
              Chain("OUTPUT", (jump("B"),), NfHook.LOCAL_OUT, 0, "ACCEPT"),
              Chain("A", (jump("B"),)), Chain("B"), Chain("C"))
    hooks = reachable_hooks(t)
    assert hooks["B"] == {NfHook.LOCAL_IN, NfHook.LOCAL_OUT}
    assert hooks["C"] == frozenset()


def test_loops_are_found_and_reported_at_the_closing_rule() -> None:
    cycle = (Chain("A", (jump("B", 5),)), Chain("B", (jump("C", 6),)),
             Chain("C", (jump("A", 7),)))
    t = table(Chain("INPUT", (jump("A", 4),), NfHook.LOCAL_IN, 0, "ACCEPT"), *cycle)
    loop = find_loop(t)
    assert loop is not None and loop.line == 7
    assert any("loop" in p.message for p in check_table(t))
    # The kernel only walks chains its hooks reach: an unreachable cycle is accepted.
    assert find_loop(table(*cycle)) is None
    assert find_loop(table(Chain("A", (jump("B"),)), Chain("B"))) is None


def test_nat_target_outside_nat_and_from_a_wrong_hook() -> None:
    masq = Rule(target=Target(TargetKind.EXTENSION, "MASQUERADE"), line=3, col=1)
    probs = check_table(table(Chain("OUTPUT", (masq,), NfHook.LOCAL_OUT, 0, "ACCEPT")))
    assert "nat" in probs[0].message and {p.line for p in probs} == {3}
    dnat = Rule(target=Target(TargetKind.EXTENSION, "DNAT",
                              (Option("--to-destination", "1.2.3.4"),)), line=4, col=1)
    probs = check_table(table(Chain("INPUT", (jump("X"),), NfHook.LOCAL_IN, 100, "ACCEPT"),
                              Chain("X", (dnat,)), name="nat"))
    assert [p.line for p in probs] == [4]


def test_protocol_bound_matches_and_tcp_reset() -> None:
    udp = Rule(matches=(Match("udp", (Option("--dport", None),)),), line=2, col=1)
    assert check_table(table(Chain("INPUT", (udp,), NfHook.LOCAL_IN, 0, "ACCEPT")))
    ok = Rule(proto=17, matches=udp.matches, line=2, col=1)
    assert not check_table(table(Chain("INPUT", (ok,), NfHook.LOCAL_IN, 0, "ACCEPT")))
    rst = Rule(target=Target(TargetKind.EXTENSION, "REJECT",
                             (Option("--reject-with", "tcp-reset"),)), line=9, col=1)
    assert check_table(table(Chain("INPUT", (rst,), NfHook.LOCAL_IN, 0, "ACCEPT")))[0].line == 9


def test_missing_jump_target() -> None:
    (p,) = check_table(table(Chain("INPUT", (jump("GONE", 8),), NfHook.LOCAL_IN, 0, "ACCEPT")))
    assert "GONE" in p.message and p.line == 8


def test_limit_overflow_and_match_tables() -> None:
    from bpfilter.grammar.errors import ParseError
    from bpfilter.grammar.iptables import parse_restore

    # Observed: iptables-legacy-restore says "line N failed" for both.
    for text in ("*filter\n-A INPUT -m limit --limit 1/d -j DROP\nCOMMIT\n",
                 "*filter\n-A INPUT -m rpfilter -j DROP\nCOMMIT\n"):
        try:
            parse_restore(text)
        except ParseError as e:
            assert e.exit_code == 1 and e.line == 2
        else:
            raise AssertionError(text)
    parse_restore("*filter\n-A INPUT -m limit --limit 1/d --limit-burst 4 -j DROP\nCOMMIT\n")
    parse_restore("*raw\n-A PREROUTING -m rpfilter --invert -j DROP\nCOMMIT\n")
