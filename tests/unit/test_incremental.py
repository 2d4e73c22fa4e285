"""Which changes of a table are map writes only (bpfilter.incremental), with the counter slots
and map entries they take; no kernel."""

from __future__ import annotations

import marshal
import struct

import pytest

from bpfilter.codegen import lookup
from bpfilter.codegen.compiler import compile_ruleset
from bpfilter.grammar.iptables import parse_restore
from bpfilter.incremental import LAYOUT_VERSION, Layout, Rebuild, fresh_layout, plan_change
from bpfilter.ir.model import Ruleset, Table

RUN = 40  # rules of the blocklist (MIN_RUN is 32)


def table(rules: list[str], policy: str = "DROP") -> Table:
    text = "\n".join(["*filter", f":INPUT {policy} [0:0]", ":FORWARD ACCEPT [0:0]",
                      ":OUTPUT ACCEPT [0:0]", ":USER - [0:0]", *rules, "COMMIT", ""])
    t = parse_restore(text).table("filter")
    assert t is not None
    return t


def block(n: int = RUN) -> list[str]:
    return [f"-A INPUT -s 198.19.0.{i + 1}/32 -j {'ACCEPT' if i == 7 else 'DROP'}"
            for i in range(n)]


def layout_of(t: Table, room: int = 100) -> Layout:
    compiled = compile_ruleset(Ruleset((t,)), 4)
    maps = {m.name: room for m in compiled.maps if m.name.startswith("lookup_")}
    return fresh_layout(t, compiled, len(compiled.rule_index) + room, maps)


def key(addr: str) -> bytes:
    return bytes(int(x) for x in addr.split("."))


def test_layout_round_trips_and_refuses_other_versions() -> None:
    t = table(["-A INPUT -p tcp -j ACCEPT", *block()])
    lay = layout_of(t)
    assert lay.policy == {"INPUT": 0, "FORWARD": 42, "OUTPUT": 43}
    assert list(lay.slots["INPUT"]) == list(range(1, 42))
    [seg] = lay.segments["INPUT"]
    assert (seg.start, seg.stop, seg.field, seg.map) == (1, 41, "-s", "lookup_0")
    assert seg.actions == ("-A X -j DROP", "-A X -j ACCEPT")
    again = Layout.loads(lay.dumps())
    assert again is not None and marshal.loads(again.dumps()) == marshal.loads(lay.dumps())
    assert lay.fast == {}  # the run is not the whole chain
    whole = layout_of(table(block())).fast["INPUT"]
    assert (whole.field, whole.bits, whole.length) == ("-s", 32, 32)
    assert whole.rep == "-A INPUT -s 198.19.0.1/32 -j DROP"
    assert whole.keys[7] == 0xC6130008 and list(whole.acts[6:9]) == [0, 1, 0]
    assert Layout.loads(b"\x00garbage") is None
    fields = marshal.loads(lay.dumps())
    assert Layout.loads(marshal.dumps((LAYOUT_VERSION + 1, *fields[1:]))) is None


def test_an_insert_into_a_run_is_one_entry_and_a_new_slot() -> None:
    old = table(["-A INPUT -p tcp -j ACCEPT", *block()])
    lay = layout_of(old)
    new = table(["-A INPUT -p tcp -j ACCEPT", "-A INPUT -s 198.18.0.9 -j DROP", *block()])
    change = plan_change(old, lay, new, 4)
    top = lay.top
    assert change.writes == {"lookup_0": {key("198.18.0.9"): lookup.VALUE.pack(top, 0)}}
    assert change.counters == {top: (0, 0)}
    # Every other rule keeps its slot: the linear rule's counter constant stays right.
    assert list(change.layout.slots["INPUT"]) == [1, top, *range(2, 42)]
    assert change.layout.lag == {"lookup_0": [key("198.18.0.9")]}
    assert change.layout.segments["INPUT"][0].stop == 42


def test_a_duplicate_key_shadowing_an_earlier_rule_rewrites_its_entry() -> None:
    old = table(block())
    lay = layout_of(old)
    new = table(["-A INPUT -s 198.19.0.8 -j DROP", *block()])  # rule 8 of old: ACCEPT
    change = plan_change(old, lay, new, 4)
    assert change.writes == {"lookup_0": {key("198.19.0.8"): lookup.VALUE.pack(lay.top, 0)}}


def test_a_delete_frees_the_slot_one_change_later() -> None:
    old = table(block())
    lay = layout_of(old)
    gone = lay.slots["INPUT"][3]
    rules = block()
    del rules[3]
    one = plan_change(old, lay, table(rules), 4)
    assert one.writes == {"lookup_0": {key("198.19.0.4"): None}}
    assert one.layout.cooling == [gone] and gone not in one.layout.free
    # The next change may hand it out, and rewrites the key the previous change left
    # different in the other copy.
    two = plan_change(table(rules), one.layout, table([*rules, "-A INPUT -s 198.18.1.1 -j DROP"]),
                      4)
    assert two.counters == {gone: (0, 0)}
    assert two.writes["lookup_0"] == {key("198.18.1.1"): lookup.VALUE.pack(gone, 0),
                                      key("198.19.0.4"): None}


def test_actions_keep_the_codes_numbering() -> None:
    old = table(block())
    lay = layout_of(old)
    rules = block()
    del rules[7]  # the only ACCEPT: the run's targets shrink to DROP, still in the code
    one = plan_change(old, lay, table(rules), 4)
    two = plan_change(table(rules), one.layout,
                      table(["-A INPUT -s 198.18.2.2 -j ACCEPT", *rules]), 4)
    [(k, v)] = [(k, v) for k, v in two.writes["lookup_0"].items() if v is not None]
    assert k == key("198.18.2.2") and struct.unpack("<II", v)[1] == 1  # ACCEPT is action 1


@pytest.mark.parametrize(("rules", "why"), [
    ([*block(), "-A INPUT -p udp -j ACCEPT"], "chain INPUT"),  # a rule outside the run
    (["-A INPUT -s 198.18.3.3 -j RETURN", *block()], "new action"),
    (["-A INPUT -s 198.18.3.0/24 -j DROP", *block()], "shape"),  # a trie, not a hash
    (block()[:20], "lookups"),  # too short for a run
])
def test_other_changes_rebuild(rules: list[str], why: str) -> None:
    old = table(block())
    with pytest.raises(Rebuild, match=why):
        plan_change(old, layout_of(old), table(rules), 4)


def test_policies_chains_and_full_maps_rebuild() -> None:
    old = table(block())
    lay = layout_of(old)
    with pytest.raises(Rebuild, match="policies"):
        plan_change(old, lay, table(block(), policy="ACCEPT"), 4)
    more = table(["-A INPUT -s 198.18.4.1 -j DROP", "-A INPUT -s 198.18.4.2 -j DROP", *block()])
    with pytest.raises(Rebuild, match="counter map is full"):
        plan_change(old, layout_of(old, room=1), more, 4)
    tight = layout_of(old)
    tight.map_capacity["lookup_0"] = RUN + 1
    with pytest.raises(Rebuild, match="map lookup_0 is full"):
        plan_change(old, tight, more, 4)


def test_keys_a_killed_change_wrote_are_rewritten() -> None:
    old = table(block())
    lay = layout_of(old)
    new = table([*block(), "-A INPUT -s 198.18.5.5 -j DROP"])
    change = plan_change(old, lay, new, 4, dirty={"lookup_0": [key("198.18.9.9"),
                                                               key("198.19.0.2")]})
    assert change.writes["lookup_0"][key("198.18.9.9")] is None
    assert change.writes["lookup_0"][key("198.19.0.2")] == lookup.VALUE.pack(
        lay.slots["INPUT"][1], 0)
    assert set(change.layout.touched["lookup_0"]) == set(change.writes["lookup_0"])


def test_user_chains_and_explicit_counters() -> None:
    old = table(["-A INPUT -j USER", *[r.replace("-A INPUT", "-A USER") for r in block()]])
    lay = layout_of(old)
    new = table(["-A INPUT -j USER", "-A USER -s 198.18.6.6 -j DROP",
                 *[r.replace("-A INPUT", "-A USER") for r in block()]])
    change = plan_change(old, lay, new, 4, explicit={("USER", 1): (3, 300),
                                                     ("INPUT", 1): (1, 10)})
    assert set(change.writes) == {"lookup_0"}
    assert change.counters == {lay.top: (3, 300), lay.slots["INPUT"][0]: (1, 10)}


def test_blocklist_changes_agree_with_the_full_plan() -> None:
    """A single rule inserted into or deleted from a blocklist chain, worked out on the
    compact form, gives the map writes, slots and text the full plan gives."""
    from bpfilter.incremental import blocklist_change, edit_text
    from bpfilter.ir.iptables_save import to_iptables_save

    old = table(block())
    lay = layout_of(old)
    text = to_iptables_save(Ruleset((old,)))
    cases = [(3, "-A INPUT -s 198.18.7.7/32 -j DROP", 0xC6120707, 0),
             (0, "-A INPUT -s 198.19.0.8/32 -j DROP", 0xC6130008, 0),  # shadows rule 8
             (RUN, "-A INPUT -s 198.18.7.8/32 -j ACCEPT", 0xC6120708, 1),
             (7, None, 0xC6130008, None), (0, None, 0xC6130001, None)]
    for pos, line, k, act in cases:
        rules = block()
        if line is None:
            del rules[pos]
        else:
            rules.insert(pos, line)
        new = table(rules)
        full = plan_change(old, lay, new, 4)
        quick = blocklist_change(lay, "INPUT", pos, k, act)
        assert quick.writes == full.writes, (pos, line)
        assert quick.counters == full.counters
        assert list(quick.layout.slots["INPUT"]) == list(full.layout.slots["INPUT"])
        assert quick.layout.lag == full.layout.lag
        assert (quick.layout.cooling, quick.layout.top) == (full.layout.cooling, full.layout.top)
        b, f = quick.layout.fast["INPUT"], full.layout.fast["INPUT"]
        assert (list(b.keys), list(b.acts)) == (list(f.keys), list(f.acts))  # rep: any rule
        assert edit_text(text, "INPUT", RUN, pos, line) == to_iptables_save(Ruleset((new,)))


def test_a_blocklist_change_rewrites_what_another_chain_left_behind() -> None:
    """After a change in one blocklist chain the other copy of its map lags by that key; a
    change in another blocklist chain (which switches every map's copy) writes it too."""
    from bpfilter.incremental import blocklist_change

    fwd = [r.replace("-A INPUT", "-A FORWARD").replace("198.19.", "198.18.") for r in block()]
    old = table([*block(), *fwd])
    lay = layout_of(old)
    assert set(lay.fast) == {"INPUT", "FORWARD"}
    one_rules = [*block()[1:], *fwd]  # rule 1 of INPUT deleted
    one = blocklist_change(lay, "INPUT", 0, 0xC6130001, None)
    assert one.writes == plan_change(old, lay, table(one_rules), 4).writes
    two_rules = [*block()[1:], "-A FORWARD -s 198.18.9.9 -j DROP", *fwd]
    two = blocklist_change(one.layout, "FORWARD", 0, 0xC6120909, 0)
    full = plan_change(table(one_rules), one.layout, table(two_rules), 4)
    assert two.writes == full.writes
    assert two.writes["lookup_0"] == {key("198.19.0.1"): None}  # INPUT's lagging key
    assert two.layout.lag == full.layout.lag == {"lookup_1": [key("198.18.9.9")]}
