"""Attach an XDP program to an interface: a BPF link, or netlink (pyroute2) as the fallback."""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from bpfilter import bpf
from bpfilter import netns as _netns
from bpfilter.codegen.uapi import ENOTSUPP, ProgType, XdpFlag

# A BPF XDP link detaches when its last fd closes (pin it to keep it). A netlink attachment is
# owned by the interface instead: it stays until ``detach()`` or until the interface goes away,
# so its handle needs no pin. Only one program per interface and mode: attaching over another
# one is refused (EBUSY) unless ``XdpOptions.replace`` (netlink only).

# Errors meaning "this kernel has no XDP BPF links" (older than 5.9): try netlink instead.
LINK_UNSUPPORTED = frozenset({errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP, errno.ENOSYS})


class XdpMode(enum.IntEnum):
    """Where the program runs: the kernel picks (driver if it can), generic (skb), driver."""

    AUTO = 0
    GENERIC = XdpFlag.SKB_MODE
    DRIVER = XdpFlag.DRV_MODE


@dataclass(frozen=True, slots=True)
class XdpOptions:
    """How to attach: the mode, whether netlink may replace a program already there, and
    whether to fall back to netlink when the kernel has no XDP links."""

    mode: XdpMode = XdpMode.AUTO
    replace: bool = False
    fallback: bool = True


@dataclass(frozen=True, slots=True)
class XdpNetlinkAttachment:
    """A program attached with netlink (IFLA_XDP); persists until detach()."""

    ifindex: int
    netns: str | None
    prog_id: int
    mode: XdpMode

    def attached_prog_id(self) -> int:
        """Id of the program now attached in this mode (0: none)."""
        return _attached_prog_id(self.ifindex, self.netns, self.mode)

    def detach(self) -> None:
        """Remove the program, but only if it is still ours (IFLA_XDP_EXPECTED_FD); a no-op
        when it is gone already or was replaced."""
        try:
            ours = bpf.prog_get_fd_by_id(self.prog_id)
        except FileNotFoundError:
            return  # the program was freed, so it is attached nowhere
        with ours, _netns.iproute(self.netns, "XDP") as ipr:
            try:
                _set_xdp(ipr, self.ifindex, -1, self.mode | XdpFlag.REPLACE, expected_fd=ours.fd)
            except NetlinkError as e:
                # EEXIST: the attached program (if any) is not the expected one.
                if e.code != errno.EEXIST:
                    raise

    def close(self) -> None:
        """Nothing to release: the attachment lives on the interface, not in an fd."""

    def __enter__(self) -> XdpNetlinkAttachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()




def _set_xdp(ipr: Any, ifindex: int, fd: int, flags: int, expected_fd: int | None = None) -> None:
    attrs: list[tuple[str, int]] = [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", int(flags))]
    if expected_fd is not None:
        attrs.append(("IFLA_XDP_EXPECTED_FD", expected_fd))
    ipr.link("set", index=ifindex, xdp={"attrs": attrs})


def _attached_prog_id(ifindex: int, netns: str | None, mode: XdpMode) -> int:
    key = {
        XdpMode.AUTO: "IFLA_XDP_PROG_ID",
        XdpMode.GENERIC: "IFLA_XDP_SKB_PROG_ID",
        XdpMode.DRIVER: "IFLA_XDP_DRV_PROG_ID",
    }[mode]
    with _netns.iproute(netns, "XDP") as ipr:
        xdp = ipr.link("get", index=ifindex)[0].get_attr("IFLA_XDP")
    if xdp is None:
        return 0
    return int(xdp.get_attr(key) or 0)


def _resolve(ifindex: int | str, netns: str | None) -> int:
    return _netns.ifindex(ifindex, netns) if isinstance(ifindex, str) else ifindex


def attach_xdp_netlink(
    prog: bpf.Prog | int,
    ifindex: int | str,
    options: XdpOptions = XdpOptions(),
    netns: str | None = None,
) -> XdpNetlinkAttachment:
    """Attach with netlink (what ``ip link set dev X xdp`` does), no BPF link involved."""
    bpf.require_prog_type(prog, ProgType.XDP, "XDP attachment")
    index = _resolve(ifindex, netns)
    flags = options.mode if options.replace else options.mode | XdpFlag.UPDATE_IF_NOEXIST
    fd = prog.fd if isinstance(prog, bpf.Prog) else prog
    try:
        with _netns.iproute(netns, "XDP") as ipr:
            _set_xdp(ipr, index, fd, flags)
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
        raise OSError(
            e.errno,
            f"ifindex {index} already has an XDP program (or an XDP link) in this mode; "
            "XdpOptions(replace=True) replaces a netlink-attached one",
        ) from e
    return XdpNetlinkAttachment(index, netns, bpf.prog_info(prog).id, options.mode)


def attach_xdp(
    prog: bpf.Prog | int,
    ifindex: int | str,
    options: XdpOptions = XdpOptions(),
    netns: str | None = None,
) -> bpf.Link | XdpNetlinkAttachment:
    """Attach ``prog`` to interface ``ifindex`` (index or name) in ``netns``: a BPF link when
    the kernel supports it, else (``options.fallback``) netlink."""
    bpf.require_prog_type(prog, ProgType.XDP, "XDP attachment")  # before any attach syscall
    index = _resolve(ifindex, netns)
    try:
        with _netns.entered(netns):  # the ifindex is looked up in the thread's namespace
            return bpf.link_create_xdp(prog, index, int(options.mode))
    except bpf.BpfError as e:
        if not options.fallback or e.errno not in LINK_UNSUPPORTED:
            raise
    return attach_xdp_netlink(prog, index, options, netns)
