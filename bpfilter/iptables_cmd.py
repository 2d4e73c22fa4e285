"""bpfilter-iptables / bpfilter-ip6tables: one iptables command applied to the ruleset in force."""

from __future__ import annotations

import json
import math
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import IO, Any

from bpfilter import bpf, bpffs, delegate, lark_cache, netns, sets, state
from bpfilter.codegen.compiler import COUNTERS, HOOKS, CompileError
from bpfilter.dispatch import TableKey, pin_name
from bpfilter.grammar.errors import EXIT_PARAMETER, ParseError
from bpfilter.grammar.getopt import arity, normalize
from bpfilter.grammar.iptables import BUILTIN_CHAINS, CHAIN_NAME_MAX, parse_command, parse_restore
from bpfilter.grammar.tokenize import Word
from bpfilter.incremental import Blocklist, Rebuild, blocklist_change, rule_key
from bpfilter.ir import checks
from bpfilter.ir.iptables_save import format_rule
from bpfilter.ir.matches import ICMP6_TYPES, ICMP_TYPES, MATCHES, Ctx
from bpfilter.ir.model import Chain, Option, PortRange, Prefix, Rule, Ruleset, Table, TargetKind
from bpfilter.ir.optimizer import KeyField, _shapes, prefix_length
from bpfilter.ir.targets import TARGETS, UNSUPPORTED_TARGETS, VERDICTS
from bpfilter.ir.values import format_prefix_short, proto_name
from bpfilter.layout import edit_blob, find_rule
from bpfilter.loader import LoadError
from bpfilter.restore import EXIT_RESOURCE, CliExit, RestoreOptions, locked, restore_table

IPT = {4: "iptables", 6: "ip6tables"}
VERSION = "v1.8.9 (legacy)"
TOOL = {4: "bpfilter-iptables", 6: "bpfilter-ip6tables"}
EXIT_FAILED = 1  # the operation failed ("iptables: No chain/target/match by that name.")
EXIT_TABLE = 3  # the table cannot be initialised (iptables' VERSION_PROBLEM)

RULE_COMMANDS = frozenset({"-A", "-C", "-I", "-D", "-R"})
MUTATING = frozenset({"-A", "-I", "-D", "-R", "-N", "-X", "-F", "-Z", "-E", "-P"})
_COMMANDS = frozenset({"-A", "-C", "-I", "-D", "-R", "-L", "-S", "-F", "-Z", "-N", "-X",
                       "-E", "-P"})
_CLUSTER = frozenset("nvxLSFZXw46")
# Short options iptables itself knows; any other "-X" is an unknown option.
_SHORT = frozenset("ACIDRLSFZNXEPsdiopjgmfct46vnxwWhV")
_BLANK_AFTER = ("Couldn't load", "Can't use -", "--wait-interval only")
_STAND_IN = " "  # a chain name no command line can reach
# iptables' commands_v_options columns, in the order it reports an illegal one.
_OPTION_ORDER = ("-n", "-s", "-d", "-p", "-j", "-v", "-x", "-i", "-o", "--line-numbers",
                 "-c", "-f")
# Which of those each command accepts (the rule options of -A & co. come from the parser).
_LEGAL = {"-L": {"-n", "-v", "-x", "--line-numbers"}, "-S": {"-v"},
          "-A": {"-s", "-d", "-p", "-j", "-v", "-i", "-o", "-c", "-f"},
          "-P": {"-v", "-c"}}
_LEGAL["-I"] = _LEGAL["-R"] = _LEGAL["-A"]
_LEGAL["-D"] = _LEGAL["-C"] = _LEGAL["-A"] - {"-c"}

# libiptc's errno texts, as iptables prints them after "iptables: ".
NO_CHAIN = "No chain/target/match by that name."
BAD_RULE = "Bad rule (does a matching rule exist in that chain?)."
CHAIN_EXISTS = "Chain already exists."
IN_USE = "Too many links."
NOT_EMPTY = "Directory not empty."
INVALID = "Invalid argument. Run `dmesg' for more information."
FILE_EXISTS = "File exists."
BAD_BUILTIN = "Bad built-in chain name."
BAD_POLICY = "Bad policy name. Run `dmesg' for more information."
LOOP = "Too many levels of symbolic links."


class CommandFailed(Exception):
    """The operation failed on the ruleset (exit 1, nothing committed)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class CommandLine:
    """One parsed iptables command line."""

    family: int = 4
    command: str = ""
    chain: str | None = None
    args: tuple[str, ...] = ()  # after the chain: rule number, new name or policy
    rulespec: tuple[str, ...] = ()
    table: str = "filter"
    numeric: bool = False
    verbose: bool = False
    exact: bool = False
    line_numbers: bool = False
    zero: bool = False  # -Z given with -L
    wait: float | None = None
    netns: str | None = None
    json: bool = False
    warnings: tuple[str, ...] = ()


@dataclass(slots=True)
class Result:
    """What a command did: exit code, output, and the data --json prints."""

    code: int = 0
    out: str = ""
    err: str = ""
    data: dict[str, Any] = field(default_factory=dict)


def _param(family: int, message: str) -> CliExit:
    # These iptables messages end in a newline of their own: a blank line follows.
    blank = "\n" if message.startswith(_BLANK_AFTER) else ""
    return CliExit(EXIT_PARAMETER, err=f"{IPT[family]} {VERSION}: {message}\n{blank}"
                   + _try(family))


def _try(family: int) -> str:
    return f"Try `{IPT[family]} -h' or '{IPT[family]} --help' for more information.\n"


def _optional(args: list[str], i: int) -> bool:
    """iptables takes an optional argument from the next word unless it starts with - or !."""
    return i < len(args) and args[i][:1] not in ("-", "!")


def parse_args(argv: Sequence[str], family: int = 4) -> CommandLine:
    """iptables' getopt rules for the command, its chain and arguments and the listing
    options; everything else is the rule specification. Raises CliExit on usage errors."""
    words = normalize([Word(a, i) for i, a in enumerate(argv)], glued=True)
    args: list[str] = []
    for w in words:  # -nvL: clustered flags
        t = w.text
        if len(t) > 2 and t[0] == "-" and t[1] != "-" and set(t[1:]) <= _CLUSTER:
            args.extend(f"-{c}" for c in t[1:])
        else:
            args.append(t)
    o: dict[str, Any] = {"family": family}
    spec: list[str] = []
    seen: list[str] = []  # listing options, for the legality check
    i = 0

    def value(opt: str) -> str:
        nonlocal i
        if i + 1 >= len(args):
            raise _param(family, f"option \"{opt}\" requires an argument")
        i += 1
        return args[i]

    while i < len(args):
        a = args[i]
        if a in _COMMANDS:
            if o.get("command") and not {a, o["command"]} == {"-L", "-Z"}:
                raise _param(family, f"Cannot use {a} with {o['command']}")
            if a == "-Z" and o.get("command") == "-L":
                o["zero"] = True
            elif a == "-L" and o.get("command") == "-Z":
                o["command"], o["zero"] = "-L", True
            else:
                o["command"] = a
            rest: list[str] = []
            if a in ("-A", "-C", "-I", "-D", "-R", "-N", "-E", "-P"):
                o["chain"] = value(a)
                if a in ("-E", "-P"):
                    if not _optional(args, i + 1):
                        raise _param(family, "-E requires old-chain-name and new-chain-name"
                                     if a == "-E" else "-P requires a chain and a policy")
                    i += 1
                    rest.append(args[i])
                elif a == "-R":
                    if not _optional(args, i + 1):
                        raise _param(family, "-R requires a rule number")
                    i += 1
                    rest.append(args[i])
                elif a in ("-I", "-D") and _optional(args, i + 1):
                    i += 1
                    rest.append(args[i])
            elif _optional(args, i + 1):
                i += 1
                o["chain"] = args[i]
                if a in ("-L", "-S", "-Z") and _optional(args, i + 1):
                    i += 1
                    rest.append(args[i])
            o["args"] = tuple(rest)
        elif a in ("-t", "--table"):
            o["table"] = value(a)
        elif a in ("-w", "--wait"):
            o["wait"] = math.inf
            if _optional(args, i + 1):
                i += 1
                if not args[i].isdigit():
                    raise _param(family, "wait seconds not numeric")
                o["wait"] = float(args[i])
        elif a in ("-W", "--wait-interval"):
            o["warnings"] = ("Ignoring deprecated --wait-interval option.",)
            if _optional(args, i + 1):
                i += 1
        elif a == "--netns":
            o["netns"] = value(a)
        elif a == "--json":
            o["json"] = True
        elif a in ("-h", "--help"):
            raise CliExit(0, out=usage(family))
        elif a in ("-V", "--version"):
            # Tools (Docker among them) read the backend from this line.
            raise CliExit(0, out=f"{IPT[family]} {VERSION}\n")
        elif a in ("-n", "-v", "-x", "--line-numbers"):
            seen.append(a)
            key = {"-n": "numeric", "-v": "verbose", "-x": "exact",
                   "--line-numbers": "line_numbers"}[a]
            o[key] = True
        elif (a == "-6" and family == 4) or (a == "-4" and family == 6):
            raise CliExit(EXIT_PARAMETER, err=_try(family))
        elif a in ("-4", "-6"):
            pass
        elif len(a) == 2 and a[0] == "-" and a[1] not in _SHORT:
            raise _param(family, f"unknown option \"{a}\"")
        elif a.startswith("-") or a == "!":
            spec.append(a)
            n = arity(a)
            if a == "-c" and i + 1 < len(args) and "," not in args[i + 1]:
                n = 2  # -c PKTS BYTES (the grammar also takes -c PKTS,BYTES)
            spec.extend(args[i + 1:i + 1 + n])
            i += n
        else:
            raise CliExit(EXIT_PARAMETER, err=f"Bad argument `{a}'\n" + _try(family))
        i += 1
    if o.get("warnings") and "wait" not in o:
        raise CliExit(EXIT_PARAMETER, err="Ignoring deprecated --wait-interval option.\n"
                      + _param(family, "--wait-interval only makes sense with --wait").err)
    cmd = o.get("command")
    if not cmd:
        raise _param(family, "no command specified")
    legal = _LEGAL.get(cmd, {"-v"})
    if cmd == "-D" and o.get("args"):
        legal = {"-v"}  # delete by number
    present = set(seen) | {w for w in spec if w in _OPTION_ORDER}
    for opt in _OPTION_ORDER:
        if opt in present and opt not in legal:
            shown = "-0" if opt == "--line-numbers" else opt
            raise _param(family, f"Illegal option `{shown}' with this command")
    if cmd not in RULE_COMMANDS and spec and not (cmd == "-P" and spec[0] == "-c"):
        raise _param(family, f"Illegal option `{spec[0]}' with this command")
    for n in o.get("args", ()):
        if cmd in ("-I", "-D", "-R", "-L", "-S", "-Z") and not _rulenum_ok(n):
            raise _param(family, f"Invalid rule number `{n}'")
    if o.get("netns") is not None:
        try:
            netns.check_name(o["netns"])
        except netns.NetnsError as e:
            raise CliExit(EXIT_PARAMETER, err=f"{TOOL[family]}: {e}\n") from None
    o["rulespec"] = tuple(spec)
    return CommandLine(**o)


def usage(family: int) -> str:
    """What -h prints."""
    return (f"{TOOL[family]}: iptables' single commands on the ruleset bpfilter has loaded\n"
            f"Usage: {TOOL[family]} -[ACD] chain rule-specification [options]\n"
            f"       {TOOL[family]} -I chain [rulenum] rule-specification [options]\n"
            f"       {TOOL[family]} -R chain rulenum rule-specification [options]\n"
            f"       {TOOL[family]} -D chain rulenum [options]\n"
            f"       {TOOL[family]} -[LS] [chain [rulenum]] [options]\n"
            f"       {TOOL[family]} -[FZ] [chain] [options]\n"
            f"       {TOOL[family]} -[NX] chain\n"
            f"       {TOOL[family]} -E old-chain-name new-chain-name\n"
            f"       {TOOL[family]} -P chain target [options]\n"
            "Options: -t table, -n, -v, -x, --line-numbers, -w [seconds], -W usecs,\n"
            "         --netns NAME (a namespace from `ip netns list`), --json\n")


def _rulenum_ok(text: str) -> bool:
    return text.isdigit() and int(text) >= 1


# --- the operations ---------------------------------------------------------------------------

def empty_table(family: int, name: str) -> Table:
    """A table as a fresh iptables has it: built-in chains, ACCEPT policies, no rules."""
    table = parse_restore(f"*{name}\nCOMMIT\n", family=family).table(name)
    assert table is not None
    return table


def _chains(table: Table) -> dict[str, Chain]:
    return {c.name: c for c in table.chains}


def _with(table: Table, chains: dict[str, Chain]) -> Table:
    return replace(table, chains=tuple(chains.values()))


def build_rules(cmd: CommandLine, table: Table) -> list[Rule]:
    """The rules of the command's rule specification (more than one when -s/-d list several
    addresses), parsed against ``table`` so that -j can name its user chains."""
    assert cmd.chain is not None
    # iptables parses the rule before it looks for the chain: a missing one is parsed as a
    # stand-in user chain that no -j can name.
    chain = cmd.chain if table.chain(cmd.chain) is not None else _STAND_IN
    try:
        return _parse_rules(cmd, table, chain)
    except ParseError as e:
        if e.exit_code == EXIT_PARAMETER:
            raise _param(cmd.family, e.message) from None
    # Appended there, the rule closes a loop; apply() checks the table as it really ends up
    # (-I, -R and the kernel's walk decide), and -D/-C just find no such rule.
    return _parse_rules(cmd, table, _STAND_IN)


def _parse_rules(cmd: CommandLine, table: Table, chain: str) -> list[Rule]:
    old = table.chain(chain)
    base = table if old is not None else replace(table, chains=(*table.chains, Chain(chain)))
    parsed = parse_command(["-A", chain, *cmd.rulespec], family=cmd.family, table=table.name,
                           base=Ruleset((base,)))
    got = parsed.table(table.name)
    assert got is not None
    new = got.chain(chain)
    assert new is not None
    return list(new.rules[len(old.rules) if old is not None else 0:])


def _key(r: Rule) -> Rule:
    return replace(r, counters=None, line=0, col=0)


def _references(table: Table, name: str) -> int:
    return sum(1 for c in table.chains for r in c.rules
               if r.target is not None and r.target.name == name
               and r.target.kind in (TargetKind.JUMP, TargetKind.GOTO))


def _is_target_name(name: str) -> bool:
    return name in VERDICTS or name in TARGETS or name in UNSUPPORTED_TARGETS \
        or name == "QUEUE"


def apply(cmd: CommandLine, table: Table, rules: list[Rule] | None = None) -> Table:
    """The table after a changing command; CommandFailed (nothing changes) when libiptc
    would refuse it. ``rules`` are the built rules of a rule command."""
    chains = _chains(table)
    c = chains.get(cmd.chain) if cmd.chain is not None else None
    n = int(cmd.args[0]) if cmd.args and cmd.command in ("-I", "-D", "-R") else None
    if cmd.command in RULE_COMMANDS:
        if c is None:
            # libiptc's message for a missing chain depends on the operation.
            raise CommandFailed(BAD_RULE if cmd.command == "-D" and n is None else NO_CHAIN)
        body = list(c.rules)
        if cmd.command == "-D" and n is not None:
            if n > len(body):
                raise CommandFailed("Index of deletion too big.")
            del body[n - 1]
        else:
            assert rules is not None
            if cmd.command == "-A":
                body.extend(rules)
            elif cmd.command == "-I":
                pos = (n or 1) - 1
                if pos > len(body):
                    raise CommandFailed("Index of insertion too big.")
                body[pos:pos] = rules[::-1]  # each expanded rule inserted at the same place
            elif cmd.command == "-R":
                assert n is not None
                if n > len(body):
                    raise CommandFailed("Index of replacement too big.")
                body[n - 1] = rules[0]
            elif cmd.command == "-D":
                for r in rules:
                    k = _key(r)
                    i = next((i for i, o in enumerate(body) if _key(o) == k), None)
                    if i is None:
                        raise CommandFailed(missing_rule(r))
                    del body[i]
        chains[c.name] = replace(c, rules=tuple(body))
        if cmd.command != "-D" and checks.find_loop(_with(table, chains)) is not None:
            raise CommandFailed(LOOP)
    elif cmd.command == "-N":
        assert cmd.chain is not None
        _check_new_name(cmd.family, cmd.chain)
        if c is not None:
            raise CommandFailed(CHAIN_EXISTS)
        chains[cmd.chain] = Chain(cmd.chain)
    elif cmd.command == "-X":
        names = [cmd.chain] if cmd.chain is not None else \
            [x.name for x in table.chains if not x.is_base]
        error = None
        for name in names:
            x = chains.get(name)
            if x is None:
                error = NO_CHAIN
            elif x.is_base:
                error = INVALID
            elif _references(table, name):
                error = IN_USE
            elif x.rules:
                error = NOT_EMPTY
            else:
                del chains[name]
        if error is not None:
            raise CommandFailed(error)
    elif cmd.command == "-F":
        if cmd.chain is not None and c is None:
            raise CommandFailed(NO_CHAIN)
        for x in ([c] if c is not None else list(chains.values())):
            chains[x.name] = replace(x, rules=())
    elif cmd.command == "-E":
        assert cmd.chain is not None
        new = cmd.args[0]
        _check_new_name(cmd.family, new, renaming=True)
        if new in chains or new in VERDICTS or new == "QUEUE":
            raise CommandFailed(FILE_EXISTS)
        if c is None or c.is_base:
            raise CommandFailed(NO_CHAIN)
        renamed = {}
        for name, x in chains.items():
            x = replace(x, rules=tuple(_renamed(r, cmd.chain, new) for r in x.rules))
            renamed[new if name == cmd.chain else name] = \
                replace(x, name=new) if name == cmd.chain else x
        chains = renamed
    elif cmd.command == "-P":
        policy = cmd.args[0]
        if c is None or not c.is_base:
            raise CommandFailed(BAD_BUILTIN)
        if policy not in ("ACCEPT", "DROP"):
            raise CommandFailed(BAD_POLICY)
        chains[c.name] = replace(c, policy=policy)
    elif cmd.command in ("-Z", "-L", "-S") and cmd.chain is not None and c is None:
        raise CommandFailed(NO_CHAIN)
    return _with(table, chains)


def _check_new_name(family: int, name: str, *, renaming: bool = False) -> None:
    if len(name) > CHAIN_NAME_MAX:
        raise _param(family, f"chain name `{name}' too long (must be under "
                     f"{CHAIN_NAME_MAX + 1} chars)")
    if name.startswith("-"):
        raise _param(family, "chain name not allowed to start with `-'")
    if not renaming and _is_target_name(name):
        raise _param(family, "chain name may not clash with target name")


def _renamed(r: Rule, old: str, new: str) -> Rule:
    t = r.target
    if t is not None and t.name == old and t.kind in (TargetKind.JUMP, TargetKind.GOTO):
        return replace(r, target=replace(t, name=new))
    return r


def missing_rule(r: Rule) -> str:
    """libiptc's message when -D/-C find no such rule in an existing chain: a rule that jumps
    to a user chain gets "No chain/target/match by that name." (a libiptc quirk)."""
    t = r.target
    return NO_CHAIN if t is not None and t.kind in (TargetKind.JUMP, TargetKind.GOTO) \
        else BAD_RULE


def check(cmd: CommandLine, table: Table, rules: list[Rule]) -> bool:
    """-C: True when every built rule exists in the chain, else CommandFailed with the
    message iptables prints."""
    c = table.chain(cmd.chain or "")
    if c is None:
        raise CommandFailed(BAD_RULE)
    keys = [_key(r) for r in c.rules]
    missing = next((r for r in rules if _key(r) not in keys), None)
    if missing is not None:
        raise CommandFailed(missing_rule(missing))
    return True


# --- listing ----------------------------------------------------------------------------------

def _bits(table: Table) -> int:
    return 128 if table.family.value == "ip6" else 32


def _selected(cmd: CommandLine, table: Table) -> list[Chain]:
    base = [c for c in table.chains if c.is_base]
    user = sorted((c for c in table.chains if not c.is_base), key=lambda c: c.name.encode())
    chains = base + user
    if cmd.chain is not None:
        chains = [c for c in chains if c.name == cmd.chain]
    return chains


def list_rules(cmd: CommandLine, table: Table) -> str:
    """-S [CHAIN [NUM]]: iptables-save's rule lines after the -P and -N lines."""
    bits = _bits(table)
    chains = _selected(cmd, table)
    lines: list[str] = []
    num = int(cmd.args[0]) if cmd.args else None
    if num is None:
        for c in chains:
            if c.is_base:
                counts = f" -c {c.counters[0]} {c.counters[1]}" if cmd.verbose \
                    and c.counters else (" -c 0 0" if cmd.verbose else "")
                lines.append(f"-P {c.name} {c.policy}{counts}")
            else:
                lines.append(f"-N {c.name}")
    for c in chains:
        for i, r in enumerate(c.rules, 1):
            if num is not None and i != num:
                continue
            lines.append(_save_line(r, c.name, bits, table.name, cmd.verbose))
    return "".join(line + "\n" for line in lines)


def _save_line(r: Rule, chain: str, bits: int, table: str, verbose: bool) -> str:
    full = format_rule(r, chain, bits=bits, table=table)
    if not verbose:
        return full
    # -S -v puts the counters just before the target.
    head = format_rule(replace(r, target=None), chain, bits=bits, table=table)
    p, b = r.counters or (0, 0)
    return f"{head} -c {p} {b}{full[len(head):]}"


def _num(n: int, exact: bool, table: bool = True) -> str:
    if exact:
        return f"{n:8d} " if table else f"{n} "
    if n <= 99999:
        return f"{n:5d} " if table else f"{n} "
    for unit in "KMGT":
        n = (n + 500) // 1000
        if n <= 9999 or unit == "T":
            return f"{n:4d}{unit} " if table else f"{n}{unit} "
    raise AssertionError("unreachable")


def _addr(p: Prefix | None, bits: int, numeric: bool) -> str:
    if p is None or p.mask == 0:
        if not numeric:
            return "anywhere"
        return "0.0.0.0/0" if bits == 32 else "::/0"
    return format_prefix_short(p)


def _proto(r: Rule, numeric: bool) -> str:
    n = r.proto or 0
    if numeric:
        return str(n)
    return "all" if n == 0 else proto_name(n)


def _port(port: int, proto: str, numeric: bool) -> str:
    if not numeric:
        try:
            return socket.getservbyport(port, proto)
        except (OSError, OverflowError):
            pass
    return str(port)


def _ports(name: str, r: PortRange, neg: bool, proto: str, numeric: bool) -> str:
    inv = "!" if neg else ""
    if r.lo == r.hi:
        return f" {name}:{inv}{_port(r.lo, proto, numeric)}"
    return f" {name}s:{inv}{_port(r.lo, proto, numeric)}:{_port(r.hi, proto, numeric)}"


_TCP_PRINTED = frozenset({"--sport", "--dport", "--tcp-flags", "--tcp-option"})
_TCP_FLAGS = (("FIN", 0x01), ("SYN", 0x02), ("RST", 0x04), ("PSH", 0x08), ("ACK", 0x10),
              ("URG", 0x20), ("ECE", 0x40), ("CWR", 0x80))
# The first name of each (type, code range), as libxt_icmp lists them.
_ICMP_NAMES: dict[tuple[int, int, int], str] = {}
_ICMP6_NAMES: dict[tuple[int, int, int], str] = {}
for _names, _types in ((_ICMP_NAMES, ICMP_TYPES), (_ICMP6_NAMES, ICMP6_TYPES)):
    for _name, _value in _types.items():
        _names.setdefault(_value, _name)


def _tcp_flags(bits: int) -> str:
    return ",".join(n for n, b in _TCP_FLAGS if bits & b) or "NONE"


def _tcp_udp(kind: str, opts: dict[str, Option], numeric: bool) -> str:
    """libxt_tcp / libxt_udp's print: ports, then option, then flags."""
    text = f" {kind}"
    for name, short in (("--sport", "spt"), ("--dport", "dpt")):
        if name in opts:
            o = opts[name]
            assert isinstance(o.value, PortRange)
            text += _ports(short, o.value, o.negated, kind, numeric)
    if "--tcp-option" in opts:
        o = opts["--tcp-option"]
        text += f" option={'!' if o.negated else ''}{o.value}"
    if "--tcp-flags" in opts:
        o = opts["--tcp-flags"]
        assert isinstance(o.value, tuple)
        mask, cmp = o.value
        text += f" flags:{'!' if o.negated else ''}"
        text += f"0x{mask:02X}/0x{cmp:02X}" if numeric else \
            f"{_tcp_flags(mask)}/{_tcp_flags(cmp)}"
    return text


def _icmp(value: tuple[int, int, int], neg: bool, numeric: bool,
          names: dict[tuple[int, int, int], str]) -> str:
    """libxt_icmp's (libip6t_icmp6's) print, after " icmp" (" ipv6-icmp")."""
    icmp_type, lo, hi = value
    if not numeric and value in names:
        return f" {'!' if neg else ''}{names[value]}"
    text = (" !" if neg else "") + f"type {icmp_type}"
    if lo == hi:
        return text + f" code {lo}"
    if (lo, hi) != (0, 255):
        return text + f" codes {lo}-{hi}"
    return text


def _extras(r: Rule, chain: str, table: Table, numeric: bool) -> str:
    """What the match and target extensions print after the addresses (iptables -L)."""
    proto = proto_name(r.proto) if r.proto else "tcp"
    ctx = Ctx(_bits(table), r.proto, r.proto_neg, table.name, chain)
    out = []
    for m in r.matches:
        opts = {o.name: o for o in m.options}
        if m.kind in ("tcp", "udp") and set(opts) <= _TCP_PRINTED:
            out.append(_tcp_udp(m.kind, opts, numeric))
        elif m.kind == "multiport" and len(opts) == 1:
            o = m.options[0]
            assert isinstance(o.value, tuple)
            ports = ",".join(_port(p.lo, proto, numeric) if p.lo == p.hi else
                             f"{_port(p.lo, proto, numeric)}:{_port(p.hi, proto, numeric)}"
                             for p in o.value)
            out.append(f" multiport {o.name[2:]} {' !' if o.negated else ''}{ports}")
        elif m.kind == "comment":
            out.append(f" /* {m.options[0].value} */")
        elif m.kind in ("icmp", "icmp6") and len(opts) == 1 \
                and isinstance(m.options[0].value, tuple):
            names = _ICMP_NAMES if m.kind == "icmp" else _ICMP6_NAMES
            out.append((" icmp" if m.kind == "icmp" else " ipv6-icmp")
                       + _icmp(m.options[0].value, m.options[0].negated, numeric, names))
        else:
            out.append(" " + _generic(MATCHES[m.kind].save(opts, ctx)))
    t = r.target
    if t is not None and t.kind is TargetKind.EXTENSION:
        text = TARGETS[t.name].save({o.name: o for o in t.options}, ctx)
        if text:
            out.append(" " + _generic(text))
    return "".join(out)


def _generic(save_text: str) -> str:
    # The listing form of options iptables-save prints as --name value: name value.
    return " ".join(w[2:] if w.startswith("--") else w for w in save_text.split(" "))


def _target_name(r: Rule) -> str:
    return r.target.name if r.target is not None else ""


def _rule_row(cmd: CommandLine, r: Rule, chain: str, table: Table, num: int) -> str:
    bits = _bits(table)
    out = []
    if cmd.line_numbers:
        out.append(f"{num:<4d} ")
    if cmd.verbose:
        p, b = r.counters or (0, 0)
        out.append(_num(p, cmd.exact) + _num(b, cmd.exact))
    out.append(f"{_target_name(r):<9s} ")
    out.append("!" if r.proto_neg else " ")
    out.append(f"{_proto(r, cmd.numeric):<4s} ")
    frag = r.fragment
    out.append(("!" if frag is False else "-") + ("f" if frag is not None else "-") + " ")
    if cmd.verbose:
        for name, neg, text in (("iif", r.iif_neg, r.iif), ("oif", r.oif_neg, r.oif)):
            iface = ("!" if neg else "") + (text if text else ("*" if cmd.numeric else "any"))
            out.append(f" {iface:<6s} " if name == "iif" else f"{iface:<6s} ")
    out.append(("!" if r.src_neg else " ") + f"{_addr(r.src, bits, cmd.numeric):<19s} ")
    out.append(("!" if r.dst_neg else " ") + f"{_addr(r.dst, bits, cmd.numeric):<19s} ")
    out.append(_extras(r, chain, table, cmd.numeric))
    return "".join(out) + "\n"


def _header(cmd: CommandLine) -> str:
    out = "num  " if cmd.line_numbers else ""
    if cmd.verbose:
        out += "    pkts      bytes " if cmd.exact else " pkts bytes "
    out += "target    " + " prot " + "opt"
    if cmd.verbose:
        out += " in     out    "
    return out + " source              " + " destination         \n"


def list_table(cmd: CommandLine, table: Table) -> str:
    """-L [CHAIN [NUM]] in iptables' table format (-n, -v, -x, --line-numbers)."""
    chains = _selected(cmd, table)
    if cmd.args:
        num = int(cmd.args[0])
        return "".join(_rule_row(cmd, r, c.name, table, i) for c in chains
                       for i, r in enumerate(c.rules, 1) if i == num)
    blocks = []
    for c in chains:
        if c.is_base:
            head = f"Chain {c.name} (policy {c.policy}"
            if cmd.verbose:
                p, b = c.counters or (0, 0)
                head += f" {_num(p, cmd.exact, False)}packets, {_num(b, cmd.exact, False)}bytes"
            head += ")\n"
        else:
            head = f"Chain {c.name} ({_references(table, c.name)} references)\n"
        rows = "".join(_rule_row(cmd, r, c.name, table, i) for i, r in enumerate(c.rules, 1))
        blocks.append(head + _header(cmd) + rows)
    return "\n".join(blocks)


def rule_line(r: Rule, table: Table) -> str:
    """The rule as `iptables -v` prints it for -A/-I/-D/-R/-C."""
    bits = _bits(table)
    t = _target_name(r)
    frag = r.fragment
    opt = ("!" if frag is False else "-") + ("f" if frag is not None else "-")
    iif = ("!" if r.iif_neg else "") + (r.iif or "*")
    oif = ("!" if r.oif_neg else "") + (r.oif or "*")
    src = ("!" if r.src_neg else " ") + _addr(r.src, bits, True)
    dst = ("!" if r.dst_neg else " ") + _addr(r.dst, bits, True)
    return (f"{t} {'!' if r.proto_neg else ' '}{_proto(r, False)} opt {opt} in {iif} "
            f"out {oif} {src}  ->{dst}  {_extras(r, '', table, True)}\n")


# --- running ----------------------------------------------------------------------------------

def _zero(live: state.LiveTable, chain: str | None) -> None:
    """Zero the live counters (of one chain): a map update, no new generation."""
    try:
        fd = bpffs.get(pin_name(live.key, f"g{live.generation}-map-{COUNTERS}"), live.netns)
    except bpffs.BpffsError:
        return
    ncpu = bpf.possible_cpus()
    zero = [bytes(16)] * ncpu
    if live.layout is not None:
        layout = live.layout
        slots = [s for c in live.table.chains if chain is None or c.name == chain
                 for s in ([layout.policy[c.name]] if c.name in layout.policy else [])
                 + list(layout.slots.get(c.name, ()))]
    else:
        slots = [index for index, ref in live.compiled().rule_index.items()
                 if chain is None or ref.chain == chain]
    with bpf.map_from_fd(fd, COUNTERS) as m:
        for index in slots:
            m.update_percpu(index.to_bytes(4, "little"), zero)


def run(cmd: CommandLine) -> Result:
    """Apply one command to the ruleset in force in ``cmd.netns``; the caller holds the lock
    for changing commands and has checked root."""
    family = cmd.family
    if cmd.table not in BUILTIN_CHAINS:
        return Result(EXIT_TABLE, err=f"{IPT[family]} {VERSION}: can't initialize {IPT[family]} "
                      f"table `{cmd.table}': Table does not exist (do you need to insmod?)\n"
                      f"Perhaps {IPT[family]} or your kernel needs to be upgraded.\n")
    key = TableKey(family, cmd.table) if cmd.table in HOOKS else None
    if key is not None:
        quick = _blocklist_command(cmd, key)
        if quick is not None:
            return quick
    live = state.live_table(key, cmd.netns) if key is not None else None
    table = live.table if live is not None else empty_table(family, cmd.table)
    if live is not None and cmd.verbose and cmd.command in ("-L", "-S"):
        table = state.with_counters(live)
    rules = build_rules(cmd, table) if cmd.command in RULE_COMMANDS else None
    out = "".join(rule_line(r, table) for r in rules) if cmd.verbose and rules else ""
    if cmd.command == "-C":
        assert rules is not None
        try:
            check(cmd, table, rules)
        except CommandFailed as e:
            return Result(EXIT_FAILED, out, f"{IPT[family]}: {e.message}\n", {"exists": False})
        return Result(0, out, data={"exists": True})
    new = apply(cmd, table, rules)
    if cmd.command == "-L":
        text = list_table(cmd, new)
        if cmd.zero and live is not None:
            _zero(live, cmd.chain)
        return Result(0, text, data={"chains": _chains_json(cmd, new)})
    if cmd.command == "-S":
        text = list_rules(cmd, new)
        return Result(0, text, data={"rules": text.splitlines()})
    if cmd.verbose and cmd.command in ("-Z", "-X", "-F"):
        out += _verbose_chains(cmd, table)
    if cmd.command == "-Z":
        if live is not None:
            _zero(live, cmd.chain)
        return Result(0, out)
    if new == table:  # unchanged rules are the same objects: this is cheap
        return Result(0, out, data={"changed": False})
    if key is None:
        return Result(EXIT_FAILED, err=f"{TOOL[family]}: table '{cmd.table}' cannot be "
                      f"compiled to eBPF by bpfilter (it compiles {' and '.join(sorted(HOOKS))})"
                      "\n")
    # -c PKTS BYTES on a rule command sets that rule's counters.
    explicit = cmd.command in RULE_COMMANDS and "-c" in cmd.rulespec
    done = restore_table(new, RestoreOptions(family=family, noflush=True, netns=cmd.netns,
                                             counters=explicit), live)
    return Result(0, out, data={"changed": True, "generation": done.generation,
                                "rules": done.rules, "programs": done.programs,
                                "incremental": done.incremental, "rebuilt": done.rebuilt})


_QUICK = frozenset({"-A", "-I", "-D"})


def _blocklist_command(cmd: CommandLine, key: TableKey) -> Result | None:
    """-A, -I or -D of one rule in a chain that is one exact lookup (a blocklist), done from
    the stored layout without reading the table's IR: the same outcome as the full path
    (``run``), which takes every other case (errors and their messages included): None."""
    if cmd.command not in _QUICK or cmd.verbose or cmd.chain is None or "-c" in cmd.rulespec:
        return None
    head = state.live_head(key, cmd.netns)
    b = head.layout.fast.get(cmd.chain) if head is not None else None
    if head is None or b is None:
        return None
    [seg] = head.layout.segments[cmd.chain]
    n = len(b.keys)
    num = int(cmd.args[0]) if cmd.args else None
    line: str | None = None
    if cmd.command == "-D" and num is not None:
        if num > n:
            return None
        pos, k, action = num - 1, b.keys[num - 1], None
    else:
        got = _blocklist_rule(cmd, b, seg.actions)
        if got is None:
            return None
        k, act, line = got
        if cmd.command == "-A":
            pos, action = n, act
        elif cmd.command == "-I":
            pos, action = (num or 1) - 1, act
            if pos > n:
                return None
        else:
            pos = find_rule(b.keys, b.acts, k, act)
            if pos < 0:
                return None
            action, line = None, None
    try:
        change = blocklist_change(head.layout, cmd.chain, pos, k, action,
                                  dirty=state.dirty_keys(head))
    except Rebuild:
        return None
    text = edit_blob(head.blob(), cmd.chain, n, pos,
                     None if line is None else line.encode("utf-8", "surrogateescape"))
    done = state.apply_change(head, change, text)
    rules = sum(len(s) for s in change.layout.slots.values())
    return Result(0, "", data={"changed": True, "generation": done.generation, "rules": rules,
                               "programs": done.prog_ids, "incremental": done.as_json(),
                               "rebuilt": None})


def _blocklist_rule(cmd: CommandLine, b: Blocklist,
                    actions: tuple[str, ...]) -> tuple[int, int, str] | None:
    """(key, action number, iptables-save line) of the command's one rule when it fits the
    blocklist ``b`` (same tests but the key, an action the code has); else None."""
    assert cmd.chain is not None
    builtin = cmd.chain in BUILTIN_CHAINS[cmd.table]
    head = f"*{cmd.table}\n" + ("" if builtin else f":{cmd.chain} - [0:0]\n")
    try:
        mini = parse_restore(head + b.rep + "\nCOMMIT\n", family=cmd.family)
        base = mini.table(cmd.table)
        assert base is not None
        rep_chain = base.chain(cmd.chain)
        assert rep_chain is not None and len(rep_chain.rules) == 1
        rules = _parse_rules(cmd, replace(base, chains=tuple(
            replace(c, rules=()) for c in base.chains)), cmd.chain)
    except (ParseError, CliExit):
        return None
    if len(rules) != 1:
        return None
    [rule] = rules
    field = KeyField(b.field)
    shape = _shapes([rep_chain.rules[0], rule])[field]
    if shape[0] is None or shape[0] != shape[1]:
        return None
    target = format_rule(Rule(target=rule.target), "X")
    k = rule_key(rule, field)
    prefix = rule.src if field is KeyField.SRC else rule.dst if field is KeyField.DST else None
    if target not in actions or k is None or (b.length is not None and (
            prefix is None or prefix_length(prefix) != b.length)):
        return None
    return k, actions.index(target), format_rule(rule, cmd.chain, table=cmd.table)


def _verbose_chains(cmd: CommandLine, table: Table) -> str:
    """What iptables -v says for each chain it zeroes, deletes or flushes."""
    verb = {"-Z": "Zeroing", "-X": "Deleting", "-F": "Flushing"}[cmd.command]
    chains = [cmd.chain] if cmd.chain is not None else [
        c.name for c in _selected(cmd, table) if cmd.command != "-X" or not c.is_base]
    return "".join(f"{verb} chain `{name}'\n" for name in chains)


def _chains_json(cmd: CommandLine, table: Table) -> list[dict[str, Any]]:
    out = []
    for c in _selected(cmd, table):
        rules = [{"num": i, "rule": format_rule(r, c.name, bits=_bits(table),
                                                table=table.name),
                  "packets": (r.counters or (0, 0))[0], "bytes": (r.counters or (0, 0))[1]}
                 for i, r in enumerate(c.rules, 1)]
        entry: dict[str, Any] = {"name": c.name, "policy": c.policy, "rules": rules,
                                 "references": None if c.is_base
                                 else _references(table, c.name)}
        if c.is_base:
            entry["packets"], entry["bytes"] = c.counters or (0, 0)
        out.append(entry)
    return out


def main(argv: Sequence[str], family: int = 4, *, stdout: IO[str] | None = None,
         stderr: IO[str] | None = None) -> int:
    """The whole command; returns the exit code."""
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    lark_cache.install()  # the grammar's tables from disk: every command reads options
    cmd: CommandLine | None = None
    handed = delegate.single(argv, family, TOOL[family])  # -t nat etc. with --delegate
    if handed is not None:
        stdout.write(handed.out)
        stderr.write(handed.err)
        return handed.code
    try:
        cmd = parse_args(argv, family)
        for w in cmd.warnings:
            stderr.write(w + "\n")
        try:
            state.require_root(TOOL[family])
            bpffs.ensure_mounted()
            if cmd.netns is not None:
                netns.path(cmd.netns)
        except (state.StateError, bpffs.BpffsError, netns.NetnsError) as e:
            raise CliExit(EXIT_TABLE, err=f"{e}\n" if str(e).startswith(TOOL[family])
                          else f"{TOOL[family]}: {e}\n") from None
        if cmd.command in MUTATING or cmd.zero:
            with locked(cmd.wait):
                result = run(cmd)
        else:
            result = run(cmd)
    except CliExit as e:
        result = Result(e.code, e.out, e.err)
    except CommandFailed as e:
        result = Result(EXIT_FAILED, err=f"{IPT[family]}: {e.message}\n")
    except sets.SetRefused as e:  # a parameter problem for iptables (libxt_set)
        result = Result(EXIT_PARAMETER, err=f"{IPT[family]} {VERSION}: {e.reason}\n\n"
                        + _try(family))
    except CompileError as e:
        result = Result(EXIT_FAILED, err=f"{TOOL[family]}: {e.reason}\n")
    except LoadError as e:
        result = Result(EXIT_RESOURCE, err=f"{TOOL[family]}: {e}\n")
    except (bpf.BpfError, state.StateError, bpffs.BpffsError, netns.NetnsError) as e:
        result = Result(EXIT_RESOURCE, err=f"{TOOL[family]}: {e}\n")
    if (cmd.json if cmd is not None else "--json" in argv):
        shown = cmd if cmd is not None else CommandLine(family)
        doc = {"ok": result.code == 0, "exit_code": result.code, "family": family,
               "table": shown.table, "netns": shown.netns, "command": shown.command or None,
               "chain": shown.chain, "error": result.err.strip() or None, **result.data}
        stdout.write(json.dumps(doc, sort_keys=True) + "\n")
    else:
        stdout.write(result.out)
    stderr.write(result.err)
    return result.code
