#!/usr/bin/env python3
"""Many hosts: K writers connected to etcd directly vs through one ``etcd grpc-proxy``.

    .venv/bin/python bench/fleet.py                          # K = 1, 10, 50 at 100k keys (~10 min)
    .venv/bin/python bench/fleet.py --writers 1,10 --keys 10000 --seconds 10 --out /tmp/fleet

Each writer is a real ``python -m shmkeyspace writer`` process (one simulated host:
its own snapshot name, the same prefix), all started at once. For every K and each
way of connecting (``direct`` to etcd, ``proxy``: all K through one proxy), measured
in the same run against one etcd holding ``--keys`` keys:

* **cold start**: spawn of all K → the last one has published its full snapshot;
  the etcd CPU seconds that took, in total and per writer (what a fleet restart
  costs etcd);
* **upstream watchers**: ``etcd_debugging_mvcc_watcher_total`` during the steady
  phase, minus what was there before the writers (a proxy adds 2 of its own, its
  lost-leader watches; reported separately);
* **etcd CPU seconds per minute** while ``--rate`` puts/s (single-key puts from two
  load processes) flow to every writer, next to the same puts with no writer at
  all (K = 0), so the difference is what the watchers cost etcd; the proxy's and
  the writers' CPU alongside;
* **put → visible**: a sampled put is acknowledged by etcd, then every writer's
  snapshot is polled until it holds that revision; p50/p99 over all (sample,
  writer) pairs, measured from before the put was sent.

The machine matters: on 2 cores, K writers each applying ``--rate`` events/s compete
for the same CPU as etcd, the proxy and the load; at K = 50 the writers alone need
more than 2 cores at 1k puts/s, so put → visible at K = 50 measures the host's CPU
queue, not etcd or the proxy (the report says so). Results go to
``--out/fleet.json`` and ``--out/fleet.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
for p in (ROOT, BENCH_DIR):
    if p not in sys.path:
        sys.path.insert(0, p)

from scenarios.common import ETCD_ARGS, key_of, make_value, seed  # noqa: E402

from shmkeyspace import Reader  # noqa: E402
from shmkeyspace._support import child_env, percentile  # noqa: E402
from shmkeyspace.errors import ShmKeyspaceError  # noqa: E402
from shmkeyspace.etcd import EtcdGrpcProxy, EtcdServer, connect, process_cpu_seconds, scrape_metrics  # noqa: E402

VALUE_SIZE = 100
WATCHERS = "etcd_debugging_mvcc_watcher_total"

#: A load process: single-key puts at a fixed rate for a fixed time, pipelined (up to
#: 64 in flight through the gRPC stub's futures: one Python thread cannot reach 1k
#: synchronous puts/s on a busy 2-core machine). Prints "ready", waits for a line
#: on stdin, puts, then prints one JSON line.
PUTTER = r"""
import json, random, sys, time
from collections import deque
from scenarios.common import key_of, make_value
from shmkeyspace.etcd import connect
import pyetcd.etcdrpc as rpc
endpoint, prefix, n, rate, seconds, tag = sys.argv[1:7]
n, rate, seconds = int(n), float(rate), float(seconds)
c = connect(endpoint, client="pyetcd")
stub = c.kvstub
rnd = random.Random(tag)
print("ready", flush=True)
sys.stdin.readline()
t0 = time.monotonic()
done = failed = 0
inflight = deque()
while True:
    now = time.monotonic()
    if now - t0 >= seconds:
        break
    while inflight and (inflight[0].done() or len(inflight) >= 64):
        f = inflight.popleft()
        try:
            f.result()
        except Exception:
            failed += 1
    if done >= int((now - t0) * rate):
        time.sleep(0.0005)
        continue
    i = rnd.randrange(n)
    req = rpc.PutRequest(key=key_of(prefix, i).encode(), value=make_value(i, 100, done + 1))
    inflight.append(stub.Put.future(req, 10))
    done += 1
for f in inflight:
    try:
        f.result()
    except Exception:
        failed += 1
print(json.dumps({"puts": done - failed, "failed": failed, "seconds": time.monotonic() - t0}), flush=True)
"""


class Load:
    """Two putter processes at ``rate / 2`` puts/s each, started together by :meth:`go`."""

    def __init__(self, endpoint: str, prefix: str, n: int, rate: float, seconds: float) -> None:
        self.procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    PUTTER,
                    endpoint,
                    prefix,
                    str(n),
                    str(rate / 2),
                    str(seconds),
                    f"p{i}",
                ],
                env=child_env([BENCH_DIR]),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        for p in self.procs:
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"putter failed to start: {line!r}")

    def go(self) -> None:
        for p in self.procs:
            p.stdin.write("go\n")
            p.stdin.flush()

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def finish(self) -> int:
        total = 0
        for p in self.procs:
            out, _ = p.communicate(timeout=120)
            total += json.loads(out.strip().splitlines()[-1])["puts"]
        return total


def _spawn_writers(endpoint: str, prefix: str, names: List[str], logdir: str, apply_delay: float):
    procs = []
    for name in names:
        log = open(os.path.join(logdir, f"{name}.log"), "w")
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "shmkeyspace",
                    "writer",
                    "--endpoints",
                    endpoint,
                    "--prefix",
                    prefix,
                    "--name",
                    name,
                    "--decoder",
                    "json",
                    "--apply-delay",
                    str(apply_delay),
                    "--unlink-on-exit",
                    "--log-level",
                    "warning",
                ],
                env=child_env([BENCH_DIR]),
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        )
        log.close()
    return procs


def _stop_all(procs: List[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def _cpu(pids: List[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += process_cpu_seconds(pid)
        except OSError:
            pass
    return total


def _watchers(etcd: EtcdServer) -> int:
    return int(scrape_metrics(etcd.metrics_url)[WATCHERS])


def _wait_cold_start(names: List[str], procs, n: int, timeout: float) -> Dict[str, Any]:
    """Attach to every snapshot as soon as it is published; returns readers and times."""
    t0 = time.monotonic()
    readers: Dict[str, Reader] = {}
    ready: Dict[str, float] = {}
    while len(readers) < len(names):
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{len(names) - len(readers)} writers not ready after {timeout}s")
        for name, proc in zip(names, procs):
            if name in readers:
                continue
            if proc.poll() is not None:
                raise RuntimeError(f"writer {name} exited with {proc.returncode}")
            try:
                r = Reader(name)
            except ShmKeyspaceError:
                continue
            if len(r) < n:  # only a complete load is ever published first
                raise AssertionError(f"{name}: first snapshot has {len(r)} keys, expected {n}")
            readers[name] = r
            ready[name] = time.monotonic() - t0
        time.sleep(0.01)
    return {"readers": readers, "ready": ready}


def run_one(
    etcd: EtcdServer, client: Any, mode: str, k: int, args: argparse.Namespace, logdir: str
) -> Dict[str, Any]:
    prefix, n = args.prefix, args.keys
    proxy: Optional[EtcdGrpcProxy] = None
    procs: List[subprocess.Popen] = []
    readers: Dict[str, Reader] = {}
    row: Dict[str, Any] = {"mode": mode, "writers": k, "keys": n}
    try:
        if mode == "proxy":
            proxy = EtcdGrpcProxy(etcd.endpoint).start()
            time.sleep(0.5)  # let its own watches settle before the baseline
        endpoint = proxy.endpoint if proxy else etcd.endpoint
        base = _watchers(etcd)
        row["watchers_before"] = base
        names = [f"fleet-{mode}-{k}-{i}" for i in range(k)]
        # -- cold start: all K at once -------------------------------------------------
        cpu0 = etcd.cpu_seconds()
        pcpu0 = proxy.cpu_seconds() if proxy else 0.0
        t0 = time.monotonic()
        if k:
            procs = _spawn_writers(endpoint, prefix, names, logdir, args.apply_delay)
            cold = _wait_cold_start(names, procs, n, timeout=600)
            readers = cold["readers"]
            row["cold_start_s"] = max(cold["ready"].values())
            row["cold_first_s"] = min(cold["ready"].values())
            row["cold_etcd_cpu_s"] = etcd.cpu_seconds() - cpu0
            row["cold_etcd_cpu_s_per_writer"] = row["cold_etcd_cpu_s"] / k
            row["cold_proxy_cpu_s"] = (proxy.cpu_seconds() - pcpu0) if proxy else None
        # -- steady: rate puts/s for S seconds --------------------------------------------
        time.sleep(1.0)
        wpids = [p.pid for p in procs]
        load = Load(etcd.endpoint, prefix, n, args.rate, args.seconds)
        cpu0, pcpu0, wcpu0 = etcd.cpu_seconds(), (proxy.cpu_seconds() if proxy else 0.0), _cpu(wpids)
        t0 = time.monotonic()
        load.go()
        lat: List[float] = []
        missing = 0
        watchers: List[int] = []
        sample_i = 0
        time.sleep(0.5)  # let the load reach its rate before sampling
        while load.running():
            watchers.append(_watchers(etcd))
            if not readers:
                time.sleep(1.0 / args.samples)
                continue
            i = (sample_i * 7919) % n
            sample_i += 1
            ts = time.monotonic()
            rev = client.put(key_of(prefix, i), make_value(i, VALUE_SIZE, -sample_i)).header.revision
            pending = dict(readers)
            deadline = ts + 10.0
            while pending and time.monotonic() < deadline:
                for name in list(pending):
                    if pending[name].revision >= rev:
                        lat.append(time.monotonic() - ts)
                        del pending[name]
                if pending:
                    time.sleep(0.0002)
            missing += len(pending)
            time.sleep(max(0.0, 1.0 / args.samples - (time.monotonic() - ts)))
        dt = time.monotonic() - t0
        cpu1, pcpu1, wcpu1 = etcd.cpu_seconds(), (proxy.cpu_seconds() if proxy else 0.0), _cpu(wpids)
        puts = load.finish()
        row["steady_seconds"] = dt
        row["puts_per_s"] = puts / dt
        row["etcd_cpu_s_per_min"] = (cpu1 - cpu0) / dt * 60
        row["proxy_cpu_s_per_min"] = ((pcpu1 - pcpu0) / dt * 60) if proxy else None
        row["writers_cpu_s_per_min"] = (wcpu1 - wcpu0) / dt * 60
        row["upstream_watchers"] = max(watchers) - base if watchers else 0
        row["upstream_watchers_last"] = watchers[-1] - base if watchers else 0
        row["proxy_own_watchers"] = (base - args.base_watchers) if proxy else 0
        if lat:
            row["visible_p50_ms"] = percentile(lat, 50) * 1e3
            row["visible_p99_ms"] = percentile(lat, 99) * 1e3
            row["visible_samples"] = len(lat)
        row["visible_missing"] = missing
        for name, p in zip(names, procs):
            if p.poll() is not None:
                raise RuntimeError(f"writer {name} exited with {p.returncode}")
        return row
    finally:
        for r in readers.values():
            r.close()
        _stop_all(procs)
        if proxy is not None:
            proxy.stop()


def markdown(res: Dict[str, Any]) -> str:
    s = res["settings"]
    out = [
        f"### Fleet: K writers direct vs through one etcd grpc-proxy ({s['keys']:,} keys, "
        f"{s['rate']:.0f} puts/s, apply delay {s['apply_delay']:g} ms)",
        "",
        "| K | connection | upstream watchers | cold start, all K (s) | etcd CPU for the cold start "
        "(s; per writer) | etcd CPU s/min at load | proxy CPU s/min | writers CPU s/min | "
        "put → visible p50 / p99 (ms) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in res["rows"]:
        k = r["writers"]
        own = r.get("proxy_own_watchers") or 0
        wat = f"{r['upstream_watchers']}" + (f" (+{own} proxy's own)" if own else "")
        cold = f"{r['cold_start_s']:.1f}" if k else "–"
        cold_cpu = f"{r['cold_etcd_cpu_s']:.2f}; {r['cold_etcd_cpu_s_per_writer']:.3f}" if k else "–"
        px = f"{r['proxy_cpu_s_per_min']:.1f}" if r.get("proxy_cpu_s_per_min") is not None else "–"
        vis = f"{r['visible_p50_ms']:.0f} / {r['visible_p99_ms']:.0f}" if "visible_p50_ms" in r else "–"
        if r.get("visible_missing"):
            vis += f" ({r['visible_missing']} not seen in 10 s)"
        out.append(
            f"| {k} | {r['mode']} | {wat} | {cold} | {cold_cpu} | {r['etcd_cpu_s_per_min']:.1f} | {px} | "
            f"{r['writers_cpu_s_per_min']:.1f} | {vis} |"
        )
    out += [
        "",
        f"Command: `{res['command']}`. {res['machine']}. K = 0 is the same load with no writer: "
        "the difference to it is what the watchers cost etcd. Upstream watchers: the most seen "
        "during the load, minus those present before the writers started.",
    ]
    return "\n".join(out) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--writers", default="1,10,50", help="comma-separated K values")
    ap.add_argument("--modes", default="direct,proxy")
    ap.add_argument("--rate", type=float, default=1000.0, help="puts/s during the steady phase")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the steady phase")
    ap.add_argument("--samples", type=float, default=5.0, help="visibility samples per second")
    ap.add_argument("--apply-delay", type=float, default=30.0, help="writers' --apply-delay, ms")
    ap.add_argument("--out", default=os.path.join(BENCH_DIR, "results"))
    args = ap.parse_args(argv)
    args.prefix = f"/fleet/{args.keys}"
    ks = [int(x) for x in args.writers.split(",") if x.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    rows = []
    logdir = tempfile.mkdtemp(prefix="shmkeyspace-fleet-")
    with EtcdServer(extra_args=ETCD_ARGS) as etcd:
        client = connect(etcd.endpoint)
        t = seed(client, args.prefix, args.keys, VALUE_SIZE)
        print(f"seeded {args.keys} keys in {t:.1f}s", file=sys.stderr)
        args.base_watchers = _watchers(etcd)
        rows.append(run_one(etcd, client, "none", 0, args, logdir))
        print(json.dumps(rows[-1]), file=sys.stderr)
        for k in ks:
            for mode in modes:
                rows.append(run_one(etcd, client, mode, k, args, logdir))
                print(json.dumps(rows[-1]), file=sys.stderr)
        client.close()
    res = {
        "settings": {
            "keys": args.keys,
            "rate": args.rate,
            "seconds": args.seconds,
            "apply_delay": args.apply_delay,
            "writers": ks,
            "modes": modes,
        },
        "command": "python bench/fleet.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform()}",
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fleet.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = markdown(res)
    with open(os.path.join(args.out, "fleet.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
