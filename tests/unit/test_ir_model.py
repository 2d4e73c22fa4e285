"""IR dataclasses: frozen, hashable, with the small helpers the front ends use."""

from __future__ import annotations

import dataclasses

import pytest

from bpfilter.codegen.uapi import NfHook
from bpfilter.ir.model import (
    Chain,
    Family,
    Match,
    Option,
    Prefix,
    Rule,
    Ruleset,
    Table,
    Target,
    TargetKind,
)


def test_nodes_are_frozen_and_hashable() -> None:
    rule = Rule(matches=(Match("comment", (Option("--comment", "x"),)),), line=3, col=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.line = 4
    assert hash(rule) == hash(Rule(matches=(Match("comment", (Option("--comment", "x"),)),),
                                   line=3, col=1))


def test_prefix_length_and_non_contiguous_masks() -> None:
    assert Prefix(0x0A000000, 0xFF000000, 32).length == 8
    assert Prefix(0, 0, 32).length == 0
    assert Prefix(0x0A000C00, 0xFF00FF00, 32).length is None
    assert Prefix(1, (1 << 128) - 1, 128).length == 128


def test_lookups_and_comment() -> None:
    rule = Rule(matches=(Match("comment", (Option("--comment", "a b"),)),
                         Match("comment", (Option("--comment", "c"),))),
                target=Target(TargetKind.EXTENSION, "LOG", (Option("--log-level", 6),)))
    assert rule.comment == "a b c"
    assert rule.target is not None and rule.target.get("--log-level") == Option("--log-level", 6)
    assert rule.matches[0].get("--nope") is None
    base = Chain("INPUT", (rule,), NfHook.LOCAL_IN, 0, "DROP")
    user = Chain("MINE")
    assert base.is_base and not user.is_base
    table = Table(Family.INET, "fw", (base, user))
    assert table.chain("MINE") is user and table.chain("X") is None
    rs = Ruleset((table,))
    assert rs.table("fw") is table and rs.table("fw", Family.IP) is None
