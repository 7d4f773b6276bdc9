"""Typed values (issue 23): cold ``get`` of a 5-field msgspec Struct vs dicts vs py-lmdb.

One run, one data set: N keys (default 100k) whose values are a 5-field record,
put into an embedded etcd as JSON, mirrored by a real Writer with
``decoders.struct(Service)``. Timed, interleaved round robin (common.time_interleaved),
median ns per cold get over random keys (every query a different key):

* typed        ``Reader(cache_size=0).typed(Service).get(k)``: Entry with a Service
* typed/convert ``msgspec.convert(r.get(k).decoded, Service)``: unpack to a dict, then convert
* untyped      ``Reader(cache_size=0).get(k)``: Entry with a dict
* lmdb         py-lmdb, one long read txn, the same packed entries, ormsgpack into dicts

for each read path the installation has ("c", "python"). Prints the ratios; the
target is typed (C) <= 0.5x lmdb::

    ./run bench --only typed_values [--keys 100000] [--repeats 7] [--endpoint HOST:PORT]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import uuid
from typing import Any, Dict

import msgspec
import ormsgpack

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.scenarios.common import median, time_interleaved, time_loop  # noqa: E402
from bench.scenarios.peers import LmdbPeer  # noqa: E402
from shmkeyspace import Reader, Writer, decoders, writerlock  # noqa: E402
from shmkeyspace.children import put_many  # noqa: E402
from shmkeyspace.embedded import EtcdServer  # noqa: E402
from shmkeyspace.etcd import connect  # noqa: E402
from shmkeyspace.reader import IMPLEMENTATIONS  # noqa: E402
from shmkeyspace.snapshot import pack_entry  # noqa: E402


class Service(msgspec.Struct):
    host: str
    port: int
    weight: float
    zone: str
    up: bool


def value(i: int) -> Service:
    return Service(
        f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 8000 + i % 1000, i % 7 / 2, f"z{i % 5}", i % 3 != 0
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--per-repeat", type=int, default=20_000, help="gets per repeat and system")
    ap.add_argument("--endpoint", help="an etcd to use (default: an embedded one)")
    a = ap.parse_args(argv)
    srv = None if a.endpoint else EtcdServer().__enter__()
    endpoint = a.endpoint or srv.endpoint  # type: ignore[union-attr]
    prefix = f"/bench-typed/{uuid.uuid4().hex[:8]}/"
    name = f"bench-typed-{uuid.uuid4().hex[:8]}"
    keys = [f"{prefix}k{i:07d}" for i in range(a.keys)]
    client = connect(endpoint)
    lmdb = None
    try:
        put_many(client, ((k, msgspec.json.encode(value(i))) for i, k in enumerate(keys)), threads=4)
        with Writer(name, prefix, endpoints=endpoint, decoder=decoders.struct(Service)) as w:
            w.start()
            readers = {impl: Reader(name, cache_size=0, implementation=impl) for impl in IMPLEMENTATIONS}
            r0 = readers[IMPLEMENTATIONS[0]]
            assert len(r0) == a.keys, (len(r0), a.keys)
            # lmdb holds the very entries the image holds (packed the same way).
            lmdb = LmdbPeer(unpackb=ormsgpack.unpackb)
            lmdb.fill((k.encode(), pack_entry(k.encode(), *r0.get(k)[1:])) for k in sorted(keys))
            long_txn = lmdb.long_txn()
            rnd = random.Random(23)
            args = [[rnd.choice(keys) for _ in range(a.per_repeat)] for _ in range(a.repeats)]
            bargs = [[k.encode() for k in ks] for ks in args]
            k0 = keys[a.keys // 2]
            assert long_txn.get(k0.encode())[1] == msgspec.to_builtins(value(a.keys // 2))
            jobs: Dict[str, Any] = {
                "lmdb long txn + ormsgpack": (lambda x: time_loop(long_txn.get, x), bargs)
            }
            for impl, r in readers.items():
                t = r.typed(Service)
                assert t.get(k0).decoded == value(a.keys // 2) and type(t.get(k0).decoded) is Service
                conv = lambda k, g=r.get, c=msgspec.convert: c(g(k).decoded, Service)  # noqa: E731
                assert conv(k0) == value(a.keys // 2)
                jobs[f"typed ({impl})"] = (lambda x, f=t.get: time_loop(f, x), args)
                jobs[f"typed via convert ({impl})"] = (lambda x, f=conv: time_loop(f, x), args)
                jobs[f"untyped dict ({impl})"] = (lambda x, f=r.get: time_loop(f, x), args)
            times = time_interleaved(jobs)
            us = {k: median(v) / 1e3 for k, v in times.items()}
            base = us["lmdb long txn + ormsgpack"]
            print(
                f"cold get, {a.keys} keys, 5-field Struct values, median of {a.repeats} x {a.per_repeat} gets"
            )
            for k, v in us.items():
                print(f"  {k:32s} {v:6.3f} us   {v / base:5.2f}x lmdb")
            for impl in readers:
                print(
                    f"  [{impl}] typed / untyped {us[f'typed ({impl})'] / us[f'untyped dict ({impl})']:.2f}x, "
                    f"typed / via convert {us[f'typed ({impl})'] / us[f'typed via convert ({impl})']:.2f}x"
                )
            for r in readers.values():
                r.close()
    finally:
        if lmdb is not None:
            long_txn.close()
            lmdb.close()
        client.close()
        writerlock.unlink_all(name)
        if srv is not None:
            srv.__exit__(None, None, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
