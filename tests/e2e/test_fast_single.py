"""bpfilter-iptables' fast path (bpfilter.fastcmd) against the full path (iptables_cmd.main):
the same random command sequence on the same loaded ruleset in two namespaces gives the
same exit codes, output, stored layout and text and bpfilter-save text; a blocklist change
on the fast path imports neither the parser nor the optimizer nor the code generator; the
stored text maps (mmapable now) round-trip, and those of earlier generations still read."""

from __future__ import annotations

import io
import json
import os
import random
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bpfilter import bpf, fastcmd, iptables_cmd, lockfile, save, state, testbed
from bpfilter.codegen.spec import MapSpec
from bpfilter.codegen.uapi import MapFlag, MapType
from bpfilter.dispatch import TableKey
from bpfilter.lockfile import LOCK_ENV

BIN = Path(sys.executable).parent
TIMEOUT = 60
KEY = TableKey(4, "filter")
HEAVY = ("lark", "bpfilter.grammar.iptables", "bpfilter.codegen.compiler",
         "bpfilter.ir.optimizer", "bpfilter.incremental", "bpfilter.iptables_cmd",
         "bpfilter.restore")


@pytest.fixture
def pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[testbed.NetnsPair]:
    monkeypatch.setenv(LOCK_ENV, str(tmp_path / "lock"))
    with testbed.netns_pair(prefix="bpff") as p:
        yield p


def addr(i: int) -> str:
    return f"198.19.{i // 250}.{i % 250 + 1}"


def ruleset() -> str:
    """INPUT: a /32 source blocklist a little longer than the optimizer's shortest run (so
    deletes end it); FORWARD: a destination blocklist; OUTPUT: no lookup at all."""
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines += [f"-A INPUT -s {addr(i)}/32 -j {'ACCEPT' if i % 7 == 3 else 'DROP'}"
              for i in range(36)]
    lines += [f"-A FORWARD -d {addr(100 + i)}/32 -j DROP" for i in range(40)]
    lines += ["-A OUTPUT -p tcp --dport 22 -j ACCEPT", "COMMIT", ""]
    return "\n".join(lines)


def restore(ns: str, text: str) -> None:
    r = subprocess.run([str(BIN / "bpfilter-restore"), "--netns", ns], input=text,
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr


def commands(rng: random.Random, n: int) -> list[list[str]]:
    """Blocklist changes of every kind, in and out of the fast shape, errors included."""
    out: list[list[str]] = []
    used = list(range(36))
    for _ in range(n):
        extra = rng.choice([[], ["-w"], ["-w", "3"], ["--json"], ["-t", "filter"]])
        roll = rng.random()
        fresh = 40 + rng.randrange(2000)
        target = rng.choice(["DROP", "DROP", "ACCEPT"])
        if roll < 0.25:
            num = [str(rng.randrange(1, 45))] if rng.random() < 0.5 else []
            cmd = ["-I", "INPUT", *num, "-s", addr(fresh) + rng.choice(["", "/32"]),
                   "-j", target]
            used.append(fresh)
        elif roll < 0.4:
            cmd = ["-A", "INPUT", "-s", addr(fresh), "-j", target]
            used.append(fresh)
        elif roll < 0.6:  # present or not, with either action
            cmd = ["-D", "INPUT", "-s", addr(rng.choice(used)), "-j", target]
        elif roll < 0.68:
            cmd = ["-D", "INPUT", str(rng.randrange(1, 50))]
        elif roll < 0.76:
            cmd = ["-A", "FORWARD", "-d", addr(100 + rng.randrange(60)), "-j", "DROP"]
        elif roll < 0.8:
            cmd = ["-D", "FORWARD", "-d", addr(100 + rng.randrange(60)), "-j", "DROP"]
        elif roll < 0.84:
            cmd = ["-A", "FORWARD", "-s", addr(fresh), "-j", "DROP"]  # the other field
        elif roll < 0.88:
            cmd = ["-I", "NOPE", "-s", addr(fresh), "-j", "DROP"]  # no such chain
        elif roll < 0.92:
            cmd = ["-A", "OUTPUT", "-s", addr(fresh), "-j", "DROP"]  # not a blocklist
        elif roll < 0.96:
            cmd = ["-I", "INPUT", "-s", "198.19.0.07", "-j", "DROP"]  # octal to xtables
        else:
            cmd = ["-I", "INPUT", "-s", addr(fresh), "-j", "RETURN"]  # another action
        out.append([*extra, *cmd])
    return out


def normalized(stdout: str) -> str:
    """--json output with what differs between two namespaces masked: timings, program ids."""
    if not stdout.startswith("{"):
        return stdout
    doc = json.loads(stdout)
    doc.pop("netns", None)
    if isinstance(doc.get("incremental"), dict):
        doc["incremental"] = {k: v for k, v in doc["incremental"].items()
                              if "seconds" not in k}
    if isinstance(doc.get("programs"), dict):
        doc["programs"] = sorted(doc["programs"])
    return json.dumps(doc, sort_keys=True)


def saved(ns: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    assert save.main(["--netns", ns, "-c"], 4, stdout=out, stderr=err) == 0, err.getvalue()
    return "".join(line + "\n" for line in out.getvalue().splitlines()
                   if not line.startswith("#"))


def stored(ns: str) -> tuple[bytes, bytes] | None:
    """The stored layout and text of the generation in force (None: no layout)."""
    head = state.live_head(KEY, ns)
    return (head.layout.dumps(), head.blob()) if head is not None else None


def compare(fast_ns: str, full_ns: str, argvs: list[list[str]]) -> int:
    """Run each command on both paths, compare everything; returns how many took the fast
    path."""
    taken = 0
    for i, argv in enumerate(argvs):
        results = []
        for ns, path in ((fast_ns, "fast"), (full_ns, "full")):
            out, err = io.StringIO(), io.StringIO()
            line = ["--netns", ns, *argv]
            code = fastcmd.run_fast(line, 4, out, err) if path == "fast" else None
            if code is None:  # handed on, as fastcmd.main does
                code = iptables_cmd.main(line, 4, stdout=out, stderr=err)
            elif path == "fast":
                taken += 1
            results.append((code, normalized(out.getvalue()), err.getvalue()))
        assert results[0] == results[1], (i, argv)
        assert stored(fast_ns) == stored(full_ns), (i, argv)
    assert saved(fast_ns) == saved(full_ns)
    return taken


def test_fast_and_full_paths_agree(pair: testbed.NetnsPair) -> None:
    text = ruleset()
    restore(pair.a, text)
    restore(pair.b, text)
    taken = compare(pair.a, pair.b, commands(random.Random(20261126), 120))
    assert taken >= 40, f"only {taken} commands took the fast path"


def test_a_blocklist_that_gets_too_short_is_rebuilt_by_both(pair: testbed.NetnsPair) -> None:
    """Deleting INPUT's rules one by one ends its lookup (the optimizer's shortest run):
    the fast path hands that change on, and the chain stays off it afterwards."""
    text = ruleset()
    restore(pair.a, text)
    restore(pair.b, text)
    argvs = [["--json", "-D", "INPUT", "1"] for _ in range(8)]
    argvs += [["--json", "-I", "INPUT", "-s", addr(900 + i), "-j", "DROP"] for i in range(4)]
    assert compare(pair.a, pair.b, argvs) == 4  # the deletes down to 32 rules


def test_a_blocklist_change_imports_only_the_kernel_layer(pair: testbed.NetnsPair) -> None:
    restore(pair.a, ruleset())
    probe = ("import sys\nfrom bpfilter import fastcmd\n"
             "code = fastcmd.main(sys.argv[1:])\n"
             f"print(code, sorted(m for m in {HEAVY!r} if m in sys.modules))\n")

    def run(*argv: str) -> str:
        r = subprocess.run([sys.executable, "-c", probe, "--netns", pair.a, *argv],
                           capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    assert run("-I", "INPUT", "-s", "198.19.9.9", "-j", "DROP") == "0 []"
    assert run("-D", "INPUT", "-s", "198.19.9.9/32", "-j", "DROP") == "0 []"
    # Anything else takes the full path, which does import them (the check can fail).
    assert run("-A", "OUTPUT", "-s", "198.19.9.9", "-j", "DROP") != "0 []"


def test_a_taken_lock_is_reported_as_the_full_path_reports_it(
        pair: testbed.NetnsPair) -> None:
    restore(pair.a, ruleset())
    fd = lockfile.open_lock()
    try:
        assert lockfile.try_lock(fd)
        argv = ["--netns", pair.a, "-I", "INPUT", "-s", "198.19.9.9", "-j", "DROP"]
        results = []
        for entry in (fastcmd.main, iptables_cmd.main):
            out, err = io.StringIO(), io.StringIO()
            results.append((entry(argv, 4, stdout=out, stderr=err), out.getvalue(),
                            err.getvalue()))
        assert results[0] == results[1]
        assert results[0][0] == 4 and "holding the bpfilter lock" in results[0][2]
    finally:
        os.close(fd)
    assert "198.19.9.9" not in saved(pair.a)


@pytest.mark.parametrize("size", [0, 1, state.TEXT_CHUNK - 8, state.TEXT_CHUNK - 7,
                                  3 * state.TEXT_CHUNK + 5])
def test_stored_blobs_round_trip_and_old_ones_still_read(size: int) -> None:
    data = random.Random(size).randbytes(size)
    with state.store_blob(data) as m:
        assert m.spec.flags & MapFlag.MMAPABLE
        assert state.load_blob(m) == data
    # As generations stored before the maps were mmapable hold it: chunk by chunk.
    chunk = state.TEXT_CHUNK
    raw = struct.pack("<Q", size) + data
    n = max(1, -(-len(raw) // chunk))
    values = [raw[i * chunk:(i + 1) * chunk].ljust(chunk, b"\0") for i in range(n)]
    with bpf.map_create(MapSpec("bpfilter_text", MapType.ARRAY, 4, chunk, n)) as old:
        old.update_batch([(struct.pack("<I", i), v) for i, v in enumerate(values)])
        assert state.load_blob(old) == data
