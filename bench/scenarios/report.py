"""Turn one run's measurements into the target table, detail tables, JSON and a chart.

Every ratio compares numbers measured in the same run on the same data.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional

from . import reads

#: (id, description, limit) of each target of the issue.
TARGETS = [
    ("get_cold", "cold random get ≤ 0.5× py-lmdb (one long read txn + unpack)", 0.5),
    ("get_repeated", "repeated get ≤ 1.5× a dict", 1.5),
    ("range100", "range of 100 ≤ 0.5× py-lmdb cursor + unpack (one long txn)", 0.5),
    ("prefix100", "prefix listing (~100) ≤ 0.5× py-lmdb cursor + unpack (one long txn)", 0.5),
    ("pss_extra_reader", "PSS per extra reader ≤ 5 % of a per-process mirror", 5.0),
    ("visibility_p50", "visibility p50 ≤ apply delay + 5 ms", 5.0),
    ("publish_1key", "1-key publish at 100k keys ≤ 10 ms writer CPU", 10.0),
]


def _vs(n: int) -> str:
    return f"{n:,}"


def fmt(x: Optional[float], digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    if mag >= digits - 1:
        return f"{x:,.0f}"
    return f"{x:.{max(0, digits - 1 - mag)}f}"


def _read(rows: List[Dict[str, Any]], scenario: str, n: int, vs: int, system: str) -> Optional[float]:
    for r in rows:
        if (r["scenario"], r["keys"], r["value_size"], r["system"]) == (scenario, n, vs, system):
            return r["us"]
    return None


def compute_targets(res: Dict[str, Any]) -> List[Dict[str, Any]]:
    out = []

    def add(tid, n, vs, variant, value, unit, peer, peer_value, ratio, limit, limit_text):
        met = None if ratio is None and value is None else ((ratio if ratio is not None else value) <= limit)
        out.append(
            {
                "id": tid,
                "description": dict((t[0], t[1]) for t in TARGETS)[tid],
                "keys": n,
                "value_size": vs,
                "variant": variant,
                "value": value,
                "unit": unit,
                "peer": peer,
                "peer_value": peer_value,
                "ratio": ratio,
                "limit": limit,
                "target": limit_text,
                "met": met,
            }
        )

    rr = res.get("reads", [])
    configs = sorted({(r["keys"], r["value_size"]) for r in rr})
    for n, vs in configs:
        for tid, peer, limit in (
            ("get_cold", reads.LMDB_LONG, 0.5),
            ("get_repeated", reads.DICT, 1.5),
            ("range100", reads.LMDB_LONG, 0.5),
            ("prefix100", reads.LMDB_LONG, 0.5),
        ):
            a, b = _read(rr, tid, n, vs, reads.SHM), _read(rr, tid, n, vs, peer)
            ratio = a / b if a is not None and b else None
            add(tid, n, vs, "", a, "µs", peer, b, ratio, limit, f"≤ {limit:g}× {peer}")
    for m in res.get("memory", []):
        add(
            "pss_extra_reader",
            m["keys"],
            m["value_size"],
            f"reader cache_size={m['reader_cache']}",
            m["extra_reader_mb"],
            "MB",
            "per-process mirror",
            m["mirror_mb"],
            None,
            5.0,
            "≤ 5 % of mirror",
        )
        out[-1]["ratio_pct"] = m["pct_of_mirror"]
        out[-1]["pss_pct"] = m["pss_pct_of_mirror"]
        out[-1]["met"] = m["pct_of_mirror"] <= 5.0 if not math.isnan(m["pct_of_mirror"]) else None
    for v in res.get("visibility", []):
        # back-to-back updates wait out the view grace (bench/scenarios/visibility.py)
        limit = max(v["apply_delay_ms"], v.get("view_grace_ms", 0.0)) + 5.0
        add(
            "visibility_p50",
            v["keys"],
            v["value_size"],
            f"delay {v['apply_delay_ms']:g} ms, grace {v.get('view_grace_ms', 0.0):g} ms, {v['load']}",
            v["p50_ms"],
            "ms",
            None,
            None,
            None,
            limit,
            f"≤ {limit:g} ms",
        )
    for w in res.get("writer", []):
        add(
            "publish_1key",
            w["keys"],
            w["value_size"],
            "",
            w["one_key"]["cpu_total_ms"],
            "ms CPU",
            None,
            None,
            None,
            10.0,
            "≤ 10 ms",
        )
    return out


def _table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _met(m: Optional[bool]) -> str:
    return "—" if m is None else ("yes" if m else "**no**")


def markdown(res: Dict[str, Any]) -> str:
    meta = res["meta"]
    parts = [
        "# shmkeyspace benchmarks",
        "",
        f"`{meta['command']}` — {meta['started']}, {meta['duration_s']:.0f} s; {meta['machine']}; "
        f"Python {meta['python']}; etcd {meta['versions'].get('etcd', '?')}; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if k != "etcd")
        + f"; entries unpacked with `{meta.get('unpacker', '?')}` (Reader and lmdb alike).",
        "",
        "Every ratio compares numbers measured in this run on the same data "
        "(ratio < 1 means shmkeyspace is faster / smaller).",
        "",
        "## Targets",
        "",
    ]
    trow = []
    for t in res["targets"]:
        if t["ratio"] is not None:
            shown = f"{fmt(t['value'])} {t['unit']}"
            ratio = f"{t['ratio']:.2f}× ({fmt(t['peer_value'])} {t['unit']})"
        elif t["id"] == "pss_extra_reader":
            shown = f"{fmt(t['value'])} MB"
            ratio = f"{fmt(t['ratio_pct'])} % of {fmt(t['peer_value'])} MB (PSS view: {fmt(t['pss_pct'])} %)"
        else:
            shown = f"{fmt(t['value'])} {t['unit']}"
            ratio = "—"
        desc = t["description"].split(" ≤")[0]
        if t["variant"]:
            desc += f" ({t['variant']})"
        trow.append([desc, _vs(t["keys"]), str(t["value_size"]), shown, ratio, t["target"], _met(t["met"])])
    parts.append(_table(["what", "keys", "value B", "shmkeyspace", "vs peer", "target", "met?"], trow))

    rr = res.get("reads", [])
    if rr:
        parts += ["", "## Reads (µs per operation, median of repeats)", ""]
        systems = [s for s in reads.SYSTEMS if any(r["system"] == s for r in rr)]
        rows = []
        for scen in reads.SCENARIOS:
            for n, vs in sorted({(r["keys"], r["value_size"]) for r in rr}):
                vals = {s: _read(rr, scen, n, vs, s) for s in systems}
                shm, lm, d = vals.get(reads.SHM), vals.get(reads.LMDB_LONG), vals.get(reads.DICT)
                py = vals.get(reads.SHM_PY)
                row = [scen, _vs(n), str(vs)] + [fmt(vals[s]) for s in systems]
                row.append(f"{shm / lm:.2f}×" if shm and lm else "—")
                row.append(f"{py / lm:.2f}×" if py and lm else "—")
                row.append(f"{shm / d:.1f}×" if shm and d else "—")
                rows.append(row)
        parts.append(
            _table(
                ["scenario", "keys", "value B"]
                + systems
                + ["shmks ÷ lmdb long txn", "python path ÷ lmdb long txn", "shmks ÷ dict"],
                rows,
            )
        )
        parts += ["", "How each system answers:", ""]
        for sysname in systems:
            if sysname == reads.SMD:
                continue
            notes = []
            for scen in reads.SCENARIOS:
                note = next(
                    (r["note"] for r in rr if r["system"] == sysname and r["scenario"] == scen and r["note"]),
                    None,
                )
                if note:
                    notes.append(f"{scen}: {note}")
            if notes:
                parts.append(f"* **{sysname}**: " + "; ".join(notes))
        smd = [
            f"{_vs(r['keys'])}×{r['value_size']} B {r['scenario']}: {r['note']}"
            for r in rr
            if r["system"] == reads.SMD and r["note"] and r["scenario"].startswith("get")
        ]
        if smd:
            parts.append(
                f"* **{reads.SMD}**: pickle serializer, one shared block; range/prefix: — (no ordered "
                "queries). " + "; ".join(smd)
            )

    sc = res.get("scaling", [])
    if sc:
        parts += ["", "## Reader processes (random gets, lookups/s summed over processes)", ""]
        rows = []
        for n, vs in sorted({(r["keys"], r["value_size"]) for r in sc}):
            for p in sorted({r["procs"] for r in sc}):
                a = next(
                    (
                        r
                        for r in sc
                        if (r["keys"], r["value_size"], r["procs"], r["system"]) == (n, vs, p, "shmkeyspace")
                    ),
                    None,
                )
                b = next(
                    (
                        r
                        for r in sc
                        if (r["keys"], r["value_size"], r["procs"], r["system"]) == (n, vs, p, "lmdb txn/op")
                    ),
                    None,
                )
                rows.append(
                    [
                        _vs(n),
                        str(vs),
                        str(p),
                        fmt(a and a["ops_per_s"]),
                        fmt(b and b["ops_per_s"]),
                        f"{a['ops_per_s'] / b['ops_per_s']:.2f}×" if a and b else "—",
                    ]
                )
        parts.append(
            _table(["keys", "value B", "processes", "shmkeyspace", "lmdb txn/op", "shmks ÷ lmdb"], rows)
        )
        parts += [
            "",
            "Each process: random gets over all keys with `Reader(cache_size=0)` (lookups, not the cache) "
            "or lmdb with a read txn per get, for "
            f"{res['meta']['settings']['scaling_seconds']:g} s after a common start. "
            f"{res['meta'].get('cpus', '?')} CPUs: beyond that many processes the total cannot grow.",
        ]

    mem = res.get("memory", [])
    if mem:
        parts += ["", "## Memory per process (PSS, psutil `memory_full_info().pss`)", ""]
        rows = [
            [
                _vs(m["keys"]),
                str(m["value_size"]),
                str(m["reader_cache"]),
                fmt(m["reader_pss_mb"]),
                fmt(m["mirror_pss_mb"]),
                fmt(m["idle_pss_mb"]),
                f"{fmt(m['pss_pct_of_mirror'])} %",
                fmt(m["extra_reader_mb"]),
                fmt(m["mirror_mb"]),
                f"{fmt(m['pct_of_mirror'])} %",
                fmt(m["image_mb"]),
            ]
            for m in mem
        ]
        procs = mem[0]["procs"]
        parts.append(
            _table(
                [
                    "keys",
                    "value B",
                    "reader cache",
                    f"PSS/reader ({procs} readers)",
                    f"PSS/mirror ({procs} mirrors)",
                    "PSS/idle proc",
                    "PSS above idle: reader ÷ mirror",
                    "extra reader (USS)",
                    "extra mirror (USS)",
                    "extra reader ÷ extra mirror",
                    "snapshot image",
                ],
                rows,
            )
        )
        parts += [
            "",
            f"MB (10^6 bytes); {procs} processes of each kind at once, medians. PSS splits shared pages "
            f"among their mappers, so a reader's PSS holds 1/{procs + 1} of the snapshot (shared with "
            'the other readers and the Writer) and a share of the libraries. "extra" = USS (pages '
            "only that process maps) minus an idle process's USS (same imports, no data): what one more "
            "reader or mirror adds to the host. A reader's extra memory is mostly its per-reader cache "
            "of decoded entries (compare cache 256 - the default -, 4096 and 0).",
        ]

    vis = res.get("visibility", [])
    if vis:
        parts += ["", "## Update visibility (etcd put → new revision seen by a Reader)", ""]
        rows = [
            [
                _vs(v["keys"]),
                str(v["value_size"]),
                f"{v['apply_delay_ms']:g} / {v.get('view_grace_ms', 0.0):g}",
                v["load"] + (f" ({v['achieved_rate']:.0f} puts/s)" if v["load"] == "loaded" else ""),
                str(v["samples"]),
                fmt(v["p50_ms"]),
                fmt(v["p99_ms"]),
                fmt(v["put_p50_ms"]),
                fmt(v["publish_wall_p50_ms"]),
                f"{v['shm_bytes'] / 1e6:.1f} ({v['buffers']})" if "shm_bytes" in v else "—",
                f"≤ {max(v['apply_delay_ms'], v.get('view_grace_ms', 0.0)) + 5:g}",
                _met(v["p50_ms"] <= max(v["apply_delay_ms"], v.get("view_grace_ms", 0.0)) + 5),
            ]
            for v in vis
        ]
        parts.append(
            _table(
                [
                    "keys",
                    "value B",
                    "apply delay / view grace ms",
                    "background",
                    "samples",
                    "p50 ms",
                    "p99 ms",
                    "put RTT p50 ms",
                    "publish wall p50 ms",
                    "/dev/shm MB (buffers)",
                    "target p50",
                    "met?",
                ],
                rows,
            )
        )

    wr = res.get("writer", [])
    if wr:
        parts += ["", "## Writer", ""]
        rows = []
        for w in wr:
            o, b = w["one_key"], w["batch_keys"]
            rows.append(
                [
                    _vs(w["keys"]),
                    str(w["value_size"]),
                    f"{fmt(o['cpu_total_ms'])} ({fmt(o['cpu_apply_ms'])} / {fmt(o['cpu_parts_ms'])} / "
                    f"{fmt(o['cpu_publish_ms'])})",
                    fmt(o["wall_total_ms"]),
                    f"{fmt(b['cpu_total_ms'])} ({fmt(b['cpu_apply_ms'])} / {fmt(b['cpu_parts_ms'])} / "
                    f"{fmt(b['cpu_publish_ms'])})",
                    fmt(b["wall_total_ms"]),
                    fmt(b["cpu_ks_apply_ms"]),
                    fmt(w["load_s"]),
                    fmt(w["writer_start_s"]),
                    fmt(w["writer_rss_mb"]),
                    fmt(w["writer_anon_mb"]),
                    fmt(w["writer_anon_end_mb"]),
                    fmt(w["image_mb"]),
                ]
            )
        parts.append(
            _table(
                [
                    "keys",
                    "value B",
                    "1-key publish CPU ms (apply / parts / publish)",
                    "wall ms",
                    f"{wr[0]['batch']}-key publish CPU ms (apply / parts / publish)",
                    "wall ms",
                    "incl. decode CPU ms",
                    "KeySpace.load s",
                    "Writer start s",
                    "RSS MB",
                    "heap MB",
                    "heap end MB",
                    "image MB",
                ],
                rows,
            )
        )
        parts += [
            "",
            "CPU = thread CPU time of the Writer's watch thread around its KeySpace observer "
            '(`builder.apply` + `builder.parts` + `publisher.publish`); "incl. decode" adds '
            "KeySpace.apply (decode + pack of the changed values). KeySpace.load: a fresh process, "
            "pyetcd, paginated, JSON decoder. Writer start = load + first publication. RSS (after "
            "start) includes the shared-memory pages the Writer has written; heap = RssAnon (the "
            "Writer's private memory: KeySpace, ImageBuilder, ...), after start and at the end.",
            "",
            "A publication copies the header, the index (hash table, key order, fences: ~5 MB at 100k "
            "keys) and only the part of the append-only arena that the inactive buffer does not hold "
            "yet, so `publish` grows with the key count, not with the value bytes; a compaction "
            "(every ~n/4 changed keys) rewrites everything once.",
        ]
    errors = res.get("errors") or []
    if errors:
        parts += ["", "## Failed scenarios", ""]
        parts += [
            f"* {_vs(e['keys'])} keys × {e['value_size']} B, {e['scenario']}: {e['error']}" for e in errors
        ]
    return "\n".join(parts) + "\n"


def write(res: Dict[str, Any], out: str) -> Dict[str, str]:
    os.makedirs(out, exist_ok=True)
    paths = {"json": os.path.join(out, "results.json"), "md": os.path.join(out, "results.md")}
    with open(paths["json"] + ".tmp", "w") as f:
        json.dump(res, f, indent=1, sort_keys=True, default=str)
    os.replace(paths["json"] + ".tmp", paths["json"])
    with open(paths["md"] + ".tmp", "w") as f:
        f.write(markdown(res))
    os.replace(paths["md"] + ".tmp", paths["md"])
    png = chart(res, os.path.join(out, "results.png"))
    if png:
        paths["png"] = png
    return paths


def chart(res: Dict[str, Any], path: str) -> Optional[str]:
    """A PNG of the read latencies and reader scaling, if matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    rr = res.get("reads", [])
    sc = res.get("scaling", [])
    if not rr and not sc:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    if rr:
        n, vs = max((r["keys"], r["value_size"]) for r in rr)
        systems = [s for s in reads.SYSTEMS if s not in (reads.SMD,)]
        width = 0.8 / len(systems)
        ax = axes[0]
        for j, s in enumerate(systems):
            ys = [_read(rr, scen, n, vs, s) or 0 for scen in reads.SCENARIOS]
            ax.bar([i + j * width for i in range(len(reads.SCENARIOS))], ys, width, label=s)
        ax.set_yscale("log")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(reads.SCENARIOS))])
        ax.set_xticklabels(reads.SCENARIOS)
        ax.set_ylabel("µs per operation (log)")
        ax.set_title(f"reads, {n:,} keys × {vs} B")
        ax.legend(fontsize=7)
    if sc:
        ax = axes[1]
        n, vs = max((r["keys"], r["value_size"]) for r in sc)
        for s in sorted({r["system"] for r in sc}):
            pts = sorted(
                (r["procs"], r["ops_per_s"])
                for r in sc
                if r["system"] == s and (r["keys"], r["value_size"]) == (n, vs)
            )
            ax.plot([p for p, _ in pts], [v for _, v in pts], marker="o", label=s)
        ax.set_xlabel("reader processes")
        ax.set_ylabel("lookups/s (sum)")
        ax.set_title(f"random gets, {n:,} keys × {vs} B")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
