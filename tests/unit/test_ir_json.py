"""The IR as JSON: plain data, enums by name, prefixes as text."""

from __future__ import annotations

import json

from bpfilter.grammar.iptables import parse_restore
from bpfilter.ir.json import to_data, to_json


def test_json_has_tables_chains_rules_with_locations() -> None:
    rs = parse_restore("*filter\n:INPUT DROP [0:0]\n-A INPUT -s 10.0.0.0/8 -p tcp --dport 22 "
                       "-j ACCEPT\nCOMMIT\n")
    doc = json.loads(to_json(rs))
    (table,) = doc["tables"]
    assert (table["family"], table["name"]) == ("ip", "filter")
    inp = table["chains"][0]
    assert inp["name"] == "INPUT" and inp["hook"] == "LOCAL_IN" and inp["policy"] == "DROP"
    (rule,) = inp["rules"]
    assert rule["src"] == "10.0.0.0/8" and (rule["line"], rule["col"]) == (3, 1)
    assert rule["matches"][0]["kind"] == "tcp"
    assert rule["matches"][0]["options"][0]["value"] == {"lo": 22, "hi": 22}
    assert rule["target"] == {"kind": "verdict", "name": "ACCEPT", "options": []}


def test_to_data_passes_plain_values_through() -> None:
    assert to_data([1, "a", None, (2,)]) == [1, "a", None, [2]]
