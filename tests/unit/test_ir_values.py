"""Value parsing and printing: protocols, ports, addresses, save quoting."""

from __future__ import annotations

import pytest

from bpfilter.ir.model import PortRange
from bpfilter.ir.values import (
    ValueError_,
    format_prefix,
    format_prefix_short,
    parse_port_range,
    parse_prefix,
    parse_proto,
    parse_uint,
    proto_name,
    save_string,
)


def test_protocols() -> None:
    assert parse_proto("TCP") == 6 and parse_proto("6") == 6 and parse_proto("all") == 0
    assert parse_proto("icmpv6") == 58 and proto_name(58) == "ipv6-icmp"
    assert proto_name(47) == "gre" and proto_name(253) == "253"
    with pytest.raises(ValueError_):
        parse_proto("256")
    with pytest.raises(ValueError_):
        parse_proto("nosuch")


def test_port_ranges() -> None:
    assert parse_port_range("ssh") == PortRange(22, 22)
    assert parse_port_range("1024:") == PortRange(1024, 65535)
    assert parse_port_range(":") == PortRange(0, 65535)
    for bad in ("65536", "4:3", "-1", "echo-ssh"):
        with pytest.raises(ValueError_):
            parse_port_range(bad)


def test_prefixes_are_masked_and_printed_like_iptables_save() -> None:
    assert format_prefix(parse_prefix("10.11.12.13/8", 32)) == "10.0.0.0/8"
    assert format_prefix(parse_prefix("10.11.12.13/255.0.255.0", 32)) == "10.0.12.0/255.0.255.0"
    assert format_prefix(parse_prefix("1.2.3.4", 32)) == "1.2.3.4/32"
    assert format_prefix_short(parse_prefix("1.2.3.4", 32)) == "1.2.3.4"
    assert format_prefix(parse_prefix("2001:db8::1/32", 128)) == "2001:db8::/32"
    for bad in ("300.1.1.1", "1.2.3", "10.0.0.0/33", "2001:db8::1"):
        with pytest.raises(ValueError_):
            parse_prefix(bad, 32)


def test_numbers_follow_strtoul_base_zero() -> None:
    assert parse_uint("0x10", 255) == 16 and parse_uint("010", 255) == 8
    for bad in ("-1", "256", "", "0xg"):
        with pytest.raises(ValueError_):
            parse_uint(bad, 255)


def test_save_quoting() -> None:
    assert save_string("plain_word-1") == "plain_word-1"
    assert save_string("") == '""'
    assert save_string("a b") == '"a b"'
    assert save_string("'q'\\\"") == '"\\\'q\\\'\\\\\\""'


def test_ipv6_scope_refused() -> None:
    # ip6tables-legacy-restore 1.8.9: "host/network `fe80::1%eth0' not found" (exit 2).
    with pytest.raises(ValueError_, match="host/network `fe80::1%eth0' not found"):
        parse_prefix("fe80::1%eth0", 128)
    assert parse_prefix("fe80::1", 128).addr == 0xFE80 << 112 | 1
