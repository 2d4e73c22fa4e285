"""Test gating shared by every suite: privilege markers and the location of ../shared.

tests/unit needs nothing; tests/kernel needs root and a bpf() that loads programs;
tests/e2e additionally creates network namespaces. Tests in the latter two folders are
marked automatically and skipped with the reason when the machine cannot run them.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"

# The machine's own /etc/bpfilter/bpfilter.conf (delegation settings) must not steer tests:
# point every test, and the tools they run, at a file that does not exist unless a test
# names its own.
os.environ.setdefault("BPFILTER_CONFIG", str(ROOT / "tests" / "no-such-bpfilter.conf"))
os.environ.pop("BPFILTER_DELEGATE", None)


@functools.cache
def kernel_unavailable() -> str | None:
    """Why kernel tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (bpf(2) and network namespaces)"
    if platform.system() != "Linux":
        return "needs Linux"
    nr = {"x86_64": 321, "aarch64": 280}.get(platform.machine())
    if nr is None:
        return f"bpf(2) syscall number unknown for {platform.machine()}"
    libc = ctypes.CDLL(None, use_errno=True)
    # BPF_PROG_GET_NEXT_ID with start_id 0 answers ENOENT or a next id when bpf() is usable.
    attr = ctypes.create_string_buffer(16)
    rc = libc.syscall(nr, 11, attr, 16)
    err = ctypes.get_errno()
    if rc < 0 and err in (1, 38):  # EPERM, ENOSYS
        return f"bpf(2) unavailable: {os.strerror(err)}"
    if not Path("/sys/kernel/btf/vmlinux").exists():
        return "kernel has no BTF at /sys/kernel/btf/vmlinux"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = kernel_unavailable()
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "kernel" in parts or "e2e" in parts:
            item.add_marker(pytest.mark.kernel)
            if "e2e" in parts:
                item.add_marker(pytest.mark.e2e)
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=f"kernel test skipped: {reason}"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared next to the project; tests that read it skip cleanly without it."""
    if not SHARED.is_dir():
        pytest.skip(f"../shared not present at {SHARED} (conformance data lives outside the repo)")
    return SHARED
