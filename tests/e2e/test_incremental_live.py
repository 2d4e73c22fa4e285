"""Incremental changes with real traffic: rules added to and removed from a loaded blocklist
with bpfilter-iptables and `bpfilter-restore --noflush` are map writes (the program id stays),
verdicts follow, counters of unchanged rules survive; a structural change rebuilds (new id)
and keeps counters too; SIGKILL at each step of a map-only change leaves old or new in force."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpfilter import testbed

BIN = Path(sys.executable).parent
TIMEOUT = 60
RUN = 300  # blocklist entries: well over the optimizer's MIN_RUN


@pytest.fixture
def pair() -> Iterator[testbed.NetnsPair]:
    with testbed.netns_pair(prefix="bpfn") as p:
        yield p


def tool(name: str, *args: str, stdin: str = "",
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / name), *args], input=stdin, capture_output=True,
                          text=True, timeout=TIMEOUT, env={**os.environ, **(env or {})})


def ipt(ns: str, *args: str, env: dict[str, str] | None = None) -> dict[str, object]:
    r = tool("bpfilter-iptables", "-w", "--netns", ns, "--json", *args, env=env)
    assert r.returncode == 0, r.stderr
    doc: dict[str, object] = json.loads(r.stdout)
    return doc


def saved(ns: str, *args: str) -> str:
    r = tool("bpfilter-save", "--netns", ns, *args)
    assert r.returncode == 0, r.stderr
    return "".join(line + "\n" for line in r.stdout.splitlines() if not line.startswith("#"))


def status(ns: str) -> dict[str, object]:
    r = tool("bpfilter", "status", "--netns", ns, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    [table] = [t for t in doc["tables"] if t["table"] == "filter" and t["family"] == 4]
    return dict(table)


def prog_id(ns: str) -> int:
    st = status(ns)
    [prog] = [p for p in st["programs"] if p["chain"] == "INPUT"]  # type: ignore[attr-defined]
    return int(prog["prog_id"])


def counter(ns: str, rule: str) -> tuple[int, int]:
    """(packets, bytes) of the first rule whose save line ends with ``rule``."""
    for line in saved(ns, "-c").splitlines():
        m = re.match(r"\[(\d+):(\d+)\] (.*)$", line)
        if m and m.group(3).endswith(rule):
            return int(m.group(1)), int(m.group(2))
    raise AssertionError(f"no rule {rule!r}")


def reaches(pair: testbed.NetnsPair, port: int = 7001) -> bool:
    return testbed.udp_reaches(pair.a, pair.b, pair.ipv4_b, port, timeout=0.3)


def blocklist(pair: testbed.NetnsPair) -> str:
    """A run of /32 rules, DROP but for the sender's address (ACCEPT), under a DROP policy."""
    rules = [f"-A INPUT -s 198.19.{i // 200}.{i % 200 + 1}/32 -j DROP" for i in range(RUN)]
    rules.insert(RUN // 2, f"-A INPUT -s {pair.ipv4_a}/32 -j ACCEPT")
    return ("*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            + "".join(r + "\n" for r in rules) + "COMMIT\n")


def load(pair: testbed.NetnsPair) -> int:
    r = tool("bpfilter-restore", "--netns", pair.b, stdin=blocklist(pair))
    assert r.returncode == 0, r.stderr
    assert reaches(pair)
    return prog_id(pair.b)


def test_single_commands_and_noflush_write_maps_and_keep_the_program(
        pair: testbed.NetnsPair) -> None:
    first = load(pair)
    accept = f"-s {pair.ipv4_a}/32 -j ACCEPT"
    for _ in range(3):
        assert reaches(pair)
    before = counter(pair.b, accept)
    assert before[0] >= 4

    # A new first rule dropping the sender: one map entry, same program, the verdict flips.
    doc = ipt(pair.b, "-I", "INPUT", "-s", pair.ipv4_a, "-j", "DROP")
    assert doc["incremental"] and doc["programs"] == {"INPUT": first}
    assert prog_id(pair.b) == first
    assert not reaches(pair)
    drop = f"-s {pair.ipv4_a}/32 -j DROP"
    assert counter(pair.b, drop)[0] == 1  # a new rule starts from zero, then counts
    assert counter(pair.b, accept) == before  # the rule it shadows kept its counts

    doc = ipt(pair.b, "-D", "INPUT", "1")
    assert doc["incremental"] and prog_id(pair.b) == first
    assert reaches(pair)
    assert counter(pair.b, accept)[0] == before[0] + 1

    # Removed from the run: the sender now falls through to the DROP policy.
    ipt(pair.b, "-D", "INPUT", "-s", pair.ipv4_a, "-j", "ACCEPT")
    assert prog_id(pair.b) == first and not reaches(pair)
    ipt(pair.b, "-A", "INPUT", "-s", pair.ipv4_a, "-j", "ACCEPT")
    assert prog_id(pair.b) == first and reaches(pair)

    # --noflush with a few lines: one commit of several map entries, same program.
    batch = ("*filter\n-D INPUT -s 198.19.0.1/32 -j DROP\n-I INPUT 5 -s 198.18.250.1 -j DROP\n"
             f"-A INPUT -s 198.18.250.2 -j DROP\n-I INPUT -s {pair.ipv4_a} -j DROP\nCOMMIT\n")
    r = tool("bpfilter-restore", "--noflush", "--json", "--netns", pair.b, stdin=batch)
    assert r.returncode == 0, r.stderr
    [table] = json.loads(r.stdout)["tables"]
    assert table["incremental"]["entries"] >= 4 and table["programs"] == {"INPUT": first}
    assert prog_id(pair.b) == first and not reaches(pair)
    text = saved(pair.b)
    assert "-A INPUT -s 198.19.0.1/32 -j DROP\n" not in text
    assert text.splitlines()[4:6] == [f"-A INPUT -s {pair.ipv4_a}/32 -j DROP",
                                      "-A INPUT -s 198.19.0.2/32 -j DROP"]
    assert text.splitlines()[9] == "-A INPUT -s 198.18.250.1/32 -j DROP"  # rule 6
    assert text.count("\n") == RUN + 3 + 4 + 1  # header, policies, rules, COMMIT

    # The listing is the one iptables-restore of the same text would give.
    r = tool("bpfilter-restore", "--netns", pair.a, stdin=text)
    assert r.returncode == 0, r.stderr
    assert saved(pair.a) == text


def test_a_structural_change_rebuilds_and_keeps_counters(pair: testbed.NetnsPair) -> None:
    first = load(pair)
    accept = f"-s {pair.ipv4_a}/32 -j ACCEPT"
    for _ in range(2):
        assert reaches(pair)
    before = counter(pair.b, accept)
    # A rule of another shape after the run (one a classifier cannot take either): new
    # code, a new program, swapped atomically.
    doc = ipt(pair.b, "-A", "INPUT", "-i", "lo", "-j", "ACCEPT")
    assert not doc["incremental"] and doc["rebuilt"]
    second = prog_id(pair.b)
    assert second != first
    assert counter(pair.b, accept) == before
    assert reaches(pair) and counter(pair.b, accept)[0] == before[0] + 1
    # Entries of the rebuilt table change in place again.
    ipt(pair.b, "-I", "INPUT", "-s", pair.ipv4_a, "-j", "DROP")
    assert prog_id(pair.b) == second and not reaches(pair)


@pytest.mark.parametrize(("step", "done"), [
    ("maps-pinned", False), ("maps-written", False), ("maps-switched", True)])
def test_sigkill_during_a_map_change_leaves_old_or_new(pair: testbed.NetnsPair, step: str,
                                                       done: bool) -> None:
    first = load(pair)
    old = saved(pair.b)
    r = tool("bpfilter-iptables", "-w", "--netns", pair.b, "-I", "INPUT", "-s", pair.ipv4_a,
             "-j", "DROP", env={"BPFILTER_KILL_AT": step})
    assert r.returncode == -9
    now = saved(pair.b)
    assert (now != old) == done
    assert reaches(pair) != done  # the traffic agrees with the text in force
    assert prog_id(pair.b) == first
    # The next change works from what is in force, whatever the killed one left.
    ipt(pair.b, "-I", "INPUT", "-s", "198.18.251.1", "-j", "DROP")
    assert reaches(pair) != done and prog_id(pair.b) == first
    ipt(pair.b, "-D", "INPUT", "-s", "198.18.251.1", "-j", "DROP")
    assert saved(pair.b) == now
    if not done:  # the killed run's writes to the unused copy were undone: the same change
        ipt(pair.b, "-I", "INPUT", "-s", pair.ipv4_a, "-j", "DROP")
        assert not reaches(pair)
    ipt(pair.b, "-D", "INPUT", "-s", pair.ipv4_a, "-j", "DROP")
    assert reaches(pair) and prog_id(pair.b) == first
