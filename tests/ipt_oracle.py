"""Real iptables-legacy as a test oracle: throwaway namespaces, restore, save, error lines."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

LEGACY_TOOLS = ("iptables-legacy-restore", "iptables-legacy-save",
                "ip6tables-legacy-restore", "ip6tables-legacy-save")

_LINE_PATTERNS = (
    re.compile(r"Error occurred at line: (\d+)"),
    re.compile(r"line (\d+) failed"),
    re.compile(r"COMMIT expected at line (\d+)"),
    re.compile(r"\bline (\d+)\b"),
)


def missing_tools() -> str | None:
    """Why the oracle cannot run here (a skip reason), or None."""
    absent = [t for t in LEGACY_TOOLS if shutil.which(t) is None]
    if absent:
        return f"iptables-legacy not installed ({', '.join(absent)} missing)"
    if shutil.which("ip") is None:
        return "iproute2 `ip` not installed"
    return None


@contextmanager
def netns() -> Iterator[str]:
    """A fresh, uniquely named network namespace, deleted on every exit path."""
    name = f"bpft-{os.getpid()}-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        # finally also runs on KeyboardInterrupt; never leave the namespace behind.
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


@dataclass(frozen=True, slots=True)
class RestoreResult:
    """What iptables-legacy-restore did with one input, and the saved state afterwards."""

    rc: int
    stderr: str
    tables: dict[str, str]

    @property
    def error_line(self) -> int | None:
        return error_line(self.stderr)


def error_line(stderr: str) -> int | None:
    """The input line iptables-restore blames in its stderr, or None."""
    for pattern in _LINE_PATTERNS:
        m = pattern.search(stderr)
        if m:
            return int(m.group(1))
    return None


def split_tables(save_text: str) -> dict[str, str]:
    """iptables-save text per table (`*name` .. `COMMIT`), `#` lines dropped; last one wins."""
    tables: dict[str, str] = {}
    current: list[str] | None = None
    for line in save_text.splitlines():
        if line.startswith("#"):
            continue
        if line.startswith("*"):
            current = [line]
        elif current is not None:
            current.append(line)
            if line == "COMMIT":
                tables[current[0][1:]] = "\n".join(current) + "\n"
                current = None
    return tables


def restore(ns: str, text: str, *, family: int = 4,
            flags: Sequence[str] = ()) -> RestoreResult:
    """Feed `text` to (ip6)tables-legacy-restore inside `ns`, then save every table."""
    v = "ip6" if family == 6 else "ip"
    proc = subprocess.run(["ip", "netns", "exec", ns, f"{v}tables-legacy-restore", *flags],
                          input=text.encode("utf-8", "surrogateescape"),
                          capture_output=True, timeout=120)
    save = subprocess.run(["ip", "netns", "exec", ns, f"{v}tables-legacy-save"],
                          capture_output=True, check=True, timeout=120)
    return RestoreResult(proc.returncode, proc.stderr.decode(errors="replace"),
                         split_tables(save.stdout.decode(errors="replace")))
