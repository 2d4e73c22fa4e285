"""iptables-restore input -> IR: line kinds, commands, options, errors and exit codes."""

from __future__ import annotations

import pytest

from bpfilter.codegen.uapi import NfHook
from bpfilter.grammar.errors import ParseError
from bpfilter.grammar.iptables import parse_command, parse_restore
from bpfilter.ir.iptables_save import to_iptables_save
from bpfilter.ir.model import Family, TargetKind


def save(text: str, family: int = 4) -> str:
    return to_iptables_save(parse_restore(text, family=family))


def rules(text: str, family: int = 4) -> list[str]:
    return [x for x in save(text, family).splitlines() if x.startswith("-A")]


def refuse(text: str, family: int = 4) -> ParseError:
    with pytest.raises(ParseError) as info:
        parse_restore(text, family=family, filename="f")
    return info.value


def test_minimal_ruleset_builds_the_ir() -> None:
    rs = parse_restore("*filter\n:INPUT DROP [1:2]\n:MY - [0:0]\n-A INPUT -s 10.1.2.3/8 "
                       "-p tcp --dport 22 -j MY\nCOMMIT\n")
    (table,) = rs.tables
    assert (table.family, table.name) == (Family.IP, "filter")
    inp = table.chain("INPUT")
    assert inp is not None and inp.hook is NfHook.LOCAL_IN and inp.policy == "DROP"
    assert inp.priority == 0 and inp.counters == (1, 2)
    my = table.chain("MY")
    assert my is not None and my.hook is None and my.policy is None
    (rule,) = inp.rules
    assert (rule.line, rule.col) == (4, 1)
    assert rule.src is not None and rule.src.length == 8 and rule.proto == 6
    assert [m.kind for m in rule.matches] == ["tcp"]
    assert rule.target is not None and rule.target.kind is TargetKind.JUMP


def test_canonical_order_and_defaults() -> None:
    assert rules("*filter\n-A INPUT -j ACCEPT -p udp -i eth0 -d 1.2.3.4 -s 5.6.7.8\n"
                 "-A INPUT -p tcp --syn -m conntrack --ctstate ESTABLISHED,RELATED -j REJECT\n"
                 "COMMIT\n") == [
        "-A INPUT -s 5.6.7.8/32 -d 1.2.3.4/32 -i eth0 -p udp -j ACCEPT",
        "-A INPUT -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack --ctstate "
        "RELATED,ESTABLISHED -j REJECT --reject-with icmp-port-unreachable",
    ]


def test_address_lists_expand_to_several_rules() -> None:
    assert rules("*filter\n-A INPUT -s 192.0.2.1,192.0.2.2 -d 198.51.100.0/24,10.0.0.1 "
                 "-j DROP\nCOMMIT\n") == [
        "-A INPUT -s 192.0.2.1/32 -d 198.51.100.0/24 -j DROP",
        "-A INPUT -s 192.0.2.1/32 -d 10.0.0.1/32 -j DROP",
        "-A INPUT -s 192.0.2.2/32 -d 198.51.100.0/24 -j DROP",
        "-A INPUT -s 192.0.2.2/32 -d 10.0.0.1/32 -j DROP",
    ]


def test_all_builtin_chains_are_listed_and_user_chains_sorted() -> None:
    out = save("*mangle\n:PREROUTING ACCEPT [0:0]\n:zz - [0:0]\n:AA - [0:0]\nCOMMIT\n")
    assert out.splitlines()[1:] == [":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]",
                                    ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
                                    ":POSTROUTING ACCEPT [0:0]", ":AA - [0:0]", ":zz - [0:0]",
                                    "COMMIT"]


def test_counters_are_kept_and_printed_on_request() -> None:
    rs = parse_restore("*filter\n:INPUT DROP [10:600]\n[3:180] -A INPUT -i lo -j ACCEPT\n"
                       "-A INPUT -c 4 5 -j DROP\nCOMMIT\n")
    out = to_iptables_save(rs, counters=True).splitlines()
    assert ":INPUT DROP [10:600]" in out
    assert "[3:180] -A INPUT -i lo -j ACCEPT" in out
    assert "[4:5] -A INPUT -j DROP" in out
    assert "[3:180]" not in to_iptables_save(rs)


def test_table_filter_of_the_printer() -> None:
    rs = parse_restore("*filter\nCOMMIT\n*nat\nCOMMIT\n")
    assert to_iptables_save(rs, table="nat").startswith("*nat\n")
    assert "*filter" not in to_iptables_save(rs, table="nat")


def test_lines_of_the_other_family_are_skipped() -> None:
    text = ("*filter\n-6 -A INPUT -s 2001:db8::1 -j DROP\n"
            "-4 -A INPUT -s 192.0.2.4 -j ACCEPT\nCOMMIT\n")
    assert rules(text) == ["-A INPUT -s 192.0.2.4/32 -j ACCEPT"]
    text6 = ("*filter\n-4 -A INPUT -s 192.0.2.4 -j ACCEPT\n"
             "-A INPUT -s 2001:db8::1 -j DROP\nCOMMIT\n")
    assert rules(text6, family=6) == ["-A INPUT -s 2001:db8::1/128 -j DROP"]


def test_ipv6_ruleset() -> None:
    assert rules("*filter\n-A INPUT -s 2001:db8::/32 -p ipv6-icmp -j ACCEPT\n"
                 "-A INPUT -p tcp --dport 22 -m conntrack --ctstate NEW -j ACCEPT\n"
                 "-A INPUT -j REJECT\nCOMMIT\n", family=6) == [
        "-A INPUT -s 2001:db8::/32 -p ipv6-icmp -j ACCEPT",
        "-A INPUT -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW -j ACCEPT",
        "-A INPUT -j REJECT --reject-with icmp6-port-unreachable",
    ]
    assert refuse("*filter\n-A INPUT -s 10.0.0.1 -j ACCEPT\nCOMMIT\n", family=6).exit_code == 2


def test_restore_commands_edit_the_table() -> None:
    text = ("*filter\n:FOO - [0:0]\n:BAR - [0:0]\n-A INPUT -s 192.0.2.1 -j DROP\n"
            "-A INPUT -s 192.0.2.2 -j DROP\n-A INPUT -s 192.0.2.3 -j DROP\n"
            "-D INPUT -s 192.0.2.2 -j DROP\n-D INPUT 1\n-I INPUT 1 -s 198.51.100.1 -j ACCEPT\n"
            "-R INPUT 2 -s 198.51.100.3 -j REJECT\n-A FOO -j RETURN\n-X BAR\n-N NEWC\n"
            "-A NEWC -j ACCEPT\n-E FOO FOO2\n-F FOO2\n-P FORWARD DROP\n-Z\nCOMMIT\n")
    assert save(text).splitlines() == [
        "*filter", ":INPUT ACCEPT [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]",
        ":FOO2 - [0:0]", ":NEWC - [0:0]", "-A INPUT -s 198.51.100.1/32 -j ACCEPT",
        "-A INPUT -s 198.51.100.3/32 -j REJECT --reject-with icmp-port-unreachable",
        "-A NEWC -j ACCEPT", "COMMIT"]


def test_delete_by_specification_compares_canonical_rules() -> None:
    assert rules("*filter\n-A INPUT -p tcp --dport 22 -m comment --comment a -j ACCEPT\n"
                 "-A INPUT -j DROP\n"
                 "-D INPUT -p tcp -m tcp --dport ssh -m comment --comment a -j ACCEPT\n"
                 "COMMIT\n") == ["-A INPUT -j DROP"]
    e = refuse("*filter\n-A INPUT -m comment --comment a -j ACCEPT\n"
               "-D INPUT -m comment --comment b -j ACCEPT\nCOMMIT\n")
    assert (e.line, e.exit_code) == (3, 1)


def test_chain_lines_accept_names_getopt_would_not() -> None:
    assert ":-X - [0:0]" in save("*filter\n:-X - [0:0]\nCOMMIT\n")
    assert refuse("*filter\n:DROP - [0:0]\nCOMMIT\n").exit_code == 2


def test_rename_updates_jumps() -> None:
    assert rules("*filter\n:A - [0:0]\n-A INPUT -j A\n-E A B\nCOMMIT\n") == ["-A INPUT -j B"]


def test_a_later_section_of_the_same_table_replaces_the_earlier() -> None:
    text = ("*filter\n-A INPUT -s 192.0.2.1 -j ACCEPT\nCOMMIT\n"
            "*filter\n-A INPUT -s 192.0.2.2 -j ACCEPT\nCOMMIT\n")
    assert rules(text) == ["-A INPUT -s 192.0.2.2/32 -j ACCEPT"]


def test_getopt_forms() -> None:
    rs = parse_command(["-A", "FORWARD", "--protocol=tcp", "--source=1.2.3.4", "-ieth0",
                        "--jump=ACCEPT"])
    assert to_iptables_save(rs).splitlines()[4] == \
        "-A FORWARD -s 1.2.3.4/32 -i eth0 -p tcp -j ACCEPT"


@pytest.mark.parametrize(
    ("text", "line", "code", "message"),
    [
        ("*filter\n-A INPUT -p tcp --dport 99999 -j ACCEPT\nCOMMIT\n", 2, 2,
         "invalid port/service `99999' specified"),
        ("*filter\n-A INPUT -j UNDEFINED\nCOMMIT\n", 2, 2, "Couldn't load target `UNDEFINED'"),
        ("*filter\n-A NOPE -j ACCEPT\nCOMMIT\n", 2, 1, "line 2 failed"),
        ("*filter\n-A INPUT -j ACCEPT\n", 3, 1, "COMMIT expected at line 3"),
        ("*foo\nCOMMIT\n", 1, 2, "unable to initialize table 'foo'"),
        ("*filter\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n", 2, 1, "Bad built-in chain name"),
        ("*filter\n:FOO DROP [0:0]\nCOMMIT\n", 2, 1, "Bad built-in chain name"),
        ("*filter\n:INPUT RETURN [0:0]\nCOMMIT\n", 2, 1, "Bad policy name"),
        ("*filter\n[1:2 -A INPUT -j ACCEPT\nCOMMIT\n", 2, 2, "need ]"),
        ("*filter\n-t nat -A INPUT -j ACCEPT\nCOMMIT\n", 2, 2, "-t option cannot be used"),
        ("-A INPUT -j ACCEPT\n", 1, 1, "line 1 failed"),
        ("COMMIT\n", 1, 1, "line 1 failed"),
        ("*filter\n*nat\nCOMMIT\n", 2, 2, "Bad argument `*nat'"),
        ("*filter\n:FOO - [0:0]\n:FOO - [0:0]\nCOMMIT\n", 3, 2, "File exists"),
        ("*filter\n:ABCDEFGHIJKLMNOPQRSTUVWXYZ123 - [0:0]\nCOMMIT\n", 2, 2, "28 chars max"),
        ("*filter\n-A OUTPUT -j MASQUERADE\nCOMMIT\n", 2, 1, "only valid in the nat table"),
        ("*filter\n-A ABCDEFGHIJKLMNOPQRSTUVWXYZ123 -j ACCEPT\nCOMMIT\n", 2, 2, "too long"),
        ("*nat\n-A INPUT -j DNAT --to-destination 1.2.3.4\nCOMMIT\n", 2, 1, "DNAT target"),
        ("*filter\n-A INPUT --frobnicate -j ACCEPT\nCOMMIT\n", 2, 2,
         'unknown option "--frobnicate"'),
        ("*filter\n-A INPUT --dport 22 -j ACCEPT\nCOMMIT\n", 2, 2, 'unknown option "--dport"'),
        ("*filter\n-A INPUT -s 300.1.1.1 -j ACCEPT\nCOMMIT\n", 2, 2,
         "host/network `300.1.1.1' not found"),
        ("*filter\n-A INPUT -j ACCEPT # c\nCOMMIT\n", 2, 2, "Bad argument `#'"),
        ("*filter\n   \nCOMMIT\n", 2, 2, "no command specified"),
        ("*filter\n-A INPUT -j ACCEPT\nCOMMIT ", 3, 2, "Bad argument `COMMIT'"),
        ("*filter\n-A INPUT -j ACCEPT\ncommit\n", 3, 2, "Bad argument `commit'"),
        ("*filter\n-A INPUT -j LATER\n:LATER - [0:0]\nCOMMIT\n", 2, 2, "LATER"),
        ("*filter\n-A INPUT -o eth0 -j ACCEPT\nCOMMIT\n", 2, 2, "Can't use -o with INPUT"),
        ("*filter\n-A INPUT -m quota2 --quota 5 -j ACCEPT\nCOMMIT\n", 2, 2,
         "match 'quota2' is not supported"),
        ("*filter\n-A INPUT -j ULOG --ulog-prefix x\nCOMMIT\n", 2, 2,
         "target 'ULOG' is not supported"),
        ("*filter\n:A - [0:0]\n:B - [0:0]\n-A INPUT -j A\n-A A -j B\n-A B -j A\nCOMMIT\n", 6,
         1, "loop"),
        ("*filter\n:A - [0:0]\n-A INPUT -j A\n-X A\nCOMMIT\n", 4, 1, "still referenced"),
        ("*filter\n-A INPUT -d ! 10.0.0.0/8 -j ACCEPT\nCOMMIT\n", 2, 2,
         "Bad argument `10.0.0.0/8'"),
        ("*filter\n-A INPUT -p tcp -j REJECT --reject-with tcp-reset -s\nCOMMIT\n", 2, 2,
         'option "-s" requires an argument'),
        ("*filter\n-A INPUT -A INPUT\nCOMMIT\n", 2, 2, "only one command"),
        ("*filter\n-A INPUT -m comment --comment \"x\nCOMMIT\n", 2, 2, "unterminated"),
    ],
)
def test_refused_input(text: str, line: int, code: int, message: str) -> None:
    e = refuse(text)
    assert e.line == line, str(e)
    assert e.exit_code == code, str(e)
    assert message in e.message
    assert str(e).startswith(f"f:{line}:")


def test_getopt_details_iptables_restore_shows() -> None:
    # Observed with iptables-legacy-restore 1.8.9: "!" after an option is its argument,
    # long options may be abbreviated, an abbreviation can reach a loaded extension, and
    # restore does not split glued short options.
    assert rules("*filter\n-A INPUT -m comment --comment ! -j LOG --log-prefix !\n"
                 "-A INPUT --proto tcp --dpor 22 -j ACCEPT\n"
                 "-A INPUT -p tcp -m multiport --sport 80,81 -j ACCEPT\nCOMMIT\n") == [
        '-A INPUT -m comment --comment "!" -j LOG --log-prefix "!"',
        "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT",
        "-A INPUT -p tcp -m multiport --sports 80,81 -j ACCEPT",
    ]
    assert refuse("*filter\n-A INPUT -s1.2.3.4 -j ACCEPT\nCOMMIT\n").exit_code == 2
    assert refuse("*filter\n-A INPUT -p tcp -m multiport --dports 80 --dport 81\nCOMMIT\n"
                  ).message.endswith("can only be used once")


def test_error_column_points_at_the_word() -> None:
    e = refuse("*filter\n-A INPUT -s 10.0.0.1 -p tcp --dport x -j ACCEPT\nCOMMIT\n")
    assert e.col == 37


def test_quoting_and_save_quoting_round_trip() -> None:
    text = ('*filter\n-A INPUT -m comment --comment \'single\' -j ACCEPT\n'
            '-A INPUT -m comment --comment a\\b -j ACCEPT\n'
            '-A INPUT -j LOG --log-prefix "IN DROP: "\n'
            '-A INPUT -m comment --comment "-t nat" -j ACCEPT\n'
            '-A INPUT -m comment --comment "" -j ACCEPT\nCOMMIT\n')
    assert rules(text) == [
        "-A INPUT -m comment --comment \"\\'single\\'\" -j ACCEPT",
        '-A INPUT -m comment --comment "a\\\\b" -j ACCEPT',
        '-A INPUT -j LOG --log-prefix "IN DROP: "',
        '-A INPUT -m comment --comment "-t nat" -j ACCEPT',
        '-A INPUT -m comment --comment "" -j ACCEPT',
    ]
