"""State in bpffs and the dispatcher switch: text maps, generations, parity slots, test runs
through the dispatcher, leftovers of interrupted runs, counters carried over, flush."""

from __future__ import annotations

import struct
import subprocess
import time
from collections.abc import Iterator

import pytest

from bpfilter import bpf, bpffs, loader, state, testbed
from bpfilter.codegen import lookup
from bpfilter.codegen.compiler import compile_ruleset
from bpfilter.codegen.uapi import NfHook
from bpfilter.dispatch import (
    CTL_SPEC,
    PROGS_SPEC,
    Dispatch,
    TableKey,
    load_dispatcher,
    next_generation,
    open_dispatch,
    pin_name,
)
from bpfilter.grammar.iptables import parse_restore
from bpfilter.ir.iptables_save import to_iptables_save
from bpfilter.ir.model import Ruleset

FILTER = TableKey(4, "filter")
# Generations of two rebuilds in a row (bpfilter.dispatch.next_generation).
FIRST = next_generation(0, rebuild=True)
SECOND = next_generation(FIRST, rebuild=True)
UDP_FROM_1 = bytes.fromhex("4500001c0000000040110000c6120001c6120002") + bytes(8)


def _text(rules: str, policy: str = "ACCEPT") -> str:
    return f"*filter\n:INPUT {policy} [0:0]\n{rules}COMMIT\n"


def _commit(ns: str, text: str, **kw: object) -> int:
    ruleset = parse_restore(text)
    programs = loader.load_programs(compile_ruleset(ruleset, 4))
    try:
        return state.commit(FILTER, programs, to_iptables_save(ruleset), ns,
                            table=ruleset.tables[0], **kw)  # type: ignore[arg-type]
    finally:
        programs.close()


@pytest.fixture
def ns() -> Iterator[str]:
    name = testbed.unique_name("bpfh")
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        yield name
    finally:
        testbed.delete(name)


def test_text_round_trips_through_an_array_map() -> None:
    text = "".join(f"-A INPUT -s 198.18.{i // 256}.{i % 256}/32 -j DROP\n" for i in range(3000))
    text += "ünïcode \udcff\n"  # surrogate-escaped bytes survive too
    with state.store_text(text) as m:
        assert m.spec.max_entries > 1
        assert state.load_text(m) == text
    with state.store_text("") as m:
        assert state.load_text(m) == ""


def test_dispatcher_switches_by_parity_and_falls_through_to_accept() -> None:
    drop = parse_restore(_text("-A INPUT -s 198.18.0.1 -j DROP\n"))
    with bpf.map_create(CTL_SPEC) as ctl, bpf.map_create(PROGS_SPEC) as progs, \
            load_dispatcher(NfHook.LOCAL_IN, ctl, progs) as disp:
        d = Dispatch(FILTER, None, ctl, progs)
        ctx = loader.hook_context(NfHook.LOCAL_IN, 4)
        frame = loader.test_run_data(UDP_FROM_1, NfHook.LOCAL_IN, 4)

        def verdict() -> int:
            return bpf.prog_test_run(disp, frame, ctx_in=ctx).retval

        assert d.generation() == 0 and verdict() == 1  # empty slot: ACCEPT
        programs = loader.load_programs(compile_ruleset(drop, 4))
        try:
            prog = next(iter(programs.progs.values()))
            d.stage(1, {NfHook.LOCAL_IN: prog})
            assert verdict() == 1  # staged, not yet in force
            assert d.prog_id(1, NfHook.LOCAL_IN) == prog.id
            with pytest.raises(ValueError, match="parity"):
                d.stage(0, {})
            d.switch(1)
            assert verdict() == 0
            d.stage(2, {})  # a generation without programs: every slot empty
            assert verdict() == 0
            d.switch(2)
            assert verdict() == 1
            assert d.prog_id(2, NfHook.LOCAL_IN) is None
        finally:
            programs.close()


def test_commit_pins_state_and_reads_it_back(ns: str) -> None:
    text = _text("-A INPUT -p udp -j ACCEPT\n", policy="DROP")
    assert _commit(ns, text) == FIRST
    assert _commit(ns, text) == SECOND
    names = {p.name for p in bpffs.pins(ns)}
    assert names == {state.OWNER_PIN} | {pin_name(FILTER, n) for n in (
        "ctl", "progs", "link-INPUT", "link-FORWARD", "link-OUTPUT", f"g{SECOND}-text",
        f"g{SECOND}-layout", f"g{SECOND}-map-counters")}
    assert bpffs.pin_dir(ns, create=False).stat().st_mode & 0o777 == 0o700
    live = state.live_table(FILTER, ns)
    assert live is not None and live.generation == SECOND
    assert live.text == to_iptables_save(parse_restore(text))
    assert set(live.prog_ids) == {"INPUT"}
    assert state.tables(ns) == [FILTER] and state.tables(ns, 6) == []
    [st] = state.status(ns)
    assert (st.generation, st.rules, [p.chain for p in st.programs]) == (SECOND, 1, ["INPUT"])
    assert [m[0] for m in st.maps] == ["counters"]


def test_leftovers_of_an_interrupted_commit_are_ignored_then_removed(ns: str) -> None:
    _commit(ns, _text("-A INPUT -j DROP\n"))
    # What a run killed after pinning the next generation but before the switch leaves.
    with state.store_text("garbage") as m:
        bpffs.pin(m, pin_name(FILTER, f"g{SECOND}-text"), ns)
    live = state.live_table(FILTER, ns)
    assert live is not None and live.generation == FIRST
    assert "-A INPUT -j DROP" in live.text
    _commit(ns, _text("-A INPUT -j ACCEPT\n"))
    live = state.live_table(FILTER, ns)
    assert live is not None and live.generation == SECOND and "-j ACCEPT" in live.text
    assert not any(f"-g{FIRST}-" in p.name for p in bpffs.pins(ns))


def test_counters_are_seeded_before_the_switch(ns: str) -> None:
    text = _text("-A INPUT -s 198.18.0.1 -j DROP\n-A INPUT -s 198.18.0.2 -j DROP\n")
    _commit(ns, text, carry={("filter", "INPUT", 2): (5, 500), ("filter", "INPUT", 0): (1, 2)})
    live = state.live_table(FILTER, ns)
    assert live is not None
    counts = live.counters()
    assert counts[("filter", "INPUT", 2)] == (5, 500)
    assert counts[("filter", "INPUT", 1)] == (0, 0)
    table = state.with_counters(live)
    assert table.chains[0].counters == (1, 2)
    assert table.chains[0].rules[1].counters == (5, 500)


def test_flush_removes_everything_and_detaches(ns: str) -> None:
    _commit(ns, _text("-A INPUT -j DROP\n"))
    links = {i for i in bpf.link_ids()}
    assert state.flush(ns) == [FILTER]
    assert bpffs.pins(ns) == []
    assert open_dispatch(FILTER, ns) is None
    assert state.live_ruleset(ns, 4) == Ruleset()
    assert len(links - set(bpf.link_ids())) == 3  # the three dispatchers' links went away
    assert state.flush(ns) == []  # nothing left: no error


def test_programs_live_on_in_the_pinned_prog_array_after_their_fds_close(ns: str) -> None:
    _commit(ns, _text("-A INPUT -j DROP\n"))
    # _commit closed every fd it had; only the pins hold the prog_array and so the program.
    d = open_dispatch(FILTER, ns)
    assert d is not None
    with d.ctl, d.progs:
        gen = d.generation()
        assert d.prog_id(gen, NfHook.LOCAL_IN) is not None
        assert struct.unpack("<I", d.ctl.lookup(struct.pack("<I", 0)) or b"")[0] == gen == FIRST


def test_pins_of_a_namespace_deleted_and_created_again_are_dropped(ns: str) -> None:
    _commit(ns, _text("-A INPUT -j DROP\n"))
    assert not state.stale(ns)
    mine = set()
    for chain in FILTER.hooks:
        with bpf.link_from_fd(bpffs.get(pin_name(FILTER, f"link-{chain}"), ns)) as link:
            mine.add(link.id)
    subprocess.run(["ip", "netns", "del", ns], check=True, timeout=10)
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    assert state.stale(ns)
    assert state.live_table(FILTER, ns) is None and state.status(ns) == []
    assert _commit(ns, _text("-A INPUT -j ACCEPT\n")) == FIRST  # starts afresh
    assert not state.stale(ns)
    live = state.live_table(FILTER, ns)
    assert live is not None and "-j ACCEPT" in live.text
    # The old dispatchers' links went with their pins (released by a kernel work item).
    deadline = time.monotonic() + 5
    while mine & set(bpf.link_ids()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not mine & set(bpf.link_ids())


def test_a_layout_is_kept_only_for_programs_reading_the_tables_switch(ns: str) -> None:
    """Map-only changes flip the copy bit in the table's ctl: programs linked to a private
    ctl (loaded for a test run, say) would never see them, so no layout is stored for them
    and every later change rebuilds."""
    rules = "".join(f"-A INPUT -s 198.18.1.{i}/32 -j DROP\n" for i in range(1, 41))
    ruleset = parse_restore(_text(rules))
    compiled = compile_ruleset(ruleset, 4)
    assert any(m.name == lookup.CTL_MAP for m in compiled.maps)
    gen = _commit(ns, _text(rules))
    assert not bpffs.pin_path(pin_name(FILTER, f"g{gen}-layout"), ns).exists()
    live = state.live_table(FILTER, ns)
    assert live is not None and live.layout is None
    with state.switch_map(FILTER, ns) as ctl:
        programs = loader.load_programs(compiled, {lookup.CTL_MAP: ctl})
    try:
        gen = state.commit(FILTER, programs, to_iptables_save(ruleset), ns,
                           table=ruleset.tables[0])
    finally:
        programs.close()
    live = state.live_table(FILTER, ns)
    assert live is not None and live.generation == gen and live.layout is not None
    assert live.layout.fast["INPUT"].keys[0] == 0xC6120101
    assert live.counters()[("filter", "INPUT", 40)] == (0, 0)
