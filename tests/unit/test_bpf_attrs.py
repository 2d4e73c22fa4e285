"""Pure checks of bpfilter.bpf: attribute layouts against linux/bpf.h, errors, fd ownership."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

from bpfilter import bpf
from bpfilter.codegen.spec import MapSpec
from bpfilter.codegen.uapi import MapType

# (structure, sizeof, {field: byte offset}) as laid out in include/uapi/linux/bpf.h.
LAYOUTS: list[tuple[type[ctypes.Structure], int, dict[str, int]]] = [
    (
        bpf.MapCreateAttr,
        72,
        {"map_type": 0, "max_entries": 12, "map_flags": 16, "inner_map_fd": 20,
         "map_name": 28, "map_ifindex": 44, "btf_vmlinux_value_type_id": 60, "map_extra": 64},
    ),
    (bpf.MapElemAttr, 32, {"map_fd": 0, "key": 8, "value": 16, "flags": 24}),
    (
        bpf.MapBatchAttr,
        56,
        {"in_batch": 0, "out_batch": 8, "keys": 16, "values": 24, "count": 32, "map_fd": 36,
         "elem_flags": 40, "flags": 48},
    ),
    (
        bpf.ProgLoadAttr,
        144,
        {"prog_type": 0, "insn_cnt": 4, "insns": 8, "license": 16, "log_level": 24,
         "log_size": 28, "log_buf": 32, "kern_version": 40, "prog_flags": 44, "prog_name": 48,
         "prog_ifindex": 64, "expected_attach_type": 68, "prog_btf_fd": 72,
         "func_info_rec_size": 76, "func_info": 80, "line_info": 96, "attach_btf_id": 108,
         "attach_prog_fd": 112, "fd_array": 120, "core_relo_rec_size": 136,
         "log_true_size": 140},
    ),
    (bpf.ObjAttr, 16, {"pathname": 0, "bpf_fd": 8, "file_flags": 12}),
    (
        bpf.TestRunAttr,
        80,
        {"prog_fd": 0, "retval": 4, "data_size_in": 8, "data_size_out": 12, "data_in": 16,
         "data_out": 24, "repeat": 32, "duration": 36, "ctx_size_in": 40, "ctx_size_out": 44,
         "ctx_in": 48, "ctx_out": 56, "flags": 64, "cpu": 68, "batch_size": 72},
    ),
    (bpf.GetIdAttr, 12, {"id": 0, "next_id": 4, "open_flags": 8}),
    (bpf.InfoAttr, 16, {"bpf_fd": 0, "info_len": 4, "info": 8}),
    (bpf.LinkCreateAttr, 16, {"prog_fd": 0, "target_fd": 4, "attach_type": 8, "flags": 12}),
    (
        bpf.LinkCreateNetfilterAttr,
        32,
        {"prog_fd": 0, "target_fd": 4, "attach_type": 8, "flags": 12, "pf": 16, "hooknum": 20,
         "priority": 24, "nf_flags": 28},
    ),
    (bpf.LinkCreateTcxAttr, 32, {"flags": 12, "relative_fd": 16, "expected_revision": 24}),
    (bpf.LinkUpdateAttr, 16, {"link_fd": 0, "new_prog_fd": 4, "flags": 8, "old_prog_fd": 12}),
    (bpf.LinkDetachAttr, 4, {"link_fd": 0}),
    (
        bpf.BpfProgInfo,
        232,
        {"type": 0, "id": 4, "tag": 8, "jited_prog_len": 16, "xlated_prog_len": 20,
         "load_time": 40, "nr_map_ids": 52, "map_ids": 56, "name": 64, "ifindex": 80,
         "gpl_compatible": 84, "netns_dev": 88, "btf_id": 128, "run_time_ns": 192,
         "verified_insns": 216, "attach_btf_id": 224},
    ),
    (
        bpf.BpfMapInfo,
        88,
        {"type": 0, "id": 4, "key_size": 8, "value_size": 12, "max_entries": 16,
         "map_flags": 20, "name": 24, "ifindex": 40, "netns_dev": 48, "btf_id": 64,
         "map_extra": 80},
    ),
    (bpf.BpfLinkInfo, 64, {"type": 0, "id": 4, "prog_id": 8, "u": 16}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("struct_type", "size", "offsets"), LAYOUTS, ids=[s.__name__ for s, *_ in LAYOUTS]
)
def test_attribute_layout(
    struct_type: type[ctypes.Structure], size: int, offsets: dict[str, int]
) -> None:
    assert ctypes.sizeof(struct_type) == size
    for name, offset in offsets.items():
        assert getattr(struct_type, name).offset == offset, name


def test_link_info_union_members() -> None:
    union = bpf.BpfLinkInfo.u.offset
    info = bpf.BpfLinkInfo()
    ctypes.memmove(
        ctypes.addressof(info) + union, (ctypes.c_int32 * 4)(2, 1, -100, 1), 16
    )  # netfilter {pf, hooknum, priority, flags}
    assert (info.netfilter.pf, info.netfilter.hooknum, info.netfilter.priority) == (2, 1, -100)
    assert info.xdp.ifindex == 2 and (info.tcx.ifindex, info.tcx.attach_type) == (2, 1)


@pytest.mark.parametrize(("text", "count"), [("0", 1), ("0-1\n", 2), ("0-3,5", 6), ("0,2-7", 8)])
def test_parse_cpu_list(text: str, count: int) -> None:
    assert bpf.parse_cpu_list(text) == count


def test_errors_map_to_oserror_subclasses() -> None:
    def error(err: int) -> bpf.BpfError:
        with pytest.raises(bpf.BpfError) as info:
            bpf._raise(bpf.Cmd.MAP_LOOKUP_ELEM, err, "map m")
        return info.value

    missing = error(errno.ENOENT)
    assert isinstance(missing, FileNotFoundError) and missing.errno == errno.ENOENT
    assert str(missing) == "[Errno 2] BPF_MAP_LOOKUP_ELEM map m: No such file or directory"
    assert isinstance(error(errno.EEXIST), FileExistsError)
    assert isinstance(error(errno.EPERM), PermissionError)
    plain = error(errno.EINVAL)
    assert type(plain) is bpf.BpfError and plain.errno == errno.EINVAL
    assert "ENOTSUPP" in str(error(524))
    verifier = bpf.VerifierError(errno.EACCES, "BPF_PROG_LOAD p: denied", "0: (95) exit\n")
    assert isinstance(verifier, bpf.BpfError) and verifier.log == "0: (95) exit\n"


def test_fd_ownership() -> None:
    r, w = os.pipe()
    os.close(w)
    fd = bpf.Fd(r)
    assert fd.fileno() == r and not fd.closed and "fd=" in repr(fd)
    with fd as same:
        assert same is fd
    assert fd.closed and "closed" in repr(fd)
    with pytest.raises(OSError):
        os.fstat(r)
    with pytest.raises(ValueError):
        fd.fileno()
    fd.close()

    r, w = os.pipe()
    os.close(w)
    owner = bpf.Fd(r)
    assert owner.release() == r
    del owner
    os.fstat(r)  # still open: detach gave up ownership
    os.close(r)
    with pytest.raises(ValueError):
        bpf.Fd(-1)


def test_map_checks_sizes_before_any_syscall(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bpf, "possible_cpus", lambda: 3)
    r, w = os.pipe()
    os.close(w)
    with bpf.Map(r, MapSpec("m", MapType.PERCPU_ARRAY, 4, 6, 2)) as m:
        assert m.percpu and m.value_stride == 3 * 8
        with pytest.raises(ValueError, match="key is 2 bytes"):
            m.lookup_percpu(b"ab")
        blob = m.join_percpu([b"aaaaaa", b"bbbbbb", b"cccccc"])
        assert blob == b"aaaaaa\0\0bbbbbb\0\0cccccc\0\0"
        assert m.split_percpu(blob) == [b"aaaaaa", b"bbbbbb", b"cccccc"]
        with pytest.raises(ValueError, match="3 per-CPU values"):
            m.join_percpu([b"aaaaaa"])
        with pytest.raises(TypeError, match="lookup_percpu"):
            m.lookup(b"abcd")
        with pytest.raises(TypeError, match="fd-holding"):
            m.update(b"abcd", 5)  # an int is an fd, only for prog_array and map-in-map


def test_object_names() -> None:
    assert bpf._name("fw-input.v4") == b"fw_input.v4"
    assert bpf._name("a" * 20) == b"a" * 15
    assert bpf._name("é-x") == b"__x"  # the kernel takes ASCII alphanumerics, '_' and '.'


def test_log_summary_skips_statistics() -> None:
    log = "0: (95) exit\nR0 !read_ok\nprocessed 1 insns (limit 1000000)\n"
    assert bpf._log_summary(log) == ": R0 !read_ok"
    assert bpf._log_summary("") == ""
