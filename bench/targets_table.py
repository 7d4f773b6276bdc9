#!/usr/bin/env python3
"""Print bench/results/results.json's targets as one table (configurations as columns).

python bench/targets_table.py [results.json]     # the README's Benchmarks table
"""

import collections
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
d = json.load(
    open(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "bench", "results", "results.json"))
)
cfgs = sorted({(t["keys"], t["value_size"]) for t in d["targets"]})
rows = collections.OrderedDict()
for t in d["targets"]:
    label = t["description"] + (f" ({t['variant']})" if t["variant"] else "")
    rows.setdefault(label, {})[(t["keys"], t["value_size"])] = t


def cell(t):
    if t is None:
        return "—"
    if t.get("ratio_pct") is not None:
        s = f"{t['ratio_pct']:.1f} % ({t['value']:.2f} of {t['peer_value']:.0f} MB)"
    elif t.get("ratio") is not None and t.get("peer"):
        s = f"{t['ratio']:.2f}×"
    else:
        s = f"{t['value']:.3g} {t['unit']}"
    return s if t["met"] else f"**{s}** ✗"


out = [
    "| target | " + " | ".join(f"{k // 1000}k × {v} B" for k, v in cfgs) + " |",
    "| --- |" + " ---: |" * len(cfgs),
]
for label, m in rows.items():
    out.append(f"| {label} | " + " | ".join(cell(m.get(c)) for c in cfgs) + " |")
print("\n".join(out))
