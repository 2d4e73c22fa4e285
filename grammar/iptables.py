"""iptables-restore text -> IR: line dispatch, restore commands, option semantics."""

from __future__ import annotations

import gc
import itertools
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from bpfilter.codegen.uapi import NfHook
from bpfilter.grammar.errors import EXIT_LINE_FAILED, EXIT_PARAMETER, ParseError
from bpfilter.grammar.getopt import arity, normalize
from bpfilter.grammar.shapes import (
    RULE_COMMANDS,
    ShapeError,
    Template,
    grammar_text,
    shape_word,
    template,
)
from bpfilter.grammar.tokenize import TokenizeError, Word, split_words, word_texts
from bpfilter.ir import checks
from bpfilter.ir.matches import (
    MATCH_ALIASES,
    MATCHES,
    PROTO_MATCH,
    UNSUPPORTED_MATCHES,
    Ctx,
    Extension,
)
from bpfilter.ir.model import (
    Chain,
    Family,
    Match,
    Option,
    Prefix,
    Rule,
    Ruleset,
    Table,
    Target,
    TargetKind,
    make_match,
    make_option,
    make_rule,
)
from bpfilter.ir.targets import TARGETS, UNSUPPORTED_TARGETS, VERDICTS
from bpfilter.ir.values import ValueError_, parse_prefix, parse_proto

# Built-in chains of each table, in the order iptables-save prints them.
BUILTIN_CHAINS: dict[str, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}
HOOKS = {"PREROUTING": NfHook.PRE_ROUTING, "INPUT": NfHook.LOCAL_IN, "FORWARD": NfHook.FORWARD,
         "OUTPUT": NfHook.LOCAL_OUT, "POSTROUTING": NfHook.POST_ROUTING}
# Hook priorities of the iptables tables (enum nf_ip_hook_priorities).
TABLE_PRIORITY = {"raw": -300, "mangle": -150, "filter": 0, "security": 50}
NAT_PRIORITY = {"PREROUTING": -100, "OUTPUT": -100, "INPUT": 100, "POSTROUTING": 100}
CHAIN_NAME_MAX = 28
IFNAME_MAX = 15

# ---- rule building ------------------------------------------------------------------------

@dataclass(slots=True)
class _ExtInst:
    ext: Extension
    opts: dict[str, Option]
    col: int  # word index of the -m/-j value (or of the first option, if implicit)
    is_target: bool = False
    implicit: bool = False
    # (option, negated, argument texts, option word index, first argument word index)
    raw: list[tuple[str, bool, tuple[str, ...], int, int]] = field(default_factory=list)


@dataclass(slots=True)
class _ChainB:
    name: str
    builtin: bool
    policy: str | None
    counters: tuple[int, int] | None
    line: int
    rules: list[Rule] = field(default_factory=list)


@dataclass(slots=True)
class _TableB:
    name: str
    line: int
    chains: dict[str, _ChainB]


@dataclass(slots=True)
class _PlanExt:
    """One extension of a planned line: where its option values are, and its cache id."""

    uid: int
    ext: Extension
    is_target: bool
    index: int  # word index of the -m/-j value, or of the first option if implicit
    items: tuple[tuple[str, bool, tuple[int, ...], int], ...]
    values: Callable[[list[str]], object]


@dataclass(slots=True)
class _Plan:
    """How every line of one shape (and the same -m/-j/-p words and chain) becomes a rule."""

    src: tuple[int, bool] | None
    dst: tuple[int, bool] | None
    fields: dict[str, object]  # the fragment flag: the same for every such line
    ifaces: tuple[tuple[str, int, bool], ...]  # ("iif"/"oif", word index, negated)
    proto: int | None
    proto_neg: bool
    target: Target | None
    jump_chain: str | None  # a user chain that must still exist when the line runs
    exts: tuple[_PlanExt, ...]
    ctx: Ctx | None = None  # what the extensions see (the same for every such line)
    # Rule fields every such line shares (-p 0 "all" is no protocol match).
    fragment: bool | None = None
    rule_proto: int | None = None
    rule_proto_neg: bool = False
    # fullmatch of a line that takes this plan with nothing to resolve per line (built when
    # a second consecutive line takes the plan); its groups are the line's words. The second
    # is for lines with `[p:b]` counters: two more groups in front, the counters.
    run_match: Callable[[str], re.Match[str] | None] | None = None
    run_match_counted: Callable[[str], re.Match[str] | None] | None = None


_PLAN_IDS = itertools.count(1)


@dataclass(slots=True)
class _Run:
    """Consecutive lines that take one plan: matched as text, no per-line shape lookup."""

    plan: _Plan
    match: Callable[[str], re.Match[str] | None]
    chain: str
    rules: list[Rule]  # the chain's rule list, appended to
    counted: bool  # lines start with `[p:b]` counters (groups 1 and 2)


# A word shape_word() calls "V", in the characters the fast path allows (no blank, no '"').
_RUN_VALUE = r"([#-,.-~][!#-~]*|-|![!#-~]+)"


def _run_pattern(tpl: Template, texts: Sequence[str], counted: bool
                 ) -> Callable[[str], re.Match[str] | None]:
    """fullmatch for lines with this line's shape, command, chain and -m/-j/-g/-p words at
    column 1, or after `[p:b]` counters (`counted`: groups 1 and 2); the other groups are the
    words (what str.split() gives)."""
    fixed = {tpl.cmd_index, tpl.cmd_args[0]}
    fixed.update(it.args[0] for it in tpl.items if it.opt in ("-m", "-j", "-g", "-p"))
    parts = [f"({re.escape(t)})" if i in fixed or shape_word(t) != "V" else _RUN_VALUE
             for i, t in enumerate(texts)]
    head = r"\[([0-9]+):([0-9]+)\][ \t]*" if counted else ""
    return re.compile(head + "[ \t]+".join(parts) + "[ \t]*").fullmatch


class _LineFailed(Exception):
    """An operation iptables-restore reports as `line N failed` (exit 1)."""

    def __init__(self, message: str, col: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.col = col


class _ParamError(Exception):
    """A parameter problem (exit 2) at a column."""

    def __init__(self, message: str, col: int) -> None:
        super().__init__(message)
        self.message = message
        self.col = col


_VERDICT_TARGETS = {n: Target(TargetKind.VERDICT, n) for n in VERDICTS}
_CORE_ONCE = frozenset({"-s", "-d", "-i", "-o", "-p", "-f", "-j", "-g", "-c"})
# Raw shape -> template, or None for lines that need the careful path.
_FAST: dict[str, Template | None] = {}
# A plain line's shape in one C-level pass: every word that is not an option-like word
# ("-x...") or "!" becomes "V" (the same rule as shape_word).
_SHAPE_SUB = re.compile(r"(?<![^ \t])(?:[^-! \t][^ \t]*|-(?![^ \t])|![^ \t]+)").sub
# (extension, raw options, context) or (plan extension uid, option words) -> the finished
# Match or Target, shared between rules.
_EXT_CACHE: dict[tuple[object, ...], Match | Target] = {}
_BLANK_WORD = re.compile(r"[^ \t\n]+")
_PLAIN = re.compile(r"[\x20-\x7e\t]*").fullmatch


class _LazyCols(Sequence[int]):
    """Word columns of a fast-path line, computed only when an error needs one."""

    def __init__(self, body: str, offset: int) -> None:
        self.body = body
        self.offset = offset
        self.cols: list[int] | None = None

    @property
    def first(self) -> int:
        """Column of the first word (the rule's column)."""
        return self.offset + 1 + len(self.body) - len(self.body.lstrip(" \t"))

    def _get(self) -> list[int]:
        if self.cols is None:
            self.cols = [w.col for w in split_words(self.body, self.offset)]
        return self.cols

    def __getitem__(self, i: int) -> int:  # type: ignore[override]
        return self._get()[i]

    def __len__(self) -> int:
        return len(self._get())


class _Parser:
    """State of one restore run over the input text."""

    def __init__(self, family: int, filename: str, base: Ruleset | None = None) -> None:
        self.family = family
        self.base = base
        self.live_chains: set[str] = set()  # live user chains not yet declared (--noflush)
        self.bits = 32 if family == 4 else 128
        self.skip_flag = "-6" if family == 4 else "-4"
        self.filename = filename
        self.tables: dict[str, Table] = {}
        self.cur: _TableB | None = None
        self.lineno = 0
        self.prev_plan: _Plan | None = None  # the plan the previous rule line took
        # For tests, the references the shortcuts are checked against. shortcuts=False:
        # every rule line is tokenised with columns, normalised and executed (no fast
        # tokenising, no runs). plans=False as well: every rule built by build_rules.
        self.shortcuts = True
        self.plans = True

    def error(self, message: str, col: int = 1, exit_code: int = EXIT_PARAMETER,
              line: int | None = None) -> ParseError:
        return ParseError(message, line=self.lineno if line is None else line, col=col,
                          filename=self.filename, exit_code=exit_code)

    # -- lines --
    def run(self, text: str) -> Ruleset:
        lines = text.split("\n")
        final_newline = text.endswith("\n")
        if final_newline:
            lines.pop()
        total = len(lines)
        n = 0
        while n < total:
            line = lines[n]
            n += 1
            self.lineno = n
            if not line or line[0] == "#":
                continue
            if line == "COMMIT" and (final_newline or n < total):
                if self.cur is None:
                    raise self.error(f"line {n} failed: COMMIT outside a table",
                                     exit_code=EXIT_LINE_FAILED)
                self.commit()
                continue
            if self.cur is None:
                if line[0] == "*":
                    self.start_table(line)
                    continue
                raise self.error(f"line {n} failed: not inside a table (missing *table line)",
                                 exit_code=EXIT_LINE_FAILED)
            if line[0] == ":":
                self.chain_line(line)
                continue
            run = self.rule_line(line)
            if run is not None:
                n = self.run_of(run, lines, n)
        if self.cur is not None:
            self.lineno = len(lines) + 1
            raise self.error(f"COMMIT expected at line {len(lines) + 1}",
                             exit_code=EXIT_LINE_FAILED)
        return Ruleset(tuple(self.tables.values()))

    def start_table(self, line: str) -> None:
        # Split on blanks only, as iptables-restore's strtok does: a CR stays in the name.
        words = _BLANK_WORD.findall(line[1:])
        name = words[0] if words else ""
        if name not in BUILTIN_CHAINS:
            raise self.error(f"unable to initialize table '{name}'", col=2)
        chains = {c: _ChainB(c, True, "ACCEPT", None, self.lineno) for c in BUILTIN_CHAINS[name]}
        live = self.base.table(name) if self.base is not None else None
        self.live_chains = set()
        if live is not None:
            # --noflush: the lines act on the live table.
            for c in live.chains:
                chains[c.name] = _ChainB(c.name, c.is_base, c.policy, c.counters, c.line,
                                         list(c.rules))
                if not c.is_base:
                    self.live_chains.add(c.name)
        self.cur = _TableB(name, self.lineno, chains)

    def chain_line(self, line: str) -> None:
        assert self.cur is not None
        # iptables-restore splits chain lines on blanks only (no quoting).
        words = [Word(m.group(), m.start() + 2) for m in _BLANK_WORD.finditer(line[1:])]
        if not words:
            raise self.error(f"Bad line {self.lineno}: need chain name", col=1)
        name = words[0].text
        if len(name) > CHAIN_NAME_MAX:
            raise self.error(f"Invalid chain name `{name}' ({CHAIN_NAME_MAX} chars max)", col=2)
        if len(words) < 2:
            raise self.error(f"Bad line {self.lineno}: need policy", col=len(line) + 1)
        policy = words[1].text
        counters = _counters(words[2].text) if len(words) > 2 else None
        chains = self.cur.chains
        builtin = name in BUILTIN_CHAINS[self.cur.name]
        if builtin:
            if policy == "-":
                policy = chains[name].policy or "ACCEPT"
            elif policy not in ("ACCEPT", "DROP"):
                raise self.error(f"Can't set policy `{policy}' on `{name}' line {self.lineno}: "
                                 "Bad policy name", col=words[1].col, exit_code=EXIT_LINE_FAILED)
            chains[name].policy = policy
            chains[name].counters = counters
            chains[name].line = self.lineno
            return
        if policy != "-":
            raise self.error(f"Can't set policy `{policy}' on `{name}' line {self.lineno}: "
                             "Bad built-in chain name", col=words[1].col,
                             exit_code=EXIT_LINE_FAILED)
        if name in self.live_chains:
            # --noflush: declaring a live user chain flushes it (once).
            self.live_chains.discard(name)
            chains[name].rules.clear()
            chains[name].counters = counters
            chains[name].line = self.lineno
            return
        if name in chains:
            raise self.error(f"error creating chain '{name}': File exists", col=2)
        if name in VERDICTS or name in TARGETS:
            raise self.error(f"Invalid chain name `{name}'", col=2)
        chains[name] = _ChainB(name, False, None, counters, self.lineno)

    def commit(self) -> None:
        assert self.cur is not None
        tb = self.cur
        family = Family.IP if self.family == 4 else Family.IP6
        chains = []
        for c in tb.chains.values():
            hook = HOOKS.get(c.name) if c.builtin else None
            prio = None
            if hook is not None:
                prio = NAT_PRIORITY[c.name] if tb.name == "nat" else TABLE_PRIORITY[tb.name]
            chains.append(Chain(c.name, tuple(c.rules), hook, prio, c.policy if c.builtin
                                else None, c.counters, c.line))
        table = Table(family, tb.name, tuple(chains), line=tb.line)
        problems = checks.check_table(table)
        if problems:
            p = problems[0]
            raise self.error(f"line {self.lineno} failed: {p.message}", col=p.col,
                             exit_code=EXIT_LINE_FAILED, line=p.line or self.lineno)
        self.tables.pop(tb.name, None)
        self.tables[tb.name] = table
        self.cur = None

    def rule_line(self, line: str) -> _Run | None:
        """Apply one rule line; returns a run when the lines after it may take its plan."""
        counters: tuple[int, int] | None = None
        offset = 0
        body = line
        prev, self.prev_plan = self.prev_plan, None
        if line[0] == "[":
            end = line.find("]")
            if end < 0:
                raise self.error(f"Bad line {self.lineno}: need ]", col=1)
            counters = _counters(line[: end + 1])
            body = line[end + 1:]
            offset = end + 1
        if self.shortcuts and _PLAIN(body):
            # Fast path: columns are only computed if an error needs one. Without quoting
            # str.split() tokenises exactly like iptables-restore.
            key: str | None
            if '"' not in body:
                texts = body.split()
                key = _SHAPE_SUB("V", body)
            else:
                try:
                    texts = word_texts(body, offset)
                except TokenizeError as e:
                    raise self.error(e.message, col=e.col) from None
                # getopt would see inside a quoted word with a blank that the shape calls
                # "V" (`"--opt=a b"`): such lines take the general path.
                key = None if any(t[:1] == "-" and (" " in t or "\t" in t) for t in texts) \
                    else " ".join([shape_word(t) for t in texts])
            tpl = None if key is None else self.fast_template(key)
            if tpl is not None:
                cols = _LazyCols(body, offset)
                try:
                    if tpl.command == "-A" and tpl.static is not None and not tpl.family_flags \
                            and self.append_planned(tpl, texts, cols, counters):
                        return self.next_run(prev, tpl, texts, cols, counters)
                    self.execute(tpl, texts, cols, counters)
                except (_ParamError, _LineFailed, ValueError_) as e:
                    raise self.convert(e, cols) from None
                return None
        try:
            words = split_words(body, offset)
        except TokenizeError as e:
            raise self.error(e.message, col=e.col) from None
        self.rule_words(normalize(words), counters)
        return None

    def append_planned(self, tpl: Template, texts: Sequence[str], cols: _LazyCols,
                       counters: tuple[int, int] | None) -> bool:
        """Fastest path: an append to an existing chain through its shape's plan (False: the
        line needs execute()). For such a line execute() checks only the chain name's length
        before planned_rule(), so errors come out the same."""
        assert self.cur is not None
        chain_name = texts[tpl.cmd_args[0]]
        c = self.cur.chains.get(chain_name)
        if c is None or len(chain_name) > CHAIN_NAME_MAX:
            return False
        static = tpl.static(texts) if tpl.static_n else ()
        plan = _PLANS.get((tpl, static, chain_name, self.cur.name, self.bits), False)
        if plan is False:
            plan = self.plan_of(tpl, static, texts, chain_name)
        if plan is None:
            return False
        assert isinstance(plan, _Plan)
        body = cols.body
        col = cols.offset + 1 if body[:1] not in (" ", "\t") else cols.first
        rule = self.apply_plan(plan, texts, cols, chain_name, col, counters)
        if rule is None:
            return False
        c.rules.append(rule)
        self.prev_plan = plan
        return True

    def next_run(self, prev: _Plan | None, tpl: Template, texts: Sequence[str],
                 cols: _LazyCols, counters: tuple[int, int] | None) -> _Run | None:
        """A run when this line and the one before it took the same plan: the lines that
        follow are then likely to take it too (with counters if this one has them)."""
        plan = self.prev_plan
        # A run's lines are unquoted, with well-formed counters or none (see run_of).
        if plan is None or plan is not prev or '"' in cols.body \
                or (cols.offset and counters is None):
            return None
        assert self.cur is not None
        counted = counters is not None
        match = plan.run_match_counted if counted else plan.run_match
        if match is None:
            match = _run_pattern(tpl, texts, counted)
            if counted:
                plan.run_match_counted = match
            else:
                plan.run_match = match
        chain = texts[tpl.cmd_args[0]]
        return _Run(plan, match, chain, self.cur.chains[chain].rules, counted)

    def run_of(self, run: _Run, lines: list[str], n: int) -> int:
        """Append the rules of the lines from index n on that match the run's pattern, as
        rule_line would; returns the index of the first line left to rule_line.

        A matching line has the shape, chain and -m/-j/-p words of the plan, no quote, and
        either `[p:b]` counters (a counted run) or nothing before its first word (column 1):
        rule_line would take the fastest path with this plan.
        """
        match = run.match
        plan = run.plan
        chain = run.chain
        append = run.rules.append
        total = len(lines)
        skip = 2 if run.counted else 0  # groups before the words: the counters
        counters: tuple[int, int] | None = None
        col = 1
        if plan.src is not None and plan.dst is None and not plan.exts and not plan.ifaces \
                and plan.jump_chain is None:
            # A blocklist: apply_plan() reduced to what such a plan does.
            group = plan.src[0] + 1 + skip
            src_neg = plan.src[1]
            bits = self.bits
            proto, proto_neg, fragment = plan.rule_proto, plan.rule_proto_neg, plan.fragment
            target = plan.target
            while n < total:
                m = match(lines[n])
                if m is None:
                    break
                value = m.group(group)
                if "," in value:
                    break
                try:
                    src = parse_prefix(value, bits)
                except ValueError_:
                    break
                if skip:
                    counters = (int(m.group(1)), int(m.group(2)))
                    col = m.start(3) + 1
                n += 1
                append(make_rule(None if src.mask == 0 and not src_neg else src, src_neg, None,
                                 False, None, False, None, False, proto, proto_neg, fragment, (),
                                 target, counters, n, col))
            self.lineno = n
            return n
        apply_plan = self.apply_plan
        has_exts = bool(plan.exts)
        while n < total:
            line = lines[n]
            m = match(line)
            if m is None:
                break
            self.lineno = n + 1
            groups = m.groups()
            offset = 0
            if skip:
                counters = (int(groups[0]), int(groups[1]))
                groups = groups[2:]
                offset = m.end(2) + 1  # after the "]"
                col = m.start(3) + 1
            cols = _LazyCols(line[offset:], offset) if has_exts else None
            try:
                rule = apply_plan(plan, groups, cols, chain, col, counters)
            except (_ParamError, _LineFailed, ValueError_) as e:
                raise self.convert(e, cols or _LazyCols(line[offset:], offset)) from None
            if rule is None:
                break
            append(rule)
            n += 1
        return n

    def fast_template(self, key: str) -> Template | None:
        """The template for a raw shape, or None when the line needs the careful path
        (getopt normalisation or a syntax error)."""
        try:
            return _FAST[key]
        except KeyError:
            pass
        shape = tuple(key.split())
        tpl: Template | None = None
        words = [Word(t, 0) for t in shape]
        if normalize(words) is words:
            try:
                tpl = template(shape)
            except ShapeError:
                tpl = None
        if len(_FAST) < 4096:
            _FAST[key] = tpl
        return tpl

    def convert(self, e: Exception, cols: Sequence[int]) -> ParseError:
        if isinstance(e, _ParamError):
            return self.error(e.message, col=e.col)
        if isinstance(e, _LineFailed):
            return self.error(f"line {self.lineno} failed: {e.message}", col=e.col,
                              exit_code=EXIT_LINE_FAILED)
        return self.error(str(e), col=cols[0])

    def rule_words(self, words: list[Word], counters: tuple[int, int] | None) -> None:
        if not words:
            raise self.error("no command specified", col=1)
        shape = tuple(shape_word(w.text) for w in words)
        try:
            tpl = template(shape)
        except ShapeError as e:
            self.explain_unloadable(words, e.index)
            w = words[e.index] if e.index < len(words) else words[-1]
            raise self.error(e.message.format(w.text), col=w.col) from None
        cols = [w.col for w in words]
        try:
            self.execute(tpl, [w.text for w in words], cols, counters)
        except (_ParamError, _LineFailed, ValueError_) as e:
            raise self.convert(e, cols) from None

    def explain_unloadable(self, words: list[Word], upto: int) -> None:
        """iptables loads `-m`/`-j` extensions before it meets their options: report those."""
        assert self.cur is not None
        for i in range(min(upto, len(words) - 1)):
            opt, arg = words[i].text, words[i + 1]
            try:
                if opt == "-m":
                    self.load_match(arg.text, arg.col)
                elif opt == "-j" and arg.text not in self.cur.chains:
                    self.load_target(arg.text, False, [arg.col], 0)
            except _ParamError as e:
                raise self.error(e.message, col=e.col) from None

    # -- commands --
    def execute(self, tpl: Template, texts: list[str], cols: Sequence[int],
                counters: tuple[int, int] | None) -> None:
        assert self.cur is not None
        if self.skip_flag in tpl.family_flags:
            return  # a line for the other family: iptables-restore skips it
        cmd = tpl.command
        chains = self.cur.chains
        if tpl.cmd_args and cmd != "-P":
            ci = tpl.cmd_args[0]
            if len(texts[ci]) > CHAIN_NAME_MAX:
                raise _ParamError(f"chain name `{texts[ci]}' too long (must be under "
                                  f"{CHAIN_NAME_MAX + 1} chars)", cols[ci])
        if cmd in RULE_COMMANDS:
            ci = tpl.cmd_args[0]
            chain_name = texts[ci]
            rules = None
            if tpl.static is not None and self.plans:
                col = cols.first if isinstance(cols, _LazyCols) else cols[0]
                rules = self.planned_rule(tpl, tpl.static(texts) if tpl.static_n else (),
                                          texts, cols, chain_name, col, counters)
            if rules is None:
                rules = self.build_rules(tpl, texts, cols, chain_name, counters)
            c = chains.get(chain_name)
            if cmd == "-A" and c is not None:
                c.rules.extend(rules)
                return
            args = [Word(texts[i], cols[i]) for i in tpl.cmd_args]
            if cmd == "-D" and len(args) > 1:
                if tpl.items:
                    raise _ParamError("Illegal option with a rule number", args[1].col)
                self.delete_num(args[0], args[1])
                return
            if c is None:
                raise _LineFailed(f"chain `{chain_name}' does not exist", cols[ci])
            if cmd == "-I":
                pos = _rulenum(args[1]) - 1 if len(args) > 1 else 0
                if pos > len(c.rules):
                    raise _LineFailed("index of insertion too big", args[1].col)
                # iptables inserts each expanded rule at the same position, in turn.
                c.rules[pos:pos] = rules[::-1]
            elif cmd == "-R":
                pos = _rulenum(args[1]) - 1
                if pos >= len(c.rules) or len(rules) != 1:
                    raise _LineFailed("index of replacement too big", args[1].col)
                c.rules[pos] = rules[0]
            elif cmd in ("-D", "-C"):
                for r in rules:
                    key = _rule_key(r)
                    for i, old in enumerate(c.rules):
                        if _rule_key(old) == key:
                            if cmd == "-D":
                                del c.rules[i]
                            break
                    else:
                        raise _LineFailed("rule does not exist in that chain", cols[ci])
            return
        args = [Word(texts[i], cols[i]) for i in tpl.cmd_args]
        for it in tpl.items:
            if it.opt == "-t":
                raise _ParamError("The -t option cannot be used in iptables-restore.",
                                  cols[it.index])
            if it.opt not in ("-4", "-6", "-v", "-n", "-x", "--line-numbers"):
                raise _ParamError(f"Illegal option `{it.opt}' with this command",
                                  cols[it.index])
        self.chain_command(cmd, args)

    def chain_command(self, cmd: str, args: list[Word]) -> None:
        """-N -X -F -E -P -Z -L -S."""
        assert self.cur is not None
        chains = self.cur.chains
        if cmd == "-N":
            name = args[0].text
            if len(name) > CHAIN_NAME_MAX:
                raise _ParamError(f"chain name `{name}' too long (must be under "
                                  f"{CHAIN_NAME_MAX + 1} chars)", args[0].col)
            if name in chains:
                raise _LineFailed(f"chain `{name}' already exists", args[0].col)
            _check_chain_name(name, args[0].col)
            chains[name] = _ChainB(name, False, None, None, self.lineno)
        elif cmd == "-X":
            names = [args[0].text] if args else [c.name for c in chains.values() if not c.builtin]
            for name in names:
                c = chains.get(name)
                if c is None or c.builtin:
                    raise _LineFailed(f"cannot delete chain `{name}'", args[0].col if args else 1)
                if _referenced(chains, name):
                    raise _LineFailed(f"chain `{name}' is still referenced",
                                      args[0].col if args else 1)
                if c.rules:
                    raise _LineFailed(f"chain `{name}' is not empty", args[0].col if args else 1)
                del chains[name]
        elif cmd == "-F":
            if args:
                c = chains.get(args[0].text)
                if c is None:
                    raise _LineFailed(f"chain `{args[0].text}' does not exist", args[0].col)
                c.rules.clear()
            else:
                for c in chains.values():
                    c.rules.clear()
        elif cmd == "-E":
            old, new = args[0].text, args[1].text
            if old not in chains or chains[old].builtin:
                raise _LineFailed(f"cannot rename chain `{old}'", args[0].col)
            if new in chains:
                raise _LineFailed(f"chain `{new}' already exists", args[1].col)
            if len(new) > CHAIN_NAME_MAX:
                raise _ParamError(f"Invalid chain name `{new}' ({CHAIN_NAME_MAX} chars max)",
                                  args[1].col)
            self.cur.chains = {(new if k == old else k): v for k, v in chains.items()}
            self.cur.chains[new].name = new
            for c in self.cur.chains.values():
                c.rules = [_renamed(r, old, new) for r in c.rules]
        elif cmd == "-P":
            name, policy = args[0].text, args[1].text
            c = chains.get(name)
            if c is None or not c.builtin:
                raise _LineFailed(f"can't set policy on `{name}': Bad built-in chain name",
                                  args[0].col)
            if policy not in ("ACCEPT", "DROP"):
                raise _LineFailed(f"can't set policy `{policy}': Bad policy name", args[1].col)
            c.policy = policy
        elif cmd in ("-Z", "-L", "-S"):
            if args and args[0].text not in chains:
                raise _LineFailed(f"chain `{args[0].text}' does not exist", args[0].col)
            if len(args) > 1 and _rulenum(args[1]) > len(chains[args[0].text].rules):
                raise _LineFailed(f"no rule {args[1].text} in chain `{args[0].text}'",
                                  args[1].col)
        else:
            raise _ParamError("no command specified", 1)

    def delete_num(self, chain_w: Word, num_w: Word) -> None:
        assert self.cur is not None
        c = self.cur.chains.get(chain_w.text)
        if c is None:
            raise _LineFailed(f"chain `{chain_w.text}' does not exist", chain_w.col)
        pos = _rulenum(num_w) - 1
        if pos >= len(c.rules):
            raise _LineFailed("index of deletion too big", num_w.col)
        del c.rules[pos]

    def build_rules(self, tpl: Template, texts: list[str], cols: Sequence[int], chain: str,
                    counters: tuple[int, int] | None) -> list[Rule]:
        """The rules of one -A/-I/-D/-R/-C line (more than one when -s/-d list addresses)."""
        assert self.cur is not None
        srcs: list[Prefix] | None = None
        dsts: list[Prefix] | None = None
        seen: set[str] = set()
        f: dict[str, object] = {}
        exts: list[_ExtInst] = []
        target: Target | None = None
        target_inst: _ExtInst | None = None
        proto: int | None = None
        proto_neg = False
        implicit_loaded = False
        bits = self.bits
        table = self.cur.name
        for it in tpl.items:
            opt = it.opt
            if opt == "--proto" and _find_owner(exts, opt) is None:
                # getopt reads --proto as policy's option once policy is loaded, else as an
                # abbreviation of --protocol.
                opt = "-p"
            if opt in _CORE_ONCE:
                if opt in seen:
                    raise _ParamError(f"multiple {opt} flags not allowed", cols[it.index])
                seen.add(opt)
            if opt == "-s" or opt == "-d":
                value = texts[it.args[0]]
                try:
                    if "," in value:
                        prefixes = [parse_prefix(a, bits) for a in value.split(",")]
                    else:
                        prefixes = [parse_prefix(value, bits)]
                except ValueError_ as e:
                    raise _ParamError(str(e), cols[it.args[0]]) from None
                if opt == "-s":
                    srcs = prefixes
                    f["src_neg"] = it.neg
                else:
                    dsts = prefixes
                    f["dst_neg"] = it.neg
                if it.neg and len(prefixes) > 1:
                    raise _ParamError("! not allowed with multiple source or destination IP "
                                      "addresses", cols[it.index])
            elif opt == "-i" or opt == "-o":
                name = texts[it.args[0]]
                if len(name) > IFNAME_MAX:
                    raise _ParamError(f"interface name `{name}' must be shorter than IFNAMSIZ "
                                      f"({IFNAME_MAX + 1})", cols[it.args[0]])
                key = "iif" if opt == "-i" else "oif"
                if name == "+" and not it.neg:
                    continue  # matches every interface: iptables drops it
                f[key] = name
                f[key + "_neg"] = it.neg
                if opt == "-o" and chain in ("INPUT", "PREROUTING"):
                    raise _ParamError(f"Can't use -o with {chain}", cols[it.index])
                if opt == "-i" and chain in ("OUTPUT", "POSTROUTING"):
                    raise _ParamError(f"Can't use -i with {chain}", cols[it.index])
            elif opt == "-p":
                try:
                    proto = parse_proto(texts[it.args[0]])
                except ValueError_ as e:
                    raise _ParamError(str(e), cols[it.args[0]]) from None
                proto_neg = it.neg
                if proto == 0 and it.neg:
                    raise _ParamError("rule would never match protocol", cols[it.index])
            elif opt == "-f":
                if bits != 32:
                    raise _ParamError("unknown option \"-f\"", cols[it.index])
                f["fragment"] = not it.neg
            elif opt == "-c":
                vals = [texts[i] for i in it.args]
                if len(vals) == 1:
                    p_s, comma, b_s = vals[0].partition(",")
                    if not comma:
                        raise _ParamError("-c requires packet and byte counter", cols[it.index])
                else:
                    p_s, b_s = vals
                if not (p_s.isdigit() and b_s.isdigit()):
                    raise _ParamError("-c packet and byte counters must be numbers",
                                      cols[it.index])
                counters = (int(p_s), int(b_s))
            elif opt == "-m":
                if it.neg:
                    raise _ParamError("unexpected ! flag before --match", cols[it.index])
                exts.append(self.load_match(texts[it.args[0]], it.args[0]))
            elif opt == "-j" or opt == "-g":
                if it.neg:
                    raise _ParamError(f"cannot have ! before {opt}", cols[it.index])
                target, target_inst = self.load_target(texts[it.args[0]], opt == "-g",
                                                       cols, it.args[0])
                if target_inst is not None:
                    exts.append(target_inst)
            elif opt == "-t":
                raise _ParamError("The -t option cannot be used in iptables-restore.",
                                  cols[it.index])
            elif opt in ("-4", "-6", "-v", "-n", "-x", "--line-numbers"):
                if opt in ("-v", "-n", "-x", "--line-numbers"):
                    raise _ParamError(f"Illegal option `{opt}' with this command", cols[it.index])
            else:
                inst = _find_owner(exts, opt)
                if inst is None:
                    inst, opt = _find_prefix_owner(exts, opt)
                if inst is None and proto is not None and not proto_neg and not implicit_loaded:
                    pname = PROTO_MATCH.get(proto)
                    ext = MATCHES.get(pname) if pname else None
                    if ext is not None and self.family in ext.families and opt in ext.options:
                        implicit_loaded = True
                        inst = _ExtInst(ext, {}, it.index, implicit=True)
                        exts.append(inst)
                if inst is None:
                    raise _ParamError(f"unknown option \"{opt}\"", cols[it.index])
                inst.raw.append((opt, it.neg, tuple([texts[i] for i in it.args]), it.index,
                                 it.args[0] if it.args else it.index))
        ctx_key = (proto, proto_neg, table, chain, bits)
        matches = []
        for inst in exts:
            ext_key = (inst.ext.name, tuple([r[:3] for r in inst.raw]), ctx_key)
            obj = _EXT_CACHE.get(ext_key)
            if obj is None:
                obj = self.finish(inst, Ctx(bits, proto, proto_neg, table, chain), target, cols)
                if len(_EXT_CACHE) < 65536:
                    _EXT_CACHE[ext_key] = obj
            if inst.is_target:
                assert isinstance(obj, Target)
                target = obj
            else:
                assert isinstance(obj, Match)
                matches.append(obj)
        col = cols.first if isinstance(cols, _LazyCols) else cols[0]
        if (srcs is None or len(srcs) == 1) and (dsts is None or len(dsts) == 1):
            if srcs is not None:
                f["src"] = _drop_any(srcs[0], f["src_neg"])
            if dsts is not None:
                f["dst"] = _drop_any(dsts[0], f["dst_neg"])
            return [Rule(proto=proto if proto else None, proto_neg=proto_neg if proto else False,
                         matches=tuple(matches), target=target, counters=counters,
                         line=self.lineno, col=col, **f)]
        base = Rule(proto=proto if proto else None, proto_neg=proto_neg if proto else False,
                    matches=tuple(matches), target=target, counters=counters,
                    line=self.lineno, col=col, **f)
        out = []
        for s in srcs or [None]:
            for d in dsts or [None]:
                out.append(replace(base, src=_drop_any(s, f.get("src_neg")),
                                   dst=_drop_any(d, f.get("dst_neg"))))
        return out

    def make_plan(self, tpl: Template, texts: Sequence[str], chain: str) -> _Plan | None:
        """Resolve a rule line's extensions once for all lines like it (None: not plannable)."""
        assert self.cur is not None
        src = dst = None
        fields: dict[str, object] = {}
        ifaces: list[tuple[str, int, bool]] = []
        proto: int | None = None
        proto_neg = False
        target: Target | None = None
        jump_chain = None
        insts: list[tuple[Extension, bool, int, list[tuple[str, bool, tuple[int, ...], int]]]]
        insts = []
        implicit_loaded = False
        seen: set[str] = set()
        for it in tpl.items:
            opt = it.opt
            if opt in _CORE_ONCE:
                if opt in seen:
                    return None
                seen.add(opt)
            if opt == "-s" or opt == "-d":
                if it.neg and "," in texts[it.args[0]]:
                    return None
                if opt == "-s":
                    src = (it.args[0], it.neg)
                else:
                    dst = (it.args[0], it.neg)
            elif opt == "-i" or opt == "-o":
                if (opt == "-o" and chain in ("INPUT", "PREROUTING")) \
                        or (opt == "-i" and chain in ("OUTPUT", "POSTROUTING")):
                    return None
                ifaces.append(("iif" if opt == "-i" else "oif", it.args[0], it.neg))
            elif opt == "-p":
                try:
                    proto = parse_proto(texts[it.args[0]])
                except ValueError_:
                    return None
                proto_neg = it.neg
                if proto == 0 and it.neg:
                    return None
            elif opt == "-f":
                if self.bits != 32:
                    return None
                fields["fragment"] = not it.neg
            elif opt == "-m":
                ext = MATCHES.get(MATCH_ALIASES.get(texts[it.args[0]], texts[it.args[0]]))
                if it.neg or ext is None or self.family not in ext.families:
                    return None
                insts.append((ext, False, it.args[0], []))
            elif opt == "-j" or opt == "-g":
                name = texts[it.args[0]]
                c = self.cur.chains.get(name)
                if it.neg:
                    return None
                if c is not None and not c.builtin:
                    target = Target(TargetKind.GOTO if opt == "-g" else TargetKind.JUMP, name)
                    jump_chain = name
                elif opt == "-g":
                    return None
                elif name in _VERDICT_TARGETS:
                    target = _VERDICT_TARGETS[name]
                else:
                    ext = TARGETS.get(name)
                    if ext is None or self.family not in ext.families:
                        return None
                    target = Target(TargetKind.EXTENSION, name)
                    insts.append((ext, True, it.args[0], []))
            else:
                owner = None
                for entry in reversed(insts):
                    if opt in entry[0].options:
                        owner = entry
                        break
                    if any(o.startswith(opt) for o in entry[0].options):
                        return None  # an abbreviation: the general path resolves it
                if owner is None and proto is not None and not proto_neg \
                        and not implicit_loaded:
                    pname = PROTO_MATCH.get(proto)
                    ext = MATCHES.get(pname) if pname else None
                    if ext is not None and self.family in ext.families and opt in ext.options:
                        implicit_loaded = True
                        owner = (ext, False, it.index, [])
                        insts.append(owner)
                if owner is None:
                    return None
                owner[3].append((opt, it.neg, it.args, it.index))
        exts = []
        for ext, is_target, index, items in insts:
            idx = [i for _, _, args, _ in items for i in args]
            getter: Callable[[list[str]], object] = (
                operator.itemgetter(*idx) if idx else _no_values)
            exts.append(_PlanExt(next(_PLAN_IDS), ext, is_target, index, tuple(items), getter))
        fragment = fields.get("fragment")
        assert fragment is None or isinstance(fragment, bool)
        return _Plan(src, dst, fields, tuple(ifaces), proto, proto_neg, target, jump_chain,
                     tuple(exts), Ctx(self.bits, proto, proto_neg, self.cur.name, chain),
                     fragment, proto if proto else None, proto_neg if proto else False)

    def plan_of(self, tpl: Template, static: object, texts: Sequence[str], chain: str
                ) -> _Plan | None:
        """The cached plan of a plain rule line (None: the line needs the general path)."""
        assert self.cur is not None
        key = (tpl, static, chain, self.cur.name, self.bits)
        plan = _PLANS.get(key, False)
        if plan is False:
            plan = self.make_plan(tpl, texts, chain)
            if len(_PLANS) < 4096:
                _PLANS[key] = plan
        assert plan is None or isinstance(plan, _Plan)
        return plan

    def planned_rule(self, tpl: Template, static: object, texts: Sequence[str],
                     cols: Sequence[int] | None, chain: str, col: int,
                     counters: tuple[int, int] | None = None) -> list[Rule] | None:
        """The rule of a plain line through its plan, or None to take the general path."""
        plan = self.plan_of(tpl, static, texts, chain)
        if plan is None:
            return None
        rule = self.apply_plan(plan, texts, cols, chain, col, counters)
        return None if rule is None else [rule]

    def apply_plan(self, plan: _Plan, texts: Sequence[str], cols: Sequence[int] | None,
                   chain: str, col: int, counters: tuple[int, int] | None = None
                   ) -> Rule | None:
        """The rule of a line through its plan, or None to take the general path.

        Without `cols` (word columns, for error messages) only cached extensions are used.
        `counters` are the line's `[p:b]` (a plan never has a -c option).
        """
        assert self.cur is not None
        if plan.jump_chain is not None:
            c = self.cur.chains.get(plan.jump_chain)
            if c is None or c.builtin:
                return None
        target = plan.target
        matches: tuple[Match, ...] = ()
        if plan.exts:
            found = []
            for pe in plan.exts:
                # The uid stands for the plan's extension and context (one plan per shape,
                # -m/-j/-p words, chain, table and family).
                ext_key = (pe.uid, pe.values(texts))  # type: ignore[arg-type]
                obj = _EXT_CACHE.get(ext_key)
                if obj is None:
                    if cols is None:
                        return None
                    assert plan.ctx is not None
                    inst = _ExtInst(pe.ext, {}, pe.index, pe.is_target)
                    for opt, neg, args, index in pe.items:
                        _apply_option(inst, opt, neg, tuple([texts[i] for i in args]), plan.ctx,
                                      cols, index, args[0] if args else index)
                    obj = self.finish(inst, plan.ctx, target, cols)
                    if len(_EXT_CACHE) < 65536:
                        _EXT_CACHE[ext_key] = obj
                if pe.is_target:
                    assert isinstance(obj, Target)
                    target = obj
                else:
                    assert isinstance(obj, Match)
                    found.append(obj)
            matches = tuple(found)
        src = dst = None
        src_neg = dst_neg = False
        if plan.src is not None:
            index, src_neg = plan.src
            value = texts[index]
            if "," in value:
                return None
            try:
                src = parse_prefix(value, self.bits)
            except ValueError_:
                return None
            if src.mask == 0 and not src_neg:
                src = None  # 0.0.0.0/0 matches everything (see _drop_any)
        if plan.dst is not None:
            index, dst_neg = plan.dst
            value = texts[index]
            if "," in value:
                return None
            try:
                dst = parse_prefix(value, self.bits)
            except ValueError_:
                return None
            if dst.mask == 0 and not dst_neg:
                dst = None
        iif = oif = None
        iif_neg = oif_neg = False
        for field_name, index, neg in plan.ifaces:
            name = texts[index]
            if len(name) > IFNAME_MAX:
                return None
            if name == "+" and not neg:
                continue
            if field_name == "iif":
                iif, iif_neg = name, neg
            else:
                oif, oif_neg = name, neg
        return make_rule(src, src_neg, dst, dst_neg, iif, iif_neg, oif, oif_neg,
                         plan.rule_proto, plan.rule_proto_neg, plan.fragment, matches, target,
                         counters, self.lineno, col)

    def finish(self, inst: _ExtInst, ctx: Ctx, target: Target | None, cols: Sequence[int]
               ) -> Match | Target:
        """Parse and check one extension's options (the result is cached by raw text)."""
        for opt, neg, vals, index, arg_index in inst.raw:
            _apply_option(inst, opt, neg, vals, ctx, cols, index, arg_index)
        try:
            opts = inst.ext.finalize(dict(inst.opts), ctx)
        except ValueError_ as e:
            raise _ParamError(str(e), cols[inst.col]) from None
        if inst.is_target:
            assert target is not None
            return Target(target.kind, target.name, tuple(opts.values()))
        return make_match(inst.ext.name, tuple(opts.values()))

    def load_match(self, name: str, index: int, cols: Sequence[int] | None = None
                   ) -> _ExtInst:
        ext = MATCHES.get(MATCH_ALIASES.get(name, name))
        if ext is None or self.family not in ext.families:
            col = cols[index] if cols is not None else index
            if name in UNSUPPORTED_MATCHES:
                raise _ParamError(f"match '{name}' is not supported", col)
            raise _ParamError(f"Couldn't load match `{name}':No such file or directory", col)
        return _ExtInst(ext, {}, index)

    def load_target(self, name: str, goto: bool, cols: Sequence[int], index: int
                    ) -> tuple[Target, _ExtInst | None]:
        assert self.cur is not None
        chain = self.cur.chains.get(name)
        if chain is not None and not chain.builtin:
            return Target(TargetKind.GOTO if goto else TargetKind.JUMP, name), None
        if goto:
            raise _ParamError(f"goto '{name}' is not a chain", cols[index])
        if name in _VERDICT_TARGETS:
            return _VERDICT_TARGETS[name], None
        ext = TARGETS.get(name)
        if ext is None or self.family not in ext.families:
            if name in UNSUPPORTED_TARGETS:
                raise _ParamError(f"target '{name}' is not supported", cols[index])
            raise _ParamError(f"Couldn't load target `{name}':No such file or directory",
                              cols[index])
        return Target(TargetKind.EXTENSION, name), _ExtInst(ext, {}, index, is_target=True)


def _find_prefix_owner(exts: list[_ExtInst], opt: str) -> tuple[_ExtInst | None, str]:
    # getopt_long also takes an abbreviation of a loaded extension's long option
    # (`-m multiport --dport 80` means --dports); the newest extension is searched first.
    if not opt.startswith("--"):
        return None, opt
    for inst in reversed(exts):
        found = [o for o in inst.ext.options if o.startswith(opt)
                 and arity(o) == arity(opt)]
        if found:
            return inst, min(found, key=len)
    return None, opt


def _no_values(texts: list[str]) -> object:
    return ()


_PLANS: dict[tuple[object, ...], _Plan | None] = {}


def _find_owner(exts: list[_ExtInst], opt: str) -> _ExtInst | None:
    # getopt sees the most recently loaded extension's options first.
    for inst in reversed(exts):
        if opt in inst.ext.options:
            return inst
    return None


def _apply_option(inst: _ExtInst, opt: str, neg: bool, vals: tuple[str, ...], ctx: Ctx,
                  cols: Sequence[int], index: int, arg_index: int) -> None:
    spec = inst.ext.options[opt]
    if neg and not spec.invert:
        raise _ParamError(f"option \"{opt}\" cannot be inverted", cols[index])
    before = inst.ext.after.get(opt)
    if before is not None and before not in inst.opts:
        raise _ParamError(f"option \"{opt}\" must come after \"{before}\"", cols[index])
    key = opt
    if opt in inst.opts:
        if opt not in inst.ext.repeatable:
            raise _ParamError(f"option \"{opt}\" can only be used once", cols[index])
        # Each repetition keeps its own entry, in command-line order (`OPT#N` keys): the
        # extension's finalize reads them in order (policy's elements split by --next).
        key = f"{opt}#{len(inst.opts)}"
    value: object = True
    if spec.parse is not None:
        try:
            value = spec.parse(vals, ctx)
        except ValueError_ as e:
            raise _ParamError(str(e), cols[arg_index]) from None
    elif vals:  # a word after an optional-argument option (OPTQ) this extension takes bare
        raise _ParamError(f"Bad argument `{vals[0]}'", cols[arg_index])
    inst.opts[key] = make_option(opt, value, neg)


def _drop_any(p: Prefix | None, neg: object) -> Prefix | None:
    # 0.0.0.0/0 matches everything: iptables-save does not print it unless negated.
    if p is not None and p.mask == 0 and not neg:
        return None
    return p


def _counters(text: str) -> tuple[int, int] | None:
    if len(text) >= 5 and text[0] == "[" and text[-1] == "]":
        p, colon, b = text[1:-1].partition(":")
        if colon and p.isdigit() and b.isdigit():
            return int(p), int(b)
    return None


def _rulenum(w: Word) -> int:
    if not w.text.isdigit() or int(w.text) < 1:
        raise _ParamError(f"Invalid rule number `{w.text}'", w.col)
    return int(w.text)


def _check_chain_name(name: str, col: int) -> None:
    if name.startswith("-") or name.startswith("!") or name in VERDICTS or name in TARGETS:
        raise _ParamError(f"Invalid chain name `{name}'", col)


def _rule_key(r: Rule) -> Rule:
    return replace(r, line=0, col=0, counters=None)


def _referenced(chains: dict[str, _ChainB], name: str) -> bool:
    return any(r.target is not None and r.target.name == name and
               r.target.kind in (TargetKind.JUMP, TargetKind.GOTO)
               for c in chains.values() for r in c.rules)


def _renamed(r: Rule, old: str, new: str) -> Rule:
    t = r.target
    if t is not None and t.name == old and t.kind in (TargetKind.JUMP, TargetKind.GOTO):
        return replace(r, target=replace(t, name=new))
    return r


def parse_command(argv: list[str], *, family: int = 4, table: str = "filter",
                  filename: str = "<argv>", base: Ruleset | None = None) -> Ruleset:
    """One `iptables ARGS...` command applied to empty tables, or to ``base``'s table (as the
    iptables binary parses it: no restore tokenising, `-t TABLE` allowed). Returns the
    resulting table.
    """
    if family not in (4, 6):
        raise ValueError(f"family must be 4 or 6, not {family}")
    args = list(argv)
    for i, a in enumerate(args[:-1]):
        if a in ("-t", "--table"):
            table = args[i + 1]
            del args[i:i + 2]
            break
    p = _Parser(family, filename, base)
    p.lineno = 1
    p.start_table(f"*{table}")
    words = []
    col = 1
    for a in args:
        words.append(Word(a, col))
        col += len(a) + 1
    p.rule_words(normalize(words, glued=True), None)
    p.commit()
    return Ruleset(tuple(p.tables.values()))


def parse_restore(text: str, *, family: int = 4, filename: str = "<stdin>",
                  base: Ruleset | None = None) -> Ruleset:
    """Parse iptables-restore input (family 4) or ip6tables-restore input (family 6).

    ``base`` is the live ruleset for ``--noflush``: a table the input names starts from its
    chains and rules in ``base`` instead of empty.

    Raises ParseError (with line, col and the exit code iptables-restore would use) on
    input that iptables-restore refuses.
    """
    if family not in (4, 6):
        raise ValueError(f"family must be 4 or 6, not {family}")
    # The parse allocates an object or more per word and keeps nearly all of them: the
    # cyclic collector would rescan the growing ruleset again and again (a third of the
    # time on 100,000 rules) and find nothing, as the IR makes no cycles. Collection resumes
    # afterwards (and was only paused if it was on).
    paused = gc.isenabled()
    gc.disable()
    try:
        return _Parser(family, filename, base).run(text)
    finally:
        if paused:
            gc.enable()


__all__ = ["BUILTIN_CHAINS", "ParseError", "grammar_text", "parse_command", "parse_restore"]
