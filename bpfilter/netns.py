"""Named network namespaces: resolve them and run code with the calling thread inside one."""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

NETNS_RUN_DIR = Path("/run/netns")  # where `ip netns add` bind-mounts named namespaces
CLONE_NEWNET = 0x40000000  # linux/sched.h; setns(2) nstype for network namespaces
CLONE_NEWNS = 0x00020000  # linux/sched.h; mount namespaces (only compared, never entered)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.setns.restype = ctypes.c_int


class NetnsError(RuntimeError):
    """A named network namespace is missing, invalid, or cannot be entered."""


def check_name(name: str) -> str:
    """Return ``name`` when it can name a namespace in /run/netns, else raise NetnsError."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise NetnsError(f"invalid network namespace name {name!r}")
    return name


def path(name: str) -> Path:
    """The bind-mount file of the named namespace; NetnsError when it does not exist."""
    p = NETNS_RUN_DIR / check_name(name)
    if not p.exists():
        raise NetnsError(
            f"network namespace {name!r} does not exist (no {p}); "
            f"create it with `ip netns add {name}` or check `ip netns list`"
        )
    return p


def exists(name: str) -> bool:
    """True when /run/netns/NAME exists."""
    try:
        path(name)
    except NetnsError:
        return False
    return True


def names() -> list[str]:
    """Names of the namespaces in /run/netns, sorted."""
    try:
        return sorted(p.name for p in NETNS_RUN_DIR.iterdir())
    except FileNotFoundError:
        return []


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns({what}, CLONE_NEWNET): {os.strerror(err)}")


def _thread_ns(kind: str) -> str:
    # /proc/self is the thread-group leader; setns() moves only the calling thread, so the
    # namespace this thread is in must be read from /proc/thread-self.
    return f"/proc/thread-self/ns/{kind}"


@contextlib.contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Run the body with the calling thread in network namespace ``name`` (None: stay put).

    Only the calling thread moves, and only its network namespace: the mount namespace, and
    with it the bpffs where pins live, stays the caller's. Sockets, netlink handles and BPF
    links created inside the body belong to ``name`` and keep belonging to it afterwards.
    Threads started inside the body inherit ``name`` (new threads copy their creator's
    namespaces). The thread always returns to its original namespace, also when the body
    raises.
    """
    if name is None:
        yield
        return
    target = os.open(path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        original = os.open(_thread_ns("net"), os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        os.close(target)
        raise
    try:
        _setns(target, f"/run/netns/{name}")
        try:
            yield
        finally:
            # If this failed the thread would silently stay in the wrong namespace.
            _setns(original, "the original network namespace")
    finally:
        os.close(target)
        os.close(original)


def ifindex(ifname: str, netns: str | None = None) -> int:
    """Index of interface ``ifname`` in ``netns`` (None: the caller's namespace)."""
    with entered(netns):
        try:
            return socket.if_nametoindex(ifname)
        except OSError:
            where = f"network namespace {netns!r}" if netns else "the current network namespace"
            raise NetnsError(f"no interface {ifname!r} in {where}") from None


def inode(name: str | None = None) -> int:
    """Inode number identifying a namespace (None: the calling thread's own)."""
    return os.stat(path(name) if name is not None else _thread_ns("net")).st_ino


def current_name() -> str | None:
    """Name in /run/netns of the calling thread's network namespace, or None when unnamed."""
    mine = os.stat(_thread_ns("net"))
    for n in names():
        try:
            st = os.stat(NETNS_RUN_DIR / n)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
            return n
    return None


@contextlib.contextmanager
def iproute(netns: str | None, what: str) -> Iterator[Any]:
    """An rtnetlink handle in ``netns``; pyroute2's NetlinkError comes out as OSError
    naming ``what`` was being asked."""
    # pyroute2 costs ~0.13 s to import: only the netlink fallbacks need it, so not at start-up.
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    # The netlink socket belongs to the namespace it was opened in.
    with entered(netns):
        ipr = IPRoute()
    try:
        yield ipr
    except NetlinkError as e:
        where = f" in network namespace {netns!r}" if netns else ""
        raise OSError(e.code, f"{what} netlink request{where}: {os.strerror(e.code)}") from e
    finally:
        ipr.close()
