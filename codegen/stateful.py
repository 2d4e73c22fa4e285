"""Stateful matches: limit, hashlimit, statistic and recent, their state kept in maps.

Time is ``bpf_ktime_get_ns`` (CLOCK_MONOTONIC) where the kernel counts jiffies. The token
buckets of limit and hashlimit are the kernel's (credit refilled with time, capped at
``burst`` packets, one packet's worth taken per match) kept as a *theoretical arrival time*
(GCRA): one u64 ``tat`` per bucket; a packet at ``now`` conforms when ``tat <= now + depth -
period`` (depth: burst periods) and then sets ``tat = max(tat, now) + period``. A zeroed
``tat`` is a full bucket, as the kernel starts. Exactness: the kernel adds credit a whole
jiffy at a time (1/HZ s, 4 ms at HZ=250) while bpfilter refills continuously, so a packet
arriving within one jiffy of the moment its token falls due may get the other answer; bursts
faster than a jiffy, and gaps that refill whole packets, give the kernel's answers exactly.
Costs are the kernel's rates (the same integer periods iptables passes it); the kernel's
rounding of them to credits is below one part in a million.

Concurrency: buckets are updated with a compare-and-swap; a CAS fails only when another CPU
took a token in between, and after ``CAS_ATTEMPTS`` such losses in a row the packet counts as
over the limit (the kernel loops). The nth counter is one atomic fetch-and-add. Recent-list
entries are updated without a lock (the kernel holds a global spin lock): two CPUs updating
the same address at the same instant may lose one timestamp.

State does not survive a reload: every load creates fresh maps (the kernel keeps a recent
list or a hashlimit table while any rule still names it across an iptables-restore).

Emitted code uses R6, R8 and R9 (callee-saved, free while a rule's tests run), R0-R5, and
the top of the stack (at most the key's size, rounded to 8 bytes) of the function running
the rule. It reads only the meta area, so
it runs unchanged in the XDP and TC flavors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bpfilter.codegen import asm
from bpfilter.codegen import flavor_netfilter as nf
from bpfilter.codegen.asm import Label
from bpfilter.codegen.helpers import BpfFunc
from bpfilter.codegen.insn import FP, R0, R1, R2, R3, R4, R6, R7, R8, R9, Reg
from bpfilter.codegen.opcodes import Size
from bpfilter.codegen.spec import MapSpec
from bpfilter.codegen.uapi import MapType, NfHook, UpdateFlag
from bpfilter.ir.matches import HASHLIMIT_SCALE, LIMIT_SCALE
from bpfilter.ir.model import Match, Rule

if TYPE_CHECKING:  # codegen/matchers registers these emitters, so it imports this module
    from bpfilter.codegen.matchers import Emitter

NS_PER_S = 1_000_000_000
NS_PER_MS = 1_000_000
LIMIT_UNIT_NS = NS_PER_S // LIMIT_SCALE  # --limit periods are in 1/XT_LIMIT_SCALE s
HASHLIMIT_UNIT_NS = NS_PER_S // HASHLIMIT_SCALE  # hashlimit rev 2/3: microseconds
U32 = 0xFFFFFFFF
IMM_MAX = (1 << 31) - 1  # the largest value an instruction's signed 32-bit immediate holds

STATE_MAP = "rule_state"  # ARRAY: one u64 per rule (limit's tat, the nth packet counter)
STATE_VALUE = 8
ZERO_MAP = "state_zero"  # one zeroed value: the initial value of a new hash entry
CAS_ATTEMPTS = 4

# Stack of the (global) function running the rule: keys for map calls, transient.
# Every frame of a call chain counts against the 512 bytes of BPF stack, and the main
# function's meta area takes most of them: keys hold only the words a lookup compares.
SLOT_KEY = -4  # a u32 ARRAY index

# --- recent: xt_recent's per-list table -----------------------------------------------------
IP_LIST_TOT = 100  # xt_recent's ip_list_tot: addresses a list remembers
RECENT_MAX_NSTAMPS = 256  # XT_RECENT_MAX_NSTAMPS: hitcount must stay below it
# Entry: u32 ttl, u32 nstamps, u32 index, u32 pad, then RECENT_MAX_NSTAMPS u64 timestamps.
# The kernel keeps roundup_pow_of_two(max hitcount) (at least 32) timestamps; a check needs
# only the hitcount-th newest one, so any ring at least that long answers the same.
E_TTL, E_NSTAMPS, E_INDEX, E_STAMPS = 0, 4, 8, 16
RECENT_VALUE = E_STAMPS + 8 * RECENT_MAX_NSTAMPS
TTL_OFFSET = {4: 8, 6: 7}  # iphdr.ttl, ipv6hdr.hop_limit
RECENT_COMMANDS = ("--set", "--rcheck", "--update", "--remove")

# --- hashlimit ----------------------------------------------------------------------------------
HASHLIMIT_MAX_DEFAULT = 8 * 8192  # htable_create: max = 8 * size, size 8192 above 1 GiB of RAM
H_TAT, H_SEEN = 0, 8
HASHLIMIT_VALUE = 16
# proto_ports_offset(): where the two 16-bit "ports" are for protocols that have them
# (IANA numbers: TCP, UDP, DCCP, ESP (its SPI), SCTP, UDP-Lite; AH: after 4 bytes).
IPPROTO_AH = 51
PORTS_AT = {6: 0, 17: 0, 33: 0, 50: 0, 132: 0, 136: 0, IPPROTO_AH: 4}
ZERO_VALUE = max(RECENT_VALUE, HASHLIMIT_VALUE)

LIMIT_OPTIONS = frozenset({"--limit", "--limit-burst"})
STATISTIC_OPTIONS = frozenset({"--mode", "--probability", "--every", "--packet"})
HASHLIMIT_OPTIONS = frozenset({
    "--hashlimit-upto", "--hashlimit-above", "--hashlimit-burst", "--hashlimit-mode",
    "--hashlimit-srcmask", "--hashlimit-dstmask", "--hashlimit-name", "--hashlimit-htable-size",
    "--hashlimit-htable-max", "--hashlimit-htable-expire", "--hashlimit-htable-gcinterval"})
RECENT_OPTIONS = frozenset({*RECENT_COMMANDS, "--seconds", "--reap", "--hitcount", "--rttl",
                            "--name", "--mask", "--rsource", "--rdest"})


def negatable(em: Emitter, negated: bool, test: Callable[[str], None]) -> None:
    """``test`` (jumping to its argument when false), or its negation (matchers.negatable)."""
    if not negated:
        test(em.fail)
        return
    ok = em.label("neg")
    test(ok)
    em.emit(asm.ja(em.fail), Label(ok))


def _refuse(rule: Rule, message: str) -> Exception:
    from bpfilter.codegen.compiler import CompileError  # compiler imports the matcher table
    return CompileError(rule.line, message)


def _short(kind: str, name: str) -> str:
    """A map name for a named kernel table (names are up to 200 bytes; map names 15)."""
    return f"{kind}_{hashlib.blake2s(name.encode(), digest_size=5).hexdigest()}"


def _mov(em: Emitter, reg: Reg, value: int) -> None:
    if 0 <= value <= IMM_MAX:
        em.emit(asm.mov64(reg, value))
    else:
        em.emit(asm.ld_imm64(reg, value))


def _slot(em: Emitter, slot: int, fail: str) -> None:
    """R6 = &rule_state[slot]."""
    em.emit(asm.st(Size.W, FP, SLOT_KEY, slot),
            asm.ld_map_fd(R1, STATE_MAP), asm.mov64(R2, FP), asm.add64(R2, SLOT_KEY),
            asm.call_helper(BpfFunc.map_lookup_elem),
            asm.jmp("jeq", R0, 0, fail),  # never: the index is inside the array
            asm.mov64(R6, R0))


def _now(em: Emitter) -> None:
    """R8 = now (ns)."""
    em.emit(asm.call_helper(BpfFunc.ktime_get_ns), asm.mov64(R8, R0))


def _gcra(em: Emitter, period: int, depth: int, over: str) -> None:
    """Take one packet's worth (``period`` ns) from the bucket ``depth`` ns deep whose tat is
    the u64 at R6 (R8 = now); jump to ``over`` when it holds less. Clobbers R0-R3, R9."""
    took = em.label("took")
    _mov(em, R9, depth - period)
    em.emit(asm.add64(R9, R8), asm.ldx(Size.DW, R0, R6, 0))
    for _ in range(CAS_ATTEMPTS):
        later = em.label("tat")
        em.emit(asm.jmp("jgt", R0, R9, over),
                asm.mov64(R1, R0), asm.jmp("jge", R1, R8, later), asm.mov64(R1, R8),
                Label(later))
        if period <= IMM_MAX:
            em.emit(asm.add64(R1, period))
        else:
            em.emit(asm.ld_imm64(R2, period), asm.add64(R1, R2))
        # cmpxchg: R0 = old *R6; stored R1 when old == R0 (the expected value, kept in R3)
        em.emit(asm.mov64(R3, R0), asm.atomic_cmpxchg(Size.DW, R6, 0, R1),
                asm.jmp("jeq", R0, R3, took))
    em.emit(asm.ja(over), Label(took))


def _zero_value(em: Emitter) -> None:
    em.res.shared(MapSpec(ZERO_MAP, MapType.ARRAY, 4, ZERO_VALUE, 1))


def _find_or_create(em: Emitter, map_name: str, key: int, on_error: str) -> None:
    """R6 = the entry under the key at FP+key, created zeroed when missing (BPF_NOEXIST: a
    concurrent creator wins and its entry is used); ``on_error`` when it cannot be made."""
    _zero_value(em)
    have = em.label("have")
    em.emit(asm.ld_map_fd(R1, map_name), asm.mov64(R2, FP), asm.add64(R2, key),
            asm.call_helper(BpfFunc.map_lookup_elem),
            asm.jmp("jne", R0, 0, have),
            asm.ld_map_fd(R1, map_name), asm.mov64(R2, FP), asm.add64(R2, key),
            asm.ld_map_value(R3, ZERO_MAP, 0), asm.mov64(R4, UpdateFlag.NOEXIST),
            asm.call_helper(BpfFunc.map_update_elem),
            asm.ld_map_fd(R1, map_name), asm.mov64(R2, FP), asm.add64(R2, key),
            asm.call_helper(BpfFunc.map_lookup_elem),
            asm.jmp("jeq", R0, 0, on_error),
            Label(have), asm.mov64(R6, R0))


def _lookup(em: Emitter, map_name: str, key: int, absent: str) -> None:
    """R6 = the entry under the key at FP+key, or jump to ``absent``."""
    em.emit(asm.ld_map_fd(R1, map_name), asm.mov64(R2, FP), asm.add64(R2, key),
            asm.call_helper(BpfFunc.map_lookup_elem),
            asm.jmp("jeq", R0, 0, absent), asm.mov64(R6, R0))


Word = tuple[int, int]  # (meta offset of a 32-bit word, the mask it is ANDed with)


def address_words(meta_off: int, mask: bytes) -> list[Word]:
    """The words of the address at ``meta[meta_off:]`` that ``mask`` (network order) leaves
    something of; the others are zero in every key, so keys leave them out."""
    words = [(meta_off + i, int.from_bytes(mask[i:i + 4], "little"))
             for i in range(0, len(mask), 4)]
    return [w for w in words if w[1]]


def key_offset(size: int) -> int:
    """Where a key of ``size`` bytes sits: at the top of the rule's stack frame."""
    return -((size + 7) // 8 * 8)


def _store_words(em: Emitter, words: list[Word], key: int) -> None:
    for n, (off, m) in enumerate(words):
        em.emit(asm.ldx(Size.W, R1, R7, off))
        if m != U32:
            em.emit(asm.alu32("and", R1, m))
        em.emit(asm.stx(Size.W, FP, key + 4 * n, R1))


def prefix_mask(bits: int, width: int) -> bytes:
    """The network-order mask of a /bits prefix (hashlimit's maskl per word)."""
    return (((1 << width) - 1) ^ ((1 << (width - bits)) - 1)).to_bytes(width // 8, "big")


def _source_offset(family: int) -> int:
    return nf.L3 + (12 if family == 4 else 8)


def _dest_offset(family: int) -> int:
    return nf.L3 + (16 if family == 4 else 24)


# --- limit --------------------------------------------------------------------------------------

def _limit_depth(m: Match) -> int:
    """credit_cap: user2credits(avg * burst), the product a u32 as in limit_mt_check (which
    refuses it only when it wraps below one packet's cost: ir/checks refuses that)."""
    return (_value(m, "--limit") * _value(m, "--limit-burst", 5) & U32) * LIMIT_UNIT_NS


def check_limit(m: Match) -> str | None:
    if _limit_depth(m) < _value(m, "--limit") * LIMIT_UNIT_NS:
        return "match 'limit': rate times burst overflows, try a lower one"
    return None


def _value(m: Match, name: str, default: int = 0) -> int:
    o = m.get(name)
    return default if o is None else int(o.value)


def emit_limit(em: Emitter, rule: Rule, m: Match | None) -> None:
    # limit_mt: one bucket per rule, full at load, `--limit-burst` packets deep.
    assert m is not None
    _slot(em, em.state(STATE_MAP, STATE_VALUE), em.fail)
    _now(em)
    _gcra(em, _value(m, "--limit") * LIMIT_UNIT_NS, _limit_depth(m), em.fail)


# --- statistic ----------------------------------------------------------------------------------

def emit_statistic(em: Emitter, rule: Rule, m: Match | None) -> None:
    assert m is not None
    mode = m.get("--mode")
    assert mode is not None
    if mode.value == "random":
        _random(em, m)
    else:
        _nth(em, m)


def _random(em: Emitter, m: Match) -> None:
    # statistic_mt: (get_random_u32() & 0x7FFFFFFF) < probability (a 31-bit fraction).
    o = m.get("--probability")
    assert o is not None
    p = int(o.value)

    def test(on_false: str) -> None:
        if p == 0:
            em.emit(asm.ja(on_false))
            return
        if p > 0x7FFFFFFF:
            return  # every 31-bit value is below it
        em.emit(asm.call_helper(BpfFunc.get_prandom_u32),
                asm.alu32("and", R0, 0x7FFFFFFF),
                asm.jmp32("jge", R0, p, on_false))

    negatable(em, o.negated, test)


def _nth(em: Emitter, m: Match) -> None:
    # statistic_mt counts packets from every - 1 - packet (libxt_statistic) and matches when
    # the count wraps to 0: the packets numbered packet, packet + every, ... from 0. A 64-bit
    # counter of packets seen, fetched and incremented atomically, gives the same sequence.
    o = m.get("--every")
    assert o is not None
    every = int(o.value)
    packet = _value(m, "--packet")
    _slot(em, em.state(STATE_MAP, STATE_VALUE), em.fail)

    def test(on_false: str) -> None:
        em.emit(asm.mov64(R1, 1), asm.atomic_add(Size.DW, R6, 0, R1, fetch=True))
        if every > 1:
            if every <= IMM_MAX:
                em.emit(asm.mod64(R1, every))
            else:
                em.emit(asm.ld_imm64(R2, every), asm.mod64(R1, R2))
            em.emit(asm.jmp32("jne", R1, packet, on_false))

    negatable(em, o.negated, test)


# --- hashlimit ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _HashlimitConfig:
    """What xt_hashlimit takes from the first rule that names a table."""

    modes: tuple[str, ...]
    period: int  # ns
    burst: int
    srcmask: int
    dstmask: int
    max_entries: int
    expire: int  # ns


def _hashlimit_config(m: Match, bits: int) -> _HashlimitConfig:
    rate = m.get("--hashlimit-upto") or m.get("--hashlimit-above")
    assert rate is not None
    size = _value(m, "--hashlimit-htable-size")
    maximum = _value(m, "--hashlimit-htable-max")
    if maximum == 0:
        maximum = 8 * size if size else HASHLIMIT_MAX_DEFAULT
    maximum = max(maximum, size)
    modes = m.get("--hashlimit-mode")
    return _HashlimitConfig(
        tuple(sorted(modes.value)) if modes is not None else (),
        int(rate.value[0]) * HASHLIMIT_UNIT_NS, _value(m, "--hashlimit-burst", 5),
        _value(m, "--hashlimit-srcmask", bits), _value(m, "--hashlimit-dstmask", bits),
        maximum, _value(m, "--hashlimit-htable-expire") * NS_PER_MS)


def check_hashlimit(m: Match) -> str | None:
    if _value(m, "--hashlimit-htable-expire") == 0 or \
            _value(m, "--hashlimit-htable-gcinterval", 1000) == 0:
        return "match 'hashlimit': htable-expire and htable-gcinterval must not be 0"
    if _value(m, "--hashlimit-burst", 5) == 0:
        return "match 'hashlimit': burst must not be 0"
    return None


def emit_hashlimit(em: Emitter, rule: Rule, m: Match | None) -> None:
    # hashlimit_mt_common: a bucket per key (addresses and ports as --hashlimit-mode picks,
    # masked), in a table per name shared by every rule naming it. An entry idle for
    # htable-expire ms is dropped (the kernel frees it at the next garbage collection, up
    # to gcinterval later; bpfilter starts it afresh at the first packet after expire), and
    # a full table evicts its least recently used entries (BPF LRU; the kernel hot-drops
    # packets of new keys until entries expire).
    assert m is not None
    bits = 32 if em.family == 4 else 128
    cfg = _hashlimit_config(m, bits)
    for what, n in (("srcmask", cfg.srcmask), ("dstmask", cfg.dstmask)):
        if n > bits:
            raise _refuse(rule, f"match 'hashlimit': --hashlimit-{what} {n} is longer than "
                          f"an IPv{em.family} address")
    name = str(m.get("--hashlimit-name").value)
    _agree(em, rule, ("hashlimit", name), cfg,
           f"hashlimit table '{name}'", "the kernel uses the first rule's settings")
    words: list[Word] = []
    if "srcip" in cfg.modes:
        words += address_words(_source_offset(em.family), prefix_mask(cfg.srcmask, bits))
    if "dstip" in cfg.modes:
        words += address_words(_dest_offset(em.family), prefix_mask(cfg.dstmask, bits))
    ports = "srcport" in cfg.modes or "dstport" in cfg.modes
    size = 4 * max(1, len(words) + ports)  # no field at all: one bucket, under a zero key
    key = key_offset(size)
    map_name = em.res.shared(MapSpec(_short("hl", name), MapType.LRU_HASH, size,
                                     HASHLIMIT_VALUE, cfg.max_entries))
    _store_words(em, words, key)
    if ports:
        _hashlimit_ports(em, cfg.modes, key + 4 * len(words))
    elif not words:
        em.emit(asm.st(Size.W, FP, key, 0))
    _find_or_create(em, map_name, key, em.hot())
    _now(em)
    fresh = em.label("fresh")
    em.emit(asm.ldx(Size.DW, R1, R6, H_SEEN), asm.mov64(R2, R8), asm.sub64(R2, R1))
    _mov(em, R3, cfg.expire)
    em.emit(asm.jmp("jlt", R2, R3, fresh),
            asm.st(Size.DW, R6, H_TAT, 0, comment="expired: a new entry, full bucket"),
            Label(fresh), asm.stx(Size.DW, R6, H_SEEN, R8))
    if m.get("--hashlimit-upto") is not None:
        _gcra(em, cfg.period, cfg.period * cfg.burst, em.fail)
        return
    over = em.label("over")
    _gcra(em, cfg.period, cfg.period * cfg.burst, over)
    em.emit(asm.ja(em.fail), Label(over))


def _hashlimit_ports(em: Emitter, modes: tuple[str, ...], at: int) -> None:
    """hashlimit_init_dst: the two 16-bit words at proto_ports_offset() of the transport
    header (0 for protocols without ports) into the key word at FP+at; an unreadable header
    hot-drops."""
    done, read = em.label("ports_done"), em.label("ports_read")
    em.emit(asm.st(Size.W, FP, at, 0), asm.ldx(Size.W, R1, R7, nf.PROTO))
    if em.family == 6:
        # ipv6_skip_exthdr failing (or reaching NEXTHDR_NONE) hot-drops; it stops at a
        # later fragment's header, whose type has no ports. (The prologue's walk also
        # fails on a later fragment followed by another extension header, where
        # ipv6_skip_exthdr would give ports 0: such a packet is hot-dropped.)
        em.emit(asm.ldx(Size.W, R2, R7, nf.PROTO_ERROR), asm.jmp("jne", R2, 0, em.hot()),
                asm.jmp("jeq", R1, nf.NEXTHDR_NONE, em.hot()),
                asm.ldx(Size.W, R2, R7, nf.FRAG), asm.jmp("jne", R2, 0, done))
    for proto, offset in sorted(PORTS_AT.items()):
        if em.family == 6 and proto == IPPROTO_AH:
            continue  # an extension header in IPv6: skipped by the walk
        em.emit(asm.mov64(R3, offset), asm.jmp("jeq", R1, proto, read))
    em.emit(asm.ja(done), Label(read),
            asm.ldx(Size.W, R2, R7, nf.L4_LEN), asm.sub64(R2, R3),
            asm.jslt(R2, 4, em.hot()),
            asm.mov64(R1, R7), asm.add64(R1, R3))
    if "srcport" in modes:
        em.emit(asm.ldx(Size.H, R2, R1, nf.L4), asm.stx(Size.H, FP, at, R2))
    if "dstport" in modes:
        em.emit(asm.ldx(Size.H, R2, R1, nf.L4 + 2), asm.stx(Size.H, FP, at + 2, R2))
    em.emit(Label(done))


def _agree(em: Emitter, rule: Rule, key: tuple[str, str], value: object, what: str,
           why: str) -> None:
    """Refuse a rule whose settings for a shared kernel object differ from the first rule's."""
    first = em.res.facts.setdefault(key, (value, rule.line))
    if first[0] != value:
        raise _refuse(rule, f"{what} is set up differently at line {first[1]} ({why}); "
                      "use the same options or another name")


# --- recent -------------------------------------------------------------------------------------

def check_recent(m: Match) -> str | None:
    if m.get("--reap") is not None:
        # recent_entry_reap drops the least recently updated entry of the whole list when
        # its newest stamp is older than --seconds; a BPF LRU map cannot name that entry.
        return ("match 'recent' option '--reap' is not supported: it removes the list's "
                "oldest entry, which a BPF LRU map cannot name")
    h = _value(m, "--hitcount")
    if h >= RECENT_MAX_NSTAMPS:
        return (f"match 'recent': hitcount ({h}) is larger than allowed maximum "
                f"({RECENT_MAX_NSTAMPS - 1})")
    return None


def emit_recent(em: Emitter, rule: Rule, m: Match | None) -> None:
    # recent_mt: one entry per (masked) address in a list per name, shared by every rule
    # naming it; the list keeps IP_LIST_TOT addresses, evicting the least recently used
    # (BPF LRU: approximately so, and it may evict a little early when CPUs take free
    # entries in batches; the kernel evicts exactly the oldest-updated one).
    assert m is not None
    bits = 32 if em.family == 4 else 128
    name = str(m.get("--name").value)
    mask = _value(m, "--mask", (1 << bits) - 1)
    _agree(em, rule, ("recent", name), mask, f"recent list '{name}' --mask",
           "the kernel uses the mask of the rule that created the list")
    cmd = next(c for c in RECENT_COMMANDS if m.get(c) is not None)
    negated = m.get(cmd).negated
    side = _dest_offset(em.family) if m.get("--rdest") is not None else _source_offset(em.family)
    words = address_words(side, mask.to_bytes(bits // 8, "big"))
    size = 4 * max(1, len(words))  # --mask 0: every address is one entry, under a zero key
    key = key_offset(size)
    map_name = em.res.shared(MapSpec(_short("rc", name), MapType.LRU_HASH, size, RECENT_VALUE,
                                     IP_LIST_TOT))
    _store_words(em, words, key)
    if not words:
        em.emit(asm.st(Size.W, FP, key, 0))
    # R9 = the TTL "as seen before forwarding": ttl + 1 (a u8) when there is an output
    # device and no local socket. At FORWARD a packet never has a socket (ip_forward drops
    # it); at OUTPUT bpfilter takes the packet to have one, as locally sent packets do (the
    # kernel's own resets and ICMP errors included).
    em.emit(asm.ldx(Size.B, R9, R7, nf.L3 + TTL_OFFSET[em.family]))
    if em.hook is NfHook.FORWARD or em.hook is NfHook.POST_ROUTING:
        em.emit(asm.add64(R9, 1), asm.and64(R9, 0xFF))
    _now(em)
    # Three outcomes: the address is listed and the command holds ("hit", falling through),
    # listed but too few recent stamps ("stale"), not listed ("absent"). The match answers
    # hit XOR `!`, and --update stamps the entry when that answer is true.
    stale, absent = em.label("stale"), em.label("absent")
    if cmd == "--set":
        _find_or_create(em, map_name, key, em.hot())
        _stamp(em)  # a new entry, zeroed, stamped: what recent_entry_init makes
    elif cmd == "--remove":
        _lookup(em, map_name, key, absent)
        em.emit(asm.ld_map_fd(R1, map_name), asm.mov64(R2, FP), asm.add64(R2, key),
                asm.call_helper(BpfFunc.map_delete_elem))
    else:
        _lookup(em, map_name, key, absent)
        if m.get("--rttl") is not None:
            # recent_entry_lookup: ttl == e->ttl || ttl == 0 || e->ttl == 0
            found = em.label("ttl_ok")
            em.emit(asm.jmp("jeq", R9, 0, found),
                    asm.ldx(Size.W, R1, R6, E_TTL), asm.jmp("jeq", R1, 0, found),
                    asm.jmp("jne", R1, R9, absent), Label(found))
        _recent_hits(em, _value(m, "--hitcount"), _value(m, "--seconds"), stale)
    update = cmd == "--update"
    if not negated:
        if update:
            _stamp(em)
        done = em.label("recent")
        em.emit(asm.ja(done), Label(stale), Label(absent), asm.ja(em.fail), Label(done))
        return
    em.emit(asm.ja(em.fail), Label(stale))
    if update:
        _stamp(em)
    em.emit(Label(absent))


def _recent_hits(em: Emitter, hitcount: int, seconds: int, miss: str) -> None:
    """At least max(hitcount, 1) timestamps, the newest that many within ``seconds`` (when
    given): recent_mt's count of stamps no older than the window, as timestamps are kept in
    order and the h-th newest decides."""
    h = max(hitcount, 1)
    em.emit(asm.ldx(Size.W, R1, R6, E_NSTAMPS), asm.jmp("jlt", R1, h, miss))
    if not seconds:
        return
    em.emit(asm.ldx(Size.W, R1, R6, E_INDEX), asm.sub64(R1, h),
            asm.and64(R1, RECENT_MAX_NSTAMPS - 1), asm.lsh64(R1, 3),
            asm.mov64(R3, R6), asm.add64(R3, R1), asm.ldx(Size.DW, R2, R3, E_STAMPS),
            asm.mov64(R1, R8), asm.sub64(R1, R2))
    _mov(em, R2, seconds * NS_PER_S)
    em.emit(asm.jmp("jgt", R1, R2, miss))


def _stamp(em: Emitter) -> None:
    """recent_entry_update and e->ttl = ttl, on the entry at R6 (R8 = now)."""
    em.emit(asm.ldx(Size.W, R1, R6, E_INDEX), asm.and64(R1, RECENT_MAX_NSTAMPS - 1),
            asm.mov64(R2, R1), asm.lsh64(R2, 3), asm.mov64(R3, R6), asm.add64(R3, R2),
            asm.stx(Size.DW, R3, E_STAMPS, R8),
            asm.add64(R1, 1), asm.stx(Size.W, R6, E_INDEX, R1))
    more = em.label("nstamps")
    em.emit(asm.ldx(Size.W, R2, R6, E_NSTAMPS), asm.jmp("jle", R1, R2, more),
            asm.stx(Size.W, R6, E_NSTAMPS, R1), Label(more),
            asm.stx(Size.W, R6, E_TTL, R9))
