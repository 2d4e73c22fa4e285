"""bpfilter-restore, bpfilter-save, `bpfilter flush` and `bpfilter status` as commands, with
real traffic in a throwaway namespace pair: persistence after exit, round trips, --noflush,
per-table atomicity, --test, -T, root only, `ip netns exec`, and SIGKILL at many points."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bpfilter import bpffs, restore, save, testbed

BIN = Path(sys.executable).parent
TIMEOUT = 60


@pytest.fixture
def pair() -> Iterator[testbed.NetnsPair]:
    with testbed.netns_pair(prefix="bpfr") as p:
        yield p


def run(tool: str, *args: str, stdin: str = "", **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / tool), *args], input=stdin, capture_output=True,
                          text=True, timeout=TIMEOUT, **kw)  # type: ignore[call-overload]


def saved(ns: str, *args: str) -> str:
    out = run("bpfilter-save", "--netns", ns, *args)
    assert out.returncode == 0, out.stderr
    return "".join(line + "\n" for line in out.stdout.splitlines() if not line.startswith("#"))


def udp(pair: testbed.NetnsPair, port: int) -> bool:
    return testbed.udp_reaches(pair.a, pair.b, pair.ipv4_b, port, timeout=0.3)


def only(port: int, policy: str = "DROP", extra: str = "") -> str:
    return (f"*filter\n:INPUT {policy} [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            f"{extra}-A INPUT -p udp -m udp --dport {port} -j ACCEPT\nCOMMIT\n")


def test_ruleset_stays_in_force_and_round_trips_through_save(pair: testbed.NetnsPair) -> None:
    text = ("*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            ":ALLOW - [0:0]\n-A INPUT -p udp -m udp --dport 7001 -j ALLOW\n"
            "-A ALLOW -s 198.18.0.0/15 -j ACCEPT\nCOMMIT\n")
    r = run("bpfilter-restore", "--netns", pair.b, stdin=text)
    assert r.returncode == 0, r.stderr
    # The process has exited: the pins keep the ruleset in force.
    assert udp(pair, 7001) and not udp(pair, 7002)
    assert saved(pair.b) == text
    counted = saved(pair.b, "-c")
    assert counted.splitlines()[1].startswith(":INPUT DROP [1:")  # 7002 hit the policy
    assert counted.splitlines()[5].startswith("[1:")  # 7001 hit the rule
    # save | restore gives the same ruleset back.
    r = run("bpfilter-restore", "--netns", pair.b, stdin=saved(pair.b))
    assert r.returncode == 0, r.stderr
    assert saved(pair.b) == text
    # and with counters: -c restores them
    r = run("bpfilter-restore", "-c", "--netns", pair.b, stdin=counted)
    assert r.returncode == 0, r.stderr
    assert saved(pair.b, "-c") == counted


def test_noflush_acts_on_the_live_ruleset_and_keeps_counters(pair: testbed.NetnsPair) -> None:
    assert run("bpfilter-restore", "--netns", pair.b, stdin=only(7001)).returncode == 0
    assert udp(pair, 7001)
    r = run("bpfilter-restore", "-n", "--netns", pair.b,
            stdin="*filter\n-A INPUT -p udp --dport 7002 -j ACCEPT\nCOMMIT\n")
    assert r.returncode == 0, r.stderr
    assert udp(pair, 7001) and udp(pair, 7002)
    lines = saved(pair.b, "-c").splitlines()
    # One packet before the --noflush restore, one after: the counter survived it.
    assert lines[4].startswith("[2:") and "--dport 7001" in lines[4]
    assert "--dport 7002" in lines[5]
    # Without --noflush the table is replaced.
    r = run("bpfilter-restore", "--netns", pair.b,
            stdin="*filter\n:INPUT DROP [0:0]\n-A INPUT -p udp --dport 7003 -j ACCEPT\nCOMMIT\n")
    assert r.returncode == 0, r.stderr
    assert not udp(pair, 7001) and udp(pair, 7003)


def test_a_failing_table_leaves_earlier_commits_and_its_old_version(
        pair: testbed.NetnsPair) -> None:
    assert run("bpfilter-restore", "--netns", pair.b, stdin=only(7001)).returncode == 0
    # raw commits, then filter fails: filter keeps its old version.
    text = ("*raw\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -p udp --dport 7009 -j DROP\nCOMMIT\n"
            "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p tcp --dport 99999 -j ACCEPT\nCOMMIT\n")
    r = run("bpfilter-restore", "--netns", pair.b, stdin=text)
    assert r.returncode == 2
    assert r.stderr.splitlines()[1] == "Error occurred at line: 7"
    assert "*raw" in saved(pair.b) and "--dport 7001" in saved(pair.b)
    assert udp(pair, 7001) and not udp(pair, 7002)
    # nat cannot be compiled: refused with the reason, filter before it committed.
    text = only(7002) + "*nat\n-A POSTROUTING -j MASQUERADE\nCOMMIT\n"
    r = run("bpfilter-restore", "--netns", pair.b, stdin=text)
    assert r.returncode == 1
    assert r.stderr.startswith("iptables-restore: line 7 failed: table 'nat' cannot be "
                               "compiled"), r.stderr
    assert "--delegate" in r.stderr
    assert udp(pair, 7002) and not udp(pair, 7001)
    r = run("bpfilter-restore", "--netns", pair.b, stdin="*filter\n-A INPUT -j ACCEPT\n")
    assert (r.returncode, r.stderr) == (1, "iptables-restore: COMMIT expected at line 3\n")
    assert udp(pair, 7002) and not udp(pair, 7001)


def test_test_mode_and_table_filter(pair: testbed.NetnsPair) -> None:
    assert run("bpfilter-restore", "--netns", pair.b, stdin=only(7001)).returncode == 0
    before = saved(pair.b)
    r = run("bpfilter-restore", "-t", "--netns", pair.b, "--json", stdin=only(7002))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] and doc["test"] and doc["tables"][0]["generation"] is None
    assert saved(pair.b) == before
    r = run("bpfilter-restore", "-t", "--netns", pair.b,
            stdin="*filter\n-A INPUT -m foo --foo 1 -j ACCEPT\nCOMMIT\n")
    assert r.returncode == 2 and "Error occurred at line: 2" in r.stderr
    text = ("*raw\n-A PREROUTING -p udp --dport 7001 -j DROP\nCOMMIT\n" + only(7003))
    r = run("bpfilter-restore", "-T", "filter", "--netns", pair.b, stdin=text)
    assert r.returncode == 0, r.stderr
    assert "*raw" not in saved(pair.b) and udp(pair, 7003)


def test_flush_and_status(pair: testbed.NetnsPair) -> None:
    assert run("bpfilter-restore", "--netns", pair.b, stdin=only(7001)).returncode == 0
    r = run("bpfilter", "status", "--netns", pair.b, "--json")
    assert r.returncode == 0, r.stderr
    [table] = json.loads(r.stdout)["tables"]
    assert (table["table"], table["rules"], table["generation"]) == ("filter", 1, 1)
    assert [p["chain"] for p in table["programs"]] == ["INPUT"]
    assert run("bpfilter", "status", "--netns", pair.b).stdout.startswith("ip filter:")
    assert not udp(pair, 7002)
    r = run("bpfilter", "flush", "--netns", pair.b)
    assert r.returncode == 0, r.stderr
    assert udp(pair, 7002)
    assert bpffs.pins(pair.b) == []
    assert saved(pair.b) == ""


def _as_nobody(tool_main: Callable[[], int]) -> tuple[int, str]:
    """Run ``tool_main`` in a forked child that dropped root (uid/gid 65534): (rc, stderr)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        rc = 99
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                rc = tool_main()
            os.write(write_end, err.getvalue().encode())
        finally:
            os._exit(rc)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        err_text = f.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err_text


def test_non_root_fails_at_once_and_changes_nothing(pair: testbed.NetnsPair) -> None:
    assert run("bpfilter-restore", "--netns", pair.b, stdin=only(7001)).returncode == 0
    before = saved(pair.b)
    rc, err = _as_nobody(lambda: restore.main(["--netns", pair.b], 4,
                                              stdin=io.BytesIO(only(7002).encode())))
    assert (rc, err) == (4, "bpfilter-restore: must be run as root: the firewall and its "
                         "state in bpffs are readable and writable by root alone\n")
    rc, err = _as_nobody(lambda: save.main(["--netns", pair.b], 4))
    assert rc == 4 and "bpfilter-save: must be run as root" in err
    assert saved(pair.b) == before
    assert udp(pair, 7001) and not udp(pair, 7002)
    # What the kernel says matches: the pin directory is root's alone.
    assert bpffs.pin_dir(pair.b, create=False).stat().st_mode & 0o777 == 0o700


def test_under_ip_netns_exec_it_explains_netns(pair: testbed.NetnsPair) -> None:
    r = subprocess.run(["ip", "netns", "exec", pair.b, str(BIN / "bpfilter-restore")],
                       input=only(7001), capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 4
    assert f"--netns {pair.b}" in r.stderr
    assert saved(pair.b) == ""


def test_sigkill_at_any_point_leaves_old_or_new_in_force(pair: testbed.NetnsPair) -> None:
    filler = "".join(f"-A INPUT -s 198.19.{i // 200}.{i % 200 + 1}/32 -j DROP\n"
                     for i in range(1500))
    old, new = only(7001, extra=filler), only(7002, extra=filler)
    assert run("bpfilter-restore", "--netns", pair.b, stdin=old).returncode == 0
    start = time.monotonic()
    assert run("bpfilter-restore", "--netns", pair.b, stdin=new).returncode == 0
    full = time.monotonic() - start
    outcomes = set()
    current = new
    for i in range(12):
        target = old if current == new else new
        proc = subprocess.Popen([str(BIN / "bpfilter-restore"), "--netns", pair.b],
                                stdin=subprocess.PIPE, text=True)
        assert proc.stdin is not None
        proc.stdin.write(target)
        proc.stdin.close()
        time.sleep(full * (i + 1) / 12)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
        now = saved(pair.b)
        assert now in (current, target)
        port, other = (7001, 7002) if now == old else (7002, 7001)
        assert udp(pair, port) and not udp(pair, other)
        outcomes.add(now == target)
        current = now
    assert outcomes == {True, False}, "the kills should have landed before and after the switch"
    # Leftovers of the killed runs never pile up: one commit later only one generation is left.
    assert run("bpfilter-restore", "--netns", pair.b, stdin=old).returncode == 0
    gens = {p.name.split("-")[2] for p in bpffs.pins(pair.b) if "-g" in p.name}
    assert len(gens) == 1


def test_ipv6_tool_filters_ipv6_only(pair: testbed.NetnsPair) -> None:
    text = ("*filter\n:INPUT DROP [0:0]\n-4 -A INPUT -p udp --dport 7001 -j ACCEPT\n"
            "-A INPUT -p udp --dport 7002 -j ACCEPT\n-A INPUT -p ipv6-icmp -j ACCEPT\nCOMMIT\n")
    r = run("bpfilter6-restore", "--netns", pair.b, stdin=text)
    assert r.returncode == 0, r.stderr
    assert run("bpfilter-save", "--netns", pair.b).stdout == ""  # IPv4 untouched
    assert "-A INPUT -p udp -m udp --dport 7002 -j ACCEPT" in saved6(pair.b)
    assert "7001" not in saved6(pair.b)  # the -4 line was skipped

    def udp6(port: int) -> bool:
        return testbed.udp_reaches(pair.a, pair.b, pair.ipv6_b, port, timeout=0.5)

    assert udp6(7002) and not udp6(7001)
    assert udp(pair, 7001) and udp(pair, 7003)  # IPv4 has no ruleset


def saved6(ns: str) -> str:
    out = run("bpfilter6-save", "--netns", ns)
    assert out.returncode == 0, out.stderr
    return out.stdout
