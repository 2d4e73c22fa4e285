"""The rule IR: ruleset -> tables -> chains -> rules with typed matches and a target."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from bpfilter.codegen.uapi import NfHook


class Family(enum.StrEnum):
    """Address family of a table, spelled as nftables spells it."""

    IP = "ip"
    IP6 = "ip6"
    INET = "inet"


@dataclass(frozen=True, slots=True)
class Prefix:
    """An address with a mask (contiguous or not); `bits` is 32 or 128."""

    addr: int
    mask: int
    bits: int

    @property
    def length(self) -> int | None:
        """Prefix length when the mask is contiguous, else None."""
        inv = ~self.mask & ((1 << self.bits) - 1)
        if inv & (inv + 1):
            return None
        return self.bits - inv.bit_length()


@dataclass(frozen=True, slots=True)
class PortRange:
    """Inclusive port range."""

    lo: int
    hi: int


@dataclass(frozen=True, slots=True)
class Option:
    """One option of a match or target: canonical name, typed value, negation."""

    name: str
    value: object = None
    negated: bool = False


@dataclass(frozen=True, slots=True)
class Match:
    """A match extension instance (`-m kind ...`).

    Equal matches are shared between rules (the parser interns them), so a match carries no
    location of its own: its rule's line and column locate it.
    """

    kind: str
    options: tuple[Option, ...] = ()

    def get(self, name: str) -> Option | None:
        """The option called `name`, if present."""
        for opt in self.options:
            if opt.name == name:
                return opt
        return None


class TargetKind(enum.Enum):
    """How a rule ends: a verdict, a jump or goto to a user chain, or an extension."""

    VERDICT = "verdict"  # ACCEPT, DROP, RETURN
    JUMP = "jump"
    GOTO = "goto"
    EXTENSION = "extension"


@dataclass(frozen=True, slots=True)
class Target:
    """The rule's `-j`/`-g` target."""

    kind: TargetKind
    name: str
    options: tuple[Option, ...] = ()

    def get(self, name: str) -> Option | None:
        """The option called `name`, if present."""
        for opt in self.options:
            if opt.name == name:
                return opt
        return None


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule with its source location (1-based line and column)."""

    src: Prefix | None = None
    src_neg: bool = False
    dst: Prefix | None = None
    dst_neg: bool = False
    iif: str | None = None
    iif_neg: bool = False
    oif: str | None = None
    oif_neg: bool = False
    proto: int | None = None
    proto_neg: bool = False
    fragment: bool | None = None  # True: -f, False: ! -f
    matches: tuple[Match, ...] = ()
    target: Target | None = None
    counters: tuple[int, int] | None = None
    line: int = 0
    col: int = 0

    @property
    def comment(self) -> str | None:
        """The text of the rule's comment matches, joined by a space."""
        texts = [str(m.options[0].value) for m in self.matches if m.kind == "comment" and m.options]
        return " ".join(texts) if texts else None


@dataclass(frozen=True, slots=True)
class Chain:
    """A base chain (hook set, policy) or a user chain (hook None, policy None)."""

    name: str
    rules: tuple[Rule, ...] = ()
    hook: NfHook | None = None
    priority: int | None = None
    policy: str | None = None
    counters: tuple[int, int] | None = None
    line: int = 0

    @property
    def is_base(self) -> bool:
        return self.hook is not None


@dataclass(frozen=True, slots=True)
class NamedSet:
    """A named set of elements (nftables sets, ipset names referenced by `-m set`)."""

    name: str
    key_type: str
    elements: tuple[object, ...] = ()


@dataclass(frozen=True, slots=True)
class Table:
    """A table: family, name, chains in canonical order."""

    family: Family
    name: str
    chains: tuple[Chain, ...] = ()
    sets: tuple[NamedSet, ...] = ()
    line: int = 0

    def chain(self, name: str) -> Chain | None:
        """The chain called `name`, if present."""
        for c in self.chains:
            if c.name == name:
                return c
        return None


@dataclass(frozen=True, slots=True)
class Ruleset:
    """Tables in input order."""

    tables: tuple[Table, ...] = field(default_factory=tuple)

    def table(self, name: str, family: Family | None = None) -> Table | None:
        """The table called `name` (optionally of one family), if present."""
        for t in self.tables:
            if t.name == name and (family is None or t.family == family):
                return t
        return None


# ---- fast constructors --------------------------------------------------------------------
# The parser builds 100,000s of rules and prefixes: a frozen dataclass's __init__ goes through
# object.__setattr__ per field and keyword matching, several times slower than storing each
# slot through its descriptor. The objects are the same (same class, every slot set, so
# equality and hashing are the dataclass ones); the field order below is checked against the
# dataclass at import, so adding a field fails loudly here instead of leaving a slot unset.

_RULE_FIELDS = ("src", "src_neg", "dst", "dst_neg", "iif", "iif_neg", "oif", "oif_neg",
                "proto", "proto_neg", "fragment", "matches", "target", "counters", "line",
                "col")
if tuple(f.name for f in fields(Rule)) != _RULE_FIELDS or \
        tuple(f.name for f in fields(Prefix)) != ("addr", "mask", "bits") or \
        tuple(f.name for f in fields(Option)) != ("name", "value", "negated") or \
        tuple(f.name for f in fields(Match)) != ("kind", "options"):
    raise ImportError("ir/model.py: the fast constructors do not match the dataclass fields")


def _rule_maker() -> Callable[..., Rule]:
    (s_src, s_src_neg, s_dst, s_dst_neg, s_iif, s_iif_neg, s_oif, s_oif_neg, s_proto,
     s_proto_neg, s_fragment, s_matches, s_target, s_counters, s_line, s_col) = (
        Rule.__dict__[name].__set__ for name in _RULE_FIELDS)
    new = object.__new__

    def make_rule(src: Prefix | None, src_neg: bool, dst: Prefix | None, dst_neg: bool,
                  iif: str | None, iif_neg: bool, oif: str | None, oif_neg: bool,
                  proto: int | None, proto_neg: bool, fragment: bool | None,
                  matches: tuple[Match, ...], target: Target | None,
                  counters: tuple[int, int] | None, line: int, col: int) -> Rule:
        r = new(Rule)
        s_src(r, src)
        s_src_neg(r, src_neg)
        s_dst(r, dst)
        s_dst_neg(r, dst_neg)
        s_iif(r, iif)
        s_iif_neg(r, iif_neg)
        s_oif(r, oif)
        s_oif_neg(r, oif_neg)
        s_proto(r, proto)
        s_proto_neg(r, proto_neg)
        s_fragment(r, fragment)
        s_matches(r, matches)
        s_target(r, target)
        s_counters(r, counters)
        s_line(r, line)
        s_col(r, col)
        return r

    return make_rule


def _prefix_maker() -> Callable[[int, int, int], Prefix]:
    s_addr, s_mask, s_bits = (Prefix.__dict__[name].__set__ for name in ("addr", "mask", "bits"))
    new = object.__new__

    def make_prefix(addr: int, mask: int, bits: int) -> Prefix:
        p = new(Prefix)
        s_addr(p, addr)
        s_mask(p, mask)
        s_bits(p, bits)
        return p

    return make_prefix


def _option_maker() -> Callable[[str, object, bool], Option]:
    s_name, s_value, s_negated = (Option.__dict__[n].__set__ for n in ("name", "value", "negated"))
    new = object.__new__

    def make_option(name: str, value: object, negated: bool) -> Option:
        o = new(Option)
        s_name(o, name)
        s_value(o, value)
        s_negated(o, negated)
        return o

    return make_option


def _match_maker() -> Callable[[str, tuple[Option, ...]], Match]:
    s_kind, s_options = (Match.__dict__[n].__set__ for n in ("kind", "options"))
    new = object.__new__

    def make_match(kind: str, options: tuple[Option, ...]) -> Match:
        m = new(Match)
        s_kind(m, kind)
        s_options(m, options)
        return m

    return make_match


make_rule = _rule_maker()
make_rule.__doc__ = "Rule(...) with every field given positionally, in field order (faster)."
make_prefix = _prefix_maker()
make_prefix.__doc__ = "Prefix(addr, mask, bits), faster."
make_option = _option_maker()
make_option.__doc__ = "Option(name, value, negated), faster."
make_match = _match_maker()
make_match.__doc__ = "Match(kind, options), faster."
