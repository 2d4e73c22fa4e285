"""The pure parts of bpfilter.testbed: names, the address plan, checksums, pair helpers."""

from __future__ import annotations

import ipaddress
import os
import re
import socket

import pytest

from bpfilter import testbed

BENCH4 = ipaddress.ip_network("198.18.0.0/15")
DOC6 = ipaddress.ip_network("2001:db8::/32")


def test_unique_names():
    names = {testbed.unique_name("bpft") for _ in range(200)}
    assert len(names) == 200
    for n in names:
        assert re.fullmatch(rf"bpft-{os.getpid()}-[0-9a-f]{{6}}", n)


@pytest.mark.parametrize("index", [0, 1, 255, 256, 511])
def test_subnet_addresses_stay_in_test_ranges(index):
    s = testbed.Subnet(index)
    for host in (1, 2, 3):
        assert ipaddress.ip_address(s.ipv4(host)) in BENCH4
        assert ipaddress.ip_address(s.ipv6(host)) in DOC6
    assert ipaddress.ip_interface(f"{s.ipv4(1)}/24").network == ipaddress.ip_interface(
        f"{s.ipv4(2)}/24"
    ).network
    assert ipaddress.ip_interface(f"{s.ipv6(1)}/64").network == ipaddress.ip_interface(
        f"{s.ipv6(2)}/64"
    ).network


def test_subnets_are_distinct():
    nets = {ipaddress.ip_interface(f"{testbed.Subnet(i).ipv4(1)}/24").network for i in range(512)}
    assert len(nets) == 512
    assert testbed.Subnet(257).ipv4(2) == "198.19.1.2"
    assert testbed.Subnet(257).ipv6(1) == "2001:db8:101::1"


@pytest.mark.parametrize("index", [-1, 512])
def test_subnet_index_bounds(index):
    with pytest.raises(ValueError, match="subnet index"):
        testbed.Subnet(index)


def test_random_subnet_in_range():
    assert all(0 <= testbed.random_subnet().index < testbed.SUBNETS for _ in range(100))


def test_pair_helpers():
    p = testbed.NetnsPair("ns-a", "ns-b", testbed.Subnet(3), ifindex_a=5, ifindex_b=7)
    assert (p.ipv4_a, p.ipv4_b) == ("198.18.3.1", "198.18.3.2")
    assert (p.ipv6_a, p.ipv6_b) == ("2001:db8:3::1", "2001:db8:3::2")
    assert p.peer("ns-a") == "ns-b" and p.peer("ns-b") == "ns-a"
    assert p.address("ns-b") == p.ipv4_b
    assert p.address("ns-a", socket.AF_INET6) == p.ipv6_a
    assert (p.ifname("ns-a"), p.ifname("ns-b")) == (testbed.IF_A, testbed.IF_B)
    assert (p.ifindex("ns-a"), p.ifindex("ns-b")) == (5, 7)
    with pytest.raises(ValueError, match="not part of this pair"):
        p.peer("other")
    with pytest.raises(ValueError, match="not part of this pair"):
        p.address("other")
    with pytest.raises(ValueError, match="not part of this pair"):
        p.run("other", ["true"])


def test_checksum_known_vector():
    # ICMP echo request, id 1 seq 1, no payload: 0x0800 + 0x0001 + 0x0001 -> ~0x0802 = 0xf7fd
    assert testbed.checksum(bytes.fromhex("0800000000010001")) == 0xF7FD
    # Odd length is padded with a zero byte; a packet including its checksum sums to zero.
    data = b"\x08\x00\x00\x00\x12\x34\x00\x07abc"
    cks = testbed.checksum(data)
    assert testbed.checksum(data[:2] + cks.to_bytes(2, "big") + data[4:]) == 0
