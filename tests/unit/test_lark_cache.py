"""The grammar's Lark tables cached in a file (bpfilter.lark_cache); no kernel."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpfilter import lark_cache
from bpfilter.grammar import shapes
from bpfilter.grammar.iptables import parse_restore


@pytest.fixture
def fresh_parser() -> Iterator[None]:
    saved = dict(shapes.LARK_OPTIONS)
    shapes.LARK_OPTIONS.clear()
    shapes.lark_parser.cache_clear()
    try:
        yield
    finally:
        shapes.LARK_OPTIONS.clear()
        shapes.LARK_OPTIONS.update(saved)
        shapes.lark_parser.cache_clear()


@pytest.mark.skipif(os.geteuid() != 0, reason="the cache is kept for root only")
@pytest.mark.usefixtures("fresh_parser")
def test_tables_are_written_once_under_a_name_of_the_grammar(tmp_path: Path) -> None:
    (tmp_path / "lark-shapes-0000.cache").write_text("an earlier grammar's")
    lark_cache.install(tmp_path)
    [made] = tmp_path.glob("lark-shapes-*.cache")  # the earlier one removed
    assert dict(shapes.LARK_OPTIONS) == {"cache": str(made)}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    first = made.read_bytes()
    # Another process: loads the file (Lark checks it against the grammar) and parses alike.
    shapes.LARK_OPTIONS.clear()
    shapes.lark_parser.cache_clear()
    lark_cache.install(tmp_path)
    assert dict(shapes.LARK_OPTIONS) == {"cache": str(made)} and made.read_bytes() == first
    table = parse_restore("*filter\n-A INPUT -s 198.18.0.1 -j DROP\nCOMMIT\n").table("filter")
    assert table is not None and len(table.chains[0].rules) == 1
