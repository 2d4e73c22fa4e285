"""codegen/log without a kernel: LOG and NFLOG compile as non-terminal actions sharing one
ring and one drop counter, ask the prologue for what they read, and write their parameters
into the event as constants."""

from __future__ import annotations

import pytest

from bpfilter.codegen import flavor_netfilter as nf
from bpfilter.codegen import log
from bpfilter.codegen.actions import actions
from bpfilter.codegen.compiler import CompiledRuleset, CompileError, compile_ruleset
from bpfilter.codegen.flavor_packet import IfTarget
from bpfilter.codegen.insn import Insn
from bpfilter.codegen.opcodes import Class, Mode, Size
from bpfilter.codegen.uapi import IfHook, NfHook
from bpfilter.grammar.iptables import parse_restore


def compiled(rules: str, family: int = 4) -> CompiledRuleset:
    text = ("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            + rules + "\nCOMMIT\n")
    return compile_ruleset(parse_restore(text, family=family), family)


def stores(c: CompiledRuleset, hook: NfHook) -> dict[int, int]:
    """offset -> immediate of every 32-bit store of a constant in the program at ``hook``."""
    p = c.program(hook)
    assert p is not None
    return {it.off: it.imm & 0xFFFFFFFF for it in p.items if isinstance(it, Insn)
            and it.opcode == Class.ST | Size.W | Mode.MEM}


def test_registered_as_non_terminal_actions() -> None:
    assert not actions()["LOG"].terminal and not actions()["NFLOG"].terminal


def test_one_ring_and_drop_counter_for_every_rule() -> None:
    c = compiled("-A INPUT -j LOG\n-A OUTPUT -j NFLOG --nflog-group 2\n-A INPUT -j LOG")
    assert [m for m in c.maps if m.name in (log.RING, log.DROPS)] == [log.RING_SPEC,
                                                                      log.DROPS_SPEC]
    for hook in (NfHook.LOCAL_IN, NfHook.LOCAL_OUT):
        p = c.program(hook)
        assert p is not None
        assert p.needs.skb and p.needs.devices and p.needs.mark and p.needs.hook_net


def test_no_ring_without_log_rules() -> None:
    c = compiled("-A INPUT -j DROP")
    assert log.RING not in {m.name for m in c.maps}
    p = c.program(NfHook.LOCAL_IN)
    assert p is not None and not p.needs.skb


def test_parameters_are_constants_of_the_event() -> None:
    c = compiled('-A INPUT -j LOG --log-prefix "abcdefg" --log-level info --log-ip-options')
    got = stores(c, NfHook.LOCAL_IN)
    assert got[log.OFF_PREFIX] == int.from_bytes(b"abcd", "little")
    assert got[log.OFF_PREFIX + 4] == int.from_bytes(b"efg\0", "little")
    assert got[log.OFF_TABLE] == int.from_bytes(b"filt", "little")
    assert got[log.OFF_CHAIN] == int.from_bytes(b"INPU", "little")
    assert got[log.OFF_RULE] == 1 and got[log.OFF_COPY_LEN] == log.NO_COPY_LEN
    p = c.program(NfHook.LOCAL_IN)
    assert p is not None
    level = [it.imm for it in p.items if isinstance(it, Insn) and it.off == log.OFF_LEVEL
             and it.opcode == Class.ST | Size.B | Mode.MEM]
    flags = [it.imm for it in p.items if isinstance(it, Insn) and it.off == log.OFF_FLAGS
             and it.opcode == Class.ST | Size.B | Mode.MEM]
    assert level == [6] and flags == [log.LOG_IPOPT]


def test_nflog_size_is_the_copy_length_and_range_is_ignored() -> None:
    # xt_NFLOG: --nflog-range never set XT_NFLOG_F_COPY_LEN, so the kernel ignores it.
    sized = stores(compiled("-A INPUT -j NFLOG --nflog-size 96"), NfHook.LOCAL_IN)
    ranged = stores(compiled("-A INPUT -j NFLOG --nflog-range 96"), NfHook.LOCAL_IN)
    assert sized[log.OFF_COPY_LEN] == 96 and ranged[log.OFF_COPY_LEN] == log.NO_COPY_LEN


def test_uid_walk_only_with_log_uid() -> None:
    def reads_sock(c: CompiledRuleset) -> bool:
        p = c.program(NfHook.LOCAL_OUT)
        assert p is not None
        return any(isinstance(it, nf.FieldAddress) and it.field is nf.KField.SOCK_SOCKET
                   for it in p.items)

    assert reads_sock(compiled("-A OUTPUT -j LOG --log-uid"))
    assert not reads_sock(compiled("-A OUTPUT -j LOG"))


def test_record_layout_fits() -> None:
    assert log.RECORD_SIZE == log.OFF_PKT + log.CAPTURE and log.RECORD_SIZE % 8 == 0
    assert log.OFF_MAC + log.MAC_MAX <= log.OFF_PKT
    assert log.OFF_PREFIX + log.PREFIX_MAX <= log.OFF_TABLE


def test_refused_at_xdp_and_tc_with_the_reason() -> None:
    text = ("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            "-A INPUT -j NFLOG\nCOMMIT\n")
    for hook in (IfHook.XDP, IfHook.TC_INGRESS):
        with pytest.raises(CompileError, match="line 5: target 'NFLOG' is not supported at "
                           f"hook {hook.name}: its events are read from the sk_buff"):
            compile_ruleset(parse_restore(text, family=4), 4, target=IfTarget(hook, "INPUT"))
