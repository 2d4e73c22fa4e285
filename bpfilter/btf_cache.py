"""Facts bpfilter reads from the kernel's BTF (struct member offsets, sizes, kfunc ids), kept
in a root-only file so that a command does not parse all of vmlinux BTF each time.

The file is keyed by the kernel release, the size of /sys/kernel/btf/vmlinux and the boot id:
BTF cannot change without a reboot, and a key that does not match is ignored (the facts are
read from BTF again and the file rewritten). A fact not in the file is read from BTF and
added. Any problem with the file (unreadable, not root, malformed) only costs the BTF parse.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bpfilter.btf import VMLINUX, Btf

CACHE = Path("/run/bpfilter/btf-facts.json")
VERSION = 1
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def _key() -> list[object]:
    try:
        boot = BOOT_ID.read_text().strip()
    except OSError:
        boot = ""
    return [VERSION, os.uname().release, os.stat(VMLINUX).st_size, boot]


class BtfFacts:
    """Member offsets, struct sizes and kfunc ids of the running kernel, cached on disk."""

    def __init__(self, path: Path = CACHE, load: Callable[[], Btf] = Btf.load) -> None:
        self._path = path
        self._load = load
        self._btf: Btf | None = None
        self._key = _key()
        self._facts: dict[str, int] = {}
        self._dirty = False
        with contextlib.suppress(OSError, ValueError, TypeError):
            doc: Any = json.loads(path.read_text())
            if isinstance(doc, dict) and doc.get("key") == self._key and \
                    isinstance(doc.get("facts"), dict) and \
                    all(isinstance(v, int) for v in doc["facts"].values()):
                self._facts = dict(doc["facts"])

    @property
    def btf(self) -> Btf:
        """The parsed BTF (parsed on first use)."""
        if self._btf is None:
            self._btf = self._load()
        return self._btf

    def _get(self, name: str, read: Callable[[Btf], int]) -> int:
        value = self._facts.get(name)
        if value is None:
            value = self._facts[name] = read(self.btf)
            self._dirty = True
        return value

    def member_offset(self, struct: str, member: str) -> int:
        return self._get(f"offset:{struct}.{member}", lambda b: b.member_offset(struct, member))

    def struct_size(self, struct: str) -> int:
        return self._get(f"size:{struct}", lambda b: b.struct_size(struct))

    def kfunc_id(self, name: str) -> int:
        return self._get(f"kfunc:{name}", lambda b: b.kfunc_id(name))

    def save(self) -> None:
        """Write the facts learnt (atomically, mode 0600); silently nothing when it cannot."""
        if not self._dirty or os.geteuid() != 0:
            return
        with contextlib.suppress(OSError):
            self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self._path.parent, prefix=".btf-facts-")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"key": self._key, "facts": self._facts}, f, sort_keys=True)
                os.replace(tmp, self._path)
                self._dirty = False
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)


__all__ = ["CACHE", "BtfFacts"]
