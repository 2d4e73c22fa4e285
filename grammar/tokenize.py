"""Split one iptables-restore line into words exactly as iptables-restore does."""

from __future__ import annotations

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
    buf: list[str] = []
    start = -1
    quoted = False
    in_quote = False
    escaped = False
    for i, ch in enumerate(line):
        if in_quote:
            if escaped:
                buf.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_quote = False
                words.append(Word("".join(buf), start + 1 + offset, True))
                buf = []
                start = -1
                quoted = False
            else:
                buf.append(ch)
            continue
        if ch == '"':
            in_quote = True
            quoted = True
            if start < 0:
                start = i
            continue
        if ch in _BLANKS:
            if buf or (start >= 0 and quoted):
                words.append(Word("".join(buf), start + 1 + offset, quoted))
            buf = []
            start = -1
            quoted = False
            continue
        if start < 0:
            start = i
        buf.append(ch)
    if in_quote:
        raise TokenizeError("unterminated quoted string", start + 1 + offset)
    if buf:
        words.append(Word("".join(buf), start + 1 + offset, quoted))
    return words
