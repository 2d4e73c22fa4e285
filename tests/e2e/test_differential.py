"""Acceptance: random rulesets give every packet the same verdict in iptables and in bpfilter.

Two sets of namespaces (a BPF netfilter link cannot share a priority with an iptables table
in one namespace): I runs the ruleset in iptables-legacy, B in bpfilter. Both get the same
crafted packets, judged at raw PREROUTING and filter INPUT, FORWARD and OUTPUT
(tests/difftest.py explains how each verdict is observed); the first part of this module
checks that the observation itself is exact, against iptables and a hand-made BPF link.

CI: CI_RULESETS rulesets of CI_PACKETS packets from BASE_SEED (BPFILTER_SEED overrides).
Soak: BPFILTER_SOAK=100000 sends that many packets over rulesets from a random base seed
(printed, and named in a failure; BPFILTER_SEED fixes it; marked slow).
One case: BPFILTER_DIFF_CASE=SEED:FAMILY[:PACKETS] with `-k one_case` (every failure prints
this line). Harness self-check: BPFILTER_DIFF_CANDIDATE=iptables puts iptables on both sides.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence

import pytest
from difftest import (
    PROTO_OTHER,
    PROTO_TCP,
    PROTO_UDP,
    Backend,
    BpfilterBackend,
    CaseResult,
    IptablesBackend,
    Probe,
    Receiver,
    bpfilter_unavailable,
    make_probes,
    make_ruleset,
    missing_tools,
    receiver,
    report,
    run_case,
    seeds,
)
from iptgen import GenRule, GenRuleset, GenTable

from bpfilter import netns
from bpfilter.attach_netfilter import NetfilterOptions, attach_netfilter
from bpfilter.bpf import BpfError
from bpfilter.codegen.uapi import NfHook, NfPriority, NfProto, NfVerdict, ProgType

pytestmark = pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")

CI_RULESETS = 80
CI_PACKETS = 80
SOAK_PACKETS_PER_RULESET = 200
MAX_REFUSED = 0.1  # fraction of rulesets the candidate may refuse (CompileError)
BASE_SEED = int(os.environ.get("BPFILTER_SEED", "20261125"))
SOAK = int(os.environ.get("BPFILTER_SOAK", "0") or 0)
SOAK_SEED = int(os.environ.get("BPFILTER_SEED", str(random.SystemRandom().randrange(1 << 31))))
CANDIDATE = os.environ.get("BPFILTER_DIFF_CANDIDATE", "bpfilter")
ONE_CASE = os.environ.get("BPFILTER_DIFF_CASE", "")
TEST_FILE = "tests/e2e/test_differential.py"


def _nonce() -> bytes:
    return os.urandom(4)


def _candidate() -> Backend:
    if CANDIDATE == "iptables":
        return IptablesBackend()
    if CANDIDATE != "bpfilter":
        raise ValueError(f"BPFILTER_DIFF_CANDIDATE={CANDIDATE!r}: use bpfilter or iptables")
    reason = bpfilter_unavailable()
    if reason is not None:
        pytest.skip(reason)
    return BpfilterBackend()


@pytest.fixture(scope="module")
def pair_i() -> Iterator[Receiver]:
    with receiver(prefix="bpfdi") as rx:
        yield rx


@pytest.fixture(scope="module")
def pair_b() -> Iterator[Receiver]:
    with receiver(prefix="bpfdb") as rx:
        yield rx


def _gen(family: int, rules: Sequence[GenRule], policy: str = "ACCEPT") -> GenRuleset:
    chains = (("INPUT", policy), ("FORWARD", "ACCEPT"), ("OUTPUT", "ACCEPT"))
    return GenRuleset(family, 0, (GenTable("filter", chains, tuple(rules)),))


def _ruleset(family: int, rules: Sequence[GenRule], policy: str = "ACCEPT") -> str:
    return _gen(family, rules, policy).render()


def _probes(family: int, count: int = 300, seed: int = 7, forward: bool = False
            ) -> list[Probe]:
    """Probes for a sample ruleset; only those delivered locally unless ``forward``."""
    return [p for p in make_probes(make_ruleset(seed, family), seed, count)
            if forward or not p.forward]


def _accepted(rx: Receiver, text: str, family: int, probes: Sequence[Probe]) -> set[int]:
    ipt = IptablesBackend()
    rx.prepare(probes)
    ipt.load(rx.ns, text, family)
    try:
        seen = rx.send(probes, _nonce())
        return set(seen.delivered | seen.forwarded)
    finally:
        ipt.clear(rx.ns)


# -- the harness observes iptables verdicts exactly ---------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_every_packet_kind_arrives_when_accepted_and_none_when_dropped(
        pair_i: Receiver, family: int) -> None:
    probes = _probes(family, forward=True)
    kinds = {(p.proto, p.flow, p.iface) for p in probes}
    assert len(kinds) >= 12, kinds  # tcp/udp/icmp/other x new/reply/related x 2 interfaces
    assert any(p.fragmented for p in probes) and any(p.forward for p in probes)
    assert any(p.options for p in probes)
    tags = {p.tag for p in probes}
    assert _accepted(pair_i, _ruleset(family, []), family, probes) == tags
    forward = {p.tag for p in probes if p.forward}
    assert _accepted(pair_i, _ruleset(family, [], "DROP"), family, probes) == forward


@pytest.mark.parametrize("family", [4, 6])
def test_forwarded_probes_reach_the_far_side_unless_forward_drops(
        pair_i: Receiver, family: int) -> None:
    probes = _probes(family, forward=True)
    forward = {p.tag for p in probes if p.forward}
    assert forward and forward != {p.tag for p in probes}
    for policy, rules, expect in (
            ("ACCEPT", [], forward),
            ("DROP", [], set()),
            ("ACCEPT", [GenRule("FORWARD", (("-o", "eth0"), ("-p", "udp")), ("-j", "DROP"))],
             {p.tag for p in probes if p.forward and p.proto != PROTO_UDP})):
        chains = (("INPUT", "ACCEPT"), ("FORWARD", policy), ("OUTPUT", "ACCEPT"))
        text = GenRuleset(family, 0, (GenTable("filter", chains, tuple(rules)),)).render()
        ipt = IptablesBackend()
        pair_i.prepare(probes)
        ipt.load(pair_i.ns, text, family)
        try:
            seen = pair_i.send(probes, _nonce())
        finally:
            ipt.clear(pair_i.ns)
        assert seen.forwarded == expect, policy
        assert seen.delivered == {p.tag for p in probes if not p.forward}


@pytest.mark.parametrize("family", [4, 6])
def test_a_source_rule_drops_exactly_that_source(pair_i: Receiver, family: int) -> None:
    probes = _probes(family)
    victim = probes[0].src
    rule = GenRule("INPUT", (("-s", victim),), ("-j", "DROP"))
    got = _accepted(pair_i, _ruleset(family, [rule]), family, probes)
    assert got == {p.tag for p in probes if p.src != victim}


@pytest.mark.parametrize("family", [4, 6])
def test_raw_prerouting_drops_before_input_and_forward(pair_i: Receiver, family: int) -> None:
    probes = _probes(family, forward=True)
    victim = probes[0].src
    raw = GenTable("raw", (("PREROUTING", "ACCEPT"), ("OUTPUT", "ACCEPT")),
                   (GenRule("PREROUTING", (("-s", victim),), ("-j", "DROP")),))
    text = GenRuleset(family, 0, (raw, *_gen(family, []).tables)).render()
    got = _accepted(pair_i, text, family, probes)
    assert got == {p.tag for p in probes if p.src != victim}


@pytest.mark.parametrize("family", [4, 6])
def test_interface_and_port_rules(pair_i: Receiver, family: int) -> None:
    probes = _probes(family)
    rules = [GenRule("INPUT", (("-i", "eth+"),), ("-j", "DROP")),
             GenRule("INPUT", (("-p", "udp"), ("--dport", "1024:65535")), ("-j", "DROP"))]
    got = _accepted(pair_i, _ruleset(family, rules), family, probes)
    assert got == {p.tag for p in probes
                   if p.iface == 0 and not (p.proto == PROTO_UDP and p.dport >= 1024)}


@pytest.mark.parametrize("family", [4, 6])
def test_flows_opened_by_the_receiver_are_established(pair_i: Receiver, family: int) -> None:
    probes = _probes(family, 400)
    rule = GenRule("INPUT", (("-m", "conntrack", "--ctstate", "ESTABLISHED"),), ("-j", "ACCEPT"))
    got = _accepted(pair_i, _ruleset(family, [rule], "DROP"), family, probes)
    # UDP is the protocol whose conntrack state needs no judgement of flags.
    udp_new = {p.tag for p in probes if p.proto == PROTO_UDP and p.flow == "new"}
    udp_reply = {p.tag for p in probes if p.proto == PROTO_UDP and p.flow == "reply"}
    assert udp_reply and udp_new
    assert udp_reply <= got
    assert not udp_new & got
    # The generic tracker keys on addresses alone: a "new" PROTO_OTHER probe can join a flow.
    assert all(p.flow == "reply" for p in probes if p.tag in got and p.proto != PROTO_OTHER)
    related = GenRule("INPUT", (("-m", "state", "--state", "RELATED"),), ("-j", "ACCEPT"))
    got = _accepted(pair_i, _ruleset(family, [related], "DROP"), family, probes)
    assert got and got == {p.tag for p in probes if p.flow == "related"}


@pytest.mark.parametrize("family", [4, 6])
def test_marks_set_by_the_receiver_reach_the_ruleset(pair_i: Receiver, family: int) -> None:
    rules = [GenRule("INPUT", (("-m", "mark", "--mark", "0x1200/0xff00"),), ("-j", "DROP"))]
    text = _ruleset(family, rules)
    probes = make_probes(_gen(family, rules), 5, 300)
    marked = {p.tag for p in probes if p.mark & 0xFF00 == 0x1200 and not p.forward}
    assert marked and any(p.mark and p.tag not in marked for p in probes)
    got = _accepted(pair_i, text, family, probes)
    assert got == {p.tag for p in probes} - marked


@pytest.mark.parametrize("family", [4, 6])
def test_output_drops_of_flow_openers_are_observed(pair_i: Receiver, family: int) -> None:
    probes = _probes(family)
    victim = next(p.src for p in probes if p.flow == "reply" and p.proto == PROTO_UDP)
    rule = GenRule("OUTPUT", (("-d", victim),), ("-j", "DROP"))
    ipt = IptablesBackend()
    pair_i.prepare(probes)
    ipt.load(pair_i.ns, _ruleset(family, [rule]), family)
    try:
        seen = pair_i.send(probes, _nonce())
    finally:
        ipt.clear(pair_i.ns)
    assert seen.opener_dropped == {p.tag for p in probes if p.flow != "new" and p.src == victim}
    assert seen.delivered == {p.tag for p in probes}  # INPUT accepts all; the flows differ


def test_conntrack_is_active_without_any_ruleset(pair_b: Receiver) -> None:
    probes = _probes(4, 50)
    pair_b.prepare(probes)
    pair_b.send(probes, _nonce())
    with netns.entered(pair_b.ns), open("/proc/sys/net/netfilter/nf_conntrack_count") as f:
        assert int(f.read()) > 0


def test_tcp_syn_probes_carry_valid_flags(pair_i: Receiver) -> None:
    probes = [p for p in _probes(4, 400) if p.proto == PROTO_TCP]
    rule = GenRule("INPUT", (("-p", "tcp"), ("--syn",)), ("-j", "DROP"))
    got = _accepted(pair_i, _ruleset(4, [rule]), 4, probes)
    syn_only = {p.tag for p in probes if p.flags & 0x17 == 0x02}
    assert syn_only and got == {p.tag for p in probes} - syn_only


# -- the bpfilter side is observed the same way -------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_a_bpf_link_at_local_in_is_observed_like_iptables(
        pair_b: Receiver, programs, load, family: int) -> None:
    probes = _probes(family)
    victim = probes[0].src
    prog = load(programs.nf_drop_source(victim))
    pf = NfProto.IPV4 if family == 4 else NfProto.IPV6
    pair_b.prepare(probes)
    options = NetfilterOptions(pf, NfHook.LOCAL_IN, NfPriority.FILTER)
    with attach_netfilter(prog, options, netns=pair_b.ns):
        got = pair_b.send(probes, _nonce()).delivered
    assert got == {p.tag for p in probes if p.src != victim}


def test_a_bpf_link_cannot_share_the_filter_priority_with_iptables(
        pair_i: Receiver, programs, load) -> None:
    # Why the two sides need two namespace pairs.
    prog = load(programs.const(ProgType.NETFILTER, NfVerdict.ACCEPT))
    ipt = IptablesBackend()
    ipt.load(pair_i.ns, _ruleset(4, []), 4)
    try:
        options = NetfilterOptions(NfProto.IPV4, NfHook.LOCAL_IN, NfPriority.FILTER)
        with pytest.raises(BpfError, match="already taken"):
            attach_netfilter(prog, options, netns=pair_i.ns).close()
    finally:
        ipt.clear(pair_i.ns)


class _FlippedDrop(IptablesBackend):
    """iptables with each ruleset's first `-j DROP` turned into ACCEPT: a wrong candidate."""

    name = "flipped"

    def load(self, ns: str, text: str, family: int) -> None:
        super().load(ns, text.replace("-j DROP", "-j ACCEPT", 1), family)


def test_a_wrong_candidate_is_caught(pair_i: Receiver) -> None:
    # Not pair B: an iptables table, once created, keeps its hooks (and the filter priority)
    # in the namespace even when flushed.
    with receiver(prefix="bpfdf") as other:
        sides = [(IptablesBackend(), pair_i), (_FlippedDrop(), other)]
        results = [run_case(seed, family, sides, CI_PACKETS, _nonce())
                   for seed, family in seeds(BASE_SEED, 20)]
    caught = [r for r in results if r.mismatches]
    assert len(caught) >= 3
    for r in caught:
        text = report(r.seed, r.family, r.text, r.mismatches, "iptables", "flipped", "x")
        assert "iptables DROP, flipped ACCEPT" in text or "opener at OUTPUT" in text


# -- differential runs ---------------------------------------------------------------------------


def _reproduce(seed: int, family: int, packets: int) -> str:
    env = f"BPFILTER_DIFF_CASE={seed}:{family}:{packets}"
    if CANDIDATE != "bpfilter":
        env += f" BPFILTER_DIFF_CANDIDATE={CANDIDATE}"
    return f"{env} .venv/bin/pytest {TEST_FILE} -k one_case"


def _run(pair_i: Receiver, pair_b: Receiver, cases: Sequence[tuple[int, int]],
         packets: int) -> list[CaseResult]:
    sides = [(IptablesBackend(), pair_i), (_candidate(), pair_b)]
    return [run_case(seed, family, sides, packets, _nonce()) for seed, family in cases]


def _failure(r: CaseResult, packets: int) -> str:
    if r.error is not None:
        return (f"{CANDIDATE} failed on ruleset seed {r.seed} (IPv{r.family}): {r.error}\n"
                + "\n".join("  " + line for line in r.text.splitlines())
                + f"\nreproduce: {_reproduce(r.seed, r.family, packets)}")
    return report(r.seed, r.family, r.text, r.mismatches, "iptables", CANDIDATE,
                  _reproduce(r.seed, r.family, packets))


def _verdict(results: Sequence[CaseResult], base_seed: int, packets: int, min_rulesets: int,
             min_packets: int) -> None:
    refused = [r for r in results if r.refused is not None]
    compared = [r for r in results if r.refused is None]
    mismatched = [r for r in compared if r.mismatches]
    errors = [r for r in compared if r.error]
    failed = errors + mismatched
    sent = sum(len(r.probes) for r in compared)
    accepted = sum(len(r.reference.delivered) for r in compared)
    forwarded = sum(len(r.reference.forwarded) for r in compared)
    forward = sum(p.forward for r in compared for p in r.probes)
    openers = sum(p.flow != "new" for r in compared for p in r.probes)
    blocked = sum(len(r.reference.opener_dropped) for r in compared)
    hit = sum(r.coverage[0] for r in compared)
    rules = sum(r.coverage[1] for r in compared)
    summary = (f"{CANDIDATE} vs iptables from seed {base_seed}: {len(compared)} rulesets "
               f"compared, {len(refused)} "
               f"refused, {len(mismatched)} with mismatches, {len(errors)} with errors; {sent} "
               f"packets, {accepted} accepted by iptables at INPUT, {forwarded} of {forward} at "
               f"FORWARD; {openers} flow openers, "
               f"{blocked} dropped at OUTPUT; {hit}/{rules} rules hit by some packet")
    print(summary)
    messages = [_failure(r, packets) for r in failed[:3]]
    assert not failed, summary + "\n\n" + "\n\n".join(messages)
    refusals = "\n".join(f"  seed {r.seed} IPv{r.family}: {r.refused}" for r in refused[:10])
    assert len(refused) <= MAX_REFUSED * len(results), (
        f"{CANDIDATE} refused {len(refused)} of {len(results)} rulesets (CompileError), more "
        f"than {MAX_REFUSED:.0%}; refused rulesets count as failures, not passes:\n{refusals}")
    assert len(compared) >= min_rulesets and sent >= min_packets, summary
    if len(compared) >= 50:
        # Packets aimed at the rules: both verdicts are common, many rules are hit (numbers
        # from a run of the generator; too few rulesets vary too much to judge).
        assert 0.05 * sent < accepted < 0.95 * sent, summary
        assert hit >= 0.25 * rules, summary


def test_differential_ci(pair_i: Receiver, pair_b: Receiver) -> None:
    results = _run(pair_i, pair_b, list(seeds(BASE_SEED, CI_RULESETS)), CI_PACKETS)
    _verdict(results, BASE_SEED, CI_PACKETS, min_rulesets=50, min_packets=2000)


if SOAK:

    @pytest.mark.slow
    def test_differential_soak(pair_i: Receiver, pair_b: Receiver) -> None:
        count = -(-SOAK // SOAK_PACKETS_PER_RULESET)
        print(f"soak: {count} rulesets of {SOAK_PACKETS_PER_RULESET} packets from seed "
              f"{SOAK_SEED} (BPFILTER_SEED={SOAK_SEED} reruns it)")
        results = _run(pair_i, pair_b, list(seeds(SOAK_SEED, count)), SOAK_PACKETS_PER_RULESET)
        _verdict(results, SOAK_SEED, SOAK_PACKETS_PER_RULESET, min_rulesets=count // 2,
                 min_packets=SOAK // 2)


if ONE_CASE:

    def test_one_case(pair_i: Receiver, pair_b: Receiver) -> None:
        seed_s, family_s, *rest = ONE_CASE.split(":")
        packets = int(rest[0]) if rest else CI_PACKETS
        result = _run(pair_i, pair_b, [(int(seed_s), int(family_s))], packets)[0]
        assert result.refused is None, f"refused: {result.refused}\n{result.text}"
        assert not result.mismatches and result.error is None, _failure(result, packets)
