"""iptables' own shell tests for iptables-restore (conformance/iptables/shell/ipt-restore/),
run with bpfilter-restore, bpfilter-save and bpfilter-iptables in the place of
`$XT_MULTI iptables-restore`, `$XT_MULTI iptables-save` and `$XT_MULTI iptables`, each inside
a throwaway network namespace, with nat, mangle and security delegated to
iptables-legacy-restore (BPFILTER_DELEGATE).

The ones bpfilter cannot pass yet are expected failures (strict: passing one is an error, so
this list shrinks as features arrive), each with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpfilter import netns, testbed

BIN = Path(sys.executable).parent
UPSTREAM = "conformance/iptables/shell/ipt-restore"
TIMEOUT = 300

EXPECTED_FAILURES = {
    # Its last check wants `:FORWARD ACCEPT bar` refused without --counters; the recorded
    # iptables-legacy-restore v1.8.9 accepts it too (exit 0), and so does bpfilter.
    "0008-restore-counters_0": "malformed policy counters accepted, as iptables-legacy 1.8.9",
    # It expects `all` in the prot column of `iptables -n -L`; iptables-legacy v1.8.9 (the
    # reference here) prints `0` there, and so does bpfilter-iptables.
    "0011-noflush-empty-line_0": "`-n -L` prints prot `0` for any protocol, as "
                                 "iptables-legacy 1.8.9",
}

# Tables bpfilter does not compile go to iptables-legacy-restore, as a drop-in caller would
# configure it; no configuration file of the machine is read.
ENV = {"PATH": "/usr/sbin:/usr/bin:/bin", "BPFILTER_DELEGATE": "nat,mangle,security",
       "BPFILTER_CONFIG": "/nonexistent/bpfilter.conf"}
WRAPPER = """#!/bin/sh
cmd=$1; shift
case "$cmd" in
  iptables-restore) exec {bin}/bpfilter-restore --netns {ns} "$@";;
  ip6tables-restore) exec {bin}/bpfilter6-restore --netns {ns} "$@";;
  iptables-save) exec {bin}/bpfilter-save --netns {ns} "$@";;
  ip6tables-save) exec {bin}/bpfilter6-save --netns {ns} "$@";;
  iptables) exec {bin}/bpfilter-iptables --netns {ns} "$@";;
  ip6tables) exec {bin}/bpfilter-ip6tables --netns {ns} "$@";;
  *) echo "XT_MULTI: $cmd is not provided by bpfilter" >&2; exit 127;;
esac
"""


def _host_ruleset() -> str:
    p = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, timeout=30,
                       check=False)
    return p.stdout


def _passed_on() -> dict[str, str]:
    return {k: os.environ[k] for k in ("BPFILTER_LOCK",) if k in os.environ}


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
    # The script itself runs inside the throwaway namespace (its network namespace only, so
    # bpffs and the pins stay shared): some scripts also call `nft flush ruleset`, which must
    # never reach the machine's own ruleset.
    host = _host_ruleset()
    with netns.entered(ns):
        proc = subprocess.run([*interpreter, str(path)], cwd=tmp_path, capture_output=True,
                              text=True, timeout=TIMEOUT,
                              env=ENV | {"XT_MULTI": str(wrapper)} | _passed_on())
    assert _host_ruleset() == host, "the script changed the machine's own nftables ruleset"
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
