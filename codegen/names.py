"""Names the generated programs and the kernel layer agree on: each table's hooks and
priority, the counter map, and the two copies of every run map with their value layout.

Kept apart from the compiler and the lookup code (which re-export them) so that a single
command that only writes map entries (bpfilter.fastcmd) need not import the code generator.
"""

from __future__ import annotations

import struct

from bpfilter.codegen.uapi import NfHook, NfPriority

# Built-in chain -> netfilter hook, per table bpfilter compiles.
HOOKS: dict[str, dict[str, NfHook]] = {
    "filter": {"INPUT": NfHook.LOCAL_IN, "FORWARD": NfHook.FORWARD, "OUTPUT": NfHook.LOCAL_OUT},
    "raw": {"PREROUTING": NfHook.PRE_ROUTING, "OUTPUT": NfHook.LOCAL_OUT},
}
PRIORITY = {"filter": int(NfPriority.FILTER), "raw": int(NfPriority.RAW)}

COUNTERS = "counters"  # the counter map's name (and the symbol code refers to it by)

VALUE = struct.Struct("<II")  # a run map's value: counter index, action

# Every run's map exists twice, ``NAME`` (copy 0) and ``NAME_b`` (copy 1), and the table's
# switch (``CTL_MAP``, bpfilter.dispatch) says in bit ``BUFFER_BIT`` which copy packets use.
# A change that only edits entries is written into the copy no packet uses, then one write
# of the switch flips every run at once (atomic, and a killed writer leaves the copy in use
# untouched). The program reads the bit once per packet (prologue, into the meta area), so
# all the lookups of one packet use the same copy.
CTL_MAP = "ctl"
BUFFER_BIT = 2
BUFFER_SUFFIX = "_b"


def buffer_names(name: str) -> tuple[str, str]:
    """The two copies of run map ``name``: (copy 0, copy 1)."""
    return name, name + BUFFER_SUFFIX


__all__ = ["BUFFER_BIT", "BUFFER_SUFFIX", "COUNTERS", "CTL_MAP", "HOOKS", "PRIORITY", "VALUE",
           "buffer_names"]
