"""`-m rt`, `-m frag` and `-m ipv6header` in the extension table: what ip6tables-legacy
accepts, refuses and prints (each case checked against ip6tables-legacy 1.8.9 on the
development machine)."""

from __future__ import annotations

import pytest

from bpfilter.grammar.errors import ParseError
from bpfilter.grammar.iptables import parse_restore
from bpfilter.ir.iptables_save import to_iptables_save


def saved(options: str, family: int = 6, match: str = "rt") -> str:
    text = f"*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -m {match} {options} -j DROP\nCOMMIT\n"
    lines = to_iptables_save(parse_restore(text, family=family)).splitlines()
    (rule,) = [x for x in lines if x.startswith("-A")]
    return rule.removeprefix(f"-A INPUT -m {match}").removesuffix("-j DROP").strip()


@pytest.mark.parametrize(("given", "printed"), [
    ("--rt-type 0", "--rt-type 0"),
    ("! --rt-type 0", "! --rt-type 0"),
    ("--rt-segsleft 3", "--rt-segsleft 3"),
    ("--rt-segsleft 3:", "--rt-segsleft 3:4294967295"),
    ("--rt-segsleft :5", "--rt-segsleft 0:5"),
    ("--rt-segsleft :", ""),
    ("--rt-segsleft 5:5", "--rt-segsleft 5"),
    ("--rt-segsleft 7:3", "--rt-segsleft 7:3"),
    ("--rt-segsleft 0x10:0x20", "--rt-segsleft 16:32"),
    ("! --rt-segsleft 2:7", "! --rt-segsleft 2:7"),
    # the full range is left out even when negated (rt_save)
    ("! --rt-segsleft 0:4294967295", ""),
    ("--rt-len 8 --rt-type 0x10", "--rt-type 16 --rt-len 8"),
    ("--rt-len 24 ! --rt-type 0", "! --rt-type 0 --rt-len 24"),
    ("--rt-segsleft 5 --rt-type 2 --rt-len 16", "--rt-type 2 --rt-segsleft 5 --rt-len 16"),
    ("--rt-type 256", "--rt-type 256"),
    ("--rt-len 4294967295", "--rt-len 4294967295"),
    ("--rt-type 0 --rt-0-res", "--rt-type 0 --rt-0-res"),
    ("--rt-type 0 --rt-0-addrs 2001:db8::1,2001:db8::2 --rt-0-not-strict",
     "--rt-type 0 --rt-0-addrs 2001:db8::1,2001:db8::2 --rt-0-not-strict"),
    ("--rt-type 0 --rt-0-addrs ::ffff:1.2.3.4,2001:DB8:0:0:0:0:0:1,::1,::1.2.3.4,::",
     "--rt-type 0 --rt-0-addrs ::ffff:1.2.3.4,2001:db8::1,::1,::1.2.3.4,::"),
    ("", ""),
])
def test_saved_like_ip6tables_legacy(given: str, printed: str) -> None:
    assert saved(given) == printed


@pytest.mark.parametrize(("given", "message"), [
    ("--rt-0-res", "`--rt-type 0' required before `--rt-0-res'"),
    ("--rt-type 1 --rt-0-res", "`--rt-type 0' required before `--rt-0-res'"),
    ("! --rt-type 0 --rt-0-res", "`--rt-type 0' required before `--rt-0-res'"),
    ("--rt-0-res --rt-type 0", "`--rt-type 0' required before `--rt-0-res'"),
    ("--rt-0-addrs 2001:db8::1 --rt-type 0", "`--rt-type 0' required before `--rt-0-addrs'"),
    ("--rt-type 0 --rt-0-not-strict", "`--rt-0-addr ...' required before `--rt-0-not-strict'"),
    ("--rt-type 0 --rt-0-addrs 1,2", "bad address: 1"),
    ("--rt-type 0 --rt-0-addrs " + ",".join(f"{i:x}::" for i in range(1, 18)),
     "too many addresses specified"),
    ("--rt-type 4294967296", "rt-type|invalid"),
    ("--rt-segsleft 3-5", "invalid"),
    ("--rt-type 1 --rt-type 2", "only be used once"),
    ("--rt-type 0 --rt-0-res --rt-0-res", "only be used once"),
    ("! --rt-0-res", "cannot be inverted"),
])
def test_refused_like_ip6tables_legacy(given: str, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        saved(given)


def test_sixteen_addresses_are_allowed() -> None:
    addrs = ",".join(f"{i:x}::" for i in range(1, 17))
    assert saved(f"--rt-type 0 --rt-0-addrs {addrs}") == f"--rt-type 0 --rt-0-addrs {addrs}"


def test_ipv6_only() -> None:
    with pytest.raises(ParseError, match="rt"):
        saved("--rt-type 0", family=4)


@pytest.mark.parametrize(("given", "printed"), [
    ("--fragid 5", "--fragid 5"),
    ("! --fragid 5", "! --fragid 5"),
    ("--fragid 3:", "--fragid 3:4294967295"),
    ("--fragid :7", "--fragid 0:7"),
    ("! --fragid 0:4294967295", ""),
    ("--fragid 0:4294967295", ""),
    ("--fragid 9:3", "--fragid 9:3"),
    ("--fragid 0x10", "--fragid 16"),
    ("--fraglen 8", "--fraglen 8"),
    ("! --fraglen 8", "! --fraglen 8"),
    ("--fragres", "--fragres"),
    ("--fragfirst", "--fragfirst"),
    ("--fragmore", "--fragmore"),
    ("--fraglast", "--fraglast"),
    ("--fraglast --fragfirst --fragres ! --fraglen 3 ! --fragid 1:2",
     "! --fragid 1:2 ! --fraglen 3 --fragres --fragfirst --fraglast"),
    ("", ""),
])
def test_frag_saved_like_ip6tables_legacy(given: str, printed: str) -> None:
    assert saved(given, match="frag") == printed


@pytest.mark.parametrize(("given", "message"), [
    ("--fragmore --fraglast", "cannot be used together"),
    ("! --fragres", "cannot be inverted"),
    ("--fragid 3-5", "invalid"),
    ("--fragid 1 --fragid 2", "only be used once"),
])
def test_frag_refused_like_ip6tables_legacy(given: str, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        saved(given, match="frag")


@pytest.mark.parametrize(("given", "printed"), [
    ("--header hop-by-hop", "--header hop-by-hop"),
    ("--header hop-by-hop --soft", "--header hop-by-hop --soft"),
    ("--header ipv6-nonxt", "--header ipv6-nonxt"),
    ("--header hop,dst,route,frag,auth,esp,none,prot",
     "--header hop-by-hop,ipv6-opts,ipv6-route,ipv6-frag,ah,esp,ipv6-nonxt,protocol"),
    ("! --header 60,43", "! --header ipv6-opts,ipv6-route"),
    ("--header protocol", "--header protocol"),
    ("--header ipv6-opts,hopopt", "--header hop-by-hop,ipv6-opts"),
    ("--header HOPOPT", "--header hop-by-hop"),
    ("--header IPv6-Route", "--header ipv6-route"),
    ("--header 255", "--header protocol"),
    ("! --header esp --soft", "! --header esp --soft"),
])
def test_ipv6header_saved_like_ip6tables_legacy(given: str, printed: str) -> None:
    assert saved(given, match="ipv6header") == printed


@pytest.mark.parametrize(("given", "message"), [
    ("--header tcp", "unknown header `6' specified"),
    ("--header 6", "unknown header `6' specified"),
    ("--header xyz", "unknown header `xyz' specified"),
    ("--soft", "\"--header\" must be specified"),
    ("--header none --header esp", "only be used once"),
    ("--header ,", "cannot parse header names"),
])
def test_ipv6header_refused_like_ip6tables_legacy(given: str, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        saved(given, match="ipv6header")
