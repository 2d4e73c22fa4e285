"""`bpfilter translate`: canonical text or JSON on stdout, restore's errors and exit codes."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from bpfilter.cli import main

GOOD = "*filter\n:INPUT DROP [0:0]\n-A INPUT -s 10.1.2.3/8 -p tcp --dport ssh -j ACCEPT\nCOMMIT\n"


def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str],
        stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
    rc = main(["translate", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_stdin_to_canonical_text(monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(monkeypatch, capsys, [], GOOD)
    assert rc == 0 and err == ""
    assert out == ("*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
                   "-A INPUT -s 10.0.0.0/8 -p tcp -m tcp --dport 22 -j ACCEPT\nCOMMIT\n")
    assert run(monkeypatch, capsys, ["-"], GOOD)[1] == out


def test_file_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                       capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "rules.v4"
    f.write_text(GOOD)
    rc, out, _ = run(monkeypatch, capsys, ["--to", "json", str(f)])
    assert rc == 0 and json.loads(out)["tables"][0]["name"] == "filter"


def test_ip6tables(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(monkeypatch, capsys, ["--from", "ip6tables"],
                     "*filter\n-A INPUT -s 2001:db8::1 -j DROP\nCOMMIT\n")
    assert rc == 0 and "-A INPUT -s 2001:db8::1/128 -j DROP" in out


@pytest.mark.parametrize(
    ("text", "rc", "where", "what"),
    [
        ("*filter\n-A INPUT -p tcp --dport 99999 -j ACCEPT\nCOMMIT\n", 2, "rules:2:",
         "invalid port/service"),
        ("*filter\n-A NOPE -j ACCEPT\nCOMMIT\n", 1, "rules:2:", "line 2 failed"),
        ("*filter\n-A INPUT -j ACCEPT\n", 1, "rules:3:", "COMMIT expected at line 3"),
    ],
)
def test_errors_go_to_stderr_with_location_and_exit_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    text: str, rc: int, where: str, what: str,
) -> None:
    f = tmp_path / "rules"
    f.write_text(text)
    got_rc, out, err = run(monkeypatch, capsys, [str(f)])
    assert (got_rc, out) == (rc, "")
    assert f"{f.parent}/{where}" in err and what in err


def test_missing_file(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(monkeypatch, capsys, ["/nonexistent/rules"])
    assert rc == 1 and out == "" and "can't open" in err


RUN = ("*filter\n:INPUT DROP [0:0]\n-A INPUT -p tcp --dport 22 -j ACCEPT\n"
       + "".join(f"-A INPUT -s 198.18.0.{i} -j DROP\n" for i in range(1, 41)) + "COMMIT\n")


def test_explain_lists_lookups_and_maps(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(monkeypatch, capsys, ["--explain"], RUN)
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[:2] == [
        "filter INPUT: 41 rules, 40 in 1 lookup(s), 1 one by one",
        "  lookup 0: rules 2-41 (lines 4-43) -> hash on -s, 40 entries, 1 action(s): DROP"]
    assert "map lookup_0: hash, key 4 B, value 8 B, 40 entries" in lines


def test_asm_marks_rule_lines(monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(monkeypatch, capsys, ["--to", "asm"], RUN)
    assert rc == 0 and err == ""
    assert out.startswith("; program filter_INPUT4: table filter, chain INPUT, hook LOCAL_IN")
    assert "; line 3: INPUT rule 1" in out
    assert "; lines 4-43: INPUT rules 2-41 by lookup in lookup_0" in out
    assert "call bpf_map_lookup_elem" in out


def test_asm_names_a_rule_that_does_not_compile(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    text = "*filter\n:INPUT DROP [0:0]\n-A INPUT -j CONNMARK --set-mark 1\nCOMMIT\n"
    rc, out, err = run(monkeypatch, capsys, ["--to", "asm"], text)
    assert rc == 1 and out == ""
    assert err.startswith("bpfilter translate: <stdin>:line 3: ")
