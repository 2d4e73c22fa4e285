"""Kernel tests for bpfilter.bpf: program loads and test runs, every map type, pins and info."""

from __future__ import annotations

import ctypes
import errno
import gc
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpfilter import bpf
from bpfilter.btf import Btf
from bpfilter.codegen import asm
from bpfilter.codegen.asm import Label
from bpfilter.codegen.helpers import BpfFunc
from bpfilter.codegen.insn import FP, R0, R1, R2, R3, R4, R5, Insn
from bpfilter.codegen.link import link
from bpfilter.codegen.opcodes import Size
from bpfilter.codegen.spec import MapSpec, ProgramSpec
from bpfilter.codegen.uapi import (
    AttachType,
    MapFlag,
    MapType,
    NfHook,
    NfProto,
    NfVerdict,
    ProgType,
    TcAction,
    UpdateFlag,
    XdpAction,
)
from bpfilter.testbed import checksum

BLOCKED = "198.18.0.1"
ALLOWED = "198.18.0.2"


# --- packets ---------------------------------------------------------------------------------


def udp_frame(src: str, dst: str = "198.19.0.1", payload: bytes = b"bpfilter") -> bytes:
    """Ethernet + IPv4 + UDP, with a valid IPv4 header checksum."""
    udp = struct.pack("!HHHH", 40000, 53, 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45, 0, 20 + len(udp), 1, 0, 64, socket.IPPROTO_UDP, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )  # fmt: skip
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    eth = bytes.fromhex("020000000002020000000001") + struct.pack("!H", 0x0800)
    return eth + ip + udp


def ipv4_le(addr: str) -> int:
    """The address as the u32 a little-endian 4-byte load of its network bytes gives."""
    return int.from_bytes(socket.inet_aton(addr), "little")


def nf_ctx(hook: int = NfHook.LOCAL_IN, pf: int = NfProto.IPV4) -> bytes:
    """ctx_in for a netfilter test run: struct nf_hook_state with hook and pf, rest zero."""
    size = Btf.load().struct_size("nf_hook_state")
    return bytes([hook, pf]) + bytes(size - 2)


# --- programs --------------------------------------------------------------------------------


def direct_access_filter(data_off: int, end_off: int, drop: int, accept: int) -> list[Insn | Label]:
    """XDP/TC: read data/data_end from the context, bounds-check, compare the IPv4 source."""
    ip_src = 14 + 12
    return [
        asm.ldx(Size.W, R2, R1, data_off),
        asm.ldx(Size.W, R3, R1, end_off),
        asm.mov64(R4, R2),
        asm.add64(R4, ip_src + 4),
        asm.jgt(R4, R3, "accept"),
        asm.ldx(Size.W, R5, R2, ip_src),
        asm.jeq(R5, ipv4_le(BLOCKED), "drop"),
        Label("accept"),
        asm.mov64(R0, accept),
        asm.exit_(),
        Label("drop"),
        asm.mov64(R0, drop),
        asm.exit_(),
    ]


def netfilter_filter(btf: Btf) -> bytes:
    """Netfilter: dynptr over ctx->skb, slice the IPv4 header, compare the source address."""
    dynptr, buf = -16, -40  # 16-byte dynptr, then a 20-byte (8-aligned) slice buffer
    program = [
        asm.ldx(Size.DW, R1, R1, btf.member_offset("bpf_nf_ctx", "skb")),
        asm.mov64(R2, 0),
        asm.mov64(R3, FP),
        asm.add64(R3, dynptr),
        asm.call_kfunc("bpf_dynptr_from_skb"),
        asm.jne(R0, 0, "accept"),
        asm.mov64(R1, FP),
        asm.add64(R1, dynptr),
        asm.mov64(R2, 0),
        asm.mov64(R3, FP),
        asm.add64(R3, buf),
        asm.mov64(R4, 20),
        asm.call_kfunc("bpf_dynptr_slice"),
        asm.jeq(R0, 0, "accept"),
        asm.ldx(Size.W, R1, R0, 12),
        asm.jeq(R1, ipv4_le(BLOCKED), "drop"),
        Label("accept"),
        asm.mov64(R0, NfVerdict.ACCEPT),
        asm.exit_(),
        Label("drop"),
        asm.mov64(R0, NfVerdict.DROP),
        asm.exit_(),
    ]
    kfuncs = {name: btf.kfunc_id(name) for name in ("bpf_dynptr_from_skb", "bpf_dynptr_slice")}
    return link(program, kfuncs=kfuncs).code


def returns(value: int) -> bytes:
    return link([asm.mov64(R0, value), asm.exit_()]).code


def load(name: str, prog_type: ProgType, code: bytes) -> bpf.Prog:
    return bpf.prog_load(ProgramSpec(name, prog_type, code))


@pytest.fixture(scope="module")
def btf() -> Btf:
    return Btf.load()


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        assert e.errno == errno.EBADF
        return False
    return True


# --- program types and test runs -------------------------------------------------------------


def test_xdp_program_drops_blocked_source() -> None:
    code = link(direct_access_filter(0, 4, XdpAction.DROP, XdpAction.PASS)).code
    with load("t_xdp", ProgType.XDP, code) as prog:
        blocked = bpf.prog_test_run(prog, udp_frame(BLOCKED))
        allowed = bpf.prog_test_run(prog, udp_frame(ALLOWED), repeat=100)
        assert blocked.retval == XdpAction.DROP
        assert allowed.retval == XdpAction.PASS
        assert allowed.data_out == udp_frame(ALLOWED)
        # One byte short of the source address: the bounds check sends it to PASS.
        assert bpf.prog_test_run(prog, udp_frame(BLOCKED)[:29]).retval == XdpAction.PASS


def test_tc_program_drops_blocked_source(btf: Btf) -> None:
    data = btf.member_offset("__sk_buff", "data")
    end = btf.member_offset("__sk_buff", "data_end")
    code = link(direct_access_filter(data, end, TcAction.SHOT, TcAction.OK)).code
    with load("t_tc", ProgType.SCHED_CLS, code) as prog:
        assert bpf.prog_test_run(prog, udp_frame(BLOCKED)).retval == TcAction.SHOT
        assert bpf.prog_test_run(prog, udp_frame(ALLOWED)).retval == TcAction.OK


def test_tc_retval_is_signed() -> None:
    with load("t_tcnext", ProgType.SCHED_CLS, returns(TcAction.NEXT)) as prog:
        assert bpf.prog_test_run(prog, udp_frame(ALLOWED)).retval == TcAction.NEXT


def test_netfilter_program_drops_blocked_source(btf: Btf) -> None:
    spec = ProgramSpec(
        "t_nf", ProgType.NETFILTER, netfilter_filter(btf), expected_attach_type=AttachType.NETFILTER
    )
    with bpf.prog_load(spec) as prog:
        for hook in NfHook:
            # Kernel quirk: at LOCAL_OUT the test run takes the bare IPv4 packet (it answers
            # EPROTO without), at every other hook a whole Ethernet frame.
            strip = 14 if hook == NfHook.LOCAL_OUT else 0
            ctx = nf_ctx(hook)
            blocked = bpf.prog_test_run(prog, udp_frame(BLOCKED)[strip:], ctx_in=ctx)
            allowed = bpf.prog_test_run(prog, udp_frame(ALLOWED)[strip:], ctx_in=ctx, repeat=1000)
            assert blocked.retval == NfVerdict.DROP
            assert allowed.retval == NfVerdict.ACCEPT
            assert allowed.duration_ns > 0


def test_netfilter_program_must_return_verdict() -> None:
    spec = ProgramSpec(
        "t_nfbad", ProgType.NETFILTER, returns(2), expected_attach_type=AttachType.NETFILTER
    )
    with pytest.raises(bpf.VerifierError) as info:
        bpf.prog_load(spec)
    assert "R0" in info.value.log


def test_verifier_error_carries_log() -> None:
    # Instruction 1 reads the packet without a bounds check.
    code = link([asm.ldx(Size.W, R2, R1, 0), asm.ldx(Size.W, R0, R2, 0), asm.exit_()]).code
    with pytest.raises(bpf.VerifierError) as info:
        load("t_reject", ProgType.XDP, code)
    err = info.value
    assert err.errno == errno.EACCES
    assert "BPF_PROG_LOAD" in str(err) and "t_reject" in str(err)
    assert "1: (61) r0 = *(u32 *)(r2 +0)" in err.log
    assert "R2 offset is outside of the packet" in err.log
    assert str(err).endswith("Permission denied: R2 offset is outside of the packet")
    assert isinstance(err, bpf.BpfError) and isinstance(err, OSError)


def test_verifier_log_grows_until_complete(monkeypatch: pytest.MonkeyPatch) -> None:
    code = link([asm.mov64(R0, 0)] * 40 + [asm.ldx(Size.W, R0, R3, 0), asm.exit_()]).code
    with pytest.raises(bpf.VerifierError) as full:
        load("t_big", ProgType.XDP, code)
    monkeypatch.setattr(bpf, "LOG_SIZE_START", 64)
    with pytest.raises(bpf.VerifierError) as grown:
        load("t_big", ProgType.XDP, code)
    assert len(full.value.log) > 64
    assert grown.value.log == full.value.log
    assert "R3 !read_ok" in grown.value.log


def test_log_level_keeps_log_of_accepted_program(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bpf, "LOG_SIZE_START", 16)  # also exercises ENOSPC on success
    with bpf.prog_load(ProgramSpec("t_log", ProgType.XDP, returns(2)), log_level=2) as prog:
        assert "processed 2 insns" in prog.log


# --- fd ownership ----------------------------------------------------------------------------


def test_fd_close_detach_and_gc() -> None:
    prog = load("t_fd", ProgType.XDP, returns(2))
    fd = prog.fd
    assert prog.fileno() == fd and fd_is_open(fd)
    prog.close()
    prog.close()  # idempotent
    assert prog.closed and not fd_is_open(fd)
    with pytest.raises(ValueError):
        _ = prog.fd

    with load("t_fd", ProgType.XDP, returns(2)) as prog2:
        raw = prog2.release()
    assert fd_is_open(raw)
    wrapped = bpf.prog_from_fd(raw)
    assert wrapped.info().name == "t_fd"
    del wrapped
    gc.collect()
    assert not fd_is_open(raw)


# --- maps ------------------------------------------------------------------------------------


def u32(n: int) -> bytes:
    return n.to_bytes(4, "little")


def u64(n: int) -> bytes:
    return n.to_bytes(8, "little")


def test_hash_map_elements_and_iteration() -> None:
    with bpf.map_create(MapSpec("t_hash", MapType.HASH, 4, 8, 64)) as m:
        assert m.lookup(u32(1)) is None
        m.update(u32(1), u64(10))
        m.update(u32(2), u64(20), UpdateFlag.NOEXIST)
        with pytest.raises(FileExistsError) as exists:
            m.update(u32(2), u64(21), UpdateFlag.NOEXIST)
        assert "BPF_MAP_UPDATE_ELEM" in str(exists.value)
        with pytest.raises(FileNotFoundError):
            m.update(u32(3), u64(30), UpdateFlag.EXIST)
        m.update(u32(2), u64(22), UpdateFlag.EXIST)
        assert m.lookup(u32(2)) == u64(22)
        assert sorted(m.keys()) == [u32(1), u32(2)]
        assert dict(m.items()) == {u32(1): u64(10), u32(2): u64(22)}
        assert m.delete(u32(1)) is True
        assert m.delete(u32(1)) is False
        assert list(m.keys()) == [u32(2)]
        with pytest.raises(ValueError):
            m.lookup(b"\0\0")
        with pytest.raises(ValueError):
            m.update(u32(5), b"short")


def test_hash_map_batches() -> None:
    with bpf.map_create(MapSpec("t_hbatch", MapType.HASH, 4, 8, 1000)) as m:
        items = [(u32(i), u64(i * 3)) for i in range(500)]
        assert m.update_batch(items) == 500
        got = m.lookup_batch(chunk=64)  # several rounds of in/out batch tokens
        assert sorted(got) == sorted(items)
        assert m.delete_batch([u32(i) for i in range(100)]) == 100
        assert len(list(m.keys())) == 400
        drained = m.lookup_batch(chunk=128, delete=True)
        assert len(drained) == 400 and m.next_key(None) is None
        assert m.lookup_batch() == []
        m.update_batch(items)
        assert sorted(m.lookup_batch(chunk=1)) == sorted(items)  # grows past full buckets


def test_array_map() -> None:
    with bpf.map_create(MapSpec("t_array", MapType.ARRAY, 4, 4, 8)) as m:
        assert m.lookup(u32(7)) == u32(0)
        assert m.lookup(u32(8)) is None
        m.update(u32(3), u32(33))
        assert list(m.keys()) == [u32(i) for i in range(8)]
        with pytest.raises(bpf.BpfError) as info:
            m.delete(u32(3))
        assert info.value.errno == errno.EINVAL
        m.update_batch([(u32(0), u32(100)), (u32(1), u32(101))])
        assert m.lookup_batch(chunk=3)[:4] == [
            (u32(0), u32(100)),
            (u32(1), u32(101)),
            (u32(2), u32(0)),
            (u32(3), u32(33)),
        ]


def test_percpu_array_map() -> None:
    ncpu = bpf.possible_cpus()
    with open("/sys/devices/system/cpu/possible") as f:
        assert ncpu == bpf.parse_cpu_list(f.read()) >= 1
    with bpf.map_create(MapSpec("t_percpu", MapType.PERCPU_ARRAY, 4, 4, 4)) as m:
        assert m.value_stride == 8 * ncpu  # 4-byte values sit in 8-byte slots
        assert m.lookup_percpu(u32(0)) == [u32(0)] * ncpu
        values = [u32(100 + cpu) for cpu in range(ncpu)]
        m.update_percpu(u32(1), values)
        assert m.lookup_percpu(u32(1)) == values
        m.update(u32(2), u32(7))  # one value: stored on every CPU
        assert m.lookup_percpu(u32(2)) == [u32(7)] * ncpu
        with pytest.raises(TypeError):
            m.lookup(u32(1))
        batch = dict(m.lookup_batch())
        assert m.split_percpu(batch[u32(1)]) == values


def lpm_key(cidr: str) -> bytes:
    addr, _, plen = cidr.partition("/")
    return u32(int(plen or 32)) + socket.inet_aton(addr)


def test_lpm_trie_longest_prefix() -> None:
    spec = MapSpec("t_lpm", MapType.LPM_TRIE, 8, 4, 16, flags=MapFlag.NO_PREALLOC)
    with bpf.map_create(spec) as m:
        m.update(lpm_key("198.18.0.0/15"), u32(1))
        m.update(lpm_key("198.18.5.0/24"), u32(2))
        m.update_batch([(lpm_key("198.18.5.7/32"), u32(3))])
        assert m.lookup(lpm_key("198.18.5.7")) == u32(3)
        assert m.lookup(lpm_key("198.18.5.8")) == u32(2)
        assert m.lookup(lpm_key("198.19.1.1")) == u32(1)
        assert m.lookup(lpm_key("10.0.0.1")) is None
        assert len(list(m.keys())) == 3
        assert m.delete(lpm_key("198.18.5.0/24"))
        assert m.lookup(lpm_key("198.18.5.8")) == u32(1)


def test_ringbuf_written_by_program_read_via_mmap() -> None:
    with bpf.map_create(MapSpec("t_ring", MapType.RINGBUF, 0, 0, 4096)) as ring:
        # Each run writes the 8-byte value found at offset 14 of the packet (after Ethernet).
        program = [
            asm.ldx(Size.W, R2, R1, 0),
            asm.ldx(Size.W, R3, R1, 4),
            asm.mov64(R4, R2),
            asm.add64(R4, 22),
            asm.jgt(R4, R3, "out"),
            asm.ldx(Size.DW, R2, R2, 14),
            asm.stx(Size.DW, FP, -8, R2),
            asm.ld_map_fd(R1, "ring"),
            asm.mov64(R2, FP),
            asm.add64(R2, -8),
            asm.mov64(R3, 8),
            asm.mov64(R4, 0),
            asm.call_helper(BpfFunc.ringbuf_output),
            Label("out"),
            asm.mov64(R0, XdpAction.PASS),
            asm.exit_(),
        ]
        code = link(program, maps={"ring": ring.fd}).code
        with load("t_ringw", ProgType.XDP, code) as prog, bpf.RingBuffer(ring) as reader:
            assert reader.read() == [] and not reader.wait(0)
            for n in (1, 2):
                bpf.prog_test_run(prog, bytes(14) + u64(0xBEEF00 + n) + bytes(42))
            assert reader.wait(0)
            assert reader.read() == [u64(0xBEEF01), u64(0xBEEF02)]
            assert reader.read() == [] and not reader.wait(0)
            for n in range(600):  # wraps around the 4 KiB data area (16-byte records)
                bpf.prog_test_run(prog, bytes(14) + u64(n) + bytes(42))
                if n % 100 == 99:
                    assert reader.read() == [u64(i) for i in range(n - 99, n + 1)]


def test_prog_array_tail_call() -> None:
    with bpf.map_create(MapSpec("t_jmp", MapType.PROG_ARRAY, 4, 4, 2)) as jmp:
        caller_code = link(
            [
                asm.ld_map_fd(R2, "jmp"),
                asm.mov64(R3, 0),
                asm.call_helper(BpfFunc.tail_call),
                asm.mov64(R0, XdpAction.PASS),  # reached only when slot 0 is empty
                asm.exit_(),
            ],
            maps={"jmp": jmp.fd},
        ).code
        with (
            load("t_caller", ProgType.XDP, caller_code) as caller,
            load("t_target", ProgType.XDP, returns(XdpAction.DROP)) as target,
        ):
            assert bpf.prog_test_run(caller, bytes(64)).retval == XdpAction.PASS
            jmp.update(u32(0), target)
            assert jmp.lookup(u32(0)) == u32(target.id)
            assert bpf.prog_test_run(caller, bytes(64)).retval == XdpAction.DROP
            assert jmp.delete(u32(0))
            assert bpf.prog_test_run(caller, bytes(64)).retval == XdpAction.PASS
            assert jmp.info().id in caller.info().map_ids


@pytest.mark.parametrize("outer_type", [MapType.ARRAY_OF_MAPS, MapType.HASH_OF_MAPS])
def test_map_in_map(outer_type: MapType) -> None:
    inner_spec = MapSpec("t_inner", MapType.ARRAY, 4, 4, 1)
    spec = MapSpec("t_outer", outer_type, 4, 4, 4, inner=inner_spec)
    with bpf.map_create(spec) as outer, bpf.map_create(inner_spec) as inner:
        outer.update(u32(1), inner)
        assert outer.lookup(u32(1)) == u32(inner.info().id)
        assert outer.delete(u32(1))
        with (
            bpf.map_create(MapSpec("t_wrong", MapType.HASH, 4, 4, 1)) as wrong,
            pytest.raises(bpf.BpfError, match="BPF_MAP_UPDATE_ELEM"),
        ):
            outer.update(u32(2), wrong)  # an inner map of another shape is refused
    with pytest.raises(ValueError):
        bpf.map_create(MapSpec("t_noinner", outer_type, 4, 4, 4))


# --- pins, info and ids ----------------------------------------------------------------------


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    root = Path("/sys/fs/bpf")
    mounts = Path("/proc/self/mounts").read_text().split("\n")
    if not any(line.split(" ")[1:3] == [str(root), "bpf"] for line in mounts if line):
        subprocess.run(["mount", "-t", "bpf", "bpf", str(root)], check=True)
    d = root / f"bpft-{os.getpid()}-{secrets.token_hex(4)}"
    d.mkdir()
    try:
        yield d
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


def test_pin_and_get_map(pin_dir: Path) -> None:
    spec = MapSpec("t_pinned", MapType.HASH, 4, 4, 8)
    path = str(pin_dir / "m")
    with bpf.map_create(spec) as m:
        m.update(u32(1), u32(11))
        bpf.obj_pin(m, path)
        with pytest.raises(FileExistsError):
            bpf.obj_pin(m, path)
    with bpf.map_from_fd(bpf.obj_get(path)) as again:
        assert again.lookup(u32(1)) == u32(11)
        assert again.spec.compatible(spec) and again.spec.name == "t_pinned"
        again.check_compatible(spec)
        with pytest.raises(bpf.IncompatibleMapError, match="max_entries 8 != 9"):
            again.check_compatible(MapSpec("t_pinned", MapType.HASH, 4, 4, 9))
    with pytest.raises(FileNotFoundError):
        bpf.obj_get(str(pin_dir / "missing"))


def test_info_and_ids() -> None:
    with (
        bpf.map_create(MapSpec("t_info", MapType.LPM_TRIE, 8, 4, 5, MapFlag.NO_PREALLOC)) as m,
        load("t_info", ProgType.XDP, returns(2)) as prog,
    ):
        mi = m.info()
        assert (mi.type, mi.name, mi.key_size, mi.value_size, mi.max_entries, mi.flags) == (
            MapType.LPM_TRIE, "t_info", 8, 4, 5, MapFlag.NO_PREALLOC,
        )  # fmt: skip
        pi = prog.info()
        assert (pi.type, pi.name, pi.xlated_insns, pi.gpl_compatible) == (
            ProgType.XDP, "t_info", 2, True,
        )  # fmt: skip
        assert pi.id == prog.id > 0 and len(pi.tag) == 8 and pi.map_ids == ()
        assert prog.id in set(bpf.prog_ids())
        assert mi.id in set(bpf.map_ids())
        with bpf.prog_get_fd_by_id(prog.id) as same:
            assert same.fd != prog.fd and same.info().tag == pi.tag
        with bpf.map_get_fd_by_id(mi.id) as same_map:
            m.update(lpm_key("198.18.0.0/16"), u32(4))
            assert same_map.lookup(lpm_key("198.18.1.1")) == u32(4)
            assert same_map.spec.compatible(m.spec)
    with pytest.raises(FileNotFoundError):
        bpf.prog_get_fd_by_id(0x7FFFFFFF)


def test_object_names_are_sanitised() -> None:
    with load("t-dash.ok", ProgType.XDP, returns(2)) as prog:
        assert prog.info().name == "t_dash.ok"


def test_errors_name_the_command() -> None:
    with pytest.raises(bpf.BpfError, match="BPF_MAP_CREATE map t_bad") as info:
        bpf.map_create(MapSpec("t_bad", MapType.HASH, 0, 4, 1))
    assert info.value.errno == errno.EINVAL


def test_link_create_refuses_bad_target() -> None:
    # Nothing is attached: the kernel refuses the hook number (EPROTO) before registering.
    spec = ProgramSpec(
        "t_nflink", ProgType.NETFILTER, returns(1), expected_attach_type=AttachType.NETFILTER
    )
    with bpf.prog_load(spec) as prog:
        with pytest.raises(bpf.BpfError, match="BPF_LINK_CREATE") as info:
            bpf.link_create_netfilter(prog, NfProto.IPV4, 42, 0)
        assert info.value.errno == errno.EPROTO
        with pytest.raises(ValueError):
            bpf.link_create_tcx(prog, 1, AttachType.XDP)


def test_struct_sizes_match_kernel_btf(btf: Btf) -> None:
    """Every attribute block's field offsets agree with the running kernel's own BTF."""

    def anon_struct_with(field: str) -> int:
        for member in btf.type(btf.struct_id("bpf_attr")).members:
            if not member.name:
                inner = btf.resolve(member.type_id)
                if any(m.name == field for m in btf.type(inner).members):
                    return inner
        raise AssertionError(field)

    bpf_attr = btf.struct_id("bpf_attr")
    blocks: list[tuple[type[ctypes.Structure], int | str, str, dict[str, str]]] = [
        (bpf.MapCreateAttr, anon_struct_with("map_type"), "", {}),
        (bpf.MapElemAttr, anon_struct_with("key"), "", {}),
        (bpf.MapBatchAttr, bpf_attr, "batch.", {}),
        (bpf.ProgLoadAttr, anon_struct_with("prog_type"), "", {}),
        (bpf.ObjAttr, anon_struct_with("pathname"), "", {}),
        (bpf.TestRunAttr, bpf_attr, "test.", {}),
        (bpf.GetIdAttr, anon_struct_with("next_id"), "", {"id": "start_id"}),
        (bpf.InfoAttr, bpf_attr, "info.", {}),
        (
            bpf.LinkCreateNetfilterAttr,
            bpf_attr,
            "link_create.",
            {
                "pf": "netfilter.pf",
                "hooknum": "netfilter.hooknum",
                "priority": "netfilter.priority",
                "nf_flags": "netfilter.flags",
            },
        ),  # fmt: skip
        (
            bpf.LinkCreateTcxAttr,
            bpf_attr,
            "link_create.",
            {"relative_fd": "tcx.relative_fd", "expected_revision": "tcx.expected_revision"},
        ),  # fmt: skip
        (bpf.LinkUpdateAttr, bpf_attr, "link_update.", {}),
        (bpf.LinkDetachAttr, bpf_attr, "link_detach.", {}),
        (bpf.BpfProgInfo, "bpf_prog_info", "", {}),
        (bpf.BpfMapInfo, "bpf_map_info", "", {}),
        (bpf.BpfLinkInfo, "bpf_link_info", "", {"u": "netfilter"}),
    ]
    for struct_type, where, prefix, renames in blocks:
        for name, *_ in struct_type._fields_:
            path = prefix + renames.get(name, name)
            loc = btf.member(where, path)
            ours = getattr(struct_type, name)
            assert loc.bit_offset == ours.offset * 8, (struct_type.__name__, name)
    assert ctypes.sizeof(bpf.BpfProgInfo) == btf.struct_size("bpf_prog_info")
    assert ctypes.sizeof(bpf.BpfLinkInfo) == btf.struct_size("bpf_link_info")
    assert ctypes.sizeof(bpf.BpfMapInfo) <= btf.struct_size("bpf_map_info")
    assert ctypes.sizeof(bpf.ProgLoadAttr) <= btf.struct_size("bpf_attr")


# --- links: created only inside a throwaway network namespace ----------------------------------

LINK_SCRIPT = r"""
import errno, json
from bpfilter import bpf
from bpfilter.codegen import asm
from bpfilter.codegen.insn import R0
from bpfilter.codegen.link import link
from bpfilter.codegen.spec import ProgramSpec
from bpfilter.codegen.uapi import AttachType, LinkType, NfHook, NfProto, ProgType, XdpFlag

def load(name, prog_type, value, attach=None):
    code = link([asm.mov64(R0, value), asm.exit_()]).code
    return bpf.prog_load(ProgramSpec(name, prog_type, code, expected_attach_type=attach))

out = {}
nf = load("t_nfl", ProgType.NETFILTER, 1, AttachType.NETFILTER)
x1, x2 = load("t_x1", ProgType.XDP, 2), load("t_x2", ProgType.XDP, 2)
tc = load("t_tcx", ProgType.SCHED_CLS, 0)
with bpf.link_create_netfilter(nf, NfProto.IPV6, NfHook.LOCAL_OUT, -123) as lk:
    i = lk.info()
    out["nf"] = [i.type == LinkType.NETFILTER, i.prog_id == nf.id, i.pf, i.hooknum,
                 i.priority, i.nf_flags, lk.id in set(bpf.link_ids())]
    try:
        bpf.link_update(lk, nf)
    except bpf.BpfError as e:
        out["nf_update"] = e.errno
with bpf.link_create_xdp(x1, 1, XdpFlag.SKB_MODE) as lk:
    i = lk.info()
    out["xdp"] = [i.type == LinkType.XDP, i.prog_id == x1.id, i.ifindex]
    bpf.link_update(lk, x2, old_prog=x1)
    out["xdp_swapped"] = lk.info().prog_id == x2.id
    try:
        bpf.link_update(lk, x1, old_prog=x1)
    except bpf.BpfError as e:
        out["xdp_stale"] = e.errno
    with bpf.link_get_fd_by_id(lk.id) as again:
        out["by_id"] = again.info().prog_id == x2.id
    bpf.link_detach(lk)
    out["detached_ifindex"] = lk.info().ifindex
with bpf.link_create_tcx(tc, 1, AttachType.TCX_INGRESS) as lk:
    i = lk.info()
    out["tcx"] = [i.type == LinkType.TCX, i.prog_id == tc.id, i.ifindex, int(i.attach_type)]
for p in (nf, x1, x2, tc):
    p.close()
print(json.dumps(out))
"""


def test_link_create_update_info_in_throwaway_netns() -> None:
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) not installed")
    name = f"bpft-{os.getpid()}-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        run = subprocess.run(
            ["ip", "netns", "exec", name, sys.executable, "-c", LINK_SCRIPT],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["nf"] == [True, True, NfProto.IPV6, NfHook.LOCAL_OUT, -123, 0, True]
    assert out["nf_update"] == errno.EOPNOTSUPP  # netfilter links cannot swap programs
    assert out["xdp"] == [True, True, 1]
    assert out["xdp_swapped"] and out["by_id"]
    assert out["xdp_stale"] == errno.EPERM  # REPLACE with a program no longer attached
    assert out["detached_ifindex"] == 0
    assert out["tcx"] == [True, True, 1, AttachType.TCX_INGRESS]
