"""XDP and TC programs of compiled rulesets under BPF_PROG_TEST_RUN on crafted Ethernet frames.

The netfilter verdict tables (test_compiler_verdicts, test_compiler_more_matches) are run
again through the XDP and TC ingress flavors, so both flavors are held to the same
expectations; then what only these hooks have: frames iptables never sees, the attach
interface as -i/-o, TC's mark and packet type, MARK, counters of IP bytes, refusals."""

from __future__ import annotations

import struct

import pytest
import test_compiler_ipv6_ext as ext6
import test_compiler_matches_h3 as h3
import test_compiler_more_matches as more
import test_compiler_verdicts as nfv

from bpfilter import bpf, loader
from bpfilter.btf import Btf
from bpfilter.codegen.compiler import CompiledRuleset, CompileError, compile_ruleset
from bpfilter.codegen.flavor_packet import IfTarget
from bpfilter.codegen.uapi import IfHook, NfHook, SkBuffCtx, TcAction, XdpAction
from bpfilter.grammar.iptables import parse_restore

DROP, ACCEPT = 0, 1
DEV = "veth-x"
HOOKS = [IfHook.XDP, IfHook.TC_INGRESS]
RETURNS = {IfHook.XDP: {DROP: XdpAction.DROP, ACCEPT: XdpAction.PASS},
           IfHook.TC_INGRESS: {DROP: TcAction.SHOT, ACCEPT: TcAction.NEXT},
           IfHook.TC_EGRESS: {DROP: TcAction.SHOT, ACCEPT: TcAction.NEXT}}
# The test run's device is the loopback one, whose address is all zeros: a frame to it is
# PACKET_HOST at TC (another destination would be PACKET_OTHERHOST, passed untouched).
HOST_MAC = bytes(6)
SRC_MAC = bytes.fromhex("020000000001")
ETH_P_IP, ETH_P_IPV6, ETH_P_ARP, ETH_P_8021Q = 0x0800, 0x86DD, 0x0806, 0x8100


def frame(packet: bytes, family: int = 4, *, dst: bytes = HOST_MAC,
          ethertype: int | None = None) -> bytes:
    if ethertype is None:
        ethertype = ETH_P_IP if family == 4 else ETH_P_IPV6
    return dst + SRC_MAC + struct.pack("!H", ethertype) + packet


def text(rules: str, *, chain: str = "INPUT", policy: str = "ACCEPT", chains: str = "") -> str:
    lines = ["*filter", *(f":{c} {policy if c == chain else 'ACCEPT'} [0:0]"
                          for c in ("INPUT", "FORWARD", "OUTPUT"))]
    lines += [f":{c} - [0:0]" for c in chains.split()]
    lines += [r.strip() for r in rules.strip().splitlines() if r.strip()] + ["COMMIT", ""]
    return "\n".join(lines)


def compiled(rules: str, hook: IfHook, family: int = 4, *, ifname: str | None = DEV,
             chain: str = "INPUT", **kw: str) -> CompiledRuleset:
    ruleset = parse_restore(text(rules, chain=chain, **kw), family=family)
    return compile_ruleset(ruleset, family, target=IfTarget(hook, chain, ifname))


class Runner:
    """One loaded XDP/TC program; ``run`` gives the internal verdict (DROP 0 / ACCEPT 1)
    after checking the hook's return code is one of the two it maps to."""

    def __init__(self, c: CompiledRuleset) -> None:
        self.compiled = c
        self.tr = loader.TestRunner(c)
        (self.program,) = c.programs
        self.prog = self.tr.programs.progs[self.program]
        self.returns = RETURNS[IfHook(self.program.hook)]

    def raw(self, data: bytes, ctx: bytes | None = None) -> bpf.TestRunResult:
        return bpf.prog_test_run(self.prog, data, ctx_in=ctx)

    def run(self, data: bytes) -> int:
        ret = self.raw(data).retval
        back = {v: k for k, v in self.returns.items()}
        assert ret in back, f"return value {ret}"
        return back[ret]

    def counters(self) -> dict[tuple[str, str, int], tuple[int, int]]:
        return self.tr.counters()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.tr.close()


def verdicts(rules: str, hook: IfHook, frames: list[bytes], family: int = 4,
             **kw: str) -> list[int]:
    with Runner(compiled(rules, hook, family, **kw)) as r:
        return [r.run(f) for f in frames]


# --- the netfilter tables, again ---------------------------------------------------------------

def _refused_at(rule: str, hook: IfHook) -> str | None:
    """The refusal expected for a netfilter case at ``hook``, or None when it must compile."""
    if "conntrack" in rule or "-m state" in rule:
        return "conntrack state is not available"
    if "-m mark" in rule and hook is IfHook.XDP:
        return "there is no mark"
    return None


# Netfilter test runs have no input device; here it is the attach interface: those cases
# have their own test below.
SHARED = [(4, r, p, v) for r, p, v in nfv.CASES4 if " -i " not in r] + \
         [(6, r, p, v) for r, p, v in nfv.CASES6 if " -i " not in r]


@pytest.mark.parametrize("hook", HOOKS, ids=lambda h: h.name)
@pytest.mark.parametrize(("family", "rule", "packet", "expected"), SHARED,
                         ids=[f"v{c[0]}:{i}:{c[1][9:]}" for i, c in enumerate(SHARED)])
def test_netfilter_cases(hook: IfHook, family: int, rule: str, packet: bytes,
                         expected: int) -> None:
    why = _refused_at(rule, hook)
    if why is not None:
        with pytest.raises(CompileError, match=f"line 5: .*cannot run at {hook.name}: .*{why}"):
            compiled(rule, hook, family)
        return
    assert verdicts(rule, hook, [frame(packet, family)], family) == [expected]


# At TC egress the sk_buff carries its conntrack entry; a test run's has none, as a
# netfilter test run's: the conntrack cases give the netfilter answers.
CT_CASES = [(f, r, p, v) for f, r, p, v in SHARED if "conntrack" in r or "-m state" in r]


@pytest.mark.parametrize(("family", "rule", "packet", "expected"), CT_CASES,
                         ids=[f"v{c[0]}:{c[1][9:]}" for c in CT_CASES])
def test_conntrack_at_tc_egress(family: int, rule: str, packet: bytes, expected: int) -> None:
    rule = rule.replace("-A INPUT", "-A OUTPUT")
    if "NAT" in rule:
        with pytest.raises(CompileError, match="line 5: match 'conntrack' cannot run at "
                           "TC_EGRESS: .* --ctstate SNAT is not what the filter table saw"):
            compiled(rule, IfHook.TC_EGRESS, family, chain="OUTPUT")
        return
    got = verdicts(rule, IfHook.TC_EGRESS, [frame(packet, family)], family, chain="OUTPUT")
    assert got == [expected]


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("rule", ["-m connmark --mark 0", "-m connmark ! --mark 0",
                                  "-m conntrack --ctdir ORIGINAL", "-m conntrack --ctdir REPLY",
                                  "-m state --state INVALID,UNTRACKED"])
def test_conntrack_options_at_tc_egress_as_netfilter(family: int, rule: str) -> None:
    packet = nfv.P4_TCP if family == 4 else nfv.P6_TCP
    want = nfv.verdict(f"-A OUTPUT {rule} -j DROP", packet, family=family,
                       hook=NfHook.LOCAL_OUT)
    got = verdicts(f"-A OUTPUT {rule} -j DROP", IfHook.TC_EGRESS, [frame(packet, family)],
                   family, chain="OUTPUT")
    assert got == [want]


MORE = [(f, rule, cases) for f, (rule, cases) in more.ALL]


@pytest.mark.parametrize("hook", HOOKS, ids=lambda h: h.name)
@pytest.mark.parametrize(("family", "rule", "cases"), MORE,
                         ids=[f"v{f}:{r}" for f, r, _ in MORE])
def test_more_matches(hook: IfHook, family: int, rule: str,
                      cases: list[tuple[bytes, int]]) -> None:
    got = verdicts(f"-A INPUT {rule} -j DROP", hook, [frame(p, family) for p, _ in cases],
                   family)
    assert got == [v for _, v in cases]


@pytest.mark.parametrize("hook", HOOKS, ids=lambda h: h.name)
@pytest.mark.parametrize(("rules", "chains", "policy", "expected"), nfv.CHAINS,
                         ids=[str(i) for i in range(len(nfv.CHAINS))])
def test_chains_and_targets(hook: IfHook, rules: str, chains: str, policy: str,
                            expected: int) -> None:
    got = verdicts(rules, hook, [frame(nfv.P4_TCP)], chains=chains, policy=policy)
    assert got == [expected]


@pytest.mark.parametrize("hook", HOOKS, ids=lambda h: h.name)
def test_counters_follow_iptables(hook: IfHook) -> None:
    rules = """-A INPUT -p tcp
               -A INPUT -j X
               -A INPUT -p udp -j DROP
               -A X -p udp -j RETURN
               -A X -p icmp -j ACCEPT"""
    icmp = nfv.ip4(1, nfv.icmp())
    with Runner(compiled(rules, hook, chains="X")) as r:
        assert r.run(frame(nfv.P4_TCP)) == ACCEPT
        assert r.run(frame(nfv.P4_UDP)) == DROP
        assert r.run(frame(icmp)) == ACCEPT
        assert r.run(frame(nfv.ip4(6, nfv.tcp(), frag=1))) == ACCEPT
        counters = r.counters()
    tcp_len, udp_len, icmp_len = len(nfv.P4_TCP), len(nfv.P4_UDP), len(icmp)
    assert counters[("filter", "INPUT", 1)] == (2, 2 * tcp_len)
    assert counters[("filter", "INPUT", 2)] == (4, 2 * tcp_len + udp_len + icmp_len)
    assert counters[("filter", "INPUT", 3)] == (1, udp_len)
    assert counters[("filter", "X", 1)] == (1, udp_len)
    assert counters[("filter", "X", 2)] == (1, icmp_len)
    assert counters[("filter", "INPUT", 0)] == (2, 2 * tcp_len)


@pytest.mark.parametrize("hook", HOOKS, ids=lambda h: h.name)
def test_ipv6_extension_header_matches(hook: IfHook) -> None:
    # ext6.CASES (rt, frag, ipv6header) give match / no match / hot drop per packet: a rule
    # that counts, then DROP, shows all three (hot drop: DROP, counter unmoved).
    for rule, expected in ext6.CASES:
        got = []
        with Runner(compiled(f"-A INPUT {rule}\n-A INPUT {rule} -j DROP", hook, 6)) as r:
            for packet, _ in expected:
                before = r.counters()[("filter", "INPUT", 1)][0]
                verdict = r.run(frame(packet, 6))
                hit = r.counters()[("filter", "INPUT", 1)][0] > before
                got.append(ext6.MATCH if hit else ext6.HOTDROP if verdict == DROP
                           else ext6.NOMATCH)
        assert got == [w for _, w in expected], rule


@pytest.mark.parametrize("hook", HOOKS + [IfHook.TC_EGRESS], ids=lambda h: h.name)
@pytest.mark.parametrize("family", [4, 6])
def test_tcp_options_and_mss(hook: IfHook, family: int) -> None:
    # One program of counting rules (no target), one per tested option kind and MSS range:
    # which counters a packet moves says which tests held (one option walk serves them all).
    build = h3.ip4 if family == 4 else h3.ip6
    chain = "OUTPUT" if hook is IfHook.TC_EGRESS else "INPUT"
    kinds = sorted({k for _, ks in h3.OPTION_CASES for k in ks})
    tests = [f"-p tcp --tcp-option {k}" for k in kinds] + \
        [f"-p tcp -m tcpmss {opts}" for opts, _ in h3.MSS_CASES]
    rules = "\n".join(f"-A {chain} {t}" for t in tests)

    def held(r: Runner, options: bytes) -> list[bool]:
        before = r.counters()
        assert r.run(frame(build(6, h3.tcp(options)), family)) == ACCEPT
        after = r.counters()
        return [after[("filter", chain, i)][0] > before[("filter", chain, i)][0]
                for i in range(1, len(tests) + 1)]

    with Runner(compiled(rules, hook, family, chain=chain)) as r:
        for options, present in h3.OPTION_CASES:
            got = held(r, options)
            for kind, want in present.items():
                assert got[kinds.index(kind)] == want, (options.hex(), kind)
        for m, (_, cases) in enumerate(h3.MSS_CASES):
            for options, verdict in cases:
                assert held(r, options)[len(kinds) + m] == (verdict == DROP), \
                    (h3.MSS_CASES[m][0], options.hex())


@pytest.mark.parametrize("hook", HOOKS, ids=lambda h: h.name)
@pytest.mark.parametrize(("match", "expected"), [
    ("--mac-source 02:00:00:00:00:01", DROP), ("--mac-source 02:00:00:00:00:02", ACCEPT),
    ("! --mac-source 02:00:00:00:00:01", ACCEPT), ("! --mac-source 02:00:00:00:00:02", DROP)])
def test_mac_source(hook: IfHook, match: str, expected: int) -> None:
    assert verdicts(f"-A INPUT -m mac {match} -j DROP", hook, [frame(nfv.P4_TCP)]) == [expected]


def test_mac_refused_at_egress() -> None:
    with pytest.raises(CompileError, match="line 5: match 'mac' is not supported at hook "
                       "TC_EGRESS"):
        compiled("-A FORWARD -m mac --mac-source 02:00:00:00:00:01 -j DROP", IfHook.TC_EGRESS,
                 chain="FORWARD")


# --- frames iptables never sees ------------------------------------------------------------------

def _bad_ihl() -> bytes:
    p = bytearray(nfv.P4_TCP)
    p[0] = 0x44
    return bytes(p)


def _long_tot_len() -> bytes:
    p = bytearray(nfv.P4_TCP)
    p[2:4] = struct.pack("!H", len(p) + 1)
    return bytes(p)


NOT_IPTABLES = [
    ("arp", frame(b"\0" * 28, ethertype=ETH_P_ARP)),
    ("vlan tag", frame(b"\0\x05\x08\x00" + nfv.P4_TCP, ethertype=ETH_P_8021Q)),
    ("ipv6 to an ipv4 program", frame(nfv.P6_TCP, 6)),
    ("ihl 4", frame(_bad_ihl())),
    ("tot_len beyond the frame", frame(_long_tot_len())),
    ("version 6 behind 0x0800", frame(nfv.P6_TCP, ethertype=ETH_P_IP)),
    ("shorter than tot_len", frame(nfv.P4_TCP[:30])),
    ("no ethernet header", b"\0" * 14),
]


@pytest.mark.parametrize("hook", HOOKS, ids=lambda h: h.name)
@pytest.mark.parametrize(("what", "data"), NOT_IPTABLES, ids=[n for n, _ in NOT_IPTABLES])
def test_frames_iptables_never_sees_pass_uncounted(hook: IfHook, what: str, data: bytes) -> None:
    with Runner(compiled("-A INPUT -j DROP", hook, policy="DROP")) as r:
        assert r.run(data) == ACCEPT
        assert r.run(frame(nfv.P4_TCP)) == DROP  # and an ordinary frame is dropped
        assert r.counters()[("filter", "INPUT", 1)] == (1, len(nfv.P4_TCP))


def test_tc_other_host_passes_uncounted() -> None:
    other = frame(nfv.P4_TCP, dst=bytes.fromhex("020000000002"))
    with Runner(compiled("-A INPUT -j DROP", IfHook.TC_INGRESS)) as r:
        assert r.run(other) == ACCEPT
        assert r.counters()[("filter", "INPUT", 1)] == (0, 0)
    with Runner(compiled("-A INPUT -j DROP", IfHook.XDP)) as r:
        assert r.run(other) == DROP  # XDP cannot tell: the device's address is not known


@pytest.mark.parametrize("hook", HOOKS, ids=lambda h: h.name)
def test_ethernet_padding_and_ip_options(hook: IfHook) -> None:
    # A 40-byte packet padded to the 60-byte minimum frame: counted and measured as 40,
    # and the padding is not transport header (a 19-byte TCP header stays truncated).
    padded = frame(nfv.P4_TCP) + b"\xee" * 6
    rules = "-A INPUT -m length --length 40 -j DROP"
    with Runner(compiled(rules, hook)) as r:
        assert r.run(padded) == DROP
        assert r.counters()[("filter", "INPUT", 1)] == (1, 40)
    cut = frame(nfv.ip4(6, nfv.tcp()[:19])) + b"\0" * 10
    assert verdicts("-A INPUT -p tcp --dport 22 -j ACCEPT", hook, [cut]) == [DROP]  # hot drop
    # IPv4 options: the transport header starts after ihl * 4 bytes.
    opts = bytearray(nfv.ip4(6, b"\x01\x01\x01\x00" + nfv.tcp(dport=80)))
    opts[0] = 0x46
    assert verdicts("-A INPUT -p tcp --dport 80 -j DROP", hook, [frame(bytes(opts))]) == [DROP]


# --- devices -------------------------------------------------------------------------------------

DEVICES = [("-i veth-x", DROP), ("-i veth-+", DROP), ("-i veth-y", ACCEPT), ("! -i veth-x", ACCEPT),
           ("-i +", DROP), ("! -i eth+", DROP)]


@pytest.mark.parametrize("hook", HOOKS, ids=lambda h: h.name)
@pytest.mark.parametrize(("match", "expected"), DEVICES, ids=[d[0] for d in DEVICES])
def test_input_device_is_the_interface(hook: IfHook, match: str, expected: int) -> None:
    assert verdicts(f"-A INPUT {match} -j DROP", hook, [frame(nfv.P4_TCP)]) == [expected]


@pytest.mark.parametrize(("match", "expected"), [("-o veth-x", DROP), ("-o veth-y", ACCEPT),
                                                 ("! -o veth-x", ACCEPT)])
def test_output_device_at_egress(match: str, expected: int) -> None:
    got = verdicts(f"-A OUTPUT {match} -j DROP", IfHook.TC_EGRESS, [frame(nfv.P4_TCP)],
                   chain="OUTPUT")
    assert got == [expected]


def test_device_refusals() -> None:
    with pytest.raises(CompileError, match="line 5: -o cannot run at XDP: there is no output"):
        compiled("-A FORWARD -o veth-x -j DROP", IfHook.XDP, chain="FORWARD")
    with pytest.raises(CompileError, match="line 5: -i cannot run at TC_EGRESS"):
        compiled("-A FORWARD -i veth-x -j DROP", IfHook.TC_EGRESS, chain="FORWARD")
    with pytest.raises(CompileError, match="line 5: -i needs the interface"):
        compiled("-A INPUT -i veth-x -j DROP", IfHook.XDP, ifname=None)
    # A refused rule in a user chain the chain reaches is refused too, with its own line.
    with pytest.raises(CompileError, match="line 7: match 'state' cannot run at TC_INGRESS"):
        compiled("-A INPUT -j X\n-A X -m state --state NEW -j DROP", IfHook.TC_INGRESS,
                 chains="X")


def test_other_tables_and_chains_are_refused() -> None:
    two = "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n" + text("")
    with pytest.raises(CompileError, match="line 1: table 'raw' cannot run at XDP"):
        compile_ruleset(parse_restore(two), 4, target=IfTarget(IfHook.XDP, "INPUT", DEV))
    with pytest.raises(CompileError, match="no built-in chain NOPE"):
        compiled("", IfHook.XDP, chain="NOPE")


# --- TC: mark, packet type, MARK -----------------------------------------------------------------

def skb_ctx(mark: int = 0) -> bytes:
    ctx = bytearray(Btf.load().struct_size("__sk_buff"))
    struct.pack_into("<I", ctx, SkBuffCtx.MARK, mark)
    return bytes(ctx)


def test_tc_reads_and_writes_the_mark() -> None:
    rules = """-A INPUT -m mark --mark 0x5/0xff -j DROP
               -A INPUT -p tcp -j MARK --set-xmark 0x30/0xf0
               -A INPUT -m mark --mark 0x135 -j DROP
               -A INPUT -p tcp -j MARK --or-mark 0x1000"""
    for hook in (IfHook.TC_INGRESS, IfHook.TC_EGRESS):
        chain = "OUTPUT" if hook is IfHook.TC_EGRESS else "INPUT"
        with Runner(compiled(rules.replace("INPUT", chain), hook, chain=chain)) as r:
            assert r.raw(frame(nfv.P4_TCP), skb_ctx(0x105)).retval == TcAction.SHOT
            res = r.raw(frame(nfv.P4_TCP), skb_ctx(0x2F7))  # (0x2f7 & ~0xf0) ^ 0x30 | 0x1000
            assert res.retval == TcAction.NEXT
            assert res.ctx_out is not None
            assert struct.unpack_from("<I", res.ctx_out, SkBuffCtx.MARK)[0] == 0x1237
            res = r.raw(frame(nfv.P4_TCP), skb_ctx(0x115))  # 0x135 after MARK: DROP
            assert res.retval == TcAction.SHOT
            res = r.raw(frame(nfv.P4_UDP), skb_ctx(0x77))  # no MARK ran: unchanged
            assert res.ctx_out is not None
            assert struct.unpack_from("<I", res.ctx_out, SkBuffCtx.MARK)[0] == 0x77


def test_mark_target_refusals() -> None:
    with pytest.raises(CompileError, match="line 5: target 'MARK' is not supported at hook "
                       "LOCAL_IN: netfilter BPF programs cannot write skb->mark"):
        nfv.ruleset("-A INPUT -j MARK --set-mark 1")
    with pytest.raises(CompileError, match="line 5: target 'MARK' cannot run at XDP"):
        compiled("-A INPUT -j MARK --set-mark 1", IfHook.XDP)


@pytest.mark.parametrize(("mac", "name", "expected"), [
    (HOST_MAC, "unicast", DROP), (HOST_MAC, "multicast", ACCEPT),
    (bytes.fromhex("01005e000001"), "multicast", DROP), (b"\xff" * 6, "multicast", DROP),
    (bytes.fromhex("01005e000001"), "unicast", ACCEPT)])
def test_tc_pkttype(mac: bytes, name: str, expected: int) -> None:
    got = verdicts(f"-A INPUT -m pkttype --pkt-type {name} -j DROP", IfHook.TC_INGRESS,
                   [frame(nfv.P4_TCP, dst=mac)])
    assert got == [expected]


def test_pkttype_refused_at_xdp_and_egress() -> None:
    with pytest.raises(CompileError, match="match 'pkttype' cannot run at XDP"):
        compiled("-A INPUT -m pkttype --pkt-type unicast -j DROP", IfHook.XDP)
    with pytest.raises(CompileError, match="match 'pkttype' cannot run at TC_EGRESS"):
        compiled("-A OUTPUT -m pkttype --pkt-type unicast -j DROP", IfHook.TC_EGRESS,
                 chain="OUTPUT")


@pytest.mark.parametrize("hook", HOOKS, ids=lambda h: h.name)
def test_stateful_matches_keep_state_across_packets(hook: IfHook) -> None:
    six, four, three = [frame(nfv.P4_TCP)] * 6, [frame(nfv.P4_TCP)] * 4, [frame(nfv.P4_TCP)] * 3
    assert verdicts("-A INPUT -m statistic --mode nth --every 3 --packet 0 -j DROP", hook,
                    six) == [DROP, ACCEPT, ACCEPT, DROP, ACCEPT, ACCEPT]
    assert verdicts("-A INPUT -m limit --limit 1/hour --limit-burst 2 -j ACCEPT\n"
                    "-A INPUT -j DROP", hook, four) == [ACCEPT, ACCEPT, DROP, DROP]
    assert verdicts("-A INPUT -m recent --set\n-A INPUT -m recent --rcheck --hitcount 2 "
                    "-j DROP", hook, three) == [ACCEPT, DROP, DROP]
    assert verdicts("-A INPUT -m hashlimit --hashlimit-upto 1/hour --hashlimit-burst 2 "
                    "--hashlimit-mode srcip --hashlimit-name h6 -j ACCEPT\n-A INPUT -j DROP",
                    hook, three) == [ACCEPT, ACCEPT, DROP]


# --- scale ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("hook", HOOKS, ids=lambda h: h.name)
def test_lookups_and_long_chains(hook: IfHook) -> None:
    block = "\n".join(f"-A INPUT -s 10.0.{i >> 8}.{i & 255} -j DROP" for i in range(2000))
    rules = f"{block}\n" + "\n".join(f"-A INPUT -p tcp --dport {p} -m length --length "
                                     f"{p}:65535 -j DROP" for p in range(1, 400))
    hit = nfv.ip4(17, nfv.udp(), src="10.0.7.207")
    with Runner(compiled(rules, hook)) as r:
        assert r.compiled.lookups  # the blocklist became a map lookup
        assert r.run(frame(hit)) == DROP
        assert r.run(frame(nfv.P4_UDP)) == ACCEPT
        assert r.run(frame(nfv.ip4(6, nfv.tcp(dport=39)))) == DROP  # length 40 >= 39
        assert r.run(frame(nfv.ip4(6, nfv.tcp(dport=41)))) == ACCEPT
        assert r.counters()[("filter", "INPUT", 1 + 7 * 256 + 207)] == (1, len(hit))


def test_netfilter_programs_unchanged() -> None:
    # The hooks' widening must not change what netfilter programs do.
    c = nfv.ruleset("-A INPUT -p tcp --dport 22 -j DROP")
    assert [p.hook for p in c.programs] == [NfHook.LOCAL_IN]
    assert loader.test_run(c, NfHook.LOCAL_IN, nfv.P4_TCP) == DROP
