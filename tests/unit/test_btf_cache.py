"""The on-disk cache of BTF facts (bpfilter.btf_cache), with a stand-in BTF; no kernel."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bpfilter.btf_cache import BtfFacts


class FakeBtf:
    """Answers like bpfilter.btf.Btf for two facts; counts the BTF parses."""

    loads = 0

    @classmethod
    def load(cls) -> FakeBtf:
        cls.loads += 1
        return cls()

    def member_offset(self, struct: str, member: str) -> int:
        return {("sk_buff", "mark"): 168}[(struct, member)]

    def kfunc_id(self, name: str) -> int:
        return {"bpf_dynptr_from_skb": 63855}[name]

    def struct_size(self, name: str) -> int:
        return 48


@pytest.mark.skipif(os.geteuid() != 0, reason="the cache is written by root only")
def test_facts_are_read_once_then_served_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "facts.json"
    FakeBtf.loads = 0
    first = BtfFacts(path, FakeBtf.load)  # type: ignore[arg-type]
    assert first.member_offset("sk_buff", "mark") == 168
    assert first.kfunc_id("bpf_dynptr_from_skb") == 63855
    first.save()
    assert FakeBtf.loads == 1 and oct(path.stat().st_mode & 0o777) == "0o600"
    again = BtfFacts(path, FakeBtf.load)  # type: ignore[arg-type]
    assert again.member_offset("sk_buff", "mark") == 168
    assert again.kfunc_id("bpf_dynptr_from_skb") == 63855
    assert FakeBtf.loads == 1  # no parse: both facts came from the file
    assert again.struct_size("nf_hook_state") == 48 and FakeBtf.loads == 2  # a new fact


@pytest.mark.skipif(os.geteuid() != 0, reason="the cache is written by root only")
def test_another_kernel_or_a_broken_file_means_reading_btf_again(tmp_path: Path) -> None:
    path = tmp_path / "facts.json"
    FakeBtf.loads = 0
    facts = BtfFacts(path, FakeBtf.load)  # type: ignore[arg-type]
    facts.member_offset("sk_buff", "mark")
    facts.save()
    doc = json.loads(path.read_text())
    doc["key"][1] = "another-release"
    doc["facts"]["offset:sk_buff.mark"] = 1
    path.write_text(json.dumps(doc))
    assert BtfFacts(path, FakeBtf.load).member_offset("sk_buff", "mark") == 168  # type: ignore[arg-type]
    path.write_text("{not json")
    assert BtfFacts(path, FakeBtf.load).member_offset("sk_buff", "mark") == 168  # type: ignore[arg-type]
    assert FakeBtf.loads == 3
