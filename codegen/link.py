"""The link pass: turn labels, map names and kfunc names into offsets, fds and BTF ids."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from bpfilter.codegen.asm import Label
from bpfilter.codegen.disasm import format_lines
from bpfilter.codegen.insn import LD_IMM64, Insn, encode
from bpfilter.codegen.opcodes import Class, JmpOp, PseudoCall, PseudoSrc

_JA32 = Class.JMP32 | JmpOp.JA
_CALL = Class.JMP | JmpOp.CALL
_S16 = (-(1 << 15), (1 << 15) - 1)
_S32 = (-(1 << 31), (1 << 31) - 1)
_LOW32 = 0xFFFFFFFF


class LinkError(ValueError):
    """A reference the link pass cannot resolve; the message names the instruction and label."""

    def __init__(self, index: int, insn: Insn | None, message: str) -> None:
        self.index = index
        self.insn = insn
        where = f"insn {index}" + (f" ({_describe(insn)})" if insn is not None else "")
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True, slots=True)
class Linked:
    """A linked program. Indexes (relocations, annotations, labels) count 8-byte slots."""

    insns: list[Insn]
    code: bytes
    relocations: list[tuple[int, str]] = field(default_factory=list)  # (slot, map name)
    annotations: dict[int, str] = field(default_factory=dict)  # slot -> Insn.comment
    labels: dict[str, int] = field(default_factory=dict)  # label -> slot

    def __len__(self) -> int:
        return len(self.code) // 8

    def dump(self, *, kfunc_names: Mapping[int, str] | None = None) -> list[str]:
        """bpftool-style listing with the instructions' comments as ``; text`` lines."""
        return format_lines(self.insns, kfunc_names=kfunc_names, annotations=self.annotations)


def link(
    program: Iterable[Insn | Label],
    *,
    maps: Mapping[str, int] | None = None,
    kfuncs: Mapping[str, int] | None = None,
) -> Linked:
    """Resolve every reference in ``program`` in one linear pass and encode the result.

    ``maps`` maps map names to fds; with ``maps=None`` map loads stay unresolved and are listed
    in ``Linked.relocations`` (for the ELF writer). ``kfuncs`` maps kfunc names to BTF ids.
    """
    labels: dict[str, int] = {}
    placed: list[tuple[int, Insn]] = []
    slot = 0
    for item in program:
        if isinstance(item, Insn):
            placed.append((slot, item))
            slot += 2 if item.opcode == LD_IMM64 else 1
        elif isinstance(item, Label):
            if item.name in labels:
                raise LinkError(slot, None, f"label {item.name!r} defined twice "
                                f"(first at insn {labels[item.name]})")
            labels[item.name] = slot
        else:
            raise LinkError(slot, None, f"not an instruction or label: {item!r}")

    out: list[Insn] = []
    relocations: list[tuple[int, str]] = []
    annotations: dict[int, str] = {}
    for at, insn in placed:
        if insn.comment is not None:
            annotations[at] = insn.comment
        ref = insn.ref
        if ref is None:
            out.append(insn)
            continue
        op = insn.opcode
        if op == LD_IMM64:
            if insn.src in (PseudoSrc.MAP_FD, PseudoSrc.MAP_VALUE):
                if maps is None:
                    relocations.append((at, ref))
                    out.append(insn)
                    continue
                fd = maps.get(ref)
                if fd is None:
                    raise LinkError(at, insn, f"map {ref!r} is not defined")
                imm = (insn.imm & ~_LOW32) | (fd & _LOW32)
            elif insn.src == PseudoSrc.FUNC:
                imm = _offset(at, insn, labels, _S32) & _LOW32
            else:
                raise LinkError(at, insn, f"reference {ref!r} on a load that takes none")
            out.append(Insn(op, insn.dst, insn.src, insn.off, imm, None, insn.comment))
        elif op == _CALL:
            if insn.src == PseudoCall.KFUNC_CALL:
                btf_id = None if kfuncs is None else kfuncs.get(ref)
                if btf_id is None:
                    raise LinkError(at, insn, f"kfunc {ref!r} is not known (no BTF id)")
                out.append(Insn(op, insn.dst, insn.src, insn.off, btf_id, None, insn.comment))
            elif insn.src == PseudoCall.CALL:
                rel = _offset(at, insn, labels, _S32)
                out.append(Insn(op, insn.dst, insn.src, insn.off, rel, None, insn.comment))
            else:
                raise LinkError(at, insn, f"reference {ref!r} on a helper call")
        elif op == _JA32:
            rel = _offset(at, insn, labels, _S32)
            out.append(Insn(op, insn.dst, insn.src, insn.off, rel, None, insn.comment))
        elif insn.is_jump:
            rel = _offset(at, insn, labels, _S16)
            out.append(Insn(op, insn.dst, insn.src, rel, insn.imm, None, insn.comment))
        else:
            raise LinkError(at, insn, f"reference {ref!r} on an instruction that takes none")
    return Linked(out, encode(out), relocations, annotations, labels)


def _offset(at: int, insn: Insn, labels: Mapping[str, int], bounds: tuple[int, int]) -> int:
    label = insn.ref
    assert label is not None
    target = labels.get(label)
    if target is None:
        raise LinkError(at, insn, f"label {label!r} is not defined")
    rel = target - at - 1
    lo, hi = bounds
    if not lo <= rel <= hi:
        if bounds == _S16:
            raise LinkError(at, insn, f"jump to label {label!r} needs offset {rel}, which does "
                            f"not fit in 16 bits ({lo}..{hi}); use asm.gotol (32-bit offset) "
                            "for far jumps, e.g. an inverted condition over a gotol")
        raise LinkError(at, insn, f"target {label!r} at offset {rel} does not fit in 32 bits")
    return rel


def _describe(insn: Insn) -> str:
    try:
        return str(insn)
    except Exception:  # a broken instruction must not hide the link error itself
        return repr(insn)
