"""Stateful matches without a kernel: the maps they declare, the code they emit, refusals."""

from __future__ import annotations

import pytest

from bpfilter.codegen import stateful
from bpfilter.codegen.compiler import CompiledRuleset, CompileError, compile_ruleset
from bpfilter.codegen.insn import Insn
from bpfilter.codegen.opcodes import CLASS_MASK, MODE_MASK, AtomicOp, Class, Mode
from bpfilter.codegen.uapi import MapType
from bpfilter.grammar.iptables import parse_restore
from bpfilter.ir.optimizer import STATEFUL_MATCHES


def compiled(*rules: str, family: int = 4) -> CompiledRuleset:
    text = "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                      ":OUTPUT ACCEPT [0:0]", *rules, "COMMIT", ""])
    return compile_ruleset(parse_restore(text, family=family), family)


def maps(c: CompiledRuleset) -> dict[str, tuple[MapType, int, int, int]]:
    return {s.name: (s.type, s.key_size, s.value_size, s.max_entries) for s in c.maps
            if s.name != "counters"}


def atomics(c: CompiledRuleset) -> list[int]:
    (p,) = c.programs
    return [it.imm for it in p.items if isinstance(it, Insn)
            and it.opcode & CLASS_MASK == Class.STX and it.opcode & MODE_MASK == Mode.ATOMIC]


def test_optimizer_keeps_them_out_of_lookups() -> None:
    assert {"limit", "hashlimit", "recent", "statistic"} <= STATEFUL_MATCHES
    rules = [f"-A INPUT -s 198.18.{i // 256}.{i % 256} -m limit --limit 5/sec -j DROP"
             for i in range(64)]
    c = compiled(*rules)
    assert c.lookups == ()
    assert maps(c) == {stateful.STATE_MAP: (MapType.ARRAY, 4, 8, 64)}


def test_limit_and_nth_share_the_rule_state_array() -> None:
    c = compiled("-A INPUT -m limit --limit 5/sec -j ACCEPT",
                 "-A INPUT -m statistic --mode nth --every 2 --packet 0 -j DROP",
                 "-A INPUT -m statistic --mode random --probability 0.3 -j DROP")
    assert maps(c) == {stateful.STATE_MAP: (MapType.ARRAY, 4, 8, 2)}
    # the bucket: compare-and-swap attempts; the counter: one fetch-and-add
    ops = atomics(c)
    assert ops.count(AtomicOp.CMPXCHG) == stateful.CAS_ATTEMPTS
    assert ops.count(AtomicOp.FETCH_ADD) == 1


def test_hashlimit_and_recent_maps() -> None:
    c = compiled("-A INPUT -m hashlimit --hashlimit-upto 5/sec --hashlimit-name x "
                 "--hashlimit-mode srcip,dstip,srcport --hashlimit-htable-max 1000 -j ACCEPT",
                 "-A INPUT -m recent --set --name A",
                 "-A INPUT -m recent --rcheck --name A -j DROP",
                 "-A INPUT -m recent --rcheck --name B -j DROP", family=6)
    got = maps(c)
    zero = got.pop(stateful.ZERO_MAP)
    assert zero == (MapType.ARRAY, 4, stateful.ZERO_VALUE, 1)
    assert sorted(got.values()) == sorted([
        (MapType.LRU_HASH, 36, stateful.HASHLIMIT_VALUE, 1000),
        (MapType.LRU_HASH, 16, stateful.RECENT_VALUE, stateful.IP_LIST_TOT),
        (MapType.LRU_HASH, 16, stateful.RECENT_VALUE, stateful.IP_LIST_TOT)])
    assert all(len(n) <= 15 for n in got)


@pytest.mark.parametrize(("family", "options", "size"), [
    (4, "", 4), (4, "--hashlimit-mode srcip", 4), (4, "--hashlimit-mode srcip,dstport", 8),
    (4, "--hashlimit-mode srcip,dstip --hashlimit-srcmask 0", 4),
    (6, "--hashlimit-mode srcip", 16), (6, "--hashlimit-mode srcip --hashlimit-srcmask 64", 8),
    (6, "--hashlimit-mode srcip,dstip --hashlimit-srcmask 65 --hashlimit-dstmask 1", 16),
    (6, "--hashlimit-mode srcip,dstip,dstport", 36)])
def test_hashlimit_keys_hold_only_what_the_masks_keep(family: int, options: str,
                                                       size: int) -> None:
    # every frame of a call chain takes stack from the 512 bytes BPF allows
    c = compiled(f"-A INPUT -m hashlimit --hashlimit-upto 5/sec --hashlimit-name x {options} "
                 "-j ACCEPT", family=family)
    (key_size,) = [v[1] for k, v in maps(c).items() if k.startswith("hl_")]
    assert key_size == size


@pytest.mark.parametrize(("family", "mask", "size"), [
    (4, "", 4), (4, "--mask 0.0.0.0", 4), (6, "", 16), (6, "--mask ffff:ffff::", 4),
    (6, "--mask ffff:ffff:ffff::", 8)])
def test_recent_keys(family: int, mask: str, size: int) -> None:
    c = compiled(f"-A INPUT -m recent --set --name r {mask}", family=family)
    (key_size,) = [v[1] for k, v in maps(c).items() if k.startswith("rc_")]
    assert key_size == size


def test_hashlimit_default_size_is_the_kernels() -> None:
    c = compiled("-A INPUT -m hashlimit --hashlimit-upto 5/sec --hashlimit-name x -j ACCEPT",
                 "-A INPUT -m hashlimit --hashlimit-upto 5/sec --hashlimit-name y "
                 "--hashlimit-htable-size 100 -j ACCEPT")
    sizes = sorted(v[3] for k, v in maps(c).items() if k.startswith("hl_"))
    assert sizes == [800, stateful.HASHLIMIT_MAX_DEFAULT]


@pytest.mark.parametrize(("bits", "width", "mask"), [
    (0, 32, "00000000"), (24, 32, "ffffff00"), (31, 32, "fffffffe"), (32, 32, "ffffffff"),
    (64, 128, "ffffffffffffffff0000000000000000"), (1, 128, "80" + "00" * 15)])
def test_prefix_mask(bits: int, width: int, mask: str) -> None:
    assert stateful.prefix_mask(bits, width).hex() == mask


@pytest.mark.parametrize(("rules", "error"), [
    (["-A INPUT -m hashlimit --hashlimit-upto 1/sec --hashlimit-name t -j ACCEPT",
      "-A INPUT -m hashlimit --hashlimit-upto 2/sec --hashlimit-name t -j ACCEPT"],
     "line 6: hashlimit table 't' is set up differently at line 5"),
    (["-A INPUT -m hashlimit --hashlimit-upto 1/sec --hashlimit-name t --hashlimit-mode srcip "
      "--hashlimit-srcmask 33 -j ACCEPT"],
     "line 5: match 'hashlimit': --hashlimit-srcmask 33 is longer than an IPv4 address"),
    (["-A INPUT -m recent --rcheck --seconds 5 --reap --name R -j DROP"],
     "line 5: match 'recent' option '--reap' is not supported: it removes"),
    (["-A INPUT -m recent --rcheck --hitcount 256 --name R -j DROP"],
     "line 5: match 'recent': hitcount \\(256\\) is larger than allowed maximum \\(255\\)"),
    (["-A INPUT -m recent --set --name R --mask 255.255.255.0",
      "-A INPUT -m recent --rcheck --name R -j DROP"],
     "line 6: recent list 'R' --mask is set up differently at line 5"),
])
def test_refusals(rules: list[str], error: str) -> None:
    with pytest.raises(CompileError, match=error):
        compiled(*rules)


def test_a_shared_hashlimit_may_differ_in_direction() -> None:
    # xt_hashlimit takes the bucket settings from the table; --hashlimit-above only inverts
    compiled("-A INPUT -m hashlimit --hashlimit-upto 1/sec --hashlimit-name t -j ACCEPT",
             "-A INPUT -m hashlimit --hashlimit-above 1/sec --hashlimit-name t -j DROP")
