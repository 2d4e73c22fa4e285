"""The target half of the extension table: verdict options, NAT ranges, marks."""

from __future__ import annotations

import pytest

from bpfilter.grammar.errors import ParseError
from bpfilter.grammar.iptables import parse_command
from bpfilter.ir.iptables_save import format_rule
from bpfilter.ir.targets import TARGETS


def one(rule: str, chain: str = "INPUT", table: str = "filter", family: int = 4) -> str:
    rs = parse_command(["-A", chain, *rule.split()], family=family, table=table)
    c = rs.tables[0].chain(chain)
    assert c is not None
    (r,) = c.rules
    return format_rule(r, chain, bits=32 if family == 4 else 128, table=table)[len(chain) + 4:]


@pytest.mark.parametrize(
    ("rule", "chain", "table", "saved"),
    [
        ("-j REJECT", "INPUT", "filter", "-j REJECT --reject-with icmp-port-unreachable"),
        ("-p tcp -j REJECT --reject-with tcp-rst", "INPUT", "filter",
         "-p tcp -j REJECT --reject-with tcp-reset"),
        ("-j LOG --log-level info --log-prefix x --log-uid", "INPUT", "filter",
         "-j LOG --log-prefix x --log-level 6 --log-uid"),
        ("-j LOG --log-level 4", "INPUT", "filter", "-j LOG"),
        ("-j NFLOG --nflog-group 5 --nflog-prefix x", "INPUT", "filter",
         "-j NFLOG --nflog-prefix x --nflog-group 5"),
        ("-j NFLOG --nflog-group 0 --nflog-range 100 --nflog-threshold 5", "INPUT", "filter",
         "-j NFLOG --nflog-range 100 --nflog-threshold 5"),
        ("-j CT --notrack --zone 1", "PREROUTING", "raw", "-j CT --notrack --zone 1"),
        ("-j MARK --set-mark 0x10", "PREROUTING", "mangle", "-j MARK --set-xmark 0x10/0xffffffff"),
        ("-j MARK --or-mark 0x4000", "PREROUTING", "mangle", "-j MARK --set-xmark 0x4000/0x4000"),
        ("-j MARK --and-mark 0x12", "PREROUTING", "mangle", "-j MARK --set-xmark 0x0/0xffffffed"),
        ("-j CONNMARK --restore-mark --mask 0xff", "PREROUTING", "mangle",
         "-j CONNMARK --restore-mark --nfmask 0xff --ctmask 0xff"),
        ("-j DSCP --set-dscp-class EF", "PREROUTING", "mangle", "-j DSCP --set-dscp 0x2e"),
        ("-j TOS --and-tos 0x12", "PREROUTING", "mangle", "-j TOS --set-tos 0x00/0xed"),
        ("-j TTL --ttl-set 64", "PREROUTING", "mangle", "-j TTL --ttl-set 64"),
        ("-p tcp --dport 80 -j DNAT --to-destination 172.17.0.2:8080", "PREROUTING", "nat",
         "-p tcp -m tcp --dport 80 -j DNAT --to-destination 172.17.0.2:8080"),
        ("-j SNAT --to-source 1.1.1.1 --random-fully --random", "POSTROUTING", "nat",
         "-j SNAT --to-source 1.1.1.1 --random --random-fully"),
        ("-p tcp -j MASQUERADE --to-ports 1024-65535", "POSTROUTING", "nat",
         "-p tcp -j MASQUERADE --to-ports 1024-65535"),
        ("-p tcp -j REDIRECT --to-ports 3128", "PREROUTING", "nat",
         "-p tcp -j REDIRECT --to-ports 3128"),
        ("-p udp -j CT --helper tftp", "PREROUTING", "raw", "-p udp -j CT --helper tftp"),
        ("-j NOTRACK", "OUTPUT", "raw", "-j NOTRACK"),
        ("-p tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu", "FORWARD", "filter",
         "-p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu"),
        ("-p udp -j CHECKSUM --checksum-fill", "POSTROUTING", "mangle",
         "-p udp -j CHECKSUM --checksum-fill"),
    ],
)
def test_saved_form(rule: str, chain: str, table: str, saved: str) -> None:
    assert one(rule, chain, table) == saved


def test_ipv6_nat_and_reject() -> None:
    assert one("-p tcp -j SNAT --to-source [dead::beef]:1025-65535", "POSTROUTING", "nat", 6) \
        == "-p tcp -j SNAT --to-source [dead::beef]:1025-65535"
    assert one("-j REJECT --reject-with no-route", family=6) == \
        "-j REJECT --reject-with icmp6-no-route"


@pytest.mark.parametrize(
    ("rule", "chain", "table"),
    [
        ("-j DNAT", "PREROUTING", "nat"),
        ("-j DNAT --to-destination 1.1.1.1:80", "PREROUTING", "nat"),
        ("-j MARK", "INPUT", "filter"),
        ("-j LOG --log-level bad", "INPUT", "filter"),
        ("-j LOG --log-level warn", "INPUT", "filter"),
        ("-j REJECT --reject-with tcp-reset", "INPUT", "filter"),
        ("-j TCPMSS --set-mss 1400", "FORWARD", "filter"),
        ("-j CT --notrack", "INPUT", "filter"),
        ("-j DSCP --set-dscp 0x40", "PREROUTING", "mangle"),
    ],
)
def test_refused(rule: str, chain: str, table: str) -> None:
    with pytest.raises(ParseError):
        one(rule, chain, table)


def test_every_target_is_uppercase_and_saves() -> None:
    for name, ext in TARGETS.items():
        assert name == ext.name and name.isupper() and ext.kind == "target"
