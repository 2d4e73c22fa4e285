"""ufw's IPv6 ruleset (which drops type 0 routing headers with `-m rt`) loaded by
bpfilter6-restore in a throwaway namespace pair: crafted packets with routing headers arrive on
the veth and are counted by the `-m rt --rt-type 0 -j DROP` rule exactly when they carry one."""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpfilter import netns, testbed

BIN = Path(sys.executable).parent
UFW6 = "conformance/realworld/ufw/emulated-ufw-enabled.ip6tables-save.legacy.txt"
RT_RULE = "-A ufw6-before-input -m rt --rt-type 0 -j DROP"
ICMP6, ROUTING = 58, 43


@pytest.fixture
def pair() -> Iterator[testbed.NetnsPair]:
    with testbed.netns_pair(prefix="bpf6x") as p:
        yield p


def _echo(src: str, dst: str, rt_type: int | None) -> bytes:
    icmp = struct.pack("!BBHHH", 128, 0, 0, 1, 1) + b"bpfilter"  # checksum not checked here
    body, nh = icmp, ICMP6
    if rt_type is not None:
        body = struct.pack("!BBBBI16s", ICMP6, 2, rt_type, 0, 0,
                           ipaddress.IPv6Address(dst).packed) + icmp
        nh = ROUTING
    return struct.pack("!IHBB16s16s", 6 << 28, len(body), nh, 64,
                       ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed) + body


def _rt_count(ns: str) -> int:
    r = subprocess.run([str(BIN / "bpfilter6-save"), "-c", "--netns", ns], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    (line,) = [x for x in r.stdout.splitlines() if x.endswith(RT_RULE)]
    m = re.match(r"\[(\d+):\d+\]", line)
    assert m is not None, line
    return int(m.group(1))


def test_ufw6_drops_type0_routing_headers(pair: testbed.NetnsPair, shared_dir: Path) -> None:
    text = (shared_dir / UFW6).read_text()
    r = subprocess.run([str(BIN / "bpfilter6-restore"), "--netns", pair.b], input=text,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    mac_b = bytes.fromhex(pair.run(pair.b, ["cat", f"/sys/class/net/{pair.if_b}/address"])
                          .stdout.strip().replace(":", ""))
    with netns.entered(pair.a):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    with sock:
        sock.bind((pair.if_a, 0))
        expected = 0
        for rt_type, counted in ((None, False), (0, True), (2, False), (0, True)):
            sock.send(mac_b + bytes.fromhex("020000000001") + struct.pack("!H", 0x86DD)
                      + _echo(pair.ipv6_a, pair.ipv6_b, rt_type))
            expected += counted
            time.sleep(0.05)
            assert _rt_count(pair.b) == expected, rt_type
