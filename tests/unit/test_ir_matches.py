"""The match half of the extension table: parsing, defaults and save order per extension."""

from __future__ import annotations

import re

import pytest

from bpfilter.grammar.errors import ParseError
from bpfilter.grammar.iptables import parse_command
from bpfilter.ir.iptables_save import format_rule
from bpfilter.ir.matches import MATCHES, parse_rate, print_rate


def one(rule: str, chain: str = "INPUT", table: str = "filter", family: int = 4) -> str:
    rs = parse_command(["-A", chain, *rule.split()], family=family, table=table)
    c = rs.tables[0].chain(chain)
    assert c is not None
    (r,) = c.rules
    return format_rule(r, chain, bits=32 if family == 4 else 128, table=table)[len(chain) + 4:]


@pytest.mark.parametrize(
    ("rule", "saved"),
    [
        ("-p tcp --dport 22:23 --sport 1024:", "-p tcp -m tcp --sport 1024:65535 --dport 22:23"),
        ("-p tcp --tcp-flags ALL NONE", "-p tcp -m tcp --tcp-flags FIN,SYN,RST,PSH,ACK,URG NONE"),
        ("-p tcp ! --syn", "-p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN"),
        ("-p icmp --icmp-type port-unreachable", "-p icmp -m icmp --icmp-type 3/3"),
        ("-p icmp --icmp-type any", "-p icmp -m icmp --icmp-type any"),
        ("-m conntrack --ctstate NEW,UNTRACKED,SNAT", "-m conntrack --ctstate NEW,UNTRACKED,SNAT"),
        ("-m conntrack --ctstatus ASSURED --ctorigsrc 10.0.0.0/8 --ctdir REPLY",
         "-m conntrack --ctorigsrc 10.0.0.0/8 --ctstatus ASSURED --ctdir REPLY"),
        ("-m state --state ESTABLISHED,RELATED", "-m state --state RELATED,ESTABLISHED"),
        ("-m limit --limit 5/second", "-m limit --limit 5/sec"),
        ("-m limit --limit 2/m --limit-burst 7", "-m limit --limit 2/min --limit-burst 7"),
        ("-m limit", "-m limit --limit 3/hour"),
        ("-m mark --mark 0x1/0xff", "-m mark --mark 0x1/0xff"),
        ("-m mac --mac-source AA:BB:CC:DD:EE:FF", "-m mac --mac-source aa:bb:cc:dd:ee:ff"),
        ("-m recent --name ssh --set", "-m recent --set --name ssh --mask 255.255.255.255 "
         "--rsource"),
        ("-m statistic --mode random --probability 0.25",
         "-m statistic --mode random --probability 0.25000000000"),
        ("-p tcp -m connlimit --connlimit-above 10",
         "-p tcp -m connlimit --connlimit-above 10 --connlimit-mask 32 --connlimit-saddr"),
        ("-m hashlimit --hashlimit-upto 10/sec --hashlimit-mode srcip --hashlimit-name hl",
         "-m hashlimit --hashlimit-upto 10/sec --hashlimit-burst 5 --hashlimit-mode srcip "
         "--hashlimit-name hl"),
        ("-m set --match-set blocklist src", "-m set --match-set blocklist src"),
        ("-m hashlimit --hashlimit-upto 420/hour --hashlimit-name h",
         "-m hashlimit --hashlimit-upto 7/min --hashlimit-burst 5 --hashlimit-name h "
         "--hashlimit-htable-expire 3600000"),
        ("-m tos --tos 0x10", "-m tos --tos 0x10/0xff"),
        ("-m ttl --ttl-lt 5", "-m ttl --ttl-lt 5"),
        ("-m comment --comment hello -m comment --comment c",
         "-m comment --comment hello -m comment --comment c"),
    ],
)
def test_saved_form(rule: str, saved: str) -> None:
    assert one(rule) == saved


def test_newest_extension_owns_a_shared_option_name() -> None:
    assert one("-m mark --mark 1 -m connmark --mark 2") == \
        "-m mark --mark 0x1 -m connmark --mark 0x2"


def test_implicit_protocol_match_is_loaded_where_first_used() -> None:
    assert one("-p tcp -m conntrack --ctstate NEW --dport 22") == \
        "-p tcp -m conntrack --ctstate NEW -m tcp --dport 22"


@pytest.mark.parametrize(
    "rule",
    ["-m multiport --dports 1,2",
     "-p tcp -m multiport --dports 1:2,3:4,5:6,7:8,9:10,11:12,13:14,15:16",
     "-m comment", "-m limit --limit 0/sec", "-p tcp --tcp-flags FOO SYN",
     "-m conntrack --ctstate BOGUS", "-p tcp --dport 1 --dport 2", "-m comment ! --comment x"],
)
def test_refused(rule: str) -> None:
    with pytest.raises(ParseError):
        one(rule)


def test_rate_round_trip() -> None:
    for text in ("5/sec", "2/min", "3/hour", "1/day", "10000/sec"):
        assert print_rate(parse_rate(text)) == text


def test_every_match_has_a_save_and_known_options() -> None:
    for ext in MATCHES.values():
        assert ext.kind == "match" and ext.options is not None and callable(ext.save)


@pytest.mark.parametrize(("rule", "saved"), [
    ("-p udp --dport 69887", "-p udp -m udp --dport 4351"),
    ("-p udp --dport 70000:80000", "-p udp -m udp --dport 4464:14464"),
    ("-p udp --sport 65536", "-p udp -m udp --sport 0"),
    ("-p udp --dport 4294967297", "-p udp -m udp --dport 1"),
    ("-p udp --dport 080", "-p udp -m udp --dport 80"),
    ("-p udp --dport domain:70000", "-p udp -m udp --dport 53:4464"),
    ("-p udp --dport +5", "-p udp -m udp --dport 5"),
])
def test_udp_ports_as_iptables_1_8_9(rule: str, saved: str) -> None:
    """libxt_udp (1.8.9) cuts port numbers to 16 bits, unlike tcp (checked against
    iptables-legacy 1.8.9 in a namespace). It also keeps a reversed range, which later
    versions and the upstream tests refuse: refused here (test_udp_and_tcp_port_errors)."""
    rs = parse_command(["-A", "INPUT", *rule.split(), "-j", "DROP"], family=4, table="filter")
    chain = rs.tables[0].chain("INPUT")
    assert chain is not None
    assert format_rule(chain.rules[0], "INPUT", bits=32, table="filter") == \
        f"-A INPUT {saved} -j DROP"


@pytest.mark.parametrize(("rule", "message"), [
    ("-p udp --dport foo", 'Port "foo" does not resolve to anything.'),
    ("-p udp --dport 0x50", 'Port "0x50" does not resolve to anything.'),
    ("-p udp --dport 1:2:3", 'udp: Too many components for option "--destination-port"'),
    ("-p tcp --dport 69887", "invalid port/service `69887' specified"),
    ("-p udp --dport 80:70", "invalid portrange (min > max) `80:70'"),
])
def test_udp_and_tcp_port_errors(rule: str, message: str) -> None:
    with pytest.raises(ParseError, match=re.escape(message)):
        parse_command(["-A", "INPUT", *rule.split(), "-j", "DROP"], family=4, table="filter")
