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
import re
import signal
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import is_dataclass
from datetime import timedelta
from pathlib import Path
from types import FrameType

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from iptgen import GenOptions, generate

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "conformance"
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

VOCABULARY = (
    "*filter", "*nat", "*mangle", "*raw", "*security", "*foo", ":INPUT", ":FORWARD", ":OUTPUT",
    ":PREROUTING", ":USER", "ACCEPT", "DROP", "RETURN", "-", "[0:0]", "[1:2]", "[", "]", "COMMIT",
    "-A", "-I", "-D", "-R", "-N", "-X", "-F", "-Z", "-E", "-P", "-C", "-S", "-L", "-4", "-6",
    "INPUT", "OUTPUT", "USER", "!", "-s", "-d", "-i", "-o", "-p", "-f", "-j", "-g", "-m", "-t",
    "tcp", "udp", "icmp", "all", "6", "0", "--dport", "--sport", "--dports", "multiport",
    "conntrack", "--ctstate", "NEW,ESTABLISHED", "comment", "--comment", '"a b"', '"', "'",
    "10.0.0.0/8", "1.2.3.4/33", "::1/128", "eth+", "+", "1:65535", "65536", "0x10/0xff",
    "--icmp-type", "echo-request", "REJECT", "--reject-with", "tcp-reset", "LOG", "#",
    "--log-prefix", "limit", "--limit", "5/s", "\\", "\\x41", "99999999999999999999",
)
ODD_SPACE = (" ", "  ", "\t", "\r", "\v", "\f", "\xa0", "\u2003", "\x00", "\r\n", "\n")


# -- corpus ------------------------------------------------------------------------------------
def _t_documents(path: Path) -> Iterator[tuple[int, str]]:
    family = 6 if path.name.startswith("libip6t_") else 4
    table, chains = "filter", ["INPUT"]
    for raw in path.read_text(errors="replace").splitlines():
        if raw.startswith("*"):
            table = raw[1:].strip()
        elif raw.startswith(":"):
            chains = raw[1:].split(",")
        elif raw and raw[0] not in "#@%" and ";" in raw:
            rule = raw.split(";")[0]
            yield family, f"*{table}\n-A {chains[0]} {rule}\nCOMMIT\n"


def _dump_windows(path: Path, family: int) -> Iterator[tuple[int, str]]:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if not
             ln.startswith("#")]
    # One document per table: header, chain lines, up to 25 rules, COMMIT.
    for i, line in enumerate(lines):
        if not line.startswith("*"):
            continue
        end = next((j for j in range(i, len(lines)) if lines[j] == "COMMIT"), len(lines))
        head = [ln for ln in lines[i:end] if ln.startswith(("*", ":"))]
        rules = [ln for ln in lines[i:end] if ln.startswith(("-", "["))]
        for start in range(0, max(1, len(rules)), 25):
            yield family, "\n".join(head + rules[start:start + 25] + ["COMMIT"]) + "\n"


@functools.cache
def corpus() -> tuple[tuple[int, str], ...]:
    """Near-valid restore documents from ../shared/conformance (empty when it is absent)."""
    if not SHARED.is_dir():
        return ()
    docs: list[tuple[int, str]] = []
    for path in sorted((SHARED / "iptables" / "extensions").glob("*.t")):
        docs.extend(_t_documents(path))
    for path in sorted((SHARED / "realworld" / "_golden").glob("*.legacy.save")):
        docs.extend(_dump_windows(path, 4))
    for path in sorted((SHARED / "realworld" / "ufw").glob("emulated-*ip6tables*legacy*")):
        docs.extend(_dump_windows(path, 6))
    return tuple(docs)


def mutate(text: str, rng: random.Random, rounds: int) -> str:
    """Apply `rounds` random token- or line-level damage to a restore document."""
    lines = text.split("\n")
    for _ in range(rounds):
        li = rng.randrange(len(lines))
        toks = lines[li].split(" ")
        ti = rng.randrange(len(toks))
        op = rng.randrange(14)
        if op == 0 and len(toks) > 1:
            del toks[ti]
        elif op == 1:
            toks.insert(ti, toks[ti])
        elif op == 2 and len(toks) > 1:
            tj = min(ti + 1, len(toks) - 1)
            toks[ti], toks[tj] = toks[tj], toks[ti]
        elif op == 3:
            toks.insert(ti, "!")
        elif op == 4:
            toks[ti] = rng.choice(["9" * rng.randrange(5, 80), "-1", "0x" + "f" * 20,
                                   "4294967296", "65536", "1" * 400, "1e9", "+5"])
        elif op == 5:
            cut = rng.randrange(len(lines[li]) + 1)
            toks = [lines[li][:cut]]
            lines = lines[: li + 1]
        elif op == 6:
            word = toks[ti]
            at = rng.randrange(len(word) + 1)
            toks[ti] = word[:at] + rng.choice(['"', "'", '\\"', "\\"]) + word[at:]
        elif op == 7:
            lines[li] = rng.choice(ODD_SPACE).join(toks)
            continue
        elif op == 8 and len(lines) > 1:
            del lines[li]
            continue
        elif op == 9:
            lines.insert(li, lines[li])
            continue
        elif op == 10:
            lj = rng.randrange(len(lines))
            lines[li], lines[lj] = lines[lj], lines[li]
            continue
        elif op == 11:
            toks[ti] = rng.choice(VOCABULARY)
        elif op == 12:
            toks[ti] = toks[ti].swapcase()
        else:
            toks.insert(ti, rng.choice(["#", "[1:2]", "[", ":", ",", "/", "-", "--", "''"]))
        lines[li] = " ".join(toks)
    return "\n".join(lines)


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


def test_corpus_is_not_empty(shared_dir: Path) -> None:
    docs = corpus()
    assert len(docs) > 500
    assert {family for family, _ in docs} == {4, 6}
    assert all(re.match(r"\*\w+\n", text) for _, text in docs)


def test_mutate_is_deterministic_and_changes_text() -> None:
    doc = "*filter\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n"
    a = [mutate(doc, random.Random(s), 3) for s in range(50)]
    b = [mutate(doc, random.Random(s), 3) for s in range(50)]
    assert a == b
    assert sum(m != doc for m in a) >= 45
