"""The target half of the extension table: REJECT, LOG, NAT, MARK and friends."""

from __future__ import annotations

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
    _one,
    _tos_value,
    _uint,
    fail,
)
from bpfilter.ir.model import Option
from bpfilter.ir.values import (
    ValueError_,
    format_address,
    parse_address,
    parse_port,
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

TARGETS: dict[str, Extension] = {
    e.name: e for e in (REJECT, LOG, NFLOG, MARK_T, CONNMARK_T, CT, NOTRACK, DNAT, SNAT,
                        MASQUERADE, REDIRECT, DSCP_T, TOS_T, TTL_T, HL_T, TCPMSS_T, CHECKSUM)
}
VERDICTS = frozenset({"ACCEPT", "DROP", "RETURN"})
UNSUPPORTED_TARGETS = frozenset({
    "NFQUEUE", "QUEUE", "TRACE", "TPROXY", "TEE", "AUDIT", "CLASSIFY", "CONNSECMARK",
    "IDLETIMER", "LED", "NETMAP", "RATEEST", "SECMARK", "SET", "SYNPROXY", "TCPOPTSTRIP",
    "DNPT", "SNPT", "ULOG", "CLUSTERIP", "ECN", "HMARK", "CONNLOG", "JOOL", "FULLCONENAT",
})
