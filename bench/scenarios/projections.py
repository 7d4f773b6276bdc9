#!/usr/bin/env python3
"""Projections: the image, load and cold get with a writer-side transform vs without.

    ./run bench --only projections                  # 100k keys, ~1 KB JSON values
    ./run bench --only projections --keys 20000 --repeats 3

One embedded etcd holds ``--keys`` JSON values of ~1 KB (host, port, zone and a
~900 B ``spec`` no reader reads). Two writers, one after the other, mirror them
under the JSON decoder: one as it is, one with ``--transform`` keeping host, port
and zone (``account_depth`` on for both). Reported side by side, in one run:
image bytes (and the writer's per-prefix totals, which must agree), spawn → full
snapshot, and the cold ``get`` (cache off) of random keys on each read path,
interleaved round robin.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import uuid
from typing import Any, Dict, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.scenarios.common import median, time_interleaved, time_loop  # noqa: E402
from shmkeyspace import Reader, Writer, decoders, writerlock  # noqa: E402
from shmkeyspace.children import put_many  # noqa: E402
from shmkeyspace.embedded import EtcdServer  # noqa: E402
from shmkeyspace.etcd import connect  # noqa: E402
from shmkeyspace.reader import IMPLEMENTATIONS  # noqa: E402


def value(i: int) -> bytes:
    spec = {"image": f"registry/app:{i % 97}", "env": {f"VAR_{j}": "x" * 20 for j in range(30)}}
    return json.dumps(
        {"host": f"10.0.{i >> 8 & 255}.{i & 255}", "port": 8000 + i % 100, "zone": f"z{i % 3}", "spec": spec}
    ).encode()


def slim(key: Any, v: Any) -> Any:
    return {"host": v["host"], "port": v["port"], "zone": v["zone"]}


def run(
    endpoint: str, prefix: str, keys: list, transform: Any, repeats: int, per: int
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    name = f"bench-proj-{uuid.uuid4().hex[:8]}"
    out: Dict[str, Any] = {}
    jobs: Dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        w = Writer(
            name, prefix, endpoints=endpoint, decoder=decoders.json, transform=transform, account_depth=1
        )
        w.start()
        out["load_s"] = time.perf_counter() - t0
        readers = {impl: Reader(name, cache_size=0, implementation=impl) for impl in IMPLEMENTATIONS}
        h = readers[IMPLEMENTATIONS[0]].health()
        assert h.keys == len(keys), (h.keys, len(keys))
        out["image_bytes"] = h.bytes
        out["entry_bytes"] = sum(b for _, _, b in w.prefix_bytes() or [])
        rnd = random.Random(5)
        args = [[rnd.choice(keys) for _ in range(per)] for _ in range(repeats)]
        for impl, r in readers.items():
            jobs[impl] = (lambda x, f=r.get: time_loop(f, x), args)
        return out, {"jobs": jobs, "writer": w, "readers": readers, "name": name}
    except BaseException:
        writerlock.unlink_all(name)
        raise


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--per-repeat", type=int, default=20_000, help="gets per repeat and read path")
    a = ap.parse_args(argv)
    with EtcdServer() as srv:
        prefix = f"/bench-proj/{uuid.uuid4().hex[:8]}/"
        keys = [f"{prefix}k{i:07d}" for i in range(a.keys)]
        client = connect(srv.endpoint)
        try:
            put_many(client, ((k, value(i)) for i, k in enumerate(keys)), threads=4)
        finally:
            client.close()
        full, fctx = run(srv.endpoint, prefix, keys, None, a.repeats, a.per_repeat)
        slimmed, sctx = run(srv.endpoint, prefix, keys, slim, a.repeats, a.per_repeat)
        try:
            jobs = {f"full ({k})": v for k, v in fctx["jobs"].items()}
            jobs.update({f"projected ({k})": v for k, v in sctx["jobs"].items()})
            us = {k: median(v) / 1e3 for k, v in time_interleaved(jobs).items()}
        finally:
            for ctx in (fctx, sctx):
                for r in ctx["readers"].values():
                    r.close()
                ctx["writer"].stop()
                writerlock.unlink_all(ctx["name"])
    print(f"projections, {a.keys} keys of ~{len(value(1))} B JSON; transform keeps 3 of 4 fields")
    print(f"  {'':22s} {'full':>12s} {'projected':>12s} {'ratio':>7s}")
    for k, fmt in (("image_bytes", "{:12,d}"), ("entry_bytes", "{:12,d}"), ("load_s", "{:12.2f}")):
        print(f"  {k:22s} {fmt.format(full[k])} {fmt.format(slimmed[k])} {slimmed[k] / full[k]:7.2f}x")
    for impl in IMPLEMENTATIONS:
        f, p = us[f"full ({impl})"], us[f"projected ({impl})"]
        print(f"  {'cold get us (' + impl + ')':22s} {f:12.3f} {p:12.3f} {p / f:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
