"""The random ruleset generator: reproducible, honours its feature set, family and size."""

from __future__ import annotations

import re

import pytest
from iptgen import FEATURES, GenOptions, GenRule, generate, quote

SEEDS = range(300)


def _unquoted(text: str) -> str:
    """The text with every double-quoted word emptied (comments may contain anything)."""
    return re.sub(r'"(?:\\.|[^"\\])*"', '""', text)


def test_same_seed_same_text_and_different_seeds_differ() -> None:
    assert generate(7).render() == generate(7).render()
    assert len({generate(s).render() for s in range(50)}) == 50


@pytest.mark.parametrize("family", [4, 6])
def test_size_and_family(family: int) -> None:
    other = re.compile(r"\b198\.1[89]\.\d" if family == 6 else r"2001:db8:")
    sizes = []
    for seed in SEEDS:
        rs = generate(seed, GenOptions(family=family, max_rules=40))
        text = rs.render()
        sizes.append(rs.rule_count)
        assert rs.rule_count <= 40
        assert not other.search(text), text
        assert text.endswith("COMMIT\n")
    # The budget is used: big rulesets appear, empty ones are rare.
    assert max(sizes) >= 30
    assert sum(s == 0 for s in sizes) < len(sizes) // 10


@pytest.mark.parametrize(("feature", "pattern"), [
    ("multiport", r"-m multiport"),
    ("conntrack", r"-m conntrack"),
    ("conntrack_options", r"--ct(proto|dir|origsrc|origdst|replsrc|repldst|status)"),
    ("comment", r"-m comment"),
    ("negation", r"(^| )! "),
    ("user_chains", r"^:U"),
    ("insert", r"^(\[\d+:\d+\] )?-I "),
    ("goto", r" -g "),
    ("extra_tables", r"^\*(nat|raw|mangle)"),
    ("iface_wildcard", r" -[io] \S*\+"),
    ("icmp", r"--icmp(v6)?-type"),
    ("tcp", r"-p (tcp|6) "),
    ("recent", r"-m recent"),
    ("hashlimit", r"-m hashlimit"),
    ("owner", r"-m owner"),
    ("tcp_option", r"--tcp-option"),
    ("mangle_targets", r"-j (DSCP|TOS|TTL|HL|CONNMARK|CHECKSUM|TCPMSS)\b"),
    ("nat_targets", r"-j (DNAT|SNAT|MASQUERADE|REDIRECT)\b"),
])
def test_every_feature_appears_and_trimming_removes_it(feature: str, pattern: str) -> None:
    rx = re.compile(pattern, re.M)
    full = [_unquoted(generate(s, GenOptions(family=4 + 2 * (s % 2))).render()) for s in SEEDS]
    assert any(rx.search(t) for t in full), f"{feature} never generated"
    trimmed = GenOptions(features=FEATURES - {feature})
    for s in SEEDS:
        text = _unquoted(generate(s, trimmed).render())
        assert not rx.search(text), f"{feature} still generated with seed {s}:\n{text}"


def test_no_mistakes_unless_asked() -> None:
    assert all(generate(s).mistakes == () for s in SEEDS)
    assert sum(bool(generate(s, GenOptions(invalid_rate=0.1)).mistakes) for s in SEEDS) > 200


def _loop(edges: dict[str, set[str]]) -> list[str] | None:
    """A jump cycle in `edges`, or None."""
    done: set[str] = set()

    def visit(chain: str, path: list[str]) -> list[str] | None:
        if chain in path:
            return path + [chain]
        if chain in done:
            return None
        for nxt in sorted(edges.get(chain, ())):
            found = visit(nxt, path + [chain])
            if found:
                return found
        done.add(chain)
        return None

    return next((c for c in (visit(ch, []) for ch in sorted(edges)) if c), None)


def _edges(table_body: tuple[GenRule | str, ...]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for item in table_body:
        if isinstance(item, GenRule) and item.target[:1] in (("-j",), ("-g",)):
            edges.setdefault(item.chain, set()).add(item.target[1])
    return edges


def test_user_chain_jumps_never_form_a_loop() -> None:
    for seed in SEEDS:
        for table in generate(seed).tables:
            assert _loop(_edges(table.body)) is None, f"seed {seed}"
    # The checker sees loops where the generator makes them on purpose.
    looped = [s for s in SEEDS if "loop through user chains" in
              generate(s, GenOptions(invalid_rate=0.3)).mistakes]
    assert any(_loop(_edges(t.body)) for s in looped
               for t in generate(s, GenOptions(invalid_rate=0.3)).tables)


@pytest.mark.parametrize(("token", "quoted"), [
    ("plain", "plain"),
    ("two words", '"two words"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("a\\b", '"a\\\\b"'),
    ("it's", '"it\'s"'),
    ("", '""'),
])
def test_quote(token: str, quoted: str) -> None:
    assert quote(token) == quoted
