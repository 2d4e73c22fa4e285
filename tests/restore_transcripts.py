"""The parsing cases of conformance/iptables-restore-observed/r*.txt with their inputs rebuilt.

The recorded transcripts keep iptables' exit code, stderr and the iptables-save output after
each run, but not the input. Each case below pairs a recorded [legacy] section with an input
written from its title and its recorded output; tests/e2e/test_restore_transcripts_replay.py
proves each input reproduces the recorded exit code, error line and saved tables on the real
iptables-legacy-restore, and tests/unit/test_restore_transcripts.py holds `bpfilter translate`
to the same figures.

Left out, because they concern something `translate` does not have or a state it cannot see:
r2 (command-line flags -c -V -h -x -w -W -M -b and argument handling; "empty input" and
"nonexistent file" are kept), r3 except "--test with invalid rule" (-T, --noflush, -v, --test
results), r4 "policy preserved?" (depends on rules loaded before), all of r5 (--noflush
against a preloaded table), r7 "lock contention" (the xtables lock).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ipt_oracle import error_line, split_tables


@dataclass(frozen=True, slots=True)
class Case:
    """A recorded [legacy] run: where it is recorded, and the input rebuilt for it."""

    file: str
    title: str
    text: str | None  # None: no input at all (a missing file)
    family: int = 4
    flags: tuple[str, ...] = ()
    # r7.txt records several runs under one heading as "[legacy] SUB rc=N" lines.
    sub: str | None = None

    @property
    def id(self) -> str:
        label = self.title if self.sub is None else f"{self.title}: {self.sub or 'basic'}"
        return f"{self.file[:-4]}-{re.sub(r'[^A-Za-z0-9]+', '_', label).strip('_')}"


@dataclass(frozen=True, slots=True)
class Observed:
    """What iptables-legacy-restore did, as recorded."""

    rc: int
    line: int | None
    tables: dict[str, str] | None  # iptables-save after the run, when recorded


def _f(*lines: str, end: str = "\n") -> str:
    return "\n".join(lines) + end


CASES: tuple[Case, ...] = (
    Case("r1.txt", "basic filter+nat, user chain, policy, counters ignored without -c", _f(
        "*nat", "-A POSTROUTING -o eth0 -j MASQUERADE", "COMMIT",
        "*filter", ":INPUT DROP [12:3400]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
        ":MYCHAIN - [0:0]", "[5:600] -A INPUT -i lo -j ACCEPT",
        "-A INPUT -p tcp --dport 22 -j MYCHAIN",
        '-A MYCHAIN -s 10.1.2.3/8 -m comment --comment "ssh from lan" -j ACCEPT', "COMMIT")),
    Case("r2.txt", "empty input", ""),
    Case("r2.txt", "nonexistent file", None),
    Case("r3.txt", "--test with invalid rule", _f(
        "*filter", ":INPUT ACCEPT [0:0]", "-A INPUT -m foo --foo-option 1 -j ACCEPT", "COMMIT"),
         flags=("-t",)),
    Case("r4.txt", "atomicity: bad rule in 2nd table (filter OK, nat bad)", _f(
        "*filter", "-A INPUT -j ACCEPT", "COMMIT",
        "*nat", ":POSTROUTING ACCEPT [0:0]", "-A POSTROUTING -j NOSUCHTARGET", "COMMIT")),
    Case("r4.txt", "bad rule in same table: whole table rejected", _f(
        "*filter", "-A INPUT -j ACCEPT", "-A INPUT -p tcp --dport 99999 -j ACCEPT", "COMMIT")),
    Case("r4.txt", "jump to undefined chain", _f("*filter", "-A INPUT -j UNDEFINED", "COMMIT")),
    Case("r4.txt", "append to undefined chain", _f("*filter", "-A NOSUCH -j ACCEPT", "COMMIT")),
    Case("r4.txt", "missing COMMIT", _f("*filter", "-A INPUT -j ACCEPT")),
    Case("r4.txt", "unknown table", _f("*foo", "COMMIT")),
    Case("r4.txt", "builtin chain not in table (PREROUTING in filter)", _f(
        "*filter", ":PREROUTING ACCEPT [0:0]", "COMMIT")),
    Case("r4.txt", "policy on user chain (:FOO DROP)", _f("*filter", ":FOO DROP [0:0]", "COMMIT")),
    Case("r4.txt", "invalid policy on builtin (:INPUT FOO)", _f(
        "*filter", ":INPUT FOO [0:0]", "COMMIT")),
    Case("r4.txt", "policy RETURN on builtin", _f("*filter", ":INPUT RETURN [0:0]", "COMMIT")),
    Case("r4.txt", "builtin with - policy", _f(
        "*filter", ":INPUT - [0:0]", "-A INPUT -j ACCEPT", "COMMIT")),
    Case("r4.txt", "bad counters syntax", _f("*filter", ":INPUT ACCEPT [abc]", "COMMIT")),
    Case("r4.txt", "rule counter prefix without -c, malformed [1:2", _f(
        "*filter", "[1:2 -A INPUT -j ACCEPT", "COMMIT")),
    Case("r4.txt", "-t inside rule", _f("*filter", "-t nat -A INPUT -j ACCEPT", "COMMIT")),
    Case("r4.txt", "rule line outside table", _f("-A INPUT -j ACCEPT")),
    Case("r4.txt", "COMMIT outside table", _f("COMMIT")),
    Case("r4.txt", "table line inside table (nested *nat)", _f(
        "*filter", "-A INPUT -j ACCEPT", "*nat", "COMMIT")),
    Case("r4.txt", "duplicate chain declaration", _f(
        "*filter", ":FOO - [0:0]", ":FOO - [0:0]", "COMMIT")),
    Case("r4.txt", "chain name too long (30 chars)", _f(
        "*filter", ":ABCDEFGHIJKLMNOPQRSTUVWXYZ1234 - [0:0]", "COMMIT")),
    Case("r4.txt", "chain name 28 chars", _f(
        "*filter", ":ABCDEFGHIJKLMNOPQRSTUVWXYZ12 - [0:0]", "COMMIT")),
    Case("r4.txt", "chain name 29 chars", _f(
        "*filter", ":ABCDEFGHIJKLMNOPQRSTUVWXYZ123 - [0:0]", "COMMIT")),
    Case("r4.txt", "MASQUERADE in filter table", _f(
        "*filter", "-A INPUT -j MASQUERADE", "COMMIT")),
    Case("r4.txt", "DNAT in wrong chain (nat INPUT)", _f(
        "*nat", "-A INPUT -p tcp -j DNAT --to-destination 192.0.2.1", "COMMIT")),
    Case("r4.txt", "unknown option", _f("*filter", "-A INPUT --frobnicate -j ACCEPT", "COMMIT")),
    Case("r4.txt", "dport without -p", _f("*filter", "-A INPUT --dport 22 -j ACCEPT", "COMMIT")),
    Case("r4.txt", "bad IP address", _f("*filter", "-A INPUT -s 300.1.1.1 -j DROP", "COMMIT")),
    Case("r4.txt", "IPv6 address in iptables-restore", _f(
        "*filter", "-A INPUT -s 2001:db8::1 -j DROP", "COMMIT")),
    Case("r6.txt", "quoting: double quotes w/ spaces, escaped quote, single quotes, empty string",
         _f("*filter", '-A INPUT -m comment --comment "two words" -j ACCEPT',
            '-A INPUT -m comment --comment "say \\"hi\\"" -j ACCEPT',
            "-A INPUT -m comment --comment 'single quoted' -j ACCEPT",
            '-A INPUT -m comment --comment "" -j ACCEPT', "COMMIT")),
    Case("r6.txt", "quoting: single-quoted word no spaces, backslash outside quotes", _f(
        "*filter", "-A INPUT -m comment --comment 'single' -j ACCEPT",
        "-A INPUT -m comment --comment a\\b -j ACCEPT",
        '-A INPUT -j LOG --log-prefix "IN DROP: "',
        '-A INPUT -m comment --comment "-t nat" -j ACCEPT',
        '-A INPUT -m comment --comment "" -j ACCEPT', "COMMIT")),
    Case("r6.txt", "inline # comment after rule", _f(
        "*filter", "-A INPUT -j ACCEPT # allow everything", "COMMIT")),
    Case("r6.txt", "leading whitespace before # and before -A", _f(
        "*filter", "  # indented comment", "  -A INPUT -j ACCEPT", "COMMIT")),
    Case("r6.txt", "tabs and multiple spaces between tokens", _f(
        "*filter", "-A\tINPUT   -p tcp \t--dport\t\t22  -j ACCEPT", "COMMIT")),
    Case("r6.txt", "whitespace-only line", _f("*filter", " \t ", "-A INPUT -j ACCEPT", "COMMIT")),
    Case("r6.txt", "COMMIT with trailing space", _f("*filter", "-A INPUT -j ACCEPT", "COMMIT ")),
    Case("r6.txt", "lowercase commit", _f("*filter", "-A INPUT -j ACCEPT", "commit")),
    Case("r6.txt", "*filter with trailing comment/space", _f(
        "*filter   # the filter table", "-A INPUT -j ACCEPT", "COMMIT")),
    Case("r6.txt", "-4 / -6 prefixed lines", _f(
        "*filter", "-4 -A INPUT -s 192.0.2.4 -j ACCEPT", "-6 -A INPUT -s 2001:db8::6 -j ACCEPT",
        "COMMIT")),
    Case("r6.txt", "two *filter sections (second flushes first?)", _f(
        "*filter", "-A INPUT -s 192.0.2.1 -j ACCEPT", "COMMIT",
        "*filter", "-A INPUT -s 192.0.2.2 -j ACCEPT", "COMMIT")),
    Case("r6.txt", "rule before chain declaration (user chain declared later)", _f(
        "*filter", "-A INPUT -j LATER", ":LATER - [0:0]", "COMMIT")),
    Case("r6.txt", "long line (> 10240 chars comment? use 300 char comment)", _f(
        "*filter", f"-A INPUT -m comment --comment {'x' * 300} -j ACCEPT", "COMMIT")),
    Case("r6.txt", "CRLF line endings", "*filter\r\n-A INPUT -j ACCEPT\r\nCOMMIT\r\n"),
    Case("r6.txt", "COMMIT without final newline", _f(
        "*filter", "-A INPUT -j ACCEPT", "COMMIT", end="")),
    Case("r7.txt", "ip6tables-restore", _f(
        "*filter", ":INPUT DROP [0:0]", "-A INPUT -s 2001:db8::/32 -p icmpv6 -j ACCEPT",
        "-A INPUT -p tcp --dport 22 -m conntrack --ctstate NEW -j ACCEPT",
        "-A INPUT -j REJECT", "COMMIT"), family=6, sub=""),
    Case("r7.txt", "ip6tables-restore", _f(
        "*filter", "-A INPUT -s 10.0.0.1 -j ACCEPT", "COMMIT"), family=6,
         sub="ipv4 addr in ip6tables-restore"),
    Case("r7.txt", "ip6tables-restore", _f(
        "*filter", "-A INPUT -p icmp -j DROP", "COMMIT"), family=6, sub="-p icmp in ip6tables"),
    Case("r7.txt", "ip6tables-restore", _f(
        "*security", "-A INPUT -j ACCEPT", "COMMIT",
        "*raw", "-A PREROUTING -j CT --notrack", "COMMIT",
        "*mangle", "-A PREROUTING -j MARK --set-mark 1", "COMMIT",
        "*nat", "-A POSTROUTING -o eth0 -j MASQUERADE", "COMMIT",
        "*filter", ":INPUT DROP [0:0]", "-A INPUT -p icmp -j DROP", "COMMIT"),
         sub="all tables"),
)


def _section(path: Path, title: str) -> list[str]:
    lines = path.read_text().splitlines()
    heads = (f"### [legacy] {title}", f"### {title}")
    for i, line in enumerate(lines):
        if line in heads:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("### ")),
                       len(lines))
            return lines[i + 1:end]
    raise LookupError(f"{path.name}: no section {title!r}")


def observed(case: Case, directory: Path) -> Observed:
    """The recorded outcome of `case`, read from its transcript file in `directory`."""
    body = _section(directory / case.file, case.title)
    if case.sub is not None:
        # "[legacy] SUB rc=N" closes a run: its stderr comes before that line and the
        # iptables-save output, when recorded, after it.
        marker = re.compile(rf"^\[legacy\] {re.escape(case.sub)}\s*rc=(\d+)$")
        closing = re.compile(r"^\[(legacy|nft)\] .*rc=\d+$")
        idx = next(i for i, line in enumerate(body) if marker.match(line))
        start = max((i + 1 for i in range(idx) if closing.match(body[i])), default=0)
        after = next((i for i in range(idx + 1, len(body)) if closing.match(body[i])),
                     len(body))
        rc = int(marker.match(body[idx]).group(1))  # type: ignore[union-attr]
        before, following = "\n".join(body[start:idx]), "\n".join(body[idx + 1:after])
        return Observed(rc, error_line(before), split_tables(following) or None)
    text = "\n".join(body)
    m = re.search(r"^(?:--- )?rc=(\d+)$", text, re.M)
    if m is None:
        raise LookupError(f"{case.file}: {case.title!r} records no exit code")
    save_at = text.find("--- iptables-save after:")
    saved = split_tables(text[save_at:]) if save_at >= 0 else None
    head = text if save_at < 0 else text[:save_at]
    return Observed(int(m.group(1)), error_line(head), saved)
