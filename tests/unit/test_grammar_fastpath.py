"""The parser's shortcuts give exactly what its general path gives.

Shortcuts: fast tokenising (str.split, word_texts) with lazy columns, runs of like lines
matched as text (`_Parser.run_of`), the fast IR constructors and the dotted-quad parser. The
reference is the same parser with `shortcuts = False`: every rule line tokenised with
columns, normalised and executed. Inputs are generated rulesets (tests/iptgen.py), regrouped
so lines of one shape follow each other (that is what starts runs), and mutations of them
(tests/iptmutate.py) for the errors: the same IR (==, lines and columns included) or the same
error (message, line, column, exit code).

Per-shape plans against build_rules (`plans = False`) agree on the IR; on a line with two
errors they may name different ones (a plan finishes the extensions before it looks at
addresses and interface names, build_rules after), so only the failing line is compared.
"""

from __future__ import annotations

import gc
import random
import re
from collections.abc import Iterator
from dataclasses import fields
from typing import TypeAlias

import pytest
from iptgen import GenOptions, generate
from iptmutate import mutate

from bpfilter.grammar import iptables
from bpfilter.grammar.errors import ParseError
from bpfilter.grammar.iptables import parse_restore
from bpfilter.grammar.tokenize import TokenizeError, split_words, word_texts
from bpfilter.ir.model import (
    Match,
    Option,
    Prefix,
    Rule,
    Ruleset,
    Target,
    TargetKind,
    make_match,
    make_option,
    make_prefix,
    make_rule,
)
from bpfilter.ir.values import ValueError_, parse_address, parse_prefix

Outcome: TypeAlias = Ruleset | tuple[str, int, int, int]


def _clear_caches() -> None:
    iptables._FAST.clear()
    iptables._PLANS.clear()
    iptables._EXT_CACHE.clear()


def _parse(text: str, family: int = 4, *, shortcuts: bool, plans: bool = True) -> Outcome:
    _clear_caches()
    p = iptables._Parser(family, "<test>")
    p.shortcuts = shortcuts
    p.plans = plans
    try:
        return p.run(text)
    except ParseError as e:
        return (e.message, e.line, e.col, e.exit_code)


@pytest.fixture
def run_lines(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many lines each run consumed (the runs must really happen for the test to mean
    anything)."""
    consumed: list[int] = []
    real = iptables._Parser.run_of

    def counting(self: iptables._Parser, run: iptables._Run, lines: list[str], n: int) -> int:
        try:
            end = real(self, run, lines, n)
        except ParseError:
            consumed.append(self.lineno - 1 - n)  # the lines before the refused one
            raise
        consumed.append(end - n)
        return end

    monkeypatch.setattr(iptables._Parser, "run_of", counting)
    return consumed


_SHAPE = re.compile(r"(?<![^ \t])(?:[^-! \t][^ \t]*|-(?![^ \t])|![^ \t]+)")


def _grouped(text: str, rng: random.Random, copies: int) -> str:
    """The document with each table's rule lines grouped by shape (and chain and -m/-j/-p
    words, so they share a plan), every line present `copies` times with its addresses and
    ports varied: long runs of like lines, as in real large rulesets."""
    out: list[str] = []
    body: list[str] = []

    def flush() -> None:
        def key(line: str) -> str:
            words = line.split()
            fixed = [w for i, w in enumerate(words)
                     if i < 2 or (i > 0 and words[i - 1] in ("-m", "-j", "-g", "-p"))]
            return _SHAPE.sub("V", line) + " | " + " ".join(fixed)
        varied = [_vary(line, rng) for line in body for _ in range(copies)]
        out.extend(sorted(varied, key=key))
        body.clear()

    for line in text.split("\n"):
        if line.startswith("-A") and '"' not in line:
            body.append(line)
            continue
        flush()
        out.append(line)
    flush()
    return "\n".join(out)


def _vary(line: str, rng: random.Random) -> str:
    # New numbers in dotted quads and ports keep the shape (and the line valid, mostly).
    line = re.sub(r"(?<=\.)\d+(?=[/ ]|$)", lambda m: str(rng.randrange(256)), line)
    return re.sub(r"(?<=--dport )\d+(?= |$)", lambda m: str(rng.randrange(1, 65536)), line)


def _documents(count: int, seed: int, copies: int) -> Iterator[tuple[int, str]]:
    rng = random.Random(seed)
    for i in range(count):
        family = 4 if i % 3 else 6
        opts = GenOptions(family=family, max_rules=60, invalid_rate=0.0 if i % 2 else 0.05)
        text = generate(seed * 1000 + i, opts).render()
        yield family, _grouped(text, rng, copies)


def test_large_grouped_rulesets_same_ir(run_lines: list[int]) -> None:
    accepted = 0
    rules = 0
    for family, text in _documents(40, 1, copies=25):
        fast = _parse(text, family, shortcuts=True)
        careful = _parse(text, family, shortcuts=False)
        assert fast == careful, text
        if isinstance(fast, Ruleset):
            accepted += 1
            rules += sum(len(c.rules) for t in fast.tables for c in t.chains)
    # The comparison covered real work: accepted rulesets, many rules, long runs.
    assert accepted >= 15
    assert rules >= 10_000
    assert sum(run_lines) >= rules // 2
    assert max(run_lines) >= 20


def test_plans_build_what_build_rules_builds() -> None:
    rng = random.Random(11)
    accepted = 0
    for family, text in _documents(30, 3, copies=4):
        for damaged in (text, mutate(text, rng, 1)):
            planned = _parse(damaged, family, shortcuts=True)
            built = _parse(damaged, family, shortcuts=False, plans=False)
            if isinstance(planned, Ruleset) or isinstance(built, Ruleset):
                assert planned == built, damaged
                accepted += 1
            else:
                assert planned[1] == built[1], damaged
    assert accepted >= 20


def test_mutated_rulesets_same_ir_or_error(run_lines: list[int]) -> None:
    rng = random.Random(7)
    errors = 0
    for family, text in _documents(30, 2, copies=6):
        for _ in range(10):
            damaged = mutate(text, rng, rng.randrange(1, 4))
            fast = _parse(damaged, family, shortcuts=True)
            careful = _parse(damaged, family, shortcuts=False)
            assert fast == careful, damaged
            errors += not isinstance(fast, Ruleset)
    assert errors >= 50
    assert sum(run_lines) > 0


BLOCK_HEAD = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n" \
             ":USER - [0:0]\n"


@pytest.mark.parametrize("odd", [
    "-A INPUT -s 198.18.0.400/32 -j DROP",            # bad address inside a run
    "-A INPUT -s 198.18.0.1/33 -j DROP",              # bad mask
    "-A INPUT -s 198.18.0.01/32 -j DROP",             # leading zero: the slow dotted-quad path
    "-A INPUT -s 198.18.0.1,198.18.0.2 -j DROP",      # an address list: two rules
    "-A INPUT ! -s 198.18.0.1,198.18.0.2 -j DROP",    # refused list
    "-A INPUT -s 198.18.0.1/255.255.0.0 -j DROP",     # mask as an address
    "-A INPUT -s 0.0.0.0/0 -j DROP",                  # dropped as any
    "-A INPUT ! -s 0.0.0.0/0 -j DROP",
    " -A INPUT -s 198.18.0.1/32 -j DROP",             # leading blank: column 2
    "-A INPUT\t-s  198.18.0.1/32 -j DROP \t",         # other blanks
    "-A INPUT -s 198.18.0.1/32 -j DROP\r",            # CR stays in the word
    "[1:2] -A INPUT -s 198.18.0.1/32 -j DROP",        # counters
    "-A INPUT -s \"198.18.0.1/32\" -j DROP",          # quoted value
    "-A INPUT -s 198.18.0.1/32 -j \"DROP\"",
    "-A INPUT -s 198.18.0.1/32 -j DROP \"",           # unterminated quote
    "-A INPUT -s 198.18.0.1/32 -j USER",              # another plan
    "-A INPUT -s 198.18.0.1/32 -j NOPE",
    "-A INPUT -s 198.18.0.1/32 -s 198.18.0.2 -j DROP",
    "-A INPUT -s - -j DROP",
    "-A INPUT -s !x -j DROP",
    "-A NOPE -s 198.18.0.1/32 -j DROP",
    "-A INPUT --source 198.18.0.1/32 -j DROP",        # getopt spelling
    "-A INPUT -s 198.18.0.1/32 -j DROP -p tcp --dport 99999",
    "-I INPUT -s 198.18.0.1/32 -j DROP",
    "-D INPUT -s 198.18.3.4/32 -j DROP",
    "-X USER",
    "COMMIT",
    "# a comment",
    "",
])
def test_odd_line_inside_a_run(odd: str, run_lines: list[int]) -> None:
    lines = [f"-A INPUT -s 198.18.{i // 256}.{i % 256}/32 -j DROP" for i in range(2000)]
    lines[1000] = odd
    lines[1500] = "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT"
    lines[1501:1600] = [f"-A INPUT -p tcp -m tcp --dport {p} -j ACCEPT" for p in range(99)]
    text = BLOCK_HEAD + "\n".join(lines) + "\nCOMMIT\n"
    fast = _parse(text, shortcuts=True)
    assert fast == _parse(text, shortcuts=False)
    assert max(run_lines) >= 400
    if odd == "-A INPUT -s 198.18.0.400/32 -j DROP":
        assert fast == ("host/network `198.18.0.400' not found", 1006, 13, 2)


@pytest.mark.parametrize("rule", [
    "-A INPUT ! -s {} -j DROP",
    "-A OUTPUT -d {} -j ACCEPT",
    "-A INPUT -s {} -p tcp -j DROP",
    "-A INPUT -p all -s {} -j DROP",
    "-A FORWARD -f -s {} -j USER",
    "-A USER -s {} -j RETURN",
    "-A INPUT -s {}",
])
@pytest.mark.parametrize("counters", ["", "[{}:{}] ", "[{}:{}]", "[{}:{}] \t "])
def test_address_runs(rule: str, counters: str, run_lines: list[int]) -> None:
    rng = random.Random(rule)
    addrs = [f"198.{rng.randrange(18, 20)}.{rng.randrange(256)}.{rng.randrange(256)}"
             f"/{rng.choice((32, 24, 0, 31, 8))}" for _ in range(300)]
    addrs[100:103] = ["0.0.0.0/0", "198.18.0.1,198.18.0.2", "198.18.0.1/255.0.255.0"]
    if "!" in rule:
        addrs[101] = "198.18.0.3"  # `! -s` refuses a list (test_odd_line_inside_a_run)
    lines = [counters.format(i, rng.randrange(10**6)) + rule.format(a)
             for i, a in enumerate(addrs)]
    lines[200] = rule.format("198.18.9.9")  # no counters inside a counted run, or the reverse
    text = BLOCK_HEAD + "\n".join(lines) + "\nCOMMIT\n"
    fast = _parse(text, shortcuts=True)
    assert isinstance(fast, Ruleset)
    assert fast == _parse(text, shortcuts=False)
    assert fast == _parse(text, shortcuts=False, plans=False)
    assert max(run_lines) >= 90


@pytest.mark.parametrize(("odd", "error"), [
    ("--dport 99999", ("invalid port/service `99999' specified", 306, 32, 2)),
    ("--dport 5:3", ("invalid portrange (min > max) `5:3'", 306, 32, 2)),
    ("--dport 80", None),
    ("--dport 80 --dport 81", ("option \"--dport\" can only be used once", 306, 35, 2)),
])
@pytest.mark.parametrize("counters", ["", "[12:345] "])
def test_extension_error_inside_a_run(odd: str, error: tuple[str, int, int, int] | None,
                                      counters: str, run_lines: list[int]) -> None:
    # Every line has new option values: each one finishes its extension (with columns).
    lines = [f"{counters}-A INPUT -p tcp -m tcp --dport {p} -j ACCEPT" for p in range(1, 500)]
    lines[300] = f"{counters}-A INPUT -p tcp -m tcp {odd} -j ACCEPT"
    text = BLOCK_HEAD + "\n".join(lines) + "\nCOMMIT\n"
    fast = _parse(text, shortcuts=True)
    assert fast == _parse(text, shortcuts=False)
    assert fast == _parse(text, shortcuts=False, plans=False) or error is not None
    assert max(run_lines) >= 250
    if error is not None:
        message, line, col, code = error
        assert fast == (message, line, col + len(counters), code)


@pytest.mark.parametrize("family", [4, 6])
def test_runs_of_every_generated_shape(family: int, run_lines: list[int]) -> None:
    # Each generated line repeated with new values right after itself: every plannable
    # shape the generator knows becomes a run.
    rng = random.Random(family)
    text = generate(5, GenOptions(family=family, max_rules=200)).render()
    lines = []
    for line in text.split("\n"):
        lines.append(line)
        if line.startswith("-A") and '"' not in line:
            lines.extend(_vary(line, rng) for _ in range(5))
    doubled = "\n".join(lines)
    fast = _parse(doubled, family, shortcuts=True)
    assert fast == _parse(doubled, family, shortcuts=False)
    assert sum(run_lines) >= 100


def test_parse_restore_equals_reference_and_restores_gc() -> None:
    text = BLOCK_HEAD + "".join(f"-A INPUT -s 198.18.0.{i}/32 -j DROP\n"
                                for i in range(256)) + "COMMIT\n"
    assert gc.isenabled()
    assert parse_restore(text) == _parse(text, shortcuts=False)
    assert gc.isenabled()
    with pytest.raises(ParseError):
        parse_restore(text.replace("0.7/32", "0.777/32"))
    assert gc.isenabled()
    gc.disable()
    try:
        parse_restore(text)
        assert not gc.isenabled()
    finally:
        gc.enable()


# -- the pieces ----------------------------------------------------------------------------------

_DOTTED = re.compile(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})").fullmatch


def _reference_ipv4(text: str) -> int | None:
    m = _DOTTED(text)
    if m is None:
        return None
    a, b, c, d = map(int, m.groups())
    if max(a, b, c, d) > 255:
        return None
    return (a << 24) | (b << 16) | (c << 8) | d


def _reference_prefix(text: str) -> Prefix | str:
    addr_s, slash, mask_s = text.partition("/")
    full = 0xFFFFFFFF
    if not slash:
        mask = full
    elif mask_s.isdigit():
        if int(mask_s) > 32:
            return f"invalid mask `{mask_s}' specified"
        mask = (full << (32 - int(mask_s))) & full
    else:
        m = _reference_ipv4(mask_s)
        if m is None:
            return f"invalid mask `{mask_s}' specified"
        mask = m
    addr = _reference_ipv4(addr_s)
    if addr is None:
        return f"host/network `{addr_s}' not found"
    return Prefix(addr & mask, mask, 32)


def test_dotted_quads_as_the_regular_expression_reads_them() -> None:
    rng = random.Random(3)
    pieces = ["0", "1", "9", "10", "01", "00", "255", "256", "199", "099", "1000", "", "+1",
              " 1", "\u0661", "\u00b2", "a", "1_0", "-0"]
    seen_fast = seen_slow = 0
    for _ in range(20000):
        parts = [rng.choice(pieces) for _ in range(rng.choice((3, 4, 4, 4, 5)))]
        text = ".".join(parts)
        if rng.random() < 0.5:
            text += "/" + rng.choice(["32", "24", "0", "032", "33", "", "255.255.0.0", "x",
                                      "\u0663\u0662", "8"])
        want = _reference_prefix(text)
        try:
            got: Prefix | str = parse_prefix(text, 32)
        except ValueError_ as e:
            got = str(e)
        assert got == want, text
        addr = text.partition("/")[0]
        try:
            value: int | None = parse_address(addr, 32)
        except ValueError_:
            value = None
        assert value == _reference_ipv4(addr), addr
        if value is not None:
            canonical = all(p == str(int(p)) and p.isascii() for p in addr.split("."))
            seen_fast += canonical
            seen_slow += not canonical
    assert seen_fast > 100 and seen_slow > 100


def test_word_texts_as_split_words() -> None:
    rng = random.Random(4)
    alphabet = [" ", "\t", '"', "\\", "a", "b", "-", "!", "'", "x y", '\\"', "\r"]
    for _ in range(20000):
        line = "".join(rng.choice(alphabet) for _ in range(rng.randrange(14)))
        try:
            want: list[str] | tuple[str, int] = [w.text for w in split_words(line, 5)]
        except TokenizeError as e:
            want = (e.message, e.col)
        try:
            got: list[str] | tuple[str, int] = word_texts(line, 5)
        except TokenizeError as e:
            got = (e.message, e.col)
        assert got == want, repr(line)


def test_fast_constructors_build_the_dataclasses() -> None:
    p = make_prefix(0xC6120000, 0xFFFF0000, 32)
    assert p == Prefix(0xC6120000, 0xFFFF0000, 32)
    assert hash(p) == hash(Prefix(0xC6120000, 0xFFFF0000, 32))
    m = Match("tcp", (Option("--dport", 22),))
    t = Target(TargetKind.VERDICT, "ACCEPT")
    values = [p, True, None, False, "eth0", True, "eth1", False, 6, True, False, (m,), t,
              (1, 2), 7, 3]
    assert [f.name for f in fields(Rule)] == list(iptables_fields := Rule.__slots__)
    r = make_rule(*values)
    ref = Rule(**dict(zip(iptables_fields, values, strict=True)))
    assert type(r) is Rule
    assert r == ref and hash(r) == hash(ref) and repr(r) == repr(ref)
    with pytest.raises(AttributeError):
        r.line = 8
    o = make_option("--dport", (22, 23), True)
    ref_o = Option("--dport", (22, 23), True)
    assert o == ref_o and hash(o) == hash(ref_o)
    assert make_match("tcp", (o,)) == Match("tcp", (o,))
    assert hash(make_match("tcp", (o,))) == hash(Match("tcp", (o,)))
