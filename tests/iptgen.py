"""Seeded random iptables-restore rulesets for property and differential tests."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# Every construct the generator can emit, by name. A test that runs against an incomplete
# front end passes a trimmed set (and says which names it removed and why); nothing is
# excluded silently.
CORE_FEATURES: tuple[str, ...] = (
    "src", "dst", "addr_mask", "addr_list", "iface", "iface_wildcard", "proto", "proto_num",
    "negation", "fragment",
)
MATCH_FEATURES: tuple[str, ...] = (
    "tcp", "udp", "explicit_m_proto", "tcp_flags", "syn", "multiport", "icmp", "conntrack",
    "conntrack_options", "state", "comment", "comment_odd_chars", "comment_long", "limit",
    "mark", "length",
    "pkttype", "addrtype", "iprange", "mac", "ttl", "dscp", "tos", "connmark", "statistic",
    "tcp_option", "recent", "hashlimit", "connlimit", "owner",
)
TARGET_FEATURES: tuple[str, ...] = (
    "jump", "goto", "return", "reject", "log", "nflog", "mark_target", "no_target",
    "mangle_targets", "nat_targets",
)
STRUCTURE_FEATURES: tuple[str, ...] = (
    "user_chains", "policy", "omit_builtin", "insert", "new_chain_cmd", "policy_cmd",
    "rule_counters", "file_comments", "family_prefix", "extra_tables",
)
FEATURES: frozenset[str] = frozenset(
    CORE_FEATURES + MATCH_FEATURES + TARGET_FEATURES + STRUCTURE_FEATURES
)

BUILTIN_CHAINS: dict[str, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
}
# Chains whose packets have no input (resp. output) interface: iptables refuses -i (resp. -o).
NO_IN_IFACE = frozenset({"OUTPUT", "POSTROUTING"})
NO_OUT_IFACE = frozenset({"INPUT", "PREROUTING"})

TCP_FLAGS = ("SYN", "ACK", "FIN", "RST", "URG", "PSH")
CT_STATES = ("INVALID", "NEW", "ESTABLISHED", "RELATED", "UNTRACKED", "SNAT", "DNAT")
CT_STATUS = ("EXPECTED", "SEEN_REPLY", "ASSURED", "CONFIRMED")
SENDER_MAC = "02:00:00:00:00:01"  # the source of tests/difftest.py's probe frames
STATE_STATES = ("INVALID", "NEW", "ESTABLISHED", "RELATED", "UNTRACKED")
ICMP_TYPES = (
    "any", "echo-request", "echo-reply", "destination-unreachable", "port-unreachable",
    "time-exceeded", "8", "0", "3/4", "11/0", "5", "parameter-problem",
)
ICMP6_TYPES = (
    "echo-request", "echo-reply", "destination-unreachable", "packet-too-big",
    "neighbour-solicitation", "neighbour-advertisement", "router-advertisement", "128", "1/3",
)
REJECT4 = (
    "icmp-net-unreachable", "icmp-host-unreachable", "icmp-port-unreachable",
    "icmp-proto-unreachable", "icmp-net-prohibited", "icmp-host-prohibited",
    "icmp-admin-prohibited",
)
REJECT6 = (
    "icmp6-no-route", "icmp6-adm-prohibited", "icmp6-addr-unreachable",
    "icmp6-port-unreachable",
)
TCP_SERVICES = ("ssh", "http", "https", "domain", "smtp")
UDP_SERVICES = ("domain", "ntp", "syslog")
COMMENT_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 -_.:/=,"
ODD_COMMENT_CHARS = "'\"\\!#*"


@dataclass(frozen=True, slots=True)
class GenOptions:
    """What to generate: address family, size, feature set, and the share of broken rules."""

    family: int = 4
    max_rules: int = 40
    features: frozenset[str] = FEATURES
    # Probability per rule of one deliberate, plausible mistake (bad port, -o in INPUT,
    # jump to an undeclared chain, ...). 0.0 yields rulesets iptables accepts.
    invalid_rate: float = 0.0


@dataclass(frozen=True, slots=True)
class GenRule:
    """One rule command: `-A CHAIN` (or `-I CHAIN [POS]`), match clauses, then a target."""

    chain: str
    clauses: tuple[tuple[str, ...], ...]
    target: tuple[str, ...] = ()
    command: str = "-A"
    position: int | None = None
    counters: tuple[int, int] | None = None

    def tokens(self) -> list[str]:
        head = [self.command, self.chain]
        if self.position is not None:
            head.append(str(self.position))
        out = head + [tok for clause in self.clauses for tok in clause]
        return out + list(self.target)


@dataclass(frozen=True, slots=True)
class GenTable:
    """A table section: declared chains (None policy = user chain), then body lines in order."""

    name: str
    chains: tuple[tuple[str, str | None], ...]
    body: tuple[GenRule | str, ...]


@dataclass(frozen=True, slots=True)
class GenRuleset:
    """A generated restore file; `render()` gives the text.

    `mistakes` names the deliberate errors the generator attempted; some do not survive into
    the text (the rule that would carry one took another branch), so iptables is the judge.
    """

    family: int
    seed: int
    tables: tuple[GenTable, ...]
    mistakes: tuple[str, ...] = field(default=())

    @property
    def rule_count(self) -> int:
        return sum(isinstance(line, GenRule) for t in self.tables for line in t.body)

    def render(self) -> str:
        lines: list[str] = []
        for table in self.tables:
            lines.append(f"*{table.name}")
            for name, policy in table.chains:
                lines.append(f":{name} {policy or '-'} [0:0]")
            for item in table.body:
                if isinstance(item, str):
                    lines.append(item)
                    continue
                text = " ".join(quote(tok) for tok in item.tokens())
                if item.counters is not None:
                    text = f"[{item.counters[0]}:{item.counters[1]}] {text}"
                lines.append(text)
            lines.append("COMMIT")
        return "\n".join(lines) + "\n"


def quote(token: str) -> str:
    """Quote a token the way iptables-restore reads it back as one word."""
    if token and not any(c in token for c in " \t\"\\'"):
        return token
    escaped = token.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


class _Gen:
    def __init__(self, seed: int, opts: GenOptions) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.opts = opts
        self.f = opts.features
        self.v6 = opts.family == 6
        self.mistakes: list[str] = []
        # Small pools so prefixes and port ranges overlap across rules.
        r = self.rng
        if self.v6:
            self.hosts = [f"2001:db8:{r.randrange(4):x}::{r.randrange(1, 16):x}" for _ in range(8)]
        else:
            self.hosts = [f"198.{18 + r.randrange(2)}.{r.randrange(4)}.{r.randrange(1, 255)}"
                          for _ in range(8)]
        self.ports = sorted({r.randrange(1, 65536) for _ in range(6)} | {22, 53, 80, 443, 1024})

    # -- helpers -----------------------------------------------------------------------------
    def on(self, name: str, p: float = 1.0) -> bool:
        return name in self.f and self.rng.random() < p

    def bang(self, p: float = 0.2) -> list[str]:
        return ["!"] if self.on("negation", p) else []

    def mistake(self, what: str) -> bool:
        if self.opts.invalid_rate and self.rng.random() < self.opts.invalid_rate:
            self.mistakes.append(what)
            return True
        return False

    def address(self) -> str:
        r = self.rng
        host = r.choice(self.hosts)
        bits = 128 if self.v6 else 32
        if not self.on("addr_mask", 0.7):
            return host
        plen = r.choice([bits, bits, r.randrange(0, bits + 1), bits - 8, bits // 2])
        if self.mistake("prefix length out of range"):
            plen = bits + 1 + r.randrange(3)
        if not self.v6 and r.random() < 0.25 and plen <= 32:
            mask = (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF if plen else 0
            return f"{host}/{'.'.join(str((mask >> s) & 0xFF) for s in (24, 16, 8, 0))}"
        return f"{host}/{plen}"

    def port(self, proto: str = "tcp") -> str:
        r = self.rng
        if self.mistake("port out of range"):
            return str(65536 + r.randrange(100000))
        if r.random() < 0.1:
            return r.choice(TCP_SERVICES if proto == "tcp" else UDP_SERVICES)
        return str(r.choice(self.ports) if r.random() < 0.7 else r.randrange(0, 65536))

    def port_range(self, proto: str) -> str:
        r = self.rng
        kind = r.randrange(5)
        if kind <= 1:
            return self.port(proto)
        a, b = sorted((r.choice(self.ports), r.randrange(0, 65536)))
        if self.mistake("port range min > max") and a != b:
            a, b = b, a
        if kind == 2:
            return f"{a}:{b}"
        return f"{a}:" if kind == 3 else f":{b}"

    def ct_options(self) -> list[str]:
        """One or two conntrack options besides --ctstate (--ctexpire left out: it counts
        seconds, so its verdicts depend on timing)."""
        r = self.rng
        out: list[str] = []
        for kind in r.sample(["proto", "dir", "addr", "port", "status"], r.randrange(1, 3)):
            if kind == "proto":
                proto = r.choice(["tcp", "udp", "ipv6-icmp" if self.v6 else "icmp", "17"])
                out += [*self.bang(), "--ctproto", proto]
            elif kind == "dir":
                out += ["--ctdir", r.choice(["ORIGINAL", "REPLY"])]
            elif kind == "addr":
                name = r.choice(["--ctorigsrc", "--ctorigdst", "--ctreplsrc", "--ctrepldst"])
                out += [*self.bang(), name, self.address()]
            elif kind == "port":
                name = r.choice(["--ctorigsrcport", "--ctorigdstport", "--ctreplsrcport",
                                 "--ctrepldstport"])
                a, b = sorted((r.choice(self.ports), r.choice(self.ports)))
                out += [*self.bang(), name, str(a) if r.random() < 0.5 else f"{a}:{b}"]
            else:
                status = r.sample(CT_STATUS, r.randrange(1, 3))
                out += [*self.bang(), "--ctstatus", ",".join(status)]
        return out

    def iface(self) -> str:
        r = self.rng
        name = r.choice(["eth0", "eth1", "veth", "br-lan", "lo", "wg0", "dummy7"])
        if self.on("iface_wildcard", 0.3):
            return r.choice([name[: r.randrange(1, len(name) + 1)] + "+", "+"])
        if self.mistake("interface name too long"):
            return "x" * (16 + r.randrange(4))
        return name

    def comment(self) -> str:
        r = self.rng
        alphabet = COMMENT_CHARS + (ODD_COMMENT_CHARS if self.on("comment_odd_chars") else "")
        text = "".join(r.choice(alphabet) for _ in range(r.randrange(0, 24)))
        if self.on("comment_long", 0.05):
            # Accepted: iptables-legacy keeps the first 255 characters.
            text = text + "c" * (256 + r.randrange(64))
        return text

    def chain_name(self, taken: set[str]) -> str:
        r = self.rng
        while True:
            length = r.choice([3, 5, 8, 12, 28])
            name = "U" + "".join(
                r.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
                for _ in range(length - 1)
            )
            if self.mistake("chain name longer than 28"):
                name += "XY"
            if name not in taken:
                return name

    # -- rules -------------------------------------------------------------------------------
    def proto_clauses(self, chain: str) -> tuple[list[tuple[str, ...]], str | None]:
        """-p and the protocol matches that depend on it; returns clauses and the protocol."""
        r = self.rng
        f = self.f
        protos = [p for p in ("tcp", "udp", "icmp") if p in f]
        if not protos or not self.on("proto", 0.75):
            return [], None
        proto: str = r.choice(protos)
        if proto == "icmp" and self.v6:
            proto = "ipv6-icmp"
        clauses: list[tuple[str, ...]] = []
        neg = self.bang(0.1)
        if neg:
            # A negated protocol matches other protocols: protocol options are refused then.
            name = proto if not self.on("proto_num", 0.3) else {"tcp": "6", "udp": "17"}.get(
                proto, proto)
            return [tuple(neg) + ("-p", name)], None
        spelled = proto
        if self.on("proto_num", 0.15):
            spelled = {"tcp": "6", "udp": "17", "icmp": "1", "ipv6-icmp": "58"}[proto]
        clauses.append(("-p", spelled))
        opts: list[str] = []
        if proto in ("tcp", "udp"):
            if r.random() < 0.6:
                opts += self.bang(0.15) + ["--dport", self.port_range(proto)]
            if r.random() < 0.3:
                opts += self.bang(0.15) + ["--sport", self.port_range(proto)]
            if proto == "tcp" and self.on("syn", 0.12):
                opts += self.bang(0.3) + ["--syn"]
            elif proto == "tcp" and self.on("tcp_flags", 0.12):
                mask = r.sample(TCP_FLAGS, r.randrange(1, 7))
                comp = r.sample(mask, r.randrange(0, len(mask) + 1))
                mask_s = "ALL" if len(mask) == 6 and r.random() < 0.5 else ",".join(mask)
                opts += self.bang(0.2) + ["--tcp-flags", mask_s, ",".join(comp) or "NONE"]
        elif proto == "icmp" and r.random() < 0.7:
            opts += self.bang(0.15) + ["--icmp-type", r.choice(ICMP_TYPES)]
        elif proto == "ipv6-icmp" and r.random() < 0.7:
            opts += self.bang(0.15) + ["--icmpv6-type", r.choice(ICMP6_TYPES)]
        if self.mistake("protocol option without its protocol") and opts:
            clauses = []
        if opts:
            explicit = self.on("explicit_m_proto", 0.4)
            clauses.append((("-m", proto if proto != "ipv6-icmp" else "icmp6") if explicit
                            else ()) + tuple(opts))
        if proto in ("tcp", "udp") and self.on("multiport", 0.2):
            n = r.randrange(1, 9)
            items = []
            for _ in range(n):
                a, b = sorted((r.choice(self.ports), r.randrange(0, 65536)))
                items.append(f"{a}:{b}" if r.random() < 0.3 else str(a))
            if self.mistake("multiport with more than 15 ports"):
                items = [str(p) for p in range(1, 17)]
            opt = r.choice(["--dports", "--sports", "--ports"])
            clauses.append(("-m", "multiport", *self.bang(0.15), opt, ",".join(items)))
        return clauses, proto

    def match_clauses(self, chain: str, table: str, proto: str | None) -> list[tuple[str, ...]]:
        r = self.rng
        out: list[tuple[str, ...]] = []
        # iptables refuses `!` on either address once one of them is a list.
        listed = self.on("addr_list", 0.1)
        for opt, feature, p in (("-s", "src", 0.35), ("-d", "dst", 0.25)):
            if not self.on(feature, p):
                continue
            if listed:
                count = r.randrange(1 if opt == "-d" else 2, 4)
                out.append((opt, ",".join(self.address() for _ in range(count))))
            else:
                out.append((*self.bang(), opt, self.address()))
        if self.on("iface", 0.3) and (
                chain not in NO_IN_IFACE or self.mistake("-i in an output chain")):
            out.append((*self.bang(), "-i", self.iface()))
        if self.on("iface", 0.2) and (
                chain not in NO_OUT_IFACE or self.mistake("-o in an input chain")):
            out.append((*self.bang(), "-o", self.iface()))
        if not self.v6 and proto is None and self.on("fragment", 0.05):
            out.append((*self.bang(0.3), "-f"))
        if self.on("conntrack", 0.2):
            extra = self.ct_options() if self.on("conntrack_options", 0.5) else []
            clause = ["-m", "conntrack"]
            if not extra or r.random() < 0.5:
                states = r.sample(CT_STATES, r.randrange(1, 4))
                clause += [*self.bang(), "--ctstate", ",".join(states)]
            out.append((*clause, *extra))
        if self.on("state", 0.1):
            states = r.sample(STATE_STATES, r.randrange(1, 3))
            out.append(("-m", "state", *self.bang(), "--state", ",".join(states)))
        if self.on("limit", 0.08):
            # "1/day" with the default burst overflows the kernel's credit counter.
            unit = r.choice(["second", "sec", "s", "minute", "min", "hour", "/m"])
            rate = f"{r.randrange(1, 100)}{unit}" if unit.startswith("/") else \
                f"{r.randrange(1, 100)}/{unit}"
            clause = ["-m", "limit", "--limit", rate]
            if r.random() < 0.5:
                clause += ["--limit-burst", str(r.randrange(1, 50))]
            out.append(tuple(clause))
        if self.on("mark", 0.08):
            value = f"0x{r.randrange(1 << 16):x}" + (
                f"/0x{r.randrange(1, 1 << 16):x}" if r.random() < 0.5 else "")
            out.append(("-m", "mark", *self.bang(), "--mark", value))
        if self.on("connmark", 0.05):
            out.append(("-m", "connmark", *self.bang(), "--mark", str(r.randrange(0, 100))))
        if self.on("length", 0.05):
            a, b = sorted((r.randrange(0, 65536), r.randrange(0, 65536)))
            out.append(("-m", "length", *self.bang(), "--length",
                        f"{a}:{b}" if r.random() < 0.6 else str(a)))
        if self.on("pkttype", 0.05):
            out.append(("-m", "pkttype", *self.bang(), "--pkt-type",
                        r.choice(["unicast", "broadcast", "multicast"])))
        if self.on("addrtype", 0.05):
            out.append(("-m", "addrtype", *self.bang(), r.choice(["--src-type", "--dst-type"]),
                        r.choice(["LOCAL", "UNICAST", "MULTICAST"] + ([] if self.v6 else [
                            "BROADCAST"]))))
        if self.on("iprange", 0.05):
            a, b = sorted(self.rng.sample(range(1, 255), 2))
            base = "2001:db8::" if self.v6 else "198.18.0."
            lo, hi = (f"{base}{a:x}", f"{base}{b:x}") if self.v6 else (f"{base}{a}", f"{base}{b}")
            out.append(("-m", "iprange", *self.bang(), r.choice(["--src-range", "--dst-range"]),
                        f"{lo}-{hi}"))
        # xt_mac only registers the hooks that see a source MAC; user chains could be
        # reached from any hook, so the generator keeps mac to these built-in chains.
        if chain in ("PREROUTING", "INPUT", "FORWARD") and self.on("mac", 0.04):
            mac = SENDER_MAC if r.random() < 0.5 else \
                ":".join(f"{r.randrange(256):02x}" for _ in range(6))
            out.append(("-m", "mac", *self.bang(), "--mac-source", mac))
        if self.on("ttl", 0.04):
            if self.v6:
                out.append(("-m", "hl", r.choice(["--hl-eq", "--hl-lt", "--hl-gt"]),
                            str(r.randrange(256))))
            else:
                out.append(("-m", "ttl", r.choice(["--ttl-eq", "--ttl-lt", "--ttl-gt"]),
                            str(r.randrange(256))))
        if self.on("dscp", 0.04):
            out.append(("-m", "dscp", *self.bang(), "--dscp", str(r.randrange(64))))
        if self.on("tos", 0.03) and not self.v6:
            out.append(("-m", "tos", *self.bang(), "--tos",
                        r.choice(["0x10", "0x08/0x3f", "Minimize-Delay", "0x04"])))
        if self.on("statistic", 0.04):
            if r.random() < 0.5:
                every = r.randrange(2, 10)
                out.append(("-m", "statistic", "--mode", "nth", "--every", str(every),
                            "--packet", str(r.randrange(every))))
            else:
                out.append(("-m", "statistic", "--mode", "random", "--probability",
                            r.choice(["0.5", "0.25", "0.1", "0.75"])))
        if proto == "tcp" and self.on("tcp_option", 0.05):
            out.append(("-m", "tcp", *self.bang(), "--tcp-option", str(r.randrange(1, 256))))
        if self.on("recent", 0.03):
            name = r.choice(["ssh", "badguys", "DEFAULT"])
            if r.random() < 0.4:
                out.append(("-m", "recent", "--name", name, r.choice(["--set", "--remove"])))
            else:
                clause = ["-m", "recent", "--name", name, r.choice(["--rcheck", "--update"])]
                if r.random() < 0.7:
                    clause += ["--seconds", str(r.randrange(1, 3600))]
                if r.random() < 0.5:
                    clause += ["--hitcount", str(r.randrange(1, 20))]
                if r.random() < 0.3:
                    clause.append("--rsource" if r.random() < 0.5 else "--rdest")
                out.append(tuple(clause))
        if self.on("hashlimit", 0.03):
            clause = ["-m", "hashlimit", r.choice(["--hashlimit-upto", "--hashlimit-above"]),
                      f"{r.randrange(1, 1000)}/{r.choice(['sec', 'min', 'hour'])}",
                      "--hashlimit-name", f"hl{r.randrange(100)}"]
            if r.random() < 0.6:
                clause += ["--hashlimit-mode", ",".join(r.sample(
                    ["srcip", "dstip", "srcport", "dstport"], r.randrange(1, 3)))]
            if r.random() < 0.4:
                clause += ["--hashlimit-burst", str(r.randrange(1, 100))]
            out.append(tuple(clause))
        if self.on("connlimit", 0.03):
            clause = ["-m", "connlimit", r.choice(["--connlimit-above", "--connlimit-upto"]),
                      str(r.randrange(1, 100))]
            if r.random() < 0.5:
                clause += ["--connlimit-mask", str(r.randrange(129 if self.v6 else 33))]
            out.append(tuple(clause))
        # xt_owner only sees a socket on the way out of the host.
        if chain in ("OUTPUT", "POSTROUTING") and self.on("owner", 0.1):
            out.append(("-m", "owner", *self.bang(), r.choice(["--uid-owner", "--gid-owner"]),
                        str(r.choice([0, 1, 1000, 65534]))))
        if self.on("comment", 0.2):
            out.append(("-m", "comment", "--comment", self.comment()))
        return out

    def target(self, table: str, chain: str, proto: str | None,
               jumpable: list[str]) -> tuple[str, ...]:
        r = self.rng
        f = self.f
        choices: list[str] = ["ACCEPT", "DROP"]
        if jumpable and "jump" in f:
            choices += ["jump"] * 3
        if jumpable and "goto" in f:
            choices.append("goto")
        if "return" in f:
            choices.append("RETURN")
        if "no_target" in f:
            choices.append("none")
        if table == "filter" and "reject" in f:
            choices += ["REJECT", "REJECT"]
        if "log" in f:
            choices.append("LOG")
        if "nflog" in f:
            choices.append("NFLOG")
        if table == "mangle" and "mark_target" in f:
            choices += ["MARK"] * 3
        if table == "raw":
            choices += ["NOTRACK", "CT"]
        if table == "mangle" and "mangle_targets" in f:
            choices += ["DSCP", "TOS", "TTL", "CONNMARK", "CHECKSUM"]
            if proto == "tcp" and chain in ("FORWARD", "OUTPUT", "POSTROUTING"):
                choices += ["TCPMSS"] * 3
        if table == "nat":
            choices = ["ACCEPT", "RETURN"] + (["jump"] if jumpable else [])
            choices += ["nat"] * 3 if "nat_targets" in f else []
        pick = r.choice(choices)
        if pick in ("jump", "goto"):
            dest = r.choice(jumpable)
            return ("-j" if pick == "jump" else "-g", dest)
        if pick == "none":
            return ()
        if pick == "REJECT":
            if r.random() < 0.3:
                return ("-j", "REJECT")
            if proto == "tcp" and r.random() < 0.4 or self.mistake("tcp-reset without -p tcp"):
                return ("-j", "REJECT", "--reject-with", "tcp-reset")
            return ("-j", "REJECT", "--reject-with", r.choice(REJECT6 if self.v6 else REJECT4))
        if pick == "LOG":
            out = ["-j", "LOG"]
            if r.random() < 0.6:
                out += ["--log-prefix", self.comment()[:29] or "p"]
            if r.random() < 0.4:
                out += ["--log-level", r.choice(["4", "warning", "debug", "0", "7", "info"])]
            return tuple(out)
        if pick == "NFLOG":
            out = ["-j", "NFLOG"]
            if r.random() < 0.6:
                out += ["--nflog-group", str(r.randrange(65536))]
            if r.random() < 0.4:
                out += ["--nflog-prefix", self.comment()[:60] or "p"]
            return tuple(out)
        if pick == "MARK":
            return ("-j", "MARK", r.choice(["--set-mark", "--or-mark", "--and-mark"]),
                    f"0x{r.randrange(1 << 16):x}")
        if pick == "NOTRACK":
            return ("-j", "NOTRACK")
        if pick == "DSCP":
            return ("-j", "DSCP", "--set-dscp", str(r.randrange(64)))
        if pick == "TOS":
            return ("-j", "TOS", "--set-tos", r.choice(["0x10", "0x08/0x3f", "Minimize-Cost"]))
        if pick == "TTL":
            if self.v6:
                return ("-j", "HL", r.choice(["--hl-set", "--hl-inc", "--hl-dec"]),
                        str(r.randrange(1, 64)))
            return ("-j", "TTL", r.choice(["--ttl-set", "--ttl-inc", "--ttl-dec"]),
                    str(r.randrange(1, 64)))
        if pick == "CONNMARK":
            return r.choice([("-j", "CONNMARK", "--save-mark"),
                             ("-j", "CONNMARK", "--restore-mark", "--mask", "0xff"),
                             ("-j", "CONNMARK", "--set-mark", f"0x{r.randrange(1 << 16):x}")])
        if pick == "CHECKSUM":
            return ("-j", "CHECKSUM", "--checksum-fill")
        if pick == "TCPMSS":
            return r.choice([("-j", "TCPMSS", "--clamp-mss-to-pmtu"),
                             ("-j", "TCPMSS", "--set-mss", str(r.randrange(536, 1461)))])
        if pick == "CT":
            return ("-j", "CT", "--notrack")
        if pick == "nat":
            if chain in ("PREROUTING", "OUTPUT") and proto in ("tcp", "udp") and \
                    r.random() < 0.3:
                return ("-j", "REDIRECT", "--to-ports", str(r.choice(self.ports)))
            if chain in ("PREROUTING", "OUTPUT"):
                dst = r.choice(self.hosts)
                dest = f"[{dst}]" if self.v6 else dst
                if proto in ("tcp", "udp") and r.random() < 0.5:
                    dest += f":{r.choice(self.ports)}"
                return ("-j", "DNAT", "--to-destination", dest)
            if chain == "POSTROUTING":
                if r.random() < 0.5:
                    return ("-j", "MASQUERADE")
                return ("-j", "SNAT", "--to-source", r.choice(self.hosts))
            return ("-j", "ACCEPT")
        return ("-j", pick)

    def table(self, name: str, budget: int) -> tuple[GenTable, int]:
        r = self.rng
        f = self.f
        builtins = BUILTIN_CHAINS[name]
        user: list[str] = []
        if "user_chains" in f and name != "raw":
            taken: set[str] = set(builtins)
            for _ in range(r.randrange(0, 5)):
                user.append(self.chain_name(taken))
                taken.add(user[-1])
        chains: list[tuple[str, str | None]] = []
        for b in builtins:
            if self.on("omit_builtin", 0.15):
                continue
            policy = "ACCEPT"
            if name == "filter" and self.on("policy", 0.4):
                policy = r.choice(["ACCEPT", "DROP"])
            if self.mistake("bad policy"):
                policy = r.choice(["RETURN", "REJECT", "-"])
            chains.append((b, policy))
        new_cmd = [c for c in user if self.on("new_chain_cmd", 0.3)]
        for c in user:
            if c not in new_cmd:
                policy_user = None
                if self.mistake("policy on a user chain"):
                    policy_user = "DROP"
                chains.append((c, policy_user))
        body: list[GenRule | str] = [f"-N {c}" for c in new_cmd]
        lengths: dict[str, int] = {c: 0 for c in list(builtins) + user}
        n = r.randrange(0, budget + 1)
        for _ in range(n):
            chain = r.choice(list(builtins) + user * 2)
            # Jumps only go "down" the user chain list, so there are no loops.
            jumpable = user[user.index(chain) + 1:] if chain in user else list(user)
            if jumpable and self.mistake("jump to an undeclared chain"):
                jumpable = ["NOSUCHCHAIN"]
            if chain in user and self.mistake("loop through user chains"):
                jumpable = [chain]
            proto_clauses, proto = self.proto_clauses(chain)
            others = self.match_clauses(chain, name, proto)
            # Protocol options must follow -p; other clauses may go anywhere.
            clauses = list(proto_clauses)
            for clause in others:
                clauses.insert(r.randrange(len(clauses) + 1) if clause[0] in (
                    "-s", "-d", "-i", "-o", "!", "-f") or not proto_clauses else r.randrange(
                    len(proto_clauses), len(clauses) + 1), clause)
            target = self.target(name, chain, proto, jumpable)
            if target[1:2] == ("TCPMSS",):
                # The kernel takes TCPMSS only in rules that match SYN packets alone.
                clauses.append(("-m", "tcp", "--tcp-flags", "SYN,RST", "SYN"))
            command, position = "-A", None
            if self.on("insert", 0.1):
                command = "-I"
                if r.random() < 0.6:
                    position = r.randrange(1, lengths[chain] + 2)
                    if self.mistake("insert index too big"):
                        position = lengths[chain] + 2
            counters = None
            if self.on("rule_counters", 0.1):
                counters = (r.randrange(1000), r.randrange(100000))
            body.append(GenRule(chain, tuple(clauses), target, command, position, counters))
            lengths[chain] += 1
            if self.on("file_comments", 0.05):
                body.append(r.choice(["# a comment line", "", "#"]))
            if self.on("family_prefix", 0.05):
                other = "-6" if not self.v6 else "-4"
                mine = "-4" if not self.v6 else "-6"
                body.append(f"{other} -A {chain} -j DROP")
                body.append(f"{mine} -A {chain} -j ACCEPT")
        for b in builtins if name == "filter" else ():
            if self.on("policy_cmd", 0.05):
                body.append(f"-P {b} {r.choice(['ACCEPT', 'DROP'])}")
        return GenTable(name, tuple(chains), tuple(body)), n

    def ruleset(self) -> GenRuleset:
        r = self.rng
        names = ["filter"]
        if "extra_tables" in self.f:
            for extra in ("mangle", "raw", "nat"):
                if r.random() < 0.2:
                    names.insert(r.randrange(len(names) + 1), extra)
        budget = self.opts.max_rules
        tables = []
        for name in names:
            table, used = self.table(name, max(0, budget // len(names)))
            tables.append(table)
            budget -= used
        return GenRuleset(self.opts.family, self.seed, tuple(tables), tuple(self.mistakes))


def generate(seed: int, options: GenOptions | None = None) -> GenRuleset:
    """The ruleset for this seed and these options; the same inputs always give the same text."""
    return _Gen(seed, options or GenOptions()).ruleset()
