"""getopt emulation: aliases, abbreviations, `--opt=value`, glued short options, arity."""

from __future__ import annotations

from bpfilter.grammar.getopt import arity, normalize, unabbreviate
from bpfilter.grammar.tokenize import Word


def texts(words: list[str], glued: bool = False) -> list[str]:
    return [w.text for w in normalize([Word(t, i + 1) for i, t in enumerate(words)],
                                      glued=glued)]


def test_arity_comes_from_the_grammar() -> None:
    assert (arity("-s"), arity("--syn"), arity("--tcp-flags"), arity("-R"), arity("x")) == \
        (1, 0, 2, 2, 0)


def test_long_aliases_and_equals() -> None:
    assert texts(["--append", "INPUT", "--protocol=tcp", "--jump", "ACCEPT"]) == \
        ["-A", "INPUT", "-p", "tcp", "-j", "ACCEPT"]


def test_abbreviations() -> None:
    assert unabbreviate("--dpor") == "--dport"
    assert unabbreviate("--protoc") == "--protocol"
    assert unabbreviate("--zzz") == "--zzz"
    assert texts(["--protoc", "tcp"]) == ["-p", "tcp"]
    # --proto is policy's option; without policy loaded the rule builder reads it as -p.
    assert unabbreviate("--proto") == "--proto"


def test_glued_short_options_only_for_command_lines() -> None:
    assert texts(["-ptcp", "-s1.2.3.4"], glued=True) == ["-p", "tcp", "-s", "1.2.3.4"]
    assert texts(["-ptcp"]) == ["-ptcp"]


def test_arguments_are_left_alone() -> None:
    words = ["-j", "NFLOG", "--nflog-prefix", "-Ev0", "--comment", "--proto=x"]
    assert texts(words, glued=True) == words
    unchanged = [Word("-A", 1), Word("INPUT", 4)]
    assert normalize(unchanged) is unchanged
