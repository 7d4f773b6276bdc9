"""Print bench/results/results.json's targets as one table (configurations as columns).

./run bench --only targets_table [results.json]     # the README's Benchmarks table
"""

import collections
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def main(argv=None) -> int:
    argv = list(argv or [])
    with open(argv[0] if argv else os.path.join(ROOT, "bench", "results", "results.json")) as f:
        d = json.load(f)
    cfgs = sorted({(t["keys"], t["value_size"]) for t in d["targets"]})
    rows = collections.OrderedDict()
    for t in d["targets"]:
        label = t["description"] + (f" ({t['variant']})" if t["variant"] else "")
        rows.setdefault(label, {})[(t["keys"], t["value_size"])] = t
    out = [
        "| target | " + " | ".join(f"{k // 1000}k × {v} B" for k, v in cfgs) + " |",
        "| --- |" + " ---: |" * len(cfgs),
    ]
    for label, m in rows.items():
        out.append(f"| {label} | " + " | ".join(cell(m.get(c)) for c in cfgs) + " |")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
