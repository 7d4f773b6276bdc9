"""Update visibility: etcd put -> the new revision answered by a Reader in another process.

A probe key under the prefix is put (pyetcd, loopback) and the benchmark's Reader
polls ``revision`` every ~0.1 ms until it reaches the put's revision. Measured
from just before ``put`` to the first poll that sees it, with the Writer's apply
delay at 30 ms and at 0, idle and under background load: a separate process putting
to other keys under the prefix at a capped rate (bounded in count and time); and,
with the 30 ms delay, at the writer's default view grace (Writer(view_grace), 0.1 s)
and without one. The probe puts one key after another, each once the last is
visible: back-to-back updates, the case a grace costs most (a publication waits
until the buffer it writes has rested the grace).
"""

from __future__ import annotations

import time
from typing import Any, Dict, List

from . import common
from .common import Child, median, percentile

MAX_SAMPLE_SECONDS = 45.0


def _samples(ctx, count: int) -> Dict[str, List[float]]:
    cfg, client, reader = ctx.cfg, ctx.client, ctx.reader
    r = common.rng(f"vis-{cfg.n}-{cfg.value_size}")
    key = f"{cfg.prefix}/zzprobe"
    value = common.make_value(0, cfg.value_size)
    vis, put = [], []
    stop_at = time.monotonic() + MAX_SAMPLE_SECONDS
    for _ in range(count):
        time.sleep(r.uniform(0.002, 0.012))  # do not phase-lock with the writer's batching
        t0 = time.perf_counter_ns()
        rev = client.put(key, value).header.revision
        t1 = time.perf_counter_ns()
        deadline = time.monotonic() + 30
        while reader.revision < rev:
            if time.monotonic() > deadline:
                raise TimeoutError(f"revision {rev} not visible after 30 s")
            time.sleep(0.0001)
        t2 = time.perf_counter_ns()
        vis.append((t2 - t0) / 1e6)
        put.append((t1 - t0) / 1e6)
        if time.monotonic() > stop_at:
            break
    return {"vis": vis, "put": put}


GRACES = (0.1, 0.0)  # the writer's default view grace, and none


def run(ctx) -> List[Dict[str, Any]]:
    cfg, st, w = ctx.cfg, ctx.settings, ctx.writer
    rows = []
    for delay, grace in [(0.030, g) for g in GRACES] + [(0.0, 0.0)]:
        w.ask(f"delay {delay}")
        w.ask(f"grace {grace}")
        for load in (False, True):
            loader = None
            achieved = None
            try:
                if load:
                    max_s = MAX_SAMPLE_SECONDS + 30
                    loader = Child(
                        "loader",
                        cfg.endpoint,
                        cfg.prefix,
                        str(st.load_rate),
                        str(max_s),
                        str(int(st.load_rate * max_s)),
                    )
                    loader.read(120)
                    loader.send("go")
                    time.sleep(0.5)  # let the load reach its rate
                w.ask("stats")
                s = _samples(ctx, st.visibility_samples)
                pubs = w.ask("stats")["records"]
                shm = w.ask("shm")
                if loader is not None:
                    loader.send("stop")
                    achieved = loader.read(60)
            finally:
                if loader is not None:
                    loader.close()
            rows.append(
                {
                    "keys": cfg.n,
                    "value_size": cfg.value_size,
                    "apply_delay_ms": delay * 1e3,
                    "view_grace_ms": grace * 1e3,
                    "load": "loaded" if load else "idle",
                    "target_rate": st.load_rate if load else 0.0,
                    "achieved_rate": achieved["rate"] if achieved else 0.0,
                    "samples": len(s["vis"]),
                    "p50_ms": median(s["vis"]),
                    "p99_ms": percentile(s["vis"], 99),
                    "max_ms": max(s["vis"]),
                    "put_p50_ms": median(s["put"]),
                    "publications": len(pubs),
                    "publish_wall_p50_ms": median([p["wall_total"] for p in pubs]) / 1e6 if pubs else None,
                    "publish_keys_p50": median([p["changed"] or 0 for p in pubs]) if pubs else None,
                    "shm_bytes": shm["bytes"],
                    "buffers": shm["buffers"],
                }
            )
    w.ask("delay 0.03")
    w.ask(f"grace {GRACES[0]}")
    return rows
