"""Property: bpfilter's iptables-save text equals iptables-legacy-save after a real restore.

Each case generates a ruleset from a printed seed (tests/iptgen.py), loads it with
(ip6)tables-legacy-restore in a throwaway namespace, and compares, per table and ignoring `#`
lines, the saved text with `to_iptables_save(parse_restore(text))`. A ruleset iptables refuses
must be refused by bpfilter with the same exit code (and vice versa).

Every test id carries its seed. Rerun one case with BPFILTER_CASE=SEED:FAMILY:RATE (e.g.
`BPFILTER_CASE=20261127:4:0.01 pytest tests/e2e/test_iptables_save_property.py -k case`);
run more with BPFILTER_SOAK=N (marked slow, from a random base seed unless BPFILTER_SEED).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
import random
from pathlib import Path

import pytest
from ipt_oracle import missing_tools, netns, restore, split_tables
from iptgen import FEATURES, GenOptions, generate
from iptmutate import dump_documents, mutate

pytestmark = pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")

CI_CASES = 50
MUTATED_CASES = 40
MAX_RULES = 40
BASE_SEED = int(os.environ.get("BPFILTER_SEED", "20261125"))
SOAK = int(os.environ.get("BPFILTER_SOAK", "0") or 0)
SOAK_SEED = int(os.environ.get("BPFILTER_SEED", str(random.SystemRandom().randrange(1 << 31))))

# Generator features withheld from the comparison, each with its reason. Empty: the whole
# supported grammar is exercised.
TRIMMED: dict[str, str] = {}
FEATURE_SET = FEATURES - frozenset(TRIMMED)


def _case(seed: int, index: int) -> tuple[int, int, float]:
    # A quarter IPv6; every third ruleset carries deliberate mistakes so refusals are compared.
    family = 6 if index % 4 == 3 else 4
    invalid_rate = 0.01 if index % 3 == 2 else 0.0
    return seed, family, invalid_rate


def _params() -> list[object]:
    params: list[object] = []
    for i in range(CI_CASES):
        seed, family, rate = _case(BASE_SEED + i, i)
        params.append(pytest.param(seed, family, rate,
                                   id=f"v{family}-seed{seed}{'-mistakes' if rate else ''}"))
    for i in range(SOAK):
        seed, family, rate = _case(SOAK_SEED + i, i)
        params.append(pytest.param(seed, family, rate, marks=pytest.mark.slow,
                                   id=f"soak-v{family}-seed{seed}{'-mistakes' if rate else ''}"))
    if os.environ.get("BPFILTER_CASE"):
        seed_s, family_s, rate_s = os.environ["BPFILTER_CASE"].split(":")
        params.append(pytest.param(int(seed_s), int(family_s), float(rate_s), id="case"))
    return params


def _input_tables(text: str) -> list[str]:
    names: list[str] = []
    for line in text.splitlines():
        if line.startswith("*") and line[1:].split()[0] not in names:
            names.append(line[1:].split()[0])
    return names


def _diff(expected: str, got: str) -> str:
    return "\n".join(difflib.unified_diff(expected.splitlines(), got.splitlines(),
                                          "iptables-legacy-save", "bpfilter", lineterm=""))


@pytest.mark.parametrize(("seed", "family", "invalid_rate"), _params())
def test_canonical_output_matches_iptables_save(seed: int, family: int,
                                                 invalid_rate: float) -> None:

    rs = generate(seed, GenOptions(family=family, max_rules=MAX_RULES, features=FEATURE_SET,
                                   invalid_rate=invalid_rate))
    text = rs.render()
    assert_agrees_with_iptables(
        text, family, f"seed {seed} (IPv{family}, mistakes tried: {list(rs.mistakes)})")


@pytest.mark.parametrize("index", range(MUTATED_CASES + SOAK))
def test_damaged_documents_agree_with_iptables(index: int, shared_dir: Path) -> None:
    """Near-valid input: accepted, refused (exit code, line) and printed as iptables does.

    Starts from generated rulesets and from the windows of real-world dumps (as
    iptables-legacy 1.8.9 saved them) that bpfilter accepts undamaged, so a refusal of an
    unsupported extension by name is not counted; never from the 1.8.13 .t lines, which the
    installed 1.8.9 may disagree with. Then damages one or two tokens or lines
    (tests/iptmutate.py).
    """
    seed = BASE_SEED + 30_000 + index
    rng = random.Random(seed)
    if index % 2:
        family, text = rng.choice(_supported_dumps())
    else:
        family = 6 if index % 4 == 1 else 4
        text = generate(seed, GenOptions(family=family, max_rules=15)).render()
    damaged = mutate(text, rng, rng.randrange(1, 3))
    assert_agrees_with_iptables(damaged, family, f"damaged document, seed {seed}")


@functools.cache
def _supported_dumps() -> tuple[tuple[int, str], ...]:
    from bpfilter.grammar.errors import ParseError
    from bpfilter.grammar.iptables import parse_restore

    kept = []
    for family, text in dump_documents():
        with contextlib.suppress(ParseError):
            parse_restore(text, family=family)
            kept.append((family, text))
    return tuple(kept)


def assert_agrees_with_iptables(text: str, family: int, label: str) -> None:
    """bpfilter accepts `text` iff iptables-legacy-restore does, and then prints the same."""
    from bpfilter.grammar.errors import ParseError
    from bpfilter.grammar.iptables import parse_restore
    from bpfilter.ir.iptables_save import to_iptables_save

    where = f"{label}; input:\n{text}"
    with netns() as ns:
        real = restore(ns, text, family=family)
    try:
        ours = parse_restore(text, family=family)
    except ParseError as err:
        assert real.rc != 0, f"bpfilter refused what iptables accepted: {err}\n{where}"
        assert err.exit_code == real.rc, (
            f"exit code {err.exit_code}, iptables-restore {real.rc} ({real.stderr.strip()}); "
            f"bpfilter said: {err}\n{where}")
        if real.rc == 2 and real.error_line is not None:
            # Parameter problems name the offending line; commit-time failures (exit 1)
            # name the COMMIT line in iptables, which bpfilter need not copy.
            assert err.line == real.error_line, (
                f"bpfilter blames line {err.line}, iptables line {real.error_line} "
                f"({real.stderr.strip()}); bpfilter said: {err}\n{where}")
        return
    assert real.rc == 0, (
        f"iptables refused (exit {real.rc}: {real.stderr.strip()}) what bpfilter accepted\n"
        f"{where}")
    printed = to_iptables_save(ours)
    assert not any(line.startswith("#") for line in printed.splitlines())
    mine = split_tables(printed)
    names = _input_tables(text)
    assert list(mine) == names, f"tables {list(mine)}, input names {names}\n{where}"
    for name in names:
        expected = real.tables.get(name)
        assert expected is not None, f"iptables-save printed no {name} table\n{where}"
        assert mine[name] == expected, f"table {name} differs:\n{_diff(expected, mine[name])}\n" \
            f"{where}"
        assert split_tables(to_iptables_save(ours, table=name)) == {name: expected}


def test_generator_without_mistakes_is_accepted_by_iptables() -> None:
    """The harness itself: what the generator calls valid, iptables-legacy-restore accepts."""
    refused = []
    with netns() as ns:
        for i in range(40):
            seed, family = BASE_SEED + 10_000 + i, 6 if i % 3 == 0 else 4
            text = generate(seed, GenOptions(family=family, max_rules=MAX_RULES)).render()
            real = restore(ns, text, family=family)
            if real.rc != 0:
                refused.append(f"seed {seed} IPv{family}: {real.stderr.strip()}")
    assert not refused, "\n".join(refused)


def test_generator_mistakes_are_mostly_refused_by_iptables() -> None:
    """Deliberate mistakes reach the text and iptables refuses the ruleset for them."""
    outcomes = []
    with netns() as ns:
        for i in range(20):
            seed = BASE_SEED + 20_000 + i
            rs = generate(seed, GenOptions(max_rules=MAX_RULES, invalid_rate=0.2))
            outcomes.append(restore(ns, rs.render()).rc)
    assert sum(rc != 0 for rc in outcomes) >= 15, outcomes
