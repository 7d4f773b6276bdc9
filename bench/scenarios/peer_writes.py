"""1-key write cost at 100k keys: shmkeyspace's publication beside its peers, one run.

    ./run bench --only peer_writes

* shmkeyspace: ``ImageBuilder.apply`` + ``parts`` + ``Publisher.publish`` (with the
  stable span, as the Writer does) for one changed key; CPU time.
* py-lmdb: one write transaction putting the same packed entry; CPU time with
  ``sync=False``, and wall time with the default sync (an fsync per commit).
* dict: one assignment, in one process only (a fleet of N per-process mirrors
  pays it N times, plus N etcd watches).

Medians; entries are ``[key, decoded, create, mod, version, lease]`` packed with
``pack_entry`` for every system.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from typing import Callable, List

import lmdb

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from shmkeyspace import publisher  # noqa: E402
from shmkeyspace.builder import ImageBuilder  # noqa: E402
from shmkeyspace.snapshot import pack_entry  # noqa: E402

N = 100_000
KEYS: List[bytes] = [b"/svc/g%04d/%06d" % (i // 100, i) for i in range(N)]


def entry(i: int, version: int) -> bytes:
    value = {"host": "10.0.0.1", "port": 8000, "pad": "x" * 40, "v": version}
    return pack_entry(KEYS[i], value, 1, version, 1, 0)


def median_ms(write: Callable[[int, bytes], None], samples: int, clock: Callable[[], int]) -> float:
    """Median cost of ``write(i, packed)`` for random keys, by ``clock`` (ns)."""
    rnd = random.Random(1)
    costs = []
    for v in range(2, samples + 2):
        i = rnd.randrange(N)
        packed = entry(i, v)
        t0 = clock()
        write(i, packed)
        costs.append((clock() - t0) / 1e6)
    return statistics.median(costs)


def lmdb_env(path: str, **flags) -> "lmdb.Environment":
    env = lmdb.open(path, map_size=1 << 30, **flags)
    with env.begin(write=True) as txn:
        for i in range(N):
            txn.put(KEYS[i], entry(i, 1))
    return env


def lmdb_put(env: "lmdb.Environment") -> Callable[[int, bytes], None]:
    def write(i: int, packed: bytes) -> None:
        with env.begin(write=True) as txn:
            txn.put(KEYS[i], packed)

    return write


def main(argv=None) -> None:
    name = "peerwrites-" + uuid.uuid4().hex[:8]
    builder = ImageBuilder()
    with publisher.Publisher(name, unlink_on_close=True) as pub:
        builder.reset([(KEYS[i], entry(i, 1)) for i in range(N)], 1)
        parts, total = builder.parts()
        pub.publish(parts, total, 1, N, stable=builder.stable_span())
        rev = [1]

        def publish(i: int, packed: bytes) -> None:
            rev[0] += 1
            builder.apply({KEYS[i]: packed}, rev[0])
            parts, total = builder.parts()
            pub.publish(parts, total, rev[0], len(builder), stable=builder.stable_span())

        shm_ms = median_ms(publish, 300, time.process_time_ns)
    with tempfile.TemporaryDirectory() as d:
        nosync = lmdb_env(os.path.join(d, "nosync"), sync=False, metasync=False)
        lmdb_ms = median_ms(lmdb_put(nosync), 2000, time.process_time_ns)
        nosync.close()
        synced = lmdb_env(os.path.join(d, "sync"))
        lmdb_sync_ms = median_ms(lmdb_put(synced), 300, time.perf_counter_ns)
        synced.close()
    mirror = {k: {"v": 1} for k in KEYS}
    t0 = time.perf_counter_ns()
    for v in range(N):
        mirror[KEYS[v]] = {"v": v}
    dict_ms = (time.perf_counter_ns() - t0) / N / 1e6

    print(f"1-key write at {N:,} keys (median)")
    print("| system | cost | ÷ shmkeyspace |\n| --- | ---: | ---: |")
    print(f"| shmkeyspace publish (apply + parts + publish), CPU | {shm_ms:.3f} ms | 1 |")
    print(f"| py-lmdb write txn, sync off, CPU | {lmdb_ms:.4f} ms | {lmdb_ms / shm_ms:.4f} |")
    print(f"| py-lmdb write txn, default sync, wall | {lmdb_sync_ms:.3f} ms | {lmdb_sync_ms / shm_ms:.3f} |")
    print(f"| dict assignment (one process) | {dict_ms * 1e3:.3f} µs | {dict_ms / shm_ms:.6f} |")


if __name__ == "__main__":
    main()
