"""bpfilter-iptables' entry point: one rule added to or deleted from a blocklist chain
without importing the parser, the optimizer or the code generator.

The command line is recognised by a few exact word tests (``[-w [SECS]] [-t filter]
[--netns NAME] [--json] -A|-I [N]|-D CHAIN -s|-d A.B.C.D[/32] -j ACCEPT|DROP``, or
``-D CHAIN N``); the chain must be a blocklist in the stored layout whose rules test that
one field with /32 addresses and nothing else (bpfilter.layout.Blocklist). Then the change
is worked out on the layout and the stored text as bpfilter.iptables_cmd's blocklist path
does it, and applied by bpfilter.state.apply_change. Whatever else happens (another
command shape, a word in doubt, not root, the lock taken, a chain that would stop being a
lookup, a missing rule) hands the command unchanged to the full path
(bpfilter.iptables_cmd.main), which gives the same result the long way; so does anything
this module finds before it starts writing. tests/e2e/test_fast_single.py runs both paths
on the same commands and compares everything they print and leave.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

from bpfilter import bpf, bpffs, lockfile, netns, state
from bpfilter.dispatch import TableKey
from bpfilter.layout import Rebuild, blocklist_change, edit_blob, find_rule

TOOL = "bpfilter-iptables"
EXIT_RESOURCE = 4  # as bpfilter.restore.EXIT_RESOURCE (iptables' RESOURCE_PROBLEM)
_TARGETS = frozenset({"ACCEPT", "DROP"})
_FIELDS = frozenset({"-s", "-d"})  # spelled as Blocklist.field spells its key field
# A blocklist rule this path may rebuild from its key alone: nothing but the address.
_REP = re.compile(r"-A (\S+) (-[sd]) \d{1,3}(?:\.\d{1,3}){3}/32 -j ([A-Z]+)")


@dataclass(frozen=True, slots=True)
class FastCommand:
    """A command line of the one shape this path takes."""

    command: str  # -A, -I or -D
    chain: str
    num: int | None  # -I N / -D N
    option: str | None  # -s or -d (None: -D by number)
    addr: int
    target: str | None
    netns: str | None
    json: bool


def _octets(text: str) -> int | None:
    """A dotted quad as iptables-save prints one (no leading zeros: xtables reads those as
    octal), with an optional /32; None for anything else."""
    if text.endswith("/32"):
        text = text[:-3]
    parts = text.split(".")
    if len(parts) != 4:
        return None
    value = 0
    for p in parts:
        if not (p.isascii() and p.isdigit()) or len(p) > 3 or (p[0] == "0" and p != "0"):
            return None
        n = int(p)
        if n > 255:
            return None
        value = value << 8 | n
    return value


def _rulenum(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() and int(text) >= 1 else None


def parse(argv: Sequence[str], family: int) -> FastCommand | None:
    """The command when ``argv`` has exactly the fast shape, else None."""
    if family != 4:
        return None
    command = chain = option = target = ns = None
    num: int | None = None
    addr: int | None = None
    as_json = False
    i, n = 0, len(argv)
    while i < n:
        a = argv[i]
        nxt = argv[i + 1] if i + 1 < n else None
        if a in ("-A", "-I", "-D"):
            if command is not None or nxt is None or nxt[:1] in ("", "-", "!"):
                return None
            command, chain = a, nxt
            i += 2
            # iptables takes the next word as the rule number unless it starts with - or !
            if a != "-A" and i < n and argv[i][:1] not in ("-", "!"):
                num = _rulenum(argv[i])
                if num is None:
                    return None
                i += 1
            continue
        if a in _FIELDS:
            if option is not None or nxt is None:
                return None
            option, addr = a, _octets(nxt)
            if addr is None:
                return None
        elif a == "-j":
            if target is not None or nxt not in _TARGETS:
                return None
            target = nxt
        elif a == "-t":
            if nxt != "filter":
                return None
        elif a == "--netns":
            if ns is not None or nxt is None or nxt[:1] in ("", "-", "!"):
                return None
            ns = nxt
        elif a == "-w":
            if nxt is not None and nxt[:1] not in ("-", "!"):
                if not (nxt.isascii() and nxt.isdigit()):
                    return None
                i += 1  # the seconds: only the full path ever waits
            i += 1
            continue
        elif a == "--json":
            as_json = True
            i += 1
            continue
        else:
            return None
        i += 2
    if command is None or chain is None:
        return None
    if command == "-D" and num is not None:
        if option is not None or target is not None:
            return None
    elif option is None or target is None:
        return None
    if ns is not None:
        try:
            netns.check_name(ns)
        except netns.NetnsError:
            return None
    return FastCommand(command, chain, num, option, addr or 0, target, ns, as_json)


@dataclass(frozen=True, slots=True)
class _Outcome:
    code: int
    err: str
    data: dict[str, object]


def _ready(cmd: FastCommand) -> bool:
    """The checks the full path makes before it runs a command, passed."""
    try:
        if os.geteuid() != 0:
            return False
        bpffs.ensure_mounted()
        if cmd.netns is not None:
            netns.path(cmd.netns)
    except (bpffs.BpffsError, netns.NetnsError, OSError):
        return False
    return True


def _apply(cmd: FastCommand) -> _Outcome | None:
    """The change, under the lock; None when the full path must decide."""
    key = TableKey(4, "filter")
    try:
        head = state.live_head(key, cmd.netns)
        b = head.layout.fast.get(cmd.chain) if head is not None else None
        if head is None or b is None:
            return None
        rep = _REP.fullmatch(b.rep)
        if rep is None or rep.group(1) != cmd.chain or b.bits != 32 or b.length != 32:
            return None
        [seg] = head.layout.segments[cmd.chain]
        n = len(b.keys)
        line: bytes | None = None
        if cmd.option is None:  # -D CHAIN N
            assert cmd.num is not None
            if cmd.num > n:
                return None
            pos, k, action = cmd.num - 1, b.keys[cmd.num - 1], None
        else:
            assert cmd.target is not None
            act_text = f"-A X -j {cmd.target}"
            if rep.group(2) != cmd.option or act_text not in seg.actions:
                return None
            k, act = cmd.addr, seg.actions.index(act_text)
            if cmd.command == "-D":
                pos = find_rule(b.keys, b.acts, k, act)
                if pos < 0:
                    return None  # the full path words the error
                action = None
            else:
                pos = n if cmd.command == "-A" else (cmd.num or 1) - 1
                if pos > n:
                    return None
                action = act
                a = k.to_bytes(4, "big")
                line = (f"-A {cmd.chain} {cmd.option} {a[0]}.{a[1]}.{a[2]}.{a[3]}/32 "
                        f"-j {cmd.target}").encode()
        change = blocklist_change(head.layout, cmd.chain, pos, k, action,
                                  dirty=state.dirty_keys(head))
        blob = edit_blob(head.blob(), cmd.chain, n, pos, line)
    except (Rebuild, bpf.BpfError, state.StateError, bpffs.BpffsError, netns.NetnsError,
            ValueError):
        return None  # nothing written yet: the full path reads again and decides
    try:
        done = state.apply_change(head, change, blob)
    except (bpf.BpfError, state.StateError, bpffs.BpffsError, netns.NetnsError) as e:
        return _Outcome(EXIT_RESOURCE, f"{TOOL}: {e}\n", {})
    rules = sum(len(s) for s in change.layout.slots.values())
    return _Outcome(0, "", {"changed": True, "generation": done.generation, "rules": rules,
                            "programs": done.prog_ids, "incremental": done.as_json(),
                            "rebuilt": None})


def run_fast(argv: Sequence[str], family: int, stdout: IO[str], stderr: IO[str]) -> int | None:
    """The command done on the fast path (its exit code), or None: nothing was done."""
    cmd = parse(argv, family)
    if cmd is None or not _ready(cmd):
        return None
    fd = lockfile.open_lock()
    try:
        if not lockfile.try_lock(fd):
            return None  # the full path waits (-w) or says so
        out = _apply(cmd)
    finally:
        os.close(fd)  # releases the lock
    if out is None:
        return None
    if cmd.json:
        import json

        doc = {"ok": out.code == 0, "exit_code": out.code, "family": family,
               "table": "filter", "netns": cmd.netns, "command": cmd.command,
               "chain": cmd.chain, "error": out.err.strip() or None, **out.data}
        stdout.write(json.dumps(doc, sort_keys=True) + "\n")
    stderr.write(out.err)
    return out.code


def main(argv: Sequence[str], family: int = 4, *, stdout: IO[str] | None = None,
         stderr: IO[str] | None = None) -> int:
    """The whole command: the fast path when it applies, else bpfilter.iptables_cmd.main."""
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    code = run_fast(argv, family, stdout, stderr)
    if code is not None:
        return code
    from bpfilter import iptables_cmd

    return iptables_cmd.main(argv, family, stdout=stdout, stderr=stderr)


__all__ = ["FastCommand", "main", "parse", "run_fast"]
