"""`bpfilter attach` with real traffic over veth in throwaway namespaces: XDP and TC rulesets
attach, drop what they should, are replaced in place without a gap, show in `status`, count
like netfilter, and go away with `flush`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpfilter import bpf, bpffs, cli, ifattach, netns, testbed
from bpfilter.codegen.uapi import IfHook

NEGATIVE_WAIT = 0.5


@pytest.fixture(autouse=True)
def _own_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BPFILTER_LOCK", os.environ.get("BPFILTER_LOCK") or
                       str(tmp_path / "lock"))


@pytest.fixture
def pair() -> Iterator[testbed.NetnsPair]:
    with testbed.netns_pair(prefix="bpfh6") as p:
        yield p


def ruleset(rules: str, chain: str = "INPUT", policy: str = "ACCEPT") -> str:
    lines = ["*filter", f":INPUT {policy if chain == 'INPUT' else 'ACCEPT'} [0:0]",
             ":FORWARD ACCEPT [0:0]", f":OUTPUT {policy if chain == 'OUTPUT' else 'ACCEPT'} [0:0]",
             *[r.strip() for r in rules.strip().splitlines() if r.strip()], "COMMIT", ""]
    return "\n".join(lines)


def bpfilter(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def attach(tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, pair:
           testbed.NetnsPair, ns: str, text: str, *extra: str) -> str:
    f = tmp_path / "rules"
    f.write_text(text)
    rc, out, err = bpfilter(capsys, "attach", flag, pair.ifname(ns), "--netns", ns, *extra,
                            str(f))
    assert rc == 0, err
    return out


def pings(pair: testbed.NetnsPair, family: int = socket.AF_INET, count: int = 3) -> bool:
    return testbed.ping(pair.a, pair.address(pair.b, family), count=count,
                        timeout=NEGATIVE_WAIT)


@pytest.mark.parametrize("flag", ["--xdp", "--tc-ingress"])
def test_attach_replace_status_flush(flag: str, pair: testbed.NetnsPair, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert pings(pair)
    drop = ruleset(f"-A INPUT -i {pair.if_b} -p icmp --icmp-type echo-request -j DROP")
    out = attach(tmp_path, capsys, flag, pair, pair.b, drop)
    assert out.startswith("attached")
    assert not pings(pair, count=1)
    # ICMP only: UDP still passes, and IPv6 (another family, not this program's) too.
    assert testbed.udp_reaches(pair.a, pair.b, pair.ipv4_b, timeout=1.0)
    assert pings(pair, socket.AF_INET6)

    rc, out, _ = bpfilter(capsys, "status", "--netns", pair.b, "--json")
    assert rc == 0
    (entry,) = json.loads(out)["interfaces"]
    assert (entry["dev"], entry["chain"], entry["rules"]) == (pair.if_b, "INPUT", 1)
    assert entry["hook"] == flag[2:]
    link_id = entry["link_id"]

    out = attach(tmp_path, capsys, flag, pair, pair.b, ruleset("-A INPUT -p udp -j DROP"))
    assert out.startswith("replaced")
    assert pings(pair)
    assert not testbed.udp_reaches(pair.a, pair.b, pair.ipv4_b, timeout=NEGATIVE_WAIT)
    rc, out, _ = bpfilter(capsys, "status", "--netns", pair.b, "--json")
    (entry,) = json.loads(out)["interfaces"]
    assert entry["link_id"] == link_id  # the same link: the program was swapped in place

    rc, out, _ = bpfilter(capsys, "flush", "--netns", pair.b)
    assert rc == 0 and f"removed {flag[2:]} {pair.if_b} ip" in out
    assert testbed.udp_reaches(pair.a, pair.b, pair.ipv4_b, timeout=1.0)
    assert ifattach.keys(pair.b) == []


def test_tc_egress_drops_outgoing(pair: testbed.NetnsPair, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    # Egress of b's veth: the echo reply leaves b there; -o is the attach interface.
    text = ruleset(f"-A OUTPUT -o {pair.if_b} -p icmp --icmp-type echo-reply -j DROP",
                   chain="OUTPUT")
    attach(tmp_path, capsys, "--tc-egress", pair, pair.b, text)
    assert not pings(pair, count=1)
    assert testbed.udp_reaches(pair.a, pair.b, pair.ipv4_b, timeout=1.0)


def test_ipv6_and_policy_drop(pair: testbed.NetnsPair, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    # A DROP policy at XDP for IPv6: neighbour discovery must be let through by the rules.
    text = ruleset("-A INPUT -p ipv6-icmp --icmpv6-type neighbour-solicitation -j ACCEPT\n"
                   "-A INPUT -p ipv6-icmp --icmpv6-type neighbour-advertisement -j ACCEPT\n"
                   f"-A INPUT -s {pair.ipv6_a} -p ipv6-icmp --icmpv6-type echo-request -j "
                   "ACCEPT", policy="DROP")
    attach(tmp_path, capsys, "--xdp", pair, pair.b, text, "-6")
    assert pings(pair, socket.AF_INET6)
    assert pings(pair)  # IPv4 is not this program's business
    assert not testbed.udp_reaches(pair.a, pair.b, pair.ipv6_b, timeout=NEGATIVE_WAIT)
    # One XDP program per interface: IPv4 there is refused with the way out.
    f = tmp_path / "v4"
    f.write_text(ruleset("-A INPUT -p udp -j DROP"))
    rc, _, err = bpfilter(capsys, "attach", "--xdp", pair.if_b, "--netns", pair.b, str(f))
    assert rc == 4 and "--tc-ingress" in err


def test_counters_count_ip_bytes(pair: testbed.NetnsPair, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    text = ruleset(f"-A INPUT -s {pair.ipv4_a} -p udp --dport 9 -j DROP")
    attach(tmp_path, capsys, "--tc-ingress", pair, pair.b, text)
    payload = b"x" * 100
    with netns.entered(pair.a):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with tx:
        for _ in range(3):
            tx.sendto(payload, (pair.ipv4_b, 9))
    deadline = time.monotonic() + 2
    key = ifattach.Key(IfHook.TC_INGRESS, pair.if_b, 4)
    while time.monotonic() < deadline:
        counts = ifattach.counters(key, pair.b)
        if counts[("filter", "INPUT", 1)][0] == 3:
            break
        time.sleep(0.05)
    assert counts[("filter", "INPUT", 1)] == (3, 3 * (20 + 8 + len(payload)))
    # Replaced with the rule kept behind a new one: its counters carry over.
    attach(tmp_path, capsys, "--tc-ingress", pair, pair.b,
           ruleset(f"-A INPUT -p tcp -j DROP\n-A INPUT -s {pair.ipv4_a} -p udp --dport 9 "
                   "-j DROP"))
    counts = ifattach.counters(key, pair.b)
    assert counts[("filter", "INPUT", 2)] == (3, 3 * (20 + 8 + len(payload)))
    assert counts[("filter", "INPUT", 1)] == (0, 0)
    rc, out, _ = bpfilter(capsys, "status", "--netns", pair.b, "-c")
    assert rc == 0
    assert f"[3:{3 * 128}] -A INPUT -s {pair.ipv4_a}/32 -p udp -m udp --dport 9 -j DROP" in out
    assert "[0:0] -A INPUT -p tcp -j DROP" in out


def test_replace_leaves_no_gap(pair: testbed.NetnsPair, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """Datagrams to a dropped port sent while the ruleset is replaced again and again (each
    version drops port 9): none may arrive."""
    versions = [ruleset(f"-A INPUT -p udp --dport 9 -j DROP\n-A INPUT -p tcp --dport {p} "
                        "-j DROP") for p in range(1000, 1006)]
    attach(tmp_path, capsys, "--xdp", pair, pair.b, versions[0])
    with netns.entered(pair.b):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind((pair.ipv4_b, 9))
    rx.setblocking(False)
    stop = threading.Event()

    def send() -> None:
        with netns.entered(pair.a):
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with tx:
            while not stop.is_set():
                tx.sendto(b"gap?", (pair.ipv4_b, 9))
                time.sleep(0.0005)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        for text in versions[1:]:
            assert attach(tmp_path, capsys, "--xdp", pair, pair.b, text).startswith("replaced")
    finally:
        stop.set()
        sender.join()
    with rx:
        try:
            got = rx.recv(100)
        except BlockingIOError:
            got = None
    assert got is None


def test_conntrack_state_at_tc_egress(pair: testbed.NetnsPair, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    # b's echo replies leave b ESTABLISHED (reply direction); b's own datagrams leave NEW.
    text = ruleset("-A OUTPUT -p udp -m conntrack --ctstate NEW -j DROP\n"
                   "-A OUTPUT -p icmp -m state --state ESTABLISHED -j ACCEPT\n"
                   "-A OUTPUT -p icmp -j DROP", chain="OUTPUT")
    attach(tmp_path, capsys, "--tc-egress", pair, pair.b, text)
    assert pings(pair)
    assert not testbed.udp_reaches(pair.b, pair.a, pair.ipv4_a, timeout=NEGATIVE_WAIT)
    assert testbed.udp_reaches(pair.a, pair.b, pair.ipv4_b, timeout=1.0)  # ingress: untouched
    # b's own pings: requests leave NEW, so the last rule drops them.
    assert not testbed.ping(pair.b, pair.ipv4_a, count=1, timeout=NEGATIVE_WAIT)
    key = ifattach.Key(IfHook.TC_EGRESS, pair.if_b, 4)
    counts = ifattach.counters(key, pair.b)
    assert counts[("filter", "OUTPUT", 1)][0] == 1 and counts[("filter", "OUTPUT", 3)][0] == 1
    assert counts[("filter", "OUTPUT", 2)][0] >= 1


def test_sets_at_xdp_follow_set_updates(pair: testbed.NetnsPair, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = bpfilter(capsys, "set", "create", "blk", "hash:net", "--netns", pair.b)
    assert rc == 0, err
    assert bpfilter(capsys, "set", "add", "blk", f"{pair.ipv4_a}/32", "--netns", pair.b)[0] == 0
    attach(tmp_path, capsys, "--xdp", pair, pair.b,
           ruleset("-A INPUT -m set --match-set blk src -j DROP"))
    assert not pings(pair, count=1)
    assert bpfilter(capsys, "set", "del", "blk", f"{pair.ipv4_a}/32", "--netns", pair.b)[0] == 0
    assert pings(pair)  # the attached program sees the set's map change at once


def test_refusals_name_the_line(pair: testbed.NetnsPair, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "rules"
    f.write_text(ruleset("-A INPUT -p tcp\n-A INPUT -m conntrack --ctstate NEW -j DROP"))
    rc, _, err = bpfilter(capsys, "attach", "--xdp", pair.if_b, "--netns", pair.b, str(f))
    assert rc == 2
    assert "line 6: match 'conntrack' cannot run at XDP" in err
    assert ifattach.keys(pair.b) == []
    # Not an Ethernet device.
    f.write_text(ruleset("-A INPUT -p udp -j DROP"))
    rc, _, err = bpfilter(capsys, "attach", "--xdp", "lo", "--netns", pair.b, str(f))
    assert rc == 4 and "not an Ethernet device" in err
    rc, _, err = bpfilter(capsys, "attach", "--xdp", "nope0", "--netns", pair.b, str(f))
    assert rc == 4 and "no interface 'nope0'" in err
    assert not any(p.name.startswith("if:") for p in bpffs.pins(pair.b))


def test_interface_recreated_gets_a_new_link(pair: testbed.NetnsPair, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    make = ["ip", "-n", pair.b, "link", "add", "bpfdummy0", "type", "veth", "peer", "name",
            "bpfdummy1"]
    subprocess.run(make, check=True)
    f = tmp_path / "rules"
    f.write_text(ruleset("-A INPUT -p udp -j DROP"))
    argv = ["attach", "--tc-ingress", "bpfdummy0", "--netns", pair.b, str(f)]
    assert bpfilter(capsys, *argv)[1].startswith("attached")
    subprocess.run(["ip", "-n", pair.b, "link", "del", "bpfdummy0"], check=True)
    subprocess.run(make, check=True)
    rc, out, err = bpfilter(capsys, *argv)  # the pinned link is defunct: a new one is made
    assert rc == 0 and out.startswith("attached"), err
    key = ifattach.Key(IfHook.TC_INGRESS, "bpfdummy0", 4)
    with bpf.link_from_fd(bpffs.get(key.pin("link"), pair.b)) as link:
        assert link.info().ifindex == netns.ifindex("bpfdummy0", pair.b)


def test_pins_keep_the_program_after_exit(pair: testbed.NetnsPair, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    attach(tmp_path, capsys, "--tc-ingress", pair, pair.b, ruleset("-A INPUT -p udp -j DROP"))
    key = ifattach.Key(IfHook.TC_INGRESS, pair.if_b, 4)
    with bpf.link_from_fd(bpffs.get(key.pin("link"), pair.b)) as link:
        assert link.info().ifindex == pair.ifindex_b
    assert not testbed.udp_reaches(pair.a, pair.b, pair.ipv4_b, timeout=NEGATIVE_WAIT)
