"""Attach a TC (sched_cls) program at ingress or egress: a tcx link, or clsact as fallback."""

from __future__ import annotations

import contextlib
import enum
import errno
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from bpfilter import bpf
from bpfilter import netns as _netns
from bpfilter.codegen.uapi import ENOTSUPP, AttachType, ProgType

# The program returns TC_ACT_* / TCX_* verdicts in both cases (the fallback filter runs in
# direct-action mode). A tcx link detaches when its last fd closes (pin it to keep it); a
# clsact filter added over netlink belongs to the interface and stays until ``detach()``.

# Errors meaning "this kernel has no tcx links" (older than 6.6): use clsact instead.
LINK_UNSUPPORTED = frozenset({errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP, errno.ENOSYS})

TC_H_CLSACT_INGRESS = 0xFFFFFFF2  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
TC_H_CLSACT_EGRESS = 0xFFFFFFF3  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)


class TcDirection(enum.Enum):
    """Which way the program sees packets."""

    INGRESS = "ingress"
    EGRESS = "egress"

    @property
    def attach_type(self) -> AttachType:
        return AttachType.TCX_INGRESS if self is TcDirection.INGRESS else AttachType.TCX_EGRESS

    @property
    def clsact_parent(self) -> int:
        return TC_H_CLSACT_INGRESS if self is TcDirection.INGRESS else TC_H_CLSACT_EGRESS


@dataclass(frozen=True, slots=True)
class TcOptions:
    """Direction; tcx ordering ``flags`` (AttachFlag.BEFORE/AFTER, 0: append); for the clsact
    fallback the filter's ``priority`` and ``handle``; ``fallback`` allows clsact at all."""

    direction: TcDirection = TcDirection.INGRESS
    flags: int = 0
    priority: int = 1
    handle: int = 1
    fallback: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.priority <= 0xFFFF:
            raise ValueError(f"tc filter priority {self.priority} outside 1..65535")
        if not 1 <= self.handle <= 0xFFFFFFFF:
            raise ValueError(f"tc filter handle {self.handle} outside 1..2**32-1")


@dataclass(frozen=True, slots=True)
class TcNetlinkAttachment:
    """A bpf filter on a clsact qdisc (``tc filter add ... bpf da``); persists until detach().

    ``created_qdisc``: the clsact qdisc was made for this filter, so detach() removes it too
    once no filter is left on it in either direction.
    """

    ifindex: int
    netns: str | None
    direction: TcDirection
    priority: int
    handle: int
    created_qdisc: bool

    def attached(self) -> bool:
        """True while the filter is still on the interface."""
        with _netns.iproute(self.netns, "TC") as ipr:
            return any(
                f.get("handle") == self.handle and (f.get("info", 0) >> 16) == self.priority
                for f in _filters(ipr, self.ifindex, self.direction.clsact_parent)
            )

    def detach(self) -> None:
        """Delete the filter (and the clsact qdisc when it was ours and is now empty)."""
        with _netns.iproute(self.netns, "TC") as ipr:
            try:
                ipr.tc(
                    "del-filter",
                    "bpf",
                    self.ifindex,
                    self.handle,
                    parent=self.direction.clsact_parent,
                    prio=self.priority,
                )
            except NetlinkError as e:
                # ENOENT: the filter, or the whole clsact qdisc, is gone already.
                if e.code not in (errno.ENOENT, errno.EINVAL):
                    raise
            if self.created_qdisc and not any(
                _filters(ipr, self.ifindex, d.clsact_parent) for d in TcDirection
            ):
                with contextlib.suppress(NetlinkError):
                    ipr.tc("del", "clsact", self.ifindex)

    def close(self) -> None:
        """Nothing to release: the filter lives on the interface, not in an fd."""

    def __enter__(self) -> TcNetlinkAttachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()




def _filters(ipr: Any, ifindex: int, parent: int) -> list[Any]:
    # The dump also lists one header entry per priority (handle 0): keep real filters only.
    return [f for f in ipr.get_filters(index=ifindex, parent=parent) if f.get("handle")]


def _resolve(ifindex: int | str, netns: str | None) -> int:
    return _netns.ifindex(ifindex, netns) if isinstance(ifindex, str) else ifindex


def attach_tc_netlink(
    prog: bpf.Prog | int,
    ifindex: int | str,
    options: TcOptions = TcOptions(),
    netns: str | None = None,
) -> TcNetlinkAttachment:
    """clsact qdisc (made if missing) plus a direct-action bpf filter, over netlink."""
    bpf.require_prog_type(prog, ProgType.SCHED_CLS, "TC attachment")
    index = _resolve(ifindex, netns)
    info = bpf.prog_info(prog)
    fd = prog.fd if isinstance(prog, bpf.Prog) else prog
    with _netns.iproute(netns, "TC") as ipr:
        created = True
        try:
            ipr.tc("add", "clsact", index)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
            created = False
        try:
            ipr.tc(
                "add-filter",
                "bpf",
                index,
                options.handle,
                fd=fd,
                name=info.name or "bpfilter",
                parent=options.direction.clsact_parent,
                prio=options.priority,
                classid=1,
                direct_action=True,
            )
        except BaseException:
            if created:
                with contextlib.suppress(NetlinkError):
                    ipr.tc("del", "clsact", index)
            raise
    return TcNetlinkAttachment(
        index, netns, options.direction, options.priority, options.handle, created
    )


def attach_tc(
    prog: bpf.Prog | int,
    ifindex: int | str,
    options: TcOptions = TcOptions(),
    netns: str | None = None,
) -> bpf.Link | TcNetlinkAttachment:
    """Attach ``prog`` at ``options.direction`` of interface ``ifindex`` (index or name) in
    ``netns``: a tcx link when the kernel supports it, else (``options.fallback``) clsact."""
    bpf.require_prog_type(prog, ProgType.SCHED_CLS, "TC attachment")  # before any attach syscall
    index = _resolve(ifindex, netns)
    try:
        with _netns.entered(netns):  # the ifindex is looked up in the thread's namespace
            return bpf.link_create_tcx(prog, index, options.direction.attach_type, options.flags)
    except bpf.BpfError as e:
        if not options.fallback or e.errno not in LINK_UNSUPPORTED:
            raise
    return attach_tc_netlink(prog, index, options, netns)
