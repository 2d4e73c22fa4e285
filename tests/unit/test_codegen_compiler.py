"""The compiler without a kernel: which programs, counter numbering, refusals by line, code
structure, dead code, and a golden listing of one tiny ruleset.

Regenerate the golden listing with
``BPFILTER_REGEN_GOLDEN=1 .venv/bin/pytest tests/unit/test_codegen_compiler.py`` and review
the diff before committing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bpfilter.codegen import asm
from bpfilter.codegen import flavor_netfilter as nf
from bpfilter.codegen.asm import Label
from bpfilter.codegen.compiler import (
    MAX_CHAIN_DEPTH,
    CompiledRuleset,
    CompileError,
    RuleRef,
    compile_ruleset,
    live_code,
)
from bpfilter.codegen.insn import R0, Insn
from bpfilter.codegen.link import link
from bpfilter.codegen.uapi import MapType, NfHook, NfProto
from bpfilter.grammar.iptables import parse_restore
from bpfilter.ir.model import (
    Chain,
    Family,
    Match,
    Option,
    Rule,
    Ruleset,
    Table,
    Target,
    TargetKind,
)

GOLDEN = Path(__file__).parent / "golden" / "compiler_tiny.txt"
FAKE_LAYOUT = nf.KernelLayout({f: 8 * (i + 1) for i, f in enumerate(nf.KField)})


def compile_text(text: str, family: int = 4, *, optimize: bool = True) -> CompiledRuleset:
    return compile_ruleset(parse_restore(text, family=family), family, optimize=optimize)


def filter_table(rules: str, *, policy: str = "ACCEPT", chains: str = "") -> str:
    lines = ["*filter", f":INPUT {policy} [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines += [f":{c} - [0:0]" for c in chains.split()]
    return "\n".join(lines + [r.strip() for r in rules.strip().splitlines()] + ["COMMIT", ""])


def test_one_program_per_chain_that_needs_one() -> None:
    text = """*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A OUTPUT -p udp -j DROP
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p tcp -j ACCEPT
COMMIT
"""
    compiled = compile_text(text)
    got = [(p.table, p.chain, p.hook, p.pf, p.priority, p.name) for p in compiled.programs]
    assert got == [
        ("raw", "OUTPUT", NfHook.LOCAL_OUT, NfProto.IPV4, -300, "raw_OUTPUT4"),
        ("filter", "INPUT", NfHook.LOCAL_IN, NfProto.IPV4, 0, "filter_INPUT4"),
        ("filter", "FORWARD", NfHook.FORWARD, NfProto.IPV4, 0, "filter_FORWARD4"),
    ]
    assert compiled.program(NfHook.LOCAL_OUT, "filter") is None
    assert compiled.program(NfHook.LOCAL_OUT, "raw") is compiled.programs[0]
    assert not compiled.needs_conntrack
    (counters,) = compiled.maps
    assert (counters.name, counters.type, counters.key_size, counters.value_size,
            counters.max_entries) == ("counters", MapType.PERCPU_ARRAY, 4, 16, 7)


def test_ipv6_programs() -> None:
    compiled = compile_text(filter_table("-A OUTPUT -p tcp -j DROP"), family=6)
    (program,) = compiled.programs
    assert (program.name, program.pf, program.hook) == ("filter_OUTPUT6", NfProto.IPV6,
                                                        NfHook.LOCAL_OUT)


def test_rule_index_numbers_policies_and_rules() -> None:
    text = filter_table("-A INPUT -j X\n-A INPUT -p udp\n-A X -j RETURN", chains="X")
    compiled = compile_text(text)
    assert dict(compiled.rule_index) == {
        0: RuleRef("filter", "INPUT", 0, 2),
        1: RuleRef("filter", "INPUT", 1, 6),
        2: RuleRef("filter", "INPUT", 2, 7),
        3: RuleRef("filter", "FORWARD", 0, 3),
        4: RuleRef("filter", "OUTPUT", 0, 4),
        5: RuleRef("filter", "X", 1, 8),
    }
    (program,) = compiled.programs
    assert [index for _, index in program.rule_labels] == [1, 2, 5]
    assert [(name, kind) for _, name, kind in program.funcs] == [
        ("bpfilter_main", nf.FuncKind.MAIN), ("part_0", nf.FuncKind.GLOBAL),
        ("chain_0", nf.FuncKind.GLOBAL), ("count", nf.FuncKind.COUNT)]


def test_conntrack_needs() -> None:
    compiled = compile_text(filter_table("-A INPUT -m state --state NEW -j ACCEPT"))
    assert compiled.needs_conntrack
    assert compiled.programs[0].needs == nf.Needs(conntrack=True)
    compiled = compile_text(filter_table("-A INPUT -i eth0 -m mark --mark 1 -j ACCEPT"))
    assert compiled.programs[0].needs == nf.Needs(devices=True, mark=True)
    compiled = compile_text(filter_table("-A INPUT -m conntrack --ctstate DNAT -j ACCEPT"))
    assert compiled.programs[0].needs == nf.Needs(conntrack=True, conntrack_nat=True)


@pytest.mark.parametrize(("text", "message"), [
    ("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
     ":POSTROUTING ACCEPT [0:0]\nCOMMIT\n", "line 1: table 'nat' is not supported"),
    ("*mangle\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n", "line 1: table 'mangle' is not supported"),
    (filter_table("-A INPUT -j CONNMARK --set-mark 1"),
     "line 5: target 'CONNMARK' is not supported"),
    (filter_table("-A INPUT -m recent --rcheck --seconds 5 --reap -j DROP"),
     "line 5: match 'recent' option '--reap' is not supported: it removes the list's oldest "
     "entry, which a BPF LRU map cannot name"),
    ("*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A PREROUTING -m rpfilter -j DROP\n"
     "COMMIT\n", "line 4: match 'rpfilter' is not supported: it needs a FIB lookup, and "
     "netfilter BPF programs have none (bpf_fib_lookup is for XDP and TC)"),
    (filter_table("-A INPUT -m connlimit --connlimit-above 2 -j ACCEPT"),
     "line 5: match 'connlimit' is not supported: it counts the conntrack entries per address "
     "(nf_conncount), which a BPF program cannot enumerate"),
    (filter_table("-A INPUT -p sctp -m sctp --chunk-types all INIT:Ii -j ACCEPT"),
     "line 5: match 'sctp' option '--chunk-types' with chunk flags is not supported"),
])
def test_refusals_name_the_line(text: str, message: str) -> None:
    with pytest.raises(CompileError) as e:
        compile_text(text)
    assert str(e.value) == message
    assert e.value.line == int(message.split(":")[0].split()[1])


def _rule(line: int, **kw: object) -> Rule:
    return Rule(line=line, **kw)


def _ruleset(rules: tuple[Rule, ...], family: Family = Family.IP,
             users: tuple[Chain, ...] = ()) -> Ruleset:
    base = Chain("INPUT", rules, hook=NfHook.LOCAL_IN, policy="ACCEPT", line=2)
    return Ruleset((Table(family, "filter", (base, *users), line=1),))


def test_refusals_from_ir() -> None:
    u32 = _ruleset((_rule(9, matches=(Match("quota2", (Option("--quota", "0"),)),)),))
    with pytest.raises(CompileError, match="^line 9: match 'quota2' is not supported$"):
        compile_ruleset(u32)
    icmp6 = _ruleset((_rule(4, proto=58, matches=(Match("icmp6"),)),))
    with pytest.raises(CompileError, match="^line 4: match 'icmp6' is not supported for IPv4$"):
        compile_ruleset(icmp6)
    frag6 = _ruleset((_rule(5, fragment=True),), Family.IP6)
    with pytest.raises(CompileError, match="^line 5: match '-f' is not supported for IPv6$"):
        compile_ruleset(frag6, 6)
    with pytest.raises(CompileError, match="^line 1: table 'filter' is ip6, not IPv4$"):
        compile_ruleset(_ruleset((), Family.IP6), 4)
    with pytest.raises(ValueError, match="family must be 4 or 6"):
        compile_ruleset(_ruleset(()), 5)


def _jump(line: int, chain: str, kind: TargetKind = TargetKind.JUMP) -> Rule:
    return _rule(line, target=Target(kind, chain))


def test_nesting_deeper_than_the_call_frames_is_refused() -> None:
    def chains(depth: int) -> Ruleset:
        users = tuple(Chain(f"C{i}", (_jump(10 + i, f"C{i + 1}"),) if i < depth else ())
                      for i in range(1, depth + 1))
        return _ruleset((_jump(3, "C1"),), users=users)

    compile_ruleset(chains(MAX_CHAIN_DEPTH))
    with pytest.raises(CompileError, match=f"nest deeper than {MAX_CHAIN_DEPTH} levels"):
        compile_ruleset(chains(MAX_CHAIN_DEPTH + 1))


def test_loops_are_refused() -> None:
    loop = _ruleset((_jump(3, "A"),), users=(Chain("A", (_jump(7, "B"),)),
                                             Chain("B", (_jump(8, "A", TargetKind.GOTO),))))
    with pytest.raises(CompileError, match="^line 8: jump to chain 'A' creates a loop$"):
        compile_ruleset(loop)


def test_loop_behind_an_unconditional_verdict_is_dead_code() -> None:
    """iptables loads a loop that only rules after an unconditional ACCEPT/DROP/RETURN
    close (mark_source_chains stops there); those rules never run, so no code calls them."""
    text = filter_table("-A INPUT -j A\n-A A -j RETURN\n-A A -j B\n-A B -j DROP\n-A B -j A",
                        chains="A B")
    compiled = compile_text(text)
    (program,) = compiled.programs
    calls = {it.ref for it in program.items if isinstance(it, Insn) and it.ref is not None}
    assert "chain:A" in calls and "chain:B" not in calls


def test_jump_to_a_missing_chain_is_refused() -> None:
    with pytest.raises(CompileError, match="chain 'NOPE' is not a user chain"):
        compile_ruleset(_ruleset((_jump(3, "NOPE"),)))


def test_unused_user_chains_are_not_emitted() -> None:
    compiled = compile_text(filter_table("-A INPUT -p udp -j DROP\n-A UNUSED -j ACCEPT",
                                         chains="UNUSED"))
    (program,) = compiled.programs
    assert "chain:UNUSED" not in {it.name for it in program.items if isinstance(it, Label)}
    assert 2 not in [index for _, index in program.rule_labels]


def test_code_after_an_unconditional_verdict_is_dropped() -> None:
    compiled = compile_text(filter_table("-A INPUT -j DROP\n-A INPUT -p tcp -j ACCEPT"))
    (program,) = compiled.programs
    items = list(program.items)
    labels = {it.name: i for i, it in enumerate(items) if isinstance(it, Label)}
    second = items[labels["rule:2"]:labels["INPUT#2:next"]]
    assert not any(isinstance(it, Insn) for it in second)


def test_live_code_follows_jumps_and_calls() -> None:
    items: list[nf.Item] = [
        asm.call_local("f"), asm.jmp("jeq", R0, 0, "b"), asm.exit_(),
        asm.mov64(R0, 1),  # dead: after exit, not a label
        Label("b"), asm.ja("c"), asm.mov64(R0, 2), Label("c"), asm.exit_(),
        Label("f"), asm.mov64(R0, 0), asm.exit_(),
        Label("g"), asm.exit_(),  # never called
    ]
    live, reached = live_code(items)
    assert [str(it) if isinstance(it, Insn) else it for it in live] == [
        str(items[0]), str(items[1]), str(items[2]), Label("b"), str(items[5]), Label("c"),
        str(items[8]), Label("f"), str(items[10]), str(items[11]), Label("g")]
    assert reached == {"b", "c", "f"}


def test_long_built_in_chains_are_split_into_parts() -> None:
    rules = "\n".join(f"-A INPUT -s 10.0.{i >> 8}.{i & 255} -p tcp --dport {i + 1} -j DROP"
                      for i in range(1000))
    (program,) = compile_text(filter_table(rules), optimize=False).programs  # no classifier
    parts = [name for _, name, kind in program.funcs if name.startswith("part_")]
    assert len(parts) > 1
    starts = [index for _, index in program.rule_labels]
    assert starts == list(range(1, 1001))


def test_rules_carry_their_line_as_a_comment() -> None:
    (program,) = compile_text(filter_table("-A INPUT -p tcp -j DROP")).programs
    comments = [it.comment for it in program.items if isinstance(it, Insn) and it.comment]
    assert "line 5: INPUT rule 1" in comments


def test_golden_listing() -> None:
    text = filter_table("-A INPUT -s 198.18.0.0/15 -p tcp --dport 22 -j X\n-A X -j RETURN",
                        policy="DROP", chains="X")
    (program,) = compile_text(text).programs
    linked = link(program.code(FAKE_LAYOUT), kfuncs={"bpf_dynptr_from_skb": 1})
    listing = "\n".join(linked.dump(kfunc_names={1: "bpf_dynptr_from_skb"})) + "\n"
    if os.environ.get("BPFILTER_REGEN_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(listing)
    assert listing == GOLDEN.read_text()
