"""`bpfilter translate` against the recorded iptables-restore transcripts (exit code, line, text).

Inputs and the choice of cases: tests/restore_transcripts.py. For a refused input the exit code
must equal iptables-restore's and stderr must name the file and the line iptables names (as
`FILE:LINE:`, or as `line N` where iptables blames the COMMIT line for a rule it refuses at
commit time); stdout stays empty. For an accepted one stdout must equal the recorded
iptables-save output for each table of the input, in input order, without `#` lines.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from ipt_oracle import split_tables
from restore_transcripts import CASES, Case, observed


def _translate(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bpfilter", "translate", *args],
                          input=stdin, capture_output=True, text=True, timeout=120)


def _tables_in_order(text: str) -> list[str]:
    names: list[str] = []
    for line in text.splitlines():
        if line.startswith("*") and line[1:].split()[0] not in names:
            names.append(line[1:].split()[0])
    return names


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_translate_agrees_with_recorded_iptables_restore(case: Case, shared_dir: Path,
                                                         tmp_path: Path) -> None:
    obs = observed(case, shared_dir / "conformance" / "iptables-restore-observed")
    args = ["--from", "ip6tables" if case.family == 6 else "iptables"]
    if case.text is None:
        path = tmp_path / "does-not-exist.rules"
    else:
        path = tmp_path / "input.rules"
        path.write_bytes(case.text.encode())
    proc = _translate([*args, str(path)])
    assert proc.returncode == obs.rc, (
        f"exit {proc.returncode}, iptables-restore exit {obs.rc}\nstderr: {proc.stderr}")
    if obs.rc != 0:
        assert proc.stdout == "", "nothing on stdout for refused input"
        assert str(path) in proc.stderr
        if obs.line is not None:
            # Either the location itself or, for errors iptables only detects at COMMIT, an
            # iptables-style "line N" next to the rule's own location.
            assert f"{path}:{obs.line}:" in proc.stderr or re.search(
                rf"\bline {obs.line}\b", proc.stderr), (
                f"iptables names line {obs.line}; bpfilter said: {proc.stderr}")
        return
    assert not any(line.startswith("#") for line in proc.stdout.splitlines())
    assert case.text is not None
    names = _tables_in_order(case.text)
    mine = split_tables(proc.stdout)
    assert list(mine) == names
    if obs.tables is not None and not case.flags:
        for name in names:
            assert mine[name] == obs.tables[name], f"table {name}:\n{proc.stdout}"


def test_translate_names_stdin_when_reading_stdin() -> None:
    proc = _translate([], stdin="*filter\n-A INPUT --frobnicate -j ACCEPT\nCOMMIT\n")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "<stdin>:2:" in proc.stderr
