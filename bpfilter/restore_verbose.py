"""What ``iptables-restore -v`` prints on standard output, for the tables bpfilter commits.

iptables-restore (legacy 1.8.9) echoes every ``#`` line as it reads it; at a ``*table`` line
without --noflush it flushes every chain of the table as it is in force ("Flushing chain
`C'", built-in chains in hook order, then user chains by name; a table not yet in force has
just its built-in chains) and deletes the user chains ("Deleting chain `C'"); without
--noflush it also runs each rule line with ``-v``, which prints the rules -A/-I/-R/-D add or
remove (-D by number prints nothing) and the chains -F/-X/-Z act on. With --noflush the rule
lines print nothing. Verified against iptables-legacy-restore -v in a throwaway namespace.
"""

from __future__ import annotations

import functools

from bpfilter.grammar.tokenize import TokenizeError, split_words
from bpfilter.ir.model import Table

_VERB = {"-F": "Flushing", "-X": "Deleting", "-Z": "Zeroing"}


def comments(lines: list[str], first: int, last: int) -> str:
    """The ``#`` lines among input lines ``first``..``last`` (1-based, inclusive)."""
    return "".join(line + "\n" for line in lines[max(first, 1) - 1:last]
                   if line.startswith("#"))


def _ordered(base: list[str], user: set[str]) -> list[str]:
    return base + sorted(user, key=lambda n: n.encode())


def table_text(lines: list[str], first: int, last: int, before: Table, after: Table,
               family: int, noflush: bool) -> str:
    """The -v output for one table: input lines ``first`` (its ``*table``) to ``last`` (its
    COMMIT). ``before`` is the table in force before the restore (or an empty one),
    ``after`` the table as the input leaves it (rules are printed in its context)."""
    base = [c.name for c in before.chains if c.is_base]
    user = {c.name for c in before.chains if not c.is_base}
    out = []
    if not noflush:
        out += [f"Flushing chain `{name}'\n" for name in _ordered(base, user)]
        out += [f"Deleting chain `{name}'\n" for name in _ordered([], user)]
        user = set()
    for line in lines[first:last]:
        if line.startswith("#"):
            out.append(line + "\n")
        elif line.startswith(":"):
            name = line[1:].split()[0] if line[1:].split() else ""
            if name not in base:
                user.add(name)
        elif line.startswith(("-", "[")):
            out.append(_command(line, after, family, base, user, noflush))
    return "".join(out)


def _command(line: str, table: Table, family: int, base: list[str], user: set[str],
             noflush: bool) -> str:
    """What one rule line prints; keeps ``user`` (the user chains so far) up to date."""
    # Imported here: iptables_cmd imports bpfilter.restore, which imports this module lazily.
    from bpfilter import iptables_cmd
    from bpfilter.grammar.errors import ParseError
    from bpfilter.restore import CliExit

    try:
        words = [w.text for w in split_words(line)]
    except TokenizeError:
        return ""
    if words and words[0].startswith("["):
        words = words[1:]
    try:
        cmd = iptables_cmd.parse_args(["-t", table.name, *words], family)
    except CliExit:
        return ""
    current = _ordered(base, user)
    if cmd.command in _VERB:
        names = [cmd.chain] if cmd.chain is not None else (
            _ordered([], user) if cmd.command == "-X" else current)
    else:
        names = []
    if cmd.command == "-N" and cmd.chain is not None:
        user.add(cmd.chain)
    elif cmd.command == "-X":
        user.difference_update(names)
    elif cmd.command == "-E" and cmd.chain is not None and cmd.args:
        user.discard(cmd.chain)
        user.add(cmd.args[0])
    if noflush:
        return ""
    if names:
        return "".join(f"{_VERB[cmd.command]} chain `{n}'\n" for n in names)
    if cmd.command not in ("-A", "-I", "-R", "-D") or not cmd.rulespec:
        return ""
    try:
        rules = iptables_cmd.build_rules(cmd, table)
    except (CliExit, ParseError, iptables_cmd.CommandFailed):
        return ""  # the restore itself reports what is wrong with the line
    return "".join(iptables_cmd.rule_line(r, table) for r in rules)


class Printer:
    """The -v output of one restore, built in input order: each table's lines as it is
    reached, the ``#`` lines between tables, and what delegated tables printed themselves."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.shown = 0  # input lines accounted for

    @functools.cached_property
    def lines(self) -> list[str]:
        # Split only when -v asks: a restore without it should not pay for a large input.
        return self.text.split("\n")

    def upto(self, line: int) -> str:
        """The ``#`` lines not yet shown up to input line ``line``."""
        text = comments(self.lines, self.shown + 1, line) if line > self.shown else ""
        self.shown = max(self.shown, line)
        return text

    def end_of(self, first: int) -> int:
        """The COMMIT line of the table whose ``*table`` is line ``first``."""
        for n in range(first, len(self.lines)):
            if self.lines[n] == "COMMIT":
                return n + 1
        return len(self.lines)

    def table(self, first: int, before: Table, after: Table, family: int,
              noflush: bool) -> str:
        """Comments before the table, then its own -v lines."""
        head = self.upto(first - 1)
        last = self.end_of(first)
        self.shown = max(self.shown, last)
        return head + table_text(self.lines, first, last, before, after, family, noflush)
