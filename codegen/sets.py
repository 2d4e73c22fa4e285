"""bpfilter's own sets (`-m set --match-set`): map layout, elements, and the matching code.

A set is one LPM trie per set, whatever its type, so that a rule's code depends only on the
family and on how many src/dst flags the rule gives, never on the set's type (which lives in
bpffs and may change between compiling and loading):

    key = u32 prefix length (host order) | port (be16) | protocol (u8) | 0 (u8) | address

Sets without a port dimension (hash:ip, hash:net) keep port and protocol zero; port sets
(hash:ip,port, hash:net,port) only ever hold a nonzero protocol. A rule with one flag looks
the packet up with port and protocol zero; a rule with two looks it up that way and, when the
packet has ports, with its port and protocol too. At most one of the two can hit, and a port
set never matches a one-flag rule, as ip_set_test() refuses a rule with fewer flags than the
set has dimensions. Every entry covers the 32 port/protocol bits and ``cidr`` address bits
(exact addresses: all of them), so the longest-prefix lookup is a membership test.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bpfilter.codegen import asm
from bpfilter.codegen import flavor_netfilter as nf
from bpfilter.codegen.asm import Label
from bpfilter.codegen.helpers import BpfFunc
from bpfilter.codegen.insn import FP, R0, R1, R2, R7
from bpfilter.codegen.opcodes import Size
from bpfilter.codegen.spec import MapSpec
from bpfilter.codegen.uapi import MapFlag, MapType
from bpfilter.ir.model import Match, Rule
from bpfilter.ir.values import ValueError_, parse_port

if TYPE_CHECKING:  # codegen/matchers registers emit_set, so it imports this module
    from bpfilter.codegen.matchers import Emitter, Resources

SET_TYPES = ("hash:ip", "hash:net", "hash:ip,port", "hash:net,port")
FAMILIES = {"inet": 4, "inet6": 6}
DEFAULT_MAXELEM = 65536  # ipset's default maxelem
MAX_NAME = 31  # IPSET_MAXNAMELEN - 1
HEAD_BITS = 32  # port, protocol and the zero byte: always matched in full
VALUE_SIZE = 4  # unused; LPM tries need a value
MAX_EXPAND = 65536  # addresses a hash:ip CIDR or a port range may add at once
# The kernel map name records the set's type (the key size gives its family).
MAP_NAMES = {"hash:ip": "bfset_ip", "hash:net": "bfset_net",
             "hash:ip,port": "bfset_ipport", "hash:net,port": "bfset_netport"}
# Protocols with ports in a port set, and the header ipset's get_port() reads (it gives up on
# a shorter packet: the set does not match).
PORT_PROTOS = {"tcp": 6, "udp": 17, "sctp": 132, "udplite": 136}
PORT_HEADER = {6: 20, 17: 8, 132: 12, 136: 8}
PROTO_NAMES = {v: k for k, v in PORT_PROTOS.items()}

_HEAD = struct.Struct("<I")


class SetError(ValueError):
    """A set, type or element bpfilter refuses; the message says why."""


def key_size(family: int) -> int:
    return 4 + HEAD_BITS // 8 + (4 if family == 4 else 16)


def map_spec(family: int, maxelem: int = 1, *, name: str = "set", pin: str | None = None,
             line: int = 0) -> MapSpec:
    """The map of a set: created by ``bpfilter set create`` (``pin`` None), or referred to by
    a rule (``pin`` the set's name: opened, never created)."""
    return MapSpec(name, MapType.LPM_TRIE, key_size(family), VALUE_SIZE, maxelem,
                   MapFlag.NO_PREALLOC, pin=pin, line=line)


def check_name(name: str) -> str:
    if not name or len(name) > MAX_NAME or "/" in name or name in (".", "..") or "\0" in name:
        raise SetError(f"invalid set name {name!r} (1-{MAX_NAME} characters, no '/')")
    return name


@dataclass(frozen=True, slots=True)
class SetType:
    """A set's type, family and size, as `ipset create NAME TYPE family F maxelem N`."""

    kind: str
    family: int
    maxelem: int = DEFAULT_MAXELEM

    def __post_init__(self) -> None:
        if self.kind not in SET_TYPES:
            raise SetError(f"set type {self.kind!r} is not supported (only "
                           f"{', '.join(SET_TYPES)})")
        if self.family not in (4, 6):
            raise SetError(f"family must be inet or inet6, not {self.family}")
        if not 1 <= self.maxelem <= 1 << 24:
            raise SetError(f"maxelem must be 1-{1 << 24}, not {self.maxelem}")

    @property
    def bits(self) -> int:
        return 32 if self.family == 4 else 128

    @property
    def ports(self) -> bool:
        return self.kind.endswith(",port")

    @property
    def family_name(self) -> str:
        return "inet" if self.family == 4 else "inet6"

    def spec(self) -> MapSpec:
        return map_spec(self.family, self.maxelem, name=MAP_NAMES[self.kind])

    @staticmethod
    def of_map(map_name: str, key_bytes: int, max_entries: int) -> SetType | None:
        """The type of an existing set map (kernel name and key size), None if not a set."""
        kinds = {v: k for k, v in MAP_NAMES.items()}
        family = {key_size(4): 4, key_size(6): 6}.get(key_bytes)
        if map_name not in kinds or family is None:
            return None
        return SetType(kinds[map_name], family, max_entries)

    # --- elements ---------------------------------------------------------------------------

    def keys(self, element: str) -> list[bytes]:
        """The keys `ipset add NAME ELEMENT` would add (CIDRs of hash:ip and port ranges
        expand to one key each)."""
        addr_text, comma, port_text = element.partition(",")
        if self.ports != bool(comma):
            raise SetError(f"{self.kind} elements are "
                           f"{'ADDR,[PROTO:]PORT' if self.ports else 'ADDR'}: {element!r}")
        nets = self._nets(addr_text)
        heads = self._heads(port_text) if self.ports else [bytes(4)]
        if len(nets) * len(heads) > MAX_EXPAND:
            raise SetError(f"{element!r} stands for more than {MAX_EXPAND} elements")
        return [_HEAD.pack(HEAD_BITS + cidr) + head + addr
                for addr, cidr in nets for head in heads]

    def _nets(self, text: str) -> list[tuple[bytes, int]]:
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise SetError(f"invalid {self.family_name} address {text!r}") from None
        if net.version != self.family:
            raise SetError(f"{text!r} is not an {self.family_name} address")
        if "-" in text:
            raise SetError(f"address ranges are not supported: {text!r}")
        if self.kind.startswith("hash:net"):
            if net.prefixlen == 0:
                raise SetError(f"a /0 network cannot be stored: {text!r}")
            return [(net.network_address.packed, net.prefixlen)]
        if net.num_addresses > MAX_EXPAND:
            raise SetError(f"{text!r} stands for more than {MAX_EXPAND} addresses")
        return [(a.packed, self.bits) for a in (net if net.num_addresses > 1 else [net[0]])]

    def _heads(self, text: str) -> list[bytes]:
        proto_name, colon, ports = text.rpartition(":") if ":" in text else ("tcp", "", text)
        proto = PORT_PROTOS.get(proto_name.lower())
        if proto is None:
            raise SetError(f"protocol {proto_name!r} is not supported in port sets (only "
                           f"{', '.join(PORT_PROTOS)})")
        try:  # a service name may hold a dash (ftp-data): the whole text first
            lo = hi = parse_port(ports)
        except ValueError_:
            lo_text, dash, hi_text = ports.partition("-")
            lo = _port(lo_text)
            hi = _port(hi_text) if dash else lo
        if lo > hi:
            lo, hi = hi, lo
        return [struct.pack("!HBB", p, proto, 0) for p in range(lo, hi + 1)]

    def format_key(self, key: bytes) -> str:
        """An element as `ipset list` prints it."""
        (plen,) = _HEAD.unpack_from(key)
        port, proto = struct.unpack_from("!HB", key, 4)
        addr = ipaddress.ip_address(key[8:])
        cidr = plen - HEAD_BITS
        text = str(addr) if cidr == self.bits else f"{addr}/{cidr}"
        if self.ports:
            text += f",{PROTO_NAMES.get(proto, str(proto))}:{port}"
        return text


def _port(text: str) -> int:
    """A port number or service name (ipset resolves names with getservbyname)."""
    try:
        return parse_port(text)
    except ValueError_:
        raise SetError(f"invalid port {text!r}") from None


# --- compiling `-m set` ---------------------------------------------------------------------

KEY = -48  # the lookup key on the stack of the function running the rule (24 bytes)
_ADDR = {"src": (12, 8), "dst": (16, 24)}  # IPv4 / IPv6 header offsets of the addresses
_PORT = {"src": 0, "dst": 2}


def declare(res: Resources, set_name: str, family: int, line: int) -> str:
    """The symbol of ``set_name``'s map in the compiled ruleset (one per set)."""
    for spec in res.specs.values():
        if spec.pin == set_name:
            return spec.name
    n = sum(1 for s in res.specs.values() if s.pin is not None)
    return res.shared(map_spec(family, name=f"set{n}", pin=set_name, line=line))


def emit_set(em: Emitter, rule: Rule, m: Match | None) -> None:
    # xt_set's set_match_v4 with ip_set_test(): the address of the first flag's direction,
    # and with a second flag the port of its direction (ip_set_get_ip{4,6}_port: none for a
    # later fragment or a truncated transport header, so no port-set entry can match).
    from bpfilter.codegen.matchers import negatable

    assert m is not None
    o = m.get("--match-set")
    assert o is not None
    set_name, flags_text = o.value
    flags = flags_text.split(",")
    symbol = declare(em.res, set_name, em.family, rule.line)
    bits = 32 if em.family == 4 else 128
    v4_off, v6_off = _ADDR[flags[0]]
    addr = nf.L3 + (v4_off if em.family == 4 else v6_off)

    def test(on_false: str) -> None:
        hit = em.label("set_hit")
        em.emit(asm.st(Size.DW, FP, KEY, 0), asm.st(Size.DW, FP, KEY + 8, 0),
                asm.st(Size.DW, FP, KEY + 16, 0),
                asm.st(Size.W, FP, KEY, HEAD_BITS + bits))
        for i in range(bits // 32):
            em.emit(asm.ldx(Size.W, R1, R7, addr + 4 * i),
                    asm.stx(Size.W, FP, KEY + 8 + 4 * i, R1))
        _lookup(em, symbol, hit)
        if len(flags) >= 2:
            em.emit(asm.ldx(Size.W, R1, R7, nf.FRAG), asm.jmp("jne", R1, 0, on_false))
            if em.family == 6:
                em.emit(asm.ldx(Size.W, R1, R7, nf.PROTO_ERROR),
                        asm.jmp("jne", R1, 0, on_false))
            em.emit(asm.ldx(Size.W, R1, R7, nf.PROTO), asm.ldx(Size.W, R2, R7, nf.L4_LEN))
            ok = em.label("set_ports")
            for proto, size in PORT_HEADER.items():
                skip = em.label("set_proto")
                em.emit(asm.jmp("jne", R1, proto, skip), asm.jmp("jge", R2, size, ok),
                        asm.ja(on_false), Label(skip))
            em.emit(asm.ja(on_false), Label(ok),
                    asm.stx(Size.B, FP, KEY + 6, R1),
                    asm.ldx(Size.H, R1, R7, nf.L4 + _PORT[flags[1]]),
                    asm.stx(Size.H, FP, KEY + 4, R1))
            _lookup(em, symbol, hit)
        em.emit(asm.ja(on_false), Label(hit))

    negatable(em, o.negated, test)


def _lookup(em: Emitter, symbol: str, hit: str) -> None:
    em.emit(asm.ld_map_fd(R1, symbol), asm.mov64(R2, FP), asm.add64(R2, KEY),
            asm.call_helper(BpfFunc.map_lookup_elem), asm.jmp("jne", R0, 0, hit))
