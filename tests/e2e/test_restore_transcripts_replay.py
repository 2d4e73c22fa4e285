"""The rebuilt transcript inputs reproduce the recorded runs on the real iptables-legacy-restore.

tests/restore_transcripts.py rebuilds the inputs the recorded transcripts leave out; this
replays each in a throwaway namespace and checks exit code, blamed line and (for accepted
input) the saved tables, so the unit test compares bpfilter with what iptables really did.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from ipt_oracle import missing_tools, netns, restore
from restore_transcripts import CASES, Case, observed

pytestmark = pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")

REPLAYABLE = [c for c in CASES if c.text is not None]


@pytest.mark.parametrize("case", REPLAYABLE, ids=[c.id for c in REPLAYABLE])
def test_rebuilt_input_reproduces_recorded_run(case: Case, shared_dir: Path) -> None:
    obs = observed(case, shared_dir / "conformance" / "iptables-restore-observed")
    assert case.text is not None
    with netns() as ns:
        real = restore(ns, case.text, family=case.family, flags=case.flags)
    assert (real.rc, real.error_line) == (obs.rc, obs.line), real.stderr
    if obs.rc == 0 and obs.tables is not None:
        for line in case.text.splitlines():
            if line.startswith("*"):
                name = line[1:].split()[0]
                assert real.tables[name] == obs.tables[name]
