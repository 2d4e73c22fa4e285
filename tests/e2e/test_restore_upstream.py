"""iptables' own shell tests for iptables-restore (conformance/iptables/shell/ipt-restore/),
run with bpfilter-restore and bpfilter-save in the place of `$XT_MULTI iptables-restore` and
`$XT_MULTI iptables-save`, each in a throwaway network namespace.

The ones bpfilter cannot pass yet are expected failures (strict: passing one is an error, so
this list shrinks as features arrive), each with the reason.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpfilter import testbed

BIN = Path(sys.executable).parent
UPSTREAM = "conformance/iptables/shell/ipt-restore"
TIMEOUT = 300

NAT = "needs the nat/mangle/security tables (--delegate to iptables-restore comes later)"
SINGLE = "needs single `iptables` commands (bpfilter-iptables comes later)"
EXPECTED_FAILURES = {
    "0001load-specific-table_0": NAT + "; and REJECT is not compiled yet",
    "0003-restore-ordering_0": SINGLE,
    "0004-restore-race_0": SINGLE + "; and the sctp match is not compiled yet",
    "0005-ipt-6_0": SINGLE,
    "0006-ip6t-4_0": SINGLE,
    "0007-flush-noflush_0": NAT,
    # Its last check wants `:FORWARD ACCEPT bar` refused without --counters; the recorded
    # iptables-legacy-restore v1.8.9 accepts it too (exit 0), and so does bpfilter.
    "0008-restore-counters_0": "malformed policy counters accepted, as iptables-legacy 1.8.9",
    "0011-noflush-empty-line_0": SINGLE,
    "0012-dash-F_0": NAT,
    "0013-test-mode_0": NAT,
    "0014-verbose-restore_0": NAT + "; and -v prints nothing yet",
}

WRAPPER = """#!/bin/sh
cmd=$1; shift
case "$cmd" in
  iptables-restore) exec {bin}/bpfilter-restore --netns {ns} "$@";;
  ip6tables-restore) exec {bin}/bpfilter6-restore --netns {ns} "$@";;
  iptables-save) exec {bin}/bpfilter-save --netns {ns} "$@";;
  ip6tables-save) exec {bin}/bpfilter6-save --netns {ns} "$@";;
  *) echo "XT_MULTI: $cmd is not provided by bpfilter" >&2; exit 127;;
esac
"""


def _scripts() -> list[str]:
    d = Path(__file__).resolve().parents[3] / "shared" / UPSTREAM
    return sorted(p.name for p in d.glob("0*")) if d.is_dir() else []


@pytest.fixture
def ns() -> Iterator[str]:
    name = testbed.unique_name("bpfu")
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        yield name
    finally:
        subprocess.run([str(BIN / "bpfilter"), "flush", "--netns", name], timeout=60,
                       capture_output=True)
        testbed.delete(name)


def _params() -> list[object]:
    out: list[object] = []
    for name in _scripts():
        reason = EXPECTED_FAILURES.get(name)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def test_every_expected_failure_names_a_script(shared_dir: Path) -> None:
    present = {p.name for p in (shared_dir / UPSTREAM).glob("0*")}
    assert present and set(EXPECTED_FAILURES) <= present


@pytest.mark.parametrize("script", _params())
def test_upstream_restore_script(script: str, ns: str, shared_dir: Path,
                                 tmp_path: Path) -> None:
    path = shared_dir / UPSTREAM / script
    wrapper = tmp_path / "xt"
    wrapper.write_text(WRAPPER.format(bin=BIN, ns=ns))
    wrapper.chmod(0o700)
    # The shebang's interpreter and flags matter (`#!/bin/sh -e`).
    interpreter = path.read_text().splitlines()[0].removeprefix("#!").split()
    proc = subprocess.run([*interpreter, str(path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=TIMEOUT, env={"XT_MULTI": str(wrapper),
                                                           "PATH": "/usr/sbin:/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
