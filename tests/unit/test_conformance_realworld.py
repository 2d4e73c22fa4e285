"""Real-world dumps print per table exactly as iptables-save printed them after a restore."""

from __future__ import annotations

from pathlib import Path

import pytest

from bpfilter.grammar.errors import ParseError
from bpfilter.grammar.iptables import parse_restore
from bpfilter.ir.iptables_save import to_iptables_save

SOURCES = ("iptables_semantics", "kube-proxy", "fail2ban", "docker", "ufw")


def by_table(text: str) -> dict[str, list[str]]:
    """Table name -> its lines, ignoring `#` lines (legacy and nft order tables differently)."""
    out: dict[str, list[str]] = {}
    cur: str | None = None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if line.startswith("*"):
            cur = line[1:]
            out[cur] = []
        if cur is not None:
            out[cur].append(line)
        if line == "COMMIT":
            cur = None
    return out


def dumps(shared: Path) -> list[tuple[Path, Path]]:
    root = shared / "conformance" / "realworld"
    pairs = []
    for golden in sorted((root / "_golden").glob("*.legacy.save")):
        base = golden.name[: -len(".legacy.save")]
        for folder in SOURCES:
            if base.startswith(folder + "_"):
                pairs.append((root / folder / base[len(folder) + 1:], golden))
                break
    return pairs


def test_every_dump_prints_identically(shared_dir: Path) -> None:
    pairs = dumps(shared_dir)
    assert len(pairs) >= 30
    problems = []
    for source, golden in pairs:
        text = source.read_text(errors="surrogateescape")
        want = by_table(golden.read_text())
        try:
            got = by_table(to_iptables_save(parse_restore(text, filename=source.name)))
        except ParseError as e:
            # iptables-restore refused this dump too: the tables committed before the
            # failing one are identical, the failing one is left empty, later ones absent.
            lines = text.split("\n")[: e.line - 1]
            starts = [i for i, line in enumerate(lines) if line.startswith("*")]
            failing = lines[starts[-1]][1:].split()[0]
            if any(x.startswith("-A") or x.endswith("- [0:0]") for x in want.get(failing, [])):
                problems.append(f"{source.name}: refused ({e}) but iptables loaded {failing}")
                continue
            head = "\n".join(lines[: starts[-1]]) + "\n"
            got = by_table(to_iptables_save(parse_restore(head))) if head.strip() else {}
            want = {k: v for k, v in want.items() if k in got}
        if got != want:
            problems.append(f"{source.name}: differs from {golden.name}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", ["canon.rules", "ord.rules"])
def test_observed_canonicalisation(shared_dir: Path, name: str) -> None:
    """The recorded canonicalisation transcripts, minus extensions this project refuses."""
    folder = shared_dir / "conformance" / "iptables-restore-observed"
    unsupported: tuple[str, ...] = ()
    text = "".join(line for line in (folder / name).read_text().splitlines(keepends=True)
                   if not any(u in line for u in unsupported))
    got = by_table(to_iptables_save(parse_restore(text)))
    if name == "canon.rules":
        want = by_table((folder / "save_legacy.txt").read_text())
        want = {t: [x for x in lines if not any(u in x for u in unsupported)]
                for t, lines in want.items()}
        assert got == want
    else:
        rules = [x for x in got["filter"] if x.startswith("-A")]
        want_rules = (folder / "ord_legacy.txt").read_text().splitlines()
        assert rules == want_rules
