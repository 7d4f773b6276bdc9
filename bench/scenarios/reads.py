"""Point gets (cold and repeated), ranges of 100 keys and prefix listings, in-process.

Every system answers the same queries over the same data; answers are checked
against the dict before anything is timed. Times are per operation, the median
over ``repeats`` loops (``time.perf_counter_ns`` around the whole loop, gc off).

lmdb unpacks with the Reader's own unpack function (see peers.py); when that is
not msgpack's, an extra "lmdb + msgpack.unpackb" row shows the difference.
Keys are given to each system in its native type: ``str`` to shmkeyspace, the
dict and etcd, pre-encoded ``bytes`` to lmdb (so lmdb never pays the encode).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Dict, List

import msgpack

from . import common
from .common import median, time_batches, time_budget, time_loop

SHM = "shmkeyspace"  # the default Reader: the compiled path when it is built
SHM_PY = "shmkeyspace (python)"  # Reader(implementation="python"), when SHM is compiled
SHM_BATCH = "shmkeyspace snapshot/batch"
LMDB = "lmdb txn/op"
LMDB_LONG = "lmdb long txn"
LMDB_BATCH = "lmdb txn/batch"
LMDB_MSGPACK = "lmdb txn/op, msgpack.unpackb"
DICT = "dict"
ETCD = "etcd (pyetcd)"
SMD = "shared-memory-dict"
SYSTEMS = [SHM, SHM_PY, SHM_BATCH, LMDB, LMDB_LONG, LMDB_BATCH, LMDB_MSGPACK, DICT, ETCD, SMD]
SCENARIOS = ["get_cold", "get_repeated", "range100", "prefix100"]
BATCH = 100


def _row(
    cfg, scenario: str, system: str, per_repeat_ns: List[float], iterations: int, note: str = ""
) -> Dict[str, Any]:
    return {
        "scenario": scenario,
        "keys": cfg.n,
        "value_size": cfg.value_size,
        "system": system,
        "us": median(per_repeat_ns) / 1e3,
        "repeats_us": [x / 1e3 for x in per_repeat_ns],
        "iterations": iterations,
        "note": note,
    }


def _na(cfg, scenario: str, system: str, note: str) -> Dict[str, Any]:
    return {
        "scenario": scenario,
        "keys": cfg.n,
        "value_size": cfg.value_size,
        "system": system,
        "us": None,
        "repeats_us": [],
        "iterations": 0,
        "note": note,
    }


def check(ctx) -> None:
    """The peers hold what the Reader holds: compare a sample of answers."""
    cfg, d = ctx.cfg, ctx.dict_peer
    r = common.rng(f"check-{cfg.n}")
    for i in r.sample(range(cfg.n), min(200, cfg.n)):
        k = cfg.keys[i]
        e = ctx.reader_cold.get(k)
        if e is None or e.decoded != d.d[k]:
            raise AssertionError(f"Reader and dict disagree on {k!r}")
        lm = ctx.lmdb.get(k.encode())
        if list(lm) != list(e):
            raise AssertionError(f"Reader and lmdb disagree on {k!r}: {lm!r} != {list(e)!r}")
    i = max(0, cfg.n // 2 - common.RANGE_LEN)
    lo, hi = cfg.keys[i], cfg.keys[min(cfg.n - 1, i + common.RANGE_LEN)]
    a = [e.decoded for e in ctx.reader_cold.range(lo, hi)]
    if a != d.range_to(lo, hi) or len(a) != common.RANGE_LEN:
        raise AssertionError("Reader.range and the dict disagree")
    if [x[1] for x in ctx.lmdb.range(lo.encode(), common.RANGE_LEN)] != a:
        raise AssertionError("Reader.range and the lmdb cursor disagree")
    p = common.group_prefix(cfg.prefix, 0)
    if [e.decoded for e in ctx.reader_cold.prefixed(p)] != d.prefixed(p) or [
        x[1] for x in ctx.lmdb.prefixed(p.encode())
    ] != d.prefixed(p):
        raise AssertionError("prefix listings disagree")


def run(ctx) -> List[Dict[str, Any]]:
    cfg, st = ctx.cfg, ctx.settings
    check(ctx)
    rows: List[Dict[str, Any]] = []
    keys = cfg.keys
    n = cfg.n
    R = st.repeats
    r = common.rng(f"reads-{n}-{cfg.value_size}")

    # -- cold random gets: distinct keys per repeat, Reader without cache ----------------
    m = min(n, st.cold_keys)
    cold = [[keys[i] for i in r.sample(range(n), m)] for _ in range(R)]
    cold_b = [[k.encode() for k in ks] for ks in cold]
    reader, lm, d = ctx.reader_cold, ctx.lmdb, ctx.dict_peer
    lml = lm.long_txn()
    impl = f"{reader.implementation} path"
    py_cold, py_warm = ctx.reader_cold_py, ctx.reader_py  # None unless the default is compiled

    def with_py(jobs, reader_py, fn, args):
        if reader_py is not None:
            jobs[SHM_PY] = (partial(T, fn(reader_py)), args)
        return jobs

    # When the Reader unpacks with something faster than msgpack, also show lmdb + msgpack.
    lm_msgpack = None if lm.unpackb is msgpack.unpackb else lm.with_unpacker(msgpack.unpackb)

    def shm_batch(ks, snap=ctx.reader_cold.snapshot):
        with snap() as s:
            g = s.get
            for k in ks:
                g(k)

    T, TB = time_loop, time_batches

    def timed(jobs):  # {system: (timer, args_per_repeat)}: repeats interleaved across systems
        return common.time_interleaved(jobs)

    t = timed(
        with_py(
            {
                SHM: (partial(T, reader.get), cold),
                SHM_BATCH: (partial(TB, shm_batch, batch=BATCH), cold),
                LMDB: (partial(T, lm.get), cold_b),
                LMDB_LONG: (partial(T, lml.get), cold_b),
                LMDB_BATCH: (partial(TB, lm.get_batch, batch=BATCH), cold_b),
                **({LMDB_MSGPACK: (partial(T, lm_msgpack.get), cold_b)} if lm_msgpack is not None else {}),
                DICT: (partial(T, d.get), cold),
            },
            py_cold,
            lambda r: r.get,
            cold,
        )
    )
    rows.append(_row(cfg, "get_cold", SHM, t[SHM], m * R, f"Reader(cache_size=0), {impl}"))
    if SHM_PY in t:
        rows.append(
            _row(cfg, "get_cold", SHM_PY, t[SHM_PY], m * R, "Reader(cache_size=0, implementation='python')")
        )
    rows.append(
        _row(cfg, "get_cold", LMDB_LONG, t[LMDB_LONG], m * R, "one read txn for every get (fastest mode)")
    )
    rows.append(_row(cfg, "get_cold", SHM_BATCH, t[SHM_BATCH], m * R, f"one snapshot() per {BATCH} gets"))
    rows.append(_row(cfg, "get_cold", LMDB, t[LMDB], m * R, "read txn per get"))
    rows.append(_row(cfg, "get_cold", LMDB_BATCH, t[LMDB_BATCH], m * R, f"one read txn per {BATCH} gets"))
    if lm_msgpack is not None:
        rows.append(
            _row(
                cfg,
                "get_cold",
                LMDB_MSGPACK,
                t[LMDB_MSGPACK],
                m * R,
                "read txn per get, unpacked with msgpack instead of the Reader's unpacker",
            )
        )
    rows.append(_row(cfg, "get_cold", DICT, t[DICT], m * R))
    ek = max(1, st.etcd_iters // R)
    rows.append(
        _row(
            cfg,
            "get_cold",
            ETCD,
            time_loop(ctx.etcd.get, [ks[:ek] for ks in cold]),
            ek * R,
            "client.get + json.loads",
        )
    )
    rows.append(_smd(ctx, "get_cold", cold[0]))

    # -- the same key over and over (the per-reader cache path) --------------------------
    same = [[keys[r.randrange(n)]] * st.repeated_iters for _ in range(R)]
    same_b = [[ks[0].encode()] * len(ks) for ks in same]
    it = st.repeated_iters * R
    t = timed(
        with_py(
            {
                SHM: (partial(T, ctx.reader.get), same),
                SHM_BATCH: (partial(TB, shm_batch, batch=BATCH), same),
                LMDB: (partial(T, lm.get), same_b),
                LMDB_LONG: (partial(T, lml.get), same_b),
                LMDB_BATCH: (partial(TB, lm.get_batch, batch=BATCH), same_b),
                DICT: (partial(T, d.get), same),
            },
            py_warm,
            lambda r: r.get,
            same,
        )
    )
    rows.append(_row(cfg, "get_repeated", SHM, t[SHM], it, f"Reader() default cache, {impl}"))
    if SHM_PY in t:
        rows.append(_row(cfg, "get_repeated", SHM_PY, t[SHM_PY], it, "Reader(implementation='python')"))
    rows.append(_row(cfg, "get_repeated", LMDB_LONG, t[LMDB_LONG], it, "one read txn for every get"))
    rows.append(
        _row(cfg, "get_repeated", SHM_BATCH, t[SHM_BATCH], it, f"one snapshot() per {BATCH} gets (no cache)")
    )
    rows.append(_row(cfg, "get_repeated", LMDB, t[LMDB], it))
    rows.append(_row(cfg, "get_repeated", LMDB_BATCH, t[LMDB_BATCH], it))
    rows.append(_row(cfg, "get_repeated", DICT, t[DICT], it))
    rows.append(
        _row(
            cfg,
            "get_repeated",
            ETCD,
            time_loop(ctx.etcd.get, [ks[:ek] for ks in same]),
            ek * R,
            "client.get + json.loads",
        )
    )
    rows.append(_smd(ctx, "get_repeated", same[0]))

    # -- ranges of 100 keys ---------------------------------------------------------------------
    L = common.RANGE_LEN
    starts = [[r.randrange(max(1, n - L)) for _ in range(st.range_iters)] for _ in range(R)]
    bounds = [[(keys[i], keys[i + L] if i + L < n else "\U0010ffff") for i in s] for s in starts]
    lows = [[keys[i].encode() for i in s] for s in starts]
    it = st.range_iters * R
    t = timed(
        with_py(
            {
                SHM: (partial(T, lambda b: reader.range(b[0], b[1])), bounds),
                LMDB: (partial(T, lambda b: lm.range(b, L)), lows),
                LMDB_LONG: (partial(T, lambda b: lml.range(b, L)), lows),
                **(
                    {LMDB_MSGPACK: (partial(T, lambda b: lm_msgpack.range(b, L)), lows)}
                    if lm_msgpack is not None
                    else {}
                ),
                DICT: (partial(T, lambda b: d.range_to(b[0], b[1])), bounds),
            },
            py_cold,
            lambda r: lambda b: r.range(b[0], b[1]),
            bounds,
        )
    )
    rows.append(_row(cfg, "range100", SHM, t[SHM], it, f"Reader.range(from, to), {impl}"))
    if SHM_PY in t:
        rows.append(_row(cfg, "range100", SHM_PY, t[SHM_PY], it, "implementation='python'"))
    rows.append(
        _row(cfg, "range100", LMDB_LONG, t[LMDB_LONG], it, "cursor set_range + 100 next + unpack, one txn")
    )
    rows.append(
        _row(cfg, "range100", LMDB, t[LMDB], it, "cursor set_range + 100 next + unpack, txn per range")
    )
    if lm_msgpack is not None:
        rows.append(
            _row(cfg, "range100", LMDB_MSGPACK, t[LMDB_MSGPACK], it, "as lmdb txn/op, unpacked with msgpack")
        )
    rows.append(_row(cfg, "range100", DICT, t[DICT], it, "bisect on sorted keys + dict lookups"))
    er = max(1, st.etcd_range_iters // R)
    rows.append(
        _row(
            cfg,
            "range100",
            ETCD,
            time_loop(lambda b: ctx.etcd.range_to(b[0], b[1]), [bs[:er] for bs in bounds]),
            er * R,
            "client.get_range + json.loads",
        )
    )
    rows.append(_na(cfg, "range100", SMD, "no ordered queries"))

    # -- prefix listings (~100 keys) --------------------------------------------------------------
    groups = max(1, n // common.GROUP)
    prefixes = [
        [common.group_prefix(cfg.prefix, r.randrange(groups)) for _ in range(st.range_iters)]
        for _ in range(R)
    ]
    bprefixes = [[p.encode() for p in ps] for ps in prefixes]
    t = timed(
        with_py(
            {
                SHM: (partial(T, reader.prefixed), prefixes),
                LMDB: (partial(T, lm.prefixed), bprefixes),
                LMDB_LONG: (partial(T, lml.prefixed), bprefixes),
                DICT: (partial(T, d.prefixed), prefixes),
            },
            py_cold,
            lambda r: r.prefixed,
            prefixes,
        )
    )
    rows.append(_row(cfg, "prefix100", SHM, t[SHM], it, f"Reader.prefixed(p), {impl}"))
    if SHM_PY in t:
        rows.append(_row(cfg, "prefix100", SHM_PY, t[SHM_PY], it, "implementation='python'"))
    rows.append(_row(cfg, "prefix100", LMDB_LONG, t[LMDB_LONG], it, "cursor, one txn for every listing"))
    rows.append(
        _row(cfg, "prefix100", LMDB, t[LMDB], it, "cursor set_range + next while key < prefix end + unpack")
    )
    rows.append(_row(cfg, "prefix100", DICT, t[DICT], it, "bisect on sorted keys + dict lookups"))
    rows.append(
        _row(
            cfg,
            "prefix100",
            ETCD,
            time_loop(ctx.etcd.prefixed, [ps[:er] for ps in prefixes]),
            er * R,
            "client.get_prefix + json.loads",
        )
    )
    rows.append(_na(cfg, "prefix100", SMD, "no ordered queries"))
    lml.close()
    return rows


def _smd(ctx, scenario: str, keys: List[str]) -> Dict[str, Any]:
    cfg, st = ctx.cfg, ctx.settings
    if ctx.smd is None:
        return _na(cfg, scenario, SMD, ctx.smd_note)
    res = time_budget(ctx.smd.get, keys, st.smd_budget_s)
    return {
        "scenario": scenario,
        "keys": cfg.n,
        "value_size": cfg.value_size,
        "system": SMD,
        "us": res["ns"] / 1e3,
        "repeats_us": [],
        "iterations": res["iterations"],
        "note": f"unpickles the whole {ctx.smd.size / 1e6:.1f} MB dict per get; "
        f"{res['iterations']} gets in a {st.smd_budget_s:g} s budget",
    }
