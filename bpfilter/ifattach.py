"""Rulesets attached to an interface as XDP or TC programs: attach, replace in place, list,
remove. Kept in bpffs next to bpfilter's other pins (bpfilter.state), one group per
(hook, interface, family):

- ``if:<hook>:<dev>:<ip|ip6>:link``: the XDP or tcx link; it holds the program attached
  after the command exits, and unpinning it (``bpfilter flush``) detaches it;
- ``if:<hook>:<dev>:<ip|ip6>:text``: the canonical iptables-save text it was compiled from,
  behind a ``# bpfilter attach`` line naming the chain (state.store_text);
- ``if:<hook>:<dev>:<ip|ip6>:map-<name>``: its maps (``counters`` and lookups).

Interface names cannot hold ``:`` or ``/``, so the names split unambiguously. Attaching over
an existing group swaps the program with BPF_LINK_UPDATE (XDP and tcx links support it), so
no packet passes unfiltered in between; rule counters of rules that stay carry over.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import re
import socket
import struct
from dataclasses import dataclass, replace

from bpfilter import bpf, bpffs, loader, state
from bpfilter import netns as netns_mod
from bpfilter.attach_tc import TcDirection, TcOptions, attach_tc
from bpfilter.attach_xdp import XdpOptions, attach_xdp
from bpfilter.codegen.compiler import COUNTERS, CompiledRuleset, compile_ruleset
from bpfilter.codegen.flavor_packet import IfTarget
from bpfilter.codegen.uapi import ARPHRD_ETHER, IFNAMSIZ, SIOCGIFHWADDR, IfHook
from bpfilter.grammar.iptables import parse_restore
from bpfilter.ir.iptables_save import to_iptables_save
from bpfilter.ir.model import Ruleset, Table

HOOK_NAMES = {IfHook.XDP: "xdp", IfHook.TC_INGRESS: "tc-ingress", IfHook.TC_EGRESS: "tc-egress"}
BY_NAME = {v: k for k, v in HOOK_NAMES.items()}
FAMILY_NAMES = {4: "ip", 6: "ip6"}
_PIN = re.compile(r"^if:(xdp|tc-ingress|tc-egress):([^:/]+):(ip6?):link$")
_HEADER = re.compile(r"^# bpfilter attach: chain (\S+)$", re.M)


class AttachError(RuntimeError):
    """The ruleset cannot be attached there (no such device, not Ethernet, XDP taken)."""


@dataclass(frozen=True, slots=True)
class Key:
    """One attached ruleset: hook, interface and IP version."""

    hook: IfHook
    dev: str
    family: int

    def pin(self, what: str) -> str:
        return f"if:{HOOK_NAMES[self.hook]}:{self.dev}:{FAMILY_NAMES[self.family]}:{what}"

    def __str__(self) -> str:
        return f"{HOOK_NAMES[self.hook]} {self.dev} {FAMILY_NAMES[self.family]}"


@dataclass(frozen=True, slots=True)
class Attached:
    """What ``bpfilter status`` shows of one attached ruleset."""

    hook: str
    dev: str
    family: int
    chain: str
    rules: int
    link_id: int
    prog_id: int
    insns: int
    maps: tuple[tuple[str, int, int], ...]  # (name, id, max_entries)


def device_type(dev: str, netns: str | None) -> int:
    """ARPHRD_* type of interface ``dev`` in ``netns`` (SIOCGIFHWADDR's sa_family)."""
    if not 0 < len(dev.encode()) < IFNAMSIZ:
        raise AttachError(f"invalid interface name {dev!r}")
    with netns_mod.entered(netns), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            ifreq = fcntl.ioctl(s, SIOCGIFHWADDR, struct.pack("16s16x", dev.encode()))
        except OSError as e:
            where = f"network namespace {netns!r}" if netns else "this network namespace"
            if e.errno == errno.ENODEV:
                raise AttachError(f"no interface {dev!r} in {where}") from None
            raise
    return int(struct.unpack_from("H", ifreq, IFNAMSIZ)[0])


def compile_for(text: str, family: int, hook: IfHook, dev: str | None, chain: str,
                filename: str = "<stdin>") -> tuple[Ruleset, CompiledRuleset]:
    """Parse iptables-save ``text`` and compile its filter chain ``chain`` for ``hook``."""
    ruleset = parse_restore(text, family=family, filename=filename)
    return ruleset, compile_ruleset(ruleset, family, target=IfTarget(hook, chain, dev))


def attach(ruleset: Ruleset, compiled: CompiledRuleset, dev: str,
           netns: str | None) -> tuple[Key, bool]:
    """Load ``compiled`` (from compile_for) and attach it to ``dev``, replacing what bpfilter
    attached there for the same hook and family; returns the key and whether it replaced."""
    (program,) = compiled.programs
    target = program.target
    assert target is not None and target.ifname == dev
    key = Key(target.hook, dev, compiled.family)
    if device_type(dev, netns) != ARPHRD_ETHER:
        raise AttachError(f"{dev} is not an Ethernet device: bpfilter's XDP and TC programs "
                          "read an Ethernet header")
    state.drop_stale(netns)
    state.claim(netns)
    if key.hook is IfHook.XDP:
        other = Key(key.hook, dev, 10 - key.family)  # 4 <-> 6
        if _exists(other, netns):
            raise AttachError(f"{dev} already runs bpfilter's IPv{other.family} XDP program and "
                              "an interface takes one XDP program; use --tc-ingress for "
                              f"IPv{key.family}")
    text = f"# bpfilter attach: chain {target.chain}\n{to_iptables_save(ruleset)}"
    old = _live_table(key, netns)
    old_counts = _counters(key, netns) if old is not None else {}
    programs = loader.load_programs(compiled, netns=netns)
    try:
        prog = programs.progs[program]
        table = ruleset.table("filter")
        if old is not None and table is not None:
            carry = state.carried_counters(old, table, old_counts)
            if carry:
                state._seed_counters(programs, carry)
        if compiled.needs_conntrack:  # the entries TC egress reads come from conntrack
            state.ensure_conntrack(netns)
        replaced = _swap(key, prog, netns)
        for name, m in programs.maps.items():
            bpffs.pin(m, key.pin(f"map-{name}"), netns, replace=True)
        with state.store_text(text) as tm:
            bpffs.pin(tm, key.pin("text"), netns, replace=True)
        for p in bpffs.pins(netns):  # maps of the replaced program the new one lacks
            name = p.name
            if name.startswith(key.pin("map-")) and name[len(key.pin("map-")):] not in \
                    programs.maps:
                bpffs.unpin(p)
    finally:
        programs.close()  # the link and the pins hold what must live on
    return key, replaced


def _swap(key: Key, prog: bpf.Prog, netns: str | None) -> bool:
    """Attach ``prog``: BPF_LINK_UPDATE of the pinned link, else a new pinned link."""
    try:
        fd = bpffs.get(key.pin("link"), netns)
    except bpffs.BpffsError:
        fd = None
    if fd is not None:
        with bpf.link_from_fd(fd) as pinned:
            try:
                bpf.link_update(pinned, prog)
                return True
            except bpf.BpfError as e:
                # ENOLINK: the link went defunct (its interface was deleted); attach anew.
                if e.errno != errno.ENOLINK:
                    raise
        bpffs.unpin(bpffs.pin_path(key.pin("link"), netns))
    made: object
    if key.hook is IfHook.XDP:
        made = attach_xdp(prog, key.dev, XdpOptions(fallback=False), netns=netns)
    else:
        direction = TcDirection.INGRESS if key.hook is IfHook.TC_INGRESS else TcDirection.EGRESS
        made = attach_tc(prog, key.dev, TcOptions(direction, fallback=False), netns=netns)
    assert isinstance(made, bpf.Link)  # no netlink fallback was allowed
    with made:
        bpffs.pin(made, key.pin("link"), netns, replace=True)
    return False


def _exists(key: Key, netns: str | None) -> bool:
    return bpffs.pin_path(key.pin("link"), netns).exists()


def keys(netns: str | None) -> list[Key]:
    """Every ruleset bpfilter attached to an interface in ``netns``."""
    out = []
    for p in bpffs.pins(netns):
        m = _PIN.match(p.name)
        if m:
            out.append(Key(BY_NAME[m.group(1)], m.group(2), 4 if m.group(3) == "ip" else 6))
    return sorted(out, key=lambda k: (k.dev, k.hook, k.family))


def text(key: Key, netns: str | None) -> str | None:
    """The stored text of ``key`` (with its ``# bpfilter attach`` line), None if missing."""
    try:
        fd = bpffs.get(key.pin("text"), netns)
    except bpffs.BpffsError:
        return None
    with bpf.map_from_fd(fd, "bpfilter_text") as m:
        return state.load_text(m)


def _live_table(key: Key, netns: str | None) -> Table | None:
    t = text(key, netns)
    if t is None:
        return None
    return parse_restore(t, family=key.family).table("filter")


def _chain(stored: str) -> str:
    m = _HEADER.search(stored)
    return m.group(1) if m else "?"


def _counters(key: Key, netns: str | None) -> dict[loader.CounterKey, tuple[int, int]]:
    stored = text(key, netns)
    if stored is None:
        return {}
    try:
        fd = bpffs.get(key.pin(f"map-{COUNTERS}"), netns)
    except bpffs.BpffsError:
        return {}
    _, compiled = compile_for(stored, key.family, key.hook, key.dev, _chain(stored))
    with bpf.map_from_fd(fd, COUNTERS) as m:
        return loader.read_counters(compiled, m)


def counters(key: Key, netns: str | None) -> dict[loader.CounterKey, tuple[int, int]]:
    """(table, chain, position) -> (packets, bytes) of an attached ruleset."""
    return _counters(key, netns)


def saved(key: Key, netns: str | None) -> str:
    """The attached ruleset as ``iptables-save -c`` prints it: the filter table with the live
    counters of the chain it runs and the user chains (others stay 0)."""
    stored = text(key, netns)
    if stored is None:
        return ""
    table = parse_restore(stored, family=key.family).table("filter")
    if table is None:
        return ""
    counts = _counters(key, netns)
    chains = []
    for c in table.chains:
        rules = tuple(replace(r, counters=counts.get(("filter", c.name, i), (0, 0)))
                      for i, r in enumerate(c.rules, 1))
        policy = counts.get(("filter", c.name, 0), (0, 0)) if c.is_base else None
        chains.append(replace(c, rules=rules, counters=policy))
    live = replace(table, chains=tuple(chains))
    return (f"# bpfilter attach: {key} chain {_chain(stored)}\n"
            + to_iptables_save(Ruleset((live,)), counters=True))


def remove(key: Key, netns: str | None) -> None:
    """Detach ``key``'s program (BPF_LINK_DETACH, so it stops even if something else still
    holds the link) and remove its pins."""
    with contextlib.suppress(bpffs.BpffsError, bpf.BpfError), \
            bpf.link_from_fd(bpffs.get(key.pin("link"), netns)) as link:
        bpf.link_detach(link)
    head = key.pin("")
    for p in bpffs.pins(netns):
        if p.name.startswith(head):
            bpffs.unpin(p)


def remove_all(netns: str | None) -> list[Key]:
    """Detach every ruleset bpfilter attached to an interface in ``netns``."""
    found = keys(netns)
    for key in found:
        remove(key, netns)
    return found


def status(netns: str | None) -> list[Attached]:
    """What is attached in ``netns``, for ``bpfilter status``."""
    out: list[Attached] = []
    if state.stale(netns):
        return out
    for key in keys(netns):
        stored = text(key, netns) or ""
        table = parse_restore(stored, family=key.family).table("filter") if stored else None
        rules = sum(len(c.rules) for c in table.chains) if table is not None else 0
        with bpf.link_from_fd(bpffs.get(key.pin("link"), netns)) as link:
            li = link.info()
        with bpf.prog_get_fd_by_id(li.prog_id) as prog:
            pi = prog.info()
        maps = []
        head = key.pin("map-")
        for p in bpffs.pins(netns):
            if p.name.startswith(head):
                with bpf.map_from_fd(bpf.obj_get(str(p))) as m:
                    mi = m.info()
                maps.append((p.name[len(head):], mi.id, mi.max_entries))
        out.append(Attached(HOOK_NAMES[key.hook], key.dev, key.family, _chain(stored), rules,
                            li.id, li.prog_id, pi.xlated_insns, tuple(maps)))
    return out
