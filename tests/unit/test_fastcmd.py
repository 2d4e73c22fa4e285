"""bpfilter.fastcmd's command-line recognition, the layout's text and key searches, and what
the fast path imports (no root needed; tests/e2e/test_fast_single.py runs it for real)."""

from __future__ import annotations

import random
import subprocess
import sys
from array import array

import pytest

from bpfilter.fastcmd import FastCommand, parse
from bpfilter.layout import edit_blob, edit_text, find_key, find_rule

A = 198 << 24 | 19 << 16 | 1


@pytest.mark.parametrize(("argv", "want"), [
    ("-I INPUT -s 198.19.0.1 -j DROP", FastCommand("-I", "INPUT", None, "-s", A, "DROP", None,
                                                   False)),
    ("-w -t filter --netns fw --json -I INPUT 3 -s 198.19.0.1/32 -j ACCEPT",
     FastCommand("-I", "INPUT", 3, "-s", A, "ACCEPT", "fw", True)),
    ("-A BLOCK -d 198.19.0.1 -j DROP -w 5", FastCommand("-A", "BLOCK", None, "-d", A, "DROP",
                                                        None, False)),
    ("-D INPUT 7", FastCommand("-D", "INPUT", 7, None, 0, None, None, False)),
    ("-D INPUT -j DROP -s 198.19.0.1", FastCommand("-D", "INPUT", None, "-s", A, "DROP", None,
                                                   False)),
])
def test_the_fast_shape_is_recognised(argv: str, want: FastCommand) -> None:
    assert parse(argv.split(), 4) == want


@pytest.mark.parametrize("argv", [
    "-I INPUT -s 198.19.0.1 -j DROP -v",  # -v prints the rule: the full path
    "-I INPUT -s 198.19.0.01 -j DROP",  # xtables reads a leading zero as octal
    "-I INPUT -s 198.19.0.256 -j DROP",
    "-I INPUT -s 198.19.0 -j DROP",
    "-I INPUT -s 198.19.0.1/24 -j DROP",
    "-I INPUT -s host.example -j DROP",
    "-I INPUT ! -s 198.19.0.1 -j DROP",
    "-I INPUT -s 198.19.0.1 -j REJECT",
    "-I INPUT -s 198.19.0.1 -s 198.19.0.2 -j DROP",
    "-I INPUT -s 198.19.0.1",
    "-I INPUT 0 -s 198.19.0.1 -j DROP",  # iptables: invalid rule number
    "-A INPUT 2 -s 198.19.0.1 -j DROP",  # iptables: bad argument
    "-D INPUT 2 -s 198.19.0.1 -j DROP",  # iptables: illegal option with delete by number
    "-I INPUT -s 198.19.0.1 -j DROP -t nat",
    "-I INPUT -s 198.19.0.1 -j DROP -w x",
    "-I INPUT -s 198.19.0.1 -j DROP -A INPUT",
    "-I -s 198.19.0.1 -j DROP",
    "-I INPUT -s 198.19.0.1 -j DROP --netns a/b",
    "-I INPUT -p tcp -s 198.19.0.1 -j DROP",
    "-C INPUT -s 198.19.0.1 -j DROP",
    "-L",
    "",
])
def test_anything_else_is_left_to_the_full_path(argv: str) -> None:
    assert parse(argv.split(), 4) is None


def test_ipv6_is_left_to_the_full_path() -> None:
    assert parse(["-I", "INPUT", "-s", "198.19.0.1", "-j", "DROP"], 6) is None


def _naive(text: str, chain: str, rules: int, position: int, line: str | None) -> str:
    start = text.find(f"\n-A {chain} ") + 1
    lines = text[start:].split("\n", rules)
    if line is None:
        del lines[position]
    else:
        lines.insert(position, line)
    return text[:start] + "\n".join(lines)


def test_edit_blob_is_a_line_edit_of_the_chain() -> None:
    rng = random.Random(5)
    n = 50
    text = ("*filter\n:INPUT ACCEPT [0:0]\n:FWD - [0:0]\n"
            + "".join(f"-A INPUT -s 198.19.0.{i}/32 -j DROP\n" for i in range(n))
            + "-A FWD -s 198.19.9.9/32 -j DROP\nCOMMIT\n")
    for position in [0, 1, n // 2, n - 1, n, *rng.sample(range(n), 10)]:
        for line in ("-A INPUT -s 198.19.7.7/32 -j ACCEPT", None):
            if line is None and position == n:
                continue
            want = _naive(text, "INPUT", n, position, line)
            assert edit_text(text, "INPUT", n, position, line) == want
            got = edit_blob(text.encode(), "INPUT", n, position,
                            None if line is None else line.encode())
            assert got == want.encode()
    with pytest.raises(ValueError):
        edit_text(text, "OUTPUT", 0, 0, None)


def test_find_key_only_matches_whole_elements() -> None:
    keys = array("I", [0x01020304, 0x00000102, 0x03040000, 7, 0x00000102])
    # 0x01020304's bytes also start inside the pair (0x00000102, 0x03040000) on some
    # byte orders: only aligned matches count.
    assert find_key(keys, 0x01020304) == 0
    assert find_key(keys, 0x00000102) == 1
    assert find_key(keys, 0x00000102, 2) == 4
    assert find_key(keys, 0x04000001) == -1
    assert find_key(keys, 0x04000001 + 1) == -1
    acts = bytearray([0, 0, 0, 0, 1])
    assert find_rule(keys, acts, 0x00000102, 1) == 4
    assert find_rule(keys, acts, 7, 1) == -1
    rng = random.Random(1)
    big = array("I", (rng.getrandbits(32) for _ in range(5000)))
    for i in rng.sample(range(5000), 50):
        assert find_key(big, big[i]) == big.index(big[i])


def test_the_fast_path_imports_only_the_kernel_layer() -> None:
    probe = ("import sys\nfrom bpfilter import fastcmd\n"
             "assert fastcmd.parse('-I INPUT -s 198.19.0.1 -j DROP'.split(), 4)\n"
             "heavy = ('lark', 'bpfilter.grammar', 'bpfilter.ir', 'bpfilter.codegen.compiler',\n"
             "         'bpfilter.codegen.lookup', 'bpfilter.incremental', 'bpfilter.restore',\n"
             "         'bpfilter.iptables_cmd', 'bpfilter.loader', 'subprocess')\n"
             "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
