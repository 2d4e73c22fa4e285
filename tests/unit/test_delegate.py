"""bpfilter.delegate without the kernel: settings and their precedence, splitting restore
input into bpfilter's part and the delegated tables, the backend's flags; and the -v printer
and the save order that go with them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bpfilter import delegate, restore, restore_verbose, save
from bpfilter.delegate import Config, ConfigError, Section
from bpfilter.grammar.iptables import parse_restore
from bpfilter.restore import RestoreOptions


def _conf(tmp_path: Path, text: str) -> dict[str, str]:
    p = tmp_path / "bpfilter.conf"
    p.write_text(text)
    return {delegate.CONFIG_ENV: str(p)}


def test_config_file_lines() -> None:
    text = "# comment\n\n  delegate = nat, mangle  \niptables=/opt/x/iptables-legacy-restore\n"
    assert delegate.parse_config(text) == {"delegate": "nat, mangle",
                                           "iptables": "/opt/x/iptables-legacy-restore"}
    with pytest.raises(ConfigError, match=r"f:2: expected `key = value`"):
        delegate.parse_config("delegate = nat\njust words\n", "f")
    with pytest.raises(ConfigError, match=r"f:1: unknown key 'delegates'"):
        delegate.parse_config("delegates = nat\n", "f")


def test_table_lists() -> None:
    assert delegate.parse_tables("nat,mangle", "x") == {"nat", "mangle"}
    assert delegate.parse_tables(" security ,", "x") == {"security"}
    assert delegate.parse_tables("", "x") == frozenset()
    assert delegate.parse_tables("none", "x") == frozenset()
    with pytest.raises(ConfigError, match="'filter' is compiled by bpfilter"):
        delegate.parse_tables("nat,filter", "x")
    with pytest.raises(ConfigError, match="'raw' is compiled by bpfilter"):
        delegate.parse_tables("raw", "x")
    with pytest.raises(ConfigError, match="unknown table 'natt'"):
        delegate.parse_tables("natt", "x")


def test_precedence_option_over_environment_over_file(tmp_path: Path) -> None:
    env = _conf(tmp_path, "delegate = security\n")
    assert delegate.load(None, env).tables == {"security"}
    assert delegate.load(None, env).source == str(tmp_path / "bpfilter.conf")
    env[delegate.DELEGATE_ENV] = "mangle"
    assert delegate.load(None, env).tables == {"mangle"}
    assert delegate.load("nat", env).tables == {"nat"}
    # An empty option or variable turns delegation off over what is below it.
    assert delegate.load("", env).tables == frozenset()
    env[delegate.DELEGATE_ENV] = ""
    assert delegate.load(None, env).tables == frozenset()


def test_missing_file_is_no_error_but_a_bad_one_is(tmp_path: Path) -> None:
    cfg = delegate.load(None, {delegate.CONFIG_ENV: str(tmp_path / "absent")})
    assert cfg.tables == frozenset()
    assert cfg.restore_cmd(4) == "/usr/sbin/iptables-legacy-restore"
    assert cfg.restore_cmd(6) == "/usr/sbin/ip6tables-legacy-restore"
    with pytest.raises(ConfigError, match="unknown table"):
        delegate.load(None, _conf(tmp_path, "delegate = bogus\n"))
    with pytest.raises(ConfigError, match="absolute path to an \\*-restore program"):
        delegate.load(None, _conf(tmp_path, "iptables = iptables-restore\n"))


def test_backend_and_its_siblings(tmp_path: Path) -> None:
    cfg = delegate.load(None, _conf(tmp_path, "ip6tables = /opt/sbin/ip6tables-nft-restore\n"))
    assert cfg.restore_cmd(6) == "/opt/sbin/ip6tables-nft-restore"
    assert cfg.save_cmd(6) == "/opt/sbin/ip6tables-nft-save"
    assert cfg.single_cmd(6) == "/opt/sbin/ip6tables-nft"
    assert cfg.save_cmd(4) == "/usr/sbin/iptables-legacy-save"
    assert cfg.single_cmd(4) == "/usr/sbin/iptables-legacy"


TEXT = ("# head\n*filter\n-A INPUT -j ACCEPT\nCOMMIT\n*nat\n# in nat\n"
        "-A POSTROUTING -j ACCEPT\nCOMMIT\n*raw\nCOMMIT\n*mangle\n:X - [0:0]\n")


def test_split_keeps_line_numbers() -> None:
    ours, sections = delegate.split(TEXT, frozenset({"nat", "mangle"}))
    assert ours.split("\n") == ["# head", "*filter", "-A INPUT -j ACCEPT", "COMMIT", "", "",
                                "", "", "*raw", "COMMIT", "", "", ""]
    assert sections == [
        Section("nat", 5, 8, "*nat\n# in nat\n-A POSTROUTING -j ACCEPT\nCOMMIT\n"),
        # No COMMIT: the section runs to the end, and the backend reports it.
        Section("mangle", 11, 13, "*mangle\n:X - [0:0]\n"),
    ]
    assert sections[0].padded() == "\n" * 4 + sections[0].text
    # bpfilter's parser sees its own tables at their lines.
    parsed = parse_restore(ours.replace(":X - [0:0]\n", ""))
    assert [(t.name, t.line) for t in parsed.tables] == [("filter", 2), ("raw", 9)]
    assert delegate.split(TEXT, frozenset()) == (TEXT, [])


def test_split_finds_tables_as_iptables_restore_does() -> None:
    # `*nat` inside an open table is a rule line there, not a new table.
    text = "*filter\n*nat\nCOMMIT\n*nat  \nCOMMIT"
    ours, sections = delegate.split(text, frozenset({"nat"}))
    assert sections == [Section("nat", 4, 5, "*nat  \nCOMMIT")]
    assert ours == "*filter\n*nat\nCOMMIT\n\n"


def test_backend_flags() -> None:
    assert delegate.restore_flags() == []
    assert delegate.restore_flags(counters=True, noflush=True, test=True, verbose=True) == [
        "-c", "-n", "-t", "-v"]
    assert delegate.restore_flags(wait=math.inf) == ["-w"]
    assert delegate.restore_flags(wait=5.0, modprobe="/sbin/modprobe") == [
        "-w", "5", "-M", "/sbin/modprobe"]


def test_single_command_options() -> None:
    argv = ["--netns", "x", "-t", "nat", "-A", "POSTROUTING", "-j", "ACCEPT"]
    assert delegate.strip_own_options(argv) == ["-t", "nat", "-A", "POSTROUTING", "-j",
                                                "ACCEPT"]
    assert delegate.strip_own_options(["--netns=x", "-L"]) == ["-L"]
    assert delegate._option(argv, "-t", "--table") == "nat"
    assert delegate._option(["-tmangle", "-L"], "-t", "--table") == "mangle"
    assert delegate._option(["--table=security", "-L"], "-t", "--table") == "security"
    assert delegate._option(["-L", "--to-destination", "x"], "-t", "--table") is None
    assert delegate._option(argv, None, "--netns") == "x"


def test_single_command_on_a_compiled_table_is_not_handed_over(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(delegate.DELEGATE_ENV, "nat")
    assert delegate.single(["-t", "filter", "-L"], 4, "bpfilter-iptables") is None
    assert delegate.single(["-L"], 4, "bpfilter-iptables") is None
    monkeypatch.setenv(delegate.DELEGATE_ENV, "")
    assert delegate.single(["-t", "nat", "-L"], 4, "bpfilter-iptables") is None


def test_refusal_names_the_option() -> None:
    assert delegate.refusal("mangle") == (
        "table 'mangle' cannot be compiled to eBPF by bpfilter (it compiles filter and raw); "
        "use --delegate mangle or BPFILTER_DELEGATE=mangle to hand it to "
        "iptables-legacy-restore")


def test_save_option() -> None:
    assert save.parse_args(["--delegate", "nat", "-c"]).delegate == "nat"
    assert save.parse_args(["--delegate=nat,mangle"]).delegate == "nat,mangle"
    assert "--delegate" in save.usage(4)


def test_restore_option_and_bad_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert restore.parse_args(["--delegate", "nat,mangle"]).delegate == "nat,mangle"
    assert restore.parse_args(["--delegate=security", "f"]).delegate == "security"
    # A malformed setting ends the restore before anything is read or changed.
    out = restore.restore("*filter\nCOMMIT\n", RestoreOptions(delegate="filter"))
    assert out.code == 1 and out.tables == []
    assert out.err.startswith("bpfilter-restore: --delegate: table 'filter' is compiled")
    monkeypatch.setenv(delegate.DELEGATE_ENV, "nta")
    out = restore.restore("*filter\nCOMMIT\n", RestoreOptions())
    assert out.code == 1 and "BPFILTER_DELEGATE: unknown table 'nta'" in out.err


def test_save_order_is_newest_first_keeping_the_kernels_order() -> None:
    # bpfilter made filter at 10 and raw at 30; the kernel lists security, nat (newest first);
    # bpfilter created nat at 20, security was there already (unknown: oldest).
    assert save.table_order([("filter", 10.0), ("raw", 30.0)],
                            [("nat", 20.0), ("security", -math.inf)]) == [
        "raw", "nat", "filter", "security"]
    # The kernel's order wins over recorded times that contradict it.
    assert save.table_order([], [("mangle", 5.0), ("nat", 20.0)]) == ["mangle", "nat"]
    assert save.table_order([("filter", -math.inf)], [("nat", -math.inf)]) == [
        "filter", "nat"]


def test_verbose_lines_of_a_table() -> None:
    text = ("# top\n*filter\n:foo - [0:0]\n-A foo -s 198.18.0.1,198.18.0.2 -p tcp --dport 22 "
            "-j ACCEPT\n-D foo 1\n-F foo\n-Z\n-X foo\n# in\nCOMMIT\n# tail\n")
    after = parse_restore(text).tables[0]
    before = parse_restore("*filter\n:old - [0:0]\nCOMMIT\n").tables[0]
    p = restore_verbose.Printer(text)
    assert p.table(2, before, after, 4, noflush=False) == (
        "# top\n"
        "Flushing chain `INPUT'\nFlushing chain `FORWARD'\nFlushing chain `OUTPUT'\n"
        "Flushing chain `old'\nDeleting chain `old'\n"
        "ACCEPT  tcp opt -- in * out *  198.18.0.1  -> 0.0.0.0/0   tcp dpt:22\n"
        "ACCEPT  tcp opt -- in * out *  198.18.0.2  -> 0.0.0.0/0   tcp dpt:22\n"
        "Flushing chain `foo'\n"
        "Zeroing chain `INPUT'\nZeroing chain `FORWARD'\nZeroing chain `OUTPUT'\n"
        "Zeroing chain `foo'\n"
        "Deleting chain `foo'\n"
        "# in\n")
    assert p.upto(11) == "# tail\n"
    # --noflush: only the comments.
    q = restore_verbose.Printer(text)
    assert q.table(2, before, after, 4, noflush=True) == "# top\n# in\n"


def test_config_defaults() -> None:
    assert Config().tables == frozenset() and Config().restore_cmd(4).endswith(
        "iptables-legacy-restore")


def test_split_saved_output_into_tables() -> None:
    nat = "# Generated by x\n*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n# Completed on y\n"
    flt = "# Generated by x\n*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n"
    assert delegate.split_saved(nat + flt) == [("nat", nat), ("filter", flt)]
    assert delegate.split_saved("*raw\nCOMMIT\n*mangle\nCOMMIT\n") == [
        ("raw", "*raw\nCOMMIT\n"), ("mangle", "*mangle\nCOMMIT\n")]
    assert delegate.split_saved("") == []


FAKE = """#!/bin/sh
echo "$*" >> {log}
cat > {log}.in.$$
echo "out of $*"
[ -z "$FAIL" ] || {{ echo "iptables-restore: line 7 failed" >&2; exit 1; }}
"""


def _fake_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = tmp_path / "calls"
    fake = tmp_path / "fake-restore"
    fake.write_text(FAKE.format(log=log))
    fake.chmod(0o700)
    monkeypatch.setenv(delegate.CONFIG_ENV, str(tmp_path / "c.conf"))
    (tmp_path / "c.conf").write_text(f"delegate = nat,mangle\niptables = {fake}\n")
    monkeypatch.delenv(delegate.DELEGATE_ENV, raising=False)
    return log


def test_batch_commits_in_input_order_with_line_numbers(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    log = _fake_backend(tmp_path, monkeypatch)
    opts = RestoreOptions(noflush=True, verbose=True, wait=3.0)
    batch = delegate.Batch.prepare(TEXT, opts)
    out = restore.Outcome()
    assert batch.commit_before(2, out) and out.tables == []  # nothing starts before line 2
    assert batch.commit_before(9, out)  # nat (line 5), not mangle (line 11)
    assert log.read_text() == "-n -v -w 3\n"
    [stdin] = list(tmp_path.glob("calls.in.*"))
    assert stdin.read_text() == "\n" * 4 + "*nat\n# in nat\n-A POSTROUTING -j ACCEPT\nCOMMIT\n"
    assert [(t.table, t.delegated, t.rules) for t in out.tables] == [("nat", True, 1)]
    # -v: the comment before nat is bpfilter's to print; the backend prints its own.
    assert out.out == "# head\nout of -n -v -w 3\n"
    assert batch.commit_before(math.inf, out) and len(out.tables) == 2


def test_batch_stops_at_a_failing_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = _fake_backend(tmp_path, monkeypatch)
    monkeypatch.setenv("FAIL", "1")
    batch = delegate.Batch.prepare(TEXT, RestoreOptions(test=True, table="nat"))
    out = restore.Outcome()
    assert not batch.commit_before(math.inf, out)
    assert (out.code, out.error_line, out.err, out.out) == (
        1, 7, "iptables-restore: line 7 failed\n", "")
    assert log.read_text() == "-t\n"  # only nat (-T nat), with --test
    assert out.tables == []


def test_missing_backend() -> None:
    ran = delegate.run(["/nonexistent/iptables-legacy-restore"], None)
    assert (ran.code, ran.out) == (1, "")
    assert ran.err.startswith("cannot run /nonexistent/iptables-legacy-restore: no such "
                              "program (set `iptables = PATH` in /etc/bpfilter/bpfilter.conf")
