"""bpfilter.bpffs on the real BPF filesystem: mount, root-only pin directories, cleanup."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpfilter import bpf, bpffs, testbed
from bpfilter.codegen.spec import MapSpec
from bpfilter.codegen.uapi import MapType

MOUNTINFO = (
    "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
    "61 23 0:40 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:7 - bpf bpf rw,mode=700\n"
    r"62 27 0:41 / /mnt/with\040space rw - bpf none rw" "\n"
    "garbage line\n"
)


@pytest.fixture
def ns() -> Iterator[str]:
    """A unique pin-directory name (no namespace needed for pinning); cleaned up after."""
    name = testbed.unique_name("bpft-pins")
    yield name
    bpffs.cleanup(name)


@pytest.fixture
def small_map() -> Iterator[bpf.Map]:
    with bpf.map_create(MapSpec("bpft_pin", MapType.ARRAY, 4, 4, 1)) as m:
        yield m


def test_parse_mountinfo():
    assert bpffs.parse_mountinfo(MOUNTINFO) == [
        (Path("/proc"), "proc"),
        (Path("/sys/fs/bpf"), "bpf"),
        (Path("/mnt/with space"), "bpf"),
    ]


def test_ensure_mounted_finds_a_bpffs():
    root = bpffs.ensure_mounted()
    assert bpffs.is_bpffs(root)
    assert bpffs.find() == root
    assert not bpffs.is_bpffs(Path("/proc"))


def test_pin_dir_is_root_only(ns):
    d = bpffs.pin_dir(ns)
    root = bpffs.find()
    assert root is not None
    assert d == root / "bpfilter" / ns
    for level in (d, d.parent):
        st = os.stat(level)
        assert stat.S_IMODE(st.st_mode) == 0o700
        assert st.st_uid == 0
    # An unprivileged process cannot even look inside.
    probe = subprocess.run(["ls", str(d)], user=65534, capture_output=True, text=True)
    assert probe.returncode != 0
    assert "Permission denied" in probe.stderr


def test_host_directory_and_reserved_name():
    assert bpffs.pin_path("x").parent.name == bpffs.HOST
    with pytest.raises(bpffs.BpffsError, match="host"):
        bpffs.pin_path("x", "host")


def test_pin_get_unpin_roundtrip(ns, small_map):
    path = bpffs.pin(small_map, "m", ns)
    assert path == bpffs.pin_path("m", ns)
    assert bpffs.pins(ns) == [path]
    fd = bpffs.get("m", ns)
    try:
        assert bpf.map_info(fd).id == small_map.info().id
    finally:
        os.close(fd)
    with pytest.raises(bpffs.BpffsError, match="already pinned"):
        bpffs.pin(small_map, "m", ns)
    assert bpffs.pin(small_map, "m", ns, replace=True) == path
    assert bpffs.unpin(path)
    assert not bpffs.unpin(path)
    assert bpffs.pins(ns) == []
    with pytest.raises(bpffs.BpffsError, match="nothing pinned"):
        bpffs.get("m", ns)


@pytest.mark.parametrize("bad", ["", "..", "a/b"])
def test_invalid_pin_names(ns, small_map, bad):
    with pytest.raises(bpffs.BpffsError, match="invalid pin name"):
        bpffs.pin(small_map, bad, ns)


def test_cleanup_leaves_nothing(ns, small_map):
    d = bpffs.pin_dir(ns)
    bpffs.pin(small_map, "one", ns)
    bpffs.pin(small_map, "two", ns)
    (d / "sub").mkdir()
    bpf.obj_pin(small_map, str(d / "sub" / "three"))
    bpffs.cleanup(ns)
    assert not d.exists()
    assert bpffs.pins(ns) == []
    bpffs.cleanup(ns)  # idempotent
    # The map itself lives on while our fd holds it.
    assert small_map.info().id > 0


def test_ip_netns_exec_is_detected_and_explained():
    with testbed.netns_pair() as pair:
        code = (
            "from bpfilter import bpffs\n"
            "print(bpffs.inside_ip_netns_exec())\n"
            "try:\n"
            "    bpffs.ensure_mounted()\n"
            "except bpffs.BpffsError as e:\n"
            "    print(e)\n"
        )
        out = pair.run(pair.a, [sys.executable, "-c", code]).stdout.splitlines()
    assert out[0] == pair.a
    assert "ip netns exec" in out[1]
    assert f"--netns {pair.a}" in out[1]
    assert bpffs.inside_ip_netns_exec() is None
