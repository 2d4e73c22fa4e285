"""Find runs of rules that map lookups can decide, keeping iptables' first-match order exact.

A *run* is a stretch of consecutive rules of one chain that are equal except for one *key
field* (source prefix, destination prefix, protocol, or one port of a tcp/udp match) and a
terminal target. Because the other tests are identical for every rule of the run, a packet
matches the run exactly when those tests hold and some rule's key matches; the rule iptables
picks is then the lowest-numbered rule whose key matches, and a table that maps each key to
that rule decides the whole run with one lookup:

- prefixes go into a longest-prefix-match table holding, for each prefix of the run, the
  first rule whose prefix *contains* it. The rules whose prefix contains an address are
  exactly the ancestors of the longest stored prefix that contains it (every rule prefix is
  stored), so the longest match answers the first rule of the run that matches;
- exact keys (protocols, ports, full-length prefixes) go into a hash table holding the
  first rule with that key.

Targets must be terminal (ACCEPT, DROP, RETURN, goto): a rule whose target may let the
packet continue (no target, a jump) could be followed by another matching rule of the same
run. Negated key fields, non-contiguous masks and anything else stay linear. Stretches of
rules that differ in several fields (addresses, protocol, port ranges: ClassBench) become
bit-vector classifiers instead (``Classifier``, below); ``plan`` chooses for a chain.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace

from bpfilter.codegen.uapi import IFNAMSIZ
from bpfilter.ir.model import Match, PortRange, Prefix, Rule, Target, TargetKind

# Shorter runs stay linear. Measured (bench/bench_compile.py sizes): a hash or trie lookup
# costs about 20 ns, a simple linear rule under 0.5 ns; lookups win from ~64 such rules,
# and sooner for rules with more tests or when the verifier's budget gets tight.
MIN_RUN = 32
MAX_ACTIONS = 8  # distinct targets a run may mix (the code dispatches on the action number)
_TERMINAL_VERDICTS = frozenset({"ACCEPT", "DROP", "RETURN"})
# Extension targets that always end the packet's walk (codegen/actions: terminal=True).
TERMINAL_TARGETS = frozenset({"REJECT"})
# Matches that keep state per rule (token buckets, counters, lists): two rules never share
# one, so rules using them stay out of runs and classifiers.
STATEFUL_MATCHES = frozenset({"limit", "hashlimit", "recent", "statistic", "connlimit",
                              "quota", "set"})


class KeyField(enum.Enum):
    """The rule field a lookup replaces; the value is the option's spelling (header field,
    or a single port of the rule's tcp/udp match)."""

    SRC = "-s"
    DST = "-d"
    IIF = "-i"
    OIF = "-o"
    PROTO = "-p"
    SPORT = "--sport"
    DPORT = "--dport"

    @property
    def is_prefix(self) -> bool:
        return self in (KeyField.SRC, KeyField.DST)

    @property
    def is_port(self) -> bool:
        return self in (KeyField.SPORT, KeyField.DPORT)

    @property
    def is_interface(self) -> bool:
        return self in (KeyField.IIF, KeyField.OIF)


def interface_key(name: str | None, negated: bool) -> int | None:
    """An exact interface name as a number (its NUL-padded 16 bytes, big-endian); None for
    no name, a negated one or a ``+`` wildcard (those stay linear)."""
    if name is None or negated or name.endswith("+"):
        return None
    raw = name.encode()
    if len(raw) >= IFNAMSIZ:
        return None
    return int.from_bytes(raw.ljust(IFNAMSIZ, b"\0"), "big")


_PORT_MATCHES = frozenset({"tcp", "udp"})


def port_key(rule: Rule, field: KeyField) -> int | None:
    """The single port the rule's tcp/udp match requires for ``field``, if it is one."""
    for m in rule.matches:
        if m.kind in _PORT_MATCHES:
            o = m.get(field.value)
            if o is None or o.negated:
                return None
            r = o.value
            return r.lo if isinstance(r, PortRange) and r.lo == r.hi else None
    return None


def rest_matches(rule: Rule, field: KeyField) -> tuple[Match, ...]:
    """The rule's matches without the port option ``field`` (the match itself stays: its
    fragment and header-length tests still apply)."""
    if not field.is_port:
        return rule.matches
    return tuple(Match(m.kind, tuple(o for o in m.options if o.name != field.value))
                 if m.kind in _PORT_MATCHES else m for m in rule.matches)


@dataclass(frozen=True)  # no slots: ``exact`` is computed once, on first use
class Run:
    """Rules ``start .. start + len(rules) - 1`` (0-based in the chain) decided by one lookup.

    ``actions`` are the run's distinct targets; ``action_of[k]`` is the index in ``actions``
    of rule k's target. ``entries`` is the table: (key, prefix length, rule k) where key is
    an address (prefix fields, masked) or a protocol number (length 0); a packet whose key
    finds entry (key, length, k) is decided by rule k of the run.
    """

    field: KeyField
    start: int
    rules: tuple[Rule, ...]
    actions: tuple[Target, ...]
    action_of: tuple[int, ...]
    entries: tuple[tuple[int, int, int], ...]
    bits: int = 32  # address width (prefix fields)

    @property
    def stop(self) -> int:
        """Index (0-based) of the first rule after the run."""
        return self.start + len(self.rules)

    @property
    def lines(self) -> tuple[int, ...]:
        return tuple(r.line for r in self.rules)

    @functools.cached_property
    def exact(self) -> bool:
        """True when the keys are exact: protocols, ports, names, or prefixes all of one
        length (the packet's address masked to it is the key): a hash table then serves,
        cheaper to fill and to search than a trie (a trie of 100,000 /24s costs twice the
        lookup time of a hash of them)."""
        if not self.field.is_prefix:
            return True
        n = self.entries[0][1]
        return all(e[1] == n for e in self.entries)

    @property
    def key_length(self) -> int:
        """The prefix length of every key of an exact prefix run."""
        assert self.field.is_prefix and self.exact
        return self.entries[0][1]

    def first_match(self, key: int) -> int | None:
        """Rule k (0-based in the run) the table answers for a packet's key, or None: the
        same lookup the generated code does, in Python (longest prefix, or exact)."""
        best: tuple[int, int] | None = None  # (length, k)
        for addr, length, k in self.entries:
            if not self.field.is_prefix:
                if addr == key:
                    return k
                continue
            shift = self.bits - length
            if key >> shift == addr >> shift and (best is None or length > best[0]):
                best = (length, k)
        return None if best is None else best[1]


def terminal(t: Target | None) -> bool:
    """True for a target after which no later rule of the chain sees the packet."""
    if t is None:
        return False
    if t.kind is TargetKind.VERDICT:
        return t.name in _TERMINAL_VERDICTS
    if t.kind is TargetKind.EXTENSION:
        return t.name in TERMINAL_TARGETS
    return t.kind is TargetKind.GOTO


_LENGTHS: dict[int, dict[int, int | None]] = {32: {}, 128: {}}  # bits -> mask -> length


def prefix_length(p: Prefix) -> int | None:
    """``p.length``, memoised by mask (a ruleset uses few distinct masks)."""
    cache = _LENGTHS.setdefault(p.bits, {})
    try:
        return cache[p.mask]
    except KeyError:
        n = cache[p.mask] = p.length
        return n


class _Actions:
    """Distinct targets in order of first use; targets are interned by the parser, so the
    identity of a target finds its number without hashing it again."""

    def __init__(self) -> None:
        self.targets: list[Target] = []
        self._by_id: dict[int, int] = {}
        self._by_value: dict[Target, int] = {}

    def number(self, t: Target) -> int:
        n = self._by_id.get(id(t))
        if n is None:
            n = self._by_value.get(t)
            if n is None:
                n = self._by_value[t] = len(self.targets)
                self.targets.append(t)
            self._by_id[id(t)] = n
        return n


def _shapes(rules: Sequence[Rule]) -> dict[KeyField, list[tuple[object, ...] | None]]:
    """Per key field, per rule: everything the rule tests except that field (equal shapes,
    equal tests), or None when the rule cannot be part of a run on that field."""
    n = len(rules)
    out: dict[KeyField, list[tuple[object, ...] | None]] = {f: [None] * n for f in KeyField}
    src, dst, proto = out[KeyField.SRC], out[KeyField.DST], out[KeyField.PROTO]
    term: dict[int, bool] = {}
    stateless: dict[int, bool] = {}  # id of a matches tuple -> no stateful match in it
    contiguous: dict[int, bool] = {}  # mask -> contiguous (a chain's prefixes share a width)
    for i, r in enumerate(rules):
        t = r.target
        ok = term.get(id(t))
        if ok is None:
            ok = term[id(t)] = terminal(t)
        if not ok:
            continue
        if r.matches:
            ok = stateless.get(id(r.matches))
            if ok is None:
                ok = stateless[id(r.matches)] = not any(
                    m.kind in STATEFUL_MATCHES for m in r.matches)
            if not ok:
                continue
        p = r.src
        if p is not None and not r.src_neg and (
                contiguous[p.mask] if p.mask in contiguous
                else contiguous.setdefault(p.mask, prefix_length(p) is not None)):
            src[i] = (None, r.dst, r.dst_neg, r.iif, r.iif_neg, r.oif, r.oif_neg, r.proto,
                      r.proto_neg, r.fragment, r.matches)
        p = r.dst
        if p is not None and not r.dst_neg and (
                contiguous[p.mask] if p.mask in contiguous
                else contiguous.setdefault(p.mask, prefix_length(p) is not None)):
            dst[i] = (r.src, r.src_neg, None, r.iif, r.iif_neg, r.oif, r.oif_neg, r.proto,
                      r.proto_neg, r.fragment, r.matches)
        if r.proto and not r.proto_neg:
            proto[i] = (r.src, r.src_neg, r.dst, r.dst_neg, r.iif, r.iif_neg, r.oif,
                        r.oif_neg, None, r.fragment, r.matches)
        if interface_key(r.iif, r.iif_neg) is not None:
            out[KeyField.IIF][i] = (r.src, r.src_neg, r.dst, r.dst_neg, None, r.oif,
                                    r.oif_neg, r.proto, r.proto_neg, r.fragment, r.matches)
        if interface_key(r.oif, r.oif_neg) is not None:
            out[KeyField.OIF][i] = (r.src, r.src_neg, r.dst, r.dst_neg, r.iif, r.iif_neg,
                                    None, r.proto, r.proto_neg, r.fragment, r.matches)
        if r.matches:
            for f in (KeyField.SPORT, KeyField.DPORT):
                if port_key(r, f) is not None:
                    out[f][i] = (r.src, r.src_neg, r.dst, r.dst_neg, r.iif, r.iif_neg, r.oif,
                                 r.oif_neg, r.proto, r.proto_neg, r.fragment,
                                 rest_matches(r, f))
    return out


def find_runs(rules: Sequence[Rule], min_run: int = MIN_RUN) -> list[Run]:
    """The runs of ``rules`` (one chain, in order), left to right, not overlapping; at each
    position the key field giving the longest run wins."""
    n = len(rules)
    shapes = _shapes(rules)
    out: list[Run] = []
    i = 0
    while i < n:
        best: tuple[int, KeyField] | None = None
        for f in KeyField:
            column = shapes[f]
            s = column[i]
            if s is None:
                continue
            j = i + 1
            targets = {id(rules[i].target)}
            while j < n and column[j] == s:
                t = id(rules[j].target)
                if t not in targets:
                    if len(targets) >= MAX_ACTIONS:
                        break
                    targets.add(t)
                j += 1
            if j - i >= min_run and (best is None or j > best[0]):
                best = (j, f)
        if best is None:
            i += 1
            continue
        j, f = best
        out.append(build_run(rules[i:j], f, i))
        i = j
    return out


def build_run(rules: Sequence[Rule], field: KeyField, start: int = 0) -> Run:
    """The lookup table deciding ``rules`` by ``field`` (every rule must be eligible)."""
    actions = _Actions()
    action_of = []
    for r in rules:
        assert r.target is not None
        action_of.append(actions.number(r.target))
    if not field.is_prefix:
        first: dict[int, int] = {}
        for k, r in enumerate(rules):
            if field is KeyField.PROTO:
                key = r.proto
            elif field is KeyField.IIF:
                key = interface_key(r.iif, r.iif_neg)
            elif field is KeyField.OIF:
                key = interface_key(r.oif, r.oif_neg)
            else:
                key = port_key(r, field)
            assert key is not None
            first.setdefault(key, k)
        entries = tuple((key, 0, k) for key, k in first.items())
        return Run(field, start, tuple(rules), tuple(actions.targets), tuple(action_of),
                   entries)
    prefixes = [r.src for r in rules] if field is KeyField.SRC else [r.dst for r in rules]
    assert all(p is not None for p in prefixes)
    bits = prefixes[0].bits
    return Run(field, start, tuple(rules), tuple(actions.targets), tuple(action_of),
               first_containing(prefixes, bits), bits)


def first_containing(prefixes: Sequence[Prefix], bits: int) -> tuple[tuple[int, int, int], ...]:
    """For each distinct prefix Q: (Q.addr, len Q, lowest k such that prefixes[k] contains Q),
    leaving out a Q whose answer equals that of its longest stored proper ancestor: the
    longest-prefix lookup then lands on the ancestor and answers the same rule (rules
    shadowed by an earlier, wider prefix cost no table entry).

    Only the prefix lengths present are probed, so a blocklist of /32s costs one dictionary
    probe per rule.
    """
    by_mask: dict[int, dict[int, int]] = {}  # mask -> addr -> first rule with that prefix
    for k, p in enumerate(prefixes):
        firsts = by_mask.get(p.mask)
        if firsts is None:
            firsts = by_mask[p.mask] = {}
        if p.addr not in firsts:
            firsts[p.addr] = k
    lengths = sorted((prefix_length(Prefix(0, mask, bits)), mask) for mask in by_mask)
    out: list[tuple[int, int, int]] = []
    answers: list[tuple[int, dict[int, int]]] = []  # shorter masks -> addr -> answer, longest first
    for n, mask in lengths:
        assert n is not None
        firsts = by_mask[mask]
        if not answers:  # the shortest length present (the only one in a host blocklist)
            out.extend((addr, n, k) for addr, k in firsts.items())
            answers.append((mask, firsts))
            continue
        mine: dict[int, int] = {}
        for addr, k in firsts.items():
            # The longest ancestor's answer already is the lowest rule over all ancestors.
            parent = None
            for m, shorter in answers:
                parent = shorter.get(addr & m)
                if parent is not None:
                    break
            best = k if parent is None or k < parent else parent
            mine[addr] = best
            if best != parent:
                out.append((addr, n, best))
        answers.insert(0, (mask, mine))
    return tuple(out)


# --- multi-field runs: linear bit-vector search ------------------------------------------------
#
# A stretch of rules that test only source and destination prefixes, a protocol and tcp/udp
# port ranges (ClassBench shape) is decided by bit-vector search, as bpf-iptables does: one
# lookup per field answers the set of rules (a bitmap, bit k = rule k of the stretch) that
# field admits; the first bit set in the AND of the bitmaps is the first rule that matches.
#
# Packets whose ports the tcp/udp matches cannot judge take other bitmaps (the port fields
# then admit every rule): a non-first fragment ("nomatch": rules with ports never match it),
# or a transport header too short or an IPv4 TCP fragment at offset 1 ("hotdrop": the first
# rule whose addresses and protocol match hot-drops the packet if it has ports). An IPv6
# packet whose extension headers cannot be walked ("protoerr") hot-drops at the first rule
# whose addresses match if that rule has -p (as ip6_packet_match does), protocol unlooked at.

MIN_CLASSIFIER = 64  # shorter stretches are cheaper one rule at a time
# Longer stretches are cut into several classifiers, one after the other: a bitmap costs
# rules/8 bytes per table entry, and the word loop rules/64 steps per packet.
MAX_CLASSIFIER = 16384
PORT_SPACE = 65536
NORMAL, NOMATCH, HOTDROP, PROTOERR = 0, 1, 2, 3  # packet classes
EVERY_PROTO = 512  # proto bitmaps: NORMAL at proto, NOMATCH at 256 + proto, PROTOERR here


@dataclass(frozen=True, slots=True)
class PortField:
    """Elementary port intervals: ``starts[i]`` is the first port of interval i (starts[0]
    = 0); ``bitmaps[i]`` the rules admitting it; one more bitmap admits every rule."""

    starts: tuple[int, ...]
    bitmaps: tuple[int, ...]

    def interval(self, port: int) -> int:
        lo, hi = 0, len(self.starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.starts[mid] <= port:
                lo = mid
            else:
                hi = mid - 1
        return lo


@dataclass(frozen=True, slots=True)
class Classifier:
    """Rules ``start ..`` of a chain decided by bit-vector search.

    ``src``/``dst``: (address, prefix length, bitmap) for every prefix that a rule uses
    (and /0), the bitmap holding the rules whose prefix contains it; ``proto``: 513 bitmaps,
    by protocol (NORMAL), 256 + protocol (NOMATCH) and EVERY_PROTO; ``ported[k]``: rule k
    tests ports; ``has_proto[k]``: rule k has -p (even -p all).
    """

    start: int
    rules: tuple[Rule, ...]
    actions: tuple[Target, ...]
    action_of: tuple[int, ...]
    ported: tuple[bool, ...]
    src: tuple[tuple[int, int, int], ...]
    dst: tuple[tuple[int, int, int], ...]
    proto: tuple[int, ...]
    sport: PortField
    dport: PortField
    has_proto: tuple[bool, ...] = ()
    bits: int = 32

    @property
    def stop(self) -> int:
        return self.start + len(self.rules)

    @property
    def words(self) -> int:
        """64-bit words per bitmap."""
        return (len(self.rules) + 63) // 64

    @property
    def lines(self) -> tuple[int, ...]:
        return tuple(r.line for r in self.rules)

    def decide(self, src: int, dst: int, proto: int, sport: int, dport: int,
               klass: int = NORMAL) -> tuple[int, bool] | None:
        """(rule k, hot drop) the tables answer for a packet, or None: what the generated
        code computes, in Python."""
        bits = _longest(self.src, src, self.bits) & _longest(self.dst, dst, self.bits)
        if klass == PROTOERR:
            bits &= self.proto[EVERY_PROTO]
        else:
            bits &= self.proto[proto + (256 if klass == NOMATCH else 0)]
        if klass == NORMAL:
            bits &= self.sport.bitmaps[self.sport.interval(sport)]
            bits &= self.dport.bitmaps[self.dport.interval(dport)]
        if not bits:
            return None
        k = (bits & -bits).bit_length() - 1
        return k, ((klass == HOTDROP and self.ported[k])
                   or (klass == PROTOERR and self.has_proto[k]))


def _longest(entries: Sequence[tuple[int, int, int]], addr: int, width: int) -> int:
    best, bitmap = -1, 0
    for value, length, b in entries:
        if length > best and addr >> (width - length) == value >> (width - length):
            best, bitmap = length, b
    return bitmap


def _ports(rule: Rule) -> tuple[PortRange, PortRange] | None:
    """The rule's (sport, dport) ranges when it has a tcp/udp match, else None."""
    for m in rule.matches:
        if m.kind in ("tcp", "udp"):
            full = PortRange(0, PORT_SPACE - 1)
            s, d = m.get("--sport"), m.get("--dport")
            return (full if s is None else s.value,
                    full if d is None else d.value)
    return None


def classifiable(rule: Rule, bits: int = 32) -> bool:
    """True for a rule of ClassBench shape with a terminal target (addresses ``bits`` wide)."""
    return _Classifiable(bits)(rule)


class _Classifiable:
    """``classifiable`` for many rules: targets, match tuples and masks are shared between
    rules (the parser interns them), so each is judged once."""

    def __init__(self, bits: int = 32) -> None:
        self._bits = bits
        self._targets: dict[int, bool] = {}
        self._masks: dict[int, bool] = {}
        self._matches: dict[int, int | None] = {}  # id -> protocol the match needs (0: none)

    def _prefix_ok(self, p: Prefix | None) -> bool:
        if p is None:
            return True
        if p.bits != self._bits:
            return False
        ok = self._masks.get(p.mask)
        if ok is None:
            ok = self._masks[p.mask] = prefix_length(p) is not None
        return ok

    def __call__(self, rule: Rule) -> bool:
        if (rule.src_neg or rule.dst_neg or rule.proto_neg or rule.iif is not None
                or rule.oif is not None or rule.fragment is not None):
            return False
        t = self._targets.get(id(rule.target))
        if t is None:
            t = self._targets[id(rule.target)] = terminal(rule.target)
        if not t or not self._prefix_ok(rule.src) or not self._prefix_ok(rule.dst):
            return False
        key = id(rule.matches)
        if key in self._matches:
            want = self._matches[key]
        else:
            want = self._matches[key] = _match_protocol(rule.matches)
        return want == 0 or (want is not None and rule.proto == want)


def _match_protocol(matches: tuple[Match, ...]) -> int | None:
    """0 for no matches, the protocol for one tcp/udp match testing only ports, else None."""
    if not matches:
        return 0
    if len(matches) != 1:
        return None
    (m,) = matches
    want = {"tcp": 6, "udp": 17}.get(m.kind)
    if want is None or not all(o.name in ("--sport", "--dport") and not o.negated
                               for o in m.options):
        return None
    return want


def _prefix_bitmaps(prefixes: Sequence[Prefix | None],
                    width: int) -> tuple[tuple[int, int, int], ...]:
    full = (1 << width) - 1
    own: dict[tuple[int, int], int] = {(0, 0): 0}  # (length, addr) -> rules with that prefix
    for k, p in enumerate(prefixes):
        n, addr = (0, 0) if p is None else (prefix_length(p) or 0, p.addr)
        own[(n, addr)] = own.get((n, addr), 0) | (1 << k)
    lengths = sorted({n for n, _ in own})
    out = []
    for (n, addr), bits in own.items():
        for m in lengths:
            if m >= n:
                break
            mask = (full << (width - m)) & full
            bits |= own.get((m, addr & mask), 0)
        out.append((addr, n, bits))
    return tuple(out)


def _port_field(ranges: Sequence[PortRange | None]) -> PortField:
    by_range: dict[tuple[int, int], int] = {}
    for k, r in enumerate(ranges):
        key = (0, PORT_SPACE - 1) if r is None else (r.lo, r.hi)
        by_range[key] = by_range.get(key, 0) | (1 << k)
    cuts = sorted({0} | {lo for lo, _ in by_range} | {hi + 1 for _, hi in by_range
                                                        if hi + 1 < PORT_SPACE})
    bitmaps = []
    for start in cuts:
        bits = 0
        for (lo, hi), b in by_range.items():
            if lo <= start <= hi:
                bits |= b
        bitmaps.append(bits)
    bitmaps.append((1 << len(ranges)) - 1)  # every rule: the ports are not looked at
    return PortField(tuple(cuts), tuple(bitmaps))


def build_classifier(rules: Sequence[Rule], start: int = 0, bits: int = 32) -> Classifier:
    """The bit-vector tables of ``rules`` (every rule must be ``classifiable`` with
    addresses ``bits`` wide)."""
    actions = _Actions()
    action_of = []
    for r in rules:
        assert r.target is not None
        action_of.append(actions.number(r.target))
    ports = [_ports(r) for r in rules]
    any_proto = sum(1 << k for k, r in enumerate(rules) if not r.proto)
    unported = sum(1 << k for k, p in enumerate(ports) if p is None)
    by_proto = [any_proto] * 256
    for k, r in enumerate(rules):
        if r.proto:
            by_proto[r.proto] |= 1 << k
    proto = (*by_proto, *(b & unported for b in by_proto), (1 << len(rules)) - 1)
    return Classifier(
        start, tuple(rules), tuple(actions.targets), tuple(action_of),
        tuple(p is not None for p in ports),
        _prefix_bitmaps([r.src for r in rules], bits),
        _prefix_bitmaps([r.dst for r in rules], bits), proto,
        _port_field([None if p is None else p[0] for p in ports]),
        _port_field([None if p is None else p[1] for p in ports]),
        tuple(r.proto is not None for r in rules), bits)


Segment = Run | Classifier


def plan(rules: Sequence[Rule], family: int = 4, min_run: int = MIN_RUN,
         min_classifier: int = MIN_CLASSIFIER,
         max_classifier: int = MAX_CLASSIFIER) -> list[Segment]:
    """Runs and classifiers for a chain, left to right, not overlapping. A chain or a
    stretch of classifiable rules that one single-field run covers whole stays that run;
    other stretches become classifiers of at most ``max_classifier`` rules."""
    whole = find_runs(rules, min_run)
    if len(whole) == 1 and whole[0].start == 0 and whole[0].stop == len(rules):
        return list(whole)  # one lookup decides the whole chain (a blocklist)
    out: list[Segment] = []
    n = len(rules)
    i = 0
    pending = 0  # rules before i not yet handed to find_runs
    bits = 32 if family == 4 else 128
    fits = _Classifiable(bits)
    while i < n:
        if not fits(rules[i]):
            i += 1
            continue
        j = i
        while j < n and fits(rules[j]):
            j += 1
        if j - i >= min_classifier:
            runs = find_runs(rules[i:j], min_run)
            out.extend(replace(r, start=r.start + pending)
                       for r in find_runs(rules[pending:i], min_run))
            if len(runs) == 1 and runs[0].start == 0 and runs[0].stop == j - i:
                out.append(replace(runs[0], start=i))
                pending = j
            else:
                pending = i
                while j - pending >= min_classifier:
                    end = min(j, pending + max_classifier)
                    out.append(build_classifier(rules[pending:end], pending, bits))
                    pending = end
        i = j
    out.extend(replace(r, start=r.start + pending) for r in find_runs(rules[pending:], min_run))
    return out


def _targets(actions: Sequence[Target]) -> str:
    return ", ".join(f"{'-g ' if t.kind is TargetKind.GOTO else ''}{t.name}" for t in actions)


def explain(segments: Sequence[Segment]) -> list[str]:
    """One line per run or classifier: which rules (input lines) became which tables."""
    out = []
    for n, seg in enumerate(segments):
        lines = seg.lines
        head = f"lookup {n}: rules {seg.start + 1}-{seg.stop} (lines {lines[0]}-{lines[-1]}) -> "
        if isinstance(seg, Run):
            kind = "hash" if seg.exact else "lpm_trie"
            out.append(f"{head}{kind} on {seg.field.value}, {len(seg.entries)} entries, "
                       f"{len(seg.actions)} action(s): {_targets(seg.actions)}")
        else:
            out.append(f"{head}bit-vector classifier, {seg.words} words per bitmap: -s "
                       f"lpm_trie {len(seg.src)} entries, -d lpm_trie {len(seg.dst)} entries, "
                       f"-p array, --sport {len(seg.sport.starts)} intervals, --dport "
                       f"{len(seg.dport.starts)} intervals; {len(seg.actions)} action(s): "
                       f"{_targets(seg.actions)}")
    return out
