"""IR -> JSON-ready dictionaries (for `bpfilter translate --to json`)."""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any

from bpfilter.ir.model import Prefix, Ruleset
from bpfilter.ir.values import format_prefix


def to_data(obj: object) -> Any:
    """A dataclass tree as plain dicts, lists, strings and numbers."""
    if isinstance(obj, Prefix):
        return format_prefix(obj)
    if isinstance(obj, enum.Enum):
        return obj.name if isinstance(obj.value, int) else obj.value
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_data(x) for x in obj]
    return obj


def to_json(ruleset: Ruleset, *, indent: int | None = 2) -> str:
    """The ruleset as a JSON document."""
    return json.dumps(to_data(ruleset), indent=indent) + "\n"
