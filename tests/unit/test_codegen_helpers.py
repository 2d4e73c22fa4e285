"""The helper id table is complete and spelled as in enum bpf_func_id."""

from __future__ import annotations

from bpfilter.codegen.helpers import BpfFunc


def test_ids_are_contiguous_up_to_the_frozen_end() -> None:
    assert [f.value for f in BpfFunc] == list(range(212))


def test_known_ids() -> None:
    assert BpfFunc.map_lookup_elem == 1
    assert BpfFunc.tail_call == 12
    assert BpfFunc.redirect_map == 51
    assert BpfFunc.fib_lookup == 69
    assert BpfFunc.skc_lookup_tcp == 99
    assert BpfFunc.ringbuf_output == 130
    assert BpfFunc.loop == 181
    assert BpfFunc.cgrp_storage_delete == 211


def test_kernel_name() -> None:
    assert BpfFunc.map_lookup_elem.kernel_name == "bpf_map_lookup_elem"
