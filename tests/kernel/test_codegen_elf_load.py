"""Objects from the ELF writer load through libbpf (bpftool) into the running kernel."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpfilter.codegen import asm
from bpfilter.codegen.asm import Label
from bpfilter.codegen.elf import ElfProgram, write_elf
from bpfilter.codegen.helpers import BpfFunc
from bpfilter.codegen.insn import FP, R0, R1, R2
from bpfilter.codegen.link import link
from bpfilter.codegen.opcodes import Size
from bpfilter.codegen.spec import MapSpec
from bpfilter.codegen.uapi import MapType, XdpAction

BPFFS = Path("/sys/fs/bpf")


def _bpftool() -> str:
    found = shutil.which("bpftool") or "/usr/sbin/bpftool"
    if not os.path.exists(found):
        pytest.skip("bpftool is not installed")
    return found


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    """A fresh directory in bpffs, removed with everything pinned in it."""
    mounts = Path("/proc/self/mounts").read_text().split("\n")
    if not any(line.split()[1:3] == [str(BPFFS), "bpf"] for line in mounts if line):
        pytest.skip(f"bpffs is not mounted at {BPFFS} (this test does not mount it)")
    path = BPFFS / f"bpft-{os.getpid()}-{secrets.token_hex(3)}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_object_with_maps_loads(pin_dir: Path, tmp_path: Path) -> None:
    prog = [
        asm.st(Size.W, FP, -4, 0),
        asm.ld_map_fd(R1, "counters"),
        asm.mov64(R2, FP),
        asm.add64(R2, -4),
        asm.call_helper(BpfFunc.map_lookup_elem),
        asm.jeq(R0, 0, "out"),
        asm.mov64(R1, 1),
        asm.atomic_add(Size.DW, R0, 0, R1),
        Label("out"),
        asm.mov64(R0, XdpAction.PASS),
        asm.exit_(),
    ]
    maps = [MapSpec("counters", MapType.ARRAY, 4, 8, 4),
            MapSpec("seen", MapType.HASH, 4, 4, 64)]
    obj = tmp_path / "prog.o"
    obj.write_bytes(write_elf([ElfProgram("xdp_count", "xdp", link(prog))], maps))
    pinned = pin_dir / "prog"
    subprocess.run([_bpftool(), "prog", "load", str(obj), str(pinned), "type", "xdp"],
                   check=True, capture_output=True, text=True)
    info = json.loads(subprocess.run([_bpftool(), "-j", "prog", "show", "pinned", str(pinned)],
                                     check=True, capture_output=True, text=True).stdout)
    assert info["name"] == "xdp_count" and info["type"] == "xdp"
    assert len(info["map_ids"]) == 1  # libbpf creates every map, the program references one
    shown = json.loads(subprocess.run(
        [_bpftool(), "-j", "map", "show", "id", str(info["map_ids"][0])],
        check=True, capture_output=True, text=True).stdout)
    assert (shown["name"], shown["type"], shown["bytes_key"], shown["bytes_value"],
            shown["max_entries"]) == ("counters", "array", 4, 8, 4)
