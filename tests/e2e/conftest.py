"""Fixtures for traffic tests: a throwaway namespace pair and hand-assembled test programs."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterator

import pytest

from bpfilter import bpf, testbed
from bpfilter.btf import Btf
from bpfilter.codegen import asm
from bpfilter.codegen.asm import Label
from bpfilter.codegen.insn import FP, R0, R1, R2, R3, R4, R5, R6, Insn, Reg
from bpfilter.codegen.link import link
from bpfilter.codegen.opcodes import Size
from bpfilter.codegen.spec import ProgramSpec
from bpfilter.codegen.uapi import AttachType, NfVerdict, ProgType, TcAction, XdpAction

ETH_HLEN = 14
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
XDP_MD_DATA, XDP_MD_DATA_END = 0, 4  # struct xdp_md
SKB_DATA, SKB_DATA_END = 76, 80  # struct __sk_buff


@pytest.fixture
def netns_pair() -> Iterator[testbed.NetnsPair]:
    """Two fresh namespaces joined by veth; deleted (pins included) after the test."""
    with testbed.netns_pair(prefix="bpft") as pair:
        yield pair


@pytest.fixture(scope="session")
def btf() -> Btf:
    return Btf.load()


Loader = Callable[[ProgramSpec], bpf.Prog]


@pytest.fixture
def load() -> Iterator[Loader]:
    """Load programs; every one is closed after the test."""
    progs: list[bpf.Prog] = []

    def _load(spec: ProgramSpec) -> bpf.Prog:
        progs.append(bpf.prog_load(spec))
        return progs[-1]

    yield _load
    for p in progs:
        p.close()


def _words(addr: str) -> list[int]:
    """The address as native-endian u32 words, as a 4-byte load from the packet sees them."""
    raw = ipaddress.ip_address(addr).packed
    return [int.from_bytes(raw[i : i + 4], "little") for i in range(0, len(raw), 4)]


Program = list[Insn | Label]


def _match_source(base: Reg, src_off: int, addr: str, on_match: int, other: int) -> Program:
    """r0 = on_match if the address at [base + src_off] equals ``addr``, else other; exit."""
    code: Program = []
    for i, word in enumerate(_words(addr)):
        code += [
            asm.ldx(Size.W, R1, base, src_off + 4 * i),
            asm.jmp32("jne", R1, word, "other"),
        ]
    return [
        *code,
        asm.mov64(R0, on_match),
        asm.exit_(),
        Label("other"),
        asm.mov64(R0, other),
        asm.exit_(),
    ]


def const_prog(prog_type: ProgType, verdict: int, name: str = "const") -> ProgramSpec:
    """A two-instruction program returning ``verdict``."""
    attach = {
        ProgType.NETFILTER: AttachType.NETFILTER,
        ProgType.XDP: AttachType.XDP,
    }.get(prog_type)
    code = link([asm.mov64(R0, verdict), asm.exit_()]).code
    return ProgramSpec(name, prog_type, code, expected_attach_type=attach)


def nf_drop_source(btf: Btf, addr: str) -> ProgramSpec:
    """Netfilter program: NF_DROP for packets whose source is ``addr`` (IPv4 or IPv6), read
    through bpf_dynptr_from_skb + bpf_dynptr_slice; NF_ACCEPT for everything else."""
    v6 = ipaddress.ip_address(addr).version == 6
    hdr_len, src_off = (40, 8) if v6 else (20, 12)
    # The 16-byte dynptr, then the slice buffer, on the stack; 8-byte stores need alignment.
    dynptr, buf = -16, -16 - (hdr_len + 7) // 8 * 8
    skb_off = btf.member_offset("bpf_nf_ctx", "skb")
    program: Program = [
        asm.ldx(Size.DW, R6, R1, skb_off),
        *[asm.st(Size.DW, FP, buf + i, 0) for i in range(0, hdr_len, 8)],
        asm.mov64(R1, R6),
        asm.mov64(R2, 0),
        asm.mov64(R3, FP),
        asm.add64(R3, dynptr),
        asm.call_kfunc("bpf_dynptr_from_skb"),
        asm.jne(R0, 0, "accept"),
        asm.mov64(R1, FP),
        asm.add64(R1, dynptr),
        asm.mov64(R2, 0),  # offset 0 is the network header at netfilter hooks
        asm.mov64(R3, FP),
        asm.add64(R3, buf),
        asm.mov64(R4, hdr_len),
        asm.call_kfunc("bpf_dynptr_slice"),
        asm.jeq(R0, 0, "accept"),
        asm.mov64(R5, R0),
        *_match_source(R5, src_off, addr, NfVerdict.DROP, NfVerdict.ACCEPT),
        Label("accept"),
        asm.mov64(R0, NfVerdict.ACCEPT),
        asm.exit_(),
    ]
    kfuncs = {n: btf.kfunc_id(n) for n in ("bpf_dynptr_from_skb", "bpf_dynptr_slice")}
    code = link(program, kfuncs=kfuncs).code
    return ProgramSpec(
        "nf_src", ProgType.NETFILTER, code, expected_attach_type=AttachType.NETFILTER
    )


def _direct_drop_source(
    addr: str, data: int, data_end: int, drop: int, passed: int
) -> Program:
    v6 = ipaddress.ip_address(addr).version == 6
    proto = ETH_P_IPV6 if v6 else ETH_P_IP
    hdr_len, src_off = (40, 8) if v6 else (20, 12)
    return [
        asm.ldx(Size.W, R2, R1, data),
        asm.ldx(Size.W, R3, R1, data_end),
        asm.mov64(R4, R2),
        asm.add64(R4, ETH_HLEN + hdr_len),
        asm.jgt(R4, R3, "pass"),  # bounds check the verifier insists on
        asm.ldx(Size.H, R4, R2, 12),
        asm.jne(R4, socket.htons(proto), "pass"),
        *_match_source(R2, ETH_HLEN + src_off, addr, drop, passed),
        Label("pass"),
        asm.mov64(R0, passed),
        asm.exit_(),
    ]


def xdp_drop_source(addr: str) -> ProgramSpec:
    """XDP program: XDP_DROP for frames whose IP source is ``addr``, XDP_PASS otherwise."""
    program = _direct_drop_source(
        addr, XDP_MD_DATA, XDP_MD_DATA_END, XdpAction.DROP, XdpAction.PASS
    )
    return ProgramSpec(
        "xdp_src", ProgType.XDP, link(program).code, expected_attach_type=AttachType.XDP
    )


def tc_drop_source(addr: str) -> ProgramSpec:
    """TC program: TC_ACT_SHOT for packets whose IP source is ``addr``, TC_ACT_OK otherwise."""
    program = _direct_drop_source(addr, SKB_DATA, SKB_DATA_END, TcAction.SHOT, TcAction.OK)
    return ProgramSpec("tc_src", ProgType.SCHED_CLS, link(program).code)


class Programs:
    """The test programs, as a fixture (test modules cannot import conftest helpers)."""

    def __init__(self, btf: Btf) -> None:
        self.btf = btf

    const = staticmethod(const_prog)
    xdp_drop_source = staticmethod(xdp_drop_source)
    tc_drop_source = staticmethod(tc_drop_source)

    def nf_drop_source(self, addr: str) -> ProgramSpec:
        return nf_drop_source(self.btf, addr)


@pytest.fixture(scope="session")
def programs(btf: Btf) -> Programs:
    return Programs(btf)
