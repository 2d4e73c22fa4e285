"""Lookup blocks: map specs and contents of optimizer runs, the emitted lookup, and how the
compiler uses them (no kernel)."""

from __future__ import annotations

import struct

import pytest

from bpfilter.codegen import lookup
from bpfilter.codegen.asm import Label
from bpfilter.codegen.compiler import RESERVED_MAPS, compile_ruleset
from bpfilter.codegen.insn import Insn
from bpfilter.codegen.matchers import Emitter
from bpfilter.codegen.uapi import MAX_USED_MAPS, MapFlag, MapType
from bpfilter.grammar.iptables import parse_restore
from bpfilter.ir.model import Match, Option, PortRange, Prefix, Rule, Target, TargetKind
from bpfilter.ir.optimizer import Classifier, KeyField, build_classifier, build_run

ACCEPT = Target(TargetKind.VERDICT, "ACCEPT")
DROP = Target(TargetKind.VERDICT, "DROP")
U32 = 0xFFFFFFFF


def _run4() -> lookup.Run:
    # A /24 inside the /16 of a later rule: it keeps its own entry (it answers rule 0, the
    # /16 around it rule 1).
    rules = [Rule(src=Prefix(0xC6120100, 0xFFFFFF00, 32), target=ACCEPT),
             Rule(src=Prefix(0xC6120000, 0xFFFF0000, 32), target=DROP),
             Rule(src=Prefix(0xC6120180, 0xFFFFFF80, 32), target=DROP)]  # shadowed: no entry
    return build_run(rules, KeyField.SRC, start=3)


def test_prefix_map_is_an_lpm_trie_sized_to_its_entries() -> None:
    spec = lookup.map_spec("lookup_0", _run4())
    assert spec.type == MapType.LPM_TRIE
    assert spec.flags == MapFlag.NO_PREALLOC
    assert (spec.key_size, spec.value_size, spec.max_entries) == (8, 8, 2)


def test_prefix_contents_encode_length_address_counter_action() -> None:
    contents = dict(lookup.map_contents(_run4(), first_index=10))
    # value: counter index, action number (ACCEPT 0, DROP 1)
    assert contents == {
        struct.pack("<I", 24) + bytes([198, 18, 1, 0]): struct.pack("<II", 10, 0),
        struct.pack("<I", 16) + bytes([198, 18, 0, 0]): struct.pack("<II", 11, 1),
    }


def test_host_runs_use_a_hash_keyed_by_the_address() -> None:
    full = (1 << 128) - 1
    run = build_run([Rule(src=Prefix(0x20010DB8 << 96 | k, full, 128), target=DROP)
                     for k in range(3)], KeyField.SRC)
    spec = lookup.map_spec("h", run)
    assert (spec.type, spec.key_size, spec.max_entries, spec.flags) == (MapType.HASH, 16, 3, 0)
    assert dict(lookup.map_contents(run, 1))[bytes.fromhex("20010db8") + bytes(11) + b"\2"] \
        == struct.pack("<II", 3, 0)
    em = Emitter(6, "r", "r:fail", "r:hot")
    lookup.emit_lookup(em, run, "h")
    stores = [it for it in em.items if isinstance(it, Insn) and it.dst == 10]
    assert [i.off for i in stores] == [-24, -20, -16, -12]  # no prefix length in the key


def test_ipv6_and_protocol_maps() -> None:
    full = (1 << 128) - 1
    v6 = build_run([Rule(dst=Prefix(0x20010DB8 << 96, full << 64 & full, 128), target=DROP)],
                   KeyField.DST)
    # One prefix length: a hash keyed by the address masked to it.
    spec = lookup.map_spec("v6", v6)
    assert (spec.type, spec.key_size) == (MapType.HASH, 16)
    ((key, _),) = lookup.map_contents(v6, 0)
    assert key == bytes.fromhex("20010db8") + bytes(12)
    # Two lengths: a trie keyed by length + address.
    v6 = build_run([Rule(dst=Prefix(0x20010DB8 << 96, full << 64 & full, 128), target=DROP),
                    Rule(dst=Prefix(0x20010DB9 << 96, full << 96 & full, 128), target=DROP)],
                   KeyField.DST)
    spec = lookup.map_spec("v6", v6)
    assert (spec.type, spec.key_size) == (MapType.LPM_TRIE, 20)
    assert struct.pack("<I", 64) + bytes.fromhex("20010db8") + bytes(12) in dict(
        lookup.map_contents(v6, 0))
    proto = build_run([Rule(proto=47, target=DROP), Rule(proto=50, target=ACCEPT)],
                      KeyField.PROTO)
    spec = lookup.map_spec("p", proto)
    assert (spec.type, spec.key_size, spec.max_entries, spec.flags) == (MapType.HASH, 4, 2, 0)
    assert dict(lookup.map_contents(proto, 5)) == {
        struct.pack("<I", 47): struct.pack("<II", 5, 0),
        struct.pack("<I", 50): struct.pack("<II", 6, 1)}


@pytest.mark.parametrize(("family", "field", "loads"), [
    (4, KeyField.SRC, 1), (6, KeyField.DST, 4), (4, KeyField.PROTO, 1), (6, KeyField.PROTO, 2)])
def test_emit_lookup_builds_the_key_and_jumps_to_fail_on_a_miss(
        family: int, field: KeyField, loads: int) -> None:
    bits = 32 if family == 4 else 128
    full = (1 << bits) - 1  # a host: a hash keyed by the whole address (a load per word)
    if field is KeyField.PROTO:
        rule = Rule(proto=6, target=DROP)
    elif field is KeyField.SRC:
        rule = Rule(src=Prefix(0, full, bits), target=DROP)
    else:
        rule = Rule(dst=Prefix(0, full, bits), target=DROP)
    run = build_run([rule], field)
    em = Emitter(family, "r", "r:fail", "r:hot")
    lookup.emit_lookup(em, run, "lookup_7")
    insns = [it for it in em.items if isinstance(it, Insn)]
    # One lookup per copy of the map (lookup.buffer_names), each failing on a miss.
    assert [i.ref for i in insns if i.ref and i.ref.startswith("lookup_7")] == \
        ["lookup_7", "lookup_7_b"]
    assert sum(1 for i in insns if i.ref == "r:fail") == 2
    # The key's loads from the meta area, and the copy bit.
    assert sum(1 for i in insns if i.src == 7 and i.off >= 0 and i.opcode & 0x07 == 0x01) == \
        loads + 1
    assert em.used_hotdrop == (field is KeyField.PROTO and family == 6)
    assert [it.name for it in em.items if isinstance(it, Label)] == ["r:copy11", "r:copied2"]


def _ruleset(rules: list[str], chains: str = "") -> str:
    head = ["*filter", ":INPUT DROP [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    head += [f":{c} - [0:0]" for c in chains.split()]
    return "\n".join([*head, *rules, "COMMIT", ""])


BLOCK = [f"-A INPUT -s 198.18.{i}.0/24 -j {'DROP' if i % 3 else 'ACCEPT'}" for i in range(10)]


def test_compiler_emits_one_lookup_per_run_and_keeps_counters_per_rule() -> None:
    text = _ruleset(["-A INPUT -p tcp -j ACCEPT", *BLOCK, "-A INPUT -j DROP"])
    compiled = compile_ruleset(parse_restore(text), 4, min_run=4)
    assert [m.name for m in compiled.maps] == ["counters", "ctl", "lookup_0", "lookup_0_b"]
    assert compiled.maps[0].max_entries == 15  # 3 policies + 12 rules: one counter each
    (table, chain, run, name) = compiled.lookups[0]
    assert (table, chain, run.start, run.stop, name) == ("filter", "INPUT", 1, 11, "lookup_0")
    values = sorted(struct.unpack("<II", v) for _, v in compiled.contents["lookup_0"])
    assert values == [(2 + i, 0 if i % 3 == 0 else 1) for i in range(10)]


def test_optimize_off_and_user_chain_maps_shared_between_programs() -> None:
    text = _ruleset([*[r.replace("-A INPUT", "-A BLOCK") for r in BLOCK],
                     "-A INPUT -j BLOCK", "-A OUTPUT -j BLOCK"], chains="BLOCK")
    compiled = compile_ruleset(parse_restore(text), 4, min_run=4)
    assert [m.name for m in compiled.maps] == ["counters", "ctl", "lookup_0", "lookup_0_b"]
    assert len(compiled.programs) == 2
    plain = compile_ruleset(parse_restore(text), 4, optimize=False)
    assert [m.name for m in plain.maps] == ["counters"] and not plain.contents
    assert plain.rule_index == compiled.rule_index


def test_short_runs_stay_linear() -> None:
    compiled = compile_ruleset(parse_restore(_ruleset(BLOCK[:3])), 4)
    assert not compiled.lookups
    assert compile_ruleset(parse_restore(_ruleset(BLOCK[:3])), 4, min_run=2).lookups


def _classifier() -> Classifier:
    tcp = Match("tcp", (Option("--dport", PortRange(20, 29)),))
    rules = [Rule(src=Prefix(0xC6120000 + k, U32, 32), proto=6, matches=(tcp,),
                  target=DROP if k % 2 else ACCEPT) for k in range(70)]
    rules.append(Rule(dst=Prefix(0xC6120000, 0xFFFF0000, 32), target=ACCEPT))
    return build_classifier(rules, start=2)


def test_classifier_maps_are_sized_and_filled() -> None:
    cls = _classifier()
    maps = {spec.name: (spec, dict(contents))
            for spec, contents in lookup.classifier_maps("cls0", cls, first_index=9)}
    assert list(maps) == [f"cls0_{k}" for k in lookup.CLASSIFIER_MAPS]
    src, src_items = maps["cls0_src"]
    assert (src.type, src.key_size, src.value_size, src.flags) == (
        MapType.LPM_TRIE, 8, 16, MapFlag.NO_PREALLOC)
    assert src.max_entries == 71  # 70 /32s and the /0 of the last rule
    bitmap = src_items[struct.pack("<I", 32) + bytes([198, 18, 0, 5])]
    assert int.from_bytes(bitmap, "little") == (1 << 5) | (1 << 70)
    didx, didx_items = maps["cls0_didx"]
    assert (didx.type, didx.max_entries, didx.value_size) == (MapType.ARRAY, 65536, 4)
    intervals = [struct.unpack("<I", didx_items[struct.pack("<I", p)])[0] for p in (19, 20, 29, 30)]
    assert intervals == [0, 1, 1, 2]
    dbits = maps["cls0_dbits"][1]
    assert len(dbits) == 4  # three intervals and "every rule"
    assert int.from_bytes(dbits[struct.pack("<I", 3)], "little") == (1 << 71) - 1
    acts = maps["cls0_acts"][1]
    # flags: 1 the rule tests ports, 2 it has -p
    assert struct.unpack("<III", acts[struct.pack("<I", 1)]) == (10, 1, 3)
    assert struct.unpack("<III", acts[struct.pack("<I", 70)]) == (79, 0, 0)
    assert maps["cls0_proto"][0].max_entries == 513


def test_emit_classifier_scans_every_word_once() -> None:
    cls = _classifier()
    names = {k: f"c_{k}" for k in lookup.CLASSIFIER_MAPS}
    em = Emitter(4, "r", "r:fail", "r:hot")
    lookup.emit_classifier(em, cls, names)
    insns = [it for it in em.items if isinstance(it, Insn)]
    assert sorted(i.ref for i in insns if i.ref in names.values()) == sorted(names.values())
    assert em.used_hotdrop
    # The word loop: one 64-bit load per word and per field (offsets 0 and 8 here).
    dw_loads = [i.off for i in insns if i.opcode == 0x79 and i.off in (0, 8) and i.src != 10]
    assert sorted(dw_loads) == [0] * 5 + [8] * 5


def test_port_run_looks_the_port_up_after_the_rest_of_the_match() -> None:
    text = _ruleset([f"-A INPUT -p udp -m udp --sport 53 --dport {p} -j DROP"
                     for p in (1, 2, 3, 4, 5)])
    compiled = compile_ruleset(parse_restore(text), 4, min_run=4)
    ((_, _, run, name),) = compiled.lookups
    assert run.field is KeyField.DPORT
    spec = next(m for m in compiled.maps if m.name == name)
    assert (spec.type, spec.key_size, spec.max_entries) == (MapType.HASH, 4, 5)
    (program,) = compiled.programs
    insns = [it for it in program.items if isinstance(it, Insn)]
    lookup_at = next(i for i, it in enumerate(insns) if it.ref == name)
    # The shared --sport 53 test (a compare with 53) comes before the lookup.
    assert any(it.imm == 53 for it in insns[:lookup_at])
    assert not any(it.imm == 53 for it in insns[lookup_at:])


def _many_runs(groups: int) -> str:
    rules = []
    for g in range(groups):
        size = 4 + g % 5  # runs of 4..8 rules, separated by a counting rule
        rules += [f"-A INPUT -s 198.18.{g}.{i} -j DROP" for i in range(size)]
        rules.append(f"-A INPUT -d 198.19.{g}.0/24")
    return _ruleset(rules)


def test_runs_beyond_the_map_limit_stay_linear_largest_kept() -> None:
    compiled = compile_ruleset(parse_restore(_many_runs(80)), 4, min_run=4)
    sizes = sorted(len(run.rules) for _, _, run, _ in compiled.lookups)
    # counters, the switch and the reserve for matches/targets; a run's map has two copies
    lookups = (MAX_USED_MAPS - 2 - RESERVED_MAPS) // 2
    assert len(compiled.maps) == 2 * lookups + 2
    assert len(sizes) == lookups == 27
    # 16 runs of each size 4..8: the 27 largest are the 16 of 8 rules and 11 of 7.
    assert sizes == [7] * 11 + [8] * 16


def test_interface_run_keys_are_nul_padded_names() -> None:
    text = _ruleset([f"-A INPUT -i {n} -j DROP" for n in ("eth0", "lo", "wg0", "br-lan")])
    compiled = compile_ruleset(parse_restore(text), 4, min_run=4)
    ((_, _, run, name),) = compiled.lookups
    assert run.field is KeyField.IIF
    spec = next(m for m in compiled.maps if m.name == name)
    assert (spec.type, spec.key_size, spec.max_entries) == (MapType.HASH, 16, 4)
    assert compiled.contents[name][1] == (b"lo" + bytes(14), struct.pack("<II", 2, 0))
    assert compiled.needs_conntrack is False and compiled.programs[0].needs.devices
    em = Emitter(4, "r", "r:fail", "r:hot")
    lookup.emit_lookup(em, run, name)
    byte_loads = [it for it in em.items if isinstance(it, Insn) and it.opcode == 0x71]
    assert len(byte_loads) == 15  # the 16th byte of a name is always its NUL
