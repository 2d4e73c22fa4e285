"""codegen/sets: set types, element keys and how `-m set` compiles (no kernel needed)."""

from __future__ import annotations

import struct

import pytest

from bpfilter.codegen.compiler import CompileError, compile_ruleset
from bpfilter.codegen.sets import (
    DEFAULT_MAXELEM,
    HEAD_BITS,
    MAP_NAMES,
    SetError,
    SetType,
    check_name,
    key_size,
)
from bpfilter.codegen.uapi import MapFlag, MapType
from bpfilter.grammar.iptables import parse_restore


def test_key_layout() -> None:
    assert (key_size(4), key_size(6)) == (12, 24)
    (key,) = SetType("hash:ip", 4).keys("198.18.0.1")
    assert key == struct.pack("<I", HEAD_BITS + 32) + bytes(4) + bytes([198, 18, 0, 1])
    (key,) = SetType("hash:net,port", 4).keys("198.18.0.0/16,udp:53")
    assert key == struct.pack("<I", HEAD_BITS + 16) + struct.pack("!HBB", 53, 17, 0) + \
        bytes([198, 18, 0, 0])
    (key,) = SetType("hash:ip,port", 6).keys("2001:db8::1,sctp:9")
    assert len(key) == key_size(6) and key[4:8] == struct.pack("!HBB", 9, 132, 0)


def test_the_map_describes_the_set() -> None:
    for kind in MAP_NAMES:
        for family in (4, 6):
            t = SetType(kind, family, 100)
            spec = t.spec()
            assert (spec.type, spec.flags, spec.max_entries) == \
                (MapType.LPM_TRIE, MapFlag.NO_PREALLOC, 100)
            assert SetType.of_map(spec.name, spec.key_size, spec.max_entries) == t
    assert SetType.of_map("counters", 12, 1) is None
    assert SetType("hash:ip", 4).maxelem == DEFAULT_MAXELEM


@pytest.mark.parametrize(("kind", "family", "element", "printed"), [
    ("hash:ip", 4, "198.18.0.1", ["198.18.0.1"]),
    ("hash:ip", 4, "198.18.0.4/31", ["198.18.0.4", "198.18.0.5"]),
    ("hash:net", 4, "198.18.0.7/24", ["198.18.0.0/24"]),
    ("hash:net", 4, "198.18.0.7", ["198.18.0.7"]),
    ("hash:net", 6, "2001:db8::/32", ["2001:db8::/32"]),
    ("hash:ip,port", 4, "198.18.0.1,22", ["198.18.0.1,tcp:22"]),
    ("hash:ip,port", 4, "198.18.0.1,udp:53-54", ["198.18.0.1,udp:53", "198.18.0.1,udp:54"]),
    ("hash:ip,port", 4, "198.18.0.1,https", ["198.18.0.1,tcp:443"]),
    ("hash:ip,port", 4, "198.18.0.1,ftp-data", ["198.18.0.1,tcp:20"]),
    ("hash:net,port", 6, "2001:db8::/48,udplite:7", ["2001:db8::/48,udplite:7"]),
])
def test_elements_round_trip(kind: str, family: int, element: str, printed: list[str]) -> None:
    t = SetType(kind, family)
    assert [t.format_key(k) for k in t.keys(element)] == printed


@pytest.mark.parametrize(("kind", "family", "element", "message"), [
    ("hash:ip", 4, "198.18.0.1,22", "elements are ADDR"),
    ("hash:ip,port", 4, "198.18.0.1", "ADDR,"),
    ("hash:ip,port", 4, "198.18.0.1,icmp:8", "protocol 'icmp'"),
    ("hash:ip,port", 4, "198.18.0.1,70000", "invalid port"),
    ("hash:ip", 4, "2001:db8::1", "not an inet address"),
    ("hash:ip", 6, "2001:db8::/64", "more than"),
    ("hash:net", 4, "0.0.0.0/0", "/0"),
    ("hash:net", 4, "198.18.0.1-198.18.0.9", "invalid inet address"),
])
def test_elements_refused(kind: str, family: int, element: str, message: str) -> None:
    with pytest.raises(SetError, match=message):
        SetType(kind, family).keys(element)


def test_types_and_names_refused() -> None:
    with pytest.raises(SetError, match="not supported"):
        SetType("hash:ip,port,ip", 4)
    with pytest.raises(SetError, match="maxelem"):
        SetType("hash:ip", 4, 0)
    for bad in ("", "a/b", "x" * 32, ".."):
        with pytest.raises(SetError):
            check_name(bad)


def ruleset(*rules: str) -> str:
    return "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                      ":OUTPUT ACCEPT [0:0]", *rules, "COMMIT", ""])


def test_one_map_per_set_opened_by_pin() -> None:
    c = compile_ruleset(parse_restore(ruleset(
        "-A INPUT -m set --match-set a src -j DROP",
        "-A INPUT -m set ! --match-set b dst,dst -j DROP",
        "-A OUTPUT -m set --match-set a dst -j DROP")), 4)
    pinned = {s.pin: s for s in c.maps if s.pin is not None}
    assert set(pinned) == {"a", "b"}
    assert pinned["a"].line == 5 and pinned["b"].line == 6
    assert all(s.key_size == key_size(4) and s.type == MapType.LPM_TRIE
               for s in pinned.values())


def test_unsupported_set_options_refused_by_name() -> None:
    for opt in ("--return-nomatch", "--update-counters", "! --update-subcounters"):
        text = ruleset(f"-A INPUT -m set --match-set a src {opt} -j DROP")
        name = opt.removeprefix("! ")
        with pytest.raises(CompileError, match=f"line 5: match 'set' option '{name}'"):
            compile_ruleset(parse_restore(text), 4)
