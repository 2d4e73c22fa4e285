"""Attachment modules against the kernel: options, type checks, link info, fallbacks."""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator

import pytest

from bpfilter import attach_netfilter, attach_tc, attach_xdp, bpf, testbed
from bpfilter.attach_netfilter import NetfilterOptions
from bpfilter.attach_tc import TcDirection, TcNetlinkAttachment, TcOptions
from bpfilter.attach_xdp import XdpMode, XdpNetlinkAttachment, XdpOptions
from bpfilter.codegen import asm
from bpfilter.codegen.insn import R0
from bpfilter.codegen.link import link
from bpfilter.codegen.spec import ProgramSpec
from bpfilter.codegen.uapi import (
    NETFILTER_IP_DEFRAG,
    AttachType,
    LinkType,
    NfHook,
    NfPriority,
    NfProto,
    ProgType,
)

ATTACH_TYPE = {ProgType.NETFILTER: AttachType.NETFILTER, ProgType.XDP: AttachType.XDP}


@pytest.fixture
def pair() -> Iterator[testbed.NetnsPair]:
    with testbed.netns_pair() as p:
        yield p


@pytest.fixture
def progs() -> Iterator[dict[ProgType, bpf.Prog]]:
    """One trivial (pass-everything) program of each attachable type."""
    verdict = {ProgType.NETFILTER: 1, ProgType.XDP: 2, ProgType.SCHED_CLS: 0}
    loaded = {}
    for t, v in verdict.items():
        code = link([asm.mov64(R0, v), asm.exit_()]).code
        spec = ProgramSpec("bpft_pass", t, code, expected_attach_type=ATTACH_TYPE.get(t))
        loaded[t] = bpf.prog_load(spec)
    yield loaded
    for p in loaded.values():
        p.close()


def _forbid(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    def called(*_a: object, **_k: object) -> None:
        pytest.fail("the attach syscall was reached")

    for name in names:
        monkeypatch.setattr(bpf, name, called)


# --- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prio", [NfPriority.FIRST, NfPriority.LAST, -(2**31) - 1, 2**31])
def test_netfilter_options_refuse_reserved_priorities(prio):
    with pytest.raises(ValueError, match="NF_IP_PRI_FIRST and NF_IP_PRI_LAST"):
        NetfilterOptions(NfProto.IPV4, NfHook.LOCAL_IN, prio)


def test_netfilter_options_defrag_needs_priority_above_defrag():
    with pytest.raises(ValueError, match="CONNTRACK_DEFRAG"):
        NetfilterOptions(NfProto.IPV4, NfHook.PRE_ROUTING, -400, defrag=True)
    opts = NetfilterOptions(NfProto.IPV6, NfHook.PRE_ROUTING, -399, defrag=True)
    assert opts.flags == NETFILTER_IP_DEFRAG


def test_netfilter_options_family_and_hook():
    with pytest.raises(ValueError, match="NFPROTO_IPV4 or NFPROTO_IPV6"):
        NetfilterOptions(NfProto.INET, NfHook.LOCAL_IN, 0)
    with pytest.raises(ValueError, match="netfilter link"):
        NetfilterOptions(NfProto.IPV4, 5, 0)
    opts = NetfilterOptions(2, 1, 0)
    assert (opts.pf, opts.hook) == (NfProto.IPV4, NfHook.LOCAL_IN)


# --- wrong program types are refused before any syscall --------------------------------------


def test_wrong_program_type_refused_before_syscall(pair, progs, monkeypatch):
    _forbid(monkeypatch, "link_create_netfilter", "link_create_xdp", "link_create_tcx")
    nf = NetfilterOptions(NfProto.IPV4, NfHook.LOCAL_IN, 0)
    with pytest.raises(TypeError, match="needs a program of type NETFILTER, not XDP"):
        attach_netfilter.attach_netfilter(progs[ProgType.XDP], nf, pair.b)
    with pytest.raises(TypeError, match="needs a program of type XDP, not SCHED_CLS"):
        attach_xdp.attach_xdp(progs[ProgType.SCHED_CLS], pair.if_b, netns=pair.b)
    with pytest.raises(TypeError, match="needs a program of type XDP, not NETFILTER"):
        attach_xdp.attach_xdp_netlink(progs[ProgType.NETFILTER], pair.if_b, netns=pair.b)
    with pytest.raises(TypeError, match="needs a program of type SCHED_CLS, not XDP"):
        attach_tc.attach_tc(progs[ProgType.XDP], pair.if_b, netns=pair.b)
    with pytest.raises(TypeError, match="needs a program of type SCHED_CLS, not NETFILTER"):
        attach_tc.attach_tc_netlink(progs[ProgType.NETFILTER], pair.if_b, netns=pair.b)
    # Nothing was attached: no clsact qdisc, no XDP program.
    shown = pair.run(pair.b, ["ip", "-d", "link", "show", pair.if_b]).stdout
    assert "xdp" not in shown
    assert "clsact" not in pair.run(pair.b, ["tc", "qdisc", "show"]).stdout


# --- netfilter -------------------------------------------------------------------------------


@pytest.mark.parametrize("pf", [NfProto.IPV4, NfProto.IPV6], ids=["ipv4", "ipv6"])
def test_netfilter_link_info_every_hook(pair, progs, pf):
    prog = progs[ProgType.NETFILTER]
    links = []
    try:
        for i, hook in enumerate(NfHook):
            opts = NetfilterOptions(pf, hook, 10 + i, defrag=hook == NfHook.PRE_ROUTING)
            links.append(attach_netfilter.attach_netfilter(prog, opts, pair.b))
            info = links[-1].info()
            assert info.type == LinkType.NETFILTER
            assert info.prog_id == prog.id
            assert (info.pf, info.hooknum, info.priority) == (pf, hook, 10 + i)
            assert info.nf_flags == opts.flags
    finally:
        for lk in links:
            lk.close()


def test_netfilter_duplicate_priority_is_busy(pair, progs):
    prog = progs[ProgType.NETFILTER]
    opts = NetfilterOptions(NfProto.IPV4, NfHook.LOCAL_IN, NfPriority.FILTER)
    with attach_netfilter.attach_netfilter(prog, opts, pair.b):
        with pytest.raises(bpf.BpfError, match="already taken.*choose another") as exc:
            attach_netfilter.attach_netfilter(prog, opts, pair.b)
        assert exc.value.errno == errno.EBUSY
        # Same priority in another namespace or family is a different slot.
        with attach_netfilter.attach_netfilter(prog, opts, pair.a):
            pass
        v6 = NetfilterOptions(NfProto.IPV6, NfHook.LOCAL_IN, NfPriority.FILTER)
        with attach_netfilter.attach_netfilter(prog, v6, pair.b):
            pass


def test_netfilter_priority_of_an_iptables_chain_is_busy(pair, progs):
    if pair.run(pair.b, ["iptables-legacy", "-L", "INPUT"], check=False).returncode != 0:
        pytest.skip("iptables-legacy not installed")
    # Only the throwaway namespace's filter table is touched.
    pair.run(pair.b, ["iptables-legacy", "-A", "INPUT", "-s", pair.subnet.ipv4(99), "-j", "DROP"])
    prog = progs[ProgType.NETFILTER]
    opts = NetfilterOptions(NfProto.IPV4, NfHook.LOCAL_IN, NfPriority.FILTER)
    with pytest.raises(bpf.BpfError, match="iptables/nftables chain") as exc:
        attach_netfilter.attach_netfilter(prog, opts, pair.b)
    assert exc.value.errno == errno.EBUSY
    beside = NetfilterOptions(NfProto.IPV4, NfHook.LOCAL_IN, NfPriority.FILTER - 1)
    with attach_netfilter.attach_netfilter(prog, beside, pair.b) as lk:
        assert lk.info().priority == -1


# --- XDP -------------------------------------------------------------------------------------


def _xdp_mode(pair: testbed.NetnsPair) -> int | None:
    out = pair.run(pair.b, ["ip", "-j", "link", "show", pair.if_b]).stdout
    xdp = json.loads(out)[0].get("xdp")
    return None if xdp is None else int(xdp["mode"])


@pytest.mark.parametrize(
    ("mode", "shown"), [(XdpMode.AUTO, 1), (XdpMode.DRIVER, 1), (XdpMode.GENERIC, 2)]
)
def test_xdp_link_info_and_mode(pair, progs, mode, shown):
    prog = progs[ProgType.XDP]
    with attach_xdp.attach_xdp(prog, pair.if_b, XdpOptions(mode, fallback=False), pair.b) as lk:
        assert isinstance(lk, bpf.Link)
        info = lk.info()
        assert info.type == LinkType.XDP
        assert (info.ifindex, info.prog_id) == (pair.ifindex_b, prog.id)
        assert _xdp_mode(pair) == shown  # IFLA_XDP_ATTACHED: 1 driver, 2 generic (skb)
    assert _xdp_mode(pair) is None


def test_xdp_falls_back_to_netlink_when_links_unsupported(pair, progs, monkeypatch):
    def unsupported(*_a: object, **_k: object) -> bpf.Link:
        raise bpf.BpfError(errno.EINVAL, "BPF_LINK_CREATE xdp: Invalid argument")

    monkeypatch.setattr(bpf, "link_create_xdp", unsupported)
    prog = progs[ProgType.XDP]
    with pytest.raises(bpf.BpfError):
        attach_xdp.attach_xdp(prog, pair.if_b, XdpOptions(fallback=False), pair.b)
    handle = attach_xdp.attach_xdp(prog, pair.if_b, XdpOptions(XdpMode.GENERIC), pair.b)
    assert isinstance(handle, XdpNetlinkAttachment)
    with handle:
        assert handle.ifindex == pair.ifindex_b
        assert handle.attached_prog_id() == prog.id
        assert _xdp_mode(pair) == 2
    assert _xdp_mode(pair) is None


def test_xdp_netlink_refuses_to_replace_unless_asked(pair, progs):
    prog = progs[ProgType.XDP]
    first = attach_xdp.attach_xdp_netlink(prog, pair.ifindex_b, netns=pair.b)
    try:
        with pytest.raises(OSError) as exc:
            attach_xdp.attach_xdp_netlink(prog, pair.ifindex_b, netns=pair.b)
        assert exc.value.errno == errno.EBUSY
        again = attach_xdp.attach_xdp_netlink(
            prog, pair.ifindex_b, XdpOptions(replace=True), pair.b
        )
        assert again.attached_prog_id() == prog.id
        # A BPF link cannot take an interface that netlink already holds.
        with pytest.raises(bpf.BpfError) as busy:
            attach_xdp.attach_xdp(prog, pair.ifindex_b, netns=pair.b)
        assert busy.value.errno == errno.EBUSY
    finally:
        first.detach()
    assert first.attached_prog_id() == 0
    first.detach()  # idempotent: nothing of ours is attached any more


def test_xdp_netlink_detach_leaves_a_foreign_program(pair, progs):
    ours = progs[ProgType.XDP]
    handle = attach_xdp.attach_xdp_netlink(ours, pair.ifindex_b, netns=pair.b)
    code = link([asm.mov64(R0, 2), asm.exit_()]).code
    with bpf.prog_load(ProgramSpec("bpft_other", ProgType.XDP, code)) as other:
        attach_xdp.attach_xdp_netlink(other, pair.ifindex_b, XdpOptions(replace=True), pair.b)
        handle.detach()  # ours was replaced: it must not remove the other program
        assert handle.attached_prog_id() == other.id
        attach_xdp.XdpNetlinkAttachment(pair.ifindex_b, pair.b, other.id, XdpMode.AUTO).detach()
    assert handle.attached_prog_id() == 0


# --- TC --------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", TcDirection, ids=lambda d: d.value)
def test_tcx_link_info(pair, progs, direction):
    prog = progs[ProgType.SCHED_CLS]
    opts = TcOptions(direction, fallback=False)
    with attach_tc.attach_tc(prog, pair.if_b, opts, pair.b) as lk:
        assert isinstance(lk, bpf.Link)
        info = lk.info()
        assert info.type == LinkType.TCX
        assert (info.ifindex, info.attach_type, info.prog_id) == (
            pair.ifindex_b,
            direction.attach_type,
            prog.id,
        )


def test_tc_falls_back_to_clsact_when_links_unsupported(pair, progs, monkeypatch):
    def unsupported(*_a: object, **_k: object) -> bpf.Link:
        raise bpf.BpfError(errno.EINVAL, "BPF_LINK_CREATE tcx: Invalid argument")

    monkeypatch.setattr(bpf, "link_create_tcx", unsupported)
    prog = progs[ProgType.SCHED_CLS]
    with pytest.raises(bpf.BpfError):
        attach_tc.attach_tc(prog, pair.if_b, TcOptions(fallback=False), pair.b)
    handle = attach_tc.attach_tc(prog, pair.if_b, TcOptions(priority=3, handle=7), pair.b)
    assert isinstance(handle, TcNetlinkAttachment)
    with handle:
        assert handle.attached()
        shown = pair.run(pair.b, ["tc", "filter", "show", "dev", pair.if_b, "ingress"]).stdout
        assert "pref 3 bpf" in shown and "handle 0x7" in shown and "direct-action" in shown
    assert not handle.attached()
    assert "clsact" not in pair.run(pair.b, ["tc", "qdisc", "show"]).stdout
    handle.detach()  # idempotent, also with the qdisc gone


def test_tc_clsact_kept_when_it_was_there_before(pair, progs):
    pair.run(pair.b, ["tc", "qdisc", "add", "dev", pair.if_b, "clsact"])
    handle = attach_tc.attach_tc_netlink(progs[ProgType.SCHED_CLS], pair.if_b, netns=pair.b)
    assert not handle.created_qdisc
    handle.detach()
    assert "clsact" in pair.run(pair.b, ["tc", "qdisc", "show", "dev", pair.if_b]).stdout


def test_tc_options_validate():
    with pytest.raises(ValueError, match="priority"):
        TcOptions(priority=0)
    with pytest.raises(ValueError, match="handle"):
        TcOptions(handle=0)
