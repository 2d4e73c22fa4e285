"""getopt's view of a command line: long aliases, abbreviations, `--opt=value`, `-ptcp`."""

from __future__ import annotations

import functools
import re

from bpfilter.grammar.shapes import grammar_text, lark_parser
from bpfilter.grammar.tokenize import Word

# getopt long names iptables accepts for its core options, and extension aliases.
LONG_ALIASES = {
    "--append": "-A", "--check": "-C", "--delete": "-D", "--insert": "-I", "--replace": "-R",
    "--list": "-L", "--list-rules": "-S", "--flush": "-F", "--zero": "-Z",
    "--new-chain": "-N", "--new": "-N", "--delete-chain": "-X", "--rename-chain": "-E",
    "--policy": "-P", "--source": "-s", "--src": "-s", "--destination": "-d", "--dst": "-d",
    "--in-interface": "-i", "--out-interface": "-o", "--protocol": "-p", "--jump": "-j",
    "--goto": "-g", "--match": "-m", "--fragment": "-f", "--set-counters": "-c",
    "--table": "-t", "--ipv4": "-4", "--ipv6": "-6", "--verbose": "-v", "--numeric": "-n",
    "--exact": "-x",
    "--source-port": "--sport", "--destination-port": "--dport",
    "--source-ports": "--sports", "--destination-ports": "--dports",
    "--hashlimit": "--hashlimit-upto",
}
# Short options that take an argument and may be glued to it (`-ptcp`).
GLUED = frozenset({"-s", "-d", "-i", "-o", "-p", "-j", "-g", "-m", "-A", "-C", "-D", "-I",
                   "-R", "-N", "-E", "-P", "-c", "-t"})


@functools.cache
def _arity_patterns() -> list[tuple[re.Pattern[str], int]]:
    """How many argument words follow each option, read from the grammar's terminals."""
    arity = {"OPT1": 1, "OPT2": 2, "CNT": 1, "CMD_CHAIN": 1, "CMD_NUM": 1, "CMD_REPLACE": 2,
             "CMD_NEW": 1, "CMD_TWO": 2}
    return [(re.compile(t.pattern.to_regexp()), arity[t.name]) for t in lark_parser().terminals
            if t.name in arity]


@functools.lru_cache(maxsize=1024)
def arity(option: str) -> int:
    for pattern, n in _arity_patterns():
        if pattern.fullmatch(option):
            return n
    return 0


@functools.cache
def _long_options() -> tuple[str, ...]:
    """Every long option the grammar knows, plus the core long aliases."""
    names = set(re.findall(r'"(--[a-z0-9-]+)"', grammar_text()))
    return tuple(sorted(names | set(LONG_ALIASES)))


@functools.lru_cache(maxsize=1024)
def unabbreviate(name: str) -> str:
    """getopt_long accepts an unambiguous prefix of a long option."""
    if name in LONG_ALIASES or name in _long_options():
        return name
    found = [o for o in _long_options() if o.startswith(name)]
    if not found:
        return name
    shortest = min(found, key=len)
    # `--dpor` matches --dport and --dports: the one that prefixes all others wins, which is
    # what getopt picks when only the tcp match is loaded.
    if all(o.startswith(shortest) for o in found):
        return shortest
    targets = {LONG_ALIASES.get(o, o) for o in found}
    return targets.pop() if len(targets) == 1 else name


def normalize(words: list[Word], *, glued: bool = False) -> list[Word]:
    """getopt's view of the words: `--opt=value` split, long aliases and abbreviations
    expanded, and (`glued`, for iptables command lines) `-ptcp` split. iptables-restore
    does not split glued short options.

    Words that are the argument of an option are left alone, as getopt leaves them.
    """
    out: list[Word] = []
    changed = False
    pending = 0
    for w in words:
        t = w.text
        if pending:
            pending -= 1
            out.append(w)
            continue
        if len(t) > 2 and t[0] == "-":
            if t[1] == "-":
                name, eq, value = t.partition("=")
                name = unabbreviate(name)
                if name in LONG_ALIASES:
                    name = LONG_ALIASES[name]
                    changed = True
                if eq:
                    out.append(Word(name, w.col, w.quoted))
                    out.append(Word(value, w.col + len(t) - len(value), w.quoted))
                    changed = True
                    pending = max(arity(name) - 1, 0)
                    continue
                if name != t:
                    out.append(Word(name, w.col, w.quoted))
                    changed = True
                    pending = arity(name)
                    continue
            elif glued and t[:2] in GLUED:
                out.append(Word(t[:2], w.col, False))
                out.append(Word(t[2:], w.col + 2, False))
                changed = True
                pending = max(arity(t[:2]) - 1, 0)
                continue
        if t != "!":
            pending = arity(t)
        out.append(w)
    return out if changed else words


