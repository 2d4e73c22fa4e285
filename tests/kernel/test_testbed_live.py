"""bpfilter.testbed with real namespaces: the pair works at once and never outlives its use."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from bpfilter import bpffs, netns, testbed


def _gone(*names: str) -> bool:
    return not any(netns.exists(n) for n in names)


def test_pair_is_usable_at_once_in_both_families():
    with testbed.netns_pair() as p:
        assert netns.exists(p.a) and netns.exists(p.b)
        for ns, ifname in ((p.a, p.if_a), (p.b, p.if_b)):
            shown = json.loads(p.run(ns, ["ip", "-j", "addr", "show", ifname]).stdout)[0]
            assert shown["operstate"] == "UP"
            assert {a["local"] for a in shown["addr_info"]} >= {
                p.address(ns),
                p.address(ns, 10),  # AF_INET6
            }
        # First packet, no warm-up: IPv6 must not be waiting for DAD or linkwatch.
        assert testbed.ping(p.a, p.ipv6_b, timeout=1)
        assert testbed.ping(p.b, p.ipv4_a, timeout=1)
        assert testbed.udp_reaches(p.a, p.b, p.ipv4_b)
        assert testbed.udp_reaches(p.b, p.a, p.ipv6_a)
    assert _gone(p.a, p.b)


def test_caller_namespace_untouched():
    before = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    with testbed.netns_pair() as p:
        during = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert p.if_a not in during and p.if_b not in during
    assert before.count("\n") == during.count("\n")


def test_unreachable_is_false_not_an_error():
    with testbed.netns_pair() as p:
        other = testbed.Subnet((p.subnet.index + 1) % testbed.SUBNETS)
        # No route: sendto fails with ENETUNREACH, which ping reports as no answer.
        assert not testbed.ping(p.a, other.ipv4(2), timeout=0.3)
        assert not testbed.ping(p.a, other.ipv6(2), timeout=0.3)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_deleted_after_exception(exc):
    names: list[str] = []
    with pytest.raises(exc), testbed.netns_pair() as p:
        names += [p.a, p.b]
        bpffs.pin_dir(p.a)
        raise exc()
    assert _gone(*names)
    assert not bpffs.pin_dir(names[0], create=False).exists()


def test_pin_directories_removed():
    with testbed.netns_pair() as p:
        dirs = [bpffs.pin_dir(p.a), bpffs.pin_dir(p.b)]
    assert not any(d.exists() for d in dirs)


def test_deleted_after_sigterm():
    code = (
        "import time\n"
        "from bpfilter import testbed\n"
        "with testbed.netns_pair(prefix='bpft-term') as p:\n"
        "    print(p.a, p.b, flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        names = proc.stdout.readline().split()
        assert len(names) == 2 and all(netns.exists(n) for n in names)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _gone(*names)
