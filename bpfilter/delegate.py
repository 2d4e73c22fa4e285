"""Tables bpfilter does not compile (nat, mangle, security), handed unchanged to the system's
iptables-legacy tools inside the target network namespace (``--delegate``).

Which tables are delegated comes from, in order of precedence: the ``--delegate`` option, the
``BPFILTER_DELEGATE`` environment variable, and ``delegate =`` in the configuration file
(``/etc/bpfilter/bpfilter.conf``, or the file named by ``BPFILTER_CONFIG``). Drop-in callers
such as netfilter-persistent cannot add options, hence the last two.

The backend is iptables-legacy: its nat (-100/100), mangle (-150) and security (50) hooks sit
at other priorities than bpfilter's filter (0) and raw (-300) links, so they coexist, and its
messages and ``-v`` output are those bpfilter reproduces. (A BPF netfilter link refuses to
share a priority with a hook already there, EBUSY (seen on 6.18 with a legacy filter table):
a delegated *filter* or *raw* table would collide, so those two are never delegated.)
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bpfilter import bpf, bpffs, netns, state
from bpfilter.codegen.spec import MapSpec
from bpfilter.codegen.uapi import MapType
from bpfilter.dispatch import TableKey
from bpfilter.grammar.iptables import BUILTIN_CHAINS
from bpfilter.restore_verbose import Printer

if TYPE_CHECKING:
    from bpfilter.ir.model import Ruleset, Table
    from bpfilter.restore import Outcome, RestoreOptions

CONFIG_PATH = Path("/etc/bpfilter/bpfilter.conf")
CONFIG_ENV = "BPFILTER_CONFIG"
DELEGATE_ENV = "BPFILTER_DELEGATE"
DELEGABLE = ("nat", "mangle", "security")
COMPILED = ("filter", "raw")
# Config keys naming the restore backend per family; save and single commands are found next
# to it (iptables-legacy-restore -> iptables-legacy-save, iptables-legacy).
BACKEND_KEYS = {4: "iptables", 6: "ip6tables"}
DEFAULT_BACKEND = {4: "/usr/sbin/iptables-legacy-restore",
                   6: "/usr/sbin/ip6tables-legacy-restore"}
CONFIG_KEYS = frozenset({"delegate", *BACKEND_KEYS.values()})
# The kernel lists the legacy tables of a namespace here, most recently created first.
TABLE_NAMES = {4: "ip_tables_names", 6: "ip6_tables_names"}
TIMEOUT = 600.0


class ConfigError(ValueError):
    """The delegation settings are malformed (an unknown table or key, a bad line)."""


class SaveError(RuntimeError):
    """The backend's save failed: its exit code and standard error."""

    def __init__(self, code: int, err: str) -> None:
        super().__init__(err)
        self.code = code
        self.err = err


@dataclass(frozen=True, slots=True)
class Config:
    """Which tables are delegated and to which programs."""

    tables: frozenset[str] = frozenset()
    backend: Mapping[int, str] = field(default_factory=lambda: dict(DEFAULT_BACKEND))
    source: str = ""  # where ``tables`` came from, for messages

    def restore_cmd(self, family: int) -> str:
        return self.backend[family]

    def save_cmd(self, family: int) -> str:
        return self.backend[family].removesuffix("-restore") + "-save"

    def single_cmd(self, family: int) -> str:
        return self.backend[family].removesuffix("-restore")

    def legacy(self, family: int) -> bool:
        """Whether the backend is iptables-legacy, whose tables the kernel lists in /proc."""
        return "legacy" in Path(self.backend[family]).name


def parse_config(text: str, source: str = str(CONFIG_PATH)) -> dict[str, str]:
    """``key = value`` lines; ``#`` starts a comment line; blank lines are ignored. Unknown
    keys are errors, so a misspelt key does not silently leave a table refused."""
    out: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key:
            raise ConfigError(f"{source}:{n}: expected `key = value`, got {raw!r}")
        if key not in CONFIG_KEYS:
            raise ConfigError(f"{source}:{n}: unknown key {key!r} (known: "
                              f"{', '.join(sorted(CONFIG_KEYS))})")
        out[key] = value
    return out


def parse_tables(text: str, source: str) -> frozenset[str]:
    """A comma-separated list of delegable tables; empty or ``none``: no table."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["none"]:
        return frozenset()
    for name in names:
        if name in COMPILED:
            raise ConfigError(f"{source}: table {name!r} is compiled by bpfilter and cannot be "
                              f"delegated (delegable: {', '.join(DELEGABLE)})")
        if name not in DELEGABLE:
            raise ConfigError(f"{source}: unknown table {name!r} (delegable: "
                              f"{', '.join(DELEGABLE)})")
    return frozenset(names)


def _backend(path: str, source: str) -> str:
    if not path.startswith("/") or not Path(path).name.endswith("-restore"):
        raise ConfigError(f"{source}: the backend must be an absolute path to an "
                          f"*-restore program (like {DEFAULT_BACKEND[4]}), got {path!r}")
    return path


def load(option: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """The settings in force: ``option`` (the --delegate value) over the environment over the
    configuration file. A missing configuration file is no error; a malformed one is."""
    env = os.environ if env is None else env
    path = Path(env.get(CONFIG_ENV) or CONFIG_PATH)
    try:
        conf = parse_config(path.read_text(), str(path))
    except FileNotFoundError:
        conf = {}
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read: {e}") from None
    backend = dict(DEFAULT_BACKEND)
    for family, key in BACKEND_KEYS.items():
        if key in conf:
            backend[family] = _backend(conf[key], f"{path}: {key}")
    if option is not None:
        return Config(parse_tables(option, "--delegate"), backend, "--delegate")
    if DELEGATE_ENV in env:
        return Config(parse_tables(env[DELEGATE_ENV], DELEGATE_ENV), backend, DELEGATE_ENV)
    if "delegate" in conf:
        return Config(parse_tables(conf["delegate"], f"{path}: delegate"), backend, str(path))
    return Config(frozenset(), backend)


def refusal(table: str) -> str:
    """Why a table that is neither compiled nor delegated is refused."""
    return (f"table '{table}' cannot be compiled to eBPF by bpfilter (it compiles "
            f"{' and '.join(COMPILED)}); use --delegate {table} or {DELEGATE_ENV}={table} "
            "to hand it to iptables-legacy-restore")


# --- splitting restore input ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Section:
    """The lines of one delegated table in the input, ``*table`` to its COMMIT."""

    table: str
    first: int  # line number of ``*table``
    last: int  # line number of COMMIT, or of the last input line when COMMIT is missing
    text: str  # those lines, unchanged

    def padded(self) -> str:
        """The section behind empty lines, so the backend's line numbers are the input's."""
        return "\n" * (self.first - 1) + self.text


def split(text: str, tables: frozenset[str]) -> tuple[str, list[Section]]:
    """(the input with the delegated sections' lines emptied, the sections in input order).

    Sections are found as iptables-restore finds tables: a line starting with ``*`` outside a
    table opens one, a ``COMMIT`` line inside one closes it; ``#`` and empty lines are
    comments. Emptied lines keep every other line's number."""
    if not any(f"*{t}" in text for t in tables):
        return text, []  # cheap for large inputs with none of the tables
    lines = text.split("\n")
    sections: list[Section] = []
    in_table = False
    start, name = 0, ""
    for i, line in enumerate(lines):
        if not line or line.startswith("#"):
            continue
        if in_table and line == "COMMIT":
            in_table = False
            if name in tables:
                sections.append(_section(lines, name, start, i))
        elif not in_table and line.startswith("*"):
            in_table = True
            start, name = i, (line[1:].split() or [""])[0]
    if in_table and name in tables:  # no COMMIT: the section runs to the end of the input
        sections.append(Section(name, start + 1, len(lines), "\n".join(lines[start:])))
    for s in sections:
        lines[s.first - 1:s.last] = [""] * (s.last - s.first + 1)
    return "\n".join(lines), sections


def _section(lines: list[str], name: str, start: int, end: int) -> Section:
    body = "\n".join(lines[start:end + 1])
    if end + 1 < len(lines):
        body += "\n"
    return Section(name, start + 1, end + 1, body)


# --- running the backend ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Ran:
    """What a backend command did."""

    code: int
    out: str
    err: str


def run(argv: Sequence[str], ns: str | None, stdin: str = "") -> Ran:
    """Run ``argv`` with its network namespace ``ns`` (None: the caller's). The child is
    forked from a thread inside ``ns`` and so starts there; its mount namespace is the
    caller's, which iptables-legacy does not mind."""
    try:
        with netns.entered(ns):
            p = subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                               timeout=TIMEOUT, check=False)
    except FileNotFoundError:
        return Ran(1, "", f"cannot run {argv[0]}: no such program (set `{_key(argv[0])} = "
                   f"PATH` in {CONFIG_PATH} or install iptables)\n")
    except PermissionError as e:
        return Ran(1, "", f"cannot run {argv[0]}: {e.strerror}\n")
    except subprocess.TimeoutExpired:
        return Ran(4, "", f"{argv[0]} did not finish within {TIMEOUT:g}s\n")
    return Ran(p.returncode, p.stdout, p.stderr)


def _key(program: str) -> str:
    return BACKEND_KEYS[6] if Path(program).name.startswith("ip6") else BACKEND_KEYS[4]


def restore_flags(*, counters: bool = False, noflush: bool = False, test: bool = False,
                  verbose: bool = False, wait: float | None = None,
                  modprobe: str | None = None) -> list[str]:
    """The backend's command-line flags for the restore options that apply to one table."""
    flags = [f for f, on in (("-c", counters), ("-n", noflush), ("-t", test),
                             ("-v", verbose)) if on]
    if wait is not None:
        flags += ["-w"] if wait == float("inf") else ["-w", str(int(wait))]
    if modprobe is not None:
        flags += ["-M", modprobe]
    return flags


def restore_section(section: Section, config: Config, family: int, ns: str | None,
                    flags: Sequence[str]) -> Ran:
    """Commit one delegated table with the backend; its messages carry the input's line
    numbers."""
    return run([config.restore_cmd(family), *flags], ns, section.padded())


# --- one restore ------------------------------------------------------------------------------

_ERROR_LINE = re.compile(r"(?:^Error occurred at line: |line )(\d+)", re.M)


@dataclass(slots=True)
class Batch:
    """One restore's delegated tables, committed in input order between bpfilter's own."""

    opts: RestoreOptions
    config: Config
    ours: str  # the input with the delegated tables' lines emptied
    pending: list[Section]
    printer: Printer

    @classmethod
    def prepare(cls, text: str, opts: RestoreOptions) -> Batch:
        """Split ``text`` per the delegation settings in force; ConfigError when they are
        malformed."""
        config = load(opts.delegate)
        ours, sections = split(text, config.tables)
        pending = [s for s in sections if opts.table in (None, s.table)]
        return cls(opts, config, ours, pending, Printer(text))

    @property
    def lines(self) -> int:
        return len(self.printer.lines)

    def commit_before(self, line: float, out: Outcome) -> bool:
        """Commit, with the backend, the delegated tables that start before input line
        ``line``, recording each in ``out``; False (``out`` holding the backend's error and
        exit code) when one fails: later tables are then left alone, as iptables-restore
        leaves them after an error."""
        from bpfilter.restore import TableResult

        o = self.opts
        flags = restore_flags(counters=o.counters, noflush=o.noflush, test=o.test,
                              verbose=o.verbose, wait=o.wait, modprobe=o.modprobe)
        while self.pending and self.pending[0].first < line:
            s = self.pending.pop(0)
            if o.verbose:
                out.out += self.printer.upto(s.first - 1)
                self.printer.shown = max(self.printer.shown, s.last)
            new = (not o.test and self.config.legacy(o.family)
                   and s.table not in kernel_tables(o.family, o.netns))
            ran = restore_section(s, self.config, o.family, o.netns, flags)
            if new and s.table in kernel_tables(o.family, o.netns):
                mark_created(s.table, o.family, o.netns)
            out.out += ran.out if o.verbose else ""
            if ran.code != 0:
                m = _ERROR_LINE.search(ran.err)
                out.code, out.error_line = ran.code, int(m.group(1)) if m else s.first
                out.err += ran.err
                return False
            out.err += ran.err  # warnings
            rules = sum(1 for t in s.text.split("\n") if t.startswith(("-A", "-I", "[")))
            out.tables.append(TableResult(o.family, s.table, None, rules, delegated=True))
        return True

    def verbose_table(self, table: Table, base: Ruleset | None) -> str:
        """-v output of one of bpfilter's own tables (``base``: the ruleset in force, read
        for --noflush)."""
        from bpfilter.iptables_cmd import empty_table  # it imports bpfilter.restore

        o = self.opts
        before = None
        if not o.noflush and table.name in COMPILED:
            live = state.live_table(TableKey(o.family, table.name), o.netns)
            before = live.table if live is not None else None
        elif base is not None:
            before = base.table(table.name)
        if before is None:
            before = empty_table(o.family, table.name)
        return self.printer.table(table.line, before, table, o.family, o.noflush)


# --- saving -----------------------------------------------------------------------------------

def kernel_tables(family: int, ns: str | None) -> list[str]:
    """The legacy tables that exist in ``ns``, most recently created first (the order
    iptables-save prints). Read from /proc, so no table is created by asking."""
    try:
        with netns.entered(ns):
            text = Path(f"/proc/thread-self/net/{TABLE_NAMES[family]}").read_text()
    except FileNotFoundError:
        return []
    return text.split()


# The kernel keeps no creation time for its tables, and iptables-save's order depends on it
# (most recent first). A small map pinned when bpfilter created a delegated table records it,
# so bpfilter-save can place that table among bpfilter's own.
MARKER_SPEC = MapSpec("bpfilter_deleg", MapType.ARRAY, 4, 4, 1)


def _marker(table: str, family: int) -> str:
    return f"{'ip' if family == 4 else 'ip6'}-{table}-delegated"


def mark_created(table: str, family: int, ns: str | None) -> None:
    """Record that bpfilter created ``table`` now (best effort: it only orders the save)."""
    with contextlib.suppress(OSError, bpffs.BpffsError, state.StateError):
        state.claim(ns)
        with bpf.map_create(MARKER_SPEC) as m:
            bpffs.pin(m, _marker(table, family), ns, replace=True)


def creation(pin: str, ns: str | None) -> float:
    """The id of the map pinned as ``pin``: the kernel hands map ids out in increasing
    order, so they order creations exactly (inode times are too coarse). -inf when there is
    no such pin."""
    try:
        with bpf.map_from_fd(bpffs.get(pin, ns)) as m:
            return float(m.info().id)
    except (OSError, bpffs.BpffsError):
        return -math.inf


def created(table: str, family: int, ns: str | None) -> float:
    """When, as a creation(), bpfilter created the delegated ``table`` (-inf: it did not)."""
    return creation(_marker(table, family), ns)


def save_tables(config: Config, family: int, ns: str | None, *, counters: bool = False,
                table: str | None = None) -> list[tuple[str, str]]:
    """(table, its text as the backend's save prints it) of every delegated table that
    exists in ``ns``, in the backend's order. The backend's save without ``-t`` lists only the
    tables that exist (with ``-t`` it would create the table). SaveError when it fails."""
    ran = run([config.save_cmd(family), *(["-c"] if counters else [])], ns)
    if ran.code != 0:
        raise SaveError(ran.code, ran.err)
    return [(name, text) for name, text in split_saved(ran.out)
            if name in config.tables and table in (None, name)]


def split_saved(text: str) -> list[tuple[str, str]]:
    """iptables-save output cut into its tables, each with its comment lines."""
    out: list[tuple[str, str]] = []
    lines: list[str] = []
    name: str | None = None
    done = False
    for line in text.splitlines(keepends=True):
        if name is not None and done and line.startswith(("# Generated by", "*")):
            out.append((name, "".join(lines)))
            lines, name, done = [], None, False
        if name is None and line.startswith("*"):
            name = line[1:].split()[0] if line[1:].split() else ""
        done = done or line.rstrip("\n") == "COMMIT"
        lines.append(line)
    if name is not None:
        out.append((name, "".join(lines)))
    return out


# --- single commands --------------------------------------------------------------------------

def strip_own_options(argv: Sequence[str]) -> list[str]:
    """``argv`` without bpfilter's own ``--netns NAME`` / ``--netns=NAME``."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--netns":
            skip = True
        elif not a.startswith("--netns="):
            out.append(a)
    return out


def _option(argv: Sequence[str], short: str | None, long: str) -> str | None:
    """The last value of an option given as ``-tX``/``-t X``/``--long X``/``--long=X``."""
    value = None
    for i, a in enumerate(argv):
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if a == long or (short is not None and a == short):
            value = nxt
        elif a.startswith(long + "="):
            value = a[len(long) + 1:]
        elif short is not None and a.startswith(short) and not a.startswith("--"):
            value = a[len(short):]
    return value


def single(argv: Sequence[str], family: int, tool: str) -> Ran | None:
    """Run one iptables command with the backend when its ``-t`` table is delegated (None:
    it is not, bpfilter handles it). The backend's output and exit code are the command's."""
    table = _option(argv, "-t", "--table")
    if table not in DELEGABLE:
        return None
    try:
        config = load()
    except ConfigError as e:
        return Ran(1, "", f"{tool}: {e}\n")
    if table not in config.tables:
        return None
    try:
        state.require_root(tool)
        ns = _option(argv, None, "--netns")
        if ns is not None:
            netns.path(ns)
    except (state.StateError, netns.NetnsError) as e:
        return Ran(4, "", f"{e}\n" if str(e).startswith(tool) else f"{tool}: {e}\n")
    if "--json" in argv:
        return Ran(2, "", f"{tool}: --json is not available for table '{table}': it is "
                   f"delegated to {config.single_cmd(family)}\n")
    return run([config.single_cmd(family), *strip_own_options(argv)], ns)


# --- flushing ---------------------------------------------------------------------------------

def flush_tables(ns: str | None) -> list[str]:
    """Empty every delegated table bpfilter created in ``ns`` (rules and user chains go,
    built-in chains get policy ACCEPT and zero counters: a legacy table cannot be removed)
    and forget it. Returns their names (``ip-nat``, ``ip6-mangle``...); SaveError when the
    backend refuses (the table's marker then stays, so a later flush tries again)."""
    try:
        config = load(None)
    except ConfigError:
        config = Config()  # the default backend: a broken config file must not block a flush
    done = []
    for family in (4, 6):
        existing = kernel_tables(family, ns)
        for table in DELEGABLE:
            marker = _marker(table, family)
            if created(table, family, ns) == -math.inf:
                continue
            if table in existing:
                chains = "".join(f":{c} ACCEPT [0:0]\n" for c in BUILTIN_CHAINS[table])
                ran = run([config.restore_cmd(family)], ns, f"*{table}\n{chains}COMMIT\n")
                if ran.code != 0:
                    raise SaveError(ran.code, ran.err)
            bpffs.unpin(bpffs.pin_path(marker, ns))
            done.append(marker.removesuffix("-delegated"))
    return done
