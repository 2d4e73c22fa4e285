"""The canonical printer on hand-built IR (the parser-driven cases live in the grammar tests)."""

from __future__ import annotations

from bpfilter.codegen.uapi import NfHook
from bpfilter.ir.iptables_save import format_rule, format_table, to_iptables_save
from bpfilter.ir.model import (
    Chain,
    Family,
    Match,
    Option,
    PortRange,
    Prefix,
    Rule,
    Ruleset,
    Table,
    Target,
    TargetKind,
)


def test_core_options_print_in_iptables_save_order() -> None:
    rule = Rule(src=Prefix(0xC0A80000, 0xFFFF0000, 32), src_neg=True,
                dst=Prefix(0x01020304, 0xFFFFFFFF, 32), iif="eth+", oif="lo", oif_neg=True,
                proto=17, fragment=False,
                matches=(Match("udp", (Option("--dport", PortRange(53, 53)),)),),
                target=Target(TargetKind.GOTO, "LOGDROP"))
    assert format_rule(rule, "FORWARD") == (
        "-A FORWARD ! -s 192.168.0.0/16 -d 1.2.3.4/32 -i eth+ ! -o lo -p udp ! -f -m udp "
        "--dport 53 -g LOGDROP")


def test_rule_without_target_and_ipv6_prefix() -> None:
    rule = Rule(src=Prefix(0x20010DB8 << 96, ((1 << 32) - 1) << 96, 128))
    assert format_rule(rule, "INPUT", bits=128) == "-A INPUT -s 2001:db8::/32"


def test_tables_print_base_chains_first_then_user_chains_sorted() -> None:
    t = Table(Family.IP, "filter", (
        Chain("INPUT", (Rule(target=Target(TargetKind.JUMP, "b")),), NfHook.LOCAL_IN, 0, "DROP",
              (5, 6)),
        Chain("b"), Chain("B"), Chain("a")))
    assert format_table(t) == ("*filter\n:INPUT DROP [0:0]\n:B - [0:0]\n:a - [0:0]\n"
                               ":b - [0:0]\n-A INPUT -j b\nCOMMIT\n")
    assert ":INPUT DROP [5:6]" in format_table(t, counters=True)
    assert "[0:0] -A INPUT -j b" in format_table(t, counters=True)
    assert to_iptables_save(Ruleset((t,)), table="nat") == ""
