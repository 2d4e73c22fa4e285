"""The target half of the extension table: REJECT, LOG, NAT, MARK and friends."""

from __future__ import annotations

import math
import re

from bpfilter.ir.matches import (
    U32,
    Ctx,
    Extension,
    OptDef,
    Opts,
    _dscp,
    _dscp_class,
    _mark,
    _need,
    _ntop6,
    _one,
    _tos_value,
    _uint,
    fail,
    port16,
)
from bpfilter.ir.model import Option, Prefix
from bpfilter.ir.values import (
    ValueError_,
    format_address,
    parse_address,
    parse_port,
    parse_prefix,
    parse_uint,
    save_string,
)

# ---- REJECT --------------------------------------------------------------------------------

REJECT4 = {
    "icmp-net-unreachable": "icmp-net-unreachable", "net-unreach": "icmp-net-unreachable",
    "icmp-host-unreachable": "icmp-host-unreachable", "host-unreach": "icmp-host-unreachable",
    "icmp-proto-unreachable": "icmp-proto-unreachable",
    "proto-unreach": "icmp-proto-unreachable",
    "icmp-port-unreachable": "icmp-port-unreachable", "port-unreach": "icmp-port-unreachable",
    "icmp-net-prohibited": "icmp-net-prohibited", "net-prohib": "icmp-net-prohibited",
    "icmp-host-prohibited": "icmp-host-prohibited", "host-prohib": "icmp-host-prohibited",
    "icmp-admin-prohibited": "icmp-admin-prohibited", "admin-prohib": "icmp-admin-prohibited",
    "tcp-reset": "tcp-reset", "tcp-rst": "tcp-reset",
}
REJECT6 = {
    "icmp6-no-route": "icmp6-no-route", "no-route": "icmp6-no-route",
    "icmp6-adm-prohibited": "icmp6-adm-prohibited", "adm-prohibited": "icmp6-adm-prohibited",
    "icmp6-addr-unreachable": "icmp6-addr-unreachable", "addr-unreach": "icmp6-addr-unreachable",
    "icmp6-port-unreachable": "icmp6-port-unreachable", "port-unreach": "icmp6-port-unreachable",
    "icmp6-policy-fail": "icmp6-policy-fail", "policy-fail": "icmp6-policy-fail",
    "icmp6-reject-route": "icmp6-reject-route", "reject-route": "icmp6-reject-route",
    "tcp-reset": "tcp-reset", "tcp-rst": "tcp-reset",
}


def _reject_with(args: tuple[str, ...], ctx: Ctx) -> str:
    table = REJECT4 if ctx.bits == 32 else REJECT6
    if args[0] not in table:
        raise fail(f"unknown reject type \"{args[0]}\"")
    return table[args[0]]


def _reject_finalize(opts: Opts, ctx: Ctx) -> Opts:
    default = "icmp-port-unreachable" if ctx.bits == 32 else "icmp6-port-unreachable"
    opts.setdefault("--reject-with", Option("--reject-with", default))
    return opts


REJECT = Extension(
    "REJECT", "target", {"--reject-with": OptDef(_reject_with)},
    lambda o, c: f"--reject-with {o['--reject-with'].value}", _reject_finalize,
    tables=frozenset({"filter"}),
)

# ---- LOG, NFLOG ----------------------------------------------------------------------------

LOG_LEVELS = {"emerg": 0, "panic": 0, "alert": 1, "crit": 2, "error": 3, "warning": 4,
              "notice": 5, "info": 6, "debug": 7}
_LOG_FLAGS = ("--log-tcp-sequence", "--log-tcp-options", "--log-ip-options", "--log-uid",
              "--log-macdecode")


def _log_level(args: tuple[str, ...], ctx: Ctx) -> int:
    s = args[0]
    if s in LOG_LEVELS:
        return LOG_LEVELS[s]
    try:
        return parse_uint(s, 7)
    except ValueError_:
        raise fail(f"log-level `{s}' unknown") from None


def _log_prefix(args: tuple[str, ...], ctx: Ctx) -> str:
    s = args[0]
    if not s:
        raise fail("No prefix specified for --log-prefix")
    if "\n" in s:
        raise fail("Newlines not allowed in --log-prefix")
    return s[:29]  # truncated to the kernel's buffer, as xtables does


def _log_save(opts: Opts, ctx: Ctx) -> str:
    out = []
    if "--log-prefix" in opts:
        out.append(f"--log-prefix {save_string(str(opts['--log-prefix'].value))}")
    level = opts.get("--log-level")
    if level is not None and level.value != 4:
        out.append(f"--log-level {level.value}")
    out.extend(f for f in _LOG_FLAGS if f in opts)
    return " ".join(out)


LOG = Extension(
    "LOG", "target",
    {"--log-level": OptDef(_log_level), "--log-prefix": OptDef(_log_prefix),
     **{f: OptDef(None) for f in _LOG_FLAGS}},
    _log_save,
)


def _nflog_save(opts: Opts, ctx: Ctx) -> str:
    out = []
    if "--nflog-prefix" in opts:
        out.append(f"--nflog-prefix {save_string(str(opts['--nflog-prefix'].value))}")
    if "--nflog-group" in opts and opts["--nflog-group"].value != 0:
        out.append(f"--nflog-group {opts['--nflog-group'].value}")
    for name in ("--nflog-range", "--nflog-size"):
        if name in opts:
            out.append(f"{name} {opts[name].value}")
    if "--nflog-threshold" in opts and opts["--nflog-threshold"].value != 1:
        out.append(f"--nflog-threshold {opts['--nflog-threshold'].value}")
    return " ".join(out)


def _prefix64(args: tuple[str, ...], ctx: Ctx) -> str:
    return args[0][:63]  # truncated to the kernel's buffer, as xtables does


NFLOG = Extension(
    "NFLOG", "target",
    {"--nflog-group": OptDef(_uint(65535, "group")), "--nflog-prefix": OptDef(_prefix64),
     "--nflog-range": OptDef(_uint(U32)), "--nflog-size": OptDef(_uint(U32)),
     "--nflog-threshold": OptDef(_uint(65535))},
    _nflog_save,
)

# ---- MARK, CONNMARK ------------------------------------------------------------------------

_MARK_OPTS = ("--set-xmark", "--set-mark", "--and-mark", "--or-mark", "--xor-mark")


def _mark_finalize(opts: Opts, ctx: Ctx) -> Opts:
    given = [n for n in _MARK_OPTS if n in opts]
    if len(given) != 1:
        raise fail("MARK target: exactly one of --set-xmark, --set-mark, --and-mark, "
                   "--or-mark or --xor-mark is required")
    o = opts[given[0]]
    v, m = o.value
    if given[0] in ("--and-mark", "--or-mark", "--xor-mark") and m != U32:
        raise fail(f"MARK target: {given[0]} takes no mask")
    mark, mask = {"--set-xmark": (v, m), "--set-mark": (v, v | m), "--and-mark": (0, ~v & U32),
                  "--or-mark": (v, v), "--xor-mark": (v, 0)}[given[0]]
    return {"--set-xmark": Option("--set-xmark", (mark, mask))}


MARK_T = Extension(
    "MARK", "target", {n: OptDef(_one(_mark)) for n in _MARK_OPTS},
    lambda o, c: "--set-xmark 0x{:x}/0x{:x}".format(*o["--set-xmark"].value),
    _mark_finalize,
)

_CONNMARK_MODES = ("--set-xmark", "--set-mark", "--and-mark", "--or-mark", "--xor-mark",
                   "--save-mark", "--restore-mark")


def _connmark_finalize(opts: Opts, ctx: Ctx) -> Opts:
    given = [n for n in _CONNMARK_MODES if n in opts]
    if len(given) != 1:
        raise fail("CONNMARK target: exactly one mode option is required")
    mode = given[0]
    if mode in ("--save-mark", "--restore-mark"):
        both = opts.get("--mask")
        nf = opts.get("--nfmask")
        ct = opts.get("--ctmask")
        nfmask = nf.value if nf else (both.value if both else U32)
        ctmask = ct.value if ct else (both.value if both else U32)
        return {mode: Option(mode, (nfmask, ctmask))}
    if "--mask" in opts or "--nfmask" in opts or "--ctmask" in opts:
        raise fail("CONNMARK target: masks are only valid with --save-mark/--restore-mark")
    tmp = _mark_finalize({mode: opts[mode]}, ctx)
    return tmp


def _connmark_save(opts: Opts, ctx: Ctx) -> str:
    (mode, o), = opts.items()
    a, b = o.value
    if mode == "--set-xmark":
        return f"--set-xmark 0x{a:x}/0x{b:x}"
    return f"{mode} --nfmask 0x{a:x} --ctmask 0x{b:x}"


CONNMARK_T = Extension(
    "CONNMARK", "target",
    {**{n: OptDef(_one(_mark)) for n in _MARK_OPTS}, "--save-mark": OptDef(None),
     "--restore-mark": OptDef(None), "--mask": OptDef(_uint(U32, "mask")),
     "--nfmask": OptDef(_uint(U32, "mask")), "--ctmask": OptDef(_uint(U32, "mask"))},
    _connmark_save, _connmark_finalize,
)

# ---- CT, NOTRACK -----------------------------------------------------------------------------

_CT_EVENTS = ("new", "related", "destroy", "reply", "assured", "protoinfo", "helper", "mark",
              "natseqinfo", "secmark", "label")


def _events(args: tuple[str, ...], ctx: Ctx) -> str:
    for e in args[0].split(","):
        if e not in _CT_EVENTS and e != "new" and e != "expect":
            raise fail(f"Unknown event type \"{e}\"")
    return args[0]


def _ct_finalize(opts: Opts, ctx: Ctx) -> Opts:
    return opts


def _ct_save(opts: Opts, ctx: Ctx) -> str:
    out = []
    if "--notrack" in opts:
        out.append("--notrack")
    if "--helper" in opts:
        out.append(f"--helper {opts['--helper'].value}")
    if "--timeout" in opts:
        out.append(f"--timeout {opts['--timeout'].value}")
    if "--ctevents" in opts:
        out.append(f"--ctevents {opts['--ctevents'].value}")
    if "--expevents" in opts:
        out.append(f"--expevents {opts['--expevents'].value}")
    if "--zone" in opts and opts["--zone"].value != 0:
        out.append(f"--zone {opts['--zone'].value}")
    return " ".join(out)


def _name15(args: tuple[str, ...], ctx: Ctx) -> str:
    if len(args[0]) > 15:
        raise fail(f"name too long `{args[0]}'")
    return args[0]


CT = Extension(
    "CT", "target",
    {"--notrack": OptDef(None), "--helper": OptDef(_name15), "--zone": OptDef(_uint(65535)),
     "--ctevents": OptDef(_events), "--expevents": OptDef(_events),
     "--timeout": OptDef(_name15)},
    _ct_save, _ct_finalize, tables=frozenset({"raw"}),
)
NOTRACK = Extension("NOTRACK", "target", {}, lambda o, c: "", tables=frozenset({"raw"}))

# ---- NAT -----------------------------------------------------------------------------------

_PORT_PROTOS = {6, 17, 33, 132, 136}


def _port_or_range(text: str) -> tuple[int, int, bool]:
    """A service name or number, or a numeric `LO-HI` range (names only stand alone)."""
    try:
        p = parse_port(text)
        return p, p, False
    except ValueError_:
        a, dash, b = text.partition("-")
        if not (dash and a.isdigit() and b.isdigit()):
            raise
        return parse_port(a), parse_port(b), True


def _nat_range(text: str, ctx: Ctx) -> str:
    """Validate `ADDR[-ADDR][:PORT[-PORT][/BASE]]` and print it canonically."""
    bits = ctx.bits
    ports = ""
    if bits == 128 and text.startswith("["):
        addrs, close, rest = text[1:].partition("]")
        if not close:
            raise fail(f"Invalid address range `{text}'")
        if rest:
            if not rest.startswith(":"):
                raise fail(f"Invalid address range `{text}'")
            ports = rest[1:]
        has_ports = bool(rest)
    else:
        if bits == 32:
            addrs, colon, ports = text.partition(":")
            has_ports = bool(colon)
        else:
            addrs, has_ports = text, False
    out_addr = ""
    if addrs:
        a, dash, b = addrs.partition("-")
        lo = parse_address(a, bits)
        out_addr = format_address(lo, bits)
        if dash:
            hi = parse_address(b, bits)
            out_addr += "-" + format_address(hi, bits)
    out_ports = ""
    if has_ports:
        if ctx.proto not in _PORT_PROTOS:
            raise fail("Need TCP, UDP, SCTP or DCCP with port specification")
        rng, slash, base = ports.partition("/")
        lo_p, hi_p, is_range = _port_or_range(rng)
        if lo_p > hi_p:
            raise fail(f"Invalid port range `{ports}'")
        out_ports = str(lo_p) + (f"-{hi_p}" if is_range else "")
        if slash:
            bp = parse_port(base)
            if bp == 0:
                raise fail(f"Invalid port base `{base}'")
            out_ports += f"/{bp}"
    if bits == 128 and out_ports:
        return f"[{out_addr}]:{out_ports}"
    return out_addr + (f":{out_ports}" if out_ports else "")


def _nat_finalize(option: str) -> object:
    def f(opts: Opts, ctx: Ctx) -> Opts:
        if option not in opts:
            raise fail(f"You must specify {option}")
        return opts
    return f


def _nat_save(option: str, flags: tuple[str, ...]) -> object:
    def save(opts: Opts, ctx: Ctx) -> str:
        out = []
        if option in opts:
            out.append(f"{option} {opts[option].value}")
        out.extend(f for f in flags if f in opts)
        return " ".join(out)
    return save


DNAT = Extension(
    "DNAT", "target",
    {"--to-destination": OptDef(_one(_nat_range)), "--random": OptDef(None),
     "--persistent": OptDef(None)},
    _nat_save("--to-destination", ("--random", "--persistent")),
    _nat_finalize("--to-destination"), tables=frozenset({"nat"}),
)
SNAT = Extension(
    "SNAT", "target",
    {"--to-source": OptDef(_one(_nat_range)), "--random": OptDef(None),
     "--random-fully": OptDef(None), "--persistent": OptDef(None)},
    _nat_save("--to-source", ("--random", "--random-fully", "--persistent")),
    _nat_finalize("--to-source"), tables=frozenset({"nat"}),
)


def _to_ports(args: tuple[str, ...], ctx: Ctx) -> str:
    if ctx.proto not in _PORT_PROTOS:
        raise fail("Need TCP, UDP, SCTP or DCCP with port specification")
    lo, hi, dash = _port_or_range(args[0])
    if lo > hi:
        raise fail(f"Invalid port range `{args[0]}'")
    return str(lo) + (f"-{hi}" if dash else "")


MASQUERADE = Extension(
    "MASQUERADE", "target",
    {"--to-ports": OptDef(_to_ports), "--random": OptDef(None), "--random-fully": OptDef(None)},
    _nat_save("--to-ports", ("--random", "--random-fully")),
    tables=frozenset({"nat"}),
)
REDIRECT = Extension(
    "REDIRECT", "target", {"--to-ports": OptDef(_to_ports), "--random": OptDef(None)},
    _nat_save("--to-ports", ("--random",)), tables=frozenset({"nat"}),
)

# ---- DSCP, TOS, TTL, HL, TCPMSS, CHECKSUM ----------------------------------------------------


def _dscp_t_finalize(opts: Opts, ctx: Ctx) -> Opts:
    if len(opts) != 1:
        raise fail("DSCP target: exactly one of --set-dscp or --set-dscp-class is required")
    (o,) = opts.values()
    return {"--set-dscp": Option("--set-dscp", o.value)}


DSCP_T = Extension(
    "DSCP", "target",
    {"--set-dscp": OptDef(_one(_dscp)), "--set-dscp-class": OptDef(_one(_dscp_class))},
    lambda o, c: f"--set-dscp 0x{o['--set-dscp'].value:02x}", _dscp_t_finalize,
    tables=frozenset({"mangle"}),
)

_TOS_OPTS = ("--set-tos", "--and-tos", "--or-tos", "--xor-tos")


def _tos_t_finalize(opts: Opts, ctx: Ctx) -> Opts:
    given = [n for n in _TOS_OPTS if n in opts]
    if len(given) != 1:
        raise fail("TOS target: exactly one of --set-tos, --and-tos, --or-tos, --xor-tos")
    o = opts[given[0]]
    if given[0] == "--set-tos":
        return {"--set-tos": Option("--set-tos", o.value)}
    v = int(o.value)
    value, mask = {"--and-tos": (0, ~v & 0xFF), "--or-tos": (v, v), "--xor-tos": (v, 0)}[given[0]]
    return {"--set-tos": Option("--set-tos", (value, mask))}


TOS_T = Extension(
    "TOS", "target",
    {"--set-tos": OptDef(_one(lambda s, c: _tos_value(s))),
     **{n: OptDef(_uint(255, "TOS")) for n in _TOS_OPTS[1:]}},
    lambda o, c: "--set-tos 0x{:02x}/0x{:02x}".format(*o["--set-tos"].value),
    _tos_t_finalize, tables=frozenset({"mangle"}),
)


def _xx_t(name: str, prefix: str, family: int) -> Extension:
    names = (f"--{prefix}-set", f"--{prefix}-dec", f"--{prefix}-inc")

    def finalize(opts: Opts, ctx: Ctx) -> Opts:
        if len(opts) != 1:
            raise fail(f"{name} target: exactly one of {', '.join(names)} is required")
        (n, o), = opts.items()
        if n != names[0] and o.value == 0:
            raise fail(f"{name}: increasing/decreasing by 0?")
        return opts

    def save(opts: Opts, ctx: Ctx) -> str:
        (n, o), = opts.items()
        return f"{n} {o.value}"

    return Extension(name, "target", {n: OptDef(_uint(255)) for n in names}, save, finalize,
                     families=frozenset({family}), tables=frozenset({"mangle"}))


TTL_T = _xx_t("TTL", "ttl", 4)
HL_T = _xx_t("HL", "hl", 6)


def _tcpmss_finalize(opts: Opts, ctx: Ctx) -> Opts:
    if len(opts) != 1:
        raise fail("TCPMSS target: exactly one of --set-mss or --clamp-mss-to-pmtu")
    return opts


TCPMSS_T = Extension(
    "TCPMSS", "target",
    {"--set-mss": OptDef(_uint(65535 - 40, "MSS")), "--clamp-mss-to-pmtu": OptDef(None)},
    lambda o, c: ("--clamp-mss-to-pmtu" if "--clamp-mss-to-pmtu" in o
                  else f"--set-mss {o['--set-mss'].value}"),
    _tcpmss_finalize,
)
CHECKSUM = Extension("CHECKSUM", "target", {"--checksum-fill": OptDef(None)},
                     lambda o, c: "--checksum-fill", _need("--checksum-fill", "CHECKSUM"),
                     tables=frozenset({"mangle"}))

# ---- NFQUEUE, QUEUE, TRACE ------------------------------------------------------------------

def _queue_balance(args: tuple[str, ...], ctx: Ctx) -> tuple[int, int]:
    # XTTYPE_UINT16RC: both ends may be left out (0 and 65535); a range needs a colon.
    s = args[0]
    a, colon, b = s.partition(":")
    if not colon:
        raise fail(f"Bad range \"{s}\"")
    lo = parse_uint(a, 65535, "queue") if a else 0
    hi = parse_uint(b, 65535, "queue") if b else 65535
    if lo >= hi:
        raise fail(f"{lo} should be less than {hi}")
    if hi - lo + 1 > 65535:  # queues_total is a u16: the kernel refuses a wrapped count
        raise fail(f"NFQUEUE: --queue-balance {lo}:{hi} spans too many queues")
    return lo, hi


def _nfqueue_finalize(opts: Opts, ctx: Ctx) -> Opts:
    if "--queue-num" in opts and "--queue-balance" in opts:
        raise fail("NFQUEUE: option \"--queue-num\" cannot be used together with "
                   "\"--queue-balance\".")
    if "--queue-cpu-fanout" in opts and "--queue-balance" not in opts:
        raise fail("NFQUEUE: option \"--queue-cpu-fanout\" also requires \"--queue-balance\".")
    if "--queue-balance" not in opts:
        opts.setdefault("--queue-num", Option("--queue-num", 0))
    return opts


def _nfqueue_save(opts: Opts, ctx: Ctx) -> str:
    if "--queue-balance" in opts:
        lo, hi = opts["--queue-balance"].value
        out = [f"--queue-balance {lo}:{hi}"]
    else:
        out = [f"--queue-num {opts['--queue-num'].value}"]
    out += [n for n in ("--queue-bypass", "--queue-cpu-fanout") if n in opts]
    return " ".join(out)


NFQUEUE = Extension(
    "NFQUEUE", "target",
    {"--queue-num": OptDef(_uint(65535, "queue")), "--queue-balance": OptDef(_queue_balance),
     "--queue-bypass": OptDef(None), "--queue-cpu-fanout": OptDef(None)},
    _nfqueue_save, _nfqueue_finalize,
)
# The standard verdict NF_QUEUE (queue 0); iptables-save prints it as a target name.
QUEUE = Extension("QUEUE", "target", {}, lambda o, c: "")
TRACE = Extension("TRACE", "target", {}, lambda o, c: "", tables=frozenset({"raw"}))

# ---- TEE, TPROXY, NETMAP, DNPT, SNPT -----------------------------------------------------------


def _host(args: tuple[str, ...], ctx: Ctx) -> int:
    # XTTYPE_HOST: one address (host names are not resolved here), no mask.
    try:
        return parse_address(args[0], ctx.bits)
    except ValueError_:
        raise fail(f"host/network `{args[0]}' not found (only numeric addresses are "
                   "accepted)") from None


def _ifname(args: tuple[str, ...], ctx: Ctx) -> str:
    return args[0][:15]  # XTTYPE_STRING into a 16-byte buffer: silently truncated


def _tee_save(opts: Opts, ctx: Ctx) -> str:
    out = f"--gateway {_ntop(int(opts['--gateway'].value), ctx.bits)}"
    if "--oif" in opts:
        out += f" --oif {opts['--oif'].value}"
    return out


def _ntop(addr: int, bits: int) -> str:
    return format_address(addr, 32) if bits == 32 else _ntop6(addr)


TEE = Extension("TEE", "target", {"--gateway": OptDef(_host), "--oif": OptDef(_ifname)},
                _tee_save, _need("--gateway", "TEE"))


def _tproxy_finalize(opts: Opts, ctx: Ctx) -> Opts:
    _need("--on-port", "TPROXY")(opts, ctx)
    if ctx.proto not in (6, 17) or ctx.proto_neg:
        raise fail("TPROXY: only valid with -p tcp or -p udp")
    opts.setdefault("--on-ip", Option("--on-ip", 0))
    opts.setdefault("--tproxy-mark", Option("--tproxy-mark", (0, 0)))
    return opts


def _tproxy_save(opts: Opts, ctx: Ctx) -> str:
    v, m = opts["--tproxy-mark"].value
    return (f"--on-port {opts['--on-port'].value} "
            f"--on-ip {_ntop(int(opts['--on-ip'].value), ctx.bits)} "
            f"--tproxy-mark 0x{v:x}/0x{m:x}")


TPROXY = Extension(
    "TPROXY", "target",
    {"--on-port": OptDef(_one(lambda s, c: port16(s))), "--on-ip": OptDef(_host),
     "--tproxy-mark": OptDef(_one(_mark))},
    _tproxy_save, _tproxy_finalize, tables=frozenset({"mangle"}),
)


def _netmap_to(args: tuple[str, ...], ctx: Ctx) -> Prefix:
    return parse_prefix(args[0], ctx.bits)


def _netmap_save(opts: Opts, ctx: Ctx) -> str:
    p = opts["--to"].value
    n = p.length
    return f"--to {_ntop(p.addr, ctx.bits)}/{n if n is not None else _ntop(p.mask, ctx.bits)}"


NETMAP = Extension("NETMAP", "target", {"--to": OptDef(_netmap_to)}, _netmap_save,
                   _need("--to", "NETMAP"), tables=frozenset({"nat"}))


def _npt_pfx(args: tuple[str, ...], ctx: Ctx) -> Prefix:
    p = parse_prefix(args[0], 128)
    if p.length is None or p.length > 64:
        # ip6t_npt checkentry: prefixes of at most 64 bits.
        raise fail(f"NPT: prefix `{args[0]}' must be at most 64 bits long")
    if parse_address(args[0].partition("/")[0], 128) != p.addr:
        raise fail(f"NPT: prefix `{args[0]}' has bits set beyond its length")
    return p


def _npt(name: str) -> Extension:
    def finalize(opts: Opts, ctx: Ctx) -> Opts:
        _need("--src-pfx", name)(opts, ctx)
        return _need("--dst-pfx", name)(opts, ctx)

    def save(opts: Opts, ctx: Ctx) -> str:
        s, d = opts["--src-pfx"].value, opts["--dst-pfx"].value
        return f"--src-pfx {_ntop6(s.addr)}/{s.length} --dst-pfx {_ntop6(d.addr)}/{d.length}"

    return Extension(name, "target", {"--src-pfx": OptDef(_npt_pfx),
                                      "--dst-pfx": OptDef(_npt_pfx)},
                     save, finalize, families=frozenset({6}), tables=frozenset({"mangle"}))


DNPT = _npt("DNPT")
SNPT = _npt("SNPT")

# ---- AUDIT, CLASSIFY, CONNSECMARK, SECMARK, IDLETIMER, LED, RATEEST ---------------------------

_AUDIT_TYPES = ("accept", "drop", "reject")


def _audit_type(args: tuple[str, ...], ctx: Ctx) -> str:
    t = args[0].lower()
    if t not in _AUDIT_TYPES:
        raise fail(f"Bad action type value \"{args[0]}\"")
    return t


AUDIT = Extension("AUDIT", "target", {"--type": OptDef(_audit_type)},
                  lambda o, c: f"--type {o['--type'].value}", _need("--type", "AUDIT"))


def _hex16(s: str) -> int | None:
    # sscanf("%hx"): optional 0x, hex digits, truncated to 16 bits.
    m = re.match(r"(?:0[xX])?([0-9a-fA-F]+)", s)
    return int(m.group(1), 16) & 0xFFFF if m else None


def _class(args: tuple[str, ...], ctx: Ctx) -> tuple[int, int]:
    a, colon, b = args[0].partition(":")
    major, minor = _hex16(a), _hex16(b)
    if not colon or major is None or minor is None:
        raise fail(f"Bad class value \"{args[0]}\"")
    return major, minor


CLASSIFY = Extension(
    "CLASSIFY", "target", {"--set-class": OptDef(_class)},
    lambda o, c: "--set-class {:04x}:{:04x}".format(*o["--set-class"].value),
    _need("--set-class", "CLASSIFY"),
)


def _connsecmark_finalize(opts: Opts, ctx: Ctx) -> Opts:
    if "--save" in opts and "--restore" in opts:
        first, second = [n for n in opts if n in ("--save", "--restore")]
        raise fail(f"CONNSECMARK: option \"{first}\" cannot be used together with "
                   f"\"{second}\".")
    if not opts:
        raise fail("CONNSECMARK: one of the options --save or --restore is required")
    return opts


_SECMARK_TABLES = frozenset({"mangle", "security"})
CONNSECMARK = Extension(
    "CONNSECMARK", "target", {"--save": OptDef(None), "--restore": OptDef(None)},
    lambda o, c: "--save" if "--save" in o else "--restore", _connsecmark_finalize,
    tables=_SECMARK_TABLES,
)


def _selctx(args: tuple[str, ...], ctx: Ctx) -> str:
    if len(args[0]) >= 256:  # SECMARK_SECCTX_MAX
        raise fail("SECMARK: selctx is too long")
    return args[0]


SECMARK = Extension("SECMARK", "target", {"--selctx": OptDef(_selctx)},
                    lambda o, c: f"--selctx {o['--selctx'].value}",
                    _need("--selctx", "SECMARK"), tables=_SECMARK_TABLES)

# xt_IDLETIMER checkentry refuses a zero timeout and one of INT_MAX/1000 seconds or more.
_IDLETIMER_MAX = 0x7FFFFFFF // 1000


def _idletimer_finalize(opts: Opts, ctx: Ctx) -> Opts:
    _need("--timeout", "IDLETIMER")(opts, ctx)
    _need("--label", "IDLETIMER")(opts, ctx)
    t = int(opts["--timeout"].value)
    if t == 0 or t >= _IDLETIMER_MAX:
        raise fail(f"IDLETIMER: timeout {t} is out of range (1-{_IDLETIMER_MAX - 1})")
    if not opts["--label"].value:
        raise fail("IDLETIMER: the label must not be empty")
    return opts


def _idletimer_save(opts: Opts, ctx: Ctx) -> str:
    out = f"--timeout {opts['--timeout'].value} --label {opts['--label'].value}"
    return out + (" --alarm" if "--alarm" in opts else "")


IDLETIMER = Extension(
    "IDLETIMER", "target",
    {"--timeout": OptDef(_uint(U32)), "--label": OptDef(_one(lambda s, c: s[:27])),
     "--alarm": OptDef(None)},
    _idletimer_save, _idletimer_finalize,
)


def _led_delay(args: tuple[str, ...], ctx: Ctx) -> int:
    # libxt_LED: "inf..." (any case) is forever, anything else goes through strtoul.
    if args[0][:3].lower() == "inf":
        return -1
    m = re.match(r"\s*(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", args[0])
    if m is None:
        return 0
    t = m.group(1)
    base = 16 if t[:2].lower() == "0x" else 8 if t.startswith("0") else 10
    return int(t, base) & U32


def _led_id(args: tuple[str, ...], ctx: Ctx) -> str:
    # The kernel names the trigger "netfilter-" + id in a 27-byte buffer.
    if len(args[0]) > 27 - len("netfilter-") - 1:
        raise fail("LED: trigger id too long")
    return args[0]


def _led_save(opts: Opts, ctx: Ctx) -> str:
    ident = str(opts["--led-trigger-id"].value).replace("\\", "\\\\").replace('"', '\\"')
    out = [f'--led-trigger-id "{ident}"']
    d = opts.get("--led-delay")
    delay = int(d.value) if d is not None else 0
    if delay == -1 or delay == U32:
        out.append("--led-delay inf")
    elif 0 < delay <= 0x7FFFFFFF:
        out.append(f"--led-delay {delay}")
    elif delay > 0x7FFFFFFF:  # printed with %d
        out.append(f"--led-delay {delay - (1 << 32)}")
    if "--led-always-blink" in opts:
        out.append("--led-always-blink")
    return " ".join(out)


LED = Extension(
    "LED", "target",
    {"--led-trigger-id": OptDef(_led_id), "--led-delay": OptDef(_led_delay),
     "--led-always-blink": OptDef(None)},
    _led_save, _need("--led-trigger-id", "LED"),
)

_USEC = 1000000
_TIME_UNITS = {"": 1, "s": _USEC, "sec": _USEC, "secs": _USEC, "ms": 1000, "msec": 1000,
               "msecs": 1000, "us": 1, "usec": 1, "usecs": 1}
# strtod's number forms: decimal with exponent, or hexadecimal with a binary exponent.
_STRTOD = re.compile(r"[+-]?(?:0[xX](?P<hex>(?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)"
                     r"(?:[pP][+-]?\d+)?)|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)")


def _rateest_time(args: tuple[str, ...], ctx: Ctx) -> int:
    """libxt_RATEEST: a strtod number, then nothing (microseconds) or a unit, any case."""
    m = _STRTOD.match(args[0])
    unit = args[0][m.end():].lower() if m else ""
    if m is None or unit not in _TIME_UNITS:
        raise fail(f"RATEEST: bad time value `{args[0]}'")
    text = m.group(0)
    if m.group("hex") is not None:
        sign = -1.0 if text.startswith("-") else 1.0
        value = sign * float.fromhex(text.lstrip("+-"))
    else:
        value = float(text)
    t = value * _TIME_UNITS[unit]
    if not 0 <= t < 2 ** 32:  # the C conversion to unsigned int has no meaning here
        raise fail(f"RATEEST: time value `{args[0]}' is out of range")
    return int(t)


def _rateest_finalize(opts: Opts, ctx: Ctx) -> Opts:
    _need("--rateest-name", "RATEEST")(opts, ctx)
    interval = int(opts["--rateest-interval"].value) if "--rateest-interval" in opts else 0
    ewmalog = int(opts["--rateest-ewmalog"].value) if "--rateest-ewmalog" in opts else 0
    # libxt_RATEEST's final check: the interval rounds up to 2^k/4 s (k in -2..3), the
    # ewma log is the first one whose time constant exceeds --rateest-ewmalog, minus one.
    for idx in range(6):
        if interval <= (1 << idx) * (_USEC // 4):
            break
    else:
        raise fail("RATEEST: interval value is too large")
    log = 1
    while log < 32:
        w = 1.0 - 1.0 / (1 << log)
        if interval / (-math.log(w)) > ewmalog:
            break
        log += 1
    log -= 1
    if log == 0 or log >= 31:
        raise fail("RATEEST: ewmalog value is out of range")
    return {"--rateest-name": opts["--rateest-name"],
            "--rateest-interval": Option("--rateest-interval", idx - 2),
            "--rateest-ewmalog": Option("--rateest-ewmalog", log)}


def _print_time(t: int) -> str:
    if t >= _USEC:
        return f"{t / _USEC:.1f}s"
    if t >= 1000:
        return f"{t / 1000:.1f}ms"
    return f"{t}us"


def _rateest_save(opts: Opts, ctx: Ctx) -> str:
    interval = (_USEC << (int(opts["--rateest-interval"].value) + 2)) // 4
    ewma = (interval * (1 << int(opts["--rateest-ewmalog"].value))) & U32
    return (f"--rateest-name {opts['--rateest-name'].value} --rateest-interval "
            f"{_print_time(interval)} --rateest-ewmalog {_print_time(ewma)}")


RATEEST = Extension(
    "RATEEST", "target",
    {"--rateest-name": OptDef(_one(lambda s, c: s[:15])),
     "--rateest-interval": OptDef(_rateest_time), "--rateest-ewmalog": OptDef(_rateest_time)},
    _rateest_save, _rateest_finalize,
)

# ---- SYNPROXY, TCPOPTSTRIP, ECN ---------------------------------------------------------------

_SYNPROXY_FLAGS = ("--sack-perm", "--timestamp")


def _synproxy_finalize(opts: Opts, ctx: Ctx) -> Opts:
    # xt_SYNPROXY checkentry: TCP only (not inverted).
    if ctx.proto != 6 or ctx.proto_neg:
        raise fail("SYNPROXY: only valid with -p tcp")
    return opts


def _synproxy_save(opts: Opts, ctx: Ctx) -> str:
    out = [n for n in _SYNPROXY_FLAGS if n in opts]
    for n in ("--wscale", "--mss"):
        if n in opts:
            out.append(f"{n} {opts[n].value}")
    if "--ecn" in opts:
        out.append("--ecn")
    return " ".join(out)


SYNPROXY = Extension(
    "SYNPROXY", "target",
    {"--sack-perm": OptDef(None), "--timestamp": OptDef(None), "--ecn": OptDef(None),
     # Parsed as u32 and stored in a u8 / u16, as libxt_SYNPROXY does.
     "--wscale": OptDef(_one(lambda s, c: parse_uint(s, U32, "wscale") & 0xFF)),
     "--mss": OptDef(_one(lambda s, c: parse_uint(s, U32, "MSS") & 0xFFFF))},
    _synproxy_save, _synproxy_finalize,
)

TCPOPT_NAMES = {"wscale": 3, "mss": 2, "sack-permitted": 4, "sack": 5, "timestamp": 8,
                "md5": 19}


def _strip_options(args: tuple[str, ...], ctx: Ctx) -> tuple[int, ...]:
    out: set[int] = set()
    for part in args[0].split(","):
        n = TCPOPT_NAMES.get(part)
        if n is None:
            try:
                n = parse_uint(part, 255)
            except ValueError_:
                raise fail(f"Bad TCP option value \"{part}\"") from None
        # EOL and NOP cannot be stripped (xt_TCPOPTSTRIP refuses them).
        if n < 2:
            raise fail(f"TCPOPTSTRIP: option {n} (EOL/NOP) cannot be stripped")
        if n in out:
            raise fail(f"TCPOPTSTRIP: option {n} is given twice")
        out.add(n)
    return tuple(sorted(out))


def _tcpoptstrip_finalize(opts: Opts, ctx: Ctx) -> Opts:
    if ctx.proto != 6 or ctx.proto_neg:
        raise fail("TCPOPTSTRIP: only valid with -p tcp")
    return opts


TCPOPTSTRIP = Extension(
    "TCPOPTSTRIP", "target", {"--strip-options": OptDef(_strip_options)},
    lambda o, c: ("--strip-options " + ",".join(map(str, o["--strip-options"].value))
                  if "--strip-options" in o else ""),
    _tcpoptstrip_finalize, tables=frozenset({"mangle"}),
)


_ECN_TCP = ("--ecn-tcp-ece", "--ecn-tcp-cwr")


def _ecn_bit(args: tuple[str, ...], ctx: Ctx) -> int:
    # The grammar makes this argument optional (the ecn match takes none): require it here.
    if not args:
        raise fail("option requires an argument")
    return parse_uint(args[0], 1, "ECN bit")


def _ecn_t_finalize(opts: Opts, ctx: Ctx) -> Opts:
    if "--ecn-tcp-remove" in opts:
        for n in _ECN_TCP:
            if n in opts:
                raise fail(f"ECN: option \"--ecn-tcp-remove\" cannot be used together with "
                           f"\"{n}\".")
    if not opts:
        raise fail("ECN target: at least one option is required")
    # libipt_ECN: --ecn-tcp-remove sets both TCP bits to 0.
    out = {n: Option(n, 0) for n in _ECN_TCP} if "--ecn-tcp-remove" in opts else {}
    out.update({n: opts[n] for n in (*_ECN_TCP, "--ecn-ip-ect") if n in opts})
    if any(n in out for n in _ECN_TCP) and (ctx.proto != 6 or ctx.proto_neg):
        raise fail("ECN target: the TCP bits can only be set with -p tcp")  # ecn_tg_check
    return out


def _ecn_t_save(opts: Opts, ctx: Ctx) -> str:
    # libipt_ECN prints --ecn-tcp-remove when the operation is exactly both TCP bits set to 0.
    if set(opts) == set(_ECN_TCP) and all(opts[n].value == 0 for n in _ECN_TCP):
        return "--ecn-tcp-remove"
    return " ".join(f"{n} {opts[n].value}" for n in (*_ECN_TCP, "--ecn-ip-ect") if n in opts)


ECN_T = Extension(
    "ECN", "target",
    {"--ecn-tcp-remove": OptDef(None), "--ecn-ip-ect": OptDef(_uint(3, "ECT codepoint")),
     "--ecn-tcp-ece": OptDef(_ecn_bit), "--ecn-tcp-cwr": OptDef(_ecn_bit)},
    _ecn_t_save, _ecn_t_finalize, families=frozenset({4}), tables=frozenset({"mangle"}),
)

# ---- SET ----------------------------------------------------------------------------------------

_SET_SETS = ("--add-set", "--del-set", "--map-set")
_SET_MAPS = ("--map-mark", "--map-prio", "--map-queue")


def _set_target(args: tuple[str, ...], ctx: Ctx) -> tuple[str, str]:
    # libxt_set: a set name of at most 31 characters; one to six directions, each read by
    # its first three letters (`srcx` is src).
    name, flags = args
    dirs = [d[:3] for d in flags.split(",")]
    if not name or len(name) > 31:
        raise fail(f"Setname `{name}' is too long or empty")
    if len(dirs) > 6:
        raise fail("Too many binding directions: at most 6")
    if not all(d in ("src", "dst") for d in dirs):
        raise fail(f"You must specify (the comma separated list of) 'src' or 'dst' in "
                   f"`{flags}'")
    return name, ",".join(dirs)


def _set_finalize(opts: Opts, ctx: Ctx) -> Opts:
    if not any(n in opts for n in _SET_SETS):
        raise fail("SET target: You must specify either `--add-set' or `--del-set' or "
                   "`--map-set'")
    if any(n in opts for n in _SET_MAPS) and "--map-set" not in opts:
        raise fail("SET target: --map-mark, --map-prio and --map-queue need --map-set")
    if "--map-set" in opts and not any(n in opts for n in _SET_MAPS):
        raise fail("SET target: --map-set needs at least one of --map-mark, --map-prio or "
                   "--map-queue")
    # xt_SET checkentry: mapping only in the mangle table (priority and queue only at
    # FORWARD, OUTPUT and POSTROUTING: ir/checks.py).
    if "--map-set" in opts and ctx.table != "mangle":
        raise fail("SET target: --map-set only usable from mangle table")
    return opts


def _set_save(opts: Opts, ctx: Ctx) -> str:
    out = []
    for name in ("--add-set", "--del-set"):
        if name in opts:
            out.append("{} {} {}".format(name, *opts[name].value))
    if "--exist" in opts:
        out.append("--exist")
    if "--timeout" in opts:
        out.append(f"--timeout {opts['--timeout'].value}")
    if "--map-set" in opts:
        out.append("--map-set {} {}".format(*opts["--map-set"].value))
    out += [n for n in _SET_MAPS if n in opts]
    return " ".join(out)


SET_T = Extension(
    "SET", "target",
    {**{n: OptDef(_set_target) for n in _SET_SETS}, "--exist": OptDef(None),
     "--timeout": OptDef(_uint(U32 - 1, "timeout")), **{n: OptDef(None) for n in _SET_MAPS}},
    _set_save, _set_finalize,
)

# ---- HMARK ------------------------------------------------------------------------------------

# --hmark-tuple types: the option each one stands for (its mask set to all ones).
_HMARK_TYPES = {"src": "--hmark-src-prefix", "dst": "--hmark-dst-prefix",
                "sport": "--hmark-sport-mask", "dport": "--hmark-dport-mask",
                "spi": "--hmark-spi-mask", "proto": "--hmark-proto-mask", "ct": "ct"}
# Printed in this order, each with its printf format.
_HMARK_MASKS = (("--hmark-sport-mask", "0x{:04x}"), ("--hmark-dport-mask", "0x{:04x}"),
                ("--hmark-spi-mask", "0x{:08x}"), ("--hmark-proto-mask", "0x{:02x}"))


def _hmark_tuple(args: tuple[str, ...], ctx: Ctx) -> tuple[str, ...]:
    s = args[0]
    parts = s.split(",")
    out = []
    for i, part in enumerate(parts):
        if part == "" and i == len(parts) - 1 and i > 0:
            raise fail("\"--hmark-tuple\" requires a list of types with no spaces, e.g. "
                       "src,dst,sport,dport,proto")
        if part.lower() not in _HMARK_TYPES:
            raise fail(f"Bad type \"{','.join(parts[i:])}\"")
        out.append(part.lower())
    return tuple(out)


def _hmark_prefix(args: tuple[str, ...], ctx: Ctx) -> int:
    # XTTYPE_PLENMASK: a length (up to 128 in both families; IPv4 keeps the first 32 bits)
    # or a mask in address form (iptables 1.8.9 saves a non-contiguous one as a full length).
    s = args[0]
    if s.isdigit() and s.isascii():
        n = int(s)
        if n <= 128:
            return min(n, ctx.bits)
    else:
        try:
            mask = parse_address(s, ctx.bits)
        except ValueError_:
            mask = None
        if mask is not None:
            p = Prefix(0, mask, ctx.bits)
            return p.length if p.length is not None else ctx.bits
    raise fail(f"HMARK: bad value for option \"--hmark-src-prefix\", neither a valid network "
               f"mask nor valid CIDR (0-{ctx.bits}).")


def _hmark_finalize(opts: Opts, ctx: Ctx) -> Opts:
    """Options in command-line order: a tuple type sets its mask to all ones and claims the
    option (given again later, it is refused as given twice)."""
    out: Opts = {}
    claimed: set[str] = set()
    ct = False
    for o in opts.values():
        if o.name == "--hmark-tuple":
            for t in o.value:
                name = _HMARK_TYPES[t]
                if name == "ct":
                    ct = True
                    continue
                claimed.add(name)
                full = ctx.bits if name.endswith("prefix") else (
                    U32 if name == "--hmark-spi-mask" else 0xFFFF)
                out[name] = Option(name, full)
            continue
        if o.name in claimed:
            raise fail(f"HMARK: option \"{o.name}\" can only be used once.")
        out[o.name] = o
    if ct:
        out["--hmark-tuple"] = Option("--hmark-tuple", ("ct",))
    if "--hmark-mod" not in out:
        raise fail("--hmark-mod is mandatory")
    if "--hmark-rnd" not in out:
        raise fail("--hmark-rnd is mandatory")
    if not ct and not any(n in out for n in _HMARK_TYPES.values()):
        raise fail("you have to specify --hmark-tuple at least")
    if "--hmark-spi-mask" in out and ("--hmark-sport-mask" in out or "--hmark-dport-mask" in out):
        raise fail("you cannot use --hmark-spi-mask and --hmark-?port-mask,at the same time")
    return out


def _hmark_save(opts: Opts, ctx: Ctx) -> str:
    out = [f"{n} {opts[n].value}" for n in ("--hmark-src-prefix", "--hmark-dst-prefix")
           if n in opts]
    out += [f"{n} " + fmt.format(opts[n].value) for n, fmt in _HMARK_MASKS if n in opts]
    out.append(f"--hmark-rnd 0x{opts['--hmark-rnd'].value:08x}")
    out.append(f"--hmark-mod {opts['--hmark-mod'].value}")
    if "--hmark-offset" in opts:
        out.append(f"--hmark-offset {opts['--hmark-offset'].value}")
    if "--hmark-tuple" in opts:
        out.append("--hmark-tuple ct")
    return " ".join(out)


def _hmark_mod(args: tuple[str, ...], ctx: Ctx) -> int:
    n = parse_uint(args[0], U32, "modulus")
    if n == 0:
        raise fail("HMARK: bad value for option \"--hmark-mod\", or out of range "
                   "(1-4294967295).")
    return n


HMARK = Extension(
    "HMARK", "target",
    {"--hmark-tuple": OptDef(_hmark_tuple), "--hmark-src-prefix": OptDef(_hmark_prefix),
     "--hmark-dst-prefix": OptDef(_hmark_prefix),
     "--hmark-sport-mask": OptDef(_uint(0xFFFF, "mask")),
     "--hmark-dport-mask": OptDef(_uint(0xFFFF, "mask")),
     "--hmark-spi-mask": OptDef(_uint(U32, "mask")),
     "--hmark-proto-mask": OptDef(_uint(0xFFFF, "mask")),
     "--hmark-rnd": OptDef(_uint(U32, "random")), "--hmark-mod": OptDef(_hmark_mod),
     "--hmark-offset": OptDef(_uint(U32, "offset"))},
    _hmark_save, _hmark_finalize,
)

TARGETS: dict[str, Extension] = {
    e.name: e for e in (REJECT, LOG, NFLOG, MARK_T, CONNMARK_T, CT, NOTRACK, DNAT, SNAT,
                        MASQUERADE, REDIRECT, DSCP_T, TOS_T, TTL_T, HL_T, TCPMSS_T, CHECKSUM,
                        NFQUEUE, QUEUE, TRACE, TEE, TPROXY, NETMAP, DNPT, SNPT, AUDIT,
                        CLASSIFY, CONNSECMARK, SECMARK, IDLETIMER, LED, RATEEST, SYNPROXY,
                        TCPOPTSTRIP, ECN_T, SET_T, HMARK)
}
VERDICTS = frozenset({"ACCEPT", "DROP", "RETURN"})
UNSUPPORTED_TARGETS = frozenset({
    "ULOG", "CLUSTERIP", "CONNLOG", "JOOL", "FULLCONENAT",
})
