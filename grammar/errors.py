"""Parse errors with a source location and the exit code iptables-restore would use."""

from __future__ import annotations

# iptables-restore exit codes: parameter problems exit 2, "line N failed" and
# "COMMIT expected" exit 1.
EXIT_PARAMETER = 2
EXIT_LINE_FAILED = 1


class ParseError(Exception):
    """A refused input line: `str(e)` is `FILE:LINE:COL: MESSAGE`."""

    def __init__(
        self,
        message: str,
        *,
        line: int,
        col: int = 1,
        filename: str = "<stdin>",
        exit_code: int = EXIT_PARAMETER,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.col = col
        self.filename = filename
        self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.filename}:{self.line}:{self.col}: {self.message}"
