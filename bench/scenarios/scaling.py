"""Aggregate random-get throughput with 1, 2, 4, 8 reader processes.

Each process runs random gets (``Reader(cache_size=0)``, or lmdb with a read txn
per get) for a fixed time after a common "go"; the throughputs are summed. Workers
are started once per system and reused for every process count.
"""

from __future__ import annotations

from typing import Any, Dict, List

from .common import Child, close_all

SYSTEMS = {"shmkeyspace": "reader", "lmdb txn/op": "lmdb"}


def run(ctx) -> List[Dict[str, Any]]:
    cfg, st = ctx.cfg, ctx.settings
    rows = []
    top = max(st.scaling_procs)
    for system, kind in SYSTEMS.items():
        target = cfg.name if kind == "reader" else ctx.lmdb.path
        workers = [Child("getloop", kind, target, cfg.prefix, str(cfg.n), f"{kind}-{i}") for i in range(top)]
        try:
            for w in workers:
                w.read(120)
            for p in st.scaling_procs:
                group = workers[:p]
                for w in group:
                    w.send(f"go {st.scaling_seconds}")
                res = [w.read(st.scaling_seconds + 120) for w in group]
                total = sum(x["ops"] / x["seconds"] for x in res)
                rows.append(
                    {
                        "keys": cfg.n,
                        "value_size": cfg.value_size,
                        "system": system,
                        "procs": p,
                        "ops_per_s": total,
                        "per_proc": total / p,
                        "seconds": st.scaling_seconds,
                    }
                )
        finally:
            close_all(workers)
    return rows
