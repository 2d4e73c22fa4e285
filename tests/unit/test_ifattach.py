"""Pin names of interface attachments (bpfilter.ifattach): unique per hook, device and IP
version, and parsed back exactly (device names may hold '-', '.', '@' but never ':')."""

from __future__ import annotations

import pytest

from bpfilter import ifattach
from bpfilter.codegen.uapi import IfHook


@pytest.mark.parametrize("dev", ["eth0", "veth-b", "br.100", "a@b", "x" * 15])
@pytest.mark.parametrize("hook", list(IfHook))
@pytest.mark.parametrize("family", [4, 6])
def test_link_pin_round_trip(dev: str, hook: IfHook, family: int) -> None:
    key = ifattach.Key(hook, dev, family)
    m = ifattach._PIN.match(key.pin("link"))
    assert m is not None
    assert ifattach.Key(ifattach.BY_NAME[m.group(1)], m.group(2),
                        4 if m.group(3) == "ip" else 6) == key
    assert not ifattach._PIN.match(key.pin("text"))
    assert not ifattach._PIN.match(key.pin("map-counters"))


def test_pins_do_not_look_like_table_generations() -> None:
    # state._clear_generations removes pins named like ip-filter-g3-...: never ours.
    from bpfilter import state

    for hook in IfHook:
        assert not state._GEN_PIN.match(ifattach.Key(hook, "ip-filter-g3-x", 4).pin("text"))
