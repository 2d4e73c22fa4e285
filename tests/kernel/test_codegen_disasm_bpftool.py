"""The disassembler agrees with `bpftool prog dump xlated` on programs the kernel really loaded."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Iterator

import pytest

from bpfilter.codegen import asm
from bpfilter.codegen.asm import Label
from bpfilter.codegen.disasm import disassemble
from bpfilter.codegen.helpers import BpfFunc
from bpfilter.codegen.insn import FP, R0, R1, R2, R3, R4, R6, R7, Insn
from bpfilter.codegen.link import link
from bpfilter.codegen.opcodes import Size
from bpfilter.codegen.uapi import Cmd, MapType, ProgType

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine)
_LIBC = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: Cmd, attr: ctypes.Array[ctypes.c_char]) -> int:
    """Just enough bpf(2) for this test; the project's real syscall layer lives in bpfilter/."""
    assert _SYS_BPF is not None
    rc = _LIBC.syscall(_SYS_BPF, int(cmd), attr, len(attr))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd.name}): {os.strerror(err)}")
    return int(rc)


def _object_id(fd: int) -> int:
    info = ctypes.create_string_buffer(256)
    attr = ctypes.create_string_buffer(16)
    struct.pack_into("<IIQ", attr, 0, fd, len(info), ctypes.addressof(info))
    _bpf(Cmd.OBJ_GET_INFO_BY_FD, attr)
    return int(struct.unpack_from("<I", info, 4)[0])  # prog and map info: type, then id


@pytest.fixture
def array_map() -> Iterator[int]:
    attr = ctypes.create_string_buffer(72)
    struct.pack_into("<IIIII", attr, 0, MapType.ARRAY, 4, 16, 1, 0)
    fd = _bpf(Cmd.MAP_CREATE, attr)
    try:
        yield fd
    finally:
        os.close(fd)


def _load(code: bytes, *, log_level: int = 1) -> tuple[int, str]:
    """BPF_PROG_LOAD a socket filter: (fd, verifier log); raises with the log on failure."""
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(1 << 20)
    attr = ctypes.create_string_buffer(144)
    struct.pack_into("<IIQQIIQ", attr, 0, ProgType.SOCKET_FILTER, len(code) // 8,
                     ctypes.addressof(insns), ctypes.addressof(license_), log_level, len(log),
                     ctypes.addressof(log))
    struct.pack_into("16s", attr, 48, b"bpft_disasm")
    try:
        fd = _bpf(Cmd.PROG_LOAD, attr)
    except OSError as e:
        raise AssertionError(f"{e}\n{log.value.decode(errors='replace')}") from None
    return fd, log.value.decode(errors="replace")


def _bpftool_xlated(prog_id: int) -> list[str]:
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    if not os.path.exists(bpftool):
        pytest.skip("bpftool is not installed")
    out = subprocess.run([bpftool, "prog", "dump", "xlated", "id", str(prog_id)],
                         check=True, capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if re.match(r"^\s*\d+: ", line)]


def _program(*, v4: bool) -> list[Insn | Label]:
    """Instructions the verifier keeps as written: unknown scalars from helpers, stack memory.

    ``v4=False`` leaves out the cpu v4 forms (signed div/mod, movsx, sign-extending loads,
    bswap, gotol), which the bpftool 7.1 shipped with Debian 12 predates.
    """
    prog: list[Insn | Label] = [
        asm.call_helper(BpfFunc.ktime_get_ns),
        asm.mov64(R6, R0),
        asm.call_helper(BpfFunc.ktime_get_ns),
        asm.mov64(R7, R0),
        asm.stx(Size.DW, FP, -8, R6),
        asm.st(Size.W, FP, -16, -5),
        asm.st(Size.H, FP, -12, 7),
        asm.st(Size.B, FP, -10, 1),
        asm.st(Size.B, FP, -9, 2),
        asm.stx(Size.W, FP, -24, R7),
        asm.stx(Size.H, FP, -20, R6),
        asm.stx(Size.B, FP, -18, R6),
        asm.stx(Size.B, FP, -17, R7),
        asm.ldx(Size.DW, R1, FP, -8),
        asm.ldx(Size.W, R2, FP, -16),
        asm.ldx(Size.H, R3, FP, -12),
        asm.ldx(Size.B, R4, FP, -10),
        asm.add64(R1, R2), asm.sub64(R1, 3), asm.mul64(R1, R3), asm.div64(R1, 7),
        asm.mod64(R1, 5), asm.or64(R1, R4), asm.and64(R1, 0xFF), asm.lsh64(R1, 3),
        asm.rsh64(R1, 1), asm.arsh64(R1, 2), asm.xor64(R1, R2), asm.neg64(R1), asm.mov64(R2, -1),
        asm.add32(R2, R3), asm.sub32(R2, 1), asm.mul32(R2, 3), asm.div32(R2, 2),
        asm.mod32(R2, 6), asm.or32(R2, 8), asm.and32(R2, R4), asm.lsh32(R2, 4),
        asm.rsh32(R2, 2), asm.arsh32(R2, 1), asm.xor32(R2, 0x55), asm.neg32(R2),
        asm.mov32(R3, R2), asm.mov32(R4, 17),
        asm.to_be(R1, 16), asm.to_be(R1, 32), asm.to_be(R1, 64), asm.to_le(R2, 16),
        asm.to_le(R2, 32), asm.to_le(R2, 64),
        asm.ld_imm64(R4, 0x1122334455667788),
        asm.ld_map_fd(R1, "m"),
        asm.ld_map_value(R2, "m", 8),
        asm.mov64(R1, 5),
        asm.atomic_add(Size.DW, FP, -8, R1),
        asm.atomic_or(Size.W, FP, -16, R1),
        asm.atomic_and(Size.DW, FP, -8, R1, fetch=True),
        asm.atomic_xor(Size.W, FP, -16, R1, fetch=True),
        asm.atomic_xchg(Size.DW, FP, -8, R1),
        asm.mov64(R0, 0),
        asm.atomic_cmpxchg(Size.DW, FP, -8, R1),
    ]
    if v4:
        prog += [
            asm.ldsx(Size.W, R1, FP, -16), asm.ldsx(Size.H, R2, FP, -12),
            asm.ldsx(Size.B, R3, FP, -10), asm.sdiv64(R1, 3), asm.smod64(R1, 9),
            asm.sdiv32(R2, 3), asm.smod32(R2, 5), asm.movsx64(R1, R6, 8),
            asm.movsx64(R1, R6, 16), asm.movsx64(R1, R6, 32), asm.movsx32(R2, R6, 8),
            asm.movsx32(R2, R6, 16), asm.bswap(R3, 16), asm.bswap(R3, 32), asm.bswap(R3, 64),
        ]
    # Each condition tests a fresh unknown (r1 = r6 ^ r7), so no fall-through narrows the next
    # one and the verifier can prune none of them.
    conditions = [
        asm.jeq(R1, 0, "a"), asm.jne(R1, R6, "a"), asm.jgt(R1, 10, "a"),
        asm.jge(R1, R6, "a"), asm.jlt(R1, 3, "a"), asm.jle(R1, R6, "a"),
        asm.jset(R1, 0x80, "a"), asm.jsgt(R1, -1, "a"), asm.jsge(R1, R6, "a"),
        asm.jslt(R1, 0, "a"), asm.jsle(R1, R6, "a"),
        asm.jmp32("jeq", R1, 1, "a"), asm.jmp32("jne", R1, R6, "a"),
        asm.jmp32("jgt", R1, 0x7FFFFFFF, "a"), asm.jmp32("jsle", R1, R6, "a"),
    ]
    for cond in conditions:
        prog += [asm.mov64(R1, R6), asm.xor64(R1, R7), cond]
    prog += [
        asm.mov64(R0, 1),
        asm.gotol("out") if v4 else asm.ja("out"),
        Label("a"),
        asm.mov64(R0, 0),
        asm.jsgt(R7, 0, "out"),
        asm.mov64(R0, 2),
        Label("out"),
        asm.exit_(),
    ]
    return prog


def _log_lines(log: str) -> dict[int, str]:
    """First print of each instruction in a log_level 2 verifier log, without the state."""
    lines: dict[int, str] = {}
    for line in log.splitlines():
        m = re.match(r"^(\d+): (\([0-9a-f]{2}\) [^;]*?)\s*(?:;.*)?$", line)
        if m:
            lines.setdefault(int(m.group(1)), f"{int(m.group(1)): 4d}: {m.group(2)}")
    return lines


def test_disassembler_matches_bpftool(array_map: int) -> None:
    prog = _program(v4=False)
    map_id = _object_id(array_map)
    expected = disassemble(link(prog, maps={"m": map_id}).code)
    fd, _ = _load(link(prog, maps={"m": array_map}).code)
    try:
        got = _bpftool_xlated(_object_id(fd))
    finally:
        os.close(fd)
    assert len(got) == len(expected)
    for mine, theirs in zip(expected, got, strict=True):
        if " call " in mine:
            # The kernel rewrites a helper call's imm into an address offset; the name stays.
            assert theirs.split("#")[0] == mine.split("#")[0]
        else:
            assert theirs == mine


def test_disassembler_matches_the_verifier_log(array_map: int) -> None:
    """The 6.18 kernel's own print_bpf_insn (in its verifier log) knows the cpu v4 forms."""
    prog = _program(v4=True)
    linked = link(prog, maps={"m": array_map})
    fd, log = _load(linked.code, log_level=2)
    os.close(fd)
    logged = _log_lines(log)
    mine = disassemble(linked.code)
    checked = 0
    for line in mine:
        slot = int(line.split(":")[0])
        if "map[id:" in line:
            continue  # the log shows the kernel pointer of the map instead
        assert logged[slot] == line
        checked += 1
    assert checked == len(mine) - 2


def test_program_is_unloaded_with_its_fd() -> None:
    fd, _ = _load(link([asm.mov64(R0, 0), asm.exit_()]).code)
    prog_id = _object_id(fd)
    os.close(fd)
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    # Freeing is deferred (RCU); poll briefly for the id to disappear.
    for _ in range(200):
        done = subprocess.run([bpftool, "prog", "show", "id", str(prog_id)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            break
        os.sched_yield()
    assert done.returncode != 0
