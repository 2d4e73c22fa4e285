"""The REJECT responder: one process per network namespace that sends REJECT's replies.

A REJECT rule's program drops the packet and pushes a reject event into the ruleset's ring
buffer (codegen/reject); this process reads the rings of every table in force in its
namespace (pinned as ``<table>-g<N>-map-reject_events``, followed across generations) and
sends the reply iptables would send (bpfilter/reject_reply) from raw sockets opened inside the
namespace, so the reply crosses the OUTPUT hooks as the kernel's own does.

Lifecycle: every loading command calls ``sync`` after a commit; it starts the responder
(detached, its pid in /run/bpfilter/responder-<netns>.pid) when a REJECT ring is pinned and
none runs, and fails loudly when it cannot start one. `bpfilter flush` stops it; it also exits
by itself a while after the last REJECT ring is gone, or when its namespace is.

Kernel facts it relies on: IPPROTO_RAW sockets send the header as given, except that an id
of 0 becomes ip_select_ident()'s choice, which for a DF packet without a socket is 0 again
(nf_send_reset's id); an unbound raw ICMP socket lets the route pick the source address
(icmp_send's saddr 0); IPV6_AUTOFLOWLABEL=0 keeps a reset's flow label 0 (nf_reject_ip6hdr_put)
and IPV6_FREEBIND lets it carry the original destination as its source.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import ipaddress
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bpfilter import bpf, bpffs
from bpfilter import netns as netns_mod
from bpfilter import reject_reply as rr
from bpfilter.codegen import reject
from bpfilter.codegen.uapi import NfHook

RUN_DIR = Path("/run/bpfilter")
RING_SUFFIX = f"-map-{reject.RING}"
POLL = 0.2  # seconds between looks at the pins and the namespace
IDLE_EXIT = 10.0  # seconds without any REJECT ring pinned before the responder exits
START_TIMEOUT = 5.0
STOP_TIMEOUT = 2.0
SYSCTL_TTL = 1.0  # seconds a sysctl or address list read stays fresh

SOL_RAW = 255
ICMP_FILTER = 1
SOL_ICMPV6 = 58
ICMP6_FILTER = 1
IP_PKTINFO = 8
IP_TOS = 1
IP_MTU_DISCOVER = 10
IP_PMTUDISC_DONT = 0
IPV6_PKTINFO = 50
IPV6_TCLASS = 67
IPV6_AUTOFLOWLABEL = 70
IPV6_FREEBIND = 78
SO_MARK = 36
SO_ATTACH_FILTER = 26
BPF_RET_K = 0x06  # classic BPF "ret #k"


def _error(message: str) -> Exception:
    """A bpfilter.state.StateError, which the loading commands report (exit 4). Imported
    here only: the responder process itself stays clear of the compiler's import time."""
    from bpfilter import state  # noqa: PLC0415

    return state.StateError(message)


def _where(ns: str | None) -> str:
    return f"network namespace {ns!r}" if ns else "this network namespace"


def pid_path(ns: str | None) -> Path:
    return RUN_DIR / f"responder-{ns or bpffs.HOST}.pid"


def log_path(ns: str | None) -> Path:
    return RUN_DIR / f"responder-{ns or bpffs.HOST}.log"


def ring_pins(ns: str | None) -> list[Path]:
    """The pinned reject rings in ``ns``: of the tables in force (bpfilter.state) and of a
    ruleset loaded with bpfilter.loader.load (the demo's)."""
    loaded = {f"map_{reject.RING}4", f"map_{reject.RING}6"}
    return [p for p in bpffs.pins(ns) if p.name.endswith(RING_SUFFIX) or p.name in loaded]


def _argv(ns: str | None) -> list[str]:
    return [sys.executable, "-m", "bpfilter", "responder", *(["--netns", ns] if ns else [])]


def _inode(ns: str | None) -> int:
    try:
        return netns_mod.inode(ns) if ns is not None else 0
    except OSError:
        return -1  # the namespace is gone


def running(ns: str | None) -> int | None:
    """The pid of ``ns``'s responder when it is alive and serves the namespace now named
    ``ns`` (one deleted and created again under that name is another), else None."""
    try:
        pid, inode = (int(w) for w in pid_path(ns).read_text().split()[:2])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    want = [a.encode() for a in _argv(ns)[2:]]
    return pid if cmdline[2:2 + len(want)] == want and inode == _inode(ns) else None


def sync(ns: str | None) -> int | None:
    """After a commit: make sure the responder of ``ns`` runs when a table there REJECTs;
    returns its pid (None when no table REJECTs). Raises bpfilter.state.StateError when it
    cannot start: REJECT would silently act as DROP."""
    if not ring_pins(ns):
        return None
    pid = running(ns)
    return pid if pid is not None else start(ns)


def start(ns: str | None) -> int:
    """Start the responder of ``ns`` detached and wait until it serves."""
    RUN_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        pid_path(ns).unlink()
    log = open(log_path(ns), "ab")  # noqa: SIM115 - handed to the child
    try:
        child = subprocess.Popen(_argv(ns), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 start_new_session=True, close_fds=True)
    except OSError as e:
        raise _error(f"cannot start the REJECT responder for {_where(ns)}: {e}") from e
    finally:
        log.close()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if running(ns) == child.pid:
            return child.pid
        if child.poll() is not None:
            break
        time.sleep(0.02)
    if child.poll() is None:
        child.kill()
    child.wait()
    tail = ""
    with contextlib.suppress(OSError):
        lines = log_path(ns).read_text(errors="replace").strip().splitlines()
        tail = f": {lines[-1]}" if lines else ""
    raise _error(f"the REJECT responder for {_where(ns)} did not start (REJECT "
                         f"rules drop without replying){tail}; see {log_path(ns)}")


def stop(ns: str | None) -> bool:
    """Stop the responder of ``ns``; False when none ran."""
    pid = running(ns)
    if pid is None:
        with contextlib.suppress(FileNotFoundError):
            pid_path(ns).unlink()
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists() and \
            running(ns) == pid:
        time.sleep(0.02)
    if running(ns) == pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(FileNotFoundError):
        pid_path(ns).unlink()
    return True


@dataclass(frozen=True, slots=True)
class Status:
    """What `bpfilter status` shows of the responder."""

    needed: bool  # some table in force REJECTs
    pid: int | None  # None: not running
    lost: int = 0  # reject events a full ring dropped (those packets got no reply)

    def line(self) -> str:
        lost = f"; {self.lost} events lost to a full ring" if self.lost else ""
        if self.pid is not None:
            return f"REJECT responder: running, pid {self.pid}{lost}"
        if self.needed:
            return "REJECT responder: NOT RUNNING: REJECT rules drop without replying " \
                   f"(any bpfilter-restore starts it again){lost}"
        return "REJECT responder: not needed"


def status(ns: str | None) -> Status:
    drops = f"-map-{reject.DROPS}"
    lost = 0
    for p in bpffs.pins(ns):
        if p.name.endswith(drops):
            with contextlib.suppress(OSError, bpf.BpfError), \
                    bpf.map_from_fd(bpf.obj_get(str(p)), reject.DROPS) as m:
                lost += sum(struct.unpack("<Q", v)[0]
                            for v in m.lookup_percpu(struct.pack("<I", 0)) or [])
    return Status(bool(ring_pins(ns)), running(ns), lost)


# --- the process ------------------------------------------------------------------------------

class _Sysctls:
    """Sysctls of the namespace the process is in, re-read at most every SYSCTL_TTL."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[float, str]] = {}

    def get(self, name: str, default: str) -> str:
        now = time.monotonic()
        hit = self._cache.get(name)
        if hit is not None and now - hit[0] < SYSCTL_TTL:
            return hit[1]
        try:
            value = Path("/proc/sys", name.replace(".", "/")).read_text().strip()
        except OSError:
            value = default
        self._cache[name] = (now, value)
        return value

    def int(self, name: str, default: int) -> int:
        try:
            return int(self.get(name, str(default)))
        except ValueError:
            return default


def _local_addresses(family: int) -> frozenset[bytes]:
    """The addresses of the calling thread's namespace (an error reply to one of them is
    routed over loopback, which the kernel never rate limits)."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    out = set()
    with contextlib.suppress(OSError), netns_mod.iproute(None, "address") as ipr:
        for a in ipr.get_addr(family=af):
            addr = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
            if addr:
                out.add(ipaddress.ip_address(addr.split("%")[0]).packed)
    return frozenset(out)


class Responder:
    """Reads reject events and sends the replies; lives inside the target namespace."""

    def __init__(self, ns: str | None) -> None:
        self.ns = ns
        self.inode = _inode(ns)
        self.rings: dict[Path, tuple[bpf.Map, bpf.RingBuffer]] = {}
        self.sysctl = _Sysctls()
        self.bits = rr.SkbBits()  # from BTF in warm_up()
        self.limits = {4: rr.RateLimiter(frozenset(), 1000), 6: rr.RateLimiter(frozenset(), 1000)}
        self._local: dict[int, tuple[float, frozenset[bytes]]] = {}
        self._routes6: tuple[float, list[tuple[int, int]]] | None = None
        self._hoplimits: dict[bytes, tuple[float, int | None]] = {}
        self.sent = 0
        self.icmp4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self.icmp4.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("I", 0xFFFFFFFF))
        # The kernel's ICMP socket sends its errors without DF (IP_PMTUDISC_DONT).
        self.icmp4.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
        self.raw4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.icmp6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        self.icmp6.setsockopt(SOL_ICMPV6, ICMP6_FILTER, b"\xff" * 32)
        self.tcp6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP)
        # A raw TCP socket gets a copy of every TCP segment: a "ret #0" filter refuses them.
        drop_all = ctypes.create_string_buffer(struct.pack("HBBI", BPF_RET_K, 0, 0, 0))
        fprog = struct.pack("HL", 1, ctypes.addressof(drop_all))  # struct sock_fprog
        self.tcp6.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        self.tcp6.setsockopt(socket.IPPROTO_IPV6, IPV6_AUTOFLOWLABEL, 0)
        self.tcp6.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        self.tcp6.setsockopt(socket.IPPROTO_IPV6, IPV6_TCLASS, 0)

    def warm_up(self) -> None:
        """The slow parts of starting (BTF, pyroute2), done once the loader is told the
        responder is up: events wait in the rings meanwhile."""
        self.bits = _skb_bits()
        self.local(4)

    def close(self) -> None:
        for m, rb in self.rings.values():
            rb.close()
            m.close()
        self.rings.clear()
        for s in (self.icmp4, self.raw4, self.icmp6, self.tcp6):
            s.close()

    def refresh(self) -> None:
        """Follow the pinned rings: open new generations' rings, drain and close gone ones."""
        pins = set(ring_pins(self.ns))
        for p in list(self.rings):
            if p not in pins:
                m, rb = self.rings.pop(p)
                self.handle_all(rb)
                rb.close()
                m.close()
        for p in pins - set(self.rings):
            try:
                m = bpf.map_from_fd(bpf.obj_get(str(p)), reject.RING)
            except (OSError, bpf.BpfError):
                continue  # removed meanwhile
            self.rings[p] = (m, bpf.RingBuffer(m))

    def handle_all(self, rb: bpf.RingBuffer) -> None:
        for raw in rb.read():
            try:
                self.handle(rr.parse_event(raw, self.bits))
            except Exception as e:  # noqa: BLE001 - one bad event must not stop the replies
                print(f"bpfilter responder: reject event skipped: {e!r}", file=sys.stderr)

    def handle(self, o: rr.Original) -> None:
        if o.family == 4:
            inbound = None
            if self.sysctl.int("net.ipv4.icmp_errors_use_inbound_ifaddr", 0) and o.in_dev:
                inbound = _primary4(o.in_dev)
            # nf_send_reset: ip4_dst_hoplimit() of the original's route: a forwarded or
            # outgoing packet's route carries the fib route's metrics (a hoplimit set there
            # counts); a local delivery's input route carries none (checked on 6.18).
            ttl = self.sysctl.int("net.ipv4.ip_default_ttl", 64)
            if o.code == reject.TCP_RESET and o.hook != NfHook.LOCAL_IN and \
                    len(o.packet) >= rr.IPV4_HEADER:
                ttl = self.hoplimit4(o.packet[16:20]) or ttl
            reply = rr.reply4(o, default_ttl=ttl,
                              fwmark_reflect=bool(self.sysctl.int("net.ipv4.fwmark_reflect", 0)),
                              inbound_src=inbound)
        else:
            reply = rr.reply6(o, local=self.local(6),
                              fwmark_reflect=bool(self.sysctl.int("net.ipv6.fwmark_reflect", 0)))
        if reply is None or not self.allowed(reply):
            return
        try:
            self.send(reply)
            self.sent += 1
        except OSError as e:
            # As the kernel's reply, it may find no route or be dropped by OUTPUT (EPERM).
            if e.errno not in (1, 101, 113, 22):
                print(f"bpfilter responder: sending a reply: {e}", file=sys.stderr)

    def local(self, family: int) -> frozenset[bytes]:
        """The namespace's own addresses (re-read at most every SYSCTL_TTL)."""
        now = time.monotonic()
        hit = self._local.get(family)
        if hit is None or now - hit[0] >= SYSCTL_TTL:
            hit = self._local[family] = (now, _local_addresses(family))
        return hit[1]

    def allowed(self, reply: rr.Reply) -> bool:
        if reply.proto == socket.IPPROTO_TCP:
            return True  # resets are not rate limited
        lim = self.limits[reply.family]
        scale = 0
        if reply.family == 4:
            lim.mask = _mask_bits(self.sysctl.int("net.ipv4.icmp_ratemask", 0x1818))
            lim.timeout_ms = self.sysctl.int("net.ipv4.icmp_ratelimit", 1000)
            loopback = reply.dst[0] == 127 or reply.dst in self.local(4)
        else:
            lim.mask = _mask_list(self.sysctl.get("net.ipv6.icmp.ratemask", "0-1,3-127"))
            lim.timeout_ms = self.sysctl.int("net.ipv6.icmp.ratelimit", 1000)
            loopback = reply.dst in self.local(6)
            # icmpv6_xrlim_allow: a shorter route prefix shortens the peer timeout.
            plen = self.prefix_len6(reply.dst)
            scale = (128 - plen) >> 5 if plen < 128 else 0
        lim.per_sec = self.sysctl.int("net.ipv4.icmp_msgs_per_sec", 1000)
        lim.burst = self.sysctl.int("net.ipv4.icmp_msgs_burst", 50)
        return lim.allow(reply.payload[0], reply.dst, time.monotonic(), loopback=loopback,
                         scale=scale)

    def hoplimit4(self, dst: bytes) -> int | None:
        """The hoplimit metric of the IPv4 route to ``dst`` (None: not set)."""
        now = time.monotonic()
        hit = self._hoplimits.get(dst)
        if hit is None or now - hit[0] >= SYSCTL_TTL:
            if len(self._hoplimits) > 4096:
                self._hoplimits.clear()
            hit = self._hoplimits[dst] = (now, _route_hoplimit(dst))
        return hit[1]

    def prefix_len6(self, dst: bytes) -> int:
        """The prefix length of the main table's IPv6 route to ``dst`` (0: none)."""
        now = time.monotonic()
        if self._routes6 is None or now - self._routes6[0] >= SYSCTL_TTL:
            self._routes6 = (now, _routes6())
        addr = int.from_bytes(dst, "big")
        best = 0
        for net, plen in self._routes6[1]:
            if plen >= best and addr >> (128 - plen) == net >> (128 - plen):
                best = plen
        return best

    def send(self, r: rr.Reply) -> None:
        if r.family == 4 and r.proto == socket.IPPROTO_TCP:
            self.raw4.setsockopt(socket.SOL_SOCKET, SO_MARK, r.mark)
            assert r.ttl is not None
            self.raw4.sendto(r.packet(ttl=r.ttl), (str(ipaddress.IPv4Address(r.dst)), 0))
            return
        if r.family == 4:
            self.icmp4.setsockopt(socket.SOL_SOCKET, SO_MARK, r.mark)
            cmsg = [(socket.IPPROTO_IP, IP_TOS, struct.pack("i", r.tos))]
            if r.src is not None:
                cmsg.append((socket.IPPROTO_IP, IP_PKTINFO, struct.pack("i4s4s", 0, r.src,
                                                                        bytes(4))))
            self.icmp4.sendmsg([r.payload], cmsg, 0, (str(ipaddress.IPv4Address(r.dst)), 0))
            return
        sock = self.tcp6 if r.proto == socket.IPPROTO_TCP else self.icmp6
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, r.mark)
        ifindex = 0
        if r.oif:
            with contextlib.suppress(OSError):
                ifindex = socket.if_nametoindex(r.oif)
        payload = r.payload
        if r.proto == socket.IPPROTO_ICMPV6:
            payload = payload[:2] + b"\0\0" + payload[4:]  # the kernel sums ICMPv6 itself
        cmsg = [(socket.IPPROTO_IPV6, IPV6_PKTINFO, struct.pack("16si", r.src or bytes(16),
                                                                 ifindex)),
                (socket.IPPROTO_IPV6, IPV6_TCLASS, struct.pack("i", r.tos))]
        sock.sendmsg([payload], cmsg, 0, (str(ipaddress.IPv6Address(r.dst)), 0, 0, ifindex))

    def serve(self, stop: list[bool]) -> None:
        """Until ``stop[0]``: poll the rings, reply, follow the pins."""
        idle_since = time.monotonic()
        next_refresh = 0.0
        while not stop[0]:
            now = time.monotonic()
            if now >= next_refresh:
                next_refresh = now + POLL
                if self.ns is not None and (not netns_mod.exists(self.ns)
                                            or _inode(self.ns) != self.inode):
                    return  # the namespace is gone (or another took its name)
                self.refresh()
                if self.rings:
                    idle_since = now
                elif now - idle_since > IDLE_EXIT:
                    return
            poller = select.poll()
            for m, _ in self.rings.values():
                poller.register(m.fd, select.POLLIN)
            try:
                poller.poll(int(POLL * 1000))
            except InterruptedError:
                continue
            for _, rb in list(self.rings.values()):
                self.handle_all(rb)


@functools.cache
def _mask_bits(value: int) -> frozenset[int]:
    """net.ipv4.icmp_ratemask: bit N set limits ICMP type N."""
    return frozenset(t for t in range(32) if value >> t & 1)


@functools.cache
def _mask_list(text: str) -> frozenset[int]:
    return rr.parse_bitmap(text)


RT_TABLE_MAIN = 254


def _route_hoplimit(dst: bytes) -> int | None:
    """RTAX_HOPLIMIT of the route the kernel picks for ``dst`` (a local address: its local
    route), or None."""
    with contextlib.suppress(OSError, IndexError), netns_mod.iproute(None, "route") as ipr:
        metrics = ipr.route("get", dst=str(ipaddress.IPv4Address(dst)))[0].get_attr(
            "RTA_METRICS")
        value = metrics.get_attr("RTAX_HOPLIMIT") if metrics else None
        return int(value) if value else None
    return None


def _routes6() -> list[tuple[int, int]]:
    """(network as an integer, prefix length) of the main table's IPv6 routes."""
    out = []
    with contextlib.suppress(OSError), netns_mod.iproute(None, "route") as ipr:
        for r in ipr.get_routes(family=socket.AF_INET6):
            if (r.get_attr("RTA_TABLE") or r["table"]) != RT_TABLE_MAIN:
                continue
            dst = r.get_attr("RTA_DST")
            net = int(ipaddress.IPv6Address(dst)) if dst else 0
            out.append((net, int(r["dst_len"])))
    return out


def _primary4(dev: str) -> bytes | None:
    """inet_select_addr(dev, 0, RT_SCOPE_LINK): the device's first address."""
    try:
        with netns_mod.iproute(None, "address") as ipr:
            for a in ipr.get_addr(family=socket.AF_INET, index=socket.if_nametoindex(dev)):
                addr = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
                if addr:
                    return ipaddress.IPv4Address(addr).packed
    except OSError:
        pass
    return None


def _skb_bits() -> rr.SkbBits:
    """Bit positions of pkt_type, ip_summed and csum_valid in the event's skb word."""
    from bpfilter.btf import Btf  # noqa: PLC0415 - the BTF parse is only the responder's

    btf = Btf.load()
    base = btf.member("sk_buff", "pkt_type").bit_offset // 8 * 8
    return rr.SkbBits(btf.member("sk_buff", "pkt_type").bit_offset - base,
                      btf.member("sk_buff", "ip_summed").bit_offset - base,
                      btf.member("sk_buff", "csum_valid").bit_offset - base)


def main(ns: str | None) -> int:
    """The responder process: serve ``ns`` until told to stop or nothing is left to do."""
    stop = [False]

    def on_term(signum: int, frame: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    me = pid_path(ns)
    with netns_mod.entered(ns):
        responder = Responder(ns)
        try:
            RUN_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = me.with_suffix(f".{os.getpid()}")
            tmp.write_text(f"{os.getpid()} {responder.inode}\n")
            tmp.replace(me)  # ready: the sockets are open
            responder.warm_up()
            responder.serve(stop)
        finally:
            responder.close()
            with contextlib.suppress(OSError, ValueError, IndexError):
                # Ours unless a responder for a new namespace of this name took it over.
                if int(me.read_text().split()[0]) == os.getpid():
                    me.unlink()
                    if log_path(ns).stat().st_size == 0:
                        log_path(ns).unlink()  # nothing to tell
    return 0
