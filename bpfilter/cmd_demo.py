"""`bpfilter demo`: compile a built-in iptables ruleset, load it into a throwaway network
namespace and show real packets getting iptables' verdicts."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from bpfilter import loader, netns, responder, testbed
from bpfilter.codegen.compiler import compile_ruleset
from bpfilter.grammar.iptables import parse_restore
from bpfilter.ir.iptables_save import to_iptables_save

# A small host firewall: default DROP, loopback and replies allowed, pings from the
# benchmarking range, one UDP service, one UDP port REJECTed (the sender hears "port
# unreachable" at once), SSH through a user chain that only admits one host.
EXAMPLE = """\
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:SSH - [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -s 198.18.0.0/15 -p icmp -m icmp --icmp-type echo-request -j ACCEPT
-A INPUT -p udp -m udp --dport 5353 -j ACCEPT
-A INPUT -p udp -m udp --dport 5356 -j REJECT --reject-with icmp-port-unreachable
-A INPUT -p tcp -m tcp --dport 22 -j SSH
-A SSH -s 198.19.255.254/32 -j ACCEPT
-A SSH -j DROP
COMMIT
"""
SERVICE_PORT = 5353
CLOSED_PORT = 5354
REJECTED_PORT = 5356


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
        help="compile a built-in iptables ruleset and check it with real packets in a netns",
        description=(
            "Create two network namespaces joined by veth (198.18.0.0/15), compile a built-in "
            "iptables ruleset to eBPF, attach it at the netfilter hooks of one namespace, and "
            "check with real packets that they get the verdicts iptables gives; everything is "
            "deleted afterwards."
        ),
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    say: Callable[[str], None] = (lambda s: None) if args.json else print
    steps: list[Step] = []

    def check(what: str, expected: bool, observed: bool,
              words: tuple[str, str] = ("delivered", "dropped")) -> None:
        steps.append(Step(what, expected, observed))
        mark = "ok  " if expected == observed else "FAIL"
        say(f"  [{mark}] {what}: {words[0] if observed else words[1]}")

    ruleset = parse_restore(EXAMPLE, filename="<demo>")
    say("ruleset (canonical iptables-save form):")
    for line in to_iptables_save(ruleset).splitlines():
        say("    " + line)
    compiled = compile_ruleset(ruleset, family=4)
    for program in compiled.programs:
        say(f"compiled {program.table}/{program.chain} -> netfilter hook {program.hook.name}, "
            f"priority {program.priority}")
    counters: dict[str, tuple[int, int]] = {}
    with testbed.netns_pair("bpfdemo") as pair:
        src, dst, addr = pair.a, pair.b, pair.ipv4_b
        say(f"namespaces {src} ({pair.ipv4_a}) -> {dst} ({addr}) over veth")
        say("before loading:")
        check(f"udp to closed port {CLOSED_PORT}", True,
              testbed.udp_reaches(src, dst, addr, CLOSED_PORT))
        with loader.load(compiled, netns=dst) as handle, _responder(dst):
            say(f"loaded into {dst}:")
            check("ping (echo-request from 198.18.0.0/15)", True, testbed.ping(src, addr, count=2))
            check(f"udp to port {SERVICE_PORT}", True,
                  testbed.udp_reaches(src, dst, addr, SERVICE_PORT))
            check(f"udp to closed port {CLOSED_PORT} (policy DROP)", False,
                  testbed.udp_reaches(src, dst, addr, CLOSED_PORT))
            check(f"udp to port {REJECTED_PORT} (REJECT)", True,
                  _refused(src, addr, REJECTED_PORT), ("port unreachable", "no answer"))
            for (table, chain, position), (packets, nbytes) in sorted(handle.counters().items()):
                where = "policy" if position == 0 else f"rule {position}"
                counters[f"{table}/{chain}/{where}"] = (packets, nbytes)
        say("counters (packets, bytes):")
        for key, (packets, nbytes) in counters.items():
            say(f"    {key:28} {packets:4} {nbytes:6}")
        say("after unloading:")
        check(f"udp to closed port {CLOSED_PORT}", True,
              testbed.udp_reaches(src, dst, addr, CLOSED_PORT))
    ok = all(s.ok for s in steps)
    if args.json:
        json.dump({"ok": ok,
                   "steps": [{"what": s.what, "expected": s.expected, "observed": s.observed}
                             for s in steps],
                   "counters": {k: list(v) for k, v in counters.items()}},
                  sys.stdout, indent=2)
        print()
    else:
        print("demo passed" if ok else "demo FAILED: a packet did not get the expected verdict")
    return 0 if ok else 1


@contextlib.contextmanager
def _responder(ns: str) -> Iterator[None]:
    """REJECT's responder in ``ns`` while the ruleset is loaded."""
    responder.sync(ns)
    try:
        yield
    finally:
        responder.stop(ns)


def _refused(ns_from: str, addr: str, port: int, timeout: float = 1.0) -> bool:
    """True when a UDP datagram from ``ns_from`` to ``addr``:``port`` is answered with ICMP
    port unreachable (the connected socket's next receive fails with ECONNREFUSED)."""
    with netns.entered(ns_from):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.settimeout(timeout)
        s.connect((addr, port))
        s.send(b"bpfilter-demo")
        try:
            s.recv(100)
        except OSError as e:
            return e.errno == errno.ECONNREFUSED
    return False
