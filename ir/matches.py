"""The extension table: every supported match and target described once (parse, check, save)."""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from bpfilter.ir.model import Option, PortRange, Prefix
from bpfilter.ir.values import (
    PROTO_NUMBERS,
    SERVICES,
    ValueError_,
    format_address,
    format_port_range,
    format_prefix_short,
    parse_address,
    parse_port,
    parse_port_range,
    parse_prefix,
    parse_proto,
    parse_uint,
    save_string,
)

U32 = 0xFFFFFFFF

# Option values in the IR (what parsers return and printers and code generators read):
#   ports, port ranges, --length, --mss, --ctexpire, owner ids: PortRange(lo, hi)
#   multiport lists: tuple[PortRange, ...]         addresses: Prefix (conntrack --ct*src/dst)
#   --ctstate/--state/--ctstatus/addrtype types: int bit sets (CT_STATES, CT_STATUS, ADDR_TYPES)
#   --tcp-flags: (mask, comparison) ints            --icmp[v6]-type: (type, code_lo, code_hi)
#   --mark, MARK/CONNMARK --set-xmark: (value, mask)   --tos/--set-tos: (value, mask)
#   --limit: period in 1/10000 s                     hashlimit rates: (period in us, unit in s)
#   --iprange: (first, last) ints                    flags (--syn, --rsource, ...): True
#   anything else: the int or str as given (canonicalised where iptables does)


@dataclass(frozen=True, slots=True)
class Ctx:
    """What an extension may look at while parsing: family, the rule's protocol, where."""

    bits: int = 32  # 32 for iptables, 128 for ip6tables
    proto: int | None = None
    proto_neg: bool = False
    table: str = "filter"
    chain: str = "INPUT"

    @property
    def family(self) -> int:
        return 4 if self.bits == 32 else 6


Parser = Callable[[tuple[str, ...], Ctx], object]
Opts = dict[str, Option]


@dataclass(frozen=True, slots=True)
class OptDef:
    """One option: how its argument(s) parse (None: a flag) and whether `!` is allowed."""

    parse: Parser | None = None
    invert: bool = False


def _no_finalize(opts: Opts, ctx: Ctx) -> Opts:
    return opts


@dataclass(frozen=True, slots=True)
class Extension:
    """A match (`-m NAME`) or target (`-j NAME`) kind."""

    name: str
    kind: str  # "match" or "target"
    options: Mapping[str, OptDef]
    save: Callable[[Opts, Ctx], str]
    finalize: Callable[[Opts, Ctx], Opts] = _no_finalize
    families: frozenset[int] = frozenset({4, 6})
    tables: frozenset[str] | None = None  # only valid in these tables
    aliases: Mapping[str, str] = field(default_factory=dict)
    repeatable: frozenset[str] = frozenset()
    # option -> an option that must come before it on the command line
    after: Mapping[str, str] = field(default_factory=dict)


def fail(msg: str) -> ValueError_:
    return ValueError_(msg)


def _neg(o: Option) -> str:
    return "! " if o.negated else ""


def _one(f: Callable[[str, Ctx], object]) -> Parser:
    return lambda args, ctx: f(args[0], ctx)


# ---- shared parsers ---------------------------------------------------------------------

def _uint(maximum: int, what: str = "value") -> Parser:
    return _one(lambda s, ctx: parse_uint(s, maximum, what))


def _str_max(n: int, what: str) -> Parser:
    # xtables copies string options into fixed buffers and silently truncates them.
    return _one(lambda s, ctx: s[:n])


def _mark(s: str, ctx: Ctx) -> tuple[int, int]:
    v, slash, m = s.partition("/")
    value = parse_uint(v, U32, "mark")
    mask = parse_uint(m, U32, "mask") if slash else U32
    return value, mask


def _range_u(maximum: int, sep: str = ":") -> Parser:
    def p(s: str, ctx: Ctx) -> PortRange:
        if sep not in s:
            n = parse_uint(s, maximum)
            return PortRange(n, n)
        a, _, b = s.partition(sep)
        lo = parse_uint(a, maximum) if a else 0
        hi = parse_uint(b, maximum) if b else maximum
        if lo > hi:
            raise fail(f"invalid range `{s}' specified")
        return PortRange(lo, hi)
    return _one(p)


def _flags_from(names: Mapping[str, int], what: str) -> Callable[[str], int]:
    def p(s: str) -> int:
        bits = 0
        for part in s.split(","):
            key = part.upper()
            if key not in names:
                raise fail(f"Bad {what} \"{part}\"")
            bits |= names[key]
        return bits
    return p


def _print_flags(bits: int, order: list[tuple[str, int]], none: str = "NONE") -> str:
    out = [n for n, b in order if bits & b]
    return ",".join(out) if out else none


def _require(opts: Opts, *names: str, msg: str) -> None:
    if not any(n in opts for n in names):
        raise fail(msg)


def _need(name: str, ext: str) -> Callable[[Opts, Ctx], Opts]:
    def f(opts: Opts, ctx: Ctx) -> Opts:
        _require(opts, name, msg=f"{ext}: option \"{name}\" must be specified")
        return opts
    return f


# ---- tcp / udp ----------------------------------------------------------------------------

TCP_FLAGS = [("FIN", 1), ("SYN", 2), ("RST", 4), ("PSH", 8), ("ACK", 16), ("URG", 32)]
_TCP_FLAG_NAMES = dict(TCP_FLAGS) | {"ALL": 0x3F, "NONE": 0}


def _tcp_flags(args: tuple[str, ...], ctx: Ctx) -> tuple[int, int]:
    p = _flags_from(_TCP_FLAG_NAMES, "TCP flag")
    return p(args[0]), p(args[1])


def _portrange(args: tuple[str, ...], ctx: Ctx) -> PortRange:
    return parse_port_range(args[0])


def _tcp_finalize(opts: Opts, ctx: Ctx) -> Opts:
    if "--syn" in opts:
        if "--tcp-flags" in opts:
            raise fail("Only one of `--syn' or `--tcp-flags'  may be specified")
        syn = opts.pop("--syn")
        opts["--tcp-flags"] = Option("--tcp-flags", (0x17, 0x02), syn.negated)
    return opts


def _ports_save(opts: Opts) -> list[str]:
    out = []
    for name in ("--sport", "--dport"):
        o = opts.get(name)
        if o is None:
            continue
        r = o.value
        assert isinstance(r, PortRange)
        if r.lo == 0 and r.hi == 65535 and not o.negated:
            continue
        out.append(f"{_neg(o)}{name} {format_port_range(r)}")
    return out


def _tcp_save(opts: Opts, ctx: Ctx) -> str:
    out = _ports_save(opts)
    o = opts.get("--tcp-option")
    if o is not None:
        out.append(f"{_neg(o)}--tcp-option {o.value}")
    o = opts.get("--tcp-flags")
    if o is not None:
        mask, cmp = o.value
        out.append(
            f"{_neg(o)}--tcp-flags {_print_flags(mask, TCP_FLAGS)} {_print_flags(cmp, TCP_FLAGS)}"
        )
    return " ".join(out)


_PORT_OPTS = {
    "--sport": OptDef(_portrange, True),
    "--dport": OptDef(_portrange, True),
}
_PORT_ALIASES = {"--source-port": "--sport", "--destination-port": "--dport"}

TCP = Extension(
    "tcp", "match",
    {**_PORT_OPTS, "--tcp-flags": OptDef(_tcp_flags, True), "--syn": OptDef(None, True),
     "--tcp-option": OptDef(_uint(255, "TCP option"), True)},
    _tcp_save, _tcp_finalize, aliases=_PORT_ALIASES,
)
_UDP_NUMBER = re.compile(r"[ \t\n\v\f\r]*\+?[0-9]+").fullmatch


def _udp_port(text: str, default: int) -> int:
    # libxt_udp (iptables 1.8.9) parses its ports with the guided option parser: strtoul in
    # base 10 without a range check, the value cut to 16 bits (70000 is port 4464), else a
    # name from /etc/services; an empty part is ``default``. tcp and sctp check the range.
    if not text:
        return default
    if _UDP_NUMBER(text):
        return int(text.strip().lstrip("+")) & 0xFFFF
    if text in SERVICES:
        return SERVICES[text]
    raise fail(f'Port "{text}" does not resolve to anything.')


def _udp_ports(long_name: str) -> Parser:
    def parse(args: tuple[str, ...], ctx: Ctx) -> PortRange:
        parts = args[0].split(":")
        if len(parts) > 2:
            raise fail(f'udp: Too many components for option "{long_name}" (max: 2)')
        if len(parts) == 1:
            port = _udp_port(parts[0], 0)
            return PortRange(port, port)
        lo, hi = _udp_port(parts[0], 0), _udp_port(parts[1], 65535)
        # 1.8.9 keeps a reversed range as given; later versions refuse it, and so do the
        # upstream tests (libxt_udp.t): refused, as tcp does.
        if lo > hi:
            raise fail(f"invalid portrange (min > max) `{args[0]}'")
        return PortRange(lo, hi)
    return parse


UDP = Extension("udp", "match", {"--sport": OptDef(_udp_ports("--source-port"), True),
                                 "--dport": OptDef(_udp_ports("--destination-port"), True)},
                lambda o, c: " ".join(_ports_save(o)), aliases=_PORT_ALIASES)

SCTP_CHUNK_MATCH = ("all", "any", "only")
SCTP_CHUNKS = {
    "DATA": 0, "INIT": 1, "INIT_ACK": 2, "SACK": 3, "HEARTBEAT": 4, "HEARTBEAT_ACK": 5,
    "ABORT": 6, "SHUTDOWN": 7, "SHUTDOWN_ACK": 8, "ERROR": 9, "COOKIE_ECHO": 10,
    "COOKIE_ACK": 11, "ECN_ECNE": 12, "ECN_CWR": 13, "SHUTDOWN_COMPLETE": 14, "I_DATA": 64,
    "RE_CONFIG": 130, "PAD": 132, "ASCONF": 193, "ASCONF_ACK": 128, "FORWARD_TSN": 192,
    "I_FORWARD_TSN": 194,
}


def _chunk_types(args: tuple[str, ...], ctx: Ctx) -> tuple[str, str]:
    how, chunks = args
    if how not in SCTP_CHUNK_MATCH:
        raise fail(f"sctp: bad chunk match type \"{how}\"")
    if chunks in ("ALL", "NONE"):
        return how, chunks
    items = []
    for part in chunks.split(","):
        name, _, flags = part.partition(":")
        if name not in SCTP_CHUNKS:
            raise fail(f"Unknown sctp chunk `{name}'")
        items.append((SCTP_CHUNKS[name], part))
    return how, ",".join(p for _, p in sorted(items))


def _sctp_save(opts: Opts, ctx: Ctx) -> str:
    out = _ports_save(opts)
    o = opts.get("--chunk-types")
    if o is not None:
        how, chunks = o.value
        out.append(f"{_neg(o)}--chunk-types {how} {chunks}")
    return " ".join(out)


SCTP = Extension("sctp", "match", {**_PORT_OPTS, "--chunk-types": OptDef(_chunk_types, True)},
                 _sctp_save, aliases=_PORT_ALIASES)


# ---- icmp / icmp6 ---------------------------------------------------------------------------

ICMP_TYPES: dict[str, tuple[int, int, int]] = {
    "any": (255, 0, 255), "echo-reply": (0, 0, 255), "pong": (0, 0, 255),
    "destination-unreachable": (3, 0, 255), "network-unreachable": (3, 0, 0),
    "host-unreachable": (3, 1, 1), "protocol-unreachable": (3, 2, 2),
    "port-unreachable": (3, 3, 3), "fragmentation-needed": (3, 4, 4),
    "source-route-failed": (3, 5, 5), "network-unknown": (3, 6, 6),
    "host-unknown": (3, 7, 7), "network-prohibited": (3, 9, 9),
    "host-prohibited": (3, 10, 10), "TOS-network-unreachable": (3, 11, 11),
    "TOS-host-unreachable": (3, 12, 12), "communication-prohibited": (3, 13, 13),
    "host-precedence-violation": (3, 14, 14), "precedence-cutoff": (3, 15, 15),
    "source-quench": (4, 0, 255), "redirect": (5, 0, 255), "network-redirect": (5, 0, 0),
    "host-redirect": (5, 1, 1), "TOS-network-redirect": (5, 2, 2),
    "TOS-host-redirect": (5, 3, 3), "echo-request": (8, 0, 255), "ping": (8, 0, 255),
    "router-advertisement": (9, 0, 255), "router-solicitation": (10, 0, 255),
    "time-exceeded": (11, 0, 255), "ttl-exceeded": (11, 0, 255),
    "ttl-zero-during-transit": (11, 0, 0), "ttl-zero-during-reassembly": (11, 1, 1),
    "parameter-problem": (12, 0, 255), "ip-header-bad": (12, 0, 0),
    "required-option-missing": (12, 1, 1), "timestamp-request": (13, 0, 255),
    "timestamp-reply": (14, 0, 255), "address-mask-request": (17, 0, 255),
    "address-mask-reply": (18, 0, 255),
}
ICMP6_TYPES: dict[str, tuple[int, int, int]] = {
    "destination-unreachable": (1, 0, 255), "no-route": (1, 0, 0),
    "communication-prohibited": (1, 1, 1), "beyond-scope": (1, 2, 2),
    "address-unreachable": (1, 3, 3), "port-unreachable": (1, 4, 4),
    "failed-policy": (1, 5, 5), "reject-route": (1, 6, 6), "packet-too-big": (2, 0, 255),
    "time-exceeded": (3, 0, 255), "ttl-exceeded": (3, 0, 255),
    "ttl-zero-during-transit": (3, 0, 0), "ttl-zero-during-reassembly": (3, 1, 1),
    "parameter-problem": (4, 0, 255), "bad-header": (4, 0, 0),
    "unknown-header-type": (4, 1, 1), "unknown-option": (4, 2, 2),
    "echo-request": (128, 0, 255), "ping": (128, 0, 255), "echo-reply": (129, 0, 255),
    "pong": (129, 0, 255), "mld-listener-query": (130, 0, 255),
    "mld-listener-report": (131, 0, 255), "mld-listener-done": (132, 0, 255),
    "mld-listener-reduction": (132, 0, 255), "router-solicitation": (133, 0, 255),
    "router-advertisement": (134, 0, 255), "neighbour-solicitation": (135, 0, 255),
    "neighbor-solicitation": (135, 0, 255), "neighbour-advertisement": (136, 0, 255),
    "neighbor-advertisement": (136, 0, 255), "redirect": (137, 0, 255),
}


def _icmp_parser(table: Mapping[str, tuple[int, int, int]], what: str) -> Parser:
    def p(s: str, ctx: Ctx) -> tuple[int, int, int]:
        if s in table:
            return table[s]
        t, slash, c = s.partition("/")
        try:
            ty = parse_uint(t, 255)
            if slash:
                code = parse_uint(c, 255)
                return ty, code, code
        except ValueError_:
            raise fail(f"Invalid {what} `{s}'") from None
        return ty, 0, 255
    return _one(p)


def _icmp_save(name: str) -> Callable[[Opts, Ctx], str]:
    def save(opts: Opts, ctx: Ctx) -> str:
        o = opts.get(name)
        if o is None:
            return ""
        ty, lo, hi = o.value
        if ty == 255 and name == "--icmp-type":
            return f"{_neg(o)}{name} any"
        text = f"{_neg(o)}{name} {ty}"
        if lo != 0 or hi != 255:
            text += f"/{lo}"
        return text
    return save


ICMP = Extension("icmp", "match",
                 {"--icmp-type": OptDef(_icmp_parser(ICMP_TYPES, "ICMP type"), True)},
                 _icmp_save("--icmp-type"), families=frozenset({4}))
ICMP6 = Extension("icmp6", "match",
                  {"--icmpv6-type": OptDef(_icmp_parser(ICMP6_TYPES, "ICMPv6 type"), True)},
                  _icmp_save("--icmpv6-type"), families=frozenset({6}))


# ---- conntrack / state --------------------------------------------------------------------

CT_STATES = [("INVALID", 1), ("NEW", 8), ("RELATED", 4), ("ESTABLISHED", 2),
             ("UNTRACKED", 64), ("SNAT", 256), ("DNAT", 512)]
CT_STATUS = [("EXPECTED", 1), ("SEEN_REPLY", 2), ("ASSURED", 4), ("CONFIRMED", 8)]
_ct_state = _flags_from(dict(CT_STATES), "ctstate")
_state_state = _flags_from({k: v for k, v in CT_STATES[:5]}, "state")
_ct_status = _flags_from(dict(CT_STATUS) | {"NONE": 0}, "ctstatus")


def _prefix_opt(args: tuple[str, ...], ctx: Ctx) -> Prefix:
    # libxt_conntrack keeps the address as written (XTTYPE_HOSTMASK) and iptables-save prints
    # it so; the kernel masks when it compares (conntrack_addrcmp).
    p = parse_prefix(args[0], ctx.bits)
    return Prefix(parse_address(args[0].partition("/")[0], ctx.bits), p.mask, p.bits)


def _ctdir(args: tuple[str, ...], ctx: Ctx) -> str:
    d = args[0].upper()
    if d not in ("ORIGINAL", "REPLY"):
        raise fail(f"Bad ctdir value \"{args[0]}\"")
    return d


_CT_ADDRS = ("--ctorigsrc", "--ctorigdst", "--ctreplsrc", "--ctrepldst")
_CT_PORTS = ("--ctorigsrcport", "--ctorigdstport", "--ctreplsrcport", "--ctrepldstport")


def _conntrack_save(opts: Opts, ctx: Ctx) -> str:
    out = []
    o = opts.get("--ctstate")
    if o is not None:
        out.append(f"{_neg(o)}--ctstate {_print_flags(o.value, CT_STATES)}")
    o = opts.get("--ctproto")
    if o is not None:
        out.append(f"{_neg(o)}--ctproto {o.value}")
    for name in _CT_ADDRS:
        o = opts.get(name)
        if o is not None:
            out.append(f"{_neg(o)}{name} {format_prefix_short(o.value)}")
    for name in _CT_PORTS:
        o = opts.get(name)
        if o is not None:
            out.append(f"{_neg(o)}{name} {format_port_range(o.value)}")
    o = opts.get("--ctstatus")
    if o is not None:
        out.append(f"{_neg(o)}--ctstatus {_print_flags(o.value, CT_STATUS)}")
    o = opts.get("--ctexpire")
    if o is not None:
        out.append(f"{_neg(o)}--ctexpire {format_port_range(o.value)}")
    o = opts.get("--ctdir")
    if o is not None:
        out.append(f"--ctdir {o.value}")
    return " ".join(out)


def _conntrack_finalize(opts: Opts, ctx: Ctx) -> Opts:
    if not opts:
        raise fail("conntrack: At least one option is required")
    return opts


CONNTRACK = Extension(
    "conntrack", "match",
    {"--ctstate": OptDef(_one(lambda s, c: _ct_state(s)), True),
     "--ctproto": OptDef(_one(lambda s, c: parse_proto(s)), True),
     **{n: OptDef(_prefix_opt, True) for n in _CT_ADDRS},
     **{n: OptDef(_portrange, True) for n in _CT_PORTS},
     "--ctstatus": OptDef(_one(lambda s, c: _ct_status(s)), True),
     "--ctexpire": OptDef(_range_u(U32), True),
     "--ctdir": OptDef(_ctdir, False)},
    _conntrack_save, _conntrack_finalize,
)


def _state_save(opts: Opts, ctx: Ctx) -> str:
    o = opts["--state"]
    return f"{_neg(o)}--state {_print_flags(o.value, CT_STATES)}"


STATE = Extension(
    "state", "match", {"--state": OptDef(_one(lambda s, c: _state_state(s)), True)},
    _state_save, _need("--state", "state"),
)


# ---- multiport ----------------------------------------------------------------------------

_MULTIPORT_PROTOS = {6, 17, 33, 132, 136}


def _port_list(args: tuple[str, ...], ctx: Ctx) -> tuple[PortRange, ...]:
    out = []
    count = 0
    for part in args[0].split(","):
        if ":" in part:
            a, _, b = part.partition(":")
            r = PortRange(parse_port(a), parse_port(b))
            if r.lo > r.hi:
                raise fail(f"invalid portrange `{part}' specified")
            count += 2
        else:
            p = parse_port(part)
            r = PortRange(p, p)
            count += 1
        out.append(r)
    if count > 15:
        raise fail("too many ports specified")
    return tuple(out)


def _multiport_finalize(opts: Opts, ctx: Ctx) -> Opts:
    if not opts:
        raise fail("multiport expects an option")
    if len(opts) > 1:
        raise fail("multiport can only have one option")
    if ctx.proto not in _MULTIPORT_PROTOS or ctx.proto_neg:
        raise fail("multiport needs `-p tcp', `-p udp', `-p udplite', `-p sctp' or `-p dccp'")
    return opts


def _multiport_save(opts: Opts, ctx: Ctx) -> str:
    (name, o), = opts.items()
    ports = ",".join(format_port_range(r) for r in o.value)
    return f"{_neg(o)}{name} {ports}"


MULTIPORT = Extension(
    "multiport", "match",
    {n: OptDef(_port_list, True) for n in ("--sports", "--dports", "--ports")},
    _multiport_save, _multiport_finalize,
    aliases={"--source-ports": "--sports", "--destination-ports": "--dports"},
)


# ---- comment, limit, mark, connmark ---------------------------------------------------------

COMMENT = Extension(
    "comment", "match", {"--comment": OptDef(_str_max(255, "COMMENT"))},
    lambda o, c: f"--comment {save_string(str(o['--comment'].value))}",
    _need("--comment", "comment"),
)

LIMIT_SCALE = 10000
_RATES = [("day", LIMIT_SCALE * 86400), ("hour", LIMIT_SCALE * 3600),
          ("min", LIMIT_SCALE * 60), ("sec", LIMIT_SCALE)]
_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


HASHLIMIT_SCALE = 1000000  # hashlimit revisions 2 and 3 count in microseconds


def parse_rate(s: str, scale: int = LIMIT_SCALE) -> int:
    """`N[/second|/minute|/hour|/day]` (unit prefixes allowed) -> period in 1/scale s."""
    n_s, slash, unit = s.partition("/")
    mult = 1
    if slash:
        for name, m in _UNITS.items():
            if unit and name.startswith(unit.lower()):
                mult = m
                break
        else:
            raise fail(f"bad rate \"{s}\"'")
    n = parse_uint(n_s, U32, "rate") if n_s else 0
    if n == 0:
        raise fail(f"bad rate \"{s}\"'")
    r = scale * mult // n
    if r == 0:
        raise fail(f"Rate too fast \"{s}\"")
    return r


def print_rate(period: int, scale: int = LIMIT_SCALE) -> str:
    """The largest unit that shows the rate without losing much (libxt_limit's rule)."""
    return rate_and_unit(period, scale)[0]


def rate_and_unit(period: int, scale: int = LIMIT_SCALE) -> tuple[str, int]:
    """The printed rate and the length of its unit in seconds."""
    rates = [(name, mult // LIMIT_SCALE * scale) for name, mult in _RATES]
    i = 1
    while i < len(rates):
        mult = rates[i][1]
        if period > mult or mult // period < mult % period:
            break
        i += 1
    name, mult = rates[i - 1]
    return f"{mult // period}/{name}", mult // scale


def rate_unit(s: str) -> int:
    """The unit of a rate as written, in seconds (1 when none is given)."""
    _, slash, unit = s.partition("/")
    if slash:
        for name, m in _UNITS.items():
            if unit and name.startswith(unit.lower()):
                return m
    return 1


def _limit_finalize(opts: Opts, ctx: Ctx) -> Opts:
    opts.setdefault("--limit", Option("--limit", LIMIT_SCALE * 3600 // 3))
    opts.setdefault("--limit-burst", Option("--limit-burst", 5))
    return opts


def _limit_save(opts: Opts, ctx: Ctx) -> str:
    out = f"--limit {print_rate(int(opts['--limit'].value))}"
    burst = opts["--limit-burst"].value
    if burst != 5:
        out += f" --limit-burst {burst}"
    return out


LIMIT = Extension(
    "limit", "match",
    {"--limit": OptDef(_one(lambda s, c: parse_rate(s))),
     "--limit-burst": OptDef(_uint(10000, "burst"))},
    _limit_save, _limit_finalize,
)


def _mark_save(opts: Opts, ctx: Ctx) -> str:
    o = opts["--mark"]
    v, m = o.value
    return f"{_neg(o)}--mark 0x{v:x}" + (f"/0x{m:x}" if m != U32 else "")


MARK_M = Extension("mark", "match", {"--mark": OptDef(_one(_mark), True)}, _mark_save,
                   _need("--mark", "mark"))
CONNMARK_M = Extension("connmark", "match", {"--mark": OptDef(_one(_mark), True)}, _mark_save,
                       _need("--mark", "connmark"))


# ---- addrtype, iprange, length, pkttype, mac ------------------------------------------------

ADDR_TYPES = [("UNSPEC", 1), ("UNICAST", 2), ("LOCAL", 4), ("BROADCAST", 8), ("ANYCAST", 16),
              ("MULTICAST", 32), ("BLACKHOLE", 64), ("UNREACHABLE", 128), ("PROHIBIT", 256),
              ("THROW", 512), ("NAT", 1024), ("XRESOLVE", 2048)]
_addr_type = _flags_from(dict(ADDR_TYPES), "address type")


def _addrtype_finalize(opts: Opts, ctx: Ctx) -> Opts:
    if "--src-type" not in opts and "--dst-type" not in opts:
        raise fail("addrtype: you must specify --src-type or --dst-type")
    if "--limit-iface-in" in opts and "--limit-iface-out" in opts:
        raise fail("addrtype: you can't specify both --limit-iface-in and --limit-iface-out")
    if "--limit-iface-in" in opts and ctx.chain in ("OUTPUT", "POSTROUTING"):
        raise fail("addrtype: --limit-iface-in is not valid in this chain")
    if "--limit-iface-out" in opts and ctx.chain in ("INPUT", "PREROUTING"):
        raise fail("addrtype: --limit-iface-out is not valid in this chain")
    return opts


def _addrtype_save(opts: Opts, ctx: Ctx) -> str:
    out = []
    for name in ("--src-type", "--dst-type"):
        o = opts.get(name)
        if o is not None:
            out.append(f"{_neg(o)}{name} {_print_flags(o.value, ADDR_TYPES)}")
    for name in ("--limit-iface-in", "--limit-iface-out"):
        if name in opts:
            out.append(name)
    return " ".join(out)


ADDRTYPE = Extension(
    "addrtype", "match",
    {"--src-type": OptDef(_one(lambda s, c: _addr_type(s)), True),
     "--dst-type": OptDef(_one(lambda s, c: _addr_type(s)), True),
     "--limit-iface-in": OptDef(None), "--limit-iface-out": OptDef(None)},
    _addrtype_save, _addrtype_finalize,
)


def _ip_range(args: tuple[str, ...], ctx: Ctx) -> tuple[int, int]:
    a, dash, b = args[0].partition("-")
    lo = parse_address(a, ctx.bits)
    hi = parse_address(b, ctx.bits) if dash else lo
    return lo, hi


def _iprange_save(opts: Opts, ctx: Ctx) -> str:
    out = []
    for name in ("--src-range", "--dst-range"):
        o = opts.get(name)
        if o is not None:
            lo, hi = o.value
            out.append(f"{_neg(o)}{name} {format_address(lo, ctx.bits)}-"
                       f"{format_address(hi, ctx.bits)}")
    return " ".join(out)


def _iprange_finalize(opts: Opts, ctx: Ctx) -> Opts:
    if not opts:
        raise fail("iprange match: You must specify `--src-range' or `--dst-range'")
    return opts


IPRANGE = Extension(
    "iprange", "match",
    {"--src-range": OptDef(_ip_range, True), "--dst-range": OptDef(_ip_range, True)},
    _iprange_save, _iprange_finalize,
)


def _range_save(name: str) -> Callable[[Opts, Ctx], str]:
    def save(opts: Opts, ctx: Ctx) -> str:
        o = opts[name]
        return f"{_neg(o)}{name} {format_port_range(o.value)}"
    return save


LENGTH = Extension("length", "match", {"--length": OptDef(_range_u(65535), True)},
                   _range_save("--length"), _need("--length", "length"))

PKT_TYPES = ("unicast", "broadcast", "multicast")


def _pkttype(args: tuple[str, ...], ctx: Ctx) -> str:
    t = args[0].lower()
    if t == "host":
        t = "unicast"
    if t not in PKT_TYPES:
        raise fail(f"Bad packet type '{args[0]}'")
    return t


PKTTYPE = Extension(
    "pkttype", "match", {"--pkt-type": OptDef(_pkttype, True)},
    lambda o, c: f"{_neg(o['--pkt-type'])}--pkt-type {o['--pkt-type'].value}",
    _need("--pkt-type", "pkttype"),
)


def _mac(args: tuple[str, ...], ctx: Ctx) -> str:
    parts = args[0].split(":")
    if len(parts) != 6 or not all(1 <= len(p) <= 2 for p in parts):
        raise fail(f"Bad mac address \"{args[0]}\"")
    try:
        return ":".join(f"{int(p, 16):02x}" for p in parts)
    except ValueError:
        raise fail(f"Bad mac address \"{args[0]}\"") from None


MAC = Extension(
    "mac", "match", {"--mac-source": OptDef(_mac, True)},
    lambda o, c: f"{_neg(o['--mac-source'])}--mac-source {o['--mac-source'].value}",
    _need("--mac-source", "mac"),
)


# ---- ttl, hl, tos, dscp -----------------------------------------------------------------

def _cmp_ext(name: str, prefix: str, family: int) -> Extension:
    names = [f"--{prefix}-eq", f"--{prefix}-lt", f"--{prefix}-gt"]

    def finalize(opts: Opts, ctx: Ctx) -> Opts:
        if len(opts) != 1:
            raise fail(f"{name}: exactly one of {', '.join(names)} is required")
        return opts

    def save(opts: Opts, ctx: Ctx) -> str:
        (n, o), = opts.items()
        return f"{_neg(o)}{n} {o.value}"

    return Extension(name, "match",
                     {names[0]: OptDef(_uint(255), True), names[1]: OptDef(_uint(255)),
                      names[2]: OptDef(_uint(255))},
                     save, finalize, families=frozenset({family}))


TTL_M = _cmp_ext("ttl", "ttl", 4)
HL_M = _cmp_ext("hl", "hl", 6)

TOS_NAMES = {"minimize-delay": 0x10, "maximize-throughput": 0x08,
             "maximize-reliability": 0x04, "minimize-cost": 0x02, "normal-service": 0x00}


def _tos_value(s: str, default_mask: int = 0xFF) -> tuple[int, int]:
    if s.lower() in TOS_NAMES:
        return TOS_NAMES[s.lower()], 0x3F
    v, slash, m = s.partition("/")
    try:
        value = parse_uint(v, 255, "TOS")
        mask = parse_uint(m, 255, "TOS") if slash else default_mask
    except ValueError_:
        raise fail(f"Bad TOS value \"{s}\"") from None
    return value, mask


TOS_M = Extension(
    "tos", "match", {"--tos": OptDef(_one(lambda s, c: _tos_value(s)), True)},
    lambda o, c: "{}--tos 0x{:02x}/0x{:02x}".format(_neg(o["--tos"]), *o["--tos"].value),
    _need("--tos", "tos"),
)

DSCP_CLASSES = {"CS0": 0, "CS1": 8, "CS2": 16, "CS3": 24, "CS4": 32, "CS5": 40, "CS6": 48,
                "CS7": 56, "BE": 0, "AF11": 10, "AF12": 12, "AF13": 14, "AF21": 18, "AF22": 20,
                "AF23": 22, "AF31": 26, "AF32": 28, "AF33": 30, "AF41": 34, "AF42": 36,
                "AF43": 38, "EF": 46}


def _dscp(s: str, ctx: Ctx) -> int:
    return parse_uint(s, 63, "DSCP")


def _dscp_class(s: str, ctx: Ctx) -> int:
    if s.upper() not in DSCP_CLASSES:
        raise fail(f"Invalid DSCP class value `{s}'")
    return DSCP_CLASSES[s.upper()]


def _dscp_finalize(opts: Opts, ctx: Ctx) -> Opts:
    if "--dscp" in opts and "--dscp-class" in opts:
        raise fail("DSCP: only one of --dscp or --dscp-class may be given")
    if "--dscp-class" in opts:
        o = opts.pop("--dscp-class")
        opts["--dscp"] = Option("--dscp", o.value, o.negated)
    _require(opts, "--dscp", msg="DSCP match: Parameter --dscp is required")
    return opts


DSCP_M = Extension(
    "dscp", "match",
    {"--dscp": OptDef(_one(_dscp), True), "--dscp-class": OptDef(_one(_dscp_class), True)},
    lambda o, c: f"{_neg(o['--dscp'])}--dscp 0x{o['--dscp'].value:02x}",
    _dscp_finalize,
)


# ---- recent ---------------------------------------------------------------------------------

_RECENT_CMDS = ("--set", "--rcheck", "--update", "--remove")


def _recent_finalize(opts: Opts, ctx: Ctx) -> Opts:
    cmds = [c for c in _RECENT_CMDS if c in opts]
    if len(cmds) != 1:
        raise fail("recent: you must specify one of `--set', `--rcheck' `--update' or `--remove'")
    if ("--seconds" in opts or "--hitcount" in opts or "--rttl" in opts or "--reap" in opts) \
            and cmds[0] in ("--set", "--remove"):
        raise fail("recent: --seconds, --hitcount, --rttl and --reap need --rcheck or --update")
    if "--reap" in opts and "--seconds" not in opts:
        raise fail("recent: --reap needs --seconds")
    if "--rsource" in opts and "--rdest" in opts:
        raise fail("recent: only one of --rsource or --rdest")
    opts.setdefault("--name", Option("--name", "DEFAULT"))
    opts.setdefault("--mask", Option("--mask", (1 << ctx.bits) - 1))
    if "--rdest" not in opts:
        opts.setdefault("--rsource", Option("--rsource", True))
    return opts


def _recent_save(opts: Opts, ctx: Ctx) -> str:
    out = []
    for c in _RECENT_CMDS:
        if c in opts:
            out.append(f"{_neg(opts[c])}{c}")
    if "--seconds" in opts:
        out.append(f"--seconds {opts['--seconds'].value}")
    if "--reap" in opts:
        out.append("--reap")
    if "--hitcount" in opts:
        out.append(f"--hitcount {opts['--hitcount'].value}")
    if "--rttl" in opts:
        out.append("--rttl")
    out.append(f"--name {opts['--name'].value}")
    out.append(f"--mask {format_address(int(opts['--mask'].value), ctx.bits)}")
    out.append("--rsource" if "--rsource" in opts else "--rdest")
    return " ".join(out)


def _recent_mask(args: tuple[str, ...], ctx: Ctx) -> int:
    return parse_address(args[0], ctx.bits)


def _recent_name(args: tuple[str, ...], ctx: Ctx) -> str:
    s = args[0]
    if not s or len(s) >= 200:
        raise fail(f"Illegal name `{s}'")
    return s


RECENT = Extension(
    "recent", "match",
    {**{c: OptDef(None, True) for c in _RECENT_CMDS},
     "--seconds": OptDef(_uint(U32, "seconds")), "--reap": OptDef(None),
     "--hitcount": OptDef(_uint(65535, "hitcount")), "--rttl": OptDef(None),
     "--name": OptDef(_recent_name), "--mask": OptDef(_recent_mask),
     "--rsource": OptDef(None), "--rdest": OptDef(None)},
    _recent_save, _recent_finalize,
)


# ---- statistic, connlimit, owner, tcpmss, rpfilter, set ---------------------------------------

def _probability(args: tuple[str, ...], ctx: Ctx) -> int:
    try:
        p = float(args[0])
    except ValueError:
        raise fail(f"bad probability \"{args[0]}\"") from None
    if not 0.0 <= p <= 1.0:
        raise fail(f"bad probability \"{args[0]}\"")
    return int(0x80000000 * p + 0.5)


def _statistic_finalize(opts: Opts, ctx: Ctx) -> Opts:
    mode = opts.get("--mode")
    if mode is None:
        raise fail("statistic: no mode specified")
    if mode.value == "random":
        if "--every" in opts or "--packet" in opts:
            raise fail("statistic: --every and --packet need nth mode")
        opts.setdefault("--probability", Option("--probability", 0))
    else:
        if "--probability" in opts:
            raise fail("statistic: --probability needs random mode")
        if "--every" not in opts:
            raise fail("statistic: --every is required in nth mode")
        if "--packet" not in opts:
            raise fail("statistic: option \"--every\" also requires \"--packet\".")
        every = int(opts["--every"].value)
        packet = int(opts.get("--packet", Option("--packet", 0)).value)
        if every == 0:
            raise fail("statistic: --every must be at least 1")
        if packet >= every:
            raise fail("statistic: --packet must be less than --every")
        opts["--packet"] = Option("--packet", packet)
    return opts


def _statistic_save(opts: Opts, ctx: Ctx) -> str:
    mode = opts["--mode"].value
    if mode == "random":
        o = opts["--probability"]
        return f"--mode random {_neg(o)}--probability {int(o.value) / 0x80000000:.11f}"
    o = opts["--every"]
    return f"--mode nth {_neg(o)}--every {o.value} --packet {opts['--packet'].value}"


def _stat_mode(args: tuple[str, ...], ctx: Ctx) -> str:
    if args[0] not in ("random", "nth"):
        raise fail(f"Bad mode \"{args[0]}\"")
    return args[0]


STATISTIC = Extension(
    "statistic", "match",
    {"--mode": OptDef(_stat_mode), "--probability": OptDef(_probability, True),
     "--every": OptDef(_uint(U32), True), "--packet": OptDef(_uint(U32))},
    _statistic_save, _statistic_finalize,
)


def _connlimit_finalize(opts: Opts, ctx: Ctx) -> Opts:
    if ("--connlimit-upto" in opts) == ("--connlimit-above" in opts):
        raise fail("connlimit: exactly one of --connlimit-upto or --connlimit-above")
    if "--connlimit-saddr" in opts and "--connlimit-daddr" in opts:
        raise fail("connlimit: only one of --connlimit-saddr or --connlimit-daddr")
    opts.setdefault("--connlimit-mask", Option("--connlimit-mask", ctx.bits))
    if int(opts["--connlimit-mask"].value) > ctx.bits:
        raise fail("connlimit: invalid mask")
    return opts


def _connlimit_save(opts: Opts, ctx: Ctx) -> str:
    if "--connlimit-upto" in opts:
        o = opts["--connlimit-upto"]
        out = [f"--connlimit-{'above' if o.negated else 'upto'} {o.value}"]
    else:
        o = opts["--connlimit-above"]
        out = [f"--connlimit-{'upto' if o.negated else 'above'} {o.value}"]
    out.append(f"--connlimit-mask {opts['--connlimit-mask'].value}")
    out.append("--connlimit-daddr" if "--connlimit-daddr" in opts else "--connlimit-saddr")
    return " ".join(out)


CONNLIMIT = Extension(
    "connlimit", "match",
    {"--connlimit-upto": OptDef(_uint(U32), True), "--connlimit-above": OptDef(_uint(U32), True),
     "--connlimit-mask": OptDef(_uint(128, "mask")), "--connlimit-saddr": OptDef(None),
     "--connlimit-daddr": OptDef(None)},
    _connlimit_save, _connlimit_finalize,
)


def _id_range(args: tuple[str, ...], ctx: Ctx) -> PortRange:
    s = args[0]
    if s == "root":
        return PortRange(0, 0)
    a, dash, b = s.partition("-")
    try:
        lo = parse_uint(a, U32 - 1)
        hi = parse_uint(b, U32 - 1) if dash else lo
    except ValueError_:
        raise fail(f"Bad user or group \"{s}\" (only numeric ids and root are resolved)") from None
    if lo > hi:
        raise fail(f"Bad range \"{s}\"")
    return PortRange(lo, hi)


def _owner_finalize(opts: Opts, ctx: Ctx) -> Opts:
    if not opts:
        raise fail("owner: at least one option is required")
    if "--suppl-groups" in opts:
        if "--gid-owner" not in opts:
            raise fail("owner: --suppl-groups requires --gid-owner")
        if opts["--suppl-groups"].negated:
            raise fail("owner: --suppl-groups cannot be negated")
    if ctx.chain in ("INPUT", "PREROUTING", "FORWARD"):
        raise fail("owner match is only valid in the OUTPUT and POSTROUTING chains")
    return opts


def _owner_save(opts: Opts, ctx: Ctx) -> str:
    out = []
    o = opts.get("--socket-exists")
    if o is not None:
        out.append(f"{_neg(o)}--socket-exists")
    for name in ("--uid-owner", "--gid-owner"):
        o = opts.get(name)
        if o is not None:
            r = o.value
            assert isinstance(r, PortRange)
            out.append(f"{_neg(o)}{name} {r.lo}" + (f"-{r.hi}" if r.hi != r.lo else ""))
            if name == "--gid-owner" and "--suppl-groups" in opts:
                out.append("--suppl-groups")
    return " ".join(out)


def _owner_order(opts: Opts, ctx: Ctx) -> Opts:
    return _owner_finalize(opts, ctx)


OWNER = Extension(
    "owner", "match",
    {"--uid-owner": OptDef(_id_range, True), "--gid-owner": OptDef(_id_range, True),
     "--socket-exists": OptDef(None, True), "--suppl-groups": OptDef(None, True)},
    _owner_save, _owner_order, after={"--suppl-groups": "--gid-owner"},
)

TCPMSS_M = Extension("tcpmss", "match", {"--mss": OptDef(_range_u(65535), True)},
                     _range_save("--mss"),
                     lambda o, c: _tcp_only(_need("--mss", "tcpmss")(o, c), c))


def _tcp_only(opts: Opts, ctx: Ctx) -> Opts:
    if ctx.proto != 6 or ctx.proto_neg:
        raise fail("tcpmss: the match requires `-p tcp'")
    return opts


RPFILTER = Extension(
    "rpfilter", "match",
    {n: OptDef(None) for n in ("--loose", "--validmark", "--accept-local", "--invert")},
    lambda o, c: " ".join(n for n in ("--loose", "--validmark", "--accept-local", "--invert")
                          if n in o),
    tables=frozenset({"raw", "mangle"}),
)


def _match_set(args: tuple[str, ...], ctx: Ctx) -> tuple[str, str]:
    name, flags = args
    parts = flags.split(",")
    if not name or len(name) > 31 or not all(p in ("src", "dst") for p in parts) \
            or len(parts) > 6:
        raise fail(f"Bad --match-set arguments `{name} {flags}'")
    return name, flags


def _set_save(opts: Opts, ctx: Ctx) -> str:
    o = opts["--match-set"]
    name, flags = o.value
    out = [f"{_neg(o)}--match-set {name} {flags}"]
    if "--return-nomatch" in opts:
        out.append("--return-nomatch")
    for n in ("--update-counters", "--update-subcounters"):
        if n in opts:
            out.append(f"{_neg(opts[n])}{n}")
    return " ".join(out)


SET = Extension(
    "set", "match",
    {"--match-set": OptDef(_match_set, True), "--return-nomatch": OptDef(None),
     "--update-counters": OptDef(None, True), "--update-subcounters": OptDef(None, True)},
    _set_save, _need("--match-set", "set"),
)



# ---- rt (IPv6 routing header) ------------------------------------------------------------

RT_HOPS = 16  # IP6T_RT_HOPS: --rt-0-addrs holds at most this many addresses


def _rt_addrs(args: tuple[str, ...], ctx: Ctx) -> tuple[int, ...]:
    parts = args[0].split(",")
    if len(parts) > RT_HOPS:
        raise fail("too many addresses specified")
    out = []
    for part in parts:
        try:
            out.append(parse_address(part, 128))
        except ValueError_:
            raise fail(f"bad address: {part}") from None
    return tuple(out)


def _rt_segsleft(args: tuple[str, ...], ctx: Ctx) -> PortRange:
    # XTTYPE_UINT32RC: "N", "N:", ":M", "N:M"; a reversed range is kept (it matches nothing).
    a, colon, b = args[0].partition(":")
    lo = parse_uint(a, U32) if a else 0
    if not colon:
        return PortRange(lo, lo)
    return PortRange(lo, parse_uint(b, U32) if b else U32)


def _ntop6(addr: int) -> str:
    """inet_ntop(AF_INET6): IPv4-mapped and IPv4-compatible addresses end in dotted quads."""
    words = [(addr >> (112 - 16 * i)) & 0xFFFF for i in range(8)]
    if words[:5] == [0] * 5 and (words[5] == 0xFFFF or (words[5] == 0 and words[6] != 0)):
        v4 = format_address(addr & U32, 32)
        return f"::ffff:{v4}" if words[5] else f"::{v4}"
    return format_address(addr, 128)


def _rt_finalize(opts: Opts, ctx: Ctx) -> Opts:
    # libip6t_rt checks each --rt-0-* option against what came before it on the line.
    order = list(opts)
    for name in ("--rt-0-res", "--rt-0-addrs"):
        if name not in opts:
            continue
        t = opts.get("--rt-type")
        if t is None or order.index("--rt-type") > order.index(name) or t.value != 0 \
                or t.negated:
            raise fail(f"`--rt-type 0' required before `{name}'")
    if "--rt-0-not-strict" in opts and (
            "--rt-0-addrs" not in opts
            or order.index("--rt-0-addrs") > order.index("--rt-0-not-strict")):
        raise fail("`--rt-0-addr ...' required before `--rt-0-not-strict'")
    return opts


def _rt_save(opts: Opts, ctx: Ctx) -> str:
    out = []
    o = opts.get("--rt-type")
    if o is not None:
        out.append(f"{_neg(o)}--rt-type {o.value}")
    out += _u32_range_save("--rt-segsleft", opts.get("--rt-segsleft"))
    o = opts.get("--rt-len")
    if o is not None:
        out.append(f"{_neg(o)}--rt-len {o.value}")
    if "--rt-0-res" in opts:
        out.append("--rt-0-res")
    if "--rt-0-addrs" in opts:
        addrs = opts["--rt-0-addrs"].value
        out.append("--rt-0-addrs " + ",".join(_ntop6(a) for a in addrs))
    if "--rt-0-not-strict" in opts:
        out.append("--rt-0-not-strict")
    return " ".join(out)


def _u32_range_save(name: str, o: Option | None) -> list[str]:
    # Left out when it is the full range, even negated (iptables 1.8.9's rt_save/frag_save).
    if o is None or (o.value.lo, o.value.hi) == (0, U32):
        return []
    r = o.value
    return [f"{_neg(o)}{name} " + (f"{r.lo}" if r.lo == r.hi else f"{r.lo}:{r.hi}")]


RT = Extension(
    "rt", "match",
    {"--rt-type": OptDef(_uint(U32), True), "--rt-segsleft": OptDef(_rt_segsleft, True),
     "--rt-len": OptDef(_uint(U32), True), "--rt-0-res": OptDef(None),
     "--rt-0-addrs": OptDef(_rt_addrs), "--rt-0-not-strict": OptDef(None)},
    _rt_save, _rt_finalize, families=frozenset({6}),
)


# ---- frag (IPv6 fragment header) ----------------------------------------------------------

_FRAG_FLAGS = ("--fragres", "--fragfirst", "--fragmore", "--fraglast")


def _frag_finalize(opts: Opts, ctx: Ctx) -> Opts:
    if "--fragmore" in opts and "--fraglast" in opts:
        first, second = [n for n in opts if n in ("--fragmore", "--fraglast")]
        raise fail(f"frag: option \"{first}\" cannot be used together with \"{second}\"")
    return opts


def _frag_save(opts: Opts, ctx: Ctx) -> str:
    out = _u32_range_save("--fragid", opts.get("--fragid"))
    o = opts.get("--fraglen")
    if o is not None:
        out.append(f"{_neg(o)}--fraglen {o.value}")
    out += [n for n in _FRAG_FLAGS if n in opts]
    return " ".join(out)


FRAG_M = Extension(
    "frag", "match",
    {"--fragid": OptDef(_rt_segsleft, True), "--fraglen": OptDef(_uint(U32), True),
     **{n: OptDef(None) for n in _FRAG_FLAGS}},
    _frag_save, _frag_finalize, families=frozenset({6}),
)


# ---- ipv6header -----------------------------------------------------------------------------

# (protocol number, MASK_* bit, name iptables-save prints), in print_header's order.
IPV6HEADER_FLAGS = ((0, 128, "hop-by-hop"), (60, 64, "ipv6-opts"), (43, 32, "ipv6-route"),
                    (44, 16, "ipv6-frag"), (51, 8, "ah"), (50, 4, "esp"), (59, 2, "ipv6-nonxt"),
                    (255, 1, "protocol"))
# libip6t_ipv6header's name_to_proto: getprotobyname() (netbase names and aliases, case as
# written there), then its own table.
_IPV6HEADER_NAMES = {
    "hopopt": 0, "HOPOPT": 0, "ipv6-route": 43, "IPv6-Route": 43, "ipv6-frag": 44,
    "IPv6-Frag": 44, "esp": 50, "IPSEC-ESP": 50, "ah": 51, "IPSEC-AH": 51, "ipv6-nonxt": 59,
    "IPv6-NoNxt": 59, "ipv6-opts": 60, "IPv6-Opts": 60,
    "hop-by-hop": 0, "protocol": 255, "hop": 0, "dst": 60, "route": 43, "frag": 44, "auth": 51,
    "none": 59, "prot": 255, "0": 0, "60": 60, "43": 43, "44": 44, "51": 51, "50": 50,
    "59": 59, "255": 255,
}


def _ipv6header(args: tuple[str, ...], ctx: Ctx) -> int:
    bits = {proto: bit for proto, bit, _ in IPV6HEADER_FLAGS}
    flags = 0
    for part in (p for p in args[0].split(",") if p):
        proto = _IPV6HEADER_NAMES.get(part)
        if proto is None and part in PROTO_NUMBERS:
            proto = PROTO_NUMBERS[part]
        if proto is None:
            raise fail(f"unknown header `{part}' specified")
        if proto not in bits:
            raise fail(f"unknown header `{proto}' specified")
        flags |= bits[proto]
    if not flags:
        raise fail("ip6t_ipv6header: cannot parse header names")
    return flags


def _ipv6header_save(opts: Opts, ctx: Ctx) -> str:
    o = opts["--header"]
    names = [name for _, bit, name in IPV6HEADER_FLAGS if int(o.value) & bit]
    return f"{_neg(o)}--header {','.join(names)}" + (" --soft" if "--soft" in opts else "")


IPV6HEADER = Extension(
    "ipv6header", "match", {"--header": OptDef(_ipv6header, True), "--soft": OptDef(None)},
    _ipv6header_save, _need("--header", "ipv6header"), families=frozenset({6}),
)

# ---- hashlimit ------------------------------------------------------------------------------

_HL_MODES = ("srcip", "srcport", "dstip", "dstport")


def _hl_mode(args: tuple[str, ...], ctx: Ctx) -> tuple[str, ...]:
    parts = tuple(args[0].split(","))
    for p in parts:
        if p not in _HL_MODES:
            raise fail(f"hashlimit: bad mode \"{args[0]}\"")
    return parts


def _hashlimit_rate(s: str, ctx: Ctx) -> tuple[int, int]:
    return parse_rate(s, HASHLIMIT_SCALE), rate_unit(s)


def _hashlimit_finalize(opts: Opts, ctx: Ctx) -> Opts:
    if ("--hashlimit-upto" in opts) == ("--hashlimit-above" in opts):
        raise fail("hashlimit: exactly one of --hashlimit-upto or --hashlimit-above")
    _require(opts, "--hashlimit-name", msg="hashlimit: option \"--hashlimit-name\" must be "
             "specified")
    opts.setdefault("--hashlimit-burst", Option("--hashlimit-burst", 5))
    rate = opts.get("--hashlimit-upto") or opts["--hashlimit-above"]
    # Entries expire after one unit of the rate as written, unless told otherwise.
    opts.setdefault("--hashlimit-htable-expire",
                    Option("--hashlimit-htable-expire", rate.value[1] * 1000))
    return opts


def _hashlimit_save(opts: Opts, ctx: Ctx) -> str:
    out = []
    unit = 1
    for name in ("--hashlimit-upto", "--hashlimit-above"):
        if name in opts:
            text, unit = rate_and_unit(opts[name].value[0], HASHLIMIT_SCALE)
            out.append(f"{name} {text}")
    out.append(f"--hashlimit-burst {opts['--hashlimit-burst'].value}")
    if "--hashlimit-mode" in opts:
        modes = opts["--hashlimit-mode"].value
        out.append("--hashlimit-mode " + ",".join(m for m in _HL_MODES if m in modes))
    out.append(f"--hashlimit-name {opts['--hashlimit-name'].value}")
    for name, default in (("--hashlimit-htable-size", 0), ("--hashlimit-htable-max", 0),
                          ("--hashlimit-htable-gcinterval", 1000),
                          ("--hashlimit-htable-expire", unit * 1000)):
        if name in opts and opts[name].value != default:
            out.append(f"{name} {opts[name].value}")
    for name in ("--hashlimit-srcmask", "--hashlimit-dstmask"):
        if name in opts and opts[name].value != ctx.bits:
            out.append(f"{name} {opts[name].value}")
    return " ".join(out)


HASHLIMIT = Extension(
    "hashlimit", "match",
    {"--hashlimit-upto": OptDef(_one(_hashlimit_rate)),
     "--hashlimit-above": OptDef(_one(_hashlimit_rate)),
     "--hashlimit-burst": OptDef(_uint(10000, "burst")),
     "--hashlimit-mode": OptDef(_hl_mode),
     "--hashlimit-srcmask": OptDef(_uint(128, "mask")),
     "--hashlimit-dstmask": OptDef(_uint(128, "mask")),
     "--hashlimit-name": OptDef(_str_max(255, "hashlimit name")),
     **{n: OptDef(_uint(U32)) for n in ("--hashlimit-htable-size", "--hashlimit-htable-max",
                                        "--hashlimit-htable-expire",
                                        "--hashlimit-htable-gcinterval")}},
    _hashlimit_save, _hashlimit_finalize, aliases={"--hashlimit": "--hashlimit-upto"},
)


# ---- esp, ah, mh, quota, cpu, helper, eui64 ----------------------------------------------------

def _spi_save(name: str) -> Callable[[Opts, Ctx], str]:
    """An SPI range, left out when it is the whole range and not negated."""
    def save(opts: Opts, ctx: Ctx) -> str:
        o = opts.get(name)
        if o is None or (o.value == PortRange(0, U32) and not o.negated):
            return ""
        return f"{_neg(o)}{name} {format_port_range(o.value)}"
    return save


ESP = Extension("esp", "match", {"--espspi": OptDef(_range_u(U32), True)},
                _spi_save("--espspi"))


def _ah_save(opts: Opts, ctx: Ctx) -> str:
    out = [_spi_save("--ahspi")(opts, ctx)]
    o = opts.get("--ahlen")
    if o is not None and (o.value != 0 or o.negated):
        out.append(f"{_neg(o)}--ahlen {o.value}")
    if "--ahres" in opts:
        out.append("--ahres")
    return " ".join(x for x in out if x)


def _ah_finalize(opts: Opts, ctx: Ctx) -> Opts:
    # ipt_ah knows only --ahspi; ip6t_ah adds the header length and reserved-field tests.
    for name in ("--ahlen", "--ahres"):
        if name in opts and ctx.family == 4:
            raise fail(f"unknown option \"{name}\"")
    return opts


AH = Extension("ah", "match", {"--ahspi": OptDef(_range_u(U32), True),
                               "--ahlen": OptDef(_uint(U32, "length"), True),
                               "--ahres": OptDef(None)},
               _ah_save, _ah_finalize)

MH_TYPES = {"binding-refresh-request": 0, "brr": 0, "home-test-init": 1, "hoti": 1,
            "careof-test-init": 2, "coti": 2, "home-test": 3, "hot": 3, "careof-test": 4,
            "cot": 4, "binding-update": 5, "bu": 5, "binding-acknowledgement": 6, "ba": 6,
            "binding-error": 7, "be": 7}


def _mh_type(args: tuple[str, ...], ctx: Ctx) -> PortRange:
    def one(t: str, default: int) -> int:
        if not t:
            return default
        if t.lower() in MH_TYPES:
            return MH_TYPES[t.lower()]
        try:
            return parse_uint(t, 255)
        except ValueError_:
            raise fail(f"Invalid MH type `{t}'") from None
    a, colon, b = args[0].partition(":")
    lo = one(a, 0)
    hi = one(b, 255) if colon else lo
    if lo > hi:
        raise fail(f"invalid range `{args[0]}' specified")
    return PortRange(lo, hi)


def _mh_save(opts: Opts, ctx: Ctx) -> str:
    o = opts.get("--mh-type")
    if o is None or (o.value == PortRange(0, 255) and not o.negated):
        return ""
    return f"{_neg(o)}--mh-type {format_port_range(o.value)}"


MH = Extension("mh", "match", {"--mh-type": OptDef(_mh_type, True)}, _mh_save,
               families=frozenset({6}))

U64 = (1 << 64) - 1
QUOTA = Extension("quota", "match", {"--quota": OptDef(_uint(U64, "quota"), True)},
                  lambda o, c: f"{_neg(o['--quota'])}--quota {o['--quota'].value}",
                  _need("--quota", "quota"))
CPU = Extension("cpu", "match", {"--cpu": OptDef(_uint(U32, "cpu"), True)},
                lambda o, c: f"{_neg(o['--cpu'])}--cpu {o['--cpu'].value}",
                _need("--cpu", "cpu"))
HELPER = Extension("helper", "match", {"--helper": OptDef(_str_max(29, "helper"), True)},
                   lambda o, c: f"{_neg(o['--helper'])}--helper "
                                f"{save_string(str(o['--helper'].value))}",
                   _need("--helper", "helper"))
EUI64 = Extension("eui64", "match", {}, lambda o, c: "", families=frozenset({6}))


# ---- ecn, dccp ---------------------------------------------------------------------------------


def _ecn_finalize(opts: Opts, ctx: Ctx) -> Opts:
    if not opts:
        raise fail("ECN match: some option required")
    # xt_ecn checkentry: the TCP bits need a rule limited to TCP.
    if ("--ecn-tcp-cwr" in opts or "--ecn-tcp-ece" in opts) and (ctx.proto != 6
                                                                 or ctx.proto_neg):
        raise fail("ecn: --ecn-tcp-cwr and --ecn-tcp-ece need `-p tcp'")
    return opts


def _ecn_save(opts: Opts, ctx: Ctx) -> str:
    out = [f"{_neg(opts[n])}{n}" for n in ("--ecn-tcp-ece", "--ecn-tcp-cwr") if n in opts]
    o = opts.get("--ecn-ip-ect")
    if o is not None:
        out.append(f"{_neg(o)}--ecn-ip-ect {o.value}")
    return " ".join(out)


ECN = Extension(
    "ecn", "match",
    {"--ecn-tcp-cwr": OptDef(None, True), "--ecn-tcp-ece": OptDef(None, True),
     "--ecn-ip-ect": OptDef(_uint(3, "ECT codepoint"), True)},
    _ecn_save, _ecn_finalize,
)

DCCP_TYPES = ("REQUEST", "RESPONSE", "DATA", "ACK", "DATAACK", "CLOSEREQ", "CLOSE", "RESET",
              "SYNC", "SYNCACK", "INVALID")


def _dccp_types(args: tuple[str, ...], ctx: Ctx) -> int:
    bits = 0
    for part in args[0].split(","):
        if part.upper() not in DCCP_TYPES:
            raise fail(f"Unknown DCCP type `{part}'")
        bits |= 1 << DCCP_TYPES.index(part.upper())
    return bits


def _dccp_save(opts: Opts, ctx: Ctx) -> str:
    out = []
    for name in ("--sport", "--dport"):
        o = opts.get(name)
        if o is not None:
            out.append(f"{_neg(o)}{name} {format_port_range(o.value)}")
    o = opts.get("--dccp-types")
    if o is not None:
        names = [t for i, t in enumerate(DCCP_TYPES) if int(o.value) >> i & 1]
        out.append(f"{_neg(o)}--dccp-types {','.join(names)}")
    o = opts.get("--dccp-option")
    if o is not None:
        out.append(f"{_neg(o)}--dccp-option {o.value}")
    return " ".join(out)


def port16(s: str) -> int:
    """A port as xtables_parse_port's callers that store into a u16 see it: a decimal
    number modulo 2^16, or a service name."""
    return int(s, 10) & 0xFFFF if s.isdigit() and s.isascii() else parse_port(s)


def _dccp_ports(args: tuple[str, ...], ctx: Ctx) -> PortRange:
    # libxt_dccp keeps a reversed range as written (it matches nothing).
    a, colon, b = args[0].partition(":")
    if not colon:
        p = port16(a)
        return PortRange(p, p)
    return PortRange(port16(a) if a else 0, port16(b) if b else 65535)


def _dccp_option(args: tuple[str, ...], ctx: Ctx) -> int:
    n = parse_uint(args[0], 255, "DCCP option")
    if n == 0:
        raise fail("DCCP option 0 cannot be matched")
    return n


DCCP = Extension(
    "dccp", "match",
    {"--sport": OptDef(_dccp_ports, True), "--dport": OptDef(_dccp_ports, True),
     "--dccp-types": OptDef(_dccp_types, True), "--dccp-option": OptDef(_dccp_option, True)},
    _dccp_save, aliases=_PORT_ALIASES,
)


# ---- time ---------------------------------------------------------------------------------------

_DAY = 86400
_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_ALL_WEEKDAYS = 0xFE  # XT_TIME_ALL_WEEKDAYS: bit 1 is Monday ... bit 7 Sunday
_ALL_MONTHDAYS = 0xFFFFFFFE  # bit N is day N of the month
_DATE_STOP = 0x7FFFFFFF  # libxt_time's default --datestop (INT_MAX)


def _strtoul10(s: str) -> tuple[int, str]:
    m = re.match(r"\s*\+?(\d*)", s)
    assert m is not None
    return (int(m.group(1)) if m.group(1) else 0), s[m.end():]


def _time_date(args: tuple[str, ...], ctx: Ctx) -> int:
    """`YYYY[-MM[-DD[Thh[:mm[:ss]]]]]` in UTC, normalised as timegm() does."""
    s = args[0]
    err = fail(f"Invalid date \"{s}\" specified. Should be [YYYY[-MM[-DD[Thh[:mm[:ss]]]]]]")
    fields = [0, 1, 1, 0, 0, 0]
    rest = s
    for i, (seps, hi) in enumerate(((("-",), 2038), (("-",), 12), (("T",), 31),
                                    ((":",), 23), ((":",), 59), ((), 59))):
        fields[i], rest = _strtoul10(rest)
        if (rest and rest[0] not in seps) or fields[i] > hi or (i == 0 and fields[0] < 1970):
            raise err
        if not rest:
            break
        rest = rest[1:]
    year, month, day, hour, minute, second = fields
    m0 = month - 1
    year, m0 = year + m0 // 12, m0 % 12
    days = (datetime.date(year, m0 + 1, 1) - datetime.date(1970, 1, 1)).days + day - 1
    return (days * _DAY + hour * 3600 + minute * 60 + second) & U32


def _time_daytime(args: tuple[str, ...], ctx: Ctx) -> int:
    s = args[0]
    err = fail(f"invalid time \"{s}\" specified, should be hh:mm[:ss] format and within "
               "the boundaries")
    hour, rest = _strtoul10(s)
    if not rest.startswith(":") or hour > 23:
        raise err
    minute, rest = _strtoul10(rest[1:])
    second = 0
    if (rest and rest[0] != ":") or minute > 59:
        raise err
    if rest:
        second, rest = _strtoul10(rest[1:])
        if rest or second > 59:
            raise err
    return hour * 3600 + minute * 60 + second


def _time_weekdays(args: tuple[str, ...], ctx: Ctx) -> int:
    # libxt_time: a digit 1-7, or a word whose first two letters name a day (case matters);
    # a trailing comma is ignored.
    bits = 0
    parts = args[0].split(",")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    for part in parts:
        if part[:1].isdigit():
            n = int(part[0])
            if not 1 <= n <= 7:
                raise fail(f"invalid week day `{part}'")
        else:
            found = [i + 1 for i, d in enumerate(_WEEKDAYS) if len(part) >= 2
                     and d[:2] == part[:2]]
            if not found:
                raise fail(f"Cannot parse \"{args[0]}\" - unknown weekday")
            n = found[0]
        bits |= 1 << n
    return bits


def _time_monthdays(args: tuple[str, ...], ctx: Ctx) -> int:
    bits = 0
    for part in args[0].split(","):
        n, rest = _strtoul10(part)
        if rest or not 1 <= n <= 31:
            raise fail(f"Invalid month day `{part}'")
        bits |= 1 << n
    return bits


def _time_finalize(opts: Opts, ctx: Ctx) -> Opts:
    local = "--localtz" in opts or "--kerneltz" in opts
    if local and "--utc" in opts:
        other = "--kerneltz" if "--kerneltz" in opts else "--localtz"
        raise fail(f"time: option \"--utc\" cannot be used together with \"{other}\".")
    start = int(opts["--timestart"].value) if "--timestart" in opts else 0
    stop = int(opts["--timestop"].value) if "--timestop" in opts else _DAY - 1
    if "--contiguous" in opts and start < stop:
        raise fail("time: --contiguous only makes sense when stoptime is smaller than "
                   "starttime")
    wd = opts.get("--weekdays")
    md = opts.get("--monthdays")
    week = _ALL_WEEKDAYS if wd is None else int(wd.value) ^ (_ALL_WEEKDAYS if wd.negated
                                                              else 0)
    month = _ALL_MONTHDAYS if md is None else int(md.value) ^ (_ALL_MONTHDAYS if md.negated
                                                                else 0)
    out = {
        "--timestart": Option("--timestart", start), "--timestop": Option("--timestop", stop),
        "--monthdays": Option("--monthdays", month), "--weekdays": Option("--weekdays", week),
        "--datestart": Option("--datestart",
                              opts["--datestart"].value if "--datestart" in opts else 0),
        "--datestop": Option("--datestop",
                             opts["--datestop"].value if "--datestop" in opts else _DATE_STOP),
    }
    if local:
        out["--kerneltz"] = Option("--kerneltz", True)
    if "--contiguous" in opts:
        out["--contiguous"] = Option("--contiguous", True)
    return out


def _hms(t: int) -> str:
    return f"{t // 3600:02d}:{t // 60 % 60:02d}:{t % 60:02d}"


def _time_save(opts: Opts, ctx: Ctx) -> str:
    out = []
    start, stop = int(opts["--timestart"].value), int(opts["--timestop"].value)
    if (start, stop) != (0, _DAY - 1):
        out.append(f"--timestart {_hms(start)} --timestop {_hms(stop)}")
    month = int(opts["--monthdays"].value)
    if month != _ALL_MONTHDAYS:
        out.append("--monthdays " + ",".join(str(d) for d in range(1, 32) if month >> d & 1))
    week = int(opts["--weekdays"].value)
    if week != _ALL_WEEKDAYS:
        out.append("--weekdays " + ",".join(d for i, d in enumerate(_WEEKDAYS)
                                            if week >> (i + 1) & 1))
    # iptables 1.8.9 leaves out a date of 0 only (its LONG_MAX test never meets INT_MAX).
    for name in ("--datestart", "--datestop"):
        t = int(opts[name].value)
        if t:
            d = datetime.datetime(1970, 1, 1) + datetime.timedelta(seconds=t)
            out.append(f"{name} {d:%Y-%m-%dT%H:%M:%S}")
    out += [n for n in ("--kerneltz", "--contiguous") if n in opts]
    return " ".join(out)


TIME = Extension(
    "time", "match",
    {"--datestart": OptDef(_time_date), "--datestop": OptDef(_time_date),
     "--timestart": OptDef(_time_daytime), "--timestop": OptDef(_time_daytime),
     "--weekdays": OptDef(_time_weekdays, True), "--monthdays": OptDef(_time_monthdays, True),
     "--utc": OptDef(None), "--localtz": OptDef(None), "--kerneltz": OptDef(None),
     "--contiguous": OptDef(None)},
    _time_save, _time_finalize,
)


# ---- string, u32 -----------------------------------------------------------------------------

STRING_MAX = 128  # XT_STRING_MAX_PATTERN_SIZE


# The pattern is kept as a str of latin-1 characters, one per byte (JSON-friendly).

def _string_text(args: tuple[str, ...], ctx: Ctx) -> str:
    b = args[0].encode("utf-8", "surrogateescape")
    if len(b) > STRING_MAX:
        raise fail("STRING too long \"" + args[0] + "\"")
    return b.decode("latin-1")


def _hex_string(args: tuple[str, ...], ctx: Ctx) -> str:
    """libxt_string's parse_hex_string: `|hex bytes|` between literal text, `\\` escapes."""
    s = args[0]
    out = bytearray()
    i, hexmode = 0, False
    while i < len(s):
        c = s[i]
        if c == "\\" and not hexmode:
            if i + 1 >= len(s):
                raise fail("Bad literal placement at end of string")
            out += s[i + 1].encode("utf-8", "surrogateescape")
            i += 2
        elif c == "|":
            hexmode = not hexmode
            i += 1
        elif hexmode:
            if c == " ":
                i += 1
                continue
            pair = s[i:i + 2]
            if len(pair) < 2 or not all(x in "0123456789abcdefABCDEF" for x in pair):
                raise fail(f"Invalid hex char '{c}'")
            out.append(int(pair, 16))
            i += 2
        else:
            out += c.encode("utf-8", "surrogateescape")
            i += 1
        if len(out) > STRING_MAX:
            raise fail("STRING too long \"" + s + "\"")
    if hexmode:
        raise fail("Invalid hex block")
    return bytes(out).decode("latin-1")


def _string_finalize(opts: Opts, ctx: Ctx) -> Opts:
    if "--string" in opts and "--hex-string" in opts:
        raise fail("Can't specify multiple strings")
    if "--string" not in opts and "--hex-string" not in opts:
        raise fail("STRING match: You must specify `--string' or `--hex-string'")
    _require(opts, "--algo", msg="STRING match: You must specify `--algo'")
    frm = int(opts["--from"].value) if "--from" in opts else 0
    to = int(opts["--to"].value) if "--to" in opts else 65535
    if frm > to:  # xt_string checkentry
        raise fail("STRING match: --from must not be greater than --to")
    pat = opts.get("--string") or opts["--hex-string"]
    if not pat.value:
        raise fail("STRING match: the pattern must not be empty")
    out = {"--string": Option("--string", pat.value, pat.negated),
           "--algo": opts["--algo"], "--from": Option("--from", frm),
           "--to": Option("--to", to)}
    if "--icase" in opts:
        out["--icase"] = opts["--icase"]
    return out


def _string_algo(args: tuple[str, ...], ctx: Ctx) -> str:
    # The kernel's textsearch algorithms built here (another name fails in checkentry; fsm
    # is not built in Debian's kernels).
    if args[0] not in ("bm", "kmp"):
        raise fail(f"STRING match: unknown --algo `{args[0]}' (bm or kmp)")
    return args[0]


def _string_save(opts: Opts, ctx: Ctx) -> str:
    o = opts["--string"]
    pat = str(o.value).encode("latin-1")
    if any(not 0x20 <= c < 0x7F for c in pat) or pat.endswith(b"\\"):
        text = f"--hex-string \"|{pat.hex()}|\""
    else:
        esc = "".join("\\" + chr(c) if c in b"\"\\" else chr(c) for c in pat)
        text = f"--string \"{esc}\""
    out = [f"{_neg(o)}{text}", f"--algo {opts['--algo'].value}"]
    if opts["--from"].value:
        out.append(f"--from {opts['--from'].value}")
    if opts["--to"].value != 65535:
        out.append(f"--to {opts['--to'].value}")
    if "--icase" in opts:
        out.append("--icase")
    return " ".join(out)


STRING = Extension(
    "string", "match",
    {"--string": OptDef(_string_text, True), "--hex-string": OptDef(_hex_string, True),
     "--algo": OptDef(_string_algo), "--from": OptDef(_uint(65535, "offset")),
     "--to": OptDef(_uint(65535, "offset")), "--icase": OptDef(None)},
    _string_save, _string_finalize,
)

U32_MAXSIZE = 10  # XT_U32_MAXSIZE: at most 10 tests, location numbers and value ranges
_U32_OPS = (("&&", None), ("&", "&"), ("<<", "<<"), (">>", ">>"), ("@", "@"))


def _u32(args: tuple[str, ...], ctx: Ctx) -> tuple[tuple[tuple[tuple[str, int], ...],
                                                         tuple[tuple[int, int], ...]], ...]:
    """`LOCATION=VALUES[&&...]`: LOCATION is numbers joined by & << >> @, VALUES ranges."""
    s = "".join(args[0].split())
    pos = 0

    def number() -> int:
        nonlocal pos
        m = re.match(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*", s[pos:])
        if m is None:
            raise fail(f"u32: at char {pos + 1}: expected number")
        pos += m.end()
        t = m.group(0)
        n = int(t, 16 if t[:2].lower() == "0x" else 8 if t.startswith("0") else 10)
        if n > U32:
            raise fail(f"u32: at char {pos}: number out of range")
        return n

    tests = []
    while True:
        loc = [("", number())]
        while pos < len(s) and s[pos] != "=":
            for tok, op in _U32_OPS[1:]:
                if s.startswith(tok, pos):
                    pos += len(tok)
                    assert op is not None
                    loc.append((op, number()))
                    break
            else:
                raise fail(f"u32: at char {pos + 1}: unexpected character")
            if len(loc) > U32_MAXSIZE:
                raise fail(f"u32: at char {pos}: too many operators")
        if pos >= len(s):
            raise fail(f"u32: at char {pos + 1}: missing \"=\"")
        pos += 1
        values = []
        while True:
            lo = number()
            hi = lo
            if s.startswith(":", pos):
                pos += 1
                hi = number()
            values.append((lo, hi))
            if len(values) > U32_MAXSIZE:
                raise fail(f"u32: at char {pos}: too many ranges")
            if not s.startswith(",", pos):
                break
            pos += 1
        tests.append((tuple(loc), tuple(values)))
        if len(tests) > U32_MAXSIZE:
            raise fail(f"u32: at char {pos}: too many \"&&\"s")
        if pos >= len(s):
            return tuple(tests)
        if not s.startswith("&&", pos):
            raise fail(f"u32: at char {pos + 1}: expected \"&&\" or end of string")
        pos += 2


def _u32_save(opts: Opts, ctx: Ctx) -> str:
    o = opts["--u32"]
    tests = []
    for loc, values in o.value:
        text = "".join(f"{op}0x{n:x}" for op, n in loc) + "="
        text += ",".join(f"0x{lo:x}" if lo == hi else f"0x{lo:x}:0x{hi:x}" for lo, hi in values)
        tests.append(text)
    return f"{_neg(o)}--u32 \"{'&&'.join(tests)}\""


U32_M = Extension("u32", "match", {"--u32": OptDef(_u32, True)}, _u32_save,
                  _need("--u32", "u32"))


# ---- devgroup, realm, connbytes, nfacct -----------------------------------------------------

# Names from iproute2's /etc/iproute2/group and rt_realms as Debian ships them.
DEVGROUP_NAMES = {"default": 0}
REALM_NAMES = {"cosmos": 0}


def _id_mask(names: Mapping[str, int], what: str) -> Parser:
    def p(s: str, ctx: Ctx) -> tuple[int, int]:
        v, slash, m = s.partition("/")
        if v in names and not slash:
            return names[v], U32
        try:
            return parse_uint(v, U32, what), parse_uint(m, U32, what) if slash else U32
        except ValueError_:
            raise fail(f"{what} `{s}' not found (names other than "
                       f"{', '.join(names)} are not resolved)") from None
    return _one(p)


def _id_mask_text(value: tuple[int, int], names: Mapping[str, int]) -> str:
    v, m = value
    if m != U32:
        return f"0x{v:x}/0x{m:x}"
    for name, n in names.items():
        if n == v:
            return name
    return f"0x{v:x}"


def _devgroup_finalize(opts: Opts, ctx: Ctx) -> Opts:
    if not opts:
        raise fail("devgroup match: You must specify either '--src-group' or '--dst-group'")
    return opts  # the hooks each option allows are checked at commit (ir/checks.py)


def _devgroup_save(opts: Opts, ctx: Ctx) -> str:
    out = []
    for name in ("--src-group", "--dst-group"):
        o = opts.get(name)
        if o is not None:
            out.append(f"{_neg(o)}{name} {_id_mask_text(o.value, DEVGROUP_NAMES)}")
    return " ".join(out)


DEVGROUP = Extension(
    "devgroup", "match",
    {"--src-group": OptDef(_id_mask(DEVGROUP_NAMES, "device group"), True),
     "--dst-group": OptDef(_id_mask(DEVGROUP_NAMES, "device group"), True)},
    _devgroup_save, _devgroup_finalize,
)

REALM = Extension(
    "realm", "match", {"--realm": OptDef(_id_mask(REALM_NAMES, "realm"), True)},
    lambda o, c: f"{_neg(o['--realm'])}--realm {_id_mask_text(o['--realm'].value, REALM_NAMES)}",
    _need("--realm", "realm"), families=frozenset({4}),
)

_CONNBYTES_DIRS = ("original", "reply", "both")
_CONNBYTES_MODES = ("packets", "bytes", "avgpkt")


def _connbytes(args: tuple[str, ...], ctx: Ctx) -> tuple[int, int]:
    a, colon, b = args[0].partition(":")
    lo = parse_uint(a, U64) if a else 0
    hi = (parse_uint(b, U64) if b else U64) if colon else U64
    if hi < lo:
        raise fail(f"{lo} should be less than {hi}")
    return lo, hi


def _choice(values: tuple[str, ...], what: str) -> Parser:
    def p(s: str, ctx: Ctx) -> str:
        if s not in values:
            raise fail(f"Unknown --{what} `{s}'")
        return s
    return _one(p)


def _connbytes_finalize(opts: Opts, ctx: Ctx) -> Opts:
    for n in ("--connbytes", "--connbytes-dir", "--connbytes-mode"):
        _require(opts, n, msg=f"connbytes: option \"{n}\" must be specified")
    o = opts["--connbytes"]
    lo, hi = o.value
    # libxt_connbytes stores an inverted range swapped (from > to), and prints it so.
    opts["--connbytes"] = Option("--connbytes", (hi, lo) if o.negated else (lo, hi))
    return opts


def _connbytes_save(opts: Opts, ctx: Ctx) -> str:
    lo, hi = opts["--connbytes"].value
    neg = ""
    if lo > hi:
        neg, lo, hi = "! ", hi, lo
    text = f"{neg}--connbytes {lo}" + (f":{hi}" if hi and hi < U64 else "")
    return (f"{text} --connbytes-mode {opts['--connbytes-mode'].value} "
            f"--connbytes-dir {opts['--connbytes-dir'].value}")


CONNBYTES = Extension(
    "connbytes", "match",
    {"--connbytes": OptDef(_connbytes, True),
     "--connbytes-dir": OptDef(_choice(_CONNBYTES_DIRS, "connbytes-dir")),
     "--connbytes-mode": OptDef(_choice(_CONNBYTES_MODES, "connbytes-mode"))},
    _connbytes_save, _connbytes_finalize,
)


def _nfacct_name(args: tuple[str, ...], ctx: Ctx) -> str:
    if not args[0] or len(args[0]) > 31:  # NFACCT_NAME_MAX
        raise fail(f"nfacct: bad name `{args[0]}' (1 to 31 characters)")
    return args[0]


NFACCT = Extension("nfacct", "match", {"--nfacct-name": OptDef(_nfacct_name)},
                   lambda o, c: f"--nfacct-name {o['--nfacct-name'].value}",
                   _need("--nfacct-name", "nfacct"))


# ---- physdev, policy ---------------------------------------------------------------------------

def _physdev_if(args: tuple[str, ...], ctx: Ctx) -> str:
    if len(args[0]) > 15:
        raise fail(f"interface name `{args[0]}' must be shorter than IFNAMSIZ (16)")
    return args[0]


def _physdev_finalize(opts: Opts, ctx: Ctx) -> Opts:
    if not opts:
        raise fail("PHYSDEV: no physdev option specified")
    return opts  # --physdev-out at OUTPUT is refused at commit (ir/checks.py)


_PHYSDEV_ORDER = ("--physdev-is-in", "--physdev-in", "--physdev-is-out", "--physdev-out",
                  "--physdev-is-bridged")


def _physdev_save(opts: Opts, ctx: Ctx) -> str:
    out = []
    for name in _PHYSDEV_ORDER:
        o = opts.get(name)
        if o is not None:
            out.append(f"{_neg(o)}{name}" + (f" {o.value}" if o.value is not True else ""))
    return " ".join(out)


PHYSDEV = Extension(
    "physdev", "match",
    {"--physdev-in": OptDef(_physdev_if, True), "--physdev-out": OptDef(_physdev_if, True),
     **{n: OptDef(None, True) for n in ("--physdev-is-in", "--physdev-is-out",
                                        "--physdev-is-bridged")}},
    _physdev_save, _physdev_finalize,
)

POLICY_MAX_ELEM = 4  # XT_POLICY_MAX_ELEM
_POLICY_PROTOS = {50: "esp", 51: "ah", 108: "ipcomp"}
_POLICY_ELEM = ("--reqid", "--spi", "--proto", "--mode", "--tunnel-dst", "--tunnel-src")


def _policy_choice(values: tuple[str, ...], what: str) -> Parser:
    def p(s: str, ctx: Ctx) -> str:
        if s not in values:
            raise fail(f"policy match: invalid {what} \"{s}\"")
        return s
    return _one(p)


def _policy_proto(args: tuple[str, ...], ctx: Ctx) -> int:
    try:
        n = parse_proto(args[0])
    except ValueError_:
        n = -1
    if n not in _POLICY_PROTOS:
        raise fail("policy match: protocol must be ah/esp/ipcomp")
    return n


def _policy_addr(args: tuple[str, ...], ctx: Ctx) -> Prefix:
    # The address is kept as written (the kernel masks when it compares).
    p = parse_prefix(args[0], ctx.bits)
    return Prefix(parse_address(args[0].partition("/")[0], ctx.bits), p.mask, p.bits)


def _policy_finalize(opts: Opts, ctx: Ctx) -> Opts:
    """Split the options into elements at each --next (`OPT#N` keys are repetitions)."""
    head: Opts = {}
    elems: list[Opts] = [{}]
    for o in opts.values():
        if o.name == "--next":
            if "--strict" not in head:
                raise fail("policy match: --next needs --strict")
            elems.append({})
        elif o.name in _POLICY_ELEM:
            if o.name in elems[-1]:
                raise fail(f"policy match: double {o.name} option")
            elems[-1][o.name] = o
        else:
            if o.name in head:
                raise fail(f"policy: option \"{o.name}\" can only be used once.")
            head[o.name] = o
    if "--dir" not in head:
        raise fail("policy match: neither --dir in nor --dir out specified")
    # The hooks each --dir allows are checked at commit (ir/checks.py).
    pol = head["--pol"].value if "--pol" in head else "ipsec"
    if pol == "none":
        if "--strict" in head:
            raise fail("policy match: policy none but --strict given")
        if len(elems) > 1 or elems[0]:
            raise fail("policy match: policy none but policy given")
        elems = []
    if len(elems) > POLICY_MAX_ELEM:
        raise fail("policy match: too many policy elements")
    for i, e in enumerate(elems):
        if "--strict" in head and not e:
            raise fail(f"policy match: empty policy element {i}. --strict is in effect, but "
                       "at least one of reqid, spi, tunnel-src, tunnel-dst, proto or mode is "
                       "required.")
        mode = e.get("--mode")
        tunnel = mode is not None and (mode.value == "tunnel") != mode.negated
        if ("--tunnel-src" in e or "--tunnel-dst" in e) and not tunnel:
            raise fail("policy match: --tunnel-src/--tunnel-dst is only valid in tunnel mode")
    return {"--dir": head["--dir"], "--pol": Option("--pol", pol),
            **({"--strict": head["--strict"]} if "--strict" in head else {}),
            # The elements in order, each a tuple of its options, kept under the option
            # that separates them.
            "--next": Option("--next", tuple(tuple(e.values()) for e in elems))}


def _policy_addr_text(p: Prefix) -> str:
    # xtables' mask printing: nothing for a host mask or a non-contiguous one.
    n = p.length
    addr = format_address(p.addr, p.bits)
    return addr if n is None or n == p.bits else f"{addr}/{n}"


def _policy_save(opts: Opts, ctx: Ctx) -> str:
    out = [f"--dir {opts['--dir'].value} --pol {opts['--pol'].value}"]
    if "--strict" in opts:
        out.append("--strict")
    elems = opts["--next"].value
    for i, elem in enumerate(elems):
        e = {o.name: o for o in elem}
        for name in _POLICY_ELEM:
            o = e.get(name)
            if o is None:
                continue
            v = o.value
            text = (f"0x{v:x}" if name == "--spi" else _POLICY_PROTOS[v] if name == "--proto"
                    else _policy_addr_text(v) if isinstance(v, Prefix) else str(v))
            out.append(f"{_neg(o)}{name} {text}")
        if i + 1 < len(elems):
            out.append("--next")
    return " ".join(out)


POLICY = Extension(
    "policy", "match",
    {"--dir": OptDef(_policy_choice(("in", "out"), "direction")),
     "--pol": OptDef(_policy_choice(("none", "ipsec"), "policy")),
     "--strict": OptDef(None), "--next": OptDef(None),
     "--reqid": OptDef(_uint(U32, "reqid"), True), "--spi": OptDef(_uint(U32, "spi"), True),
     "--proto": OptDef(_policy_proto, True),
     "--mode": OptDef(_policy_choice(("tunnel", "transport"), "mode"), True),
     "--tunnel-src": OptDef(_policy_addr, True), "--tunnel-dst": OptDef(_policy_addr, True)},
    _policy_save, _policy_finalize,
    repeatable=frozenset({"--next", *_POLICY_ELEM}),
)


# ---- socket, cgroup, connlabel, osf ----------------------------------------------------------

_SOCKET_FLAGS = ("--transparent", "--nowildcard", "--restore-skmark")
SOCKET = Extension("socket", "match", {n: OptDef(None) for n in _SOCKET_FLAGS},
                   lambda o, c: " ".join(n for n in _SOCKET_FLAGS if n in o))


def _cgroup_path(args: tuple[str, ...], ctx: Ctx) -> str:
    if len(args[0]) >= 4096:  # XT_CGROUP_PATH_MAX
        raise fail("cgroup: path too long")
    return args[0]


def _cgroup_finalize(opts: Opts, ctx: Ctx) -> Opts:
    if "--path" in opts and "--cgroup" in opts:
        raise fail("cgroup: option \"--path\" cannot be used together with \"--cgroup\"")
    _require(opts, "--path", "--cgroup", msg="cgroup: one of --path or --cgroup is required")
    return opts


def _cgroup_save(opts: Opts, ctx: Ctx) -> str:
    o = opts.get("--path")
    if o is not None:
        return f"{_neg(o)}--path {save_string(str(o.value))}"
    o = opts["--cgroup"]
    return f"{_neg(o)}--cgroup {o.value}"


CGROUP = Extension(
    "cgroup", "match",
    {"--path": OptDef(_cgroup_path, True), "--cgroup": OptDef(_uint(U32, "classid"), True)},
    _cgroup_save, _cgroup_finalize,
)

CONNLABEL_MAXBIT = 127  # XT_CONNLABEL_MAXBIT


def _connlabel(args: tuple[str, ...], ctx: Ctx) -> int:
    try:
        n = parse_uint(args[0], U32, "label")
    except ValueError_:
        raise fail(f"label '{args[0]}' not found (names from /etc/xtables/connlabel.conf "
                   "are not resolved; use the bit number)") from None
    if n > CONNLABEL_MAXBIT:
        raise fail(f"connlabel: label {n} is out of range (0-{CONNLABEL_MAXBIT})")
    return n


def _connlabel_save(opts: Opts, ctx: Ctx) -> str:
    o = opts["--label"]
    return f"{_neg(o)}--label \"{o.value}\"" + (" --set" if "--set" in opts else "")


CONNLABEL = Extension(
    "connlabel", "match", {"--label": OptDef(_connlabel, True), "--set": OptDef(None)},
    _connlabel_save, _need("--label", "connlabel"),
)


def _osf_save(opts: Opts, ctx: Ctx) -> str:
    o = opts["--genre"]
    out = [f"{_neg(o)}--genre {o.value}"]
    out += [f"{n} {opts[n].value}" for n in ("--ttl", "--log") if n in opts]
    return " ".join(out)


OSF = Extension(
    "osf", "match",
    {"--genre": OptDef(_one(lambda s, c: s[:31]), True), "--ttl": OptDef(_uint(2, "ttl")),
     "--log": OptDef(_uint(2, "log level"))},
    _osf_save, _need("--genre", "osf"), families=frozenset({4}),
)


# ---- ipcomp -------------------------------------------------------------------------------------

def _u32_range_kept(args: tuple[str, ...], ctx: Ctx) -> PortRange:
    # XTTYPE_UINT32RC as libxt_ipcomp keeps it: open ends 0 and 2^32-1, a reversed range
    # as written (it matches nothing).
    a, colon, b = args[0].partition(":")
    lo = parse_uint(a, U32) if a else 0
    if not colon:
        return PortRange(lo, lo)
    return PortRange(lo, parse_uint(b, U32) if b else U32)


def _ipcomp_save(opts: Opts, ctx: Ctx) -> str:
    out = []
    o = opts.get("--ipcompspi")
    # The whole range is left out even when negated (comp_save).
    if o is not None and (o.value.lo, o.value.hi) != (0, U32):
        r = o.value
        out.append(f"{_neg(o)}--ipcompspi " + (f"{r.lo}" if r.lo == r.hi else f"{r.lo}:{r.hi}"))
    if "--compres" in opts:
        out.append("--compres")
    return " ".join(out)


def _ipcomp_finalize(opts: Opts, ctx: Ctx) -> Opts:
    # Without --ipcompspi the SPI range stays 0:0 (only SPI 0), and iptables-save says so.
    opts.setdefault("--ipcompspi", Option("--ipcompspi", PortRange(0, 0)))
    return opts


IPCOMP = Extension("ipcomp", "match", {"--ipcompspi": OptDef(_u32_range_kept, True),
                                       "--compres": OptDef(None)}, _ipcomp_save,
                   _ipcomp_finalize)


# ---- cluster -----------------------------------------------------------------------------------

CLUSTER_NODES_MAX = 32  # XT_CLUSTER_NODES_MAX


def _cluster_finalize(opts: Opts, ctx: Ctx) -> Opts:
    node, mask = opts.get("--cluster-local-node"), opts.get("--cluster-local-nodemask")
    if node is not None and mask is not None:
        raise fail("cluster: option \"--cluster-local-node\" cannot be used together with "
                   "\"--cluster-local-nodemask\".")
    if node is None and mask is None:
        raise fail("cluster match: `--cluster-local-node' or`--cluster-local-nodemask' is "
                   "missing")
    for name in ("--cluster-hash-seed", "--cluster-total-nodes"):
        _require(opts, name, msg=f"cluster: option \"{name}\" must be specified")
    total = int(opts["--cluster-total-nodes"].value)
    if node is not None:
        if int(node.value) > total:
            raise fail("cluster match: `--cluster-local-node' must be <= "
                       "`--cluster-total-nodes'")
        mask = Option("--cluster-local-nodemask", 1 << (int(node.value) - 1), node.negated)
    assert mask is not None
    if int(mask.value) >= 1 << total:
        raise fail("cluster match: `--cluster-local-nodemask' too big for "
                   "`--cluster-total-nodes'")
    return {"--cluster-local-nodemask": mask,
            "--cluster-total-nodes": opts["--cluster-total-nodes"],
            "--cluster-hash-seed": opts["--cluster-hash-seed"]}


def _cluster_save(opts: Opts, ctx: Ctx) -> str:
    o = opts["--cluster-local-nodemask"]
    return (f"{_neg(o)}--cluster-local-nodemask 0x{o.value:08x} --cluster-total-nodes "
            f"{opts['--cluster-total-nodes'].value} --cluster-hash-seed "
            f"0x{opts['--cluster-hash-seed'].value:08x}")


def _range_min1(maximum: int, name: str) -> Parser:
    def p(s: str, ctx: Ctx) -> int:
        try:
            n = parse_uint(s, maximum)
        except ValueError_:
            n = 0
        if n == 0:
            raise fail(f"cluster: bad value for option \"{name}\", or out of range "
                       f"(1-{CLUSTER_NODES_MAX}).")
        return n
    return _one(p)


CLUSTER = Extension(
    "cluster", "match",
    {"--cluster-total-nodes": OptDef(_range_min1(CLUSTER_NODES_MAX, "--cluster-total-nodes")),
     "--cluster-local-node": OptDef(_range_min1(CLUSTER_NODES_MAX, "--cluster-local-node"),
                                    True),
     # libxt_cluster takes a mask from 1 to 32 only (its range check reuses the node limit).
     "--cluster-local-nodemask": OptDef(_range_min1(CLUSTER_NODES_MAX,
                                                    "--cluster-local-nodemask"), True),
     "--cluster-hash-seed": OptDef(_uint(U32, "hash seed"))},
    _cluster_save, _cluster_finalize,
)


# ---- bpf (classic BPF program) ---------------------------------------------------------------

BPF_MAX_INSTR = 64  # XT_BPF_MAX_NUM_INSTR
BPF_MEMWORDS = 16
# Classic BPF opcodes the kernel accepts (chk_code_allowed) and the groups checked below.
_CBPF_ALU_K = {0x04, 0x14, 0x24, 0x34, 0x94, 0x54, 0x44, 0xA4, 0x64, 0x74}
_CBPF_ALLOWED = (_CBPF_ALU_K | {c + 8 for c in _CBPF_ALU_K} | {0x84}
                 | {0x20, 0x28, 0x30, 0x40, 0x48, 0x50, 0x80, 0x60, 0x00}  # ld
                 | {0x81, 0xB1, 0x01, 0x61}  # ldx len, msh, imm, mem
                 | {0x02, 0x03, 0x07, 0x87, 0x06, 0x16}  # st, stx, tax, txa, ret k/a
                 | {0x05, 0x15, 0x1D, 0x35, 0x3D, 0x25, 0x2D, 0x45, 0x4D})  # jumps
_CBPF_COND = {0x15, 0x1D, 0x35, 0x3D, 0x25, 0x2D, 0x45, 0x4D}
_SKF_AD_OFF = 0xFFFFF000  # -0x1000: ancillary loads, known ones below SKF_AD_MAX
_SKF_AD_MAX = 64


def _cbpf_check(prog: list[tuple[int, int, int, int]]) -> bool:
    """The kernel's bpf_check_classic and check_load_and_stores."""
    n = len(prog)
    for pc, (code, jt, jf, k) in enumerate(prog):
        if code not in _CBPF_ALLOWED:
            return False
        if code in (0x34, 0x94) and k == 0:  # div/mod by a zero constant
            return False
        if code in (0x64, 0x74) and k >= 32:  # shift by 32 or more
            return False
        if code in (0x60, 0x61, 0x02, 0x03) and k >= BPF_MEMWORDS:
            return False
        if code == 0x05 and k >= n - pc - 1:
            return False
        if code in _CBPF_COND and (pc + jt + 1 >= n or pc + jf + 1 >= n):
            return False
        if code in (0x20, 0x28, 0x30) and k >= _SKF_AD_OFF and (
                (k - _SKF_AD_OFF) % 4 or k - _SKF_AD_OFF >= _SKF_AD_MAX):
            return False
    if prog[-1][0] not in (0x06, 0x16):
        return False
    masks = [0xFFFF] * n
    valid = 0
    for pc, (code, jt, jf, k) in enumerate(prog):
        valid &= masks[pc]
        if code in (0x02, 0x03):
            valid |= 1 << k
        elif code in (0x60, 0x61):
            if not valid >> k & 1:
                return False  # a scratch cell read before any store
        elif code == 0x05:
            masks[pc + 1 + k] &= valid
            valid = 0xFFFF
        elif code in _CBPF_COND:
            masks[pc + 1 + jt] &= valid
            masks[pc + 1 + jf] &= valid
            valid = 0xFFFF
    return True


def _bytecode(args: tuple[str, ...], ctx: Ctx) -> tuple[tuple[int, int, int, int], ...]:
    """libxt_bpf's `N,code jt jf k,...` (decimal, as sscanf %hu %hhu %hhu %u reads it)."""
    s = args[0]
    m = re.match(r"\s*\+?(\d+),", s)
    if m is None:
        raise fail("bpf: error parsing program length")
    count = int(m.group(1)) & 0xFFFF
    if count == 0:
        raise fail("bpf: illegal zero length program")
    if count > BPF_MAX_INSTR:
        raise fail("bpf: number of instructions exceeds maximum")
    prog: list[tuple[int, int, int, int]] = []
    parts = s[m.end():].split(",")
    for i, part in enumerate(parts):
        if not part and i == len(parts) - 1:
            break  # a trailing comma ends the program
        if len(prog) >= count:
            raise fail("bpf: real program length exceeds encoded length parameter")
        f = re.match(r"\s*\+?(\d+)\s+\+?(\d+)\s+\+?(\d+)\s+\+?(\d+)", part)
        if f is None:
            raise fail(f"bpf: error at instr {len(prog)}")
        code, jt, jf, k = (int(x) for x in f.groups())
        prog.append((code & 0xFFFF, jt & 0xFF, jf & 0xFF, k & U32))
    if len(prog) != count:
        raise fail("bpf: parsed program length is less than the encoded length parameter")
    if not _cbpf_check(prog):  # xt_bpf checkentry (bpf_prog_create)
        raise fail("bpf: the kernel refuses this classic BPF program")
    return tuple(prog)


def _bpf_finalize(opts: Opts, ctx: Ctx) -> Opts:
    if ("--bytecode" in opts) == ("--object-pinned" in opts):
        raise fail("bpf: one of --bytecode or --pinned is required")
    return opts


def _bpf_save(opts: Opts, ctx: Ctx) -> str:
    if "--object-pinned" in opts:
        return f"--object-pinned {opts['--object-pinned'].value}"
    prog = opts["--bytecode"].value
    body = "".join(f",{c} {t} {f} {k}" for c, t, f, k in prog)
    return f"--bytecode \"{len(prog)}{body}\""


BPF_M = Extension("bpf", "match",
                  {"--bytecode": OptDef(_bytecode),
                   "--object-pinned": OptDef(_str_max(511, "path"))},
                  _bpf_save, _bpf_finalize)


# ---- rateest ----------------------------------------------------------------------------------

# libxt_rateest's rate suffixes (compared without regard to case) and their scale in bit/s.
_RATE_SUFFIXES = (("bit", 1.0), ("kibit", 1024.0), ("kbit", 1e3), ("mibit", 1024.0 ** 2),
                  ("mbit", 1e6), ("gibit", 1024.0 ** 3), ("gbit", 1e9),
                  ("tibit", 1024.0 ** 4), ("tbit", 1e12), ("bps", 8.0),
                  ("kibps", 8.0 * 1024), ("kbps", 8e3), ("mibps", 8.0 * 1024 ** 2),
                  ("mbps", 8e6), ("gibps", 8.0 * 1024 ** 3), ("gbps", 8e9),
                  ("tibps", 8.0 * 1024 ** 4), ("tbps", 8e12))
_RATEEST_MODES = ("--rateest-lt", "--rateest-gt", "--rateest-eq")
# (flag, first value, second value): --rateest-bps is --rateest-bps2 under another name.
_RATEEST_KINDS = (("bps", "--rateest-bps1", "--rateest-bps2"),
                  ("pps", "--rateest-pps1", "--rateest-pps2"))


def _rate(args: tuple[str, ...], ctx: Ctx) -> int:
    """An optional rate (none: 0): a strtod number and a suffix, bit/s without one; kept in
    bytes/s as a u32 (a larger value wraps, as iptables' conversion does)."""
    if not args:
        return 0
    m = re.match(r"[+]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", args[0])
    suffix = args[0][m.end():].lower() if m else None
    scale = 1.0 if suffix == "" else dict(_RATE_SUFFIXES).get(suffix or "")
    if m is None or scale is None:
        raise fail(f"rateest: could not parse rate `{args[0]}'")
    value = float(m.group(0)) * scale / 8
    if value >= 2 ** 63:
        raise fail(f"rateest: could not parse rate `{args[0]}'")
    return int(value) & U32


def _pps(args: tuple[str, ...], ctx: Ctx) -> int:
    if not args:
        return 0
    try:
        return parse_uint(args[0], U32, "pps")
    except ValueError_:
        raise fail(f"rateest: could not parse pps `{args[0]}'") from None


def _rateest_finalize(opts: Opts, ctx: Ctx) -> Opts:
    """Options in command-line order; --rateest is --rateest1 and --rateest-bps/-pps are
    --rateest-bps2/-pps2 (each slot given once); the last of lt/gt/eq decides."""
    out: Opts = {}
    mode: Option | None = None
    for o in opts.values():
        name = {"--rateest": "--rateest1", "--rateest-bps": "--rateest-bps2",
                "--rateest-pps": "--rateest-pps2"}.get(o.name, o.name)
        if name in _RATEEST_MODES:
            mode = o
            continue
        if name in out:
            raise fail(f"rateest: can't specify {name} twice")
        out[name] = Option(name, o.value, o.negated)
    if not opts:
        raise fail("rateest match: you need to specify some flags")
    # xt_rateest checkentry: an estimator, bps and/or pps, and a comparison.
    if "--rateest1" not in out:
        raise fail("rateest: --rateest (or --rateest1) is required")
    kinds = [k for k, a, b in _RATEEST_KINDS if a in out or b in out]
    if not kinds:
        raise fail("rateest: one of --rateest-bps or --rateest-pps is required")
    if mode is None:
        raise fail("rateest: one of --rateest-lt, --rateest-gt or --rateest-eq is required")
    for k, a, b in _RATEEST_KINDS:
        if k in kinds:
            out.setdefault(a, Option(a, 0))
            out.setdefault(b, Option(b, 0))
    out[mode.name] = mode
    return out


def _rate_text(rate: int) -> str:
    bits = rate * 8.0
    if bits >= 1e9:
        return f"{bits / 1e6:.0f}Mbit"
    if bits >= 1e6:
        return f"{bits / 1e3:.0f}Kbit"
    return f"{bits:.0f}bit"


def _rateest_save(opts: Opts, ctx: Ctx) -> str:
    mode = next(o for o in opts.values() if o.name in _RATEEST_MODES)
    mode_text = f"{_neg(mode)}{mode.name}"
    rel = "--rateest2" in opts
    delta = "--rateest-delta" in opts
    out = ["--rateest-delta"] if delta else []
    out.append(f"{'--rateest1' if rel else '--rateest'} {opts['--rateest1'].value}")
    for kind, first, second in _RATEEST_KINDS:
        if first not in opts:
            continue

        def text(name: str, kind: str = kind) -> str:
            v = int(opts[name].value)
            return _rate_text(v) if kind == "bps" else str(v)

        if delta:
            out += [f"{first} {text(first)}", mode_text, f"{second} {text(second)}"]
        else:
            out += [mode_text, f"--rateest-{kind}" + ("" if rel else f" {text(second)}")]
    if rel:
        out.append(f"--rateest2 {opts['--rateest2'].value}")
    return " ".join(out)


def _estimator(args: tuple[str, ...], ctx: Ctx) -> str:
    return args[0][:15]  # strncpy into a 16-byte name


RATEEST_M = Extension(
    "rateest", "match",
    {**{n: OptDef(_estimator) for n in ("--rateest", "--rateest1", "--rateest2")},
     "--rateest-delta": OptDef(None), **{n: OptDef(None, True) for n in _RATEEST_MODES},
     **{n: OptDef(_rate) for n in ("--rateest-bps", "--rateest-bps1", "--rateest-bps2")},
     **{n: OptDef(_pps) for n in ("--rateest-pps", "--rateest-pps1", "--rateest-pps2")}},
    _rateest_save, _rateest_finalize,
)


# ---- srh, hbh, dst (IPv6 extension headers) -----------------------------------------------------

# Each comparison group shares one field of struct ip6t_srh: the last value given wins.
_SRH_GROUPS = {"hdr-len": ("--srh-hdr-len-eq", "--srh-hdr-len-gt", "--srh-hdr-len-lt"),
               "segs-left": ("--srh-segs-left-eq", "--srh-segs-left-gt", "--srh-segs-left-lt"),
               "last-entry": ("--srh-last-entry-eq", "--srh-last-entry-gt",
                              "--srh-last-entry-lt")}
_SRH_SIDS = ("--srh-psid", "--srh-nsid", "--srh-lsid")


def _srh_save(opts: Opts, ctx: Ctx) -> str:
    out = []
    o = opts.get("--srh-next-hdr")
    if o is not None:
        out.append(f"{_neg(o)}--srh-next-hdr {o.value}")
    for names in _SRH_GROUPS.values():
        given = [n for n in opts if n in names]
        for name in names:
            if name in opts:
                out.append(f"{_neg(opts[name])}{name} {opts[given[-1]].value}")
    o = opts.get("--srh-tag")
    if o is not None:
        out.append(f"{_neg(o)}--srh-tag {o.value}")
    for name in _SRH_SIDS:
        o = opts.get(name)
        if o is not None:
            out.append(f"{_neg(o)}{name} {_ntop6(o.value.addr)}/{o.value.length}")
    return " ".join(out)


def _sid(args: tuple[str, ...], ctx: Ctx) -> Prefix:
    p = parse_prefix(args[0], 128)
    if p.length is None:
        raise fail(f"srh: invalid mask in `{args[0]}'")
    return Prefix(parse_address(args[0].partition("/")[0], 128), p.mask, 128)


SRH = Extension(
    "srh", "match",
    {"--srh-next-hdr": OptDef(_uint(255), True),
     **{n: OptDef(_uint(255), True) for g in _SRH_GROUPS.values() for n in g},
     "--srh-tag": OptDef(_uint(65535), True), **{n: OptDef(_sid, True) for n in _SRH_SIDS}},
    _srh_save, families=frozenset({6}),
)

OPTS_MAX = 16  # IP6T_OPTS_OPTSNR


def _strtoul(s: str, what: str) -> int:
    """strtoul(s, &end, 0) that must consume everything and read at least one digit."""
    m = re.fullmatch(r"\s*\+?(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", s)
    if m is None:
        raise fail(f"no valid digits in {what} `{s}'" if not s else f"error parsing {what} `{s}'")
    t = m.group(1)
    return int(t, 16 if t[:2].lower() == "0x" else 8 if t.startswith("0") else 10)


def _ip6_opts(args: tuple[str, ...], ctx: Ctx) -> tuple[tuple[int, int | None], ...]:
    """libip6t_hbh/dst parse_options: `TYPE[:LEN],...`, each number truncated to a byte; a
    length of 255 is the same as none (print_options leaves it out)."""
    parts = args[0].split(",")
    out: list[tuple[int, int | None]] = []
    for i, part in enumerate(parts):
        if i == OPTS_MAX:
            raise fail("too many addresses specified")
        t, colon, length = part.partition(":")
        if colon and i == OPTS_MAX - 1:
            raise fail("too many ports specified")
        kind = _strtoul(t, "opt") & 0xFF
        if colon and kind == 0:
            raise fail("PAD0 has not got length")
        n = _strtoul(length, "length") & 0xFF if colon else 0xFF
        out.append((kind, None if n == 0xFF else n))
    return tuple(out)


def _opts_ext(name: str) -> Extension:
    length, options = f"--{name}-len", f"--{name}-opts"

    def save(opts: Opts, ctx: Ctx) -> str:
        out = []
        o = opts.get(length)
        if o is not None:
            out.append(f"{_neg(o)}{length} {o.value}")
        o = opts.get(options)
        if o is not None:
            out.append(f"{options} " + ",".join(f"{t}" + (f":{n}" if n is not None else "")
                                                for t, n in o.value))
        return " ".join(out)

    return Extension(name, "match", {length: OptDef(_uint(U32, "length"), True),
                                     options: OptDef(_ip6_opts)},
                     save, families=frozenset({6}))


HBH = _opts_ext("hbh")
DST = _opts_ext("dst")


MATCHES: dict[str, Extension] = {
    e.name: e for e in (TCP, UDP, SCTP, ICMP, ICMP6, CONNTRACK, STATE, MULTIPORT, COMMENT, LIMIT,
                        MARK_M, CONNMARK_M, ADDRTYPE, IPRANGE, LENGTH, PKTTYPE, MAC, TTL_M,
                        HL_M, TOS_M, DSCP_M, RECENT, STATISTIC, CONNLIMIT, OWNER, TCPMSS_M,
                        RPFILTER, SET, HASHLIMIT, RT, FRAG_M,
                        IPV6HEADER, ESP, AH, MH, QUOTA, CPU, HELPER, EUI64,
                        ECN, DCCP, TIME, STRING, U32_M, DEVGROUP, REALM, CONNBYTES, NFACCT,
                        PHYSDEV, POLICY, SOCKET, CGROUP, CONNLABEL, OSF, SRH, HBH, DST,
                        IPCOMP, CLUSTER, BPF_M, RATEEST_M)
}
# Proto names that load a match implicitly (`-p tcp --dport 22` loads `-m tcp`).
PROTO_MATCH = {6: "tcp", 17: "udp", 132: "sctp", 1: "icmp", 58: "icmp6", 33: "dccp"}
MATCH_ALIASES = {"icmpv6": "icmp6", "ipv6-icmp": "icmp6"}

# Real iptables extensions this project does not support: refused by name.
UNSUPPORTED_MATCHES = frozenset({
    "quota2", "ipvs", "geoip", "l2tp", "condition", "account",
    "addrtype6", "udplite", "statistic2", "set2", "ipp2p", "layer7", "tcpoptstrip",
})
