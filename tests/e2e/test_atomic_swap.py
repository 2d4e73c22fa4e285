"""Atomic replacement under load: a UDP stream flows while the ruleset is replaced 100 times;
every packet gets the old or the new ruleset's verdict, never a gap or a mix."""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from bpfilter import netns, state, testbed
from bpfilter.dispatch import TableKey, next_generation
from bpfilter.grammar.iptables import parse_restore
from bpfilter.restore import RestoreOptions, restore_table

SWAPS = 100
PORTS = (5001, 5002, 5003, 5004)  # flow 0: A only, flow 1: B only, flow 2: both, flow 3: none
_SEQ = struct.Struct("!Q")


def _ruleset(accept: tuple[int, ...]) -> str:
    rules = "".join(f"-A INPUT -p udp --dport {p} -j ACCEPT\n" for p in accept)
    return f"*filter\n:INPUT DROP [0:0]\n-A INPUT -p icmp -j ACCEPT\n{rules}COMMIT\n"


PACKETS_PER_SWAP = 4 * len(PORTS) * 4  # at least 16 packets of each flow
RULESET_A = _ruleset((PORTS[0], PORTS[2]))
RULESET_B = _ruleset((PORTS[1], PORTS[2]))


@pytest.fixture
def pair() -> Iterator[testbed.NetnsPair]:
    with testbed.netns_pair(prefix="bpfs") as p:
        yield p


def _apply(text: str, ns: str) -> None:
    table = parse_restore(text).tables[0]
    restore_table(table, RestoreOptions(netns=ns))


def test_stream_sees_old_or_new_ruleset_through_100_replacements(
        pair: testbed.NetnsPair) -> None:
    _apply(RULESET_A, pair.b)
    receivers = []
    with netns.entered(pair.b):
        for port in PORTS:
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
            rx.bind((pair.ipv4_b, port))
            receivers.append(rx)
    with netns.entered(pair.a):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    got: list[set[int]] = [set() for _ in PORTS]
    sent: list[tuple[int, int]] = []  # (sequence number, flow) in sending order
    stop = threading.Event()

    def send() -> None:
        seq = 0
        while not stop.is_set():
            for flow, port in enumerate(PORTS):
                tx.sendto(_SEQ.pack(seq), (pair.ipv4_b, port))
                sent.append((seq, flow))
                seq += 1
            time.sleep(0.0002)

    def receive() -> None:
        idle_after_stop = 0
        while idle_after_stop < 3:
            ready, _, _ = select.select(receivers, [], [], 0.1)
            if not ready and stop.is_set():
                idle_after_stop += 1
            for rx in ready:
                data = rx.recv(64)
                got[receivers.index(rx)].add(_SEQ.unpack(data)[0])

    threads = [threading.Thread(target=send), threading.Thread(target=receive)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.05)
        for i in range(SWAPS):
            # Let the stream run between swaps, so every generation carries traffic whatever
            # the relative speed of the sender and the swaps.
            mark = len(sent) + PACKETS_PER_SWAP
            deadline = time.monotonic() + 5
            while len(sent) < mark and time.monotonic() < deadline:
                time.sleep(0.001)
            _apply(RULESET_B if i % 2 == 0 else RULESET_A, pair.b)
        time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        tx.close()
        for rx in receivers:
            rx.close()

    both = [s for s, f in sent if f == 2]
    assert len(both) > 1000, "too little traffic to say anything"
    # Accepted by both rulesets: nothing lost, so there was no moment of DROP everything.
    assert got[2] == set(both)
    # Accepted by neither: nothing through, so there was no moment without filtering.
    assert got[3] == set()
    # Flows 0 and 1 tell which ruleset each packet met; read in sending order, the ruleset
    # may change at most once per replacement (a mix of old and new would flip back and
    # forth), and it did change while the stream ran.
    seen = [("A" if s in got[0] else "B") if f == 0 else ("B" if s in got[1] else "A")
            for s, f in sent if f in (0, 1)]
    flips = sum(1 for x, y in zip(seen, seen[1:], strict=False) if x != y)
    assert 1 <= flips <= SWAPS
    assert seen[0] == "A" and seen[-1] == "A"  # an even number of swaps ends on A
    live = state.live_table(TableKey(4, "filter"), pair.b)
    gen = 0
    for _ in range(SWAPS + 1):  # every replacement a rebuild (dispatch.next_generation)
        gen = next_generation(gen, rebuild=True)
    assert live is not None and live.generation == gen
