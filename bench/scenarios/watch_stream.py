"""Watch apply throughput: shmkeyspace's own watch stream vs the client library's watcher.

    ./run bench --only watch_stream                 # 20k events, 5 repeats each, interleaved
    ./run bench --only watch_stream --events 5000 --repeats 3

Issue 17 replaced the client library's shared watcher (``add_watch_prefix_callback``)
with :class:`shmkeyspace.etcd.WatchStream` (progress requests, require-leader
metadata). This checks the replacement costs nothing on the hot path: one private
loopback etcd, a KeySpace loaded at revision R, then ``--events`` puts in
transactions of 100 while nothing watches; the clock runs from starting the
watch at R + 1 until the KeySpace has applied the last put (etcd replays the
backlog as fast as the client takes it), for each path, repeats interleaved so
drift hits both alike. Prints medians and their ratio; the KeySpace is in-process (no
shared memory), so this isolates the watch + apply path.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from shmkeyspace import etcd as etcd_glue  # noqa: E402
from shmkeyspace.embedded import EtcdServer  # noqa: E402
from shmkeyspace.etcd import connect  # noqa: E402
from shmkeyspace.keyspace import KeySpace  # noqa: E402

TXN = 100


def one_run(c: Any, prefix: str, events: int, own_stream: bool) -> Dict[str, float]:
    real = etcd_glue.supports_watch_stream
    if not own_stream:
        etcd_glue.supports_watch_stream = lambda client: False  # type: ignore[assignment]  # the old path
    try:
        ks = KeySpace(prefix)
        ks.watch_apply_delay = 0.005
        ks.load(c)
        txns = [
            [c.transactions.put(f"{prefix}/k{(i + j) % 1000:04d}", b"x" * 90) for j in range(TXN)]
            for i in range(0, events, TXN)
        ]
        last = 0
        for ops in txns:  # a backlog: the watch starts behind all of it
            ok, resps = c.transaction(compare=[], success=ops, failure=[])
            last = max(last, int(resps[-1].response_put.header.revision))
        t0 = time.perf_counter()
        wt = ks.start_watch(c)
        try:
            assert ks.wait_for_revision(last, 300)
            applied = time.perf_counter() - t0
        finally:
            wt.stop()
    finally:
        etcd_glue.supports_watch_stream = real
    return {"applied": applied}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    with EtcdServer() as srv:
        c = connect(srv.endpoint)
        res: Dict[str, List[Dict[str, float]]] = {"stream": [], "callback": []}
        for i in range(a.repeats):
            for path in ("stream", "callback") if i % 2 == 0 else ("callback", "stream"):
                res[path].append(one_run(c, f"/bench/ws{i}{path}", a.events, path == "stream"))
        c.close()
    med = {p: statistics.median(r["applied"] for r in runs) for p, runs in res.items()}
    print(f"{a.events} events in txns of {TXN}, {a.repeats} repeats each, medians:")
    print("| path | backlog applied | events/s |")
    print("| --- | ---: | ---: |")
    for p in ("stream", "callback"):
        print(f"| {p} | {med[p]:.2f} s | {a.events / med[p]:,.0f} |")
    print(f"stream / callback (time to apply): {med['stream'] / med['callback']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
