"""Shared helpers of the benchmark: the data set, etcd seeding, timing, child processes.

The data set is deterministic: key ``i`` of a configuration is
``/bench/<n>x<size>/g<i // 100>/k<i>`` (so every ``g`` prefix holds exactly 100
keys, for the prefix-listing scenario) and its value is a JSON object of about
``size`` bytes. Children recompute the keys from (prefix, n) instead of
receiving them.
"""

from __future__ import annotations

import gc
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Sequence, Tuple

from shmkeyspace.children import JsonChild, child_env, close_all, median, memory, percentile, put_many

__all__ = ["close_all", "median", "percentile"]  # re-exported for the scenarios

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(BENCH_DIR)
WORKER = os.path.join(BENCH_DIR, "scenarios", "worker.py")
GROUP = 100  # keys per "g" prefix (prefix listing returns this many)
RANGE_LEN = 100  # keys per range query
SEED = 20240601


def config_prefix(n: int, value_size: int) -> str:
    return f"/bench/{n}x{value_size}"


def key_of(prefix: str, i: int) -> str:
    return f"{prefix}/g{i // GROUP:05d}/k{i:07d}"


def group_prefix(prefix: str, g: int) -> str:
    return f"{prefix}/g{g:05d}/"


def make_value(i: int, size: int, version: int = 0) -> bytes:
    """A JSON object of about ``size`` bytes (never less than the fixed fields)."""
    doc: Dict[str, Any] = {
        "id": i,
        "version": version,
        "host": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
        "port": 8000 + i % 1000,
        "weight": i % 7,
        "zone": f"z{i % 5}",
        "up": i % 3 != 0,
    }
    base = len(json.dumps(doc, separators=(",", ":"))) + len(',"pad":""')
    doc["pad"] = "x" * max(0, size - base)
    return json.dumps(doc, separators=(",", ":")).encode()


@dataclass
class Config:
    """One (key count, value size) configuration and the live things serving it."""

    n: int
    value_size: int
    prefix: str
    name: str  # shared-memory snapshot name
    endpoint: str = ""
    keys: List[str] = field(default_factory=list)
    writer: Any = None  # WriterProc
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Settings:
    """Iteration counts and durations (``--smoke`` shrinks them)."""

    repeats: int = 7  # interleaved across systems (time_interleaved)
    cold_keys: int = 20_000  # distinct keys per repeat (capped at n)
    repeated_iters: int = 20_000
    range_iters: int = 2_000
    etcd_iters: int = 500  # spread over the repeats
    etcd_range_iters: int = 150
    smd_budget_s: float = 2.0  # per shared-memory-dict measurement
    smd_max_iters: int = 200
    scaling_seconds: float = 2.0
    scaling_procs: Sequence[int] = (1, 2, 4, 8)
    memory_procs: int = 8
    visibility_samples: int = 150
    load_rate: float = 1000.0  # background puts/s for the visibility-under-load runs
    publish_1key_samples: int = 30
    publish_1k_samples: int = 5


def smoke_settings() -> Settings:
    return Settings(
        repeats=2,
        cold_keys=1000,
        repeated_iters=2000,
        range_iters=100,
        etcd_iters=40,
        etcd_range_iters=10,
        smd_budget_s=0.3,
        smd_max_iters=20,
        scaling_seconds=0.3,
        scaling_procs=(1, 2, 4, 8),
        memory_procs=8,
        visibility_samples=12,
        load_rate=300.0,
        publish_1key_samples=4,
        publish_1k_samples=2,
    )


# -- timing -----------------------------------------------------------------------


def time_loop(fn: Callable[[Any], Any], args_per_repeat: Sequence[Sequence[Any]]) -> List[float]:
    """ns per call of ``fn(a)`` for each repeat's argument list (gc off while timing, as timeit)."""
    out = []
    for args in args_per_repeat:
        was = gc.isenabled()
        gc.disable()
        try:
            t0 = time.perf_counter_ns()
            for a in args:
                fn(a)
            t1 = time.perf_counter_ns()
        finally:
            if was:
                gc.enable()
        out.append((t1 - t0) / max(1, len(args)))
    return out


def time_batches(
    fn: Callable[[Sequence[Any]], Any], args_per_repeat: Sequence[Sequence[Any]], batch: int
) -> List[float]:
    """ns per item when ``fn`` is called on consecutive batches of ``batch`` items."""
    out = []
    for args in args_per_repeat:
        chunks = [args[i : i + batch] for i in range(0, len(args), batch)]
        gc.disable()
        try:
            t0 = time.perf_counter_ns()
            for c in chunks:
                fn(c)
            t1 = time.perf_counter_ns()
        finally:
            gc.enable()
        out.append((t1 - t0) / max(1, len(args)))
    return out


def time_interleaved(
    jobs: Dict[str, Tuple[Callable[[Sequence[Sequence[Any]]], List[float]], Sequence[Sequence[Any]]]],
) -> Dict[str, List[float]]:
    """Run repeat r of every job before repeat r+1 of any (round robin).

    ``jobs``: {system: (timer, args_per_repeat)} with ``timer`` like
    :func:`time_loop`. On a shared machine, slow phases then hit every system
    alike instead of whichever one happened to be measured during them, which
    keeps the ratios honest.
    """
    out: Dict[str, List[float]] = {k: [] for k in jobs}
    for r in range(max(len(a) for _, a in jobs.values())):
        for k, (timer, args) in jobs.items():
            if r < len(args):
                out[k] += timer([args[r]])
    return out


def time_budget(
    fn: Callable[[Any], Any], args: Sequence[Any], budget_s: float, min_iters: int = 3
) -> Dict[str, Any]:
    """Call ``fn`` on ``args`` until ``budget_s`` passes (at least ``min_iters``); per-call ns."""
    samples = []
    deadline = time.perf_counter() + budget_s
    for i, a in enumerate(args):
        t0 = time.perf_counter_ns()
        fn(a)
        samples.append(time.perf_counter_ns() - t0)
        if i + 1 >= min_iters and time.perf_counter() >= deadline:
            break
    return {"ns": statistics.median(samples), "iterations": len(samples)}


def rng(tag: str) -> random.Random:
    return random.Random(f"{SEED}-{tag}")


# -- child processes ----------------------------------------------------------------


class Child(JsonChild):
    """A ``scenarios/worker.py`` process speaking JSON lines: commands on stdin, one reply line each."""

    def __init__(self, *args: str) -> None:
        super().__init__([sys.executable, WORKER, *args], f"worker {args[0]}", env=child_env([BENCH_DIR]))


def pss_bytes(pid: int) -> Dict[str, int]:
    """rss, pss and uss of a process (bytes)."""
    m = memory(pid)
    return {"rss": m.get("rss", 0), "pss": m.get("pss", 0), "uss": m.get("uss", 0)}


# -- etcd seeding ---------------------------------------------------------------------


def seed(client: Any, prefix: str, n: int, value_size: int, batch: int = 1000) -> float:
    """Put ``n`` keys through transactions of ``batch`` puts; returns seconds taken."""
    t0 = time.perf_counter()
    put_many(client, ((key_of(prefix, i), make_value(i, value_size)) for i in range(n)), batch=batch)
    return time.perf_counter() - t0


def put_batch(client: Any, items: Sequence[tuple]) -> None:
    tx = client.transactions
    client.transaction(compare=[], success=[tx.put(k, v) for k, v in items], failure=[])


#: etcd flags: big transactions for the 1k-key batch and the seeding.
ETCD_ARGS = [
    "--max-txn-ops",
    "2048",
    "--max-request-bytes",
    str(8 << 20),
    "--quota-backend-bytes",
    str(8 << 30),
    "--snapshot-count",
    "1000000",
]
