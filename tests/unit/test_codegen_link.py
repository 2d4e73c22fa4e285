"""The link pass: labels, subprogram calls, maps, kfuncs, annotations and its errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bpfilter.codegen import asm
from bpfilter.codegen.asm import Label
from bpfilter.codegen.insn import FP, R0, R1, R2, Insn, decode
from bpfilter.codegen.link import LinkError, link
from bpfilter.codegen.opcodes import Size


def test_forward_and_backward_jumps() -> None:
    prog = [
        Label("top"),
        asm.mov64(R0, 0),
        asm.jeq(R1, 0, "out"),  # slot 1 -> 4: off 2
        asm.ld_imm64(R2, 1),  # two slots
        Label("out"),
        asm.jne(R1, 1, "top"),  # slot 4 -> 0: off -5
        asm.exit_(),
    ]
    linked = link(prog)
    assert linked.insns[1].off == 2
    assert linked.insns[3].off == -5
    assert len(linked) == 6
    assert linked.labels == {"top": 0, "out": 4}
    assert all(i.ref is None for i in linked.insns)
    assert decode(linked.code) == linked.insns


def test_gotol_call_and_func_offsets_go_in_imm() -> None:
    prog = [asm.gotol("end"), asm.call_local("sub"), asm.ld_func(R2, "sub"),
            Label("sub"), Label("end"), asm.exit_()]
    linked = link(prog)
    assert [i.imm for i in linked.insns[:2]] == [3, 2]
    assert linked.insns[2].imm == 1  # like calls: relative to the first slot, plus one
    back = link([Label("sub"), asm.exit_(), asm.ld_func(R2, "sub")])
    assert back.insns[1].imm == (-2) & 0xFFFFFFFF


def test_maps_resolve_to_fds_keeping_value_offsets() -> None:
    prog = [asm.ld_map_fd(R1, "a"), asm.ld_map_value(R2, "b", 16), asm.exit_()]
    linked = link(prog, maps={"a": 7, "b": 9})
    assert linked.insns[0].imm == 7
    assert linked.insns[1].imm == (16 << 32) | 9
    assert linked.relocations == []


def test_unresolved_maps_become_relocations() -> None:
    prog = [asm.mov64(R0, 0), asm.ld_map_fd(R1, "a"), asm.ld_map_value(R2, "b"), asm.exit_()]
    linked = link(prog)
    assert linked.relocations == [(1, "a"), (3, "b")]
    assert linked.insns[1].ref == "a" and linked.insns[1].imm == 0


def test_kfuncs_resolve_to_btf_ids() -> None:
    linked = link([asm.call_kfunc("bpf_dynptr_from_skb"), asm.exit_()],
                  kfuncs={"bpf_dynptr_from_skb": 12345})
    assert (linked.insns[0].src, linked.insns[0].imm) == (2, 12345)


def test_annotations_follow_slots() -> None:
    prog = [asm.ld_imm64(R1, 5, comment="rule 1"), asm.mov64(R0, 1, comment="rule 2"),
            asm.exit_()]
    assert link(prog).annotations == {0: "rule 1", 2: "rule 2"}


def test_dump_shows_comments_and_unresolved_maps() -> None:
    linked = link([asm.ld_map_fd(R1, "m", comment="-A INPUT -j DROP"), asm.exit_()])
    assert linked.dump() == ["; -A INPUT -j DROP", "   0: (18) r1 = map[id:0]", "   2: (95) exit"]


def test_already_resolved_instructions_pass_through() -> None:
    prog = [asm.ja(1), asm.mov64(R0, 1), asm.exit_()]
    assert link(prog).insns == prog


def test_missing_label_names_index_insn_and_label() -> None:
    with pytest.raises(LinkError) as err:
        link([asm.mov64(R0, 0), asm.jeq(R0, 0, "drop"), asm.exit_()])
    msg = str(err.value)
    assert "insn 1" in msg and "'drop'" in msg and "if r0 == 0x0" in msg
    assert err.value.index == 1


def test_duplicate_label() -> None:
    with pytest.raises(LinkError, match="defined twice"):
        link([Label("a"), asm.exit_(), Label("a")])


def test_jump_out_of_16_bit_range_suggests_gotol() -> None:
    body = [asm.stx(Size.DW, FP, -8, R1)] * 40000
    with pytest.raises(LinkError, match=r"insn 0 .*'far'.*16 bits.*gotol"):
        link([asm.jeq(R1, 0, "far"), *body, Label("far"), asm.exit_()])
    linked = link([asm.gotol("far"), *body, Label("far"), asm.exit_()])
    assert linked.insns[0].imm == 40000


def test_largest_16_bit_jump_fits() -> None:
    body = [asm.mov64(R0, 0)] * 32767
    assert link([asm.ja("x"), *body, Label("x")]).insns[0].off == 32767


def test_unknown_map_and_kfunc() -> None:
    with pytest.raises(LinkError, match="insn 0.*map 'nope'"):
        link([asm.ld_map_fd(R1, "nope")], maps={"a": 3})
    with pytest.raises(LinkError, match="insn 0.*kfunc 'bpf_x'"):
        link([asm.call_kfunc("bpf_x")], kfuncs={})
    with pytest.raises(LinkError, match="kfunc 'bpf_x'"):
        link([asm.call_kfunc("bpf_x")])


def test_reference_on_wrong_instruction() -> None:
    with pytest.raises(LinkError, match="takes none"):
        link([Insn(0xB7, 0, 0, 0, 0, ref="x"), Label("x")])


def test_not_an_instruction() -> None:
    with pytest.raises(LinkError, match="not an instruction"):
        link([asm.exit_(), "label"])


def test_large_program_links() -> None:
    prog: list[Insn | Label] = []
    for i in range(20000):
        prog += [asm.jeq(R1, i, f"r{i}"), asm.mov64(R0, 1), Label(f"r{i}")]
    linked = link(prog)
    assert len(linked) == 40000
    assert all(i.off == 1 for i in linked.insns[::2])


def _build(kind: str, n: int) -> Insn:
    if kind == "mov":
        return asm.mov64(R0, n)
    if kind == "imm64":
        return asm.ld_imm64(R1, n << 40)
    if kind == "jeq":
        return asm.jeq(R1, n, f"L{n}")
    if kind == "ja":
        return asm.ja(f"L{n}")
    if kind == "gotol":
        return asm.gotol(f"L{n}")
    return asm.call_local(f"L{n}")


SLOTS = {"mov": 1, "imm64": 2, "jeq": 1, "ja": 1, "gotol": 1, "call": 1}


@given(st.lists(st.tuples(st.sampled_from(sorted(SLOTS)), st.integers(0, 4)), max_size=60),
       st.lists(st.integers(0, 60), min_size=5, max_size=5))
def test_every_target_lands_on_its_label(items: list[tuple[str, int]], at: list[int]) -> None:
    prog: list[Insn | Label] = []
    label_slot: dict[str, int] = {}
    targets: list[str] = []  # label of each jump, in program order
    slot = 0
    for i in range(len(items) + 1):
        for n, pos in enumerate(at):
            if min(pos, len(items)) == i and f"L{n}" not in label_slot:
                prog.append(Label(f"L{n}"))
                label_slot[f"L{n}"] = slot
        if i == len(items):
            break
        kind, n = items[i]
        prog.append(_build(kind, n))
        if kind not in ("mov", "imm64"):
            targets.append(f"L{n}")
        slot += SLOTS[kind]
    linked = link(prog)
    # Walk the decoded bytes (not the linker's bookkeeping) to see where each jump lands.
    landed = []
    slot = 0
    for insn in decode(linked.code):
        if insn.is_jump or insn.is_local_call:
            rel = insn.imm if insn.opcode in (0x06, 0x85) else insn.off
            landed.append(slot + 1 + rel)
        slot += insn.slots
    assert landed == [label_slot[t] for t in targets]
    assert slot == len(linked)
