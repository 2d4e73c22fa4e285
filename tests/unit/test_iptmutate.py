"""The near-valid document corpus and its seeded mutations."""

from __future__ import annotations

import random
import re
from pathlib import Path

from iptmutate import corpus, dump_documents, mutate


def test_corpus_is_not_empty(shared_dir: Path) -> None:
    docs = corpus()
    assert len(docs) > 500
    assert 0 < len(dump_documents()) < len(docs)
    assert {family for family, _ in docs} == {4, 6}
    assert all(re.match(r"\*\w+\n", text) for _, text in docs)


def test_mutate_is_deterministic_and_changes_text() -> None:
    doc = "*filter\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n"
    a = [mutate(doc, random.Random(s), 3) for s in range(50)]
    b = [mutate(doc, random.Random(s), 3) for s in range(50)]
    assert a == b
    assert sum(m != doc for m in a) >= 45
