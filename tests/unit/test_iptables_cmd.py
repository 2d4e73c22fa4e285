"""bpfilter-iptables without a kernel: the command line, each command's effect and refusal on
a table, and the -S/-L/-v output, with expected texts taken from iptables-legacy 1.8.9."""

from __future__ import annotations

import io
import math

import pytest

from bpfilter import iptables_cmd
from bpfilter.grammar.iptables import parse_restore
from bpfilter.iptables_cmd import CommandFailed, CommandLine, apply, parse_args
from bpfilter.ir.iptables_save import to_iptables_save
from bpfilter.ir.model import Ruleset, Table
from bpfilter.restore import CliExit

TRY = "Try `iptables -h' or 'iptables --help' for more information.\n"
BASE = ("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        ":f2b-sshd - [0:0]\n"
        "-A INPUT -p tcp -m multiport --dports 22,80 -j f2b-sshd\n"
        "-A INPUT -j ACCEPT\n"
        "-A INPUT -s 198.18.0.9/32 -j ACCEPT\n"
        "-A OUTPUT ! -s 198.18.0.0/15 -p tcp -m tcp --dport 22 -m state --state "
        "RELATED,ESTABLISHED -j DROP\n"
        "-A OUTPUT -p icmp -f -m icmp --icmp-type 8 -j DROP\n"
        "-A f2b-sshd -s 198.18.0.7/32 -j REJECT --reject-with icmp-port-unreachable\n"
        "-A f2b-sshd -j RETURN\n"
        "COMMIT\n")


def table(text: str = BASE, family: int = 4) -> Table:
    t = parse_restore(text, family=family).table("filter")
    assert t is not None
    return t


def run(argv: list[str], t: Table | None = None) -> Table:
    """The table after one changing command."""
    cmd = parse_args(argv)
    t = t if t is not None else table()
    rules = iptables_cmd.build_rules(cmd, t) if cmd.command in iptables_cmd.RULE_COMMANDS \
        else None
    return apply(cmd, t, rules)


def save(t: Table) -> str:
    return to_iptables_save(Ruleset((t,)))


def failure(argv: list[str], t: Table | None = None) -> str:
    with pytest.raises(CommandFailed) as e:
        run(argv, t)
    return e.value.message


def usage_error(argv: list[str], family: int = 4) -> CliExit:
    with pytest.raises(CliExit) as e:
        cmd = parse_args(argv, family)
        if cmd.command in iptables_cmd.RULE_COMMANDS:
            iptables_cmd.build_rules(cmd, table())
        apply(cmd, table())
    return e.value


# --- the command line -------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "expected"), [
    (["-A", "INPUT", "-j", "ACCEPT"], CommandLine(command="-A", chain="INPUT",
                                                  rulespec=("-j", "ACCEPT"))),
    (["-w", "-I", "INPUT", "2", "-s", "198.18.0.1", "-j", "DROP"],
     CommandLine(command="-I", chain="INPUT", args=("2",), rulespec=("-s", "198.18.0.1", "-j",
                 "DROP"), wait=math.inf)),
    (["--wait", "5", "-t", "raw", "-F"], CommandLine(command="-F", table="raw", wait=5.0)),
    (["-nvL", "INPUT"], CommandLine(command="-L", chain="INPUT", numeric=True, verbose=True)),
    (["-L", "INPUT", "2", "--line-numbers", "-x", "-v"],
     CommandLine(command="-L", chain="INPUT", args=("2",), verbose=True, exact=True,
                 line_numbers=True)),
    (["--list-rules"], CommandLine(command="-S")),
    (["--append=INPUT", "--jump", "DROP"], CommandLine(command="-A", chain="INPUT",
                                                       rulespec=("-j", "DROP"))),
    (["-AINPUT", "-jDROP"], CommandLine(command="-A", chain="INPUT", rulespec=("-j", "DROP"))),
    (["-E", "a", "b", "--netns", "ns1", "--json"],
     CommandLine(command="-E", chain="a", args=("b",), netns="ns1", json=True)),
    (["-P", "INPUT", "DROP", "-w", "-W", "100000"], CommandLine(
        command="-P", chain="INPUT", args=("DROP",), wait=math.inf,
        warnings=("Ignoring deprecated --wait-interval option.",))),
    (["-L", "-Z"], CommandLine(command="-L", zero=True)),
    (["-4", "-D", "INPUT", "3"], CommandLine(command="-D", chain="INPUT", args=("3",))),
    (["-A", "INPUT", "-c", "5", "10", "-j", "ACCEPT"],
     CommandLine(command="-A", chain="INPUT", rulespec=("-c", "5", "10", "-j", "ACCEPT"))),
    (["-A", "INPUT", "-m", "comment", "--comment", "-n -v", "-j", "ACCEPT"],
     CommandLine(command="-A", chain="INPUT",
                 rulespec=("-m", "comment", "--comment", "-n -v", "-j", "ACCEPT"))),
])
def test_parse_args(argv: list[str], expected: CommandLine) -> None:
    assert parse_args(argv) == expected


@pytest.mark.parametrize(("argv", "message"), [
    ([], "no command specified"),
    (["-Q"], 'unknown option "-Q"'),
    (["-A", "INPUT", "-A", "INPUT"], "Cannot use -A with -A"),
    (["-D", "INPUT", "0"], "Invalid rule number `0'"),
    (["-n", "-A", "INPUT", "-j", "ACCEPT"], "Illegal option `-n' with this command"),
    (["--line-numbers", "-A", "INPUT"], "Illegal option `-0' with this command"),
    (["-x", "-A", "INPUT"], "Illegal option `-x' with this command"),
    (["-F", "INPUT", "-p", "tcp"], "Illegal option `-p' with this command"),
    (["-D", "INPUT", "1", "-j", "DROP"], "Illegal option `-j' with this command"),
    (["-w", "soon", "-L"], "wait seconds not numeric"),
    (["-N", "verylongchainnameaaaaaaaaaaaaaaaaaa"],
     "chain name `verylongchainnameaaaaaaaaaaaaaaaaaa' too long (must be under 29 chars)"),
    (["-N", "-bad"], "chain name not allowed to start with `-'"),
    (["-N", "ACCEPT"], "chain name may not clash with target name"),
    (["-A", "INPUT", "-p", "tcp", "--dport", "99999", "-j", "ACCEPT"],
     "invalid port/service `99999' specified"),
])
def test_parameter_problems_exit_2(argv: list[str], message: str) -> None:
    e = usage_error(argv)
    assert e.code == 2
    assert e.err == f"iptables v1.8.9 (legacy): {message}\n" + TRY


def test_messages_that_iptables_ends_with_a_blank_line() -> None:
    e = usage_error(["-A", "INPUT", "-j", "nochain"])
    assert e.err == ("iptables v1.8.9 (legacy): Couldn't load target `nochain':No such file or "
                     "directory\n\n" + TRY)
    e = usage_error(["-A", "INPUT", "-o", "eth0", "-j", "ACCEPT"])
    assert e.err == "iptables v1.8.9 (legacy): Can't use -o with INPUT\n\n" + TRY


def test_wait_interval_needs_wait() -> None:
    e = usage_error(["-A", "INPUT", "-j", "ACCEPT", "-W", "1000"])
    assert e.err == ("Ignoring deprecated --wait-interval option.\n"
                     "iptables v1.8.9 (legacy): --wait-interval only makes sense with --wait\n"
                     "\n" + TRY)


@pytest.mark.parametrize("argv", [["-F", "INPUT", "extra"], ["-N", "a", "b"],
                                  ["-A", "INPUT", "extra", "-j", "ACCEPT"]])
def test_bad_argument(argv: list[str]) -> None:
    e = usage_error(argv)
    assert (e.code, e.err) == (2, f"Bad argument `{argv[-1] if argv[0] != '-A' else 'extra'}'\n"
                               + TRY)


def test_help_and_version() -> None:
    assert parse_args_exit(["-h"]).out.startswith("bpfilter-iptables: ")
    e = parse_args_exit(["--version"], 6)
    assert (e.code, e.out) == (0, "ip6tables v1.8.9 (legacy)\n")


def parse_args_exit(argv: list[str], family: int = 4) -> CliExit:
    with pytest.raises(CliExit) as e:
        parse_args(argv, family)
    return e.value


def test_the_other_family_flag_is_a_parameter_problem() -> None:
    assert usage_error(["-6", "-A", "INPUT", "-j", "ACCEPT"]).err == TRY
    e = usage_error(["-4", "-A", "INPUT", "-j", "ACCEPT"], family=6)
    assert e.code == 2 and e.err.startswith("Try `ip6tables -h'")
    assert parse_args(["-6", "-L"], 6).command == "-L"


# --- what each command does -------------------------------------------------------------------

def rules_of(t: Table, chain: str) -> list[str]:
    return [line for line in save(t).splitlines() if line.startswith(f"-A {chain} ")]


def test_append_insert_replace_delete() -> None:
    t = run(["-A", "INPUT", "-s", "198.18.0.1", "-j", "DROP"])
    assert rules_of(t, "INPUT")[-1] == "-A INPUT -s 198.18.0.1/32 -j DROP"
    t = run(["-I", "INPUT", "-s", "198.18.0.2", "-j", "DROP"], t)
    assert rules_of(t, "INPUT")[0] == "-A INPUT -s 198.18.0.2/32 -j DROP"
    t = run(["-I", "INPUT", "2", "-p", "udp", "--dport", "53", "-j", "ACCEPT"], t)
    assert rules_of(t, "INPUT")[1] == "-A INPUT -p udp -m udp --dport 53 -j ACCEPT"
    t = run(["-R", "INPUT", "2", "-p", "udp", "--dport", "54", "-j", "ACCEPT"], t)
    assert rules_of(t, "INPUT")[1] == "-A INPUT -p udp -m udp --dport 54 -j ACCEPT"
    t = run(["-D", "INPUT", "-s", "198.18.0.1/32", "-j", "DROP"], t)
    assert "-A INPUT -s 198.18.0.1/32 -j DROP" not in rules_of(t, "INPUT")
    t = run(["-D", "INPUT", "1"], t)
    assert rules_of(t, "INPUT")[0] == "-A INPUT -p udp -m udp --dport 54 -j ACCEPT"
    # -I at one past the end appends, as in iptables.
    n = len(rules_of(t, "INPUT"))
    t = run(["-I", "INPUT", str(n + 1), "-j", "DROP"], t)
    assert rules_of(t, "INPUT")[-1] == "-A INPUT -j DROP"


def test_several_addresses_expand_like_iptables() -> None:
    t = run(["-I", "INPUT", "-s", "198.18.0.1,198.18.0.2", "-j", "DROP"])
    assert rules_of(t, "INPUT")[:2] == ["-A INPUT -s 198.18.0.2/32 -j DROP",
                                        "-A INPUT -s 198.18.0.1/32 -j DROP"]
    t = run(["-D", "INPUT", "-s", "198.18.0.1,198.18.0.2", "-j", "DROP"], t)
    assert save(t) == BASE
    # All or nothing: one of the two missing deletes neither.
    t = run(["-A", "INPUT", "-s", "198.18.0.1", "-j", "DROP"])
    assert failure(["-D", "INPUT", "-s", "198.18.0.1,198.18.0.2", "-j", "DROP"], t) == \
        iptables_cmd.BAD_RULE


def test_chain_commands() -> None:
    t = run(["-N", "new"])
    assert ":new - [0:0]" in save(t)
    t = run(["-A", "new", "-j", "RETURN"], t)
    t = run(["-E", "f2b-sshd", "f2b-old"], t)
    assert "-A INPUT -p tcp -m multiport --dports 22,80 -j f2b-old" in save(t)
    assert ":f2b-sshd" not in save(t)
    t = run(["-F", "new"], t)
    t = run(["-X", "new"], t)
    assert ":new" not in save(t)
    t = run(["-P", "INPUT", "DROP"], t)
    assert ":INPUT DROP [0:0]" in save(t)
    t = run(["-F"], t)
    assert "-A " not in save(t)
    t = run(["-X"], t)
    assert save(t) == ("*filter\n:INPUT DROP [0:0]\n:FORWARD DROP [0:0]\n"
                       ":OUTPUT ACCEPT [0:0]\nCOMMIT\n")


@pytest.mark.parametrize(("argv", "message"), [
    (["-D", "INPUT", "-s", "198.18.0.1", "-j", "DROP"], iptables_cmd.BAD_RULE),
    (["-D", "INPUT", "-s", "198.18.0.1", "-j", "f2b-sshd"], iptables_cmd.NO_CHAIN),
    (["-D", "INPUT", "-s", "198.18.0.1", "-g", "f2b-sshd"], iptables_cmd.NO_CHAIN),
    (["-D", "NOPE", "-j", "f2b-sshd"], iptables_cmd.BAD_RULE),
    (["-A", "NOPE", "-j", "DROP"], iptables_cmd.NO_CHAIN),
    (["-I", "NOPE", "-j", "DROP"], iptables_cmd.NO_CHAIN),
    (["-R", "NOPE", "1", "-j", "DROP"], iptables_cmd.NO_CHAIN),
    (["-D", "NOPE", "1"], iptables_cmd.NO_CHAIN),
    (["-D", "NOPE", "-j", "DROP"], iptables_cmd.BAD_RULE),
    (["-P", "NOPE", "DROP"], iptables_cmd.BAD_BUILTIN),
    (["-N", "INPUT"], iptables_cmd.CHAIN_EXISTS),
    (["-N", "f2b-sshd"], iptables_cmd.CHAIN_EXISTS),
    (["-X", "f2b-sshd"], iptables_cmd.IN_USE),
    (["-X", "INPUT"], iptables_cmd.INVALID),
    (["-X", "nope"], iptables_cmd.NO_CHAIN),
    (["-X"], iptables_cmd.IN_USE),
    (["-F", "nope"], iptables_cmd.NO_CHAIN),
    (["-Z", "nope"], iptables_cmd.NO_CHAIN),
    (["-L", "nope"], iptables_cmd.NO_CHAIN),
    (["-S", "nope"], iptables_cmd.NO_CHAIN),
    (["-E", "nope", "x"], iptables_cmd.NO_CHAIN),
    (["-E", "f2b-sshd", "INPUT"], iptables_cmd.FILE_EXISTS),
    (["-E", "INPUT", "bar"], iptables_cmd.NO_CHAIN),
    (["-P", "f2b-sshd", "DROP"], iptables_cmd.BAD_BUILTIN),
    (["-P", "INPUT", "RETURN"], iptables_cmd.BAD_POLICY),
    (["-D", "INPUT", "5"], "Index of deletion too big."),
    (["-I", "INPUT", "5", "-j", "ACCEPT"], "Index of insertion too big."),
    (["-R", "INPUT", "5", "-j", "ACCEPT"], "Index of replacement too big."),
])
def test_refusals(argv: list[str], message: str) -> None:
    assert failure(argv) == message


def test_deleting_an_unreferenced_nonempty_chain() -> None:
    t = run(["-D", "INPUT", "1"])
    assert failure(["-X", "f2b-sshd"], t) == iptables_cmd.NOT_EMPTY
    assert failure(["-X"], t) == iptables_cmd.NOT_EMPTY


def test_a_missing_chain_is_not_a_jump_target() -> None:
    e = usage_error(["-A", "nope", "-j", "nope"])
    assert e.err.startswith("iptables v1.8.9 (legacy): Couldn't load target `nope'")


def test_loops_only_when_reachable() -> None:
    t = run(["-N", "loop"])
    t = run(["-A", "loop", "-j", "loop"], t)  # unreachable: iptables accepts it
    assert "-A loop -j loop" in save(t)
    assert failure(["-I", "f2b-sshd", "-j", "f2b-sshd"]) == iptables_cmd.LOOP
    # The kernel stops its walk at an unconditional verdict (f2b-sshd ends with -j RETURN):
    # a jump after it closes no loop, until -R puts it in the RETURN's place.
    t = run(["-A", "f2b-sshd", "-j", "f2b-sshd"])
    assert "-A f2b-sshd -j f2b-sshd" in save(t)
    assert failure(["-R", "f2b-sshd", "2", "-j", "f2b-sshd"]) == iptables_cmd.LOOP
    assert failure(["-R", "f2b-sshd", "9", "-j", "f2b-sshd"]) == "Index of replacement too big."
    # -D and -C of such a rule only find that it is not there.
    assert failure(["-D", "f2b-sshd", "-s", "198.18.0.1", "-j", "f2b-sshd"]) == \
        iptables_cmd.NO_CHAIN


def test_check() -> None:
    t = table()
    cmd = parse_args(["-C", "INPUT", "-s", "198.18.0.9", "-j", "ACCEPT"])
    assert iptables_cmd.check(cmd, t, iptables_cmd.build_rules(cmd, t))
    cmd = parse_args(["-C", "INPUT", "-s", "198.18.0.8", "-j", "ACCEPT"])
    with pytest.raises(CommandFailed, match="Bad rule"):
        iptables_cmd.check(cmd, t, iptables_cmd.build_rules(cmd, t))
    cmd = parse_args(["-C", "INPUT", "-s", "198.18.0.8", "-j", "f2b-sshd"])
    with pytest.raises(CommandFailed, match="No chain/target/match by that name"):
        iptables_cmd.check(cmd, t, iptables_cmd.build_rules(cmd, t))
    cmd = parse_args(["-C", "nope", "-j", "ACCEPT"])
    with pytest.raises(CommandFailed, match="Bad rule"):
        iptables_cmd.check(cmd, t, iptables_cmd.build_rules(cmd, t))


def test_empty_table_is_a_fresh_iptables() -> None:
    assert save(iptables_cmd.empty_table(4, "filter")) == (
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n")
    assert [c.name for c in iptables_cmd.empty_table(6, "raw").chains] == ["PREROUTING",
                                                                          "OUTPUT"]


# --- listing (expected texts printed by iptables-legacy 1.8.9 for BASE) -------------------------

S = """\
-P INPUT ACCEPT
-P FORWARD DROP
-P OUTPUT ACCEPT
-N f2b-sshd
-A INPUT -p tcp -m multiport --dports 22,80 -j f2b-sshd
-A INPUT -j ACCEPT
-A INPUT -s 198.18.0.9/32 -j ACCEPT
-A OUTPUT ! -s 198.18.0.0/15 -p tcp -m tcp --dport 22 -m state --state RELATED,ESTABLISHED -j DROP
-A OUTPUT -p icmp -f -m icmp --icmp-type 8 -j DROP
-A f2b-sshd -s 198.18.0.7/32 -j REJECT --reject-with icmp-port-unreachable
-A f2b-sshd -j RETURN
"""

L_N = """\
Chain INPUT (policy ACCEPT)
target     prot opt source               destination         
f2b-sshd   6    --  0.0.0.0/0            0.0.0.0/0            multiport dports 22,80
ACCEPT     0    --  0.0.0.0/0            0.0.0.0/0           
ACCEPT     0    --  198.18.0.9           0.0.0.0/0           

Chain FORWARD (policy DROP)
target     prot opt source               destination         

Chain OUTPUT (policy ACCEPT)
target     prot opt source               destination         
DROP       6    -- !198.18.0.0/15        0.0.0.0/0            tcp dpt:22 state RELATED,ESTABLISHED
DROP       1    -f  0.0.0.0/0            0.0.0.0/0            icmptype 8

Chain f2b-sshd (1 references)
target     prot opt source               destination         
REJECT     0    --  198.18.0.7           0.0.0.0/0            reject-with icmp-port-unreachable
RETURN     0    --  0.0.0.0/0            0.0.0.0/0           
"""  # noqa: W291 - iptables pads the columns

L_NVX = """\
Chain OUTPUT (policy ACCEPT 0 packets, 0 bytes)
num      pkts      bytes target     prot opt in     out     source               destination         
1           0        0 DROP       6    --  *      *      !198.18.0.0/15        0.0.0.0/0            tcp dpt:22 state RELATED,ESTABLISHED
2           0        0 DROP       1    -f  *      *       0.0.0.0/0            0.0.0.0/0            icmptype 8
"""  # noqa: W291, E501


def listing(argv: list[str], t: Table | None = None) -> str:
    cmd = parse_args(argv)
    t = t if t is not None else table()
    if cmd.command == "-S":
        return iptables_cmd.list_rules(cmd, t)
    return iptables_cmd.list_table(cmd, t)


def test_list_rules_as_iptables() -> None:
    assert listing(["-S"]) == S
    assert listing(["-S", "INPUT", "2"]) == "-A INPUT -j ACCEPT\n"
    assert listing(["-S", "INPUT", "9"]) == ""
    assert listing(["-S", "f2b-sshd"]) == (
        "-N f2b-sshd\n-A f2b-sshd -s 198.18.0.7/32 -j REJECT --reject-with "
        "icmp-port-unreachable\n-A f2b-sshd -j RETURN\n")
    verbose = listing(["-S", "-v"]).splitlines()
    assert verbose[0] == "-P INPUT ACCEPT -c 0 0"
    assert verbose[3] == "-N f2b-sshd"
    assert verbose[4] == "-A INPUT -p tcp -m multiport --dports 22,80 -c 0 0 -j f2b-sshd"


def test_list_as_iptables() -> None:
    assert listing(["-L", "-n"]) == L_N
    assert listing(["-L", "OUTPUT", "-n", "-v", "-x", "--line-numbers"]) == L_NVX
    assert listing(["-L", "INPUT", "2", "-n"]) == (
        "ACCEPT     0    --  0.0.0.0/0            0.0.0.0/0           \n")
    names = listing(["-L"]).splitlines()
    assert names[2] == ("f2b-sshd   tcp  --  anywhere             anywhere             "
                        "multiport dports ssh,http")
    assert names[12] == ("DROP       icmp -f  anywhere             anywhere             "
                         "icmp echo-request")
    assert listing(["-L", "-v"]).splitlines()[2].startswith(
        "    0     0 f2b-sshd   tcp  --  any    any     anywhere")


def test_counter_columns() -> None:
    text = BASE.replace("-A INPUT -j ACCEPT", "[123456:987654321] -A INPUT -j ACCEPT")
    text = text.replace(":INPUT ACCEPT [0:0]", ":INPUT ACCEPT [5:300]")
    out = listing(["-L", "INPUT", "-n", "-v"], table(text)).splitlines()
    assert out[0] == "Chain INPUT (policy ACCEPT 5 packets, 300 bytes)"
    assert out[3].startswith(" 123K  988M ACCEPT ")
    out = listing(["-L", "INPUT", "-n", "-v", "-x"], table(text)).splitlines()
    assert out[3].startswith("  123456 987654321 ACCEPT ")


def test_matches_print_as_their_extensions_do() -> None:
    t = run(["-A", "INPUT", "-p", "tcp", "!", "--tcp-flags", "SYN,ACK", "SYN", "!", "--sport",
             "5", "-j", "ACCEPT"])
    t = run(["-A", "INPUT", "-p", "udp", "-m", "multiport", "!", "--sports", "1,2:5", "-j",
             "ACCEPT"], t)
    t = run(["-A", "INPUT", "-p", "icmp", "!", "--icmp-type", "3/1", "-m", "comment",
             "--comment", "hi", "-j", "ACCEPT"], t)
    rows = listing(["-L", "INPUT", "-n"], t).splitlines()[-3:]
    assert rows[0].endswith(" tcp spt:!5 flags:!0x12/0x02")
    assert rows[1].endswith(" multiport sports  !1,2:5")
    assert rows[2].endswith(" icmp !type 3 code 1 /* hi */")
    rows = listing(["-L", "INPUT"], t).splitlines()[-3:]
    assert rows[0].endswith(" tcp spt:!5 flags:!SYN,ACK/SYN")
    assert rows[2].endswith(" icmp !host-unreachable /* hi */")


def test_verbose_rule_line() -> None:
    t = table()
    cmd = parse_args(["-v", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-m", "comment",
                      "--comment", "hey", "-j", "ACCEPT"])
    (r,) = iptables_cmd.build_rules(cmd, t)
    assert iptables_cmd.rule_line(r, t) == (
        "ACCEPT  tcp opt -- in * out *  0.0.0.0/0  -> 0.0.0.0/0   tcp dpt:22 /* hey */\n")


def test_ip6_listing() -> None:
    t = table("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
              "-A INPUT -p ipv6-icmp -m icmp6 --icmpv6-type 128 -j ACCEPT\nCOMMIT\n", 6)
    cmd = parse_args(["-L", "INPUT", "-n"], 6)
    assert iptables_cmd.list_table(cmd, t).splitlines()[2] == (
        "ACCEPT     58   --  ::/0                 ::/0                 ipv6-icmptype 128")
    cmd = parse_args(["-L", "INPUT"], 6)
    assert iptables_cmd.list_table(cmd, t).splitlines()[2] == (
        "ACCEPT     ipv6-icmp --  anywhere             anywhere             "
        "ipv6-icmp echo-request")


# --- main without root ------------------------------------------------------------------------

def test_main_reports_usage_errors_before_touching_anything() -> None:
    out, err = io.StringIO(), io.StringIO()
    assert iptables_cmd.main(["-A", "INPUT", "-A", "INPUT"], stdout=out, stderr=err) == 2
    assert err.getvalue() == "iptables v1.8.9 (legacy): Cannot use -A with -A\n" + TRY
    out, err = io.StringIO(), io.StringIO()
    assert iptables_cmd.main(["-L", "--json", "--netns", "../x"], stdout=out,
                             stderr=err) == 2
    assert '"exit_code": 2' in out.getvalue()
