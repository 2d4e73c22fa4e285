"""The BPF filesystem: find or mount it, and keep bpfilter's pins in one directory per netns."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from pathlib import Path

from bpfilter import bpf, netns

# Layout: ``<bpffs>/bpfilter/<netns name or "host">/<pin name>``, directories mode 0700, so only
# root can reach the pinned programs, maps and links.
#
# A caveat about ``ip netns exec``: it runs its command in a new mount namespace with a fresh
# ``/sys``. A bpffs mounted there, and every pin made in it, disappears when the command exits,
# taking any link that only the pin kept alive with it. So bpfilter is never run under
# ``ip netns exec``; it is given ``--netns NAME`` instead, enters the network namespace for the
# attachment only (see ``bpfilter.netns.entered``) and pins in the caller's bpffs.
# ``ensure_mounted`` detects the ``ip netns exec`` case and refuses with that explanation.

DEFAULT_MOUNT = Path("/sys/fs/bpf")
BPFFS_MAGIC = 0xCAFE4A11  # linux/magic.h: f_type of a bpffs (statfs)
ROOT_DIR = "bpfilter"  # bpfilter's directory at the top of the bpffs
HOST = "host"  # directory of the caller's own (initial or unnamed) network namespace
DIR_MODE = 0o700

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
)
_libc.mount.restype = ctypes.c_int


class BpffsError(RuntimeError):
    """The BPF filesystem is missing, cannot be mounted, or would not outlive this process."""


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[tuple[Path, str]]:
    """(mount point, fstype) of every line of a /proc/PID/mountinfo text, in order."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 5 or sep + 1 >= len(fields):
            continue
        mounts.append((Path(_unescape(fields[4])), fields[sep + 1]))
    return mounts


def find() -> Path | None:
    """Mount point of a bpffs visible to this process (``/sys/fs/bpf`` preferred), or None."""
    if is_bpffs(DEFAULT_MOUNT):
        # The usual answer, from one statfs instead of parsing mountinfo (a command asks
        # for every pin it touches).
        return DEFAULT_MOUNT
    with open("/proc/self/mountinfo") as f:
        points = [p for p, fstype in parse_mountinfo(f.read()) if fstype == "bpf"]
    if not points:
        return None
    # Later lines shadow earlier mounts at the same point; any bpffs mount works for pinning.
    return DEFAULT_MOUNT if DEFAULT_MOUNT in points else points[-1]


def is_bpffs(p: Path) -> bool:
    """True when ``p`` lies on a BPF filesystem."""
    try:
        return _statfs_type(p) == BPFFS_MAGIC
    except OSError:
        return False


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]


_libc.statfs.argtypes = (ctypes.c_char_p, ctypes.POINTER(_Statfs))
_libc.statfs.restype = ctypes.c_int


def _statfs_type(p: Path) -> int:
    buf = _Statfs()
    if _libc.statfs(os.fsencode(p), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(p))
    return int(buf.f_type) & 0xFFFFFFFF


def _mount_ns(pid: int | str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino
    except OSError:
        return None


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
        return int(f.read().rsplit(")", 1)[1].split()[1])


def inside_ip_netns_exec() -> str | None:
    """Name of the namespace when this process runs under ``ip netns exec NAME``, else None.

    Heuristic: the network namespace is a named one and some ancestor process (``ip`` execs
    the command, so usually the parent) lives in a different mount namespace. PID 1's
    namespaces are not always readable, so the walk stops at the first unreadable ancestor.
    """
    name = netns.current_name()
    if name is None:
        return None
    mine = _mount_ns("thread-self")
    pid = os.getpid()
    for _ in range(64):
        try:
            pid = _parent(pid)
        except (OSError, ValueError, IndexError):
            return None
        if pid <= 0:
            return None
        theirs = _mount_ns(pid)
        if theirs is None:
            return None
        if theirs != mine:
            return name
        if pid == 1:
            return None
    return None


def _explain_ephemeral(name: str) -> str:
    return (
        f"this process runs under `ip netns exec {name}`, which gives it a private mount "
        f"namespace with a fresh /sys: a bpffs mounted at {DEFAULT_MOUNT} here, and every pin "
        "in it, vanishes when the command exits, and links held only by a pin detach with it. "
        f"Run bpfilter outside `ip netns exec` and pass `--netns {name}` instead."
    )


def mount(at: Path = DEFAULT_MOUNT) -> None:
    """mount -t bpf bpf AT (default options, like the kernel's documentation shows)."""
    if _libc.mount(b"bpf", os.fsencode(at), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise BpffsError(f"mount -t bpf bpf {at}: {os.strerror(err)}")


def ensure_mounted(*, allow_ephemeral: bool = False) -> Path:
    """Mount point of the bpffs, mounting it at /sys/fs/bpf first when there is none.

    Refuses (BpffsError) under ``ip netns exec`` when the bpffs would live in its private
    /sys, unless ``allow_ephemeral`` says pins may die with this process.
    """
    found = find()
    if not allow_ephemeral and (found is None or found.is_relative_to("/sys")):
        name = inside_ip_netns_exec()
        if name is not None:
            raise BpffsError(_explain_ephemeral(name))
    if found is not None:
        return found
    mount(DEFAULT_MOUNT)
    return DEFAULT_MOUNT


def _dir_name(ns: str | None) -> str:
    if ns is None:
        return HOST
    netns.check_name(ns)
    if ns == HOST:
        # /sys/fs/bpf/bpfilter/host belongs to the caller's own namespace.
        raise BpffsError(f"a network namespace named {HOST!r} would share the host's pins")
    return ns


def _check_pin_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise BpffsError(f"invalid pin name {name!r}")
    return name


def pin_dir(ns: str | None = None, *, create: bool = True) -> Path:
    """``<bpffs>/bpfilter/<ns or "host">``; created (mode 0700) when ``create``."""
    root = ensure_mounted() if create else (find() or DEFAULT_MOUNT)
    d = root / ROOT_DIR / _dir_name(ns)
    if not create:
        return d
    for _ in range(8):
        try:
            for level in (d.parent, d):
                with contextlib.suppress(FileExistsError):
                    level.mkdir(mode=DIR_MODE)
                # mkdir's mode passes through the umask; a directory someone else made may be
                # wider. Either way the pins below must be reachable by root only.
                os.chmod(level, DIR_MODE)
            return d
        except FileNotFoundError:
            # A concurrent cleanup() removed the empty parent between our two mkdirs.
            continue
    raise BpffsError(f"could not create {d}")


def pin_path(name: str, ns: str | None = None) -> Path:
    """Where pin ``name`` of namespace ``ns`` lives (nothing is created)."""
    return pin_dir(ns, create=False) / _check_pin_name(name)


def pin(obj: bpf.Fd | int, name: str, ns: str | None = None, *, replace: bool = False) -> Path:
    """Pin a program, map or link as ``name`` in the directory of ``ns``; returns the path.

    An existing pin of that name is an error unless ``replace``, which unpins it first.
    """
    p = pin_dir(ns) / _check_pin_name(name)
    if replace:
        unpin(p)
    try:
        bpf.obj_pin(obj, str(p))
    except FileExistsError:
        raise BpffsError(f"{p} is already pinned") from None
    return p


def get(name: str, ns: str | None = None) -> int:
    """A new fd for the object pinned as ``name`` in the directory of ``ns``."""
    p = pin_path(name, ns)
    if not p.exists():
        raise BpffsError(f"nothing pinned at {p}")
    return bpf.obj_get(str(p))


def unpin(p: Path | str) -> bool:
    """Remove a pin (the object lives on while an fd holds it); False when there was none."""
    try:
        os.unlink(p)
    except FileNotFoundError:
        return False
    return True


def pins(ns: str | None = None) -> list[Path]:
    """Paths of the pins in the directory of ``ns``, sorted; empty when it does not exist."""
    d = pin_dir(ns, create=False)
    if not d.is_dir():
        return []
    return sorted(p for p in d.rglob("*") if not p.is_dir())


def cleanup(ns: str | None = None) -> None:
    """Remove everything under the pin directory of ``ns``, the directory itself, and
    ``<bpffs>/bpfilter`` when that is left empty. Does nothing when no bpffs is mounted."""
    root = find()
    if root is None:
        return
    d = root / ROOT_DIR / _dir_name(ns)
    if d.is_dir():
        # bpffs entries are removed with unlink/rmdir, deepest first.
        for top, dirs, files in os.walk(d, topdown=False):
            for f in files:
                os.unlink(os.path.join(top, f))
            for sub in dirs:
                os.rmdir(os.path.join(top, sub))
        os.rmdir(d)
    try:
        os.rmdir(d.parent)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.ENOENT, errno.EEXIST):
            raise
