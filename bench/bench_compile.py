"""Benchmark the optimizer on blocklists: per-packet cost and compile time, 100 vs 100,000 rules.

Usage: .venv/bin/python bench/bench_compile.py [--large N] [--packets N] [--repeat N] (root)

For blocklists of ``/32`` source rules, of random prefixes (/8../32, overlapping, mixed
ACCEPT/DROP) and of random ``/24`` source rules (see KINDS), builds the ruleset IR, then times
compile_ruleset (IR -> instructions and map contents) and load_programs (maps created and
filled, program verified and loaded), best and median of ``--runs``; then runs random packets
(half of them sources taken from the rules) through BPF_PROG_TEST_RUN, each ``--repeat``
times, and records the kernel's mean ns per run. The linear program (optimizer off) is
measured too where it still loads. Writes bench/results/compile.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

from bpfilter import bpf, loader
from bpfilter.codegen.compiler import compile_ruleset
from bpfilter.codegen.uapi import NfHook
from bpfilter.grammar.iptables import parse_restore
from bpfilter.ir.model import Ruleset

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "compile.json"
SEED = 20261125
TARGET_RATIO = 1.5  # 100,000 rules: at most 1.5x the cost of 100
TARGET_COMPILE_S = 0.3
LINEAR_MAX = 10_000  # larger linear programs hit the verifier's limits or take minutes


# host: /32 DROPs; prefix: /8../32 overlapping, mixed targets (the many rules inside an earlier
# /8 are shadowed and cost no table entry); net24: /24 DROPs (a trie entry each).
KINDS = ("host", "prefix", "net24")


def _dotted(n: int) -> str:
    return f"{n >> 24}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def blocklist(n: int, kind: str, rng: random.Random) -> tuple[str, list[int]]:
    """Restore text and the rules' addresses for one of KINDS."""
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    addrs = []
    for _ in range(n):
        addr = rng.getrandbits(32)
        if kind == "host":
            lines.append(f"-A INPUT -s {_dotted(addr)}/32 -j DROP")
        elif kind == "net24":  # distinct-looking /24s, rarely nested: every one a trie entry
            addr &= 0xFFFFFF00
            lines.append(f"-A INPUT -s {_dotted(addr)}/24 -j DROP")
        else:
            length = rng.choice((8, 12, 16, 20, 24, 24, 28, 32, 32, 32))
            addr &= (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF
            lines.append(f"-A INPUT -s {_dotted(addr)}/{length} -j "
                         f"{rng.choice(('ACCEPT', 'DROP'))}")
        addrs.append(addr)
    return "\n".join([*lines, "COMMIT", ""]), addrs


def packet(src: int, dst: int = 0xC6120001) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, 22, 0, 0, 5 << 4, 0x02, 1024, 0, 0)
    return struct.pack("!BBHHHBBHII", 0x45, 0, 40, 1, 0, 64, 6, 0, src, dst) + tcp


def per_packet_ns(runner: loader.TestRunner, packets: list[bytes], repeat: int) -> list[float]:
    """Mean ns per run of each packet (BPF_PROG_TEST_RUN with ``repeat``)."""
    program = runner.compiled.program(NfHook.LOCAL_IN)
    assert program is not None
    prog = runner.programs.progs[program]
    ctx = loader.hook_context(NfHook.LOCAL_IN, 4)
    out = []
    for p in packets:
        data = loader.test_run_data(p, NfHook.LOCAL_IN, 4)
        out.append(float(bpf.prog_test_run(prog, data, ctx_in=ctx, repeat=repeat).duration_ns))
    return out


def measure(ruleset: Ruleset, packets: list[bytes], repeat: int, optimize: bool,
            runs: int) -> dict[str, Any]:
    """Compile and load ``runs`` times (the machine is shared: the minimum is the figure
    least disturbed), then time the packets on the last load."""
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        compiled = compile_ruleset(ruleset, 4, optimize=optimize)
        t1 = time.perf_counter()
        runner = loader.TestRunner(compiled)
        t2 = time.perf_counter()
        times.append((t1 - t0, t2 - t1, t2 - t0))
        if i < runs - 1:
            runner.close()
    try:
        ns = per_packet_ns(runner, packets, repeat)
    finally:
        runner.close()
    insns = sum(len(lp.linked.code) // 8 for lp in runner.programs.linked.values())
    best = min(times, key=lambda t: t[2])
    return {"optimize": optimize, "compile_s": best[0], "load_s": best[1],
            "ir_to_loaded_s": best[2],
            "ir_to_loaded_s_median": statistics.median(t[2] for t in times),
            "instructions": insns,
            "lookups": len(compiled.lookups), "ns_mean": statistics.fmean(ns),
            "ns_median": statistics.median(ns), "ns_p90": sorted(ns)[int(len(ns) * 0.9)]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--small", type=int, default=100)
    ap.add_argument("--large", type=int, default=100_000)
    ap.add_argument("--packets", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--runs", type=int, default=5, help="compile + load runs per row")
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    rows = []
    for kind in KINDS:
        for n in (args.small, args.large):
            rng = random.Random(SEED + n)
            text, addrs = blocklist(n, kind, rng)
            t0 = time.perf_counter()
            ruleset = parse_restore(text)
            parse_s = time.perf_counter() - t0
            packets = [packet(rng.choice(addrs) if i % 2 else rng.getrandbits(32))
                       for i in range(args.packets)]
            for optimize in (True, False):
                if not optimize and n > LINEAR_MAX:
                    continue
                row = {"kind": kind, "rules": n, "parse_s": parse_s,
                       **measure(ruleset, packets, args.repeat, optimize, args.runs)}
                rows.append(row)
                print(f"{kind:6} {n:>7} {'opt' if optimize else 'lin'}: "
                      f"{row['ns_mean']:8.1f} ns/packet (median {row['ns_median']:.1f}), "
                      f"compile {row['compile_s']:.3f} s + load {row['load_s']:.3f} s "
                      f"(best of {args.runs}), "
                      f"{row['instructions']} insns", flush=True)
    verdicts = {}
    for kind in KINDS:
        small = next(r for r in rows if r["kind"] == kind and r["rules"] == args.small
                     and r["optimize"])
        large = next(r for r in rows if r["kind"] == kind and r["rules"] == args.large
                     and r["optimize"])
        ratio = large["ns_mean"] / small["ns_mean"]
        verdicts[kind] = {"ratio": ratio, "ratio_met": ratio <= TARGET_RATIO,
                          "ir_to_loaded_s": large["ir_to_loaded_s"],
                          "compile_met": large["ir_to_loaded_s"] <= TARGET_COMPILE_S}
        print(f"{kind}: {args.large} / {args.small} rules = {ratio:.2f}x (target "
              f"{TARGET_RATIO}x); IR -> loaded {large['ir_to_loaded_s']:.3f} s (target "
              f"{TARGET_COMPILE_S} s)")
    results = {
        "benchmark": "compile", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"kernel": platform.release(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "packets": args.packets, "repeat": args.repeat, "rows": rows, "targets": verdicts,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
