"""Real traffic through attached programs: netfilter, XDP and TC drop and pass what they should."""

from __future__ import annotations

import os
import socket

import pytest

from bpfilter import bpf, bpffs, testbed
from bpfilter.attach_netfilter import NetfilterOptions, attach_netfilter
from bpfilter.attach_tc import TcDirection, TcOptions, attach_tc, attach_tc_netlink
from bpfilter.attach_xdp import XdpOptions, attach_xdp, attach_xdp_netlink
from bpfilter.codegen.uapi import (
    NfHook,
    NfPriority,
    NfProto,
    NfVerdict,
    ProgType,
    TcAction,
    XdpAction,
)

FAMILIES = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
KINDS = ("netfilter", "xdp", "tc")
PROG_TYPE = {"netfilter": ProgType.NETFILTER, "xdp": ProgType.XDP, "tc": ProgType.SCHED_CLS}
DROP = {"netfilter": NfVerdict.DROP, "xdp": XdpAction.DROP, "tc": TcAction.SHOT}
PASS = {"netfilter": NfVerdict.ACCEPT, "xdp": XdpAction.PASS, "tc": TcAction.OK}
NEGATIVE_WAIT = 0.5  # seconds a dropped echo is waited for; replies on veth take microseconds


def reaches(pair: testbed.NetnsPair, family: int, source: str | None = None) -> bool:
    """Does a ping from namespace a (optionally from ``source``) to b get an answer?"""
    dest = pair.address(pair.b, family)
    return testbed.ping(pair.a, dest, count=3, timeout=NEGATIVE_WAIT, source=source)


def blocked(pair: testbed.NetnsPair, family: int, source: str | None = None) -> bool:
    """True when a ping from a to b gets no answer (one echo, short wait)."""
    dest = pair.address(pair.b, family)
    return not testbed.ping(pair.a, dest, count=1, timeout=NEGATIVE_WAIT, source=source)


def attach(kind: str, prog: bpf.Prog, pair: testbed.NetnsPair, family: int) -> bpf.Link:
    """Attach on the receiving side (namespace b): LOCAL_IN at the filter priority, XDP on
    b's veth, or TC ingress of b's veth; always as a BPF link on this kernel."""
    if kind == "netfilter":
        pf = NfProto.IPV4 if family == socket.AF_INET else NfProto.IPV6
        options = NetfilterOptions(pf, NfHook.LOCAL_IN, NfPriority.FILTER)
        return attach_netfilter(prog, options, netns=pair.b)
    if kind == "xdp":
        xdp = attach_xdp(prog, pair.if_b, XdpOptions(fallback=False), netns=pair.b)
        assert isinstance(xdp, bpf.Link)
        return xdp
    tc = attach_tc(prog, pair.if_b, TcOptions(fallback=False), netns=pair.b)
    assert isinstance(tc, bpf.Link)
    return tc


@pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_drop_program_drops_until_link_closed(kind, family, netns_pair, programs, load):
    assert reaches(netns_pair, family)
    link = attach(kind, load(programs.const(PROG_TYPE[kind], DROP[kind], "drop")), netns_pair,
                  family)
    try:
        assert blocked(netns_pair, family)
        assert not testbed.udp_reaches(
            netns_pair.a, netns_pair.b, netns_pair.address(netns_pair.b, family),
            timeout=NEGATIVE_WAIT,
        )
    finally:
        link.close()
    assert reaches(netns_pair, family)


@pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_accept_program_passes(kind, family, netns_pair, programs, load):
    with attach(kind, load(programs.const(PROG_TYPE[kind], PASS[kind], "accept")), netns_pair,
                family):
        assert reaches(netns_pair, family)
        assert testbed.udp_reaches(
            netns_pair.a, netns_pair.b, netns_pair.address(netns_pair.b, family)
        )


def _source_program(kind: str, programs, addr: str):
    if kind == "netfilter":
        return programs.nf_drop_source(addr)
    if kind == "xdp":
        return programs.xdp_drop_source(addr)
    return programs.tc_drop_source(addr)


@pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_source_address_program_drops_only_that_source(kind, family, netns_pair, programs, load):
    pair = netns_pair
    banned = pair.address(pair.a, family)
    other = pair.subnet.ipv4(3) if family == socket.AF_INET else pair.subnet.ipv6(3)
    pair.add_address(pair.a, other)
    dest = pair.address(pair.b, family)
    with attach(kind, load(_source_program(kind, programs, banned)), pair, family):
        assert blocked(pair, family, source=banned)
        assert reaches(pair, family, source=other)
        assert not testbed.udp_reaches(pair.a, pair.b, dest, timeout=NEGATIVE_WAIT,
                                       source=banned)
        assert testbed.udp_reaches(pair.a, pair.b, dest, source=other)
    assert reaches(pair, family, source=banned)


@pytest.mark.parametrize(
    ("hook", "side"),
    [
        (NfHook.PRE_ROUTING, "b"),
        (NfHook.LOCAL_IN, "b"),
        (NfHook.LOCAL_OUT, "a"),
        (NfHook.POST_ROUTING, "a"),
    ],
    ids=lambda v: v.name if isinstance(v, NfHook) else v,
)
@pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES.keys())
def test_netfilter_drop_at_each_hook_on_the_path(hook, side, family, netns_pair, programs, load):
    # FORWARD is not on the path between two directly connected namespaces.
    pf = NfProto.IPV4 if family == socket.AF_INET else NfProto.IPV6
    prog = load(programs.const(ProgType.NETFILTER, NfVerdict.DROP, "drop"))
    ns = netns_pair.a if side == "a" else netns_pair.b
    with attach_netfilter(prog, NetfilterOptions(pf, hook, NfPriority.FILTER), netns=ns):
        assert blocked(netns_pair, family)
    assert reaches(netns_pair, family)


@pytest.mark.parametrize("kind", KINDS)
def test_link_detach_restores_traffic_while_fd_open(kind, netns_pair, programs, load):
    family = socket.AF_INET
    with attach(kind, load(programs.const(PROG_TYPE[kind], DROP[kind], "drop")), netns_pair,
                family) as link:
        assert blocked(netns_pair, family)
        bpf.link_detach(link)
        assert reaches(netns_pair, family)


@pytest.mark.parametrize("kind", KINDS)
def test_pinned_link_outlives_its_fd_until_unpinned(kind, netns_pair, programs, load):
    family = socket.AF_INET
    link = attach(kind, load(programs.const(PROG_TYPE[kind], DROP[kind], "drop")), netns_pair,
                  family)
    path = bpffs.pin(link, f"{kind}_link", netns_pair.b)
    link.close()
    assert blocked(netns_pair, family)  # only the pin holds the link now

    fd = bpffs.get(f"{kind}_link", netns_pair.b)
    try:
        assert bpf.link_info(fd).id > 0
        assert bpffs.unpin(path)
        assert blocked(netns_pair, family)  # the fd from obj_get still holds it
    finally:
        os.close(fd)
    assert reaches(netns_pair, family)


def test_xdp_netlink_fallback_drops_then_detaches(netns_pair, programs, load):
    prog = load(programs.const(ProgType.XDP, XdpAction.DROP, "drop"))
    handle = attach_xdp_netlink(prog, netns_pair.if_b, netns=netns_pair.b)
    try:
        assert handle.attached_prog_id() == prog.id
        prog.close()  # the interface holds the program, not our fd
        assert blocked(netns_pair, socket.AF_INET)
        assert blocked(netns_pair, socket.AF_INET6)
    finally:
        handle.detach()
    assert handle.attached_prog_id() == 0
    assert reaches(netns_pair, socket.AF_INET)


@pytest.mark.parametrize("direction", TcDirection, ids=lambda d: d.value)
def test_tc_clsact_fallback_drops_then_detaches(direction, netns_pair, programs, load):
    prog = load(programs.const(ProgType.SCHED_CLS, TcAction.SHOT, "drop"))
    # Ingress of b's veth drops the echo requests; egress of b's veth drops the replies.
    handle = attach_tc_netlink(prog, netns_pair.if_b, TcOptions(direction), netns=netns_pair.b)
    try:
        assert handle.attached()
        assert handle.created_qdisc
        assert blocked(netns_pair, socket.AF_INET)
    finally:
        handle.detach()
    assert not handle.attached()
    assert "clsact" not in netns_pair.run(netns_pair.b, ["tc", "qdisc", "show"]).stdout
    assert reaches(netns_pair, socket.AF_INET)


def test_tcx_egress_link_drops_replies(netns_pair, programs, load):
    prog = load(programs.const(ProgType.SCHED_CLS, TcAction.SHOT, "drop"))
    options = TcOptions(TcDirection.EGRESS, fallback=False)
    with attach_tc(prog, netns_pair.if_b, options, netns=netns_pair.b):
        assert blocked(netns_pair, socket.AF_INET)
    assert reaches(netns_pair, socket.AF_INET)
