"""ClassBench rule sets and traces as iptables rulesets, packets and a linear reference classifier
(shared by the optimizer's kernel tests and bench/bench_classbench.py)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

IPPROTO_TCP, IPPROTO_UDP = 6, 17
FULL = (0, 65535)


@dataclass(frozen=True, slots=True)
class CbRule:
    """One ClassBench rule: prefixes as (address, length), inclusive port ranges, protocol
    (None: any)."""

    src: tuple[int, int]
    dst: tuple[int, int]
    sport: tuple[int, int]
    dport: tuple[int, int]
    proto: int | None


@dataclass(frozen=True, slots=True)
class CbPacket:
    src: int
    dst: int
    sport: int
    dport: int
    proto: int


def _prefix(text: str) -> tuple[int, int]:
    addr, _, n = text.partition("/")
    a, b, c, d = (int(x) for x in addr.split("."))
    length = int(n)
    value = (a << 24) | (b << 16) | (c << 8) | d
    mask = (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF
    return value & mask, length


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi)


def read_rules(path: Path) -> list[CbRule]:
    """``@src/len  dst/len  sport_lo : sport_hi  dport_lo : dport_hi  proto/mask  flags``."""
    out = []
    for line in path.read_text().splitlines():
        if not line.startswith("@"):
            continue
        f = line[1:].split("\t")
        proto, _, mask = f[4].partition("/")
        out.append(CbRule(_prefix(f[0]), _prefix(f[1]), _range(f[2]), _range(f[3]),
                          int(proto, 16) if int(mask, 16) else None))
    return out


def read_trace(path: Path) -> list[CbPacket]:
    """``src dst sport dport proto flags rule`` (addresses as unsigned decimals)."""
    out = []
    for line in path.read_text().splitlines():
        f = line.split()
        if len(f) >= 5:
            out.append(CbPacket(int(f[0]), int(f[1]), int(f[2]), int(f[3]), int(f[4])))
    return out


def verdict_of(k: int) -> str:
    """Rule k (0-based) accepts when k is even, drops when odd."""
    return "ACCEPT" if k % 2 == 0 else "DROP"


def _addr(value: int, length: int) -> str:
    return f"{value >> 24}.{(value >> 16) & 255}.{(value >> 8) & 255}.{value & 255}/{length}"


def restore_text(rules: list[CbRule], policy: str = "DROP") -> str:
    """The rules as an INPUT chain (README mapping: ports only for TCP and UDP)."""
    lines = ["*filter", f":INPUT {policy} [0:0]", ":FORWARD ACCEPT [0:0]",
             ":OUTPUT ACCEPT [0:0]"]
    for k, r in enumerate(rules):
        parts = ["-A INPUT", "-s", _addr(*r.src), "-d", _addr(*r.dst)]
        if r.proto is not None:
            parts += ["-p", str(r.proto)]
            if r.proto in (IPPROTO_TCP, IPPROTO_UDP):
                name = "tcp" if r.proto == IPPROTO_TCP else "udp"
                ports = [f"--{w} {lo}:{hi}" for w, (lo, hi) in (("sport", r.sport),
                                                               ("dport", r.dport))
                         if (lo, hi) != FULL]
                if ports:
                    parts += ["-m", name, *ports]
        parts += ["-j", verdict_of(k)]
        lines.append(" ".join(parts))
    return "\n".join([*lines, "COMMIT", ""])


def _in(prefix: tuple[int, int], addr: int) -> bool:
    value, length = prefix
    return addr >> (32 - length) == value >> (32 - length) if length else True


def first_match(rules: list[CbRule], p: CbPacket) -> int | None:
    """The linear reference: the first rule matching as the iptables rule above does."""
    for k, r in enumerate(rules):
        if not (_in(r.src, p.src) and _in(r.dst, p.dst)):
            continue
        if r.proto is not None:
            if r.proto != p.proto:
                continue
            if r.proto in (IPPROTO_TCP, IPPROTO_UDP) and not (
                    r.sport[0] <= p.sport <= r.sport[1] and r.dport[0] <= p.dport <= r.dport[1]):
                continue
        return k
    return None


def packet(p: CbPacket) -> bytes:
    """An IPv4 packet with the trace's header fields (a full TCP or UDP header)."""
    if p.proto == IPPROTO_TCP:
        l4 = struct.pack("!HHIIBBHHH", p.sport, p.dport, 0, 0, 5 << 4, 0x10, 1024, 0, 0)
    elif p.proto == IPPROTO_UDP:
        l4 = struct.pack("!HHHH", p.sport, p.dport, 12, 0) + b"xxxx"
    else:
        l4 = bytes(8)
    return struct.pack("!BBHHHBBHII", 0x45, 0, 20 + len(l4), 1, 0, 64, p.proto, 0,
                       p.src, p.dst) + l4
