"""Upstream iptables extension tests (`*.t`): OK lines print as expected, FAIL lines are refused."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from bpfilter.grammar.errors import ParseError
from bpfilter.grammar.iptables import parse_command
from bpfilter.ir.iptables_save import format_rule
from bpfilter.ir.matches import MATCHES
from bpfilter.ir.targets import TARGETS

# Files about the core options rather than one extension.
CORE_FILES = {"iptables", "libipt_standard"}
# Where the *.t files (iptables 1.8.13) and the iptables-save this project matches (1.8.9,
# the version the real-world goldens and the property test use) print differently.
SAVED_BY_1_8_9 = {
    # 1.8.9 prints nothing for an empty interface mask, even when negated.
    ("iptables.t", "! -i +"): "",
    # 1.8.9 leaves an open upper end of --queue-balance at 65535 (1.8.13: 65534).
    ("libxt_NFQUEUE.t", "-j NFQUEUE --queue-balance 4:"): "-j NFQUEUE --queue-balance 4:65535",
}
# OK lines of the *.t files that iptables 1.8.9 refuses: 1.8.9 reads `:` as 0:65535, 65536
# queues, which xt_NFQUEUE's checkentry refuses (1.8.13 stops at 65534).
REFUSED_BY_1_8_9 = {
    ("libxt_NFQUEUE.t", "-j NFQUEUE --queue-balance :"),
}


def _extension(path: Path) -> tuple[str, tuple[int, ...]]:
    """Extension name and the families upstream runs the file with (libxt_: both)."""
    stem = path.stem
    for prefix, families in (("libipt_", (4,)), ("libip6t_", (6,)), ("libxt_", (4, 6))):
        if stem.startswith(prefix):
            return stem[len(prefix):], families
    return stem, (4,)


def supported(path: Path) -> bool:
    name, _ = _extension(path)
    return path.stem in CORE_FILES or name in MATCHES or name in TARGETS


def cases(shared: Path) -> list[tuple[str, str, int, str, str, str, str]]:
    """(file, table, family, chain, rule, expected, result) for every supported test line."""
    out = []
    folder = shared / "conformance" / "iptables" / "extensions"
    for path in sorted(folder.glob("*.t")):
        if not supported(path):
            continue
        _, families = _extension(path)
        for family in families:
            out.extend(_file_cases(path, family))
    return out


def _file_cases(path: Path, family: int) -> list[tuple[str, str, int, str, str, str, str]]:
    out = []
    chains, table = ["INPUT"], "filter"
    for line in path.read_text().splitlines():
        if not line or line[0] in "#@%":
            continue
        if line[0] == ":":
            chains = line[1:].split(",")
            continue
        if line[0] == "*":
            table = line[1:]
            continue
        parts = line.split(";")
        if len(parts) < 3 or parts[2] not in ("OK", "FAIL"):
            continue
        for chain in chains:
            out.append((path.name, table, family, chain, parts[0], parts[1], parts[2]))
    return out


def run_case(table: str, family: int, chain: str, rule: str) -> list[str]:
    rs = parse_command(["-A", chain, *shlex.split(rule)], family=family, table=table)
    t = rs.tables[0]
    c = t.chain(chain)
    assert c is not None
    return [format_rule(r, chain, bits=32 if family == 4 else 128, table=table) for r in c.rules]


def test_every_ok_line_prints_as_upstream_expects(shared_dir: Path) -> None:
    failures = []
    total = 0
    for file, table, family, chain, rule, expected, result in cases(shared_dir):
        if result != "OK" or (file, rule) in REFUSED_BY_1_8_9:
            continue
        total += 1
        if expected == "=":
            expected = rule
        expected = SAVED_BY_1_8_9.get((file, rule), expected)
        want = f"-A {chain} {expected}".strip()
        try:
            got = run_case(table, family, chain, rule)
        except ParseError as e:
            failures.append(f"{file}: {rule!r}: refused: {e}")
            continue
        if got != [want]:
            failures.append(f"{file}: {rule!r}: got {got}, want {want!r}")
    assert total > 1000
    assert not failures, "\n".join(failures)


def test_every_fail_line_is_refused(shared_dir: Path) -> None:
    accepted = []
    total = 0
    for file, table, family, chain, rule, _, result in cases(shared_dir):
        if result != "FAIL" and (file, rule) not in REFUSED_BY_1_8_9:
            continue
        total += 1
        try:
            got = run_case(table, family, chain, rule)
        except ParseError:
            continue
        accepted.append(f"{file}: {rule!r} in {chain} accepted as {got}")
    assert total > 400
    assert not accepted, "\n".join(accepted)


@pytest.mark.parametrize("flag,ext", [("-m", "quota2"), ("-m", "ipvs"), ("-j", "CLUSTERIP"),
                                      ("-j", "ULOG")])
def test_unsupported_extensions_are_refused_by_name(flag: str, ext: str) -> None:
    with pytest.raises(ParseError, match=f"'{ext}' is not supported"):
        parse_command(["-A", "INPUT", flag, ext])
