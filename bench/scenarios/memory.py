"""Memory per process: shared-memory readers vs per-process in-process mirrors.

``Settings.memory_procs`` (8) processes of each kind run at once, then psutil reads each one's
``memory_full_info()``: PSS (shared pages divided among their mappers: a reader's
PSS includes its share of the snapshot and of the libraries) and USS (pages only
that process maps: what one more such process adds to the host).

* reader: ``Reader(cache_size=...)`` that has got every key once (so every page
  of the snapshot is mapped and the per-reader cache is full), then idles;
* mirror: a dict of every key -> decoded value, unpacked from a Reader that is
  then closed (what each worker holds when it mirrors etcd itself);
* idle: the same imports, holding nothing (the interpreter's own cost).

"extra" memory of a process = its USS minus the idle process's USS; the target
compares an extra reader with an extra mirror. The benchmark process closes its
own Readers first, so the snapshot pages are shared by the Writer and the readers
only while they are counted.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List

from .common import Child, close_all, median, pss_bytes

MB = 1e6


def _group(args: List[str], count: int) -> Dict[str, Any]:
    """Run ``count`` children at once; median PSS/USS/RSS once all are ready."""
    children: List[Child] = []
    try:
        for _ in range(count):
            children.append(Child(*args))
        for c in children:
            c.read(900)
        time.sleep(0.2)
        mems = [pss_bytes(c.pid) for c in children]
    finally:
        close_all(children)
    return {k: median([m[k] for m in mems]) for k in ("pss", "uss", "rss")}


def run(ctx) -> List[Dict[str, Any]]:
    cfg, st = ctx.cfg, ctx.settings
    ctx.close_readers()
    try:
        idle = _group(["idle"], st.memory_procs)
        mirror = _group(["mirror", cfg.name], st.memory_procs)
        readers = {
            cache: _group(["hold", cfg.name, str(cache), cfg.prefix, str(cfg.n)], st.memory_procs)
            for cache in (256, 4096, 0)
        }
    finally:
        ctx.open_readers()
    mirror_cost = mirror["uss"] - idle["uss"]
    rows = []
    for cache, rd in readers.items():
        extra = rd["uss"] - idle["uss"]
        rows.append(
            {
                "keys": cfg.n,
                "value_size": cfg.value_size,
                "reader_cache": cache,
                "procs": st.memory_procs,
                "reader_pss_mb": rd["pss"] / MB,
                "reader_uss_mb": rd["uss"] / MB,
                "mirror_pss_mb": mirror["pss"] / MB,
                "mirror_uss_mb": mirror["uss"] / MB,
                "reader_rss_mb": rd["rss"] / MB,
                "mirror_rss_mb": mirror["rss"] / MB,
                "idle_pss_mb": idle["pss"] / MB,
                "idle_uss_mb": idle["uss"] / MB,
                "extra_reader_mb": extra / MB,
                "mirror_mb": mirror_cost / MB,
                "pct_of_mirror": 100.0 * extra / mirror_cost if mirror_cost > 0 else float("nan"),
                # PSS view: a reader's PSS above an idle process (includes its 1/(readers+1)
                # share of the snapshot) as % of a mirror's PSS above an idle process.
                "pss_pct_of_mirror": (
                    100.0 * (rd["pss"] - idle["pss"]) / (mirror["pss"] - idle["pss"])
                    if mirror["pss"] > idle["pss"]
                    else float("nan")
                ),
                "image_mb": ctx.image_bytes / MB,
            }
        )
    return rows
