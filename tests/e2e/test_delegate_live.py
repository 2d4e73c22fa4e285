"""--delegate with the real kernel and the real iptables-legacy: nat, mangle and security
handed to iptables-legacy-restore inside throwaway namespaces, checked against what
iptables-legacy-restore itself does with the same input in another throwaway namespace
(messages, exit codes, -v output, table order)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bpfilter import testbed

BIN = Path(sys.executable).parent
TIMEOUT = 60
LEGACY = "/usr/sbin/iptables-legacy-restore"

pytestmark = pytest.mark.skipif(not Path(LEGACY).exists(), reason="iptables-legacy missing")

Run = subprocess.CompletedProcess[str]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "BPFILTER_DELEGATE"}
    env["BPFILTER_CONFIG"] = "/nonexistent/bpfilter.conf"  # never the machine's own file
    return env | extra


def run(tool: str, *args: str, stdin: str = "", **env: str) -> Run:
    return subprocess.run([str(BIN / tool), *args], input=stdin, capture_output=True,
                          text=True, timeout=TIMEOUT, env=_env(**env), check=False)


def legacy(ns: str, tool: str, *args: str, stdin: str = "") -> Run:
    return subprocess.run(["ip", "netns", "exec", ns, tool, *args], input=stdin,
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)


def plain(text: str) -> str:
    """Without comment lines, and with chain counters zeroed (iptables-save prints the
    policy counters of built-in chains even without -c)."""
    return "".join(re.sub(r"^(:\S+ \S+) \[\d+:\d+\]$", r"\1 [0:0]", line) + "\n"
                   for line in text.splitlines() if not line.startswith("#"))


def tables(text: str) -> dict[str, str]:
    """Each table's lines (as plain() gives them) by its name."""
    return {b.split("\n", 1)[0]: b for b in re.split(r"^\*", plain(text), flags=re.M)[1:]}


@pytest.fixture
def new_ns() -> Iterator[Callable[[], str]]:
    """Make throwaway namespaces; each is flushed and deleted after the test."""
    made: list[str] = []

    def make() -> str:
        name = testbed.unique_name("bpfd")
        subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
        made.append(name)
        return name

    yield make
    for name in made:
        subprocess.run([str(BIN / "bpfilter"), "flush", "--netns", name], timeout=60,
                       capture_output=True, check=False)
    testbed.delete_all(made)


FILTER = ("*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
          "-A INPUT -p udp -m udp --dport 7001 -j ACCEPT\nCOMMIT\n")
NAT = ("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
       ":POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -s 198.18.0.0/15 -o veth+ -j MASQUERADE\n"
       "COMMIT\n")
MANGLE = ("*mangle\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n"
          ":OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n-A PREROUTING -j MARK --set-xmark "
          "0x7/0xffffffff\nCOMMIT\n")


def test_delegated_nat_next_to_bpfilters_filter_with_traffic() -> None:
    with testbed.netns_pair(prefix="bpfd") as pair:
        try:
            r = run("bpfilter-restore", "--netns", pair.b, "--delegate", "nat",
                    stdin=FILTER + NAT)
            assert (r.returncode, r.stderr) == (0, "")
            # The kernel has the nat table from iptables-legacy, and no legacy filter table.
            names = legacy(pair.b, "cat", "/proc/net/ip_tables_names").stdout.split()
            assert names == ["nat"]
            assert plain(legacy(pair.b, "iptables-legacy-save", "-t", "nat").stdout) == NAT
            # bpfilter's filter is in force beside it (the nat hooks sit at other priorities).
            assert testbed.udp_reaches(pair.a, pair.b, pair.ipv4_b, 7001, timeout=0.5)
            assert not testbed.udp_reaches(pair.a, pair.b, pair.ipv4_b, 7002, timeout=0.3)
            # bpfilter-save prints both, in the order iptables-save would (newest first).
            s = run("bpfilter-save", "--netns", pair.b, "--delegate", "nat")
            assert (s.returncode, plain(s.stdout)) == (0, NAT + FILTER)
        finally:
            run("bpfilter", "flush", "--netns", pair.b)


def test_without_delegation_the_table_is_refused(new_ns: Callable[[], str]) -> None:
    ns = new_ns()
    r = run("bpfilter-restore", "--netns", ns, stdin=FILTER + MANGLE)
    assert r.returncode == 1
    assert r.stderr == ("iptables-restore: line 7 failed: table 'mangle' cannot be compiled to "
                        "eBPF by bpfilter (it compiles filter and raw); use --delegate mangle "
                        "or BPFILTER_DELEGATE=mangle to hand it to iptables-legacy-restore\n")
    assert legacy(ns, "cat", "/proc/net/ip_tables_names").stdout == ""
    assert plain(run("bpfilter-save", "--netns", ns).stdout) == FILTER


def test_option_environment_and_config_file(new_ns: Callable[[], str],
                                            tmp_path: Path) -> None:
    conf = tmp_path / "bpfilter.conf"
    conf.write_text("# delegation for drop-in callers\ndelegate = mangle\n")
    ns = new_ns()
    r = run("bpfilter-restore", "--netns", ns, stdin=MANGLE, BPFILTER_CONFIG=str(conf))
    assert (r.returncode, r.stderr) == (0, "")
    assert plain(legacy(ns, "iptables-legacy-save", "-t", "mangle").stdout) == MANGLE
    # The environment beats the file, the option beats the environment.
    r = run("bpfilter-restore", "--netns", ns, stdin=MANGLE, BPFILTER_CONFIG=str(conf),
            BPFILTER_DELEGATE="nat")
    assert r.returncode == 1 and "use --delegate mangle" in r.stderr
    r = run("bpfilter-restore", "--netns", ns, "--delegate", "mangle", stdin=MANGLE,
            BPFILTER_DELEGATE="nat")
    assert (r.returncode, r.stderr) == (0, "")
    # bpfilter6-restore reads the same settings and uses ip6tables-legacy-restore.
    r = run("bpfilter6-restore", "--netns", ns, stdin=MANGLE.replace("0x7", "0x9"),
            BPFILTER_CONFIG=str(conf))
    assert (r.returncode, r.stderr) == (0, "")
    assert "0x9/0xffffffff" in legacy(ns, "ip6tables-legacy-save", "-t", "mangle").stdout
    bad = tmp_path / "bad.conf"
    bad.write_text("delegate = filter\n")
    r = run("bpfilter-restore", "--netns", ns, stdin=FILTER, BPFILTER_CONFIG=str(bad))
    assert r.returncode == 1
    assert r.stderr == (f"bpfilter-restore: {bad}: delegate: table 'filter' is compiled by "
                        "bpfilter and cannot be delegated (delegable: nat, mangle, security)\n")


def test_failure_in_a_delegated_table_as_iptables_restore(new_ns: Callable[[], str]) -> None:
    raw = "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j ACCEPT\nCOMMIT\n"
    broken = NAT.replace("-j MASQUERADE", "-j NOSUCHTARGET")
    ours, ref = new_ns(), new_ns()
    for text in (FILTER + broken + raw, FILTER + "# x\n" + NAT.replace("COMMIT\n", "")):
        r = run("bpfilter-restore", "--netns", ours, "--delegate", "nat", stdin=text)
        want = legacy(ref, LEGACY, stdin=text)
        assert want.returncode != 0
        # Same exit code and message, lines counted over the whole input.
        assert (r.returncode, r.stderr) == (want.returncode, want.stderr)
    # The table before the error stays committed; the one after it was never touched.
    assert plain(run("bpfilter-save", "--netns", ours).stdout) == FILTER
    assert legacy(ours, "iptables-legacy-save", "-t", "nat").stdout.count("-A ") == 0


def test_test_mode_commits_nothing(new_ns: Callable[[], str]) -> None:
    ns, ref = new_ns(), new_ns()
    r = run("bpfilter-restore", "--netns", ns, "--test", "--delegate", "nat",
            stdin=FILTER + NAT)
    assert (r.returncode, r.stderr) == (0, "")
    assert "-A" not in legacy(ns, "iptables-legacy-save").stdout
    assert run("bpfilter-save", "--netns", ns).stdout == ""
    broken = FILTER + NAT.replace("-j MASQUERADE", "-j NOSUCHTARGET")
    r = run("bpfilter-restore", "--netns", ns, "-t", "--delegate", "nat", stdin=broken)
    want = legacy(ref, LEGACY, "-t", stdin=broken)
    assert (r.returncode, r.stderr) == (want.returncode, want.stderr) != (0, "")


def test_verbose_output_and_order_as_iptables_legacy(new_ns: Callable[[], str]) -> None:
    text = ("# first\n" + FILTER.replace("COMMIT", ":mine - [0:0]\n-A mine -j DROP\nCOMMIT")
            + "# between\n" + NAT + "*raw\n-A PREROUTING -p tcp --dport 22 -j ACCEPT\nCOMMIT\n"
            + MANGLE + "# last\n")
    ours, ref = new_ns(), new_ns()
    for _ in range(2):  # the second time there are chains to flush and delete
        r = run("bpfilter-restore", "--netns", ours, "-v", "--delegate", "nat,mangle",
                stdin=text)
        want = legacy(ref, LEGACY, "-v", stdin=text)
        assert (r.returncode, r.stderr, want.returncode) == (0, "", 0)
        assert r.stdout == want.stdout
    r = run("bpfilter-restore", "--netns", ours, "-v", "-n", "--delegate", "nat,mangle",
            stdin=text)
    assert r.stdout == legacy(ref, LEGACY, "-v", "-n", stdin=text).stdout
    # bpfilter-save prints the four tables in iptables-legacy-save's order, and its output
    # restores into iptables-legacy unchanged.
    saved = run("bpfilter-save", "--netns", ours, BPFILTER_DELEGATE="nat,mangle")
    assert saved.returncode == 0
    assert plain(saved.stdout) == plain(legacy(ref, "iptables-legacy-save").stdout)
    third = new_ns()
    assert legacy(third, LEGACY, stdin=saved.stdout).returncode == 0
    # (iptables-legacy itself lists the tables the other way round after such a restore.)
    assert tables(legacy(third, "iptables-legacy-save").stdout) == tables(saved.stdout)
    # -c: counters come from both sides.
    counted = run("bpfilter-save", "--netns", ours, "-c", BPFILTER_DELEGATE="nat,mangle")
    assert "[0:0] -A POSTROUTING" in counted.stdout and "*filter" in counted.stdout


def test_single_commands_on_a_delegated_table(new_ns: Callable[[], str]) -> None:
    ns, ref = new_ns(), new_ns()
    for argv in (["-t", "nat", "-A", "POSTROUTING", "-o", "eth9", "-j", "MASQUERADE"],
                 ["-t", "nat", "-N", "SNATS"],
                 ["-t", "nat", "-A", "NOPE", "-j", "ACCEPT"],
                 ["-t", "nat", "-S"],
                 ["-t", "nat", "-D", "POSTROUTING", "9"],
                 ["-t", "nat", "-C", "POSTROUTING", "-o", "eth9", "-j", "MASQUERADE"]):
        r = run("bpfilter-iptables", "--netns", ns, *argv, BPFILTER_DELEGATE="nat")
        want = legacy(ref, "iptables-legacy", *argv)
        assert (r.returncode, r.stdout, r.stderr) == (want.returncode, want.stdout,
                                                      want.stderr), argv
    # Without delegation the nat table is bpfilter's to refuse.
    r = run("bpfilter-iptables", "--netns", ns, "-t", "nat", "-A", "POSTROUTING", "-j",
            "ACCEPT")
    assert r.returncode != 0 and "cannot be compiled" in r.stderr


def test_flush_empties_the_delegated_tables(new_ns: Callable[[], str]) -> None:
    """`bpfilter flush` removes what bpfilter loaded, delegated tables included: their rules
    and user chains go and their policies become ACCEPT (a legacy table cannot be removed);
    a table bpfilter did not create is left alone."""
    ns = new_ns()
    mangle = MANGLE.replace(":INPUT ACCEPT", ":INPUT DROP")
    r = run("bpfilter-restore", "--netns", ns, "--delegate", "nat,mangle",
            stdin=FILTER + NAT + mangle)
    assert r.returncode == 0, r.stderr
    foreign = legacy(ns, "ip6tables-legacy-restore",
                     stdin="*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n"
                     ":OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n"
                     "-A POSTROUTING -o veth+ -j MASQUERADE\nCOMMIT\n")
    assert foreign.returncode == 0, foreign.stderr
    r = run("bpfilter", "flush", "--netns", ns)
    assert r.returncode == 0, r.stderr
    assert "emptied ip-nat" in r.stdout and "emptied ip-mangle" in r.stdout
    saved = tables(legacy(ns, "iptables-legacy-save").stdout)
    for name in ("nat", "mangle"):
        text = saved[name]
        assert "-A " not in text and " DROP " not in text, text
    assert "-A POSTROUTING -o veth+ -j MASQUERADE" in legacy(ns, "ip6tables-legacy-save").stdout
    again = run("bpfilter", "flush", "--netns", ns)
    assert again.returncode == 0 and "emptied" not in again.stdout
