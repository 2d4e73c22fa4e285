"""`bpfilter demo` runs end to end and leaves no namespace behind."""

from __future__ import annotations

import json
import subprocess
import sys


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_demo_gives_iptables_verdicts_and_cleans_up() -> None:
    before = _namespaces()
    proc = subprocess.run(
        [sys.executable, "-m", "bpfilter", "demo", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    observed = [s["observed"] for s in report["steps"]]
    # closed port open before loading; ping and the service pass, the closed port hits the
    # DROP policy, the REJECTed port answers "port unreachable"; open again after unloading
    assert observed == [True, True, True, False, True, True]
    counters = report["counters"]
    assert counters["filter/INPUT/policy"][0] >= 1
    assert counters["filter/INPUT/rule 3"][0] >= 1  # the echo-request rule
    assert counters["filter/INPUT/rule 4"][0] >= 1  # the UDP service rule
    assert {n for n in _namespaces() - before if n.startswith("bpfdemo-")} == set()
