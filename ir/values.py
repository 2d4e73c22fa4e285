"""Value parsers and formatters shared by the extension table: addresses, ports, numbers."""

from __future__ import annotations

import ipaddress
import re

from bpfilter.ir.model import PortRange, Prefix, make_prefix


class ValueError_(Exception):
    """A value iptables would refuse; the message is iptables' wording where known."""


# Protocol numbers and names as /etc/protocols (netbase) lists them; iptables-save prints
# the name getprotobynumber() gives, so the canonical output depends on this table.
PROTO_NAMES: dict[int, str] = {
    1: "icmp", 2: "igmp", 3: "ggp", 4: "ipencap", 5: "st", 6: "tcp", 8: "egp", 9: "igp",
    12: "pup", 17: "udp", 20: "hmp", 22: "xns-idp", 27: "rdp", 29: "iso-tp4", 33: "dccp",
    36: "xtp", 37: "ddp", 38: "idpr-cmtp", 41: "ipv6", 43: "ipv6-route", 44: "ipv6-frag",
    45: "idrp", 46: "rsvp", 47: "gre", 50: "esp", 51: "ah", 57: "skip", 58: "ipv6-icmp",
    59: "ipv6-nonxt", 60: "ipv6-opts", 73: "rspf", 81: "vmtp", 88: "eigrp", 89: "ospf",
    93: "ax.25", 94: "ipip", 97: "etherip", 98: "encap", 103: "pim", 108: "ipcomp",
    112: "vrrp", 115: "l2tp", 124: "isis", 132: "sctp", 133: "fc", 135: "mobility-header",
    136: "udplite", 137: "mpls-in-ip", 138: "manet", 139: "hip", 140: "shim6", 141: "wesp",
    142: "rohc", 143: "ethernet",
}
PROTO_NUMBERS: dict[str, int] = {name: num for num, name in PROTO_NAMES.items()}
# Aliases from /etc/protocols and the names iptables itself knows (xtables_chain_protos).
PROTO_NUMBERS.update({
    "ip": 0, "hopopt": 0, "all": 0, "icmpv6": 58, "ipv6-mh": 135, "mh": 135,
    "ospfigp": 89, "ipsec-esp": 50, "ipsec-ah": 51, "ip-encap": 4,
})

# Common services (netbase /etc/services); iptables resolves names with getservbyname().
SERVICES: dict[str, int] = {
    "tcpmux": 1, "echo": 7, "discard": 9, "systat": 11, "daytime": 13, "netstat": 15,
    "qotd": 17, "chargen": 19, "ftp-data": 20, "ftp": 21, "ssh": 22, "telnet": 23,
    "smtp": 25, "time": 37, "whois": 43, "tacacs": 49, "domain": 53, "gopher": 70,
    "finger": 79, "http": 80, "www": 80, "kerberos": 88, "iso-tsap": 102, "pop3": 110,
    "sunrpc": 111, "auth": 113, "nntp": 119, "ntp": 123, "epmap": 135, "netbios-ns": 137,
    "netbios-dgm": 138, "netbios-ssn": 139, "imap2": 143, "imap": 143, "snmp": 161,
    "snmp-trap": 162, "bgp": 179, "irc": 194, "ldap": 389, "https": 443,
    "microsoft-ds": 445, "kpasswd": 464, "submissions": 465, "isakmp": 500, "syslog": 514,
    "printer": 515, "talk": 517, "ntalk": 518, "route": 520, "uucp": 540, "submission": 587,
    "ipp": 631, "ldaps": 636, "rsync": 873, "ftps-data": 989, "ftps": 990, "telnets": 992,
    "imaps": 993, "pop3s": 995, "socks": 1080, "openvpn": 1194, "ms-sql-s": 1433,
    "l2f": 1701, "pptp": 1723, "radius": 1812, "radius-acct": 1813, "nfs": 2049,
    "mysql": 3306, "ms-wbt-server": 3389, "sip": 5060, "postgresql": 5432, "x11": 6000,
    "bootps": 67, "bootpc": 68, "tftp": 69, "xmpp-client": 5222, "http-alt": 8080,
    "webcache": 8080, "tproxy": 8081, "squid": 3128, "git": 9418, "zabbix-agent": 10050,
    "mdns": 5353, "domain-s": 853, "nrpe": 5666, "puppet": 8140, "xmpp-server": 5269,
    "ident": 113, "mail": 25, "kerberos-adm": 749, "amanda": 10080,
}


def parse_uint(text: str, maximum: int, what: str = "value") -> int:
    """strtoul(text, 0) with a range check, as xtables_strtoui does."""
    try:
        t = text.strip()
        if not t or t[0] in "+-" or " " in t:
            raise ValueError
        if t.lower().startswith("0x"):
            n = int(t[2:], 16)
        elif len(t) > 1 and t[0] == "0":
            n = int(t[1:], 8)
        else:
            n = int(t, 10)
    except ValueError:
        raise ValueError_(f"invalid {what} `{text}' specified") from None
    if n > maximum:
        raise ValueError_(f"invalid {what} `{text}' specified")
    return n


def parse_proto(text: str) -> int:
    """`-p` argument: a number, a name from /etc/protocols or `all`."""
    t = text.lower()
    if t.isdigit():
        n = int(t)
        if n > 255:
            raise ValueError_(f"unknown protocol \"{text}\" specified")
        return n
    if t in PROTO_NUMBERS:
        return PROTO_NUMBERS[t]
    raise ValueError_(f"unknown protocol \"{text}\" specified")


def proto_name(num: int) -> str:
    """How iptables-save prints a protocol number."""
    return PROTO_NAMES.get(num, str(num))


def parse_port(text: str) -> int:
    """A port number or service name."""
    if text.isdigit():
        n = int(text)
        if n <= 65535:
            return n
    elif text in SERVICES:
        return SERVICES[text]
    raise ValueError_(f"invalid port/service `{text}' specified")


def parse_port_range(text: str) -> PortRange:
    """`A`, `A:B`, `A:`, `:B` or `:` (iptables' port range syntax)."""
    if ":" not in text:
        p = parse_port(text)
        return PortRange(p, p)
    a, _, b = text.partition(":")
    lo = parse_port(a) if a else 0
    hi = parse_port(b) if b else 65535
    if lo > hi:
        raise ValueError_(f"invalid portrange (min > max) `{text}'")
    return PortRange(lo, hi)


def format_port_range(r: PortRange) -> str:
    return str(r.lo) if r.lo == r.hi else f"{r.lo}:{r.hi}"


_DOTTED = re.compile(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})").fullmatch
# The canonical spelling of every octet: four dict lookups parse the common address several
# times faster than the regular expression. Only texts _DOTTED accepts with the same value
# are keys, so anything else (leading zeros, other digits, short forms) takes the slow path.
_OCTETS = {str(i): i for i in range(256)}
# IPv4 prefix lengths as written after the slash (canonical spelling only) -> mask.
_MASKS4 = {str(n): (0xFFFFFFFF << (32 - n)) & 0xFFFFFFFF for n in range(33)}


def _ipv4(text: str) -> int:
    # Only dotted quads: inet_aton-style shorthands and host names are refused here.
    parts = text.split(".")
    if len(parts) == 4:
        o = _OCTETS
        p0, p1, p2, p3 = parts
        if p0 in o and p1 in o and p2 in o and p3 in o:
            return (o[p0] << 24) | (o[p1] << 16) | (o[p2] << 8) | o[p3]
    m = _DOTTED(text)
    if m is None:
        raise ValueError
    a, b, c, d = map(int, m.groups())
    if a > 255 or b > 255 or c > 255 or d > 255:
        raise ValueError
    return (a << 24) | (b << 16) | (c << 8) | d


def parse_address(text: str, bits: int) -> int:
    """One IPv4 (bits 32) or IPv6 (bits 128) address."""
    try:
        if bits == 32:
            return _ipv4(text)
        # ipaddress takes a scope (`fe80::1%eth0`); inet_pton, and so ip6tables, does not.
        if ":" not in text or "%" in text:
            raise ValueError
        return int(ipaddress.IPv6Address(text))
    except ValueError:
        raise ValueError_(f"host/network `{text}' not found") from None


def parse_prefix(text: str, bits: int) -> Prefix:
    """ADDR[/LEN|/MASK], masked as iptables masks it."""
    addr_s, slash, mask_s = text.partition("/")
    if bits == 32:
        mask = _MASKS4.get(mask_s) if slash else 0xFFFFFFFF
        if mask is not None:
            try:
                addr = _ipv4(addr_s)
            except ValueError:
                raise ValueError_(f"host/network `{addr_s}' not found") from None
            return make_prefix(addr & mask, mask, 32)
    full = (1 << bits) - 1
    if not slash:
        mask = full
    elif mask_s.isdigit():
        n = int(mask_s)
        if n > bits:
            raise ValueError_(f"invalid mask `{mask_s}' specified")
        mask = (full << (bits - n)) & full
    else:
        try:
            mask = parse_address(mask_s, bits)
        except ValueError_:
            raise ValueError_(f"invalid mask `{mask_s}' specified") from None
    addr = parse_address(addr_s, bits)
    return make_prefix(addr & mask, mask, bits)


def format_address(addr: int, bits: int) -> str:
    if bits == 32:
        return f"{addr >> 24}.{(addr >> 16) & 255}.{(addr >> 8) & 255}.{addr & 255}"
    return str(ipaddress.IPv6Address(addr))


def format_prefix(p: Prefix) -> str:
    """iptables-save form: ADDR/LEN, or ADDR/MASK for a non-contiguous mask."""
    n = p.length
    if n is None:
        return f"{format_address(p.addr, p.bits)}/{format_address(p.mask, p.bits)}"
    return f"{format_address(p.addr, p.bits)}/{n}"


def format_prefix_short(p: Prefix) -> str:
    """xtables numeric form used by extensions: no suffix for a host address."""
    n = p.length
    if n is None:
        return f"{format_address(p.addr, p.bits)}/{format_address(p.mask, p.bits)}"
    if n == p.bits:
        return format_address(p.addr, p.bits)
    return f"{format_address(p.addr, p.bits)}/{n}"


_NO_QUOTE = frozenset("_-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def save_string(value: str) -> str:
    """Quote a string argument the way iptables-save does."""
    if value and all(c in _NO_QUOTE for c in value):
        return value
    out = ['"']
    for c in value:
        if c in "\"\\'":
            out.append("\\")
        out.append(c)
    out.append('"')
    return "".join(out)
