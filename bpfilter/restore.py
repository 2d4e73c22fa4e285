"""bpfilter-restore / bpfilter6-restore: iptables-restore's command line, messages and exit
codes; each table compiled, loaded and switched in atomically at its COMMIT."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bpfilter import (
    __version__,
    bpf,
    bpffs,
    delegate,
    lark_cache,
    netns,
    responder,
    sets,
    state,
)
from bpfilter.codegen import lookup
from bpfilter.codegen.compiler import HOOKS, CompileError, compile_ruleset
from bpfilter.dispatch import TableKey
from bpfilter.grammar.errors import EXIT_LINE_FAILED, EXIT_PARAMETER, ParseError
from bpfilter.grammar.iptables import parse_restore
from bpfilter.ir.iptables_save import to_iptables_save
from bpfilter.ir.model import Ruleset, Table
from bpfilter.loader import CounterKey, LoadError, load_programs
from bpfilter.lockfile import LOCK_ENV as LOCK_ENV  # re-exported: tests and benchmarks
from bpfilter.lockfile import LOCK_PATH as LOCK_PATH
from bpfilter.lockfile import lock_path, open_lock, try_lock

# Messages say "iptables-restore v1.8.9 (legacy)" where iptables-restore says it, so tools
# that match on iptables' stderr keep working; our own messages name the bpfilter tool.
IPT_NAME = {4: "iptables-restore", 6: "ip6tables-restore"}
IPT_VERSION = "v1.8.9 (legacy)"
TOOL = {4: "bpfilter-restore", 6: "bpfilter6-restore"}
EXIT_OTHER = 1  # usage errors, unreadable input
EXIT_RESOURCE = 4  # lock timeout, kernel refusal, no permission (iptables' RESOURCE_PROBLEM)
LOCK_POLL = 0.05


class CliExit(Exception):  # noqa: N818 - it is how the command ends, not a failure
    """End the command now with ``code``, printing ``out`` (stdout) and ``err`` (stderr)."""

    def __init__(self, code: int, out: str = "", err: str = "") -> None:
        super().__init__(err or out)
        self.code = code
        self.out = out
        self.err = err


@dataclass(frozen=True, slots=True)
class RestoreOptions:
    """The parsed command line."""

    family: int = 4
    counters: bool = False
    noflush: bool = False
    test: bool = False
    verbose: bool = False
    wait: float | None = None  # None: fail at once when locked; math.inf: wait forever
    table: str | None = None
    file: str | None = None  # None: standard input
    modprobe: str | None = None  # accepted and ignored: bpfilter loads no modules
    netns: str | None = None
    json: bool = False
    delegate: str | None = None  # --delegate TABLES (see bpfilter.delegate)
    warnings: tuple[str, ...] = ()


def usage(family: int) -> str:
    """What -h prints."""
    return (f"Usage: {TOOL[family]} [-c] [-v] [-V] [-t] [-h] [-n] [-w secs] [-W usecs] "
            "[-T table] [-M command] [--netns NAME] [--json] [--delegate TABLES] [file]\n"
            "\t   [ --counters ]\n\t   [ --verbose ]\n\t   [ --version]\n\t   [ --test ]\n"
            "\t   [ --help ]\n\t   [ --noflush ]\n\t   [ --wait=<seconds>\n"
            "\t   [ --table=<TABLE> ]\n\t   [ --modprobe=<command> ]\n"
            "\t   [ --netns=<NAME> ]  (a network namespace from `ip netns list`)\n"
            "\t   [ --json ]  (print the result as JSON on standard output)\n"
            "\t   [ --delegate=<TABLES> ]  (nat,mangle,security: to iptables-legacy-restore)\n")


def _try(family: int) -> str:
    return f"Try `{TOOL[family]} -h' for more information.\n"


_LONG_FLAGS = {"--counters": "c", "--verbose": "v", "--version": "V", "--test": "t",
               "--help": "h", "--noflush": "n", "--binary": "b", "--json": "json"}
_LONG_VALUES = {"--table": "table", "--modprobe": "modprobe", "--netns": "netns",
                "--delegate": "delegate"}


def _number(text: str) -> bool:
    return text.isdigit()


def parse_args(argv: Sequence[str], family: int = 4) -> RestoreOptions:
    """iptables-restore's getopt rules: clustered short flags, ``-T nat``/``-Tnat``,
    ``--table=nat``/``--table nat``, ``-w [secs]`` (the seconds as the next word only),
    ``-W usecs`` (deprecated). Raises CliExit for -h, -V and every usage error."""
    o: dict[str, Any] = {"family": family}
    warnings: list[str] = []
    files: list[str] = []
    interval = False
    args = list(argv)
    i = 0

    def value(opt: str, glued: str) -> str:
        nonlocal i
        if glued:
            return glued
        if i + 1 >= len(args):
            raise CliExit(EXIT_OTHER, err=f"{TOOL[family]}: option requires an argument -- "
                          f"'{opt}'\n" + _try(family))
        i += 1
        return args[i]

    def optional_number() -> str | None:
        nonlocal i
        if i + 1 < len(args) and _number(args[i + 1]):
            i += 1
            return args[i]
        return None

    while i < len(args):
        a = args[i]
        if a == "--":
            files.extend(args[i + 1:])
            break
        if a.startswith("--"):
            name, eq, val = a.partition("=")
            if name in _LONG_FLAGS and not eq:
                _flag(o, _LONG_FLAGS[name], family, warnings)
            elif name in _LONG_VALUES:
                o[_LONG_VALUES[name]] = val if eq else value(name, "")
            elif name == "--wait":
                o["wait"] = _seconds(val if eq else optional_number(), family)
            elif name == "--wait-interval":
                if not eq:
                    value(name, "")
                interval = True
            else:
                raise CliExit(EXIT_OTHER, err=f"{TOOL[family]}: unrecognized option '{a}'\n"
                              + _try(family))
        elif a.startswith("-") and a != "-":
            j = 1
            while j < len(a):
                c = a[j]
                rest = a[j + 1:]
                if c in "TM":
                    o["table" if c == "T" else "modprobe"] = value(c, rest)
                    break
                if c == "w":
                    o["wait"] = _seconds(None if rest else optional_number(), family)
                elif c == "W":
                    if not rest:
                        optional_number()
                    interval = True
                    if rest:
                        break
                elif c in "cvVthnb":
                    _flag(o, c, family, warnings)
                else:
                    raise CliExit(EXIT_OTHER, err=f"{TOOL[family]}: invalid option -- '{c}'\n"
                                  + _try(family))
                j += 1
        else:
            files.append(a)
        i += 1
    if interval:
        warnings.append("Ignoring deprecated --wait-interval option.")
        if "wait" not in o:
            raise CliExit(EXIT_OTHER, err="".join(w + "\n" for w in warnings)
                          + "Option --wait-interval requires option --wait\n")
    if len(files) > 1:
        raise CliExit(EXIT_OTHER, err="Unknown arguments found on commandline\n")
    if files and files[0] != "-":
        o["file"] = files[0]
    if o.get("netns") is not None:
        try:
            netns.check_name(o["netns"])
        except netns.NetnsError as e:
            raise CliExit(EXIT_OTHER, err=f"{TOOL[family]}: {e}\n") from None
    return RestoreOptions(**o, warnings=tuple(warnings))


def _flag(o: dict[str, Any], c: str, family: int, warnings: list[str]) -> None:
    if c == "h":
        raise CliExit(0, out=usage(family))
    if c == "V":
        raise CliExit(0, out=f"{TOOL[family]} v{__version__} (bpfilter)\n")
    if c == "b":
        warnings.append("-b/--binary option is not implemented")
        return
    key = {"c": "counters", "v": "verbose", "t": "test", "n": "noflush", "json": "json"}[c]
    o[key] = True


def _seconds(text: str | None, family: int) -> float:
    if text is None:
        return math.inf
    if not _number(text):
        raise CliExit(EXIT_PARAMETER, err=f"{IPT_NAME[family]} {IPT_VERSION}: wait seconds "
                      f"not numeric\n" + _try(family))
    return float(text)


# --- the lock -------------------------------------------------------------------------------

@contextlib.contextmanager
def locked(wait: float | None, path: Path | None = None) -> Iterator[None]:
    """Serialise restores (and other state changes): flock on ``path`` (default: $BPFILTER_LOCK
    or /run/bpfilter/lock), waiting ``wait`` seconds (None: not at all, inf: for ever);
    CliExit with exit 4 when it stays taken."""
    fd = open_lock(lock_path() if path is None else path)
    try:
        deadline = time.monotonic() + (wait if wait is not None else 0.0)
        while True:
            if try_lock(fd):
                break
            if wait is None:
                raise CliExit(EXIT_RESOURCE, err="Another app is currently holding the "
                              "bpfilter lock. Perhaps you want to use the -w option?\n")
            if time.monotonic() >= deadline:
                raise CliExit(EXIT_RESOURCE, err="Another app is currently holding the "
                              f"bpfilter lock. Stopped waiting after {wait:g}s.\n")
            time.sleep(LOCK_POLL)
        yield
    finally:
        os.close(fd)  # releases the lock


# --- the run --------------------------------------------------------------------------------

@dataclass(slots=True)
class TableResult:
    """One table that was committed (or, with --test, checked)."""

    family: int
    table: str
    generation: int | None
    rules: int
    programs: dict[str, int] = field(default_factory=dict)  # chain -> program id
    delegated: bool = False  # committed by iptables-legacy-restore (--delegate)
    # Applied as map writes, programs kept: entries written, seconds from pin to switch.
    incremental: dict[str, Any] | None = None
    rebuilt: str | None = None  # why a --noflush change was not map writes only

    def as_json(self) -> dict[str, Any]:
        return {"family": self.family, "table": self.table, "generation": self.generation,
                "rules": self.rules, "programs": self.programs, "delegated": self.delegated,
                "incremental": self.incremental, "rebuilt": self.rebuilt}


@dataclass(slots=True)
class Outcome:
    """What a restore did: the exit code, stderr text and committed tables."""

    code: int = 0
    err: str = ""
    error_line: int | None = None
    out: str = ""  # what -v prints (standard output)
    tables: list[TableResult] = field(default_factory=list)


def _parameter_problem(family: int, message: str, line: int) -> str:
    return (f"{IPT_NAME[family]} {IPT_VERSION}: {message}\n"
            f"Error occurred at line: {line}\n"
            f"Try `{IPT_NAME[family]} -h' or '{IPT_NAME[family]} --help' for more "
            "information.\n")


def _line_failed(family: int, message: str) -> str:
    return f"{IPT_NAME[family]}: {message}\n"


def format_parse_error(family: int, e: ParseError) -> str:
    """stderr for a refused input line, as iptables-restore prints it."""
    if e.exit_code == EXIT_PARAMETER:
        return _parameter_problem(family, e.message, e.line)
    return _line_failed(family, e.message)


def committed_prefix(text: str, error_line: int) -> str:
    """The input up to the last COMMIT line before ``error_line``: the tables iptables-restore
    had committed when it met the error."""
    lines = text.split("\n")
    last = 0
    for n in range(min(error_line - 1, len(lines)), 0, -1):
        if lines[n - 1] == "COMMIT":
            last = n
            break
    return "".join(line + "\n" for line in lines[:last])


def read_input(opts: RestoreOptions, stdin: IO[bytes]) -> tuple[str, str]:
    """(text, name) of the input; CliExit like iptables-restore when the file won't open."""
    if opts.file is None:
        return stdin.read().decode("utf-8", "surrogateescape"), "<stdin>"
    try:
        with open(opts.file, "rb") as f:
            return f.read().decode("utf-8", "surrogateescape"), opts.file
    except OSError as e:
        raise CliExit(EXIT_OTHER, err=f"Can't open {opts.file}: {e.strerror}\n") from None


def _explicit_counters(table: Table) -> dict[CounterKey, tuple[int, int]]:
    out: dict[CounterKey, tuple[int, int]] = {}
    for c in table.chains:
        if c.is_base and c.counters is not None:
            out[(table.name, c.name, 0)] = c.counters
        for i, r in enumerate(c.rules, 1):
            if r.counters is not None:
                out[(table.name, c.name, i)] = r.counters
    return out


def _unsupported(table: Table) -> str:
    return f"line {table.line} failed: {delegate.refusal(table.name)}"


def restore_table(table: Table, opts: RestoreOptions,
                  live: state.LiveTable | None = None) -> TableResult:
    """Compile, load and (unless --test) switch in one table. Raises CompileError, LoadError
    or bpf.BpfError; on any error the table in force stays as it was. ``live`` is the table
    in force when the caller has read it already (--noflush carries its counters over)."""
    family = opts.family
    rules = sum(len(c.rules) for c in table.chains)
    key = TableKey(family, table.name)
    old = None
    if opts.noflush and not opts.test:
        old = live if live is not None else state.live_table(key, opts.netns)
        # A change of lookup entries only: map writes, the programs stay (bpfilter.state).
        done = _incremental(old, table, opts) if old is not None else "nothing in force"
        if not isinstance(done, str):
            responder.sync(opts.netns)
            return done
        rebuilt: str | None = done
    else:
        rebuilt = None
    compiled = compile_ruleset(Ruleset((table,)), family)
    # Programs read which copy of their run maps is in use from the table's switch.
    shared = {} if opts.test else {lookup.CTL_MAP: state.switch_map(key, opts.netns)}
    try:
        programs = load_programs(compiled, shared, netns=opts.netns)
    finally:
        for m in shared.values():
            m.close()
    try:
        if opts.test:
            return TableResult(family, table.name, None, rules)
        carry: dict[CounterKey, tuple[int, int]] = {}
        if old is not None:
            carry = state.carried_counters(old.table, table, old.counters())
        if opts.counters:
            carry.update(_explicit_counters(table))
        text = to_iptables_save(Ruleset((table,)))
        gen = state.commit(key, programs, text, opts.netns, carry=carry, table=table)
        responder.sync(opts.netns)  # REJECT's replies; raises StateError when it cannot
        ids = {p.chain: prog.id for p, prog in programs.progs.items()}
        return TableResult(family, table.name, gen, rules, ids, rebuilt=rebuilt)
    finally:
        programs.close()  # what is in force is held by the pins


def _incremental(live: state.LiveTable, table: Table,
                 opts: RestoreOptions) -> TableResult | str:
    """``table`` put in force by map writes when it differs from ``live`` in lookup
    entries only; else why it needs a rebuild."""
    explicit = None
    if opts.counters:
        explicit = {(c, pos): v for (_, c, pos), v in _explicit_counters(table).items()}
    change = state.plan_incremental(live, table, explicit=explicit)
    if isinstance(change, str):
        return change
    text = to_iptables_save(Ruleset((table,)))
    done = state.apply_change(live, change, text)
    return TableResult(opts.family, table.name, done.generation,
                       sum(len(c.rules) for c in table.chains), done.prog_ids,
                       incremental=done.as_json())


def restore(text: str, opts: RestoreOptions, filename: str = "<stdin>") -> Outcome:
    """Apply iptables-restore input; the caller holds the lock and has checked root."""
    out = Outcome()
    family = opts.family
    try:
        batch = delegate.Batch.prepare(text, opts)
    except delegate.ConfigError as e:
        out.code, out.err = EXIT_OTHER, f"{TOOL[family]}: {e}\n"
        return out
    text = batch.ours  # delegated tables' lines emptied: line numbers unchanged
    if not opts.test and state.drop_stale(opts.netns):
        out.err += (f"{TOOL[family]}: dropped the pins of an earlier network namespace named "
                    f"{opts.netns!r} (deleted and created again)\n")
    # Read (and parsed) once: the base of the input and the old side of each table's change.
    lives = {t.key.table: t for t in state.live_tables(opts.netns, family)} \
        if opts.noflush else {}
    base = Ruleset(tuple(t.table for t in lives.values())) if opts.noflush else None
    error: ParseError | None = None
    try:
        ruleset = parse_restore(text, family=family, filename=filename, base=base)
    except ParseError as e:
        error = e
        ruleset = parse_restore(committed_prefix(text, e.line), family=family,
                                filename=filename, base=base)
    for table in ruleset.tables:
        if opts.table is not None and table.name != opts.table:
            continue
        if not batch.commit_before(table.line, out):
            return out
        if opts.verbose:
            out.out += batch.verbose_table(table, base)
        if table.name not in HOOKS:
            out.code, out.error_line = EXIT_LINE_FAILED, table.line
            out.err += _line_failed(family, _unsupported(table))
            return out
        try:
            out.tables.append(restore_table(table, opts, lives.get(table.name)))
        except sets.SetRefused as e:
            out.code, out.error_line = EXIT_PARAMETER, e.line
            out.err += _parameter_problem(family, e.reason + "\n", e.line)
            return out
        except CompileError as e:
            out.code, out.error_line = EXIT_LINE_FAILED, e.line
            out.err += _line_failed(family, f"line {e.line} failed: {e.reason}")
            return out
        except LoadError as e:
            line = e.lines[0] if e.lines else table.line
            out.code, out.error_line = EXIT_RESOURCE, line
            out.err += _line_failed(family, f"line {line} failed: {e}")
            return out
        except (bpf.BpfError, state.StateError, bpffs.BpffsError,
                netns.NetnsError) as e:
            out.code, out.error_line = EXIT_RESOURCE, table.line
            out.err += f"{TOOL[family]}: table {table.name}: {e}\n"
            return out
    if not batch.commit_before(error.line if error is not None else math.inf, out):
        return out
    if error is not None:
        out.code, out.error_line = error.exit_code, error.line
        out.err += format_parse_error(family, error)
    if opts.verbose:
        out.out += batch.printer.upto(error.line if error is not None else batch.lines)
    return out


def _environment_checks(opts: RestoreOptions) -> None:
    tool = TOOL[opts.family]
    try:
        state.require_root(tool)
    except state.StateError as e:
        raise CliExit(EXIT_RESOURCE, err=f"{e}\n") from None
    try:
        bpffs.ensure_mounted()
        if opts.netns is not None:
            netns.path(opts.netns)
    except (bpffs.BpffsError, netns.NetnsError) as e:
        raise CliExit(EXIT_RESOURCE, err=f"{tool}: {e}\n") from None


def main(argv: Sequence[str], family: int = 4, *, stdin: IO[bytes] | None = None,
         stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> int:
    """The whole command; returns the exit code."""
    stdin = stdin if stdin is not None else sys.stdin.buffer
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    opts: RestoreOptions | None = None
    lark_cache.install()
    try:
        opts = parse_args(argv, family)
        for w in opts.warnings:
            stderr.write(w + "\n")
        _environment_checks(opts)
        text, name = read_input(opts, stdin)
        with locked(opts.wait):
            outcome = restore(text, opts, name)
    except (state.StateError, bpffs.BpffsError, netns.NetnsError, bpf.BpfError) as e:
        # Reading the live state for --noflush failed: nothing was changed.
        err = f"{TOOL[family]}: {e}\n"
        stderr.write(err)
        if opts is not None and opts.json:
            _print_json(stdout, opts, Outcome(EXIT_RESOURCE, err))
        return EXIT_RESOURCE
    except CliExit as e:
        stdout.write(e.out)
        stderr.write(e.err)
        if opts is not None and opts.json:
            _print_json(stdout, opts, Outcome(e.code, e.err))
        return e.code
    if not opts.json:
        stdout.write(outcome.out)
    stderr.write(outcome.err)
    if opts.json:
        _print_json(stdout, opts, outcome)
    return outcome.code


def _print_json(stdout: IO[str], opts: RestoreOptions, outcome: Outcome) -> None:
    doc = {"ok": outcome.code == 0, "exit_code": outcome.code, "family": opts.family,
           "netns": opts.netns, "test": opts.test, "noflush": opts.noflush,
           "tables": [t.as_json() for t in outcome.tables],
           "error": ({"line": outcome.error_line, "message": outcome.err.strip()}
                     if outcome.code else None)}
    stdout.write(json.dumps(doc, sort_keys=True) + "\n")
