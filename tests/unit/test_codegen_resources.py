"""Maps shared by matches and targets (codegen/matchers.Resources) and the target table."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bpfilter.codegen.actions import actions
from bpfilter.codegen.compiler import CompileError, compile_ruleset
from bpfilter.codegen.matchers import Emitter, Resources
from bpfilter.codegen.spec import MapSpec
from bpfilter.codegen.uapi import MapType
from bpfilter.grammar.iptables import parse_restore
from bpfilter.ir.model import Target, TargetKind


def test_slots_are_stable_per_rule_and_sized_at_the_end() -> None:
    res = Resources()
    a = Emitter(4, "INPUT#1", "f", "h", res=res, table="filter")
    b = Emitter(4, "X#3", "f", "h", res=res, table="filter")
    assert (a.state("limit", 16), a.state("limit", 16), b.state("limit", 16)) == (0, 1, 2)
    # The same rule emitted again (its chain called from another built-in chain): same slots.
    again = Emitter(4, "INPUT#1", "f", "h", res=res, table="filter")
    assert (again.state("limit", 16), again.state("limit", 16)) == (0, 1)
    raw = Emitter(4, "INPUT#1", "f", "h", res=res, table="raw")
    assert raw.state("limit", 16) == 3
    (spec,) = res.all_specs()
    assert (spec.name, spec.type, spec.key_size, spec.value_size, spec.max_entries) == (
        "limit", MapType.ARRAY, 4, 16, 4)
    with pytest.raises(ValueError, match="16-byte values"):
        res.slot("limit", 8, "other")


def test_shared_maps_are_declared_once() -> None:
    res = Resources()
    ring = MapSpec("log_events", MapType.RINGBUF, 0, 0, 1 << 16)
    assert res.shared(ring) == res.shared(ring) == "log_events"
    assert len(res) == 1 and res.all_specs() == [ring]
    with pytest.raises(ValueError, match="declared twice differently"):
        res.shared(MapSpec("log_events", MapType.RINGBUF, 0, 0, 1 << 17))
    with pytest.raises(ValueError, match="already declared"):
        res.slot("log_events", 8, "k")


def test_unknown_extension_target_is_refused_by_name() -> None:
    """A target the front end knows but no codegen module compiles: refused with its line."""
    ruleset = parse_restore("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n")
    (table,) = ruleset.tables
    chain = table.chain("INPUT")
    assert chain is not None
    rule = replace(chain.rules[0], target=Target(TargetKind.EXTENSION, "CHECKSUM"))
    chains = tuple(replace(c, rules=(rule,)) if c is chain else c for c in table.chains)
    assert "CHECKSUM" not in actions()
    with pytest.raises(CompileError, match="line 3: target 'CHECKSUM' is not supported"):
        compile_ruleset(replace(ruleset, tables=(replace(table, chains=chains),)), 4)
