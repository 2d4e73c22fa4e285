"""Split one iptables-restore line into words exactly as iptables-restore does."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Word:
    """One argument: its text, 1-based column and whether any of it was double-quoted."""

    text: str
    col: int
    quoted: bool = False


class TokenizeError(Exception):
    def __init__(self, message: str, col: int) -> None:
        super().__init__(message)
        self.message = message
        self.col = col


_BLANKS = " \t\n"
# A word is a run of plain characters, optionally ended by a double-quoted part (the
# closing quote ends the word); backslash escapes the next character inside quotes.
_WORD = re.compile(r'([^ \t\n"]*)"((?:[^"\\]|\\.)*)"|([^ \t\n"]+)', re.S)
_ESCAPE = re.compile(r"\\(.)", re.S)


def split_words(line: str, offset: int = 0) -> list[Word]:
    """Blanks separate words; `"..."` groups with backslash escapes; `'` is a plain character.

    A closing quote ends the word. `offset` is the column offset of `line` in the source.
    """
    if '"' not in line:
        # Fast path for the common case: no quoting at all.
        out = []
        pos = 0
        n = len(line)
        while pos < n:
            while pos < n and line[pos] in _BLANKS:
                pos += 1
            if pos >= n:
                break
            start = pos
            while pos < n and line[pos] not in _BLANKS:
                pos += 1
            out.append(Word(line[start:pos], start + 1 + offset))
        return out
    words: list[Word] = []
    for m in _WORD.finditer(line):
        head, body, plain = m.group(1, 2, 3)
        if plain is not None:
            words.append(Word(plain, m.start() + 1 + offset))
        else:
            text = head + _ESCAPE.sub(r"\1", body)
            words.append(Word(text, m.start() + 1 + offset, True))
    rest = _WORD.sub("", line)
    if '"' in rest:
        raise TokenizeError("unterminated quoted string", line.rfind('"') + 1 + offset)
    return words


# _WORD, plus a quote no word could take (one without its closing quote) as group 4.
_WORD_OR_STRAY = re.compile(_WORD.pattern + '|(")', re.S)
_PLAIN_WORD = re.compile(r"[^ \t\n]+")


def word_texts(line: str, offset: int = 0) -> list[str]:
    """The texts of split_words(line, offset), without columns (faster: no Word objects);
    raises the same TokenizeError."""
    if '"' not in line:
        return _PLAIN_WORD.findall(line)
    out = []
    for head, body, plain, stray in _WORD_OR_STRAY.findall(line):
        if stray:
            raise TokenizeError("unterminated quoted string", line.rfind('"') + 1 + offset)
        if plain:
            out.append(plain)
        else:
            out.append(head + (_ESCAPE.sub(r"\1", body) if "\\" in body else body))
    return out
