"""`bpfilter demo`: load a small hand-assembled netfilter filter in a throwaway namespace pair
and show it dropping and passing real packets."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

from bpfilter import bpf, testbed
from bpfilter.attach_netfilter import NetfilterOptions, attach_netfilter
from bpfilter.btf import Btf
from bpfilter.codegen import asm
from bpfilter.codegen.asm import Label
from bpfilter.codegen.disasm import disassemble
from bpfilter.codegen.insn import FP, R0, R1, R2, R3, R4, R6
from bpfilter.codegen.link import link
from bpfilter.codegen.opcodes import Size
from bpfilter.codegen.spec import ProgramSpec
from bpfilter.codegen.uapi import AttachType, NfHook, NfPriority, NfProto, NfVerdict, ProgType

IPPROTO_ICMP = 1
IPV4_HEADER = 20
IPV4_PROTOCOL_OFFSET = 9
DYNPTR = -16  # struct bpf_dynptr (16 bytes) on the stack
SLICE_BUF = DYNPTR - 24  # scratch buffer for bpf_dynptr_slice, below the dynptr


def drop_icmp_program(btf: Btf) -> tuple[list[asm.Insn | Label], dict[str, int]]:
    """`-A INPUT -p icmp -j DROP` written by hand: DROP IPv4 ICMP, ACCEPT everything else."""
    skb = btf.member_offset("bpf_nf_ctx", "skb")
    program: list[asm.Insn | Label] = [
        asm.ldx(Size.DW, R6, R1, skb, comment="r6 = ctx->skb"),
        asm.mov64(R1, R6),
        asm.mov64(R2, 0),
        asm.mov64(R3, FP),
        asm.add64(R3, DYNPTR),
        asm.call_kfunc("bpf_dynptr_from_skb"),
        asm.jmp("jne", R0, 0, "accept"),
        asm.mov64(R1, FP),
        asm.add64(R1, DYNPTR),
        asm.mov64(R2, 0),  # offset 0 is the network header at netfilter hooks
        asm.mov64(R3, FP),
        asm.add64(R3, SLICE_BUF),
        asm.mov64(R4, IPV4_HEADER),
        asm.call_kfunc("bpf_dynptr_slice"),
        asm.jmp("jeq", R0, 0, "accept"),
        asm.ldx(Size.B, R1, R0, IPV4_PROTOCOL_OFFSET, comment="ip->protocol"),
        asm.jmp("jeq", R1, IPPROTO_ICMP, "drop"),
        Label("accept"),
        asm.mov64(R0, NfVerdict.ACCEPT),
        asm.exit_(),
        Label("drop"),
        asm.mov64(R0, NfVerdict.DROP),
        asm.exit_(),
    ]
    kfuncs = {n: btf.kfunc_id(n) for n in ("bpf_dynptr_from_skb", "bpf_dynptr_slice")}
    return program, kfuncs


@dataclass(frozen=True, slots=True)
class Step:
    what: str
    expected: bool
    observed: bool

    @property
    def ok(self) -> bool:
        return self.expected == self.observed


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo",
        help="show a hand-assembled filter dropping and passing packets in a throwaway netns",
        description=(
            "Create two network namespaces joined by veth (198.18.0.0/15), attach a small "
            "netfilter program at LOCAL_IN of one of them that drops ICMP and accepts the rest, "
            "and check with real packets; everything is deleted afterwards."
        ),
    )
    p.add_argument("--json", action="store_true", help="print the steps as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    say: Callable[[str], None] = (lambda s: None) if args.json else print
    steps: list[Step] = []

    def check(what: str, expected: bool, observed: bool) -> None:
        steps.append(Step(what, expected, observed))
        mark = "ok  " if expected == observed else "FAIL"
        say(f"  [{mark}] {what}: {'delivered' if observed else 'dropped'}")

    btf = Btf.load()
    program, kfuncs = drop_icmp_program(btf)
    linked = link(program, kfuncs=kfuncs)
    spec = ProgramSpec("bpfilter_demo", ProgType.NETFILTER, linked.code,
                       expected_attach_type=AttachType.NETFILTER)
    names = {v: k for k, v in kfuncs.items()}
    with testbed.netns_pair("bpfdemo") as pair:
        src, dst = pair.a, pair.b
        addr = pair.ipv4_b
        say(f"namespaces {src} ({pair.ipv4_a}) <-> {dst} ({addr}) over veth")
        say("without a filter:")
        check("ping", True, testbed.ping(src, addr, count=2))
        check("udp", True, testbed.udp_reaches(src, dst, addr))
        say(f"program ({len(linked)} instructions), as bpftool would print it:")
        for line in disassemble(linked.code, kfunc_names=names):
            say("    " + line)
        with bpf.prog_load(spec) as prog:
            options = NetfilterOptions(NfProto.IPV4, NfHook.LOCAL_IN, NfPriority.FILTER)
            with attach_netfilter(prog, options, netns=dst) as nflink:
                say(f"attached at {dst} IPv4 LOCAL_IN priority {int(NfPriority.FILTER)} "
                    f"(prog id {bpf.prog_info(prog).id}, link id {bpf.link_info(nflink).id}):")
                check("ping", False, testbed.ping(src, addr, count=2))
                check("udp", True, testbed.udp_reaches(src, dst, addr))
        say("after detaching:")
        check("ping", True, testbed.ping(src, addr, count=2))
    ok = all(s.ok for s in steps)
    if args.json:
        json.dump({"ok": ok, "steps": [{"what": s.what, "expected": s.expected,
                                        "observed": s.observed} for s in steps]},
                  sys.stdout, indent=2)
        print()
    else:
        print("demo passed" if ok else "demo FAILED: a packet did not get the expected verdict")
    return 0 if ok else 1
