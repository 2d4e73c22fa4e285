"""bpfilter-restore / bpfilter-save without a kernel: iptables-restore's command line and
messages, the committed prefix of a failing input, --noflush merging, counters carried over,
and the refusals that happen before anything is touched."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest

from bpfilter import restore, save, state
from bpfilter.grammar.errors import ParseError
from bpfilter.grammar.iptables import parse_restore
from bpfilter.ir.iptables_save import to_iptables_save
from bpfilter.restore import CliExit, RestoreOptions, parse_args
from bpfilter.save import SaveOptions

TRY = "Try `bpfilter-restore -h' for more information.\n"


def exit_of(argv: list[str], family: int = 4) -> CliExit:
    with pytest.raises(CliExit) as e:
        parse_args(argv, family)
    return e.value


@pytest.mark.parametrize(("argv", "expected"), [
    ([], RestoreOptions()),
    (["-c", "-n", "-t", "-v"], RestoreOptions(counters=True, noflush=True, test=True,
                                              verbose=True)),
    (["-cnt"], RestoreOptions(counters=True, noflush=True, test=True)),
    (["--counters", "--noflush", "--test", "--verbose"],
     RestoreOptions(counters=True, noflush=True, test=True, verbose=True)),
    (["-w"], RestoreOptions(wait=math.inf)),
    (["-w", "5"], RestoreOptions(wait=5.0)),
    (["--wait=5"], RestoreOptions(wait=5.0)),
    (["-w", "rules.v4"], RestoreOptions(wait=math.inf, file="rules.v4")),
    (["-w", "-W", "1000"], RestoreOptions(
        wait=math.inf, warnings=("Ignoring deprecated --wait-interval option.",))),
    (["--wait-interval=1000", "-w"], RestoreOptions(
        wait=math.inf, warnings=("Ignoring deprecated --wait-interval option.",))),
    (["-T", "nat"], RestoreOptions(table="nat")),
    (["-Tnat"], RestoreOptions(table="nat")),
    (["--table=raw"], RestoreOptions(table="raw")),
    (["--table", "raw"], RestoreOptions(table="raw")),
    (["-M", "/bin/true"], RestoreOptions(modprobe="/bin/true")),
    (["-b"], RestoreOptions(warnings=("-b/--binary option is not implemented",))),
    (["--netns", "blue", "--json", "f"], RestoreOptions(netns="blue", json=True, file="f")),
    (["--netns=blue"], RestoreOptions(netns="blue")),
    (["-"], RestoreOptions()),
])
def test_command_line(argv: list[str], expected: RestoreOptions) -> None:
    assert parse_args(argv) == expected


def test_family_follows_the_tool() -> None:
    assert parse_args([], 6).family == 6


@pytest.mark.parametrize(("argv", "code", "err"), [
    (["-x"], 1, "bpfilter-restore: invalid option -- 'x'\n" + TRY),
    (["-w5"], 1, "bpfilter-restore: invalid option -- '5'\n" + TRY),
    (["a", "b"], 1, "Unknown arguments found on commandline\n"),
    (["-W", "1000"], 1, "Ignoring deprecated --wait-interval option.\n"
     "Option --wait-interval requires option --wait\n"),
    (["--bogus"], 1, "bpfilter-restore: unrecognized option '--bogus'\n" + TRY),
    (["-T"], 1, "bpfilter-restore: option requires an argument -- 'T'\n" + TRY),
    (["--netns", "a/b"], 1, "bpfilter-restore: invalid network namespace name 'a/b'\n"),
])
def test_usage_errors(argv: list[str], code: int, err: str) -> None:
    e = exit_of(argv)
    assert (e.code, e.err, e.out) == (code, err, "")


def test_help_and_version() -> None:
    h = exit_of(["-h"])
    assert h.code == 0 and h.out.startswith("Usage: bpfilter-restore [-c] [-v] [-V] [-t]")
    assert "--noflush" in h.out and "--netns" in h.out
    v = exit_of(["--version"], 6)
    assert v.code == 0 and v.out.startswith("bpfilter6-restore v")


def test_parameter_problem_is_printed_like_iptables_restore() -> None:
    e = ParseError("Couldn't load match `foo':No such file or directory", line=3)
    assert restore.format_parse_error(4, e) == (
        "iptables-restore v1.8.9 (legacy): Couldn't load match `foo':No such file or "
        "directory\nError occurred at line: 3\nTry `iptables-restore -h' or "
        "'iptables-restore --help' for more information.\n")
    failed = ParseError("COMMIT expected at line 3", line=3, exit_code=1)
    assert restore.format_parse_error(6, failed) == (
        "ip6tables-restore: COMMIT expected at line 3\n")


def test_committed_prefix_keeps_the_tables_before_the_error() -> None:
    text = "*raw\nCOMMIT\n*filter\n-A INPUT -j BAD\nCOMMIT\n"
    assert restore.committed_prefix(text, 4) == "*raw\nCOMMIT\n"
    assert restore.committed_prefix(text, 1) == ""
    assert restore.committed_prefix("*filter\n-A INPUT\n", 3) == ""


def test_input_file_errors(tmp_path: Path) -> None:
    opts = RestoreOptions(file=str(tmp_path / "missing"))
    with pytest.raises(CliExit) as e:
        restore.read_input(opts, io.BytesIO())
    assert (e.value.code, e.value.err) == (
        1, f"Can't open {tmp_path / 'missing'}: No such file or directory\n")
    (tmp_path / "rules").write_bytes(b"*filter\nCOMMIT\n")
    assert restore.read_input(RestoreOptions(file=str(tmp_path / "rules")), io.BytesIO()) == (
        "*filter\nCOMMIT\n", str(tmp_path / "rules"))
    assert restore.read_input(RestoreOptions(), io.BytesIO(b"x\n")) == ("x\n", "<stdin>")


def test_refusals_before_any_kernel_work(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_kernel(*_: object, **__: object) -> None:
        raise AssertionError("nothing may be loaded")

    monkeypatch.setattr(restore, "load_programs", no_kernel)
    monkeypatch.setattr(state, "commit", no_kernel)
    out = restore.restore("*nat\n-A POSTROUTING -j MASQUERADE\nCOMMIT\n", RestoreOptions())
    assert out.code == 1 and out.error_line == 1
    assert out.err.startswith("iptables-restore: line 1 failed: table 'nat' cannot be compiled")
    assert "use --delegate nat or BPFILTER_DELEGATE=nat" in out.err
    out = restore.restore("*filter\n-A INPUT -p tcp --dport 99999 -j ACCEPT\nCOMMIT\n",
                          RestoreOptions())
    assert (out.code, out.error_line, out.tables) == (2, 2, [])
    out = restore.restore("*filter\n-A INPUT -j ACCEPT\nCOMMIT\n", RestoreOptions(table="raw"))
    assert (out.code, out.tables) == (0, [])


def test_non_root_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)

    def untouched(*_: object, **__: object) -> None:
        raise AssertionError("nothing may be touched")

    monkeypatch.setattr(restore, "restore", untouched)
    monkeypatch.setattr(state, "tables", untouched)
    err = io.StringIO()
    rc = restore.main(["--json"], 4, stdin=io.BytesIO(b"*filter\nCOMMIT\n"),
                      stdout=io.StringIO(), stderr=err)
    assert rc == 4
    assert err.getvalue() == ("bpfilter-restore: must be run as root: the firewall and its "
                              "state in bpffs are readable and writable by root alone\n")
    err = io.StringIO()
    assert save.main(["-c"], 6, stdout=io.StringIO(), stderr=err) == 4
    assert err.getvalue().startswith("bpfilter6-save: must be run as root")


def test_noflush_merges_into_the_live_table() -> None:
    live = parse_restore("*filter\n:INPUT DROP [0:0]\n:OLD - [0:0]\n-A INPUT -j OLD\n"
                         "-A OLD -j RETURN\nCOMMIT\n")
    merged = parse_restore("*filter\n-A INPUT -j ACCEPT\nCOMMIT\n", base=live)
    assert to_iptables_save(merged) == (
        "*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        ":OLD - [0:0]\n-A INPUT -j OLD\n-A INPUT -j ACCEPT\n-A OLD -j RETURN\nCOMMIT\n")
    # Declaring a live user chain flushes it; -D works on live rules.
    merged = parse_restore("*filter\n:OLD - [0:0]\n-D INPUT 1\n-A OLD -j ACCEPT\nCOMMIT\n",
                           base=live)
    assert "-A OLD -j ACCEPT\nCOMMIT" in to_iptables_save(merged)
    assert "-j RETURN" not in to_iptables_save(merged)
    assert "-A INPUT -j OLD" not in to_iptables_save(merged)
    # Declaring a chain twice in the same input is still an error.
    with pytest.raises(ParseError, match="File exists"):
        parse_restore("*filter\n:OLD - [0:0]\n:OLD - [0:0]\nCOMMIT\n", base=live)
    # A table the live ruleset does not have starts empty.
    assert to_iptables_save(parse_restore("*raw\nCOMMIT\n", base=live)).startswith(
        "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT")


def test_counters_carry_over_for_unchanged_rules() -> None:
    old = parse_restore("*filter\n:INPUT DROP [0:0]\n-A INPUT -s 198.18.0.1 -j DROP\n"
                        "-A INPUT -s 198.18.0.2 -j DROP\n-A INPUT -s 198.18.0.1 -j DROP\n"
                        "COMMIT\n").tables[0]
    new = parse_restore("*filter\n:INPUT DROP [0:0]\n-A INPUT -s 198.18.0.3 -j DROP\n"
                        "-A INPUT -s 198.18.0.1 -j DROP\n-A INPUT -s 198.18.0.2 -j DROP\n"
                        "COMMIT\n").tables[0]
    counts = {("filter", "INPUT", 0): (9, 900), ("filter", "INPUT", 1): (1, 10),
              ("filter", "INPUT", 2): (2, 20), ("filter", "INPUT", 3): (3, 30)}
    carried = state.carried_counters(old, new, counts)
    assert carried == {("filter", "INPUT", 0): (9, 900), ("filter", "INPUT", 2): (1, 10),
                       ("filter", "INPUT", 3): (2, 20), ("filter", "FORWARD", 0): (0, 0),
                       ("filter", "OUTPUT", 0): (0, 0)}
    assert state.carried_counters(None, new, counts) == {}


def test_save_command_line() -> None:
    assert save.parse_args([]) == SaveOptions()
    assert save.parse_args(["-c", "-t", "raw", "--netns", "x"]) == SaveOptions(
        True, "raw", "x")
    assert save.parse_args(["--counters", "--table=filter", "--netns=y", "--file=z"]) == (
        SaveOptions(True, "filter", "y", "z"))
    assert save.parse_args(["-tfilter", "-f", "out"]) == SaveOptions(table="filter", file="out")
    assert save.parse_args(["-fout"]) == SaveOptions(file="out")
    with pytest.raises(CliExit) as e:
        save.parse_args(["-x"])
    assert e.value.code == 1 and "unknown argument '-x'" in e.value.err
    with pytest.raises(CliExit) as e:
        save.parse_args(["-h"], 6)
    assert e.value.code == 0 and e.value.out.startswith("Usage: bpfilter6-save")


def test_lock_fails_at_once_or_after_waiting(tmp_path: Path) -> None:
    path = tmp_path / "run" / "lock"
    with restore.locked(None, path):
        assert path.parent.stat().st_mode & 0o777 == 0o700
        # flock conflicts between two open files, also within one process.
        with pytest.raises(CliExit) as e, restore.locked(None, path):
            pass
        assert e.value.code == 4 and "Perhaps you want to use the -w option?" in e.value.err
        with pytest.raises(CliExit) as e, restore.locked(0.1, path):
            pass
        assert e.value.code == 4 and "Stopped waiting after 0.1s" in e.value.err
    with restore.locked(0.1, path):  # released again
        pass
