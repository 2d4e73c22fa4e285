"""Throwaway test bed: two network namespaces joined by a veth pair, plus traffic probes."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import secrets
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from bpfilter import bpffs, netns

# Invariants (the e2e tests, the benchmarks and `bpfilter demo` rely on them): nothing here
# touches the caller's own namespace (the veth pair is created inside the first namespace with
# its peer placed straight into the second); both namespaces and their bpffs pin directories
# are deleted on exit, also after an exception, Ctrl-C or SIGTERM; addresses come only from
# 198.18.0.0/15 and 2001:db8::/32.

IF_A = "veth-a"
IF_B = "veth-b"
PREFIX4 = 24
PREFIX6 = 64
SUBNETS = 512  # 198.18.0.0/15 holds 512 /24s
IP_TIMEOUT = 10.0

ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8
ICMP6_ECHO_REQUEST = 128
ICMP6_ECHO_REPLY = 129


class TestbedError(RuntimeError):
    """An `ip` command of the test bed failed; carries the command and its stderr."""

    __test__ = False  # not a pytest test class despite the name


# Per process, a counter from a random start, scrambled by an odd multiplier (a bijection mod
# 2**24): 16 million names before one repeats, where 6 random hex digits collided once in a
# few hundred CI runs of 200 names.
_NAME_SEQ = itertools.count(secrets.randbelow(1 << 24))
_NAME_MIX = 0x9E3779B1


def unique_name(prefix: str = "bpft") -> str:
    """A namespace name no other process picks and this one never repeats: PREFIX-PID-HEX6."""
    return f"{prefix}-{os.getpid()}-{(next(_NAME_SEQ) * _NAME_MIX) & 0xFFFFFF:06x}"


@dataclass(frozen=True, slots=True)
class Subnet:
    """The address plan of one pair: side a is ``.1``/``::1``, side b ``.2``/``::2``."""

    index: int  # 0..511: which /24 of 198.18.0.0/15 and which /48 of 2001:db8::/32

    def __post_init__(self) -> None:
        if not 0 <= self.index < SUBNETS:
            raise ValueError(f"subnet index {self.index} outside 0..{SUBNETS - 1}")

    def ipv4(self, host: int) -> str:
        base = int(ipaddress.IPv4Address("198.18.0.0")) + (self.index << 8)
        return str(ipaddress.IPv4Address(base + host))

    def ipv6(self, host: int) -> str:
        return str(ipaddress.IPv6Address(f"2001:db8:{self.index:x}::{host:x}"))


def random_subnet() -> Subnet:
    """A random subnet, so pairs made at the same time rarely share addresses."""
    return Subnet(secrets.randbelow(SUBNETS))


@dataclass(frozen=True, slots=True)
class NetnsPair:
    """Two namespaces ``a`` and ``b`` joined by ``if_a`` (in a) <-> ``if_b`` (in b)."""

    a: str
    b: str
    subnet: Subnet
    if_a: str = IF_A
    if_b: str = IF_B
    ifindex_a: int = 0
    ifindex_b: int = 0

    @property
    def ipv4_a(self) -> str:
        return self.subnet.ipv4(1)

    @property
    def ipv4_b(self) -> str:
        return self.subnet.ipv4(2)

    @property
    def ipv6_a(self) -> str:
        return self.subnet.ipv6(1)

    @property
    def ipv6_b(self) -> str:
        return self.subnet.ipv6(2)

    def peer(self, ns: str) -> str:
        """The other namespace of the pair."""
        if ns not in (self.a, self.b):
            raise ValueError(f"{ns!r} is not part of this pair")
        return self.b if ns == self.a else self.a

    def address(self, ns: str, family: int = socket.AF_INET) -> str:
        """The address of ``ns`` (one of the pair) in ``family`` (AF_INET or AF_INET6)."""
        host = 1 if ns == self.a else 2 if ns == self.b else 0
        if host == 0:
            raise ValueError(f"{ns!r} is not part of this pair")
        return self.subnet.ipv4(host) if family == socket.AF_INET else self.subnet.ipv6(host)

    def ifname(self, ns: str) -> str:
        """The veth end that lives in ``ns``."""
        return self.if_a if ns == self.a else self.if_b

    def ifindex(self, ns: str) -> int:
        """Index of the veth end that lives in ``ns``."""
        return self.ifindex_a if ns == self.a else self.ifindex_b

    def add_address(self, ns: str, addr: str) -> None:
        """Give the veth end in ``ns`` one more address (same prefix length as the first)."""
        family = _family(addr)
        prefix = PREFIX4 if family == socket.AF_INET else PREFIX6
        extra = ("nodad",) if family == socket.AF_INET6 else ()
        _ip(ns, "addr", "add", f"{addr}/{prefix}", "dev", self.ifname(ns), *extra)

    def run(
        self, ns: str, argv: Sequence[str], *, check: bool = True, timeout: float = IP_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``ns`` (one of the pair) with ``ip netns exec``."""
        if ns not in (self.a, self.b):
            raise ValueError(f"{ns!r} is not part of this pair")
        return run(ns, argv, check=check, timeout=timeout)


def run(
    ns: str, argv: Sequence[str], *, check: bool = True, timeout: float = IP_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """``ip netns exec NS ARGV...``, output captured as text."""
    return _cmd(["ip", "netns", "exec", netns.check_name(ns), *argv], check, timeout)


def _cmd(
    argv: Sequence[str], check: bool = True, timeout: float = IP_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise TestbedError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _ip(ns: str, *args: str) -> None:
    _cmd(["ip", "-n", ns, *args])


def _setup(a: str, b: str, subnet: Subnet) -> NetnsPair:
    _cmd(["ip", "netns", "add", a])
    _cmd(["ip", "netns", "add", b])
    # Created inside a with its peer moved straight into b: never visible in our namespace.
    _ip(a, "link", "add", IF_A, "type", "veth", "peer", "name", IF_B, "netns", b)
    for ns, ifname, host in ((a, IF_A, 1), (b, IF_B, 2)):
        _ip(ns, "link", "set", "lo", "up")
        _ip(ns, "addr", "add", f"{subnet.ipv4(host)}/{PREFIX4}", "dev", ifname)
        # nodad: usable at once instead of "tentative" for a second or more.
        _ip(ns, "addr", "add", f"{subnet.ipv6(host)}/{PREFIX6}", "dev", ifname, "nodad")
        _ip(ns, "link", "set", ifname, "up")
    _wait_operstate_up(((a, IF_A), (b, IF_B)))
    return NetnsPair(
        a=a,
        b=b,
        subnet=subnet,
        ifindex_a=netns.ifindex(IF_A, a),
        ifindex_b=netns.ifindex(IF_B, b),
    )


def _wait_operstate_up(ends: Sequence[tuple[str, str]], timeout: float = 5.0) -> None:
    # Carrier changes are applied by the kernel's deferred linkwatch work: until it has run,
    # the device has no real qdisc and drops what is sent (the first IPv6 neighbour
    # solicitation, typically). Operstate UP is set by that same work.
    deadline = time.monotonic() + timeout
    pending = list(ends)
    while pending:
        ns, ifname = pending[0]
        out = _cmd(["ip", "-n", ns, "-j", "link", "show", "dev", ifname]).stdout
        if json.loads(out)[0].get("operstate") == "UP":
            pending.pop(0)
        elif time.monotonic() > deadline:
            raise TestbedError(f"{ifname} in {ns} not operationally up after {timeout} s")
        else:
            time.sleep(0.005)


def delete(ns: str) -> None:
    """Delete namespace ``ns`` and its bpffs pin directory; quiet when already gone."""
    try:
        bpffs.cleanup(ns)
    finally:
        if netns.exists(ns):
            _cmd(["ip", "netns", "del", ns], check=False)


def delete_all(names: Sequence[str]) -> None:
    """delete() each namespace, all of them even when one fails; then raise the first error."""
    errors: list[BaseException] = []
    for ns in names:
        try:
            delete(ns)
        except Exception as e:
            errors.append(e)
    if errors:
        raise errors[0]


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    # Ctrl-C during teardown would leave a namespace behind: hold SIGINT until it is done.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    # SIGTERM (`timeout`, service managers) kills without running any `finally`; while a pair
    # exists, turn it into SystemExit so the namespaces are still deleted.
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def netns_pair(prefix: str = "bpft", subnet: Subnet | None = None) -> Iterator[NetnsPair]:
    """Create two uniquely named namespaces joined by veth; always delete them on exit
    (also on exceptions, Ctrl-C and SIGTERM)."""
    a, b = unique_name(prefix), unique_name(prefix)
    with _sigterm_raises():
        try:
            yield _setup(a, b, subnet if subnet is not None else random_subnet())
        finally:
            with _sigint_deferred():
                delete_all((a, b))


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _family(addr: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET


def _echo(
    sock: socket.socket, family: int, addr: str, ident: int, seq: int, timeout: float
) -> bool:
    payload = b"bpfilter-testbed"
    if family == socket.AF_INET:
        header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
        cksum = checksum(header + payload)
        packet = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, cksum, ident, seq) + payload
    else:
        # The kernel computes the ICMPv6 checksum (it covers the pseudo-header) on raw sockets.
        packet = struct.pack("!BBHHH", ICMP6_ECHO_REQUEST, 0, 0, ident, seq) + payload
    try:
        sock.sendto(packet, (addr, 0))
    except OSError:  # no route, or dropped at LOCAL_OUT with an error (EPERM)
        return False
    want = ipaddress.ip_address(addr)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            break
        data, src = sock.recvfrom(65535)
        if ipaddress.ip_address(src[0].split("%")[0]) != want:
            continue
        if family == socket.AF_INET:
            data = data[(data[0] & 0x0F) * 4 :]  # raw IPv4 sockets include the IP header
            reply = ICMP_ECHO_REPLY
        else:
            reply = ICMP6_ECHO_REPLY
        if len(data) >= 8:
            kind, _, _, rid, rseq = struct.unpack("!BBHHH", data[:8])
            if (kind, rid, rseq) == (reply, ident, seq):
                return True
    return False


def ping(
    ns_from: str | None,
    addr: str,
    count: int = 1,
    timeout: float = 1.0,
    source: str | None = None,
) -> bool:
    """Send up to ``count`` ICMP echo requests from ``ns_from`` (from address ``source`` if
    given) to ``addr`` (IPv4 or IPv6), each waiting up to ``timeout`` seconds; True at the
    first reply (ping's rule: one answer is success), False when none came back.

    Raw sockets from this process, opened inside the namespace: no ping binary needed.
    """
    family = _family(addr)
    proto = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
    with netns.entered(ns_from):
        sock = socket.socket(family, socket.SOCK_RAW, proto)
    with sock:
        if source is not None:
            sock.bind((source, 0))
        ident = secrets.randbelow(0xFFFF) + 1
        return any(_echo(sock, family, addr, ident, seq, timeout) for seq in range(1, count + 1))


def udp_reaches(
    ns_from: str | None,
    ns_to: str | None,
    addr: str,
    port: int = 0,
    timeout: float = 1.0,
    payload: bytes = b"bpfilter-testbed",
    source: str | None = None,
) -> bool:
    """True when one UDP datagram sent from ``ns_from`` (from ``source`` if given) to
    ``addr``:``port`` arrives at a socket bound there in ``ns_to`` within ``timeout``
    (``port`` 0: any free port)."""
    family = _family(addr)
    with netns.entered(ns_to):
        rx = socket.socket(family, socket.SOCK_DGRAM)
    with rx:
        rx.bind((addr, port))
        dest = rx.getsockname()[:2]
        with netns.entered(ns_from):
            tx = socket.socket(family, socket.SOCK_DGRAM)
        with tx:
            if source is not None:
                tx.bind((source, 0))
            try:
                tx.sendto(payload, dest)
            except OSError:  # no route, or refused at LOCAL_OUT
                return False
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([rx], [], [], left)
                if not ready:
                    return False
                if rx.recv(65535) == payload:
                    return True
    return False
