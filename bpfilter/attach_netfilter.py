"""Attach a netfilter program to an IPv4 or IPv6 hook with a BPF link."""

from __future__ import annotations

import errno
from dataclasses import dataclass

from bpfilter import bpf
from bpfilter import netns as _netns
from bpfilter.codegen.uapi import NETFILTER_IP_DEFRAG, NfHook, NfPriority, NfProto, ProgType

# Kernel rules, checked on Linux 6.18 (see tests/kernel/test_attach.py):
#
# * ``pf`` is NFPROTO_IPV4 or NFPROTO_IPV6 (NFPROTO_INET: EAFNOSUPPORT), ``hook`` one of the
#   five inet hooks (others: EPROTO).
# * The priority must not be NF_IP_PRI_FIRST or NF_IP_PRI_LAST (ERANGE); with ``defrag`` it must
#   be above NF_IP_PRI_CONNTRACK_DEFRAG (-400), where defragmentation runs (ERANGE).
# * At most one hook per (netns, pf, hook, priority) when a BPF link is involved: a second BPF
#   link at the same priority, or a BPF link at the priority of an existing iptables/nftables
#   chain (iptables' filter table sits at 0), is refused with EBUSY. Pick another priority
#   (e.g. -1 or 1) next to such a chain.
# * The link belongs to the network namespace of the thread that creates it; ``netns`` makes
#   that the named namespace while pins stay in the caller's bpffs.

_FAMILIES = (NfProto.IPV4, NfProto.IPV6)


@dataclass(frozen=True, slots=True)
class NetfilterOptions:
    """Where a netfilter link goes: family, hook, priority, and whether to defragment first."""

    pf: NfProto
    hook: NfHook
    priority: int
    defrag: bool = False

    def __post_init__(self) -> None:
        try:
            # Plain ints are accepted and kept as the enums, for names in messages.
            object.__setattr__(self, "pf", NfProto(self.pf))
            object.__setattr__(self, "hook", NfHook(self.hook))
        except ValueError as e:
            raise ValueError(f"netfilter link: {e}") from None
        if self.pf not in _FAMILIES:
            raise ValueError(f"netfilter links take NFPROTO_IPV4 or NFPROTO_IPV6, not {self.pf!r}")
        if not NfPriority.FIRST < self.priority < NfPriority.LAST:
            raise ValueError(
                f"priority {self.priority} must lie strictly between NF_IP_PRI_FIRST and "
                "NF_IP_PRI_LAST (the kernel reserves both)"
            )
        if self.defrag and self.priority <= NfPriority.CONNTRACK_DEFRAG:
            raise ValueError(
                f"priority {self.priority} with defrag must be above "
                f"NF_IP_PRI_CONNTRACK_DEFRAG ({int(NfPriority.CONNTRACK_DEFRAG)})"
            )

    @property
    def flags(self) -> int:
        return NETFILTER_IP_DEFRAG if self.defrag else 0



def attach_netfilter(
    prog: bpf.Prog | int, options: NetfilterOptions, netns: str | None = None
) -> bpf.Link:
    """Create a netfilter link for ``prog`` in ``netns`` (None: the caller's namespace)."""
    bpf.require_prog_type(prog, ProgType.NETFILTER, "a netfilter link")  # before any attach syscall
    with _netns.entered(netns):
        try:
            return bpf.link_create_netfilter(
                prog, options.pf, options.hook, options.priority, options.flags
            )
        except bpf.BpfError as e:
            if e.errno == errno.EBUSY:
                where = f" in network namespace {netns!r}" if netns else ""
                raise bpf.BpfError(
                    e.errno,
                    f"{e.strerror}: priority {options.priority} of {options.pf.name} "
                    f"{options.hook.name} is already taken{where} (by another BPF link or an "
                    "iptables/nftables chain); choose another priority",
                ) from e
            raise
