"""The XDP and TC flavors without a kernel: program kinds, the verdict epilogue, per-hook
refusals naming the rule line, and `bpfilter translate --hook`."""

from __future__ import annotations

import pytest

from bpfilter import cli
from bpfilter.codegen.compiler import MAIN_FUNC, CompiledRuleset, CompileError, compile_ruleset
from bpfilter.codegen.flavor_packet import MAIN_EXIT, IfTarget
from bpfilter.codegen.insn import EXIT, Insn
from bpfilter.codegen.uapi import (
    AttachType,
    IfHook,
    NfHook,
    ProgType,
    TcAction,
    XdpAction,
)
from bpfilter.grammar.iptables import parse_restore


def text(rules: str, chains: str = "") -> str:
    return "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                      ":OUTPUT ACCEPT [0:0]", *[f":{c} - [0:0]" for c in chains.split()],
                      *[r.strip() for r in rules.strip().splitlines() if r.strip()],
                      "COMMIT", ""])


def compiled(rules: str, hook: IfHook, chain: str = "INPUT", ifname: str | None = "eth0",
             family: int = 4, chains: str = "") -> CompiledRuleset:
    return compile_ruleset(parse_restore(text(rules, chains), family=family), family,
                           target=IfTarget(hook, chain, ifname))


@pytest.mark.parametrize(("hook", "prog_type", "kfunc", "name"), [
    (IfHook.XDP, ProgType.XDP, "bpf_dynptr_from_xdp", "xdp_INPUT4"),
    (IfHook.TC_INGRESS, ProgType.SCHED_CLS, "bpf_dynptr_from_skb", "tci_INPUT4"),
])
def test_one_program_of_the_hooks_kind(hook: IfHook, prog_type: ProgType, kfunc: str,
                                       name: str) -> None:
    c = compiled("-A INPUT -p tcp --dport 22 -j DROP\n-A FORWARD -j DROP", hook)
    (p,) = c.programs  # FORWARD is not compiled: only the named chain runs
    assert (p.hook, p.prog_type, p.name, p.chain) == (hook, prog_type, name, "INPUT")
    assert p.attach_type == AttachType(hook)
    assert kfunc in p.kfuncs and "bpf_dynptr_adjust" in p.kfuncs
    assert p.target == IfTarget(hook, "INPUT", "eth0")


def _main(c: CompiledRuleset) -> list[object]:
    items = list(c.programs[0].items)
    labels = [n for n, _, _ in c.programs[0].funcs if n != MAIN_FUNC]
    start = next(i for i, it in enumerate(items) if getattr(it, "name", None) == MAIN_FUNC)
    end = min(i for i, it in enumerate(items) if getattr(it, "name", None) in labels)
    return items[start:end]


@pytest.mark.parametrize(("hook", "accept", "drop"), [
    (IfHook.XDP, XdpAction.PASS, XdpAction.DROP),
    (IfHook.TC_EGRESS, TcAction.NEXT, TcAction.SHOT),
])
def test_main_returns_only_the_hooks_verdicts(hook: IfHook, accept: int, drop: int) -> None:
    # RET_CONTINUE (2) is XDP_PASS: no internal code may leave the main function unmapped.
    chain = "OUTPUT" if hook is IfHook.TC_EGRESS else "INPUT"
    c = compiled(f"-A {chain} -p udp -j DROP\n-A {chain} -j X\n-A X -j RETURN", hook, chain,
                 chains="X")
    main = _main(c)
    exits = [i for i, it in enumerate(main) if isinstance(it, Insn) and it.opcode == EXIT]
    assert len(exits) == 2
    values = [main[i - 1].imm for i in exits]  # type: ignore[attr-defined]
    assert sorted(values) == sorted([accept, drop])
    assert any(getattr(it, "name", None) == MAIN_EXIT for it in main)


REFUSALS = [
    (IfHook.XDP, "INPUT", "-A INPUT -m conntrack --ctstate NEW -j ACCEPT",
     "line 5: match 'conntrack' cannot run at XDP: conntrack state is not available"),
    (IfHook.TC_INGRESS, "INPUT", "-A INPUT -m state --state ESTABLISHED -j ACCEPT",
     "line 5: match 'state' cannot run at TC_INGRESS"),
    (IfHook.XDP, "INPUT", "-A INPUT -m mark --mark 1 -j DROP",
     "line 5: match 'mark' cannot run at XDP: XDP programs run before an sk_buff exists"),
    (IfHook.XDP, "INPUT", "-A INPUT -j MARK --set-mark 1",
     "line 5: target 'MARK' cannot run at XDP"),
    (IfHook.XDP, "FORWARD", "-A FORWARD -o eth0 -j DROP",
     "line 5: -o cannot run at XDP: there is no output device at ingress"),
    (IfHook.TC_EGRESS, "FORWARD", "-A FORWARD -i eth0 -j DROP",
     "line 5: -i cannot run at TC_EGRESS: the input device"),
    (IfHook.TC_EGRESS, "OUTPUT", "-A OUTPUT -m pkttype --pkt-type unicast -j DROP",
     "line 5: match 'pkttype' cannot run at TC_EGRESS"),
    (IfHook.XDP, "INPUT", "-A INPUT -j LOG",
     "line 5: target 'LOG' is not supported at hook XDP"),
    (IfHook.XDP, "INPUT", "-A INPUT -j X\n-A INPUT -p tcp\n-A X -p udp\n-A X -m state "
     "--state NEW -j DROP", "line 9: match 'state' cannot run at XDP"),
]


@pytest.mark.parametrize(("hook", "chain", "rules", "message"), REFUSALS,
                         ids=[r[3][8:40] for r in REFUSALS])
def test_refusals_name_the_rule(hook: IfHook, chain: str, rules: str, message: str) -> None:
    with pytest.raises(CompileError) as e:
        compiled(rules, hook, chain, chains="X" if "-j X" in rules else "")
    assert str(e.value).startswith(message), str(e.value)


def test_devices_need_the_interface() -> None:
    with pytest.raises(CompileError, match="line 5: -i needs the interface"):
        compiled("-A INPUT -i eth0 -j DROP", IfHook.TC_INGRESS, ifname=None)
    compiled("-A INPUT -p tcp -j DROP", IfHook.TC_INGRESS, ifname=None)  # no -i: fine
    with pytest.raises(ValueError, match="1-15 bytes"):
        IfTarget(IfHook.XDP, "INPUT", "x" * 16)


def test_mark_refused_at_netfilter_with_the_reason() -> None:
    with pytest.raises(CompileError, match="line 5: target 'MARK' is not supported at hook "
                       "LOCAL_IN: netfilter BPF programs cannot write skb->mark"):
        compile_ruleset(parse_restore(text("-A INPUT -j MARK --set-mark 1")), 4)


def test_netfilter_compiles_as_before() -> None:
    c = compile_ruleset(parse_restore(text("-A INPUT -p tcp -j DROP")), 4)
    (p,) = c.programs
    assert (p.hook, p.prog_type, p.target) == (NfHook.LOCAL_IN, ProgType.NETFILTER, None)


def test_translate_hook(capsys: pytest.CaptureFixture[str], tmp_path: object) -> None:
    import pathlib

    f = pathlib.Path(str(tmp_path)) / "r.v4"
    f.write_text(text("-A OUTPUT -o eth0 -p tcp -j MARK --set-mark 7"))
    assert cli.main(["translate", "--to", "asm", "--hook", "tc-egress", "--dev", "eth0",
                     str(f)]) == 0
    out = capsys.readouterr().out
    assert "; program tce_OUTPUT4: table filter, chain OUTPUT, hook TC_EGRESS" in out
    assert "line 5: OUTPUT rule 1" in out
    assert cli.main(["translate", "--to", "asm", "--hook", "xdp", "--chain", "OUTPUT",
                     "--dev", "eth0", str(f)]) == 1
    assert "-o cannot run at XDP" in capsys.readouterr().err
