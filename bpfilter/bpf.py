"""The bpf(2) system call: attribute blocks, fd-owning objects and the commands bpfilter uses."""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import functools
import mmap
import os
import platform
import select
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NoReturn, Self, TypeVar

from bpfilter.codegen.spec import MapSpec, ProgramSpec
from bpfilter.codegen.uapi import (
    BPF_OBJ_NAME_LEN,
    ENOTSUPP,
    RINGBUF_BUSY_BIT,
    RINGBUF_DISCARD_BIT,
    RINGBUF_HDR_SZ,
    AttachFlag,
    AttachType,
    Cmd,
    LinkType,
    LogLevel,
    MapType,
    ProgType,
    UpdateFlag,
)

_SYSCALL_NR = {"x86_64": 321, "aarch64": 280}

u32 = ctypes.c_uint32
s32 = ctypes.c_int32
u64 = ctypes.c_uint64
_NAME = ctypes.c_char * BPF_OBJ_NAME_LEN

LOG_SIZE_START = 64 * 1024
LOG_SIZE_MAX = 16 * 1024 * 1024


# --- errors ----------------------------------------------------------------------------------


class BpfError(OSError):
    """A bpf(2) command failed; ``errno`` is set and the message names the command."""


class VerifierError(BpfError):
    """BPF_PROG_LOAD was refused; ``log`` holds the verifier's full log."""

    def __init__(self, err: int, message: str, log: str) -> None:
        super().__init__(err, message)
        self.log = log


class IncompatibleMapError(ValueError):
    """An existing (e.g. pinned) map does not match the spec it is meant to serve."""


_ERRNO_BASES: dict[int, type[OSError]] = {
    errno.ENOENT: FileNotFoundError,
    errno.EEXIST: FileExistsError,
    errno.EPERM: PermissionError,
    errno.EACCES: PermissionError,
    errno.EAGAIN: BlockingIOError,
    errno.EINTR: InterruptedError,
    errno.ESRCH: ProcessLookupError,
    errno.ENOTDIR: NotADirectoryError,
    errno.EISDIR: IsADirectoryError,
}


@functools.cache
def _error_class(err: int) -> type[BpfError]:
    """BpfError, mixed with the builtin OSError subclass for ``err`` when there is one."""
    base = _ERRNO_BASES.get(err)
    if base is None:
        return BpfError
    return type(f"Bpf{base.__name__}", (BpfError, base), {"__module__": __name__})


def _strerror(err: int) -> str:
    if err == ENOTSUPP:
        return "Operation not supported (ENOTSUPP)"
    return os.strerror(err)


def _raise(cmd: Cmd, err: int, detail: str = "") -> NoReturn:
    where = f" {detail}" if detail else ""
    raise _error_class(err)(err, f"BPF_{cmd.name}{where}: {_strerror(err)}")


# --- the system call -------------------------------------------------------------------------


@functools.cache
def _syscall() -> tuple[ctypes.CDLL, int]:
    machine = platform.machine()
    if machine not in _SYSCALL_NR:
        raise OSError(errno.ENOSYS, f"bpf(2) syscall number unknown for {machine}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc, _SYSCALL_NR[machine]


def _call(cmd: Cmd, attr: ctypes.Structure) -> tuple[int, int]:
    """bpf(cmd, &attr, sizeof(attr)) -> (result, errno); errno is 0 on success."""
    libc, nr = _syscall()
    ctypes.set_errno(0)
    rc = libc.syscall(
        ctypes.c_long(nr),
        ctypes.c_long(int(cmd)),
        ctypes.c_void_p(ctypes.addressof(attr)),
        ctypes.c_ulong(ctypes.sizeof(attr)),
    )
    if rc < 0:
        return rc, ctypes.get_errno()
    return rc, 0


def sys_bpf(cmd: Cmd, attr: ctypes.Structure, detail: str = "") -> int:
    """Run one bpf command; raise BpfError (naming the command) on failure."""
    rc, err = _call(cmd, attr)
    if err:
        _raise(cmd, err, detail)
    return rc


# --- attribute blocks (union bpf_attr, one structure per command) ----------------------------


class MapCreateAttr(ctypes.Structure):
    """BPF_MAP_CREATE."""

    _fields_ = [
        ("map_type", u32),
        ("key_size", u32),
        ("value_size", u32),
        ("max_entries", u32),
        ("map_flags", u32),
        ("inner_map_fd", u32),
        ("numa_node", u32),
        ("map_name", _NAME),
        ("map_ifindex", u32),
        ("btf_fd", u32),
        ("btf_key_type_id", u32),
        ("btf_value_type_id", u32),
        ("btf_vmlinux_value_type_id", u32),
        ("map_extra", u64),
    ]


class MapElemAttr(ctypes.Structure):
    """BPF_MAP_LOOKUP_ELEM, _UPDATE_ELEM, _DELETE_ELEM, _GET_NEXT_KEY (value = next_key)."""

    _fields_ = [("map_fd", u32), ("key", u64), ("value", u64), ("flags", u64)]


class MapBatchAttr(ctypes.Structure):
    """BPF_MAP_LOOKUP_BATCH, _LOOKUP_AND_DELETE_BATCH, _UPDATE_BATCH, _DELETE_BATCH."""

    _fields_ = [
        ("in_batch", u64),
        ("out_batch", u64),
        ("keys", u64),
        ("values", u64),
        ("count", u32),
        ("map_fd", u32),
        ("elem_flags", u64),
        ("flags", u64),
    ]


class ProgLoadAttr(ctypes.Structure):
    """BPF_PROG_LOAD, up to log_true_size (the kernel reports the log size it needed)."""

    _fields_ = [
        ("prog_type", u32),
        ("insn_cnt", u32),
        ("insns", u64),
        ("license", u64),
        ("log_level", u32),
        ("log_size", u32),
        ("log_buf", u64),
        ("kern_version", u32),
        ("prog_flags", u32),
        ("prog_name", _NAME),
        ("prog_ifindex", u32),
        ("expected_attach_type", u32),
        ("prog_btf_fd", u32),
        ("func_info_rec_size", u32),
        ("func_info", u64),
        ("func_info_cnt", u32),
        ("line_info_rec_size", u32),
        ("line_info", u64),
        ("line_info_cnt", u32),
        ("attach_btf_id", u32),
        ("attach_prog_fd", u32),
        ("core_relo_cnt", u32),
        ("fd_array", u64),
        ("core_relos", u64),
        ("core_relo_rec_size", u32),
        ("log_true_size", u32),
    ]


class BtfLoadAttr(ctypes.Structure):
    """BPF_BTF_LOAD."""

    _fields_ = [
        ("btf", u64),
        ("btf_log_buf", u64),
        ("btf_size", u32),
        ("btf_log_size", u32),
        ("btf_log_level", u32),
        ("btf_log_true_size", u32),
    ]


class ObjAttr(ctypes.Structure):
    """BPF_OBJ_PIN, BPF_OBJ_GET."""

    _fields_ = [("pathname", u64), ("bpf_fd", u32), ("file_flags", u32)]


class TestRunAttr(ctypes.Structure):
    """BPF_PROG_TEST_RUN."""

    __test__ = False  # not a pytest test class despite the name

    _fields_ = [
        ("prog_fd", u32),
        ("retval", u32),
        ("data_size_in", u32),
        ("data_size_out", u32),
        ("data_in", u64),
        ("data_out", u64),
        ("repeat", u32),
        ("duration", u32),
        ("ctx_size_in", u32),
        ("ctx_size_out", u32),
        ("ctx_in", u64),
        ("ctx_out", u64),
        ("flags", u32),
        ("cpu", u32),
        ("batch_size", u32),
    ]


class GetIdAttr(ctypes.Structure):
    """BPF_*_GET_NEXT_ID (start_id) and BPF_*_GET_FD_BY_ID (id)."""

    _fields_ = [("id", u32), ("next_id", u32), ("open_flags", u32)]


class InfoAttr(ctypes.Structure):
    """BPF_OBJ_GET_INFO_BY_FD."""

    _fields_ = [("bpf_fd", u32), ("info_len", u32), ("info", u64)]


class LinkCreateAttr(ctypes.Structure):
    """BPF_LINK_CREATE without per-type data (XDP)."""

    _fields_ = [("prog_fd", u32), ("target_fd", u32), ("attach_type", u32), ("flags", u32)]


class LinkCreateNetfilterAttr(ctypes.Structure):
    """BPF_LINK_CREATE for BPF_NETFILTER: the common head, then link_create.netfilter."""

    _fields_ = [
        *LinkCreateAttr._fields_,
        ("pf", u32),
        ("hooknum", u32),
        ("priority", s32),
        ("nf_flags", u32),
    ]


class LinkCreateTcxAttr(ctypes.Structure):
    """BPF_LINK_CREATE for BPF_TCX_INGRESS/EGRESS: the common head, then link_create.tcx."""

    _fields_ = [*LinkCreateAttr._fields_, ("relative_fd", u32), ("expected_revision", u64)]


class LinkUpdateAttr(ctypes.Structure):
    """BPF_LINK_UPDATE."""

    _fields_ = [("link_fd", u32), ("new_prog_fd", u32), ("flags", u32), ("old_prog_fd", u32)]


class LinkDetachAttr(ctypes.Structure):
    """BPF_LINK_DETACH."""

    _fields_ = [("link_fd", u32)]


# --- info structures (filled by BPF_OBJ_GET_INFO_BY_FD) --------------------------------------


class BpfProgInfo(ctypes.Structure):
    """struct bpf_prog_info."""

    _fields_ = [
        ("type", u32),
        ("id", u32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", u32),
        ("xlated_prog_len", u32),
        ("jited_prog_insns", u64),
        ("xlated_prog_insns", u64),
        ("load_time", u64),
        ("created_by_uid", u32),
        ("nr_map_ids", u32),
        ("map_ids", u64),
        ("name", _NAME),
        ("ifindex", u32),
        ("gpl_compatible", u32, 1),
        ("netns_dev", u64),
        ("netns_ino", u64),
        ("nr_jited_ksyms", u32),
        ("nr_jited_func_lens", u32),
        ("jited_ksyms", u64),
        ("jited_func_lens", u64),
        ("btf_id", u32),
        ("func_info_rec_size", u32),
        ("func_info", u64),
        ("nr_func_info", u32),
        ("nr_line_info", u32),
        ("line_info", u64),
        ("jited_line_info", u64),
        ("nr_jited_line_info", u32),
        ("line_info_rec_size", u32),
        ("jited_line_info_rec_size", u32),
        ("nr_prog_tags", u32),
        ("prog_tags", u64),
        ("run_time_ns", u64),
        ("run_cnt", u64),
        ("recursion_misses", u64),
        ("verified_insns", u32),
        ("attach_btf_obj_id", u32),
        ("attach_btf_id", u32),
    ]


class BpfMapInfo(ctypes.Structure):
    """struct bpf_map_info, up to map_extra."""

    _fields_ = [
        ("type", u32),
        ("id", u32),
        ("key_size", u32),
        ("value_size", u32),
        ("max_entries", u32),
        ("map_flags", u32),
        ("name", _NAME),
        ("ifindex", u32),
        ("btf_vmlinux_value_type_id", u32),
        ("netns_dev", u64),
        ("netns_ino", u64),
        ("btf_id", u32),
        ("btf_key_type_id", u32),
        ("btf_value_type_id", u32),
        ("btf_vmlinux_id", u32),
        ("map_extra", u64),
    ]


class _LinkNetfilter(ctypes.Structure):
    _fields_ = [("pf", u32), ("hooknum", u32), ("priority", s32), ("flags", u32)]


class _LinkXdp(ctypes.Structure):
    _fields_ = [("ifindex", u32)]


class _LinkTcx(ctypes.Structure):
    _fields_ = [("ifindex", u32), ("attach_type", u32)]


class _LinkInfoUnion(ctypes.Union):
    # The kernel's union is 48 bytes (its largest member is perf_event); keep the same size.
    _fields_ = [
        ("netfilter", _LinkNetfilter),
        ("xdp", _LinkXdp),
        ("tcx", _LinkTcx),
        ("raw", ctypes.c_uint64 * 6),
    ]


class BpfLinkInfo(ctypes.Structure):
    """struct bpf_link_info with the netfilter, xdp and tcx members of its union."""

    _anonymous_ = ("u",)
    _fields_ = [("type", u32), ("id", u32), ("prog_id", u32), ("u", _LinkInfoUnion)]


# --- decoded info ----------------------------------------------------------------------------


_E = TypeVar("_E", bound=enum.IntEnum)
_S = TypeVar("_S", bound=ctypes.Structure)


def _enum_or_int(enum_type: type[_E], value: int) -> _E | int:
    try:
        return enum_type(value)
    except ValueError:
        return value


@dataclass(frozen=True, slots=True)
class ProgInfo:
    """What the kernel reports about a loaded program."""

    type: ProgType | int
    id: int
    name: str
    tag: bytes
    xlated_insns: int  # instructions after the verifier's rewrites
    jited_len: int
    verified_insns: int
    map_ids: tuple[int, ...]
    gpl_compatible: bool
    load_time_ns: int  # since boot
    created_by_uid: int
    btf_id: int
    run_time_ns: int
    run_cnt: int


@dataclass(frozen=True, slots=True)
class MapInfo:
    """What the kernel reports about a map."""

    type: MapType | int
    id: int
    name: str
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    map_extra: int

    def spec(self, name: str | None = None) -> MapSpec:
        """A MapSpec describing this map (named ``name``, else the kernel's name or ``id<N>``)."""
        return MapSpec(
            name=name or self.name or f"id{self.id}",
            type=MapType(self.type),
            key_size=self.key_size,
            value_size=self.value_size,
            max_entries=self.max_entries,
            flags=self.flags,
        )


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """What the kernel reports about a link; per-type fields are None for other link types."""

    type: LinkType | int
    id: int
    prog_id: int
    pf: int | None = None  # netfilter
    hooknum: int | None = None  # netfilter
    priority: int | None = None  # netfilter
    nf_flags: int | None = None  # netfilter
    ifindex: int | None = None  # xdp, tcx
    attach_type: AttachType | int | None = None  # tcx


@dataclass(frozen=True, slots=True)
class TestRunResult:
    """The outcome of BPF_PROG_TEST_RUN. ``retval`` is the program's R0 as a signed 32-bit value;
    ``duration_ns`` is the kernel's average per run."""

    __test__ = False  # not a pytest test class despite the name

    retval: int
    duration_ns: int
    data_out: bytes
    ctx_out: bytes | None


# --- fd-owning objects -----------------------------------------------------------------------


def _fdnum(obj: int | Fd) -> int:
    return obj.fd if isinstance(obj, Fd) else int(obj)


class Fd:
    """Owns one file descriptor: closed by close(), the context manager or garbage collection."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        if fd < 0:
            raise ValueError(f"invalid file descriptor {fd}")
        self._fd = fd

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def release(self) -> int:
        """Give up ownership: return the fd, which this object will no longer close."""
        fd = self.fd
        self._fd = -1
        return fd

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # At interpreter shutdown os may be gone; an fd closed behind our back raises OSError.
        with contextlib.suppress(OSError, AttributeError, TypeError):
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<{type(self).__name__} {state}>"


_PERCPU_TYPES = frozenset({MapType.PERCPU_HASH, MapType.PERCPU_ARRAY, MapType.LRU_PERCPU_HASH})


# Maps whose update takes a file descriptor (u32) and whose lookup answers an object id.
_FD_VALUE_TYPES = frozenset({MapType.PROG_ARRAY, MapType.ARRAY_OF_MAPS, MapType.HASH_OF_MAPS})


@functools.cache
def possible_cpus() -> int:
    """Number of possible CPUs (the size of every per-CPU value array)."""
    with open("/sys/devices/system/cpu/possible") as f:
        return parse_cpu_list(f.read())


def parse_cpu_list(text: str) -> int:
    """Count the CPUs in a kernel cpu list such as ``0-3,5`` (the highest index + 1)."""
    highest = -1
    for part in text.strip().split(","):
        if not part:
            continue
        last = part.split("-")[-1]
        highest = max(highest, int(last))
    return highest + 1


class Map(Fd):
    """A live map. ``spec`` describes it; keys and values are bytes of the spec's sizes."""

    __slots__ = ("spec",)

    def __init__(self, fd: int, spec: MapSpec) -> None:
        super().__init__(fd)
        self.spec = spec

    @property
    def percpu(self) -> bool:
        return self.spec.type in _PERCPU_TYPES

    @property
    def value_stride(self) -> int:
        """Bytes the kernel copies per value: for per-CPU maps one 8-aligned slot per CPU."""
        if self.percpu:
            return (self.spec.value_size + 7) // 8 * 8 * possible_cpus()
        return self.spec.value_size

    def _key(self, key: bytes) -> ctypes.Array[ctypes.c_char]:
        if len(key) != self.spec.key_size:
            raise ValueError(
                f"map {self.spec.name}: key is {len(key)} bytes, not {self.spec.key_size}"
            )
        return ctypes.create_string_buffer(bytes(key), len(key))

    def _elem(
        self, cmd: Cmd, key: bytes | None, value: ctypes.Array[ctypes.c_char] | None, flags: int = 0
    ) -> int:
        kbuf = self._key(key) if key is not None else None
        attr = MapElemAttr(
            map_fd=self.fd,
            key=ctypes.addressof(kbuf) if kbuf is not None else 0,
            value=ctypes.addressof(value) if value is not None else 0,
            flags=flags,
        )
        return _call(cmd, attr)[1]

    def lookup_raw(self, key: bytes) -> bytes | None:
        """The stored value (per-CPU maps: all CPUs' slots), or None when the key is absent."""
        buf = ctypes.create_string_buffer(self.value_stride)
        err = self._elem(Cmd.MAP_LOOKUP_ELEM, key, buf)
        if err == errno.ENOENT:
            return None
        if err:
            _raise(Cmd.MAP_LOOKUP_ELEM, err, f"map {self.spec.name}")
        return buf.raw

    def lookup(self, key: bytes) -> bytes | None:
        """The value for ``key``, or None. Per-CPU maps answer with lookup_percpu instead.

        prog_array and map-in-map lookups answer the id (u32) of the program or map stored.
        """
        if self.percpu:
            raise TypeError(f"map {self.spec.name} is per-CPU: use lookup_percpu()")
        return self.lookup_raw(key)

    def lookup_percpu(self, key: bytes) -> list[bytes] | None:
        """One value per possible CPU, or None when the key is absent."""
        raw = self.lookup_raw(key)
        return None if raw is None else self.split_percpu(raw)

    def split_percpu(self, raw: bytes) -> list[bytes]:
        """Cut a per-CPU value blob into one value per possible CPU."""
        slot = (self.spec.value_size + 7) // 8 * 8
        return [raw[i : i + self.spec.value_size] for i in range(0, len(raw), slot)]

    def join_percpu(self, values: Sequence[bytes]) -> bytes:
        """The blob a per-CPU update takes: each value padded to 8 bytes, one per CPU."""
        if len(values) != possible_cpus():
            raise ValueError(f"map {self.spec.name}: need {possible_cpus()} per-CPU values")
        slot = (self.spec.value_size + 7) // 8 * 8
        return b"".join(self._check_value(v).ljust(slot, b"\0") for v in values)

    def _check_value(self, value: bytes) -> bytes:
        if len(value) != self.spec.value_size:
            raise ValueError(
                f"map {self.spec.name}: value is {len(value)} bytes, not {self.spec.value_size}"
            )
        return bytes(value)

    def update(self, key: bytes, value: bytes | int | Fd, flags: int = UpdateFlag.ANY) -> None:
        """Store ``value`` at ``key``. For prog_array and map-in-map maps pass the fd (int or Fd).

        For per-CPU maps ``value`` is either one value (stored on every CPU) or the full blob.
        """
        if isinstance(value, Fd | int):
            if self.spec.type not in _FD_VALUE_TYPES:
                raise TypeError(f"map {self.spec.name}: only fd-holding maps take an fd as value")
            data = _fdnum(value).to_bytes(4, "little")
        elif self.percpu and len(value) == self.spec.value_size:
            data = self.join_percpu([value] * possible_cpus())
        elif self.percpu:
            data = bytes(value)
            if len(data) != self.value_stride:
                raise ValueError(f"map {self.spec.name}: per-CPU blob must be {self.value_stride}")
        else:
            data = self._check_value(value)
        buf = ctypes.create_string_buffer(data, len(data))
        err = self._elem(Cmd.MAP_UPDATE_ELEM, key, buf, int(flags))
        if err:
            _raise(Cmd.MAP_UPDATE_ELEM, err, f"map {self.spec.name}")

    def update_percpu(self, key: bytes, values: Sequence[bytes], flags: int = 0) -> None:
        """Store one value per possible CPU at ``key``."""
        self.update(key, self.join_percpu(values), flags)

    def delete(self, key: bytes) -> bool:
        """Remove ``key``; False when it was absent."""
        err = self._elem(Cmd.MAP_DELETE_ELEM, key, None)
        if err == errno.ENOENT:
            return False
        if err:
            _raise(Cmd.MAP_DELETE_ELEM, err, f"map {self.spec.name}")
        return True

    def next_key(self, key: bytes | None) -> bytes | None:
        """The key after ``key`` (the first key for None), or None at the end."""
        out = ctypes.create_string_buffer(max(self.spec.key_size, 1))
        err = self._elem(Cmd.MAP_GET_NEXT_KEY, key, out)
        if err == errno.ENOENT:
            return None
        if err:
            _raise(Cmd.MAP_GET_NEXT_KEY, err, f"map {self.spec.name}")
        return out.raw[: self.spec.key_size]

    def keys(self) -> Iterator[bytes]:
        """Every key, by BPF_MAP_GET_NEXT_KEY (a concurrent delete may restart a hash walk)."""
        key = self.next_key(None)
        while key is not None:
            yield key
            key = self.next_key(key)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs; per-CPU values are the raw blob (see split_percpu)."""
        for key in self.keys():
            value = self.lookup_raw(key)
            if value is not None:
                yield key, value

    # Batch commands move many elements per system call.

    def lookup_batch(self, chunk: int = 4096, *, delete: bool = False) -> list[tuple[bytes, bytes]]:
        """Every (key, raw value) with BPF_MAP_LOOKUP_BATCH (or _LOOKUP_AND_DELETE_BATCH)."""
        cmd = Cmd.MAP_LOOKUP_AND_DELETE_BATCH if delete else Cmd.MAP_LOOKUP_BATCH
        ksize, vsize = self.spec.key_size, self.value_stride
        # The batch token is opaque: hash maps store a bucket index, arrays an index.
        token_size = max(ksize, 8)
        tokens = [ctypes.create_string_buffer(token_size), ctypes.create_string_buffer(token_size)]
        out: list[tuple[bytes, bytes]] = []
        first = True
        while True:
            keys = ctypes.create_string_buffer(ksize * chunk)
            values = ctypes.create_string_buffer(vsize * chunk)
            attr = MapBatchAttr(
                in_batch=0 if first else ctypes.addressof(tokens[0]),
                out_batch=ctypes.addressof(tokens[1]),
                keys=ctypes.addressof(keys),
                values=ctypes.addressof(values),
                count=chunk,
                map_fd=self.fd,
            )
            _, err = _call(cmd, attr)
            if err == errno.ENOSPC and attr.count == 0:
                chunk *= 2  # one hash bucket holds more elements than fit: retry it larger
                continue
            if err and err != errno.ENOENT:
                _raise(cmd, err, f"map {self.spec.name}")
            kraw, vraw = keys.raw, values.raw
            out.extend(
                (kraw[i * ksize : (i + 1) * ksize], vraw[i * vsize : (i + 1) * vsize])
                for i in range(attr.count)
            )
            if err == errno.ENOENT:  # the kernel's "no more elements", count is still valid
                return out
            tokens.reverse()
            first = False

    def update_batch(self, items: Sequence[tuple[bytes, bytes]], flags: int = 0) -> int:
        """Store many (key, value) pairs in one BPF_MAP_UPDATE_BATCH; returns how many."""
        if not items:
            return 0
        ksize = self.spec.key_size
        if any(len(k) != ksize for k, _ in items):
            raise ValueError(f"map {self.spec.name}: every key must be {ksize} bytes")
        keys = b"".join([k for k, _ in items])
        blob = [v for _, v in items]
        stride = self.value_stride
        if any(len(v) != stride for v in blob):
            raise ValueError(f"map {self.spec.name}: every value must be {stride} bytes")
        kbuf = ctypes.create_string_buffer(keys, len(keys))
        values = b"".join(blob)
        vbuf = ctypes.create_string_buffer(values, len(values))
        attr = MapBatchAttr(
            keys=ctypes.addressof(kbuf),
            values=ctypes.addressof(vbuf),
            count=len(items),
            map_fd=self.fd,
            elem_flags=flags,
        )
        _, err = _call(Cmd.MAP_UPDATE_BATCH, attr)
        if err:
            _raise(Cmd.MAP_UPDATE_BATCH, err, f"map {self.spec.name} after {attr.count} elements")
        return int(attr.count)

    def delete_batch(self, keys: Sequence[bytes]) -> int:
        """Delete many keys in one BPF_MAP_DELETE_BATCH; returns how many were deleted."""
        if not keys:
            return 0
        raw = b"".join(self._key(k).raw for k in keys)
        kbuf = ctypes.create_string_buffer(raw, len(raw))
        attr = MapBatchAttr(keys=ctypes.addressof(kbuf), count=len(keys), map_fd=self.fd)
        _, err = _call(Cmd.MAP_DELETE_BATCH, attr)
        if err:
            _raise(Cmd.MAP_DELETE_BATCH, err, f"map {self.spec.name} after {attr.count} elements")
        return int(attr.count)

    def info(self) -> MapInfo:
        return map_info(self)

    def check_compatible(self, spec: MapSpec) -> None:
        """Raise IncompatibleMapError unless the kernel's map matches ``spec``."""
        check_compatible(self, spec)


class Prog(Fd):
    """A loaded program. ``log`` is the verifier log when one was requested."""

    __slots__ = ("spec", "log", "_id")

    def __init__(self, fd: int, spec: ProgramSpec | None = None, log: str = "") -> None:
        super().__init__(fd)
        self.spec = spec
        self.log = log
        self._id = 0

    @property
    def id(self) -> int:
        if not self._id:
            self._id = prog_info(self).id
        return self._id

    def info(self) -> ProgInfo:
        return prog_info(self)


class Link(Fd):
    """A BPF link: the attachment lives until its last fd closes (or its pin is removed).

    ``detach()`` (from Fd) only gives up the fd; ``link_detach(link)`` detaches in the kernel.
    """

    __slots__ = ("_id",)

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self._id = 0

    @property
    def id(self) -> int:
        if not self._id:
            self._id = link_info(self).id
        return self._id

    def info(self) -> LinkInfo:
        return link_info(self)


class RingBuffer:
    """Consumer side of a BPF_MAP_TYPE_RINGBUF map, reading records through mmap of its fd.

    Layout: page 0 holds the consumer position (written by us); page 1 the producer position;
    then the data area, mapped twice in a row so a record that wraps reads as one slice.
    """

    def __init__(self, ringbuf: Map) -> None:
        if ringbuf.spec.type != MapType.RINGBUF:
            raise ValueError(f"map {ringbuf.spec.name} is not a ring buffer")
        self._page = mmap.PAGESIZE
        self._size = ringbuf.spec.max_entries
        self._fd = ringbuf.fd
        self._consumer = mmap.mmap(
            ringbuf.fd, self._page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0
        )
        self._data = mmap.mmap(
            ringbuf.fd,
            self._page + 2 * self._size,
            mmap.MAP_SHARED,
            mmap.PROT_READ,
            offset=self._page,
        )

    def read(self) -> list[bytes]:
        """Every committed record not read yet (discarded ones are skipped)."""
        cons = int.from_bytes(self._consumer[0:8], "little")
        prod = int.from_bytes(self._data[0:8], "little")
        out: list[bytes] = []
        while cons < prod:
            at = self._page + (cons & (self._size - 1))
            header = int.from_bytes(self._data[at : at + 4], "little")
            if header & RINGBUF_BUSY_BIT:
                break  # reserved but not committed yet: later records must wait too
            length = header & ~(RINGBUF_BUSY_BIT | RINGBUF_DISCARD_BIT)
            if not header & RINGBUF_DISCARD_BIT:
                start = at + RINGBUF_HDR_SZ
                out.append(bytes(self._data[start : start + length]))
            cons += (length + RINGBUF_HDR_SZ + 7) // 8 * 8
        self._consumer[0:8] = cons.to_bytes(8, "little")
        return out

    def wait(self, timeout: float | None = None) -> bool:
        """Block until records are available (True) or ``timeout`` seconds pass (False)."""
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        return bool(poller.poll(None if timeout is None else int(timeout * 1000)))

    def close(self) -> None:
        """Unmap the buffer (the map itself stays open)."""
        self._consumer.close()
        self._data.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- maps ------------------------------------------------------------------------------------


def _name(name: str) -> bytes:
    # The kernel accepts only alphanumerics, '_' and '.' in object names.
    clean = "".join(c if (c.isascii() and c.isalnum()) or c in "_." else "_" for c in name)
    return clean.encode()[: BPF_OBJ_NAME_LEN - 1]


def map_create(spec: MapSpec) -> Map:
    """BPF_MAP_CREATE from a spec; for map-in-map types a template inner map is made first."""
    attr = MapCreateAttr(
        map_type=spec.type,
        key_size=spec.key_size,
        value_size=spec.value_size,
        max_entries=spec.max_entries,
        map_flags=spec.flags,
        map_name=_name(spec.name),
    )
    if spec.type in (MapType.ARRAY_OF_MAPS, MapType.HASH_OF_MAPS):
        if spec.inner is None:
            raise ValueError(f"map {spec.name}: {spec.type.name} needs an inner map spec")
        with map_create(spec.inner) as inner:
            attr.inner_map_fd = inner.fd
            fd = sys_bpf(Cmd.MAP_CREATE, attr, f"map {spec.name}")
    else:
        fd = sys_bpf(Cmd.MAP_CREATE, attr, f"map {spec.name}")
    return Map(fd, spec)


def map_from_fd(fd: int, name: str | None = None) -> Map:
    """Wrap (and take ownership of) a raw map fd; its spec comes from the kernel's map info."""
    info = _map_info_fd(fd)
    return Map(fd, info.spec(name))


def check_compatible(m: Map | int, spec: MapSpec) -> None:
    """Raise IncompatibleMapError unless the map behind ``m`` could come from ``spec``."""
    info = map_info(m)
    have = (info.type, info.key_size, info.value_size, info.max_entries, info.flags)
    want = (int(spec.type), spec.key_size, spec.value_size, spec.max_entries, spec.flags)
    if have != want:
        fields = ("type", "key_size", "value_size", "max_entries", "flags")
        diffs = ", ".join(
            f"{f} {h} != {w}" for f, h, w in zip(fields, have, want, strict=True) if h != w
        )
        raise IncompatibleMapError(
            f"map {spec.name} (id {info.id}) does not match its spec: {diffs}"
        )


# --- programs --------------------------------------------------------------------------------


def _prog_attr(
    spec: ProgramSpec, code: ctypes.Array[ctypes.c_char], lic: ctypes.Array[ctypes.c_char],
    btf: tuple[int, ctypes.Array[ctypes.c_char]] | None = None,
) -> ProgLoadAttr:
    attr = ProgLoadAttr(
        prog_type=spec.prog_type,
        insn_cnt=spec.insn_count,
        insns=ctypes.addressof(code),
        license=ctypes.addressof(lic),
        prog_name=_name(spec.name),
    )
    if spec.expected_attach_type is not None:
        attr.expected_attach_type = spec.expected_attach_type
    if btf is not None:
        # struct bpf_func_info { u32 insn_off; u32 type_id; }
        attr.prog_btf_fd, infos = btf
        attr.func_info_rec_size = 8
        attr.func_info = ctypes.addressof(infos)
        attr.func_info_cnt = len(infos) // 8
    return attr


def btf_load(data: bytes) -> Fd:
    """BPF_BTF_LOAD of a raw BTF blob; BpfError carries the kernel's BTF log on refusal."""
    buf = ctypes.create_string_buffer(data, len(data))
    log = ctypes.create_string_buffer(LOG_SIZE_START)
    attr = BtfLoadAttr(btf=ctypes.addressof(buf), btf_size=len(data),
                       btf_log_buf=ctypes.addressof(log), btf_log_size=LOG_SIZE_START,
                       btf_log_level=1)
    fd, err = _call(Cmd.BTF_LOAD, attr)
    if err:
        _raise(Cmd.BTF_LOAD, err, log.value.decode(errors="replace").strip()[-300:])
    return Fd(fd)


def _load(attr: ProgLoadAttr) -> tuple[int, int]:
    # The verifier answers EAGAIN when a signal interrupts it; libbpf retries the same way.
    for _ in range(5):
        fd, err = _call(Cmd.PROG_LOAD, attr)
        if err != errno.EAGAIN:
            break
    return fd, err


def _log_summary(log: str) -> str:
    """The verifier's complaint: the last log line that is not its closing statistics."""
    for line in reversed(log.splitlines()):
        if line.strip() and not line.startswith(("processed ", "verification time")):
            return f": {line.strip()}"
    return ""


def prog_load(spec: ProgramSpec, *, log_level: int = 0,
              func_info: tuple[Fd, bytes] | None = None) -> Prog:
    """BPF_PROG_LOAD. On refusal raise VerifierError carrying the complete verifier log.

    Without ``log_level`` the program is loaded without a log first (the fast path) and, only
    when that fails, once more with a log that grows until the whole text fits.
    ``func_info`` is the program's BTF (from btf_load) and its packed bpf_func_info records,
    needed for global functions.
    """
    code = ctypes.create_string_buffer(spec.code, len(spec.code))
    lic = ctypes.create_string_buffer(spec.license.encode())
    btf = None
    if func_info is not None:
        btf = (func_info[0].fd, ctypes.create_string_buffer(func_info[1], len(func_info[1])))
    detail = f"program {spec.name}"
    if not log_level:
        attr = _prog_attr(spec, code, lic, btf)
        fd, err = _load(attr)
        if not err:
            return Prog(fd, spec)
        if err in (errno.EPERM, errno.ENOMEM, errno.EBADF):
            _raise(Cmd.PROG_LOAD, err, detail)
    size = LOG_SIZE_START
    while True:
        log = ctypes.create_string_buffer(size)
        attr = _prog_attr(spec, code, lic, btf)
        attr.log_level = log_level or LogLevel.LEVEL1
        attr.log_size = size
        attr.log_buf = ctypes.addressof(log)
        fd, err = _load(attr)
        text = log.value.decode(errors="replace")
        # ENOSPC: the log did not fit (the program itself may be fine); the kernel tells
        # how much it needed in log_true_size.
        if err == errno.ENOSPC and size < LOG_SIZE_MAX:
            size = min(LOG_SIZE_MAX, max(size * 2, attr.log_true_size))
            continue
        if not err:
            return Prog(fd, spec, text)
        tail = _log_summary(text)
        raise VerifierError(err, f"BPF_PROG_LOAD {detail}: {_strerror(err)}{tail}", text)


def prog_from_fd(fd: int) -> Prog:
    """Wrap (and take ownership of) a raw program fd."""
    return Prog(fd)


def prog_test_run(
    prog: Prog | int,
    data: bytes,
    *,
    ctx_in: bytes | None = None,
    repeat: int = 1,
    data_size_out: int | None = None,
    flags: int = 0,
    cpu: int = 0,
) -> TestRunResult:
    """BPF_PROG_TEST_RUN: run the program ``repeat`` times on ``data`` (a whole frame)."""
    din = ctypes.create_string_buffer(bytes(data), len(data))
    out_size = len(data) + 256 if data_size_out is None else data_size_out
    dout = ctypes.create_string_buffer(max(out_size, 1))
    attr = TestRunAttr(
        prog_fd=_fdnum(prog),
        data_size_in=len(data),
        data_size_out=out_size,
        data_in=ctypes.addressof(din),
        data_out=ctypes.addressof(dout),
        repeat=repeat,
        flags=flags,
        cpu=cpu,
    )
    cin = cout = None
    if ctx_in is not None:
        cin = ctypes.create_string_buffer(bytes(ctx_in), max(len(ctx_in), 1))
        cout = ctypes.create_string_buffer(max(len(ctx_in), 1))
        attr.ctx_in = ctypes.addressof(cin)
        attr.ctx_size_in = len(ctx_in)
        attr.ctx_out = ctypes.addressof(cout)
        attr.ctx_size_out = len(ctx_in)
    sys_bpf(Cmd.PROG_TEST_RUN, attr)
    retval = attr.retval - (1 << 32) if attr.retval >= 1 << 31 else attr.retval
    data_out = dout.raw[: min(attr.data_size_out, out_size)]
    ctx_out = None if cout is None else cout.raw[: min(attr.ctx_size_out, len(ctx_in or b""))]
    return TestRunResult(retval, attr.duration, data_out, ctx_out)


# --- pinning ---------------------------------------------------------------------------------


def obj_pin(fd: int | Fd, path: str) -> None:
    """BPF_OBJ_PIN: pin a map, program or link at ``path`` inside a bpffs mount."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    sys_bpf(Cmd.OBJ_PIN, ObjAttr(pathname=ctypes.addressof(p), bpf_fd=_fdnum(fd)), path)


def obj_get(path: str, flags: int = 0) -> int:
    """BPF_OBJ_GET: a new raw fd for the object pinned at ``path`` (the caller owns it)."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    return sys_bpf(Cmd.OBJ_GET, ObjAttr(pathname=ctypes.addressof(p), file_flags=flags), path)


# --- links -----------------------------------------------------------------------------------


def link_create(prog: Prog | int, target: int, attach_type: AttachType, flags: int = 0) -> Link:
    """BPF_LINK_CREATE with no per-type data (``target`` is an fd or ifindex per type)."""
    attr = LinkCreateAttr(
        prog_fd=_fdnum(prog), target_fd=target, attach_type=attach_type, flags=flags
    )
    return Link(sys_bpf(Cmd.LINK_CREATE, attr, attach_type.name))


def link_create_netfilter(
    prog: Prog | int, pf: int, hooknum: int, priority: int, flags: int = 0
) -> Link:
    """A netfilter link at (pf, hooknum, priority); ``flags`` e.g. NETFILTER_IP_DEFRAG."""
    attr = LinkCreateNetfilterAttr(
        prog_fd=_fdnum(prog),
        attach_type=AttachType.NETFILTER,
        pf=pf,
        hooknum=hooknum,
        priority=priority,
        nf_flags=flags,
    )
    return Link(sys_bpf(Cmd.LINK_CREATE, attr, f"netfilter pf {pf} hook {hooknum} prio {priority}"))


def link_create_xdp(prog: Prog | int, ifindex: int, flags: int = 0) -> Link:
    """An XDP link on ``ifindex`` (``flags``: XdpFlag mode bits)."""
    attr = LinkCreateAttr(
        prog_fd=_fdnum(prog), target_fd=ifindex, attach_type=AttachType.XDP, flags=flags
    )
    return Link(sys_bpf(Cmd.LINK_CREATE, attr, f"xdp ifindex {ifindex}"))


def link_create_tcx(
    prog: Prog | int,
    ifindex: int,
    attach_type: AttachType,
    flags: int = 0,
    relative_fd: int = 0,
    expected_revision: int = 0,
) -> Link:
    """A tcx link (TCX_INGRESS or TCX_EGRESS) on ``ifindex``; ordering via AttachFlag."""
    if attach_type not in (AttachType.TCX_INGRESS, AttachType.TCX_EGRESS):
        raise ValueError(f"tcx link needs TCX_INGRESS or TCX_EGRESS, not {attach_type!r}")
    attr = LinkCreateTcxAttr(
        prog_fd=_fdnum(prog),
        target_fd=ifindex,
        attach_type=attach_type,
        flags=flags,
        relative_fd=relative_fd,
        expected_revision=expected_revision,
    )
    return Link(sys_bpf(Cmd.LINK_CREATE, attr, f"{attach_type.name} ifindex {ifindex}"))


def link_update(
    link: Link | int, new_prog: Prog | int, *, old_prog: Prog | int | None = None
) -> None:
    """BPF_LINK_UPDATE: swap the program; with ``old_prog`` only if that one is attached."""
    attr = LinkUpdateAttr(link_fd=_fdnum(link), new_prog_fd=_fdnum(new_prog))
    if old_prog is not None:
        attr.flags = AttachFlag.REPLACE
        attr.old_prog_fd = _fdnum(old_prog)
    sys_bpf(Cmd.LINK_UPDATE, attr)


def link_detach(link: Link | int) -> None:
    """BPF_LINK_DETACH: detach now; the fd stays valid but the link is defunct."""
    sys_bpf(Cmd.LINK_DETACH, LinkDetachAttr(link_fd=_fdnum(link)))


def link_from_fd(fd: int) -> Link:
    """Wrap (and take ownership of) a raw link fd."""
    return Link(fd)


# --- object info -----------------------------------------------------------------------------


def _get_info(fd: int, info: _S) -> _S:
    attr = InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    sys_bpf(Cmd.OBJ_GET_INFO_BY_FD, attr, f"fd {fd}")
    return info


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def require_prog_type(prog: Prog | int, expected: ProgType, what: str) -> ProgInfo:
    """Refuse, before any attach syscall, a program whose type is not ``expected``."""
    info = prog_info(prog)
    if info.type != expected:
        actual = info.type.name if isinstance(info.type, ProgType) else str(info.type)
        raise TypeError(f"{what} needs a program of type {expected.name}, not {actual}")
    return info


def prog_info(fd: Prog | int) -> ProgInfo:
    """Decode struct bpf_prog_info for a program, including the ids of the maps it uses."""
    n = _fdnum(fd)
    info = _get_info(n, BpfProgInfo())
    map_ids: tuple[int, ...] = ()
    if info.nr_map_ids:
        ids = (u32 * info.nr_map_ids)()
        again = BpfProgInfo(nr_map_ids=info.nr_map_ids, map_ids=ctypes.addressof(ids))
        _get_info(n, again)
        map_ids = tuple(ids[: min(again.nr_map_ids, info.nr_map_ids)])
    return ProgInfo(
        type=_enum_or_int(ProgType, info.type),
        id=info.id,
        name=_cstr(bytes(info.name)),
        tag=bytes(info.tag),
        xlated_insns=info.xlated_prog_len // 8,
        jited_len=info.jited_prog_len,
        verified_insns=info.verified_insns,
        map_ids=map_ids,
        gpl_compatible=bool(info.gpl_compatible),
        load_time_ns=info.load_time,
        created_by_uid=info.created_by_uid,
        btf_id=info.btf_id,
        run_time_ns=info.run_time_ns,
        run_cnt=info.run_cnt,
    )


def _map_info_fd(fd: int) -> MapInfo:
    info = _get_info(fd, BpfMapInfo())
    return MapInfo(
        type=_enum_or_int(MapType, info.type),
        id=info.id,
        name=_cstr(bytes(info.name)),
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
        flags=info.map_flags,
        map_extra=info.map_extra,
    )


def map_info(fd: Map | int) -> MapInfo:
    """Decode struct bpf_map_info."""
    return _map_info_fd(_fdnum(fd))


def link_info(fd: Link | int) -> LinkInfo:
    """Decode struct bpf_link_info, with the netfilter, xdp and tcx parts."""
    info = _get_info(_fdnum(fd), BpfLinkInfo())
    kind = _enum_or_int(LinkType, info.type)
    head = {"type": kind, "id": info.id, "prog_id": info.prog_id}
    if kind == LinkType.NETFILTER:
        nf = info.netfilter
        return LinkInfo(
            **head, pf=nf.pf, hooknum=nf.hooknum, priority=nf.priority, nf_flags=nf.flags
        )
    if kind == LinkType.XDP:
        return LinkInfo(**head, ifindex=info.xdp.ifindex)
    if kind == LinkType.TCX:
        return LinkInfo(
            **head,
            ifindex=info.tcx.ifindex,
            attach_type=_enum_or_int(AttachType, info.tcx.attach_type),
        )
    return LinkInfo(**head)


# --- ids -------------------------------------------------------------------------------------


def _next_ids(cmd: Cmd) -> Iterator[int]:
    attr = GetIdAttr(id=0)
    while True:
        _, err = _call(cmd, attr)
        if err == errno.ENOENT:
            return
        if err:
            _raise(cmd, err)
        yield attr.next_id
        attr.id = attr.next_id


def prog_ids() -> Iterator[int]:
    """Ids of every loaded program, ascending."""
    return _next_ids(Cmd.PROG_GET_NEXT_ID)


def map_ids() -> Iterator[int]:
    """Ids of every map, ascending."""
    return _next_ids(Cmd.MAP_GET_NEXT_ID)


def link_ids() -> Iterator[int]:
    """Ids of every link, ascending."""
    return _next_ids(Cmd.LINK_GET_NEXT_ID)


def prog_get_fd_by_id(prog_id: int) -> Prog:
    """A new fd for the program with this id."""
    return Prog(sys_bpf(Cmd.PROG_GET_FD_BY_ID, GetIdAttr(id=prog_id), f"id {prog_id}"))


def map_get_fd_by_id(map_id: int) -> Map:
    """A new fd for the map with this id, its spec from the kernel's map info."""
    return map_from_fd(sys_bpf(Cmd.MAP_GET_FD_BY_ID, GetIdAttr(id=map_id), f"id {map_id}"))


def link_get_fd_by_id(link_id: int) -> Link:
    """A new fd for the link with this id."""
    return Link(sys_bpf(Cmd.LINK_GET_FD_BY_ID, GetIdAttr(id=link_id), f"id {link_id}"))
