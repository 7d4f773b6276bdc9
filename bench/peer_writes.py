"""1-key write cost of the peers at 100k keys, beside the Writer's 1-key publication.

    python bench/peer_writes.py

py-lmdb: one write transaction with the same packed entry (sync off: CPU; default
sync: wall, an fsync per commit). dict: one assignment (in one process only; a
fleet of N per-process mirrors pays it N times, plus N etcd watches).
"""
import lmdb, tempfile, time, statistics, ormsgpack, random
d = tempfile.mkdtemp()
env = lmdb.open(d, map_size=1<<30, sync=False, metasync=False)
keys = [f"/svc/g{i//100:04d}/{i:06d}".encode() for i in range(100000)]
val = lambda i, v: ormsgpack.packb([keys[i].decode(), {"host": "10.0.0.1", "port": 8000, "pad": "x"*40, "v": v}, 1, v, 1, 0])
with env.begin(write=True) as t:
    for i in range(100000): t.put(keys[i], val(i, 1))
def one(v):
    i = random.randrange(100000); p = val(i, v)
    t0 = time.process_time_ns()
    with env.begin(write=True) as t: t.put(keys[i], p)
    return (time.process_time_ns() - t0) / 1e6
print("lmdb 1-key write txn (sync=False) CPU ms median", round(statistics.median(one(v) for v in range(2, 2000)), 4))
env2 = lmdb.open(d + "2", map_size=1<<30)
with env2.begin(write=True) as t:
    for i in range(100000): t.put(keys[i], val(i, 1))
def two(v):
    i = random.randrange(100000); p = val(i, v)
    t0 = time.perf_counter_ns()
    with env2.begin(write=True) as t: t.put(keys[i], p)
    return (time.perf_counter_ns() - t0) / 1e6
print("lmdb 1-key write txn (default sync) wall ms median", round(statistics.median(two(v) for v in range(2, 300)), 3))
dd = {k: {"v": 1} for k in keys}
t0 = time.perf_counter_ns()
for v in range(100000): dd[keys[v % 100000]] = {"v": v}
print("dict 1-key set us", (time.perf_counter_ns() - t0) / 100000 / 1000)
