"""`bpfilter log`: the events of LOG and NFLOG rules, as the kernel's LOG lines or JSON.

Every loaded generation of a ruleset has its own ``log_events`` ring (pinned with its other
maps, ``ip-filter-gN-map-log_events``); this command reads all the rings pinned in the
namespace. With ``--follow`` it opens the rings of new generations as they appear and keeps
a replaced generation's ring open until it has drained it, so a replacement loses nothing;
without it, events left unread in a generation that gets replaced are gone with its ring.
Reading consumes the events (a ring has one reader position): two readers at once each see
part of them.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from bpfilter import bpf, bpffs, logfmt, netns, state
from bpfilter.codegen import log as rec

RESCAN_SECONDS = 1.0
POLL_MS = 250


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "log",
        help="print the packets LOG and NFLOG rules logged (kernel LOG line format)",
        description="Print the events of LOG and NFLOG rules loaded by bpfilter in a network "
                    "namespace, formatted as the kernel's LOG target writes them to the kernel "
                    "log. Reading consumes the events.",
    )
    p.add_argument("--netns", metavar="NAME", default=None,
                   help="network namespace from `ip netns list` (default: this one)")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep waiting for new events (stop with Ctrl-C)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per event and line (JSON Lines)")
    return p


@dataclass
class _Pinned:
    path: str
    map: bpf.Map
    ring: bpf.RingBuffer | None  # None: a drop counter
    seen: int = 0  # drops already reported


@dataclass
class Reader:
    """The rings and drop counters pinned in one namespace, each opened once (by map id).
    A ring whose pin is gone (its generation was replaced) is drained and closed."""

    netns: str | None
    maps: dict[int, _Pinned] = field(default_factory=dict)
    pending: list[logfmt.LogEvent] = field(default_factory=list)
    retired_drops: int = 0

    @property
    def rings(self) -> list[_Pinned]:
        return [p for p in self.maps.values() if p.ring is not None]

    def scan(self) -> None:
        """Open rings and drop counters pinned since the last scan; retire those unpinned."""
        # Pinned by state.commit as ``ip-filter-gN-map-NAME``, by loader.load as
        # ``map_NAME4`` / ``map_NAME6``.
        for p in bpffs.pins(self.netns):
            base = p.name.rstrip("46")
            if base.endswith(("-" + rec.RING, "_" + rec.RING)):
                self._open(p.as_posix(), ring=True)
            elif base.endswith(("-" + rec.DROPS, "_" + rec.DROPS)):
                self._open(p.as_posix(), ring=False)
        for mid, pinned in list(self.maps.items()):
            if os.path.exists(pinned.path):
                continue
            if pinned.ring is not None:
                self.pending += [logfmt.LogEvent.parse(raw) for raw in pinned.ring.read()]
                pinned.ring.close()
            else:
                self.retired_drops += self._count(pinned) - pinned.seen
            pinned.map.close()
            del self.maps[mid]

    def _open(self, path: str, *, ring: bool) -> None:
        try:
            m = bpf.map_from_fd(bpf.obj_get(path))
        except (bpf.BpfError, FileNotFoundError):
            return  # removed by a commit between listing and opening
        mid = m.info().id
        if mid in self.maps:  # a map a later generation took over keeps being read
            self.maps[mid].path = path
            m.close()
            return
        self.maps[mid] = _Pinned(path, m, bpf.RingBuffer(m) if ring else None)

    def read(self) -> list[logfmt.LogEvent]:
        """Every event waiting in any ring, oldest first."""
        events, self.pending = self.pending, []
        events += [logfmt.LogEvent.parse(raw) for p in self.rings
                   for raw in (p.ring.read() if p.ring is not None else ())]
        events.sort(key=lambda e: e.ts_ns)
        return events

    @staticmethod
    def _count(pinned: _Pinned) -> int:
        values = pinned.map.lookup_percpu(struct.pack("<I", 0)) or []
        return sum(struct.unpack_from("<Q", v)[0] for v in values)

    def new_drops(self) -> int:
        """Events lost to a full ring since the last call (the first call: since loading)."""
        total, self.retired_drops = self.retired_drops, 0
        for p in self.maps.values():
            if p.ring is None:
                n = self._count(p)
                total += n - p.seen
                p.seen = n
        return total

    def wait(self, timeout_ms: int) -> None:
        poller = select.poll()
        for p in self.rings:
            poller.register(p.map.fd, select.POLLIN)
        if self.rings:
            poller.poll(timeout_ms)
        else:
            time.sleep(timeout_ms / 1000)

    def close(self) -> None:
        for p in self.maps.values():
            if p.ring is not None:
                p.ring.close()
            p.map.close()
        self.maps.clear()


def _print(events: list[logfmt.LogEvent], as_json: bool, out: TextIO) -> None:
    for ev in events:
        if as_json:
            out.write(json.dumps(logfmt.to_json(ev), sort_keys=True) + "\n")
        else:
            secs, ns = divmod(ev.ts_ns, 1_000_000_000)
            tag = f"NFLOG group {ev.group}: " if ev.kind == rec.KIND_NFLOG else ""
            out.write(f"[{secs:5d}.{ns // 1000:06d}] {tag}{logfmt.format_line(ev)}\n")
    out.flush()


def _report_drops(n: int, as_json: bool, out: TextIO) -> None:
    if as_json:
        out.write(json.dumps({"dropped": n}) + "\n")
        out.flush()
    else:
        print(f"bpfilter log: {n} events lost because the ring buffer was full",
              file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    try:
        state.require_root("bpfilter log")
        if args.netns is not None:
            netns.path(args.netns)
        if state.stale(args.netns):
            print(f"bpfilter log: nothing loaded by bpfilter in {args.netns}", file=sys.stderr)
            return 1
        reader = Reader(args.netns)
        reader.scan()
        last_scan = time.monotonic()
        if not reader.rings and not args.follow:
            where = f"network namespace {args.netns}" if args.netns else "this network namespace"
            print(f"bpfilter log: no LOG or NFLOG rule is loaded in {where}", file=sys.stderr)
            return 0
    except (state.StateError, netns.NetnsError, bpffs.BpffsError, bpf.BpfError) as e:
        print(f"bpfilter log: {e}", file=sys.stderr)
        return 4
    try:
        while True:
            _print(reader.read(), args.json, sys.stdout)
            n = reader.new_drops()
            if n:
                _report_drops(n, args.json, sys.stdout)
            if not args.follow:
                return 0
            if time.monotonic() - last_scan >= RESCAN_SECONDS:
                reader.scan()
                last_scan = time.monotonic()
            reader.wait(POLL_MS)
    except (KeyboardInterrupt, BrokenPipeError):
        return 0
    finally:
        reader.close()
