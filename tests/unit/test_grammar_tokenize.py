"""Tokenising as iptables-restore does: blanks, double quotes with escapes, literal quotes."""

from __future__ import annotations

import pytest

from bpfilter.grammar.tokenize import TokenizeError, split_words


def texts(line: str) -> list[str]:
    return [w.text for w in split_words(line)]


def test_blanks_split_and_columns_are_one_based() -> None:
    words = split_words("-A  INPUT\t-j ACCEPT")
    assert [(w.text, w.col) for w in words] == [("-A", 1), ("INPUT", 5), ("-j", 11),
                                                 ("ACCEPT", 14)]


def test_double_quotes_group_words_and_mark_them_quoted() -> None:
    words = split_words('--comment "a b" x')
    assert [(w.text, w.quoted) for w in words] == [("--comment", False), ("a b", True),
                                                   ("x", False)]


def test_backslash_escapes_inside_quotes_only() -> None:
    assert texts(r'"a\"b\\c"') == ['a"b\\c']
    assert texts(r"a\b") == ["a\\b"]


def test_single_quotes_are_ordinary_characters() -> None:
    assert texts("'single quoted'") == ["'single", "quoted'"]


def test_closing_quote_ends_the_word_and_empty_quotes_make_an_empty_word() -> None:
    assert texts('ab"c d"e') == ["abc d", "e"]
    assert texts('--comment ""') == ["--comment", ""]


def test_unterminated_quote_is_an_error() -> None:
    with pytest.raises(TokenizeError):
        split_words('--comment "abc')


def test_offset_shifts_columns() -> None:
    assert split_words("x", 5)[0].col == 6
