"""bpfilter's own sets, pinned per network namespace (what ipset is to iptables).

Each set is one map (layout: bpfilter.codegen.sets) pinned as
``<bpffs>/bpfilter/<netns or "host">/sets/NAME``, apart from the ruleset generations
(bpfilter.state): replacing the ruleset leaves sets alone, and adding or deleting an element
is one map update that every program using the set sees at once, no reload. The map's kernel
name records the set's type and its key size the family, so a set describes itself.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bpfilter import bpf, bpffs
from bpfilter.codegen.compiler import CompileError
from bpfilter.codegen.sets import SetError, SetType, check_name, key_size
from bpfilter.codegen.spec import MapSpec
from bpfilter.codegen.uapi import UpdateFlag

SETS_DIR = "sets"


class SetRefused(CompileError):
    """A rule names a set that is missing or of the other family: iptables refuses it as a
    parameter problem (libxt_set's messages end in a newline of their own)."""
_PRESENT = b"\x01\0\0\0"


def set_dir(netns: str | None, *, create: bool = False) -> Path:
    d = bpffs.pin_dir(netns, create=create) / SETS_DIR
    if create:
        d.mkdir(mode=bpffs.DIR_MODE, exist_ok=True)
    return d


def _path(name: str, netns: str | None) -> Path:
    return set_dir(netns) / check_name(name)


@dataclass(slots=True)
class OpenSet:
    """A set's map (owned: close it) and its type."""

    name: str
    map: bpf.Map
    type: SetType

    def close(self) -> None:
        self.map.close()

    def __enter__(self) -> OpenSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def all_keys(self) -> list[bytes]:
        return sorted(self.map.keys())


def exists(name: str, netns: str | None) -> bool:
    return _path(name, netns).exists()


def open_set(name: str, netns: str | None) -> OpenSet:
    """The set ``name`` of ``netns``; SetError (ipset's wording) when there is none."""
    p = _path(name, netns)
    if not p.exists():
        raise SetError(f"The set with the given name does not exist: {name}")
    m = bpf.map_from_fd(bpf.obj_get(str(p)))
    info = m.info()
    t = SetType.of_map(info.name, info.key_size, info.max_entries)
    if t is None:
        m.close()
        raise SetError(f"{p} is not a bpfilter set")
    return OpenSet(name, m, t)


def names(netns: str | None) -> list[str]:
    d = set_dir(netns)
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def create(name: str, t: SetType, netns: str | None, *, exist_ok: bool = False) -> None:
    """`ipset create NAME TYPE family F maxelem N` (``exist_ok``: `-exist`, same type only)."""
    from bpfilter import state  # state imports the loader, which imports this module

    check_name(name)
    state.drop_stale(netns)
    state.claim(netns)
    if exists(name, netns):
        with open_set(name, netns) as s:
            if exist_ok and s.type == t:
                return
        raise SetError(f"Set cannot be created: set with the same name already exists: {name}")
    with bpf.map_create(t.spec()) as m:
        bpf.obj_pin(m, str(set_dir(netns, create=True) / name))


def add(name: str, elements: Sequence[str], netns: str | None, *,
        exist_ok: bool = False) -> int:
    """Add elements; returns how many keys were new. An element already there is an error
    unless ``exist_ok`` (ipset's -exist); a full set is an error."""
    added = 0
    with open_set(name, netns) as s:
        for element in elements:
            for key in s.type.keys(element):
                try:
                    s.map.update(key, _PRESENT, flags=UpdateFlag.NOEXIST)
                    added += 1
                except bpf.BpfError as e:
                    if e.errno == errno.EEXIST:
                        if exist_ok:
                            continue
                        raise SetError("Element cannot be added to the set: it's already "
                                       f"added: {element}") from None
                    if e.errno in (errno.E2BIG, errno.ENOSPC):
                        raise SetError("Hash is full, cannot add more elements: "
                                       f"{name} (maxelem {s.type.maxelem})") from None
                    raise
    return added


def delete(name: str, elements: Sequence[str], netns: str | None, *,
           exist_ok: bool = False) -> int:
    """Delete elements; one that is not there is an error unless ``exist_ok``."""
    removed = 0
    with open_set(name, netns) as s:
        for element in elements:
            for key in s.type.keys(element):
                if s.map.delete(key):
                    removed += 1
                elif not exist_ok:
                    raise SetError("Element cannot be deleted from the set: it's not added: "
                                   f"{element}")
    return removed


def test(name: str, element: str, netns: str | None) -> bool:
    """`ipset test`: is every key of ``element`` in the set?"""
    with open_set(name, netns) as s:
        return all(s.map.lookup(k) is not None for k in s.type.keys(element))


def flush(name: str, netns: str | None) -> None:
    with open_set(name, netns) as s:
        for key in s.all_keys():
            s.map.delete(key)


def users(name: str, netns: str | None) -> list[int]:
    """Ids of the loaded programs that use the set's map."""
    with open_set(name, netns) as s:
        map_id = s.map.info().id
    out = []
    for prog_id in bpf.prog_ids():
        try:
            with bpf.prog_get_fd_by_id(prog_id) as prog:
                if map_id in prog.info().map_ids:
                    out.append(prog_id)
        except bpf.BpfError:
            continue  # unloaded meanwhile
    return out


def destroy(name: str, netns: str | None) -> None:
    """Remove the set; refused while a loaded program uses it (as ipset does)."""
    if users(name, netns):
        raise SetError(f"Set cannot be destroyed: it is in use by a kernel component: {name}")
    bpffs.unpin(_path(name, netns))


@dataclass(frozen=True, slots=True)
class SetListing:
    name: str
    type: SetType
    elements: tuple[str, ...]
    references: int

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "type": self.type.kind, "family": self.type.family_name,
                "maxelem": self.type.maxelem, "references": self.references,
                "elements": list(self.elements)}

    def text(self) -> str:
        """As `ipset list` prints a set (without its memory figures)."""
        return "".join([
            f"Name: {self.name}\n", f"Type: {self.type.kind}\n",
            f"Header: family {self.type.family_name} maxelem {self.type.maxelem}\n",
            f"References: {self.references}\n",
            f"Number of entries: {len(self.elements)}\n", "Members:\n",
            *[e + "\n" for e in self.elements]])


def listing(netns: str | None, only: str | None = None) -> Iterator[SetListing]:
    for name in [only] if only is not None else names(netns):
        with open_set(name, netns) as s:
            elements = tuple(s.type.format_key(k) for k in s.all_keys())
            t = s.type
        yield SetListing(name, t, elements, len(users(name, netns)))


# --- for the loader ---------------------------------------------------------------------------

def open_for_rule(spec: MapSpec, netns: str | None) -> bpf.Map:
    """The map a compiled rule names (``spec.pin``), checked like iptables' libxt_set does:
    a missing set or one of the other family is refused with the rule's line."""
    assert spec.pin is not None
    try:
        s = open_set(spec.pin, netns)
    except SetError:
        raise SetRefused(spec.line, f"Set {spec.pin} doesn't exist.") from None
    family = {key_size(4): 4, key_size(6): 6}[spec.key_size]
    if s.type.family != family:
        s.close()
        raise SetRefused(spec.line, f"The protocol family of set {spec.pin} is "
                         f"IPv{s.type.family}, which is not applicable.")
    return s.map
