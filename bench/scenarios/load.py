"""KeySpace load and apply measurements against a private etcd (a script, not a test).

    ./run bench --only load                 # 100k keys of ~90 B JSON, 20k watched events
    ./run bench --only load --keys 5000 --events 2000 --repeats 2   # a quick run

Measures, on a throwaway loopback etcd (``EtcdServer``):

* paginated ``KeySpace.load`` (JSON decoder, pages of 2,000 keys) with ``pyetcd``
  (in this process) and with ``etcd3`` 0.12 (in a child process, under protobuf's
  pure-Python backend, which that client needs); best of ``--repeats``;
* watch throughput: a KeySpace watching with the default 30 ms apply delay while a
  separate process puts ``--events`` updates as fast as it can, in transactions of
  100; reported from the writer's first put to the last event applied, plus the time
  spent inside ``KeySpace.apply`` and the observer calls (updates) it took;
* the direct in-process ``KeySpace.apply`` cost per event, replaying the real watch
  responses captured during that run onto a copy of the loaded mirror (all in one
  call, and one call per response).

Prints a markdown table and writes JSON to ``--out`` (default bench/results/load.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import subprocess
import sys
import time
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from shmkeyspace import decoders  # noqa: E402
from shmkeyspace.children import put_many  # noqa: E402
from shmkeyspace.embedded import EtcdServer  # noqa: E402
from shmkeyspace.etcd import connect  # noqa: E402
from shmkeyspace.keyspace import KeySpace  # noqa: E402

PREFIX = "/bench-load"
TXN_OPS = 100


def key_of(i: int) -> str:
    return f"{PREFIX}/g{i // 100:05d}/k{i:07d}"


def value_of(i: int, version: int = 0, size: int = 90) -> bytes:
    """A JSON object of about ``size`` bytes."""
    doc: Dict[str, Any] = {
        "id": i,
        "v": version,
        "host": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
        "port": 8000 + i % 1000,
        "zone": f"z{i % 5}",
        "up": i % 3 != 0,
    }
    base = len(json.dumps(doc, separators=(",", ":"))) + len(',"pad":""')
    doc["pad"] = "x" * max(0, size - base)
    return json.dumps(doc, separators=(",", ":")).encode()


def seed(endpoint: str, n: int, threads: int = 2) -> float:
    """Put n keys in transactions of TXN_OPS puts, ``threads`` transactions at a time."""
    t0 = time.perf_counter()
    c = connect(endpoint)
    try:
        put_many(c, ((key_of(i), value_of(i)) for i in range(n)), batch=TXN_OPS, threads=threads)
    finally:
        c.close()
    return time.perf_counter() - t0


def load_times(endpoint: str, client: str, repeats: int) -> Dict[str, Any]:
    """Best of ``repeats`` paginated KeySpace loads of PREFIX with ``client``."""
    c = connect(endpoint, client=client)
    times, keys = [], 0
    try:
        for _ in range(repeats):
            ks = KeySpace(PREFIX, decoders.json)
            t0 = time.perf_counter()
            ks.load(c)
            times.append(time.perf_counter() - t0)
            keys = len(ks.key_values)
            del ks
    finally:
        c.close()
    out: Dict[str, Any] = {"times_s": times, "best_s": min(times), "keys": keys}
    if client == "etcd3":
        from google.protobuf.internal import api_implementation

        out["protobuf_backend"] = api_implementation.Type()
    return out


def load_pyetcd(endpoint: str, repeats: int) -> Dict[str, Any]:
    return load_times(endpoint, "pyetcd", repeats)


# etcd3 0.12 needs protobuf's pure-Python backend, chosen before protobuf loads: a
# fresh process, so this one keeps the fast backend for pyetcd.
ETCD3_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[3])
from bench.scenarios.load import load_times
print(json.dumps(load_times(sys.argv[1], "etcd3", int(sys.argv[2]))))
"""


def load_etcd3(endpoint: str, repeats: int) -> Dict[str, Any]:
    env = dict(
        os.environ,
        PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="python",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    p = subprocess.run(
        [sys.executable, "-c", ETCD3_CHILD, endpoint, str(repeats), ROOT],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


WRITER_CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[5])
from bench.scenarios.load import key_of, value_of, TXN_OPS
from shmkeyspace.etcd import connect
ep, n, events, version = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
c = connect(ep)
# Build every transaction first so the timed loop only talks to etcd.
txns = []
for start in range(0, events, TXN_OPS):
    txns.append([c.transactions.put(key_of(j % n), value_of(j % n, version + j // n))
                 for j in range(start, min(events, start + TXN_OPS))])
t0 = time.monotonic()
rev = 0
for ops in txns:
    ok, resps = c.transaction(compare=[], success=ops, failure=[])
    rev = resps[0].response_put.header.revision
t1 = time.monotonic()
c.close()
print(json.dumps({"t_start": t0, "t_end": t1, "last_revision": int(rev)}))
"""


class TimedKeySpace(KeySpace):
    """A KeySpace that adds up the wall time spent in apply()."""

    apply_seconds = 0.0
    apply_calls = 0

    def apply(self, *responses: Any) -> None:
        t0 = time.perf_counter()
        try:
            super().apply(*responses)
        finally:
            self.apply_seconds += time.perf_counter() - t0
            self.apply_calls += 1


def watch_throughput(endpoint: str, n: int, events: int) -> Dict[str, Any]:
    c = connect(endpoint)
    cap = connect(endpoint)  # a raw watch capturing the same responses, for the replay
    try:
        ks = TimedKeySpace(PREFIX, decoders.json)
        ks.load(c)
        base_rev = ks.header.revision
        base_kvs = ks.key_values.copy()
        applied: List[tuple] = []
        ks.observers.append(lambda: applied.append((time.monotonic(), len(ks.changed_keys or ()))))
        captured: "queue.Queue[Any]" = queue.Queue()
        wid = cap.add_watch_prefix_callback(PREFIX.encode(), captured.put, start_revision=base_rev + 1)
        wt = ks.start_watch(c)
        time.sleep(0.3)
        ks.apply_seconds, ks.apply_calls = 0.0, 0
        p = subprocess.run(
            [sys.executable, "-c", WRITER_CHILD, endpoint, str(n), str(events), "1", ROOT],
            capture_output=True,
            text=True,
            timeout=1800,
            env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")),
        )
        if p.returncode != 0:
            raise RuntimeError(f"writer process failed: {p.stderr[-2000:]}")
        w = json.loads(p.stdout.strip().splitlines()[-1])
        if not ks.wait_for_revision(w["last_revision"], 300):
            raise RuntimeError(f"the mirror did not reach revision {w['last_revision']}")
        wt.stop()
        responses: List[Any] = []
        while sum(len(r.events) for r in responses) < events:
            responses.append(captured.get(timeout=60))
        cap.cancel_watch(wid)
        updates = [a for a in applied if a[1]]
        first, last = updates[0][0], updates[-1][0]
        out: Dict[str, Any] = {
            "events": events,
            "txn_ops": TXN_OPS,
            "writer_seconds": w["t_end"] - w["t_start"],
            "writer_events_per_s": events / (w["t_end"] - w["t_start"]),
            "first_to_last_applied_s": last - first,
            "start_to_last_applied_s": last - w["t_start"],
            "events_per_s": events / (last - w["t_start"]),
            "last_applied_after_writer_end_s": last - w["t_end"],
            "updates": len(updates),
            "apply_calls": ks.apply_calls,
            "apply_seconds": ks.apply_seconds,
            "apply_us_per_event": ks.apply_seconds / events * 1e6,
            "watch_responses": len(responses),
        }
        out.update(replay(base_rev, base_kvs, responses, ks, events))
        return out
    finally:
        c.close()
        cap.close()


def replay(
    base_rev: int, base_kvs: Any, responses: List[Any], watched: KeySpace, events: int
) -> Dict[str, Any]:
    """Direct apply cost: the captured responses onto a copy of the loaded mirror."""
    from dataclasses import replace

    res: Dict[str, Any] = {}
    for label, groups in (("one_call", [responses]), ("per_response", [[r] for r in responses])):
        best = None
        for _ in range(3):
            ks = KeySpace(PREFIX, decoders.json)
            ks.header = replace(watched.header, revision=base_rev)
            ks.key_values = base_kvs.copy()
            t0 = time.perf_counter()
            for g in groups:
                ks.apply(*g)
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
            if ks.key_values != watched.key_values or ks.header.revision != watched.header.revision:
                raise RuntimeError("replayed mirror differs from the watched one")
        res[f"replay_{label}_s"] = best
        res[f"replay_{label}_us_per_event"] = best / events * 1e6
    return res


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("grpc", "google.protobuf", "msgpack", "sortedcontainers"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            out[mod] = getattr(m, "__version__", "?")
        except Exception:
            out[mod] = "-"
    for dist in ("etcd-sdk-python", "etcd3"):
        try:
            from importlib.metadata import version

            out[dist] = version(dist)
        except Exception:
            out[dist] = "-"
    return out


def table(r: Dict[str, Any]) -> str:
    n, L, W = r["settings"]["keys"], r["load"], r["watch"]
    rows = [
        ("seed etcd (txns of 100 puts, 2 clients)", f"{r['seed_seconds']:.1f} s"),
        (
            f"KeySpace.load of {n:,} keys, pyetcd, in-process (best of {r['settings']['repeats']})",
            f"{L['pyetcd']['best_s']:.2f} s ({', '.join(f'{t:.2f}' for t in L['pyetcd']['times_s'])})",
        ),
    ]
    e3 = L["etcd3"]
    if "error" in e3:
        rows.append(("KeySpace.load, etcd3 0.12 (pure-Python protobuf, child)", f"failed: {e3['error']}"))
    else:
        rows.append(
            (
                f"KeySpace.load of {n:,} keys, etcd3 0.12, pure-Python protobuf, child process "
                f"(best of {r['settings']['repeats']})",
                f"{e3['best_s']:.2f} s ({', '.join(f'{t:.2f}' for t in e3['times_s'])})",
            )
        )
    rows += [
        (
            f"writer process: {W['events']:,} puts in txns of 100",
            f"{W['writer_seconds']:.2f} s ({W['writer_events_per_s']:,.0f} puts/s)",
        ),
        (
            "watch: writer's first put → last event applied",
            f"{W['start_to_last_applied_s']:.2f} s (**{W['events_per_s']:,.0f} events/s**)",
        ),
        ("watch: first → last update applied", f"{W['first_to_last_applied_s']:.2f} s"),
        (
            "watch: last event applied after the writer's last ack",
            f"{W['last_applied_after_writer_end_s'] * 1e3:.0f} ms",
        ),
        (
            "watch: updates (observer calls) / apply calls / watch responses",
            f"{W['updates']} / {W['apply_calls']} / {W['watch_responses']}",
        ),
        (
            "time inside KeySpace.apply while watching",
            f"{W['apply_seconds']:.2f} s ({W['apply_us_per_event']:.1f} µs/event)",
        ),
        (
            "direct apply of the captured responses, one call",
            f"{W['replay_one_call_s']:.2f} s ({W['replay_one_call_us_per_event']:.1f} µs/event)",
        ),
        (
            "direct apply, one call per response (100 events each)",
            f"{W['replay_per_response_s']:.2f} s ({W['replay_per_response_us_per_event']:.1f} µs/event)",
        ),
    ]
    lines = ["| measurement | result |", "| --- | --- |"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "load.json"))
    a = ap.parse_args(argv)
    results: Dict[str, Any] = {
        "settings": {
            "keys": a.keys,
            "events": a.events,
            "repeats": a.repeats,
            "value_bytes": len(value_of(1)),
            "page_size": 2000,
            "apply_delay_s": 0.030,
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": versions(),
    }
    with EtcdServer(extra_args=["--quota-backend-bytes", str(8 << 30)]) as srv:
        print(f"etcd at {srv.endpoint}; seeding {a.keys:,} keys ...", file=sys.stderr)
        results["seed_seconds"] = seed(srv.endpoint, a.keys)
        print("load with pyetcd ...", file=sys.stderr)
        results["load"] = {"pyetcd": load_pyetcd(srv.endpoint, a.repeats)}
        print("load with etcd3 (child process) ...", file=sys.stderr)
        results["load"]["etcd3"] = load_etcd3(srv.endpoint, a.repeats)
        print(f"watch throughput: {a.events:,} events ...", file=sys.stderr)
        results["watch"] = watch_throughput(srv.endpoint, a.keys, a.events)
    md = table(results)
    print(md)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nJSON: {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
