"""IR -> JSON (for `bpfilter translate --to json`): one rule per line, streamed."""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Iterator
from typing import Any

from bpfilter.ir.model import Match, Prefix, Ruleset, Target
from bpfilter.ir.values import format_prefix


def to_data(obj: object, memo: dict[int, Any] | None = None) -> Any:
    """A dataclass tree as plain dicts, lists, strings and numbers.

    `memo` shares the conversion of matches and targets, which rules share in the IR.
    """
    if isinstance(obj, Prefix):
        return format_prefix(obj)
    if isinstance(obj, enum.Enum):
        return obj.name if isinstance(obj.value, int) else obj.value
    if isinstance(obj, (Match, Target)) and memo is not None:
        key = id(obj)
        if key not in memo:
            memo[key] = {n: to_data(getattr(obj, n), memo) for n in _names(type(obj))}
        return memo[key]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {n: to_data(getattr(obj, n), memo) for n in _names(type(obj))}
    if isinstance(obj, (tuple, list)):
        return [to_data(x, memo) for x in obj]
    return obj


_NAMES: dict[type, tuple[str, ...]] = {}


def _names(cls: type) -> tuple[str, ...]:
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def _head(obj: object, skip: str, memo: dict[int, Any]) -> str:
    """The object's fields except `skip`, as JSON members without the closing brace."""
    fields = dataclasses.fields(obj)  # type: ignore[arg-type]
    data = {f.name: to_data(getattr(obj, f.name), memo) for f in fields if f.name != skip}
    return json.dumps(data)[:-1]


def iter_json(ruleset: Ruleset) -> Iterator[str]:
    """The JSON document in pieces: tables and chains indented, one rule per line."""
    memo: dict[int, Any] = {}
    yield '{"tables": ['
    for ti, table in enumerate(ruleset.tables):
        yield ("," if ti else "") + "\n  " + _head(table, "chains", memo) + ', "chains": ['
        for ci, chain in enumerate(table.chains):
            yield ("," if ci else "") + "\n    " + _head(chain, "rules", memo) + ', "rules": ['
            for ri, rule in enumerate(chain.rules):
                yield ("," if ri else "") + "\n      " + json.dumps(to_data(rule, memo))
            yield "\n    ]}" if chain.rules else "]}"
        yield "\n  ]}" if table.chains else "]}"
    yield "\n]}\n" if ruleset.tables else "]}\n"


def to_json(ruleset: Ruleset) -> str:
    """The ruleset as a JSON document."""
    return "".join(iter_json(ruleset))
