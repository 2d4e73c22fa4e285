"""bpfilter sets with real traffic: `bpfilter set add/del` change verdicts of a loaded ruleset
at once while packets flow, with the same program in place; replacing the ruleset keeps the
set; a ruleset naming a missing set is refused with its line, as iptables-restore does."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpfilter import testbed

BIN = Path(sys.executable).parent
TIMEOUT = 60
PORT = 7301


@pytest.fixture
def pair() -> Iterator[testbed.NetnsPair]:
    with testbed.netns_pair(prefix="bpfs") as p:
        yield p


def run(tool: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / tool), *args], input=stdin, capture_output=True,
                          text=True, timeout=TIMEOUT)


def bset(*args: str) -> subprocess.CompletedProcess[str]:
    r = run("bpfilter", "set", *args)
    assert r.returncode == 0, r.stderr
    return r


def prog_ids(ns: str) -> list[int]:
    r = run("bpfilter", "status", "--netns", ns, "--json")
    assert r.returncode == 0, r.stderr
    return sorted(p["prog_id"] for t in json.loads(r.stdout)["tables"] for p in t["programs"])


RULES = ("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
         "-A INPUT -p udp -m set --match-set blk src,dst -j DROP\nCOMMIT\n")


def test_set_changes_apply_while_traffic_flows(pair: testbed.NetnsPair) -> None:
    ns = pair.b
    r = run("bpfilter-restore", "--netns", ns, stdin=RULES)
    # as iptables-restore with ipset: a parameter problem, exit status 2
    assert r.returncode == 2
    assert r.stderr == ("iptables-restore v1.8.9 (legacy): Set blk doesn't exist.\n\n"
                        "Error occurred at line: 5\nTry `iptables-restore -h' or "
                        "'iptables-restore --help' for more information.\n")
    bset("create", "blk", "hash:ip,port", "--netns", ns)
    r = run("bpfilter-restore", "--netns", ns, stdin=RULES)
    assert r.returncode == 0, r.stderr
    ids = prog_ids(ns)
    assert testbed.udp_reaches(pair.a, ns, pair.ipv4_b, PORT, timeout=0.5)

    # A stream of datagrams while elements come and go: each phase sees its verdict.
    results: list[tuple[float, bool]] = []
    stop = threading.Event()

    def stream() -> None:
        while not stop.is_set():
            start = time.monotonic()
            try:
                ok = testbed.udp_reaches(pair.a, ns, pair.ipv4_b, PORT, timeout=0.2)
            except OSError:  # a bind racing the previous probe's close: not a verdict
                continue
            results.append((start, ok))

    t = threading.Thread(target=stream)
    t.start()
    try:
        # Each change happens somewhere between its (before, after) times.
        changes = []
        for verb in ("add", "del", "add"):
            time.sleep(0.6)
            before = time.monotonic()
            bset(verb, "blk", f"{pair.ipv4_a},udp:{PORT}", "--netns", ns)
            changes.append((before, time.monotonic()))
        time.sleep(0.6)
    finally:
        stop.set()
        t.join()
    # Datagrams sent between two changes (the time is taken just before sending).
    edges = [(0.0, 0.0), *changes, (float("inf"), float("inf"))]
    for i, want in enumerate((True, False, True, False)):
        lo, hi = edges[i][1], edges[i + 1][0]
        seen = [ok for at, ok in results if lo < at < hi]
        assert seen and all(ok == want for ok in seen), (i, want, seen)
    assert prog_ids(ns) == ids  # no program was replaced
    # Another port of the same host is not in the set.
    assert testbed.udp_reaches(pair.a, ns, pair.ipv4_b, PORT + 1, timeout=0.5)

    # Replacing the ruleset keeps the set and its element.
    r = run("bpfilter-restore", "--netns", ns, stdin=RULES)
    assert r.returncode == 0, r.stderr
    assert prog_ids(ns) != ids
    assert not testbed.udp_reaches(pair.a, ns, pair.ipv4_b, PORT, timeout=0.5)
    listed = json.loads(bset("list", "blk", "--netns", ns, "--json").stdout)["sets"]
    assert listed[0]["elements"] == [f"{pair.ipv4_a},udp:{PORT}"]
    r = run("bpfilter", "set", "destroy", "blk", "--netns", ns)
    assert r.returncode == 1 and "in use" in r.stderr
    assert run("bpfilter", "flush", "--netns", ns).returncode == 0
