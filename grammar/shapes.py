"""The shape grammar: a rule line's words abstracted to a shape, parsed once into a template."""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedEOF, UnexpectedInput, UnexpectedToken

RULE_COMMANDS = frozenset({"-A", "-C", "-I", "-D", "-R"})


@functools.cache
def grammar_text() -> str:
    """The shape grammar (grammar/iptables.lark)."""
    return resources.files("bpfilter.grammar").joinpath("iptables.lark").read_text()


# More options for Lark, set by the system layer before the first parse (bpfilter.lark_cache
# names a file caching the built tables there); none here: this package does no I/O.
LARK_OPTIONS: dict[str, Any] = {}


@functools.cache
def lark_parser() -> Lark:
    return Lark(grammar_text(), parser="lalr", lexer="contextual", maybe_placeholders=False,
                **LARK_OPTIONS)


@dataclass(frozen=True, slots=True)
class Item:
    """One option of a line: name as written (normalised), negation, argument indices."""

    opt: str
    neg: bool
    args: tuple[int, ...]
    index: int  # word index of the option itself


@dataclass(frozen=True, slots=True, eq=False)
class Template:
    command: str
    cmd_index: int
    cmd_args: tuple[int, ...]
    items: tuple[Item, ...]
    # Picks the words that decide how a rule line resolves (-m/-j/-g/-p arguments);
    # None when the line has options the fast rule path does not handle.
    static: Callable[[list[str]], object] | None = None
    static_n: int = 0
    family_flags: frozenset[str] = frozenset()  # "-4"/"-6" on the line


def shape_word(text: str) -> str:
    if text == "!":
        return "!"
    if len(text) > 1 and text[0] == "-" and " " not in text and "\t" not in text:
        return text
    return "V"


class ShapeError(Exception):
    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index
        self.message = message


def build_template(shape: tuple[str, ...]) -> Template:
    """Parse one line shape with the grammar into a template (cached by the caller)."""
    text = " ".join(shape)
    starts = []
    pos = 0
    for s in shape:
        starts.append(pos)
        pos += len(s) + 1
    index_of = {p: i for i, p in enumerate(starts)}
    try:
        tree = lark_parser().parse(text)
    except UnexpectedInput as e:
        raise _shape_error(e, shape, index_of) from None
    command = ""
    cmd_index = -1
    cmd_args: tuple[int, ...] = ()
    items: list[Item] = []
    assert isinstance(tree, Tree)
    for node in tree.children:
        assert isinstance(node, Tree)
        toks = [t for t in node.scan_values(lambda v: isinstance(v, Token))]
        idx = [index_of[t.start_pos] for t in toks]  # type: ignore[index]
        if node.data in ("chain_cmd", "chain_num_cmd", "replace_cmd", "optchain_cmd",
                         "new_cmd", "two_cmd"):
            command = str(toks[0])
            cmd_index = idx[0]
            cmd_args = tuple(idx[1:])
            continue
        # A leading "!" negates the option; any other "!" is an argument word.
        neg = toks[0].type == "BANG"
        rest = list(zip(toks, idx, strict=True))[1 if neg else 0:]
        opt_tok, opt_i = rest[0]
        items.append(Item(str(opt_tok), neg, tuple(i for _, i in rest[1:]), opt_i))
    static_idx = []
    plannable = command in RULE_COMMANDS
    for item in items:
        if item.opt in ("-m", "-j", "-g", "-p"):
            static_idx.append(item.args[0])
        elif item.opt in ("-c", "-t", "-4", "-6", "-v", "-n", "-x", "--line-numbers"):
            plannable = False
    static = None
    if plannable:
        static = operator.itemgetter(*static_idx) if static_idx else (lambda texts: ())
    flags = frozenset(it.opt for it in items if it.opt in ("-4", "-6"))
    return Template(command, cmd_index, cmd_args, tuple(items), static, len(static_idx),
                     flags)


def _shape_error(e: UnexpectedInput, shape: tuple[str, ...], index_of: dict[int, int]
                 ) -> ShapeError:
    if isinstance(e, UnexpectedEOF) or (
        isinstance(e, UnexpectedToken) and e.token.type == "$END"
    ):
        last = len(shape) - 1
        if last < 0:
            return ShapeError(0, "no command specified")
        opt = shape[last]
        if opt.startswith("-") or opt == "!":
            return ShapeError(last, f"option \"{opt}\" requires an argument")
        return ShapeError(last, "no command specified")
    pos = e.pos_in_stream if e.pos_in_stream is not None else 0
    if isinstance(e, UnexpectedToken):
        pos = e.token.start_pos if e.token.start_pos is not None else pos
    i = index_of.get(pos, 0)
    word = shape[i]
    if word.startswith("-") and len(word) > 1:
        cmds = {"-A", "-C", "-D", "-I", "-R", "-F", "-X", "-Z", "-L", "-S", "-N", "-E", "-P"}
        if word in cmds:
            return ShapeError(i, "only one command may be given")
        return ShapeError(i, f"unknown option \"{word}\"")
    return ShapeError(i, "Bad argument `{}'")


@functools.lru_cache(maxsize=4096)
def template(shape: tuple[str, ...]) -> Template:
    return build_template(shape)


