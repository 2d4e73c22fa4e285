"""Fuzz parse_restore: every input ends in a printable Ruleset or a ParseError naming a line.

Inputs: arbitrary unicode, arbitrary bytes, token soup from the restore vocabulary, and
mutations (token deletion, duplication, swaps, `!` in odd places, huge numbers, odd
whitespace, stray and truncated quotes, line shuffles) of documents built from
../shared/conformance: rule lines of iptables/extensions/*.t and windows of the real-world
dumps. Each example runs under a hard per-example deadline (SIGALRM) and a bound on the
Python memory it allocates (tracemalloc). Accepted input must also print, and the printed
text must be a fixed point of parse-then-print (checked on generated rulesets too).

CI runs a few hundred derandomized examples; BPFILTER_SOAK=N runs N per test, randomly.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import is_dataclass
from datetime import timedelta
from types import FrameType

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from iptgen import GenOptions, generate
from iptmutate import ODD_SPACE, SHARED, VOCABULARY, corpus, mutate

SOAK = int(os.environ.get("BPFILTER_SOAK", "0") or 0)
HANG_SECONDS = 20  # far above any sane parse of these small inputs; catches real hangs only
MEMORY_BASE = 48 << 20
MEMORY_PER_CHAR = 16 << 10

FUZZ = settings(
    max_examples=SOAK or 80,
    derandomize=not SOAK,
    deadline=timedelta(seconds=10),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)

# -- the property ------------------------------------------------------------------------------
class Hang(Exception):
    """The per-example deadline passed: parse_restore did not return."""


@contextmanager
def hard_deadline(seconds: float) -> Iterator[None]:
    def fire(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"parse_restore still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@functools.cache
def _warm() -> None:
    # Build the cached parser outside the memory measurement.
    from bpfilter.grammar.errors import ParseError
    from bpfilter.grammar.iptables import parse_restore

    for family in (4, 6):
        with suppress(ParseError):
            parse_restore("*filter\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n", family=family)


def check_input(text: str, family: int) -> object | None:
    """Run the parser on `text`; return the Ruleset, or None after a well-formed ParseError."""
    from bpfilter.grammar.errors import ParseError
    from bpfilter.grammar.iptables import parse_restore
    from bpfilter.ir.iptables_save import to_iptables_save

    _warm()
    # Lines as fgets() reads them; "COMMIT expected at line N" names the one after the last.
    lines = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
    last_line = lines + 1
    tracemalloc.start()
    try:
        with hard_deadline(HANG_SECONDS):
            try:
                result = parse_restore(text, family=family, filename="fuzz.rules")
            except ParseError as err:
                assert isinstance(err.line, int) and 1 <= err.line <= last_line, (
                    f"line {err.line} outside 1..{last_line}: {err}")
                assert isinstance(err.col, int) and err.col >= 0
                assert err.exit_code in (1, 2, 4), err.exit_code
                assert str(err).startswith(f"fuzz.rules:{err.line}:"), str(err)
                assert err.message and "\n" not in err.message, repr(err.message)
                event(f"refused, exit {err.exit_code}")
                return None
            event("accepted")
            assert is_dataclass(result), type(result)
            printed = to_iptables_save(result)
            assert isinstance(printed, str)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    bound = MEMORY_BASE + MEMORY_PER_CHAR * len(text)
    assert peak <= bound, f"peak {peak >> 20} MiB for {len(text)} characters of input"
    return result


def assert_fixed_point(text: str, family: int) -> None:
    """Accepted input prints canonical text that parses back to the same text."""
    from bpfilter.grammar.iptables import parse_restore
    from bpfilter.ir.iptables_save import to_iptables_save

    once = to_iptables_save(parse_restore(text, family=family))
    twice = to_iptables_save(parse_restore(once, family=family))
    assert twice == once, f"not a fixed point; first print:\n{once}\nsecond:\n{twice}"


FAMILY = st.sampled_from((4, 6))


@FUZZ
@given(text=st.text(max_size=400), family=FAMILY)
def test_arbitrary_unicode(text: str, family: int) -> None:
    check_input(text, family)


@FUZZ
@given(data=st.binary(max_size=400), family=FAMILY)
def test_arbitrary_bytes(data: bytes, family: int) -> None:
    check_input(data.decode("latin-1"), family)


@FUZZ
@given(words=st.lists(st.tuples(st.sampled_from(VOCABULARY), st.sampled_from(ODD_SPACE)),
                      max_size=60), family=FAMILY)
def test_token_soup(words: list[tuple[str, str]], family: int) -> None:
    check_input("".join(w + sep for w, sep in words), family)


@FUZZ
@given(data=st.data(), rng=st.randoms(use_true_random=False), rounds=st.integers(1, 4))
def test_mutated_conformance_documents(data: st.DataObject, rng: random.Random,
                                       rounds: int) -> None:
    docs = corpus()
    if not docs:
        pytest.skip(f"../shared not present at {SHARED.parent}")
    family, text = data.draw(st.sampled_from(docs), label="document")
    mutated = mutate(text, rng, rounds)
    result = check_input(mutated, family)
    if result is not None:
        assert_fixed_point(mutated, family)


@FUZZ
@given(seed=st.integers(0, 2**32 - 1), family=FAMILY)
def test_generated_rulesets_print_a_fixed_point(seed: int, family: int) -> None:
    text = generate(seed, GenOptions(family=family, max_rules=25)).render()
    assert check_input(text, family) is not None, f"generated ruleset refused:\n{text}"
    assert_fixed_point(text, family)
