"""Writer costs: publishing a 1-key change and a 1k-key batch, load time, memory.

The Writer runs in its own process (``worker.py writer``), instrumented around
``builder.apply`` / ``builder.parts`` / ``publisher.publish`` and the whole
observer (thread CPU via ``time.thread_time_ns`` of the watch thread, and wall
time). A 1k-key batch is one etcd transaction of 1000 puts (one revision, one
watch response, one publication). Values are rewritten with the same size.
"""

from __future__ import annotations

from typing import Any, Dict, List

from . import common
from .common import Child, median

MB = 1e6


def _summary(records: List[Dict[str, Any]], changed: int) -> Dict[str, Any]:
    recs = [r for r in records if r.get("changed") == changed]
    out: Dict[str, Any] = {"publications": len(recs)}
    for k in (
        "cpu_total",
        "wall_total",
        "cpu_apply",
        "wall_apply",
        "cpu_parts",
        "wall_parts",
        "cpu_publish",
        "wall_publish",
        "cpu_ks_apply",
        "wall_ks_apply",
    ):
        vals = [r[k] for r in recs if k in r]
        out[k + "_ms"] = median(vals) / 1e6 if vals else None
    return out


def run(ctx) -> Dict[str, Any]:
    cfg, st = ctx.cfg, ctx.settings
    w, client, reader = ctx.writer, ctx.client, ctx.reader
    r = common.rng(f"writer-{cfg.n}-{cfg.value_size}")
    w.ask("delay 0.03")
    w.ask("stats")  # drop what earlier scenarios caused
    version = 1000
    for _ in range(st.publish_1key_samples):
        i = r.randrange(cfg.n)
        version += 1
        rev = client.put(cfg.keys[i], common.make_value(i, cfg.value_size, version)).header.revision
        if not reader.wait_for_revision(rev, 30):
            raise TimeoutError(f"revision {rev} not published in 30 s")
    one = _summary(w.ask("stats")["records"], 1)
    batch_n = min(1000, cfg.n)
    for _ in range(st.publish_1k_samples):
        version += 1
        idx = r.sample(range(cfg.n), batch_n)
        common.put_batch(client, [(cfg.keys[i], common.make_value(i, cfg.value_size, version)) for i in idx])
        rev = client.get_response(cfg.keys[idx[0]]).header.revision
        if not reader.wait_for_revision(rev, 60):
            raise TimeoutError(f"revision {rev} not published in 60 s")
    stats = w.ask("stats")
    many = _summary(stats["records"], batch_n)

    # KeySpace.load alone, in a fresh process (what a Writer's start and every reload cost).
    loader = Child("load", cfg.endpoint, cfg.prefix)
    try:
        load = loader.read(600)
    finally:
        loader.close()
    ready = ctx.writer_ready
    return {
        "keys": cfg.n,
        "value_size": cfg.value_size,
        "batch": batch_n,
        "one_key": one,
        "batch_keys": many,
        "load_s": load["wall"],
        "load_cpu_s": load["cpu"],
        "load_rss_mb": load["mem"]["rss"] / MB,
        "writer_start_s": ready["load"]["wall"] / 1e9,
        "writer_first_publish_ms": ((ready["load"]["publish"] or {}).get("wall_total", 0)) / 1e6,
        "writer_rss_mb": ready["mem"]["rss"] / MB,
        "writer_anon_mb": ready["mem"].get("anon", 0) / MB,  # the Writer's heap, without shared memory
        "writer_shmem_mb": ready["mem"].get("shmem", 0) / MB,
        "writer_rss_end_mb": stats["mem"]["rss"] / MB,
        "writer_anon_end_mb": stats["mem"].get("anon", 0) / MB,
        "image_mb": ready["image_bytes"] / MB,
    }
