"""Inert descriptions of maps and programs: what to create, never a live kernel object.

The system layer turns a MapSpec into a map file descriptor and checks a pinned map against
its spec before reusing it; the ELF writer turns specs into map definitions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bpfilter.codegen.uapi import AttachType, MapType, ProgType


@dataclass(frozen=True, slots=True)
class MapSpec:
    """Parameters of BPF_MAP_CREATE. ``name`` is also the symbol code uses to refer to the map."""

    name: str
    type: MapType
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0
    inner: MapSpec | None = None  # template map for ARRAY_OF_MAPS / HASH_OF_MAPS
    # A map that outlives the ruleset (a bpfilter set): the loader opens the pin of this name
    # in the namespace's sets directory instead of creating a map (max_entries is the set's).
    pin: str | None = None
    line: int = field(default=0, compare=False)  # the first rule naming it, for errors

    def __post_init__(self) -> None:
        if not self.name or len(self.name.encode()) > 15:
            raise ValueError(f"map name {self.name!r} must be 1-15 bytes")
        if self.max_entries <= 0:
            raise ValueError(f"map {self.name}: max_entries must be positive")

    def compatible(self, other: MapSpec) -> bool:
        """True when a map created from ``other`` can serve where this spec is expected."""
        return (self.type, self.key_size, self.value_size, self.max_entries, self.flags) == (
            other.type,
            other.key_size,
            other.value_size,
            other.max_entries,
            other.flags,
        )


@dataclass(frozen=True, slots=True)
class ProgramSpec:
    """A program ready to load: encoded instructions plus what the loader needs to know."""

    name: str
    prog_type: ProgType
    code: bytes  # linked instructions, 8 bytes each (16 for 64-bit immediates)
    license: str = "GPL"
    expected_attach_type: AttachType | None = None

    def __post_init__(self) -> None:
        if len(self.code) % 8:
            raise ValueError(f"program {self.name}: code is not a whole number of instructions")
        if len(self.name.encode()) > 15:
            raise ValueError(f"program name {self.name!r} must be at most 15 bytes")

    @property
    def insn_count(self) -> int:
        return len(self.code) // 8
