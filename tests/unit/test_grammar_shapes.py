"""The shape grammar: option arity, templates, errors, and each shape parsed only once."""

from __future__ import annotations

import re

import pytest

from bpfilter.grammar import iptables
from bpfilter.grammar.iptables import parse_restore
from bpfilter.grammar.shapes import ShapeError, grammar_text, shape_word, template
from bpfilter.ir.matches import MATCHES
from bpfilter.ir.targets import TARGETS


def test_every_table_option_is_in_the_grammar() -> None:
    """Option arity lives only in the grammar; the extension table must not know others."""
    in_grammar = set(re.findall(r'"(--?[a-zA-Z0-9-]+)"', grammar_text()))
    for ext in [*MATCHES.values(), *TARGETS.values()]:
        for opt in ext.options:
            assert opt in in_grammar, f"{ext.name}: {opt} missing from iptables.lark"


def test_shape_words() -> None:
    assert [shape_word(w) for w in ["-A", "INPUT", "!", "-", "--comment", "a b", "-1"]] == \
        ["-A", "V", "!", "V", "--comment", "V", "-1"]


def test_template_records_options_negation_and_argument_positions() -> None:
    tpl = template(("-A", "V", "!", "-s", "V", "--tcp-flags", "V", "V", "-j", "V"))
    assert (tpl.command, tpl.cmd_args) == ("-A", (1,))
    assert [(i.opt, i.neg, i.args) for i in tpl.items] == [
        ("-s", True, (4,)), ("--tcp-flags", False, (6, 7)), ("-j", False, (9,))]
    # "!" after an option is that option's argument, not a negation.
    (item,) = template(("-A", "V", "--comment", "!")).items
    assert (item.neg, item.args) == (False, (3,))


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        (("-A", "V", "--frob", "V"), 'unknown option "--frob"'),
        (("-A", "V", "-s"), 'option "-s" requires an argument'),
        (("-A", "V", "V"), "Bad argument"),
        (("-A", "V", "-I", "V"), "only one command"),
        ((), "no command specified"),
    ],
)
def test_shape_errors(shape: tuple[str, ...], message: str) -> None:
    with pytest.raises(ShapeError) as info:
        template.__wrapped__(shape)
    assert message in info.value.message


def test_shapes_are_parsed_once() -> None:
    text = "*filter\n" + "".join(f"-A INPUT -s 10.0.{i}.1 -j DROP\n" for i in range(50))
    template.cache_clear()
    iptables._FAST.clear()
    parse_restore(text + "COMMIT\n")
    assert template.cache_info().misses == 1
