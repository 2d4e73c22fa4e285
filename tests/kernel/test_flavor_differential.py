"""Random rulesets (tests/iptgen.py) and aimed packets (tests/difftest.py): the INPUT chain
compiled for netfilter and as XDP and TC ingress programs must give every packet the same
verdict and leave the same counters (BPF_PROG_TEST_RUN on both sides). The netfilter side is
itself checked against iptables-legacy by tests/e2e/test_differential.py.

Only features whose facts the packet itself carries are generated: interfaces, marks and
conntrack differ between a netfilter test run and an interface (they have tests of their own
in test_flavor_verdicts). The ClassBench 1k sets (bit-vector classifiers) are checked against
the linear reference as at netfilter."""

from __future__ import annotations

import os
from pathlib import Path

import classbench as cb
import difftest
import iptgen
import pytest
import test_flavor_verdicts as fv

from bpfilter import loader
from bpfilter.codegen.compiler import compile_ruleset
from bpfilter.codegen.flavor_packet import IfTarget
from bpfilter.codegen.uapi import IfHook, NfHook
from bpfilter.grammar.iptables import parse_restore
from bpfilter.ir.optimizer import Classifier

FEATURES = frozenset({
    "src", "dst", "addr_mask", "addr_list", "proto", "proto_num", "negation", "fragment",
    "tcp", "udp", "explicit_m_proto", "tcp_flags", "syn", "multiport", "icmp", "comment",
    "comment_odd_chars", "comment_long", "length", "iprange", "ttl", "tos", "dscp",
    "tcp_option", "jump", "goto", "return", "no_target", "user_chains", "policy",
    "omit_builtin", "insert", "new_chain_cmd", "policy_cmd", "rule_counters",
    "file_comments", "family_prefix",
})
assert FEATURES <= iptgen.FEATURES
SEEDS = int(os.environ.get("BPFILTER_FLAVOR_SEEDS", "20"))  # more: a longer soak
PACKETS = 60
NONCE = b"h6h6"


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("seed", range(SEEDS))
def test_same_verdicts_as_netfilter(seed: int, family: int) -> None:
    gen = iptgen.generate(seed, difftest.ruleset_options(family, 8 + seed % 3 * 20, FEATURES))
    text = gen.render()
    ruleset = parse_restore(text, family=family)
    probes = difftest.make_probes(gen, seed, PACKETS)
    packets = [w for p in probes for w in p.wire(NONCE)]
    netfilter = compile_ruleset(ruleset, family)
    # An empty INPUT chain with an ACCEPT policy has no netfilter program, so no counters.
    counted = netfilter.program(NfHook.LOCAL_IN) is not None
    with loader.TestRunner(netfilter) as nf:
        want = [nf.run(NfHook.LOCAL_IN, p) for p in packets]
        want_counts = {k: v for k, v in nf.counters().items() if k[1] != "FORWARD"
                       and k[1] != "OUTPUT"}
    for hook in (IfHook.XDP, IfHook.TC_INGRESS):
        compiled = compile_ruleset(ruleset, family, target=IfTarget(hook, "INPUT", "eth0"))
        with fv.Runner(compiled) as r:
            got = [r.run(fv.frame(p, family)) for p in packets]
            counts = {k: v for k, v in r.counters().items() if k[1] not in ("FORWARD", "OUTPUT")}
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert g == w, f"{hook.name}: packet {i} ({probes[min(i, len(probes) - 1)]})\n{text}"
        if counted:
            assert counts == want_counts, f"{hook.name}\n{text}"


@pytest.mark.parametrize("hook", [IfHook.XDP, IfHook.TC_INGRESS], ids=lambda h: h.name)
@pytest.mark.parametrize("name", ["acl1", "fw1", "ipc1"])
def test_classbench_traces_match_the_reference(shared_dir: Path, name: str,
                                               hook: IfHook) -> None:
    # The 1k rule sets become bit-vector classifiers: XDP/TC programs with them load and
    # decide every trace packet as the linear reference does.
    base = shared_dir / "classbench"
    rules = cb.read_rules(base / f"{name}_1k")
    trace = cb.read_trace(base / f"{name}_1k_trace")[:2000]
    ruleset = parse_restore(cb.restore_text(rules))
    compiled = compile_ruleset(ruleset, 4, target=IfTarget(hook, "INPUT", "eth0"))
    assert [type(run) for _, _, run, _ in compiled.lookups] == [Classifier]
    want = ["DROP" if (k := cb.first_match(rules, p)) is None else cb.verdict_of(k)
            for p in trace]
    with fv.Runner(compiled) as r:
        got = ["DROP" if r.run(fv.frame(cb.packet(p))) == fv.DROP else "ACCEPT" for p in trace]
    assert got == want
