"""`bpfilter demo` runs end to end and leaves no namespace behind."""

from __future__ import annotations

import json
import subprocess
import sys


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_demo_drops_icmp_and_passes_udp() -> None:
    before = _namespaces()
    proc = subprocess.run(
        [sys.executable, "-m", "bpfilter", "demo", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    observed = [(s["what"], s["observed"]) for s in report["steps"]]
    assert observed == [("ping", True), ("udp", True), ("ping", False), ("udp", True),
                        ("ping", True)]
    assert {n for n in _namespaces() - before if n.startswith("bpfdemo-")} == set()
