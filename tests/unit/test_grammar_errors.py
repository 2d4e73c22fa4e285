"""ParseError: location, message and exit code."""

from __future__ import annotations

from bpfilter.grammar.errors import EXIT_LINE_FAILED, EXIT_PARAMETER, ParseError


def test_str_is_file_line_col_message() -> None:
    e = ParseError("unknown option \"--x\"", line=3, col=7, filename="rules.v4")
    assert str(e) == 'rules.v4:3:7: unknown option "--x"'
    assert (e.line, e.col, e.message, e.exit_code) == (3, 7, 'unknown option "--x"', 2)


def test_exit_codes_match_iptables_restore() -> None:
    assert EXIT_PARAMETER == 2
    assert EXIT_LINE_FAILED == 1
    assert ParseError("x", line=1, exit_code=EXIT_LINE_FAILED).exit_code == 1
