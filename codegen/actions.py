"""The target table: how each extension target (``-j REJECT``, ``-j LOG``...) compiles, per hook.

Verdicts (ACCEPT, DROP, RETURN) and jumps/gotos to user chains are the compiler's own
(codegen/compiler ``_action``); every other target is described here once, like the matches
in codegen/matchers. An action's code runs after the rule's counter was updated:

- a *terminal* action ends every path with a verdict (``nf.verdict``), as iptables' REJECT;
- a non-terminal one (LOG, NFLOG, MARK) falls through, so the next rule runs, as iptables'
  XT_CONTINUE.

Modules with target emitters (codegen/log, codegen/reject...) define their ``Action`` entries in
a module-level ``ACTIONS`` tuple and are named once in ``_MODULES``; ``actions()`` gathers them
on first use (the modules import this one, so this one imports them lazily).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from bpfilter.codegen import flavor_netfilter as nf
from bpfilter.codegen.matchers import ALL_HOOKS, BOTH_FAMILIES, Emitter
from bpfilter.codegen.uapi import Hook
from bpfilter.ir.model import Rule, Target

EmitAction = Callable[[Emitter, Rule, Target], None]


@dataclass(frozen=True, slots=True)
class Action:
    """How one extension target compiles: its code, the options it understands, where it runs."""

    name: str
    emit: EmitAction
    options: frozenset[str] = frozenset()
    hooks: frozenset[Hook] = ALL_HOOKS
    families: frozenset[int] = BOTH_FAMILIES
    needs: nf.Needs = nf.Needs()
    check: Callable[[Target], str | None] | None = None  # a refusal, or None
    terminal: bool = True
    why_not: str = ""  # the reason it cannot run at hooks outside ``hooks``, if any

    def refusal(self, t: Target, family: int, hook: Hook | None = None) -> str | None:
        """Why this target cannot compile (for ``family`` at ``hook``), or None."""
        if family not in self.families:
            return f"target '{self.name}' is not supported for IPv{family}"
        if hook is not None and hook not in self.hooks:
            why = f": {self.why_not}" if self.why_not else ""
            return f"target '{self.name}' is not supported at hook {hook.name}{why}"
        for o in t.options:
            if o.name not in self.options:
                return f"target '{self.name}' option '{o.name}' is not supported"
        return self.check(t) if self.check is not None else None


# Modules defining ``ACTIONS: tuple[Action, ...]``.
_MODULES: tuple[str, ...] = ("bpfilter.codegen.flavor_tc", "bpfilter.codegen.log",
                             "bpfilter.codegen.reject")


@functools.cache
def actions() -> Mapping[str, Action]:
    """Every extension target the compiler supports, by name."""
    out: dict[str, Action] = {}
    for name in _MODULES:
        for a in importlib.import_module(name).ACTIONS:
            if a.name in out:
                raise ValueError(f"target {a.name!r} defined twice")
            out[a.name] = a
    return out
