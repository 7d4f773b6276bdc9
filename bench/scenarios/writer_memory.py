#!/usr/bin/env python3
"""Where a writer's memory goes (issue 22 item 4): RssAnon after each stage, in one process.

    .venv/bin/python bench/scenarios/writer_memory.py --keys 100000

Against a private etcd seeded like bench/writer_scale.py (~110 B JSON values), a
child process measures /proc/self/status RssAnon (its heap: what USS is minus the
shared-memory image it maps) after: the bare interpreter; importing the writer
(shmkeyspace.writer, the CLI); importing the etcd client (grpc, protobuf, pyetcd);
connecting (after ``tune_heap()``, as the CLI writer calls it, unless TUNE_HEAP=0); a Writer's full load and first publication (``--tracemalloc``: the
Python allocations still live then, by file); and ``malloc_trim(0)``. Prints one
JSON line per stage; the differences are the components.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from shmkeyspace.children import put_many  # noqa: E402
from shmkeyspace.embedded import EtcdServer  # noqa: E402

CHILD = r"""
import gc, json, os, sys, time
def anon():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
def stage(name, **extra):
    gc.collect()
    print(json.dumps({"stage": name, "rss_anon_mib": round(anon(), 1), **extra}), flush=True)
endpoint, name, prefix, trace = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
stage("interpreter")
import shmkeyspace.writer, shmkeyspace.cli, shmkeyspace.decoders
stage("import shmkeyspace (writer, cli)")
import shmkeyspace.etcd, pyetcd
stage("import grpc + protobuf + pyetcd")
if os.environ.get("TUNE_HEAP", "1") == "1":
    from shmkeyspace.heap import tune_heap
    tune_heap()  # as the CLI writer does
if trace:
    import tracemalloc
    tracemalloc.start()
from shmkeyspace import decoders
from shmkeyspace.writer import Writer
w = Writer(name, prefix, endpoints=endpoint, decoder=decoders.resolve("json"), decoder_name="json",
           unlink_on_exit=True)
w.connect()
stage("connected")
t0 = time.perf_counter()
w.load()
dt = time.perf_counter() - t0
b = w.keyspace.key_values.builder
stage("loaded", keys=w.key_count, load_s=round(dt, 2), arena_mib=round(len(b.arena) / 2**20, 1),
      table_mib=round(len(b._table) / 2**20, 1), order_mib=round(len(b._order) * 4 / 2**20, 1))
if trace:
    snap = tracemalloc.take_snapshot()
    top = snap.statistics("filename")[:8]
    print(json.dumps({"stage": "tracemalloc by file", "top": [
        [str(s.traceback[0].filename).split("site-packages/")[-1].split("shmkeyspace/")[-1],
         round(s.size / 2**20, 1)] for s in top]}), flush=True)
    tracemalloc.stop()
    stage("tracemalloc stopped")
import ctypes
ctypes.CDLL("libc.so.6").malloc_trim(0)
stage("malloc_trim(0)")
w.stop()
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--tracemalloc", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from writer_scale import PREFIX, key_of, pyetcd_client, value_of

    with EtcdServer(extra_args=["--quota-backend-bytes", str(8 << 30), "--max-txn-ops", "1024"]) as etcd:
        c = pyetcd_client(etcd.endpoint)
        put_many(c, ((key_of(i), value_of(i, 0)) for i in range(args.keys)), batch=128, threads=2)
        c.close()
        env = dict(os.environ, PYTHONPATH=ROOT)
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD,
                etcd.endpoint,
                f"wmem-{os.getpid()}",
                PREFIX.rstrip("/"),
                "1" if args.tracemalloc else "0",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        sys.stdout.write(out.stdout)
        if out.returncode:
            sys.stderr.write(out.stderr[-3000:])
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
