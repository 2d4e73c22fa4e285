"""Benchmark restore and single commands against iptables-legacy, in throwaway namespaces.

Usage: .venv/bin/python bench/bench_restore.py [--rules N] [--runs R] [--changes M] [--quick]
                                             [--output FILE]
(root; iptables-legacy installed)

- restore: a blocklist of N ``-s ADDR/32 -j DROP`` rules (distinct addresses of
  198.18.0.0/15) loaded by ``bpfilter-restore --netns NS FILE`` and by
  ``ip netns exec NS iptables-legacy-restore FILE`` (same file, a fresh namespace per run),
  whole-process wall time, parse to attached;
- insert: ``-I INPUT -s ADDR -j DROP`` into that loaded ruleset by ``bpfilter-iptables``
  (``--inserts`` times per run, each followed by the ``-D`` of the same rule, timed apart)
  and by ``ip netns exec NS iptables-legacy``: whole-command wall time, and bpfilter's own
  time for the change (``--json``: ``incremental.seconds`` from the first pin to the switch,
  ``incremental.write_seconds`` the map writes and the switch alone); ``python_startup`` is
  ``python -c pass`` with the same interpreter, the floor of any command. The package is
  byte-compiled first, as an installed one is (the timed processes then load bytecode even
  when PYTHONDONTWRITEBYTECODE is set);
- changes: M single-rule changes (inserts at random positions, then deletes) one after
  another into the loaded blocklist, in one process (bpfilter.fastcmd.main, the command's
  entry point, so the interpreter's start-up is not counted M times), timed per 1,000 to
  show how the cost grows.

``ip netns exec`` itself costs a few milliseconds: the ``netns_exec`` series measures it
(``ip netns exec NS true``). Writes bench/results/restore.json and prints a summary.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bpfilter import fastcmd, testbed
from bpfilter.restore import LOCK_ENV

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "restore.json"
BIN = Path(sys.executable).parent
SEED = 20261126
TIMEOUT = 600


def _dotted(n: int) -> str:
    return f"{n >> 24}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def blocklist(n: int, rng: random.Random) -> tuple[str, list[int]]:
    """Restore text of ``n`` distinct /32 DROP rules from 198.18.0.0/15, and the addresses."""
    base = 198 << 24 | 18 << 16
    addrs = [base + a for a in rng.sample(range(1 << 17), n)]
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
             *(f"-A INPUT -s {_dotted(a)}/32 -j DROP" for a in addrs), "COMMIT", ""]
    return "\n".join(lines), addrs


def _timed(argv: Sequence[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=TIMEOUT)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return took, proc


def _series(values: list[float]) -> dict[str, Any]:
    return {"runs": values, "median": statistics.median(values), "min": min(values)}


def _unused(rng: random.Random, taken: set[int]) -> int:
    while True:  # outside the blocklist's /15, so never a duplicate
        a = 198 << 24 | 20 << 16 | rng.getrandbits(16)
        if a not in taken:
            taken.add(a)
            return a


def _byte_compile() -> None:
    root = HERE.parent
    subprocess.run([sys.executable, "-m", "compileall", "-q",
                    *(str(root / d) for d in ("bpfilter", "grammar", "ir", "codegen"))],
                   check=True, timeout=TIMEOUT)


def measure(n: int, runs: int, changes: int, inserts: int = 10) -> dict[str, Any]:
    rng = random.Random(SEED)
    text, addrs = blocklist(n, rng)
    taken = set(addrs)
    out: dict[str, Any] = {"rules": n}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "blocklist.v4"
        path.write_text(text)
        ours: list[float] = []
        theirs: list[float] = []
        nsexec: list[float] = []
        insert: list[float] = []
        insert_ipt: list[float] = []
        delete: list[float] = []
        commit: list[float] = []
        write: list[float] = []
        startup = [_timed([sys.executable, "-c", "pass"])[0] for _ in range(max(5, runs))]
        for _ in range(runs):
            ns = testbed.unique_name("bpfb")
            ref = testbed.unique_name("bpfb")
            try:
                for name in (ns, ref):
                    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
                took, _ = _timed([str(BIN / "bpfilter-restore"), "--netns", ns, str(path)])
                ours.append(took)
                took, _ = _timed(["ip", "netns", "exec", ref, "iptables-legacy-restore",
                                  str(path)])
                theirs.append(took)
                nsexec.append(_timed(["ip", "netns", "exec", ref, "true"])[0])
                ipt = [str(BIN / "bpfilter-iptables"), "--netns", ns]
                for _ in range(inserts):  # as a user runs it: no --json
                    rule = ["INPUT", "-s", _dotted(_unused(rng, taken)), "-j", "DROP"]
                    insert.append(_timed([*ipt, "-I", *rule])[0])
                    delete.append(_timed([*ipt, "-D", *rule])[0])
                new = _dotted(_unused(rng, taken))
                _, proc = _timed([*ipt, "--json", "-I", "INPUT", "-s", new, "-j", "DROP"])
                doc = json.loads(proc.stdout)
                if not doc.get("incremental"):
                    raise RuntimeError(f"the insert rebuilt: {doc.get('rebuilt')}")
                commit.append(doc["incremental"]["seconds"])
                write.append(doc["incremental"]["write_seconds"])
                for _ in range(inserts):
                    took, _ = _timed(["ip", "netns", "exec", ref, "iptables-legacy", "-I",
                                      "INPUT", "-s", _dotted(_unused(rng, taken)), "-j", "DROP"])
                    insert_ipt.append(took)
            finally:
                testbed.delete(ns)
                testbed.delete(ref)
        out["restore"] = {"bpfilter": _series(ours), "iptables_legacy": _series(theirs),
                          "netns_exec": _series(nsexec)}
        out["insert"] = {"bpfilter": _series(insert), "iptables_legacy": _series(insert_ipt),
                         "bpfilter_delete": _series(delete),
                         "bpfilter_commit": _series(commit),
                         "bpfilter_map_write": _series(write),
                         "python_startup": _series(startup)}
        if changes:
            out["changes"] = _changes(path, addrs, taken, changes, rng)
    return out


def _changes(path: Path, addrs: list[int], taken: set[int], m: int,
             rng: random.Random) -> dict[str, Any]:
    """``m`` single-rule changes in one process: inserts at random positions, then deletes
    of what was inserted; seconds per 1,000 (or per tenth of ``m`` when fewer)."""
    ns = testbed.unique_name("bpfb")
    block = max(1, min(1000, m // 10))
    per_block: list[float] = []
    rebuilt = 0
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
        _timed([str(BIN / "bpfilter-restore"), "--netns", ns, str(path)])
        size = len(addrs)
        added: list[str] = []
        start = time.perf_counter()
        for i in range(m):
            if i < m // 2:
                new = _dotted(_unused(rng, taken))
                argv = ["-I", "INPUT", str(rng.randint(1, size + 1)), "-s", new, "-j", "DROP"]
                added.append(new)
                size += 1
            else:
                argv = ["-D", "INPUT", "-s", added.pop(rng.randrange(len(added))), "-j", "DROP"]
                size -= 1
            sink = io.StringIO()
            code = fastcmd.main([*argv, "--netns", ns, "--json"], stdout=sink,
                                stderr=sys.stderr)
            if code != 0:
                raise RuntimeError(f"{argv}: exit {code}")
            if not json.loads(sink.getvalue()).get("incremental"):
                rebuilt += 1
            if (i + 1) % block == 0:
                now = time.perf_counter()
                per_block.append(now - start)
                start = now
    finally:
        testbed.delete(ns)
    return {"changes": m, "block": block, "seconds_per_block": per_block,
            "total": sum(per_block), "rebuilt": rebuilt}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--changes", type=int, default=10_000)
    ap.add_argument("--inserts", type=int, default=10, help="single commands timed per run")
    ap.add_argument("--quick", action="store_true", help="10,000 rules, 1 run, 1,000 changes")
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.rules, args.runs, args.changes = 10_000, 1, 1_000
    if os.geteuid() != 0:
        print("bench_restore: must run as root (namespaces, bpf)", file=sys.stderr)
        return 1
    os.environ.setdefault(LOCK_ENV, f"/run/bpfilter/lock-bench-{os.getpid()}")
    _byte_compile()
    result = measure(args.rules, args.runs, args.changes, args.inserts)
    doc = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "python": platform.python_version()},
           "load_average": os.getloadavg(), "seed": SEED, "bytecode": "precompiled",
           **result}
    args.output.parent.mkdir(exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=1) + "\n")
    r, i = result["restore"], result["insert"]
    print(f"restore {args.rules} rules: bpfilter {r['bpfilter']['median']:.3f} s, "
          f"iptables-legacy {r['iptables_legacy']['median']:.3f} s "
          f"(ip netns exec alone {r['netns_exec']['median'] * 1e3:.1f} ms)")
    print(f"insert one rule: bpfilter {i['bpfilter']['median'] * 1e3:.1f} ms (min "
          f"{i['bpfilter']['min'] * 1e3:.1f} ms; delete {i['bpfilter_delete']['median'] * 1e3:.1f}"
          f" ms; python -c pass {i['python_startup']['median'] * 1e3:.1f} ms; commit "
          f"{i['bpfilter_commit']['median'] * 1e3:.2f} ms, map write "
          f"{i['bpfilter_map_write']['median'] * 1e6:.0f} us), iptables-legacy "
          f"{i['iptables_legacy']['median'] * 1e3:.1f} ms")
    if "changes" in result:
        c = result["changes"]
        blocks = ", ".join(f"{s:.2f}" for s in c["seconds_per_block"])
        print(f"{c['changes']} changes: {c['total']:.1f} s; seconds per {c['block']}: {blocks}"
              f" ({c['rebuilt']} rebuilt)")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
