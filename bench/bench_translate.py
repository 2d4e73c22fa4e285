"""Benchmark `bpfilter translate` on 100,000-rule iptables-save files (wall time, peak RSS).

Usage: .venv/bin/python bench/bench_translate.py [--rules N] [--runs N] [--no-reference]

Generates, in a temporary directory, a blocklist file (`-A INPUT -s ADDR/32 -j DROP`) and a
mixed-match file (tcp/udp ports and ranges, multiport, interfaces, conntrack, comments), runs
`bpfilter translate` on each several times, and for reference `iptables-legacy-restore --test`
on the same file in a throwaway network namespace (root only), where it also checks that the
translation equals iptables-legacy-save after a real restore. Peak RSS is /usr/bin/time's %M.
It also times the front end alone in this process (`parse_restore`, no start-up, no
printing): wall and CPU seconds, best of the runs. Writes bench/results/translate.json and
prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bpfilter.grammar import iptables

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "translate.json"
TARGET_SECONDS = 0.5
TARGET_RSS_MB = 250.0
SEED = 20261125


def address(i: int) -> str:
    """The i-th address of 198.18.0.0/15 (131,072 of them), skipping .0 hosts."""
    n = (198 << 24) | (18 << 16) | (i % 131072)
    return f"{n >> 24}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def blocklist(rules: int) -> str:
    head = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
    body = "".join(f"-A INPUT -s {address(i)}/32 -j DROP\n" for i in range(rules))
    return head + body + "COMMIT\n"


def mixed(rules: int, seed: int = SEED) -> str:
    """Rules of many shapes with random values; every line is valid for iptables-legacy."""
    r = random.Random(seed)
    lines = ["*filter", ":INPUT DROP [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]",
             ":LOGDROP - [0:0]", "-A LOGDROP -j LOG --log-prefix \"drop: \"", "-A LOGDROP -j DROP"]
    for i in range(rules - 2):
        port = r.randrange(1, 65536)
        lo = r.randrange(1, 60000)
        src = f"{address(r.randrange(131072))}/{r.choice((32, 32, 24, 16, 28))}"
        shape = i % 10
        if shape == 0:
            line = f"-A INPUT -p tcp -m tcp --dport {port} -j ACCEPT"
        elif shape == 1:
            line = f"-A INPUT -s {src} -p udp -m udp --sport {lo}:{lo + 100} --dport 53 -j ACCEPT"
        elif shape == 2:
            ports = ",".join(str(r.randrange(1, 65536)) for _ in range(r.randrange(2, 8)))
            line = f"-A INPUT -p tcp -m multiport --dports {ports},{lo}:{lo + 10} -j ACCEPT"
        elif shape == 3:
            line = f"-A INPUT -i eth{r.randrange(4)} -m conntrack --ctstate RELATED,ESTABLISHED" \
                   " -j ACCEPT"
        elif shape == 4:
            line = f"-A FORWARD -i br{r.randrange(8)}+ -o eth0 -s {src} -j ACCEPT"
        elif shape == 5:
            line = f"-A INPUT -s {src} -m comment --comment \"host {i} blocked\" -j LOGDROP"
        elif shape == 6:
            line = f"-A INPUT ! -s {src} -p tcp -m tcp --dport {port} -m conntrack --ctstate " \
                   "NEW -j REJECT --reject-with tcp-reset"
        elif shape == 7:
            line = f"-A OUTPUT -o eth{r.randrange(4)} -d {src} -p udp -m udp --dport {port} -j DROP"
        elif shape == 8:
            line = f"-A INPUT -p icmp -m icmp --icmp-type {r.choice(('8', '0', '3/4', '11'))} " \
                   f"-s {src} -j ACCEPT"
        else:
            line = f"-A INPUT -s {src} -d {address(r.randrange(131072))}/32 -p tcp -m tcp " \
                   f"--sport 1024:65535 --dport {port} --tcp-flags SYN,RST,ACK SYN -j DROP"
        lines.append(line)
    return "\n".join(lines) + "\nCOMMIT\n"


def measure(argv: list[str]) -> dict[str, Any]:
    """Run argv once with stdout discarded: wall seconds, peak RSS (MB), exit code, stderr tail.

    Linux carries a process's peak RSS across exec, so a child forked straight from this
    (large) Python process would report at least our own size. /usr/bin/time forks the
    command from a small process and reports that child's own peak.
    """
    with tempfile.TemporaryDirectory() as tmp:
        rss_file = Path(tmp) / "rss"
        wrapped = ["/usr/bin/time", "-q", "-f", "%M", "-o", str(rss_file), *argv]
        with open(Path(tmp) / "err", "w+b") as err:
            start = time.perf_counter()
            proc = subprocess.run(wrapped, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=err, check=False)
            wall = time.perf_counter() - start
            err.seek(0)
            tail = err.read()[-400:].decode(errors="replace")
        rss_kb = int(rss_file.read_text().split()[-1])
    return {"seconds": round(wall, 4), "peak_rss_mb": round(rss_kb / 1024, 1),
            "rc": proc.returncode, "stderr_tail": tail}


def series(argv: list[str], runs: int) -> dict[str, Any]:
    samples = [measure(argv) for _ in range(runs)]
    secs = [float(s["seconds"]) for s in samples]
    rss = [float(s["peak_rss_mb"]) for s in samples]
    return {
        "argv": argv,
        "runs": runs,
        "seconds": secs,
        "median_seconds": round(statistics.median(secs), 4),
        "min_seconds": round(min(secs), 4),
        "peak_rss_mb": max(rss),
        "rc": sorted({int(s["rc"]) for s in samples}),
        "stderr_tail": samples[-1]["stderr_tail"],
    }


def parse_series(text: str, runs: int) -> dict[str, Any]:
    """parse_restore(text) in this process, `runs` times: wall and CPU seconds (CPU time is
    the steadier figure when other work shares the machine)."""
    walls, cpus = [], []
    for _ in range(runs):
        # Cold caches, as in a fresh `bpfilter translate` (the Lark tables stay built).
        iptables._FAST.clear()
        iptables._PLANS.clear()
        iptables._EXT_CACHE.clear()
        gc.collect()
        wall, cpu = time.perf_counter(), time.process_time()
        iptables.parse_restore(text)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"runs": runs, "seconds": [round(w, 4) for w in walls],
            "min_seconds": round(min(walls), 4), "min_cpu_seconds": round(min(cpus), 4),
            "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def tables(save_text: str) -> dict[str, str]:
    """iptables-save text per table, `#` lines dropped."""
    out: dict[str, str] = {}
    name = None
    for line in save_text.splitlines():
        if line.startswith("#"):
            continue
        if line.startswith("*"):
            name = line[1:]
            out[name] = ""
        if name is not None:
            out[name] += line + "\n"
    return out


def same_output(ns: str, path: Path) -> bool | str:
    """Whether translate prints what iptables-legacy-save prints after a real restore.

    A fast but wrong translation is no result; this commits the file in the benchmark's own
    namespace and compares per table.
    """
    mine = subprocess.run([*bpfilter_argv(), "translate", str(path)], capture_output=True,
                          text=True, check=False)
    if mine.returncode != 0:
        return f"translate failed: {mine.stderr.strip()[-200:]}"
    load = subprocess.run(["ip", "netns", "exec", ns, "iptables-legacy-restore", str(path)],
                          capture_output=True, text=True, check=False)
    if load.returncode != 0:
        return f"iptables-legacy-restore failed: {load.stderr.strip()[-200:]}"
    saved = subprocess.run(["ip", "netns", "exec", ns, "iptables-legacy-save"],
                           capture_output=True, text=True, check=True)
    theirs = tables(saved.stdout)
    return all(theirs.get(name) == text for name, text in tables(mine.stdout).items())


def bpfilter_argv() -> list[str]:
    script = Path(sys.executable).parent / "bpfilter"
    return [str(script)] if script.exists() else [sys.executable, "-m", "bpfilter"]


def reference_unavailable() -> str | None:
    """Why iptables-legacy-restore cannot be measured here, or None."""
    if os.geteuid() != 0:
        return "needs root for a network namespace"
    for tool in ("ip", "iptables-legacy-restore"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    return None


def machine() -> dict[str, Any]:
    distro = ""
    os_release = Path("/etc/os-release")
    if os_release.exists():
        for line in os_release.read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    # Other work on the machine shows up in the figures; record how busy it was.
    return {"cpus": os.cpu_count(), "kernel": platform.release(), "distro": distro,
            "python": platform.python_version(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rules", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-reference", action="store_true",
                    help="skip iptables-legacy-restore --test")
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if not Path("/usr/bin/time").exists():
        print("bench_translate: needs /usr/bin/time (Debian package `time`)", file=sys.stderr)
        return 2

    why_not = None if not args.no_reference else "disabled with --no-reference"
    why_not = why_not or reference_unavailable()
    results: dict[str, Any] = {
        "benchmark": "translate",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "target": {"seconds": TARGET_SECONDS, "peak_rss_mb": TARGET_RSS_MB},
        "variants": {},
    }
    variants: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bpfilter-bench-") as tmp:
        files = {
            "empty": "*filter\nCOMMIT\n",
            "blocklist": blocklist(args.rules),
            "mixed": mixed(args.rules),
        }
        ns = None
        if why_not is None:
            ns = f"bpft-{os.getpid()}-{secrets.token_hex(4)}"
            subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            for name, text in files.items():
                path = Path(tmp) / f"{name}.rules"
                path.write_text(text)
                rules = sum(1 for line in text.splitlines() if line.startswith("-A"))
                entry: dict[str, Any] = {"rules": rules, "bytes": len(text.encode())}
                entry["parse_restore"] = parse_series(text, args.runs)
                entry["bpfilter_translate"] = series(
                    [*bpfilter_argv(), "translate", str(path)], args.runs)
                if ns is not None:
                    entry["iptables_legacy_restore_test"] = series(
                        ["ip", "netns", "exec", ns, "iptables-legacy-restore", "--test",
                         str(path)], args.runs)
                    entry["output_matches_iptables_save"] = same_output(ns, path)
                else:
                    entry["iptables_legacy_restore_test"] = {"skipped": why_not}
                variants[name] = entry
                print(f"measured {name}", file=sys.stderr)
        finally:
            if ns is not None:
                subprocess.run(["ip", "netns", "del", ns], check=False)
    results["variants"] = variants
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")

    print(f"{'variant':<10} {'rules':>7} {'tool':<34} {'median s':>9} {'min s':>7} "
          f"{'peak MB':>8} {'rc':>4}")
    for name, entry in variants.items():
        assert isinstance(entry, dict)
        for tool in ("bpfilter_translate", "iptables_legacy_restore_test"):
            s = entry[tool]
            if "skipped" in s:
                print(f"{name:<10} {entry['rules']:>7} {tool:<34} skipped: {s['skipped']}")
                continue
            print(f"{name:<10} {entry['rules']:>7} {tool:<34} {s['median_seconds']:>9.3f} "
                  f"{s['min_seconds']:>7.3f} {s['peak_rss_mb']:>8.1f} "
                  f"{','.join(map(str, s['rc'])):>4}")
    for name, entry in variants.items():
        p = entry["parse_restore"]
        print(f"{name}: parse_restore alone (in process) min {p['min_seconds']:.3f} s wall, "
              f"{p['min_cpu_seconds']:.3f} s CPU")
    for name, entry in variants.items():
        if "output_matches_iptables_save" in entry:
            print(f"{name}: translate output identical to iptables-legacy-save: "
                  f"{entry['output_matches_iptables_save']}")
    print(f"target: bpfilter translate <= {TARGET_SECONDS} s and <= {TARGET_RSS_MB:.0f} MB "
          f"for {args.rules} rules; results in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
