"""Near-valid iptables-restore documents: the conformance corpus and seeded damage to it."""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "conformance"

VOCABULARY = (
    "*filter", "*nat", "*mangle", "*raw", "*security", "*foo", ":INPUT", ":FORWARD", ":OUTPUT",
    ":PREROUTING", ":USER", "ACCEPT", "DROP", "RETURN", "-", "[0:0]", "[1:2]", "[", "]", "COMMIT",
    "-A", "-I", "-D", "-R", "-N", "-X", "-F", "-Z", "-E", "-P", "-C", "-S", "-L", "-4", "-6",
    "INPUT", "OUTPUT", "USER", "!", "-s", "-d", "-i", "-o", "-p", "-f", "-j", "-g", "-m", "-t",
    "tcp", "udp", "icmp", "all", "6", "0", "--dport", "--sport", "--dports", "multiport",
    "conntrack", "--ctstate", "NEW,ESTABLISHED", "comment", "--comment", '"a b"', '"', "'",
    "10.0.0.0/8", "1.2.3.4/33", "::1/128", "eth+", "+", "1:65535", "65536", "0x10/0xff",
    "--icmp-type", "echo-request", "REJECT", "--reject-with", "tcp-reset", "LOG", "#",
    "--log-prefix", "limit", "--limit", "5/s", "\\", "\\x41", "99999999999999999999",
)
ODD_SPACE = (" ", "  ", "\t", "\r", "\v", "\f", "\xa0", "\u2003", "\x00", "\r\n", "\n")


def _t_documents(path: Path) -> Iterator[tuple[int, str]]:
    family = 6 if path.name.startswith("libip6t_") else 4
    table, chains = "filter", ["INPUT"]
    for raw in path.read_text(errors="replace").splitlines():
        if raw.startswith("*"):
            table = raw[1:].strip()
        elif raw.startswith(":"):
            chains = raw[1:].split(",")
        elif raw and raw[0] not in "#@%" and ";" in raw:
            rule = raw.split(";")[0]
            yield family, f"*{table}\n-A {chains[0]} {rule}\nCOMMIT\n"


def _dump_windows(path: Path, family: int) -> Iterator[tuple[int, str]]:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if not
             ln.startswith("#")]
    # One document per table: header, chain lines, up to 25 rules, COMMIT.
    for i, line in enumerate(lines):
        if not line.startswith("*"):
            continue
        end = next((j for j in range(i, len(lines)) if lines[j] == "COMMIT"), len(lines))
        head = [ln for ln in lines[i:end] if ln.startswith(("*", ":"))]
        rules = [ln for ln in lines[i:end] if ln.startswith(("-", "["))]
        for start in range(0, max(1, len(rules)), 25):
            yield family, "\n".join(head + rules[start:start + 25] + ["COMMIT"]) + "\n"


@functools.cache
def dump_documents() -> tuple[tuple[int, str], ...]:
    """(family, text) windows of the real-world dumps as iptables-legacy 1.8.9 saved them."""
    if not SHARED.is_dir():
        return ()
    docs: list[tuple[int, str]] = []
    for path in sorted((SHARED / "realworld" / "_golden").glob("*.legacy.save")):
        docs.extend(_dump_windows(path, 4))
    for path in sorted((SHARED / "realworld" / "ufw").glob("emulated-*ip6tables*legacy*")):
        docs.extend(_dump_windows(path, 6))
    return tuple(docs)


@functools.cache
def corpus() -> tuple[tuple[int, str], ...]:
    """(family, text) restore documents from ../shared/conformance (empty when it is absent):
    one per rule line of iptables/extensions/*.t (OK and FAIL alike), plus dump_documents().

    The .t files come from iptables 1.8.13 and the dumps from 1.8.9, so only the dumps are
    a fair start for comparisons with the installed iptables.
    """
    if not SHARED.is_dir():
        return ()
    docs: list[tuple[int, str]] = []
    for path in sorted((SHARED / "iptables" / "extensions").glob("*.t")):
        docs.extend(_t_documents(path))
    return tuple(docs) + dump_documents()


def mutate(text: str, rng: random.Random, rounds: int) -> str:
    """Apply `rounds` random token- or line-level damage to a restore document."""
    lines = text.split("\n")
    for _ in range(rounds):
        li = rng.randrange(len(lines))
        toks = lines[li].split(" ")
        ti = rng.randrange(len(toks))
        op = rng.randrange(14)
        if op == 0 and len(toks) > 1:
            del toks[ti]
        elif op == 1:
            toks.insert(ti, toks[ti])
        elif op == 2 and len(toks) > 1:
            tj = min(ti + 1, len(toks) - 1)
            toks[ti], toks[tj] = toks[tj], toks[ti]
        elif op == 3:
            toks.insert(ti, "!")
        elif op == 4:
            toks[ti] = rng.choice(["9" * rng.randrange(5, 80), "-1", "0x" + "f" * 20,
                                   "4294967296", "65536", "1" * 400, "1e9", "+5"])
        elif op == 5:
            cut = rng.randrange(len(lines[li]) + 1)
            toks = [lines[li][:cut]]
            lines = lines[: li + 1]
        elif op == 6:
            word = toks[ti]
            at = rng.randrange(len(word) + 1)
            toks[ti] = word[:at] + rng.choice(['"', "'", '\\"', "\\"]) + word[at:]
        elif op == 7:
            lines[li] = rng.choice(ODD_SPACE).join(toks)
            continue
        elif op == 8 and len(lines) > 1:
            del lines[li]
            continue
        elif op == 9:
            lines.insert(li, lines[li])
            continue
        elif op == 10:
            lj = rng.randrange(len(lines))
            lines[li], lines[lj] = lines[lj], lines[li]
            continue
        elif op == 11:
            toks[ti] = rng.choice(VOCABULARY)
        elif op == 12:
            toks[ti] = toks[ti].swapcase()
        else:
            toks.insert(ti, rng.choice(["#", "[1:2]", "[", ":", ",", "/", "-", "--", "''"]))
        lines[li] = " ".join(toks)
    return "\n".join(lines)
