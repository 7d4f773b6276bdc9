#!/usr/bin/env python3
"""Consistent reads: ``Reader.sync()`` latency against etcd's own round trip, in one run.

    ./run bench --only sync                        # 10k keys, 200 syncs each way
    ./run bench --only sync --keys 100000 --syncs 100

One embedded etcd holds ``--keys`` keys under a prefix; an in-process Writer
(apply delay ``--apply-delay-ms``, default 30 as the CLI's) mirrors it. Measured
interleaved, p50/p99 in ms: a linearizable etcd get (the round trip), ``sync()``
with nothing new, and put → ``sync()`` → the reader sees the put (the
read-your-writes path). The target is sync p50 ≤ one etcd round trip + the
apply delay + 1 ms.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from shmkeyspace import Reader, Writer, writerlock  # noqa: E402
from shmkeyspace.children import percentile, put_many  # noqa: E402
from shmkeyspace.embedded import EtcdServer  # noqa: E402
from shmkeyspace.etcd import connect  # noqa: E402


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--keys", type=int, default=10_000)
    ap.add_argument("--syncs", type=int, default=200)
    ap.add_argument("--apply-delay-ms", type=float, default=30.0)
    ap.add_argument(
        "--view-grace", type=float, default=0.1, help="the writer's view grace, seconds (default 0.1)"
    )
    a = ap.parse_args(argv)
    name = f"bench-sync-{uuid.uuid4().hex[:8]}"
    with EtcdServer() as srv:
        prefix = f"/bench-sync/{uuid.uuid4().hex[:8]}/"
        client = connect(srv.endpoint)
        put_many(client, ((f"{prefix}k{i:07d}", b"v" * 100) for i in range(a.keys)), threads=4)
        times: Dict[str, List[float]] = {
            "etcd get (linearizable)": [],
            "sync, nothing new": [],
            "put -> sync -> seen": [],
        }
        try:
            with Writer(
                name,
                prefix,
                endpoints=srv.endpoint,
                apply_delay=a.apply_delay_ms / 1e3,
                view_grace=a.view_grace,
            ) as w:
                w.start()
                with Reader(name) as r:
                    r.sync(timeout=30)
                    for i in range(a.syncs):
                        t0 = time.perf_counter()
                        client.get(f"{prefix}k0000000")
                        t1 = time.perf_counter()
                        r.sync(timeout=30)
                        t2 = time.perf_counter()
                        key = f"{prefix}k{i % a.keys:07d}"
                        client.put(key, f"n{i}")
                        r.sync(timeout=30)
                        assert r.get(key).decoded == f"n{i}".encode()
                        t3 = time.perf_counter()
                        times["etcd get (linearizable)"].append(t1 - t0)
                        times["sync, nothing new"].append(t2 - t1)
                        times["put -> sync -> seen"].append(t3 - t2)
                    rounds = w.sync_server.rounds if w.sync_server else 0
        finally:
            client.close()
            writerlock.unlink_all(name)
    rtt = percentile(times["etcd get (linearizable)"], 50) * 1e3
    print(
        f"sync, {a.keys} keys, apply delay {a.apply_delay_ms:g} ms, view grace {a.view_grace:g} s, "
        f"{a.syncs} of each; {rounds} rounds"
    )
    for k, v in times.items():
        p50, p99 = percentile(v, 50) * 1e3, percentile(v, 99) * 1e3
        print(f"  {k:26s} p50 {p50:8.2f} ms   p99 {p99:8.2f} ms")
    target = rtt + a.apply_delay_ms + 1
    got = percentile(times["put -> sync -> seen"], 50) * 1e3
    print(
        f"  target: p50 <= rtt + apply delay + 1 ms = {target:.2f} ms; put -> sync p50 {got:.2f} ms = {got / target:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
