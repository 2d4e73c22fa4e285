"""Benchmark ClassBench rule sets (acl1, fw1, ipc1; 1k and 10k): per-packet ns, optimized vs linear.

Usage: .venv/bin/python bench/bench_classbench.py [--packets N] [--repeat N] [--no-linear] (root)

Each rule file (from ../shared/classbench) becomes an INPUT chain (tests/classbench.py: the
README's mapping, ACCEPT/DROP alternating by line, policy DROP). Packets: the 1k trace where
there is one, and for every set headers drawn from random rules (a random point of the rule's
prefixes, ports and protocol), as ClassBench's trace generator does. Each packet runs through
BPF_PROG_TEST_RUN ``--repeat`` times; the kernel's mean ns per run is recorded. Every verdict
is checked against the linear reference classifier. Writes bench/results/classbench.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bpfilter import bpf, loader
from bpfilter.codegen.compiler import compile_ruleset
from bpfilter.codegen.uapi import NfHook
from bpfilter.grammar.iptables import parse_restore

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
import classbench as cb  # noqa: E402  (the test helpers' ClassBench reader)

RESULTS = HERE / "results" / "classbench.json"
DATA = HERE.parent.parent / "shared" / "classbench"
SEED = 20261125
TARGET_NS = 1000.0
TARGET_RATIO = 3.0


def synthetic(rules: list[cb.CbRule], n: int, rng: random.Random) -> list[cb.CbPacket]:
    """Headers inside random rules."""
    out = []
    for _ in range(n):
        r = rng.choice(rules)

        def inside(prefix: tuple[int, int]) -> int:
            value, length = prefix
            return value | (rng.getrandbits(32 - length) if length < 32 else 0)

        proto = r.proto if r.proto is not None else rng.choice((6, 17, 1, 47))
        out.append(cb.CbPacket(inside(r.src), inside(r.dst), rng.randint(*r.sport),
                               rng.randint(*r.dport), proto))
    return out


def run(rules: list[cb.CbRule], packets: list[cb.CbPacket], repeat: int,
        optimize: bool) -> dict[str, Any]:
    ruleset = parse_restore(cb.restore_text(rules))
    t0 = time.perf_counter()
    compiled = compile_ruleset(ruleset, 4, optimize=optimize)
    t1 = time.perf_counter()
    runner = loader.TestRunner(compiled)
    t2 = time.perf_counter()
    try:
        program = compiled.program(NfHook.LOCAL_IN)
        assert program is not None
        prog = runner.programs.progs[program]
        ctx = loader.hook_context(NfHook.LOCAL_IN, 4)
        ns = []
        wrong = 0
        for p in packets:
            data = loader.test_run_data(cb.packet(p), NfHook.LOCAL_IN, 4)
            res = bpf.prog_test_run(prog, data, ctx_in=ctx, repeat=repeat)
            ns.append(float(res.duration_ns))
            k = cb.first_match(rules, p)
            wrong += res.retval != (0 if k is None else int(cb.verdict_of(k) == "ACCEPT"))
        insns = sum(len(lp.linked.code) // 8 for lp in runner.programs.linked.values())
    finally:
        runner.close()
    return {"optimize": optimize, "compile_s": t1 - t0, "load_s": t2 - t1,
            "instructions": insns, "lookups": [type(x[2]).__name__ for x in compiled.lookups],
            "ns_mean": statistics.fmean(ns), "ns_median": statistics.median(ns),
            "ns_p90": sorted(ns)[int(len(ns) * 0.9)], "wrong_verdicts": wrong}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--packets", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=100)
    ap.add_argument("--no-linear", action="store_true", help="skip the linear programs")
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    rows = []
    for name in ("acl1", "fw1", "ipc1"):
        for size in ("1k", "10k"):
            rules = cb.read_rules(args.data / f"{name}_{size}")
            rng = random.Random(SEED)
            traces = {"synthetic": synthetic(rules, args.packets, rng)}
            trace_file = args.data / f"{name}_{size}_trace"
            if trace_file.exists():
                traces["trace"] = rng.sample(cb.read_trace(trace_file), args.packets)
            for trace, packets in traces.items():
                for optimize in (True, False) if not args.no_linear else (True,):
                    row = {"set": name, "size": size, "rules": len(rules), "packets": trace,
                           **run(rules, packets, args.repeat, optimize)}
                    rows.append(row)
                    print(f"{name:4} {size:>3} ({len(rules):5} rules) {trace:9} "
                          f"{'opt' if optimize else 'lin'}: {row['ns_mean']:9.1f} ns/packet "
                          f"(median {row['ns_median']:.0f}, p90 {row['ns_p90']:.0f}), "
                          f"compile {row['compile_s']:.2f} s, load {row['load_s']:.2f} s, "
                          f"wrong {row['wrong_verdicts']}", flush=True)
    targets = {}
    for name in ("acl1", "fw1", "ipc1"):
        small, large = (next(r for r in rows if r["set"] == name and r["size"] == s
                             and r["packets"] == "synthetic" and r["optimize"])
                        for s in ("1k", "10k"))
        ratio = large["ns_mean"] / small["ns_mean"]
        targets[name] = {"ns_10k": large["ns_mean"], "ns_met": large["ns_mean"] <= TARGET_NS,
                         "ratio": ratio, "ratio_met": ratio <= TARGET_RATIO}
        print(f"{name}: 10k {large['ns_mean']:.0f} ns (target {TARGET_NS:.0f}), "
              f"10k/1k {ratio:.2f}x (target {TARGET_RATIO}x)")
    results = {
        "benchmark": "classbench",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"kernel": platform.release(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "repeat": args.repeat, "rows": rows, "targets": targets,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
