"""LOG and NFLOG through BPF_PROG_TEST_RUN: each logged packet leaves one event in the ring
with the packet and the target's parameters, the next rule still decides, and a full ring
counts lost events instead of blocking the packet."""

from __future__ import annotations

import ipaddress
import struct

from bpfilter import bpf, bpffs, cmd_log, loader, logfmt, testbed
from bpfilter.codegen import log as rec
from bpfilter.codegen.compiler import CompiledRuleset, compile_ruleset
from bpfilter.codegen.uapi import NfHook
from bpfilter.grammar.iptables import parse_restore

DROP, ACCEPT = 0, 1
A4, B4 = "198.18.0.1", "198.18.0.2"
A6, B6 = "2001:db8::1", "2001:db8::2"


def ip4(proto: int, payload: bytes) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 7, 0x4000, 64, proto, 0,
                       ipaddress.IPv4Address(A4).packed,
                       ipaddress.IPv4Address(B4).packed) + payload


def ip6(nexthdr: int, payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), nexthdr, 64,
                       ipaddress.IPv6Address(A6).packed,
                       ipaddress.IPv6Address(B6).packed) + payload


def udp(dport: int) -> bytes:
    return struct.pack("!HHHH", 5000, dport, 12, 0) + b"abcd"


def ruleset(rules: str, family: int = 4, chains: str = "") -> CompiledRuleset:
    text = "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                      ":OUTPUT ACCEPT [0:0]", *[f":{c} - [0:0]" for c in chains.split()],
                      *rules.strip().splitlines(), "COMMIT", ""])
    return compile_ruleset(parse_restore(text, family=family), family)


def events(runner: loader.TestRunner) -> list[logfmt.LogEvent]:
    with bpf.RingBuffer(runner.programs.maps[rec.RING]) as ring:
        return [logfmt.LogEvent.parse(raw) for raw in ring.read()]


def test_log_then_the_next_rule_decides() -> None:
    compiled = ruleset("""
        -A INPUT -p udp -j LOG --log-prefix "seen: " --log-level 6 --log-tcp-sequence
        -A INPUT -p udp --dport 53 -j DROP
    """)
    with loader.TestRunner(compiled) as runner:
        assert runner.run(NfHook.LOCAL_IN, ip4(17, udp(53))) == DROP
        assert runner.run(NfHook.LOCAL_IN, ip4(17, udp(54))) == ACCEPT
        assert runner.run(NfHook.LOCAL_IN, ip4(1, b"\x08\0\0\0\0\1\0\1")) == ACCEPT
        got = events(runner)
        counts = runner.counters()
    assert [e.packet for e in got] == [ip4(17, udp(53)), ip4(17, udp(54))]
    e = got[0]
    assert (e.kind, e.level, e.flags, e.prefix) == (rec.KIND_LOG, 6, rec.LOG_TCPSEQ, "seen: ")
    assert (e.table, e.chain, e.position, e.hook, e.family) == ("filter", "INPUT", 1,
                                                                 NfHook.LOCAL_IN, 4)
    assert e.skb_len == len(ip4(17, udp(53))) and got[1].ts_ns >= e.ts_ns > 0
    assert logfmt.format_line(e).endswith(
        f"SRC={A4} DST={B4} LEN=32 TOS=0x00 PREC=0x00 TTL=64 ID=7 DF PROTO=UDP SPT=5000 "
        "DPT=53 LEN=12 ")
    # LOG counts its packets like any rule.
    assert counts[("filter", "INPUT", 1)][0] == 2 and counts[("filter", "INPUT", 2)][0] == 1


def test_nflog_in_a_user_chain_at_two_hooks_ipv6() -> None:
    compiled = ruleset("""
        -A INPUT -j AUDITED
        -A OUTPUT -j AUDITED
        -A AUDITED -p udp -j NFLOG --nflog-group 9 --nflog-prefix "audit" --nflog-size 16 \
            --nflog-threshold 2
        -A AUDITED -p udp -j DROP
    """, family=6, chains="AUDITED")
    packet = ip6(17, udp(53))
    with loader.TestRunner(compiled) as runner:
        assert runner.run(NfHook.LOCAL_IN, packet) == DROP
        assert runner.run(NfHook.LOCAL_OUT, packet) == DROP
        got = events(runner)
    assert [(e.hook, e.chain, e.position) for e in got] == [
        (NfHook.LOCAL_IN, "AUDITED", 1), (NfHook.LOCAL_OUT, "AUDITED", 1)]
    e = got[0]
    assert (e.kind, e.group, e.prefix, e.copy_len, e.threshold, e.family) == (
        rec.KIND_NFLOG, 9, "audit", 16, 2, 6)
    assert e.packet == packet
    assert logfmt.to_json(e)["payload"] == packet[:16].hex()


def test_raw_table_prerouting() -> None:
    text = "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A PREROUTING -j LOG\nCOMMIT\n"
    compiled = compile_ruleset(parse_restore(text, family=4), 4)
    with loader.TestRunner(compiled) as runner:
        assert runner.run(NfHook.PRE_ROUTING, ip4(17, udp(53)), table="raw") == ACCEPT
        (e,) = events(runner)
    assert (e.table, e.chain, e.hook, e.level) == ("raw", "PREROUTING", NfHook.PRE_ROUTING,
                                                   rec.DEFAULT_LEVEL)


def test_full_ring_counts_drops_and_still_decides() -> None:
    compiled = ruleset("-A INPUT -j LOG\n-A INPUT -j DROP")
    capacity = rec.RING_BYTES // (rec.RECORD_SIZE + 8)  # 8-byte record header
    program = compiled.program(NfHook.LOCAL_IN)
    assert program is not None
    with loader.TestRunner(compiled) as runner:
        result = bpf.prog_test_run(runner.programs.progs[program],
                                   loader.test_run_data(ip4(17, udp(53)), NfHook.LOCAL_IN, 4),
                                   ctx_in=loader.hook_context(NfHook.LOCAL_IN, 4),
                                   repeat=capacity + 100)
        assert result.retval == DROP
        drops = runner.programs.maps[rec.DROPS].lookup_percpu(struct.pack("<I", 0)) or []
        lost = sum(struct.unpack("<Q", v)[0] for v in drops)
        # What `bpfilter log` reads: the maps as pins of a namespace's directory.
        ns = testbed.unique_name("bplgr")
        try:
            for name in (rec.RING, rec.DROPS):
                bpffs.pin(runner.programs.maps[name], f"map_{name}4", ns)
            reader = cmd_log.Reader(ns)
            reader.scan()
            try:
                kept = len(reader.read())
                assert reader.new_drops() == 100 and reader.new_drops() == 0
                assert reader.read() == []
            finally:
                reader.close()
        finally:
            bpffs.cleanup(ns)
    assert kept == capacity and lost == 100


def test_log_uid_without_a_socket_prints_nothing() -> None:
    compiled = ruleset("-A OUTPUT -j LOG --log-uid")
    with loader.TestRunner(compiled) as runner:
        assert runner.run(NfHook.LOCAL_OUT, ip4(17, udp(53))) == ACCEPT
        (e,) = events(runner)
    assert e.flags == rec.LOG_UID and e.uid is None and "UID=" not in logfmt.format_line(e)
