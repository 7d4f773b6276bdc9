"""Many hosts: K writers connected to etcd directly vs through one ``etcd grpc-proxy``.

    ./run bench --only fleet                          # K = 1, 10, 50 at 100k keys (~10 min)
    ./run bench --only fleet --writers 1,10 --keys 10000 --seconds 10 --out /tmp/fleet

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
* **etcd CPU seconds per minute idle**: the K writers with nothing changing (what
  their contact checks cost etcd);
* **etcd CPU seconds per minute** while ``--rate`` puts/s (single-key puts from two
  load processes) flow to every writer, next to the same puts with no writer at
  all (K = 0), so the difference is what the watchers cost etcd; the proxy's and
  the writers' CPU alongside;
* **put → visible**: a sampled put is acknowledged by etcd, then every writer's
  snapshot is polled until it holds that revision; p50/p99 over all (sample,
  writer) pairs, measured from before the put was sent.

The machine matters: on 2 cores, K writers each applying ``--rate`` events/s compete
for the same CPU as etcd, the proxy and the load; 50 writer processes at 100k keys
need more than 2 cores (and ~10 GB), so from ``--mirrors-from`` (default 50) on the
hosts are stand-ins: KeySpaces, 10 to a process, each with its own client, making
the same requests of etcd as a writer (load, watch, contact checks) without the
publication to shared memory. Wall-clock figures (cold start, put → visible) measure
the machine's CPU queue as much as etcd or the proxy; etcd's CPU seconds and the
watcher counts are the figures to compare. Results go to ``--out/fleet.json`` and
``--out/fleet.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(BENCH_DIR)
for p in (ROOT, BENCH_DIR):
    if p not in sys.path:
        sys.path.insert(0, p)

from scenarios.common import ETCD_ARGS, key_of, make_value, seed  # noqa: E402
from shmkeyspace import Reader  # noqa: E402
from shmkeyspace.children import child_env, percentile, writer_command  # noqa: E402
from shmkeyspace.embedded import EtcdGrpcProxy, EtcdServer, process_cpu_seconds, scrape_metrics  # noqa: E402
from shmkeyspace.errors import ShmKeyspaceError  # noqa: E402
from shmkeyspace.etcd import connect  # noqa: E402

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


def _spawn_writers(
    endpoint: str, prefix: str, names: List[str], logdir: str, apply_delay: float, timeout: float
) -> List[subprocess.Popen]:
    procs = []
    for name in names:
        log = open(os.path.join(logdir, f"{name}.log"), "w")
        procs.append(
            subprocess.Popen(
                [
                    *writer_command(endpoint, prefix, name, python=sys.executable),
                    "--decoder",
                    "json",
                    "--apply-delay",
                    str(apply_delay),
                    "--timeout",
                    str(timeout),
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


#: Stand-in hosts for large K (``--kind mirror``): COUNT KeySpaces in one process, each
#: with its own etcd client (its own connection and watch stream, as a separate host
#: has), loading at once on threads and then watching: the same requests a writer
#: makes of etcd, without the publication to shared memory. Every update is recorded
#: as (revision, CLOCK_MONOTONIC time), which is system-wide, so the parent computes
#: put -> applied from its own clock. Prints one JSON line when all have loaded;
#: "report" on stdin prints the histories.
MIRRORS = r"""
import json, sys, threading, time
from shmkeyspace.etcd import connect
from shmkeyspace.keyspace import KeySpace
from shmkeyspace.load import backoff
endpoint, prefix, count, apply_delay = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
timeout = float(sys.argv[5])
ready = [None] * count
hist = [[] for _ in range(count)]
retries = [0] * count
connects = [0] * count
page_retries = [0] * count
stop = threading.Event()
def host(i):
    ks = KeySpace(prefix, lambda kv: json.loads(kv.value))
    ks.watch_apply_delay = apply_delay
    h = hist[i]
    ks.observers.append(lambda: h.append((ks.header.revision, time.monotonic())))
    c = None
    failed = 0
    while True:  # a failed load starts again after a jittered backoff, as Writer.load does
        try:
            c = c or connect(endpoint, timeout=timeout)
        except Exception as exc:
            connects[i] += 1
            failed += 1
            print(f"host {i}: connect failed ({type(exc).__name__}: {exc}); retrying", file=sys.stderr)
            time.sleep(backoff(failed, 1.0, 30.0))
            continue
        try:
            ks.load(c)
            break
        except Exception as exc:
            retries[i] += 1
            failed += 1
            print(f"host {i}: load failed ({type(exc).__name__}: {exc}); restarting it", file=sys.stderr)
            time.sleep(backoff(failed, 1.0, 30.0))
    page_retries[i] = ks.load_status.page_retries
    ready[i] = time.monotonic()
    ks.watch(c, stop)
threads = [threading.Thread(target=host, args=(i,), daemon=True) for i in range(count)]
for t in threads:
    t.start()
while any(r is None for r in ready):
    time.sleep(0.01)
print(json.dumps({"ready": ready, "retries": sum(retries), "page_retries": sum(page_retries),
                  "connect_failures": sum(connects)}), flush=True)
for line in sys.stdin:
    if line.strip() == "report":
        print(json.dumps({"hist": hist}), flush=True)
stop.set()
"""


#: Watch fan-out alone (``--fanout``): COUNT bare watches of the prefix, each on its own
#: client, that only count events (no decoding, no mirror), so the host's CPU goes to
#: etcd and the proxy rather than to K Python mirrors. Prints "ready", then on a line
#: from stdin the events received.
FANOUT = r"""
import json, sys
from shmkeyspace.etcd import connect
endpoint, prefix, count = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3])
got = [0] * count
def counter(i):
    def cb(resp):
        got[i] += len(getattr(resp, "events", ()))
    return cb
clients = [connect(endpoint) for _ in range(count)]
for i, c in enumerate(clients):
    c.add_watch_prefix_callback(prefix, counter(i))
print("ready", flush=True)
sys.stdin.readline()
print(json.dumps({"events": sum(got)}), flush=True)
"""


def run_fanout(etcd: EtcdServer, mode: str, k: int, args: argparse.Namespace) -> Dict[str, Any]:
    """etcd's (and the proxy's) CPU for K bare watches while ``--rate`` puts/s flow."""
    proxy = EtcdGrpcProxy(etcd.endpoint).start() if mode == "proxy" else None
    child = None
    row: Dict[str, Any] = {"mode": mode, "watches": k, "loadavg_before": os.getloadavg()[0]}
    try:
        base = _watchers(etcd)
        if k:
            child = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    FANOUT,
                    proxy.endpoint if proxy else etcd.endpoint,
                    args.prefix,
                    str(k),
                ],
                env=child_env([BENCH_DIR]),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError("fan-out child failed")
        time.sleep(1.0)
        load = Load(etcd.endpoint, args.prefix, args.keys, args.rate, args.seconds)
        cpu0, pcpu0 = etcd.cpu_seconds(), (proxy.cpu_seconds() if proxy else 0.0)
        t0 = time.monotonic()
        load.go()
        watchers = []
        while load.running():
            time.sleep(1.0)
            watchers.append(_watchers(etcd))
        dt = time.monotonic() - t0
        cpu1, pcpu1 = etcd.cpu_seconds(), (proxy.cpu_seconds() if proxy else 0.0)
        puts = load.finish()
        events = 0
        if child is not None:
            time.sleep(1.0)
            child.stdin.write("report\n")
            child.stdin.flush()
            events = json.loads(child.stdout.readline())["events"]
        row.update(
            seconds=dt,
            puts_per_s=puts / dt,
            events_delivered_per_s=events / dt,
            etcd_cpu_s_per_min=(cpu1 - cpu0) / dt * 60,
            proxy_cpu_s_per_min=((pcpu1 - pcpu0) / dt * 60) if proxy else None,
            upstream_watchers=(max(watchers) - base) if watchers else 0,
            loadavg_after=os.getloadavg()[0],
        )
        return row
    finally:
        if child is not None:
            try:
                child.stdin.close()
            except OSError:
                pass
            _stop_all([child])
        if proxy is not None:
            proxy.stop()


def markdown_fanout(res: Dict[str, Any]) -> str:
    out = [
        f"### Watch fan-out: K bare watches, {res['settings']['rate']:.0f} puts/s asked",
        "",
        "| K watches | connection | upstream watchers | puts/s reached | events delivered/s | "
        "etcd CPU (s/min) | etcd CPU scaled to 1k puts/s (s/min) | proxy CPU scaled to 1k puts/s (s/min) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in res["fanout"]:
        scale = 1000 / r["puts_per_s"] if r["puts_per_s"] else float("nan")
        px = f"{r['proxy_cpu_s_per_min'] * scale:.1f}" if r.get("proxy_cpu_s_per_min") is not None else "–"
        per = r["etcd_cpu_s_per_min"] * scale
        out.append(
            f"| {r['watches']} | {r['mode']} | {r['upstream_watchers']} | {r['puts_per_s']:.0f} | "
            f"{r['events_delivered_per_s']:.0f} | {r['etcd_cpu_s_per_min']:.1f} | {per:.1f} | {px} |"
        )
    out += [
        "",
        f"Command: `{res['command']}`. Bare watches (count events, no decoding), each on its own client, "
        "in one process, so the host's CPU goes to etcd and the proxy; that one process still cannot "
        "take every event at K = 50 (events delivered < K × puts), and the put rate fell with it. "
        '"Scaled": CPU per put × 1,000 × 60, an estimate of the cost at 1k puts/s. Upstream watchers '
        "exclude the proxy's own 2. Load average during the run: "
        f"{min(r['loadavg_before'] for r in res['fanout']):.0f}–"
        f"{max(r['loadavg_after'] for r in res['fanout']):.0f}.",
    ]
    return "\n".join(out) + "\n"


class WriterFleet:
    """K real writer processes (``python -m shmkeyspace writer``), read through Readers."""

    kind = "writer"

    def __init__(self, names: List[str], n: int) -> None:
        self.names, self.n = names, n
        self.procs: List[subprocess.Popen] = []
        self.readers: Dict[str, Reader] = {}

    def start(self, endpoint: str, prefix: str, logdir: str, apply_delay_ms: float, timeout: float) -> None:
        self.procs = _spawn_writers(endpoint, prefix, self.names, logdir, apply_delay_ms, timeout)

    def wait_ready(self, t0: float, timeout: float) -> List[float]:
        cold = _wait_cold_start(self.names, self.procs, self.n, timeout)
        self.readers = cold["readers"]
        return list(cold["ready"].values())

    def pids(self) -> List[int]:
        return [p.pid for p in self.procs]

    def sample(self, rev: int, ts: float, lat: List[float], timeout: float = 10.0) -> int:
        """Poll every snapshot until it holds ``rev``; returns how many never did."""
        pending = dict(self.readers)
        while pending and time.monotonic() < ts + timeout:
            for name in list(pending):
                if pending[name].revision >= rev:
                    lat.append(time.monotonic() - ts)
                    del pending[name]
            if pending:
                time.sleep(0.0002)
        return len(pending)

    def latencies(self, lat: List[float]) -> int:
        return 0

    def check(self) -> None:
        for name, p in zip(self.names, self.procs):
            if p.poll() is not None:
                raise RuntimeError(f"writer {name} exited with {p.returncode}")

    def stop(self) -> None:
        for r in self.readers.values():
            r.close()
        _stop_all(self.procs)


class MirrorFleet:
    """K stand-in hosts (KeySpaces, ``per_proc`` to a process): what etcd sees of K writers."""

    kind = "mirror"

    def __init__(self, k: int, per_proc: int = 10) -> None:
        self.k, self.per_proc = k, per_proc
        self.procs: List[subprocess.Popen] = []
        self.samples: List[Any] = []
        self.load_retries = 0
        self.page_retries = 0
        self.connect_failures = 0

    def start(self, endpoint: str, prefix: str, logdir: str, apply_delay_ms: float, timeout: float) -> None:
        for start in range(0, self.k, self.per_proc):
            count = min(self.per_proc, self.k - start)
            self.procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        MIRRORS,
                        endpoint,
                        prefix,
                        str(count),
                        str(apply_delay_ms / 1000),
                        str(timeout),
                    ],
                    env=child_env([BENCH_DIR]),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )

    def wait_ready(self, t0: float, timeout: float) -> List[float]:
        ready: List[float] = []
        for p in self.procs:
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"mirror process exited with {p.wait()}")
            msg = json.loads(line)
            ready += [t - t0 for t in msg["ready"]]
            self.load_retries += msg["retries"]
            self.page_retries += msg.get("page_retries", 0)
            self.connect_failures += msg.get("connect_failures", 0)
        return ready

    def pids(self) -> List[int]:
        return [p.pid for p in self.procs]

    def sample(self, rev: int, ts: float, lat: List[float], timeout: float = 10.0) -> int:
        self.samples.append((rev, ts))
        time.sleep(0.05)
        return 0

    def latencies(self, lat: List[float], timeout: float = 10.0) -> int:
        missing = 0
        for p in self.procs:
            p.stdin.write("report\n")
            p.stdin.flush()
            for h in json.loads(p.stdout.readline())["hist"]:
                for rev, ts in self.samples:
                    t = next((t for r, t in h if r >= rev and t >= ts), None)
                    if t is None or t - ts > timeout:
                        missing += 1
                    else:
                        lat.append(t - ts)
        return missing

    def check(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"mirror process exited with {p.returncode}")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.stdin.close()
                except OSError:
                    pass
        _stop_all(self.procs)


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
    kind = "mirror" if k >= args.mirrors_from else "writer"
    fleet: Any = (
        WriterFleet([f"fleet-{mode}-{k}-{i}" for i in range(k)], n) if kind == "writer" else MirrorFleet(k)
    )
    row: Dict[str, Any] = {
        "mode": mode,
        "writers": k,
        "kind": kind,
        "keys": n,
        "loadavg_before": os.getloadavg()[0],
    }
    try:
        if mode == "proxy":
            proxy = EtcdGrpcProxy(etcd.endpoint).start()
            time.sleep(0.5)  # let its own watches settle before the baseline
        endpoint = proxy.endpoint if proxy else etcd.endpoint
        base = _watchers(etcd)
        row["watchers_before"] = base
        # -- cold start: all K at once -------------------------------------------------
        cpu0 = etcd.cpu_seconds()
        pcpu0 = proxy.cpu_seconds() if proxy else 0.0
        t0 = time.monotonic()
        if k:
            fleet.start(endpoint, prefix, logdir, args.apply_delay, args.timeout)
            ready = fleet.wait_ready(t0, timeout=900)
            row["cold_start_s"] = max(ready)
            row["cold_first_s"] = min(ready)
            row["cold_etcd_cpu_s"] = etcd.cpu_seconds() - cpu0
            row["cold_etcd_cpu_s_per_writer"] = row["cold_etcd_cpu_s"] / k
            row["cold_proxy_cpu_s"] = (proxy.cpu_seconds() - pcpu0) if proxy else None
            row["cold_load_retries"] = getattr(fleet, "load_retries", 0)
            row["cold_page_retries"] = getattr(fleet, "page_retries", 0)
            row["cold_connect_failures"] = getattr(fleet, "connect_failures", 0)
        # -- idle: what K writers cost etcd with nothing changing (contact probes) ------
        time.sleep(1.0)
        wpids = fleet.pids() if k else []
        cpu0, t0 = etcd.cpu_seconds(), time.monotonic()
        time.sleep(args.idle_seconds)
        row["idle_etcd_cpu_s_per_min"] = (etcd.cpu_seconds() - cpu0) / (time.monotonic() - t0) * 60
        # -- steady: rate puts/s for S seconds --------------------------------------------
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
            if not k:
                time.sleep(1.0 / args.samples)
                continue
            i = (sample_i * 7919) % n
            sample_i += 1
            ts = time.monotonic()
            rev = client.put(key_of(prefix, i), make_value(i, VALUE_SIZE, -sample_i)).header.revision
            missing += fleet.sample(rev, ts, lat)
            time.sleep(max(0.0, 1.0 / args.samples - (time.monotonic() - ts)))
        dt = time.monotonic() - t0
        cpu1, pcpu1, wcpu1 = etcd.cpu_seconds(), (proxy.cpu_seconds() if proxy else 0.0), _cpu(wpids)
        puts = load.finish()
        if k:
            time.sleep(1.0)
            missing += fleet.latencies(lat)
            fleet.check()
        row["loadavg_after"] = os.getloadavg()[0]
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
        return row
    finally:
        fleet.stop()
        if proxy is not None:
            proxy.stop()


def markdown(res: Dict[str, Any]) -> str:
    s = res["settings"]
    out = [
        f"### Fleet: K writers direct vs through one etcd grpc-proxy ({s['keys']:,} keys, "
        f"{s['rate']:.0f} puts/s asked, apply delay {s['apply_delay']:g} ms)",
        "",
        "| K | connection | upstream watchers | cold start, all K (s) | etcd CPU for the cold start, "
        "total; per host (s) | etcd CPU idle (s/min) | puts/s reached | etcd CPU at load (s/min) | "
        "same, per 1k puts/s | proxy CPU (s/min) | writers CPU (s/min) | put → visible p50 / p99 (ms) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in res["rows"]:
        k = r["writers"]
        own = r.get("proxy_own_watchers") or 0
        wat = f"{r['upstream_watchers']}" + (f" (+{own} proxy's own)" if own else "")
        cold = f"{r['cold_start_s']:.1f}" if k else "–"
        if "cold_page_retries" in r:
            cold += (
                f" ({r['cold_load_retries']} loads restarted from the first page, "
                f"{r['cold_page_retries']} pages retried, {r['cold_connect_failures']} connects failed)"
            )
        elif r.get("cold_load_retries"):
            cold += f" ({r['cold_load_retries']} loads timed out and retried)"
        cold_cpu = f"{r['cold_etcd_cpu_s']:.2f}; {r['cold_etcd_cpu_s_per_writer']:.3f}" if k else "–"
        px = f"{r['proxy_cpu_s_per_min']:.1f}" if r.get("proxy_cpu_s_per_min") is not None else "–"
        vis = f"{r['visible_p50_ms']:.0f} / {r['visible_p99_ms']:.0f}" if "visible_p50_ms" in r else "–"
        if r.get("visible_missing"):
            vis += f" ({r['visible_missing']} not seen in 10 s)"
        star = "*" if r.get("kind") == "mirror" else ""
        per_k = r["etcd_cpu_s_per_min"] * 1000 / r["puts_per_s"] if r.get("puts_per_s") else float("nan")
        out.append(
            f"| {k}{star} | {r['mode']} | {wat} | {cold} | {cold_cpu} | {r['idle_etcd_cpu_s_per_min']:.2f} | "
            f"{r['puts_per_s']:.0f} | {r['etcd_cpu_s_per_min']:.1f} | {per_k:.1f} | {px} | "
            f"{r['writers_cpu_s_per_min']:.1f} | {vis} |"
        )
    rows = res["rows"]
    out += [
        "",
        f"Command: `{res['command']}`. {res['machine']}. K = 0 is the same load with no writer: "
        "the difference to it is what the watchers cost etcd. Upstream watchers: the most seen "
        'during the load, minus those present before the writers started. "per 1k puts/s": etcd\'s '
        "CPU at load scaled to the 1k puts/s asked for (the machine did not always reach it). "
        "\\* stand-in hosts: K KeySpaces, 10 to a process, each with its own client (the same "
        "requests a writer makes of etcd, without publishing to shared memory); put → visible is "
        "put → applied in the KeySpace. Load average of the machine during the run: "
        f"{min(r['loadavg_before'] for r in rows):.0f}–{max(r.get('loadavg_after', 0) for r in rows):.0f} "
        f"on {res['machine'].split()[0]} CPUs (other work was running: wall-clock figures, cold "
        "start and put → visible, are inflated by it; CPU seconds and watcher counts much less).",
    ]
    return "\n".join(out) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--writers", default="1,10,50", help="comma-separated K values")
    ap.add_argument("--modes", default="direct,proxy")
    ap.add_argument("--rate", type=float, default=1000.0, help="puts/s during the steady phase")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the steady phase")
    ap.add_argument("--idle-seconds", type=float, default=10.0, help="length of the idle phase")
    ap.add_argument("--samples", type=float, default=5.0, help="visibility samples per second")
    ap.add_argument("--apply-delay", type=float, default=30.0, help="writers' --apply-delay, ms")
    ap.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="writers' etcd request timeout, s (default 60: K full loads at once on a busy 2-core "
        "machine overran the CLI's default 10 s)",
    )
    ap.add_argument(
        "--mirrors-from",
        type=int,
        default=50,
        help="from this K on, stand-in hosts (KeySpaces, 10 per process: the same requests to etcd, "
        "no shared-memory publication) instead of writer processes",
    )
    ap.add_argument("--out", default=os.path.join(BENCH_DIR, "results"))
    ap.add_argument(
        "--render", metavar="JSON", help="only print the table of an earlier run (fleet.json or fanout.json)"
    )
    ap.add_argument(
        "--fanout",
        action="store_true",
        help="only the watch fan-out: K bare watches (K = --writers, plus 0), direct vs proxy, "
        "etcd's CPU under the put load; writes fanout.json/fanout.md",
    )
    args = ap.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            res = json.load(f)
        print((markdown_fanout if "fanout" in res else markdown)(res), end="")
        return 0
    # SIGTERM runs the finally blocks too: no etcd, proxy or writer is left behind.
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    args.prefix = f"/fleet/{args.keys}"
    ks = [int(x) for x in args.writers.split(",") if x.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.fanout:
        return _fanout(args, ks, modes, argv)
    rows = []
    logdir = tempfile.mkdtemp(prefix="shmkeyspace-fleet-")
    try:
        return _run(args, ks, modes, rows, logdir, argv)
    finally:
        shutil.rmtree(logdir, ignore_errors=True)


def _fanout(args: argparse.Namespace, ks: List[int], modes: List[str], argv) -> int:
    rows = []
    with EtcdServer(extra_args=ETCD_ARGS) as etcd:
        client = connect(etcd.endpoint)
        t = seed(client, args.prefix, args.keys, VALUE_SIZE)
        client.close()
        print(f"seeded {args.keys} keys in {t:.1f}s", file=sys.stderr)
        for k in [0, *ks]:
            for mode in ["direct"] if k == 0 else modes:
                rows.append(run_fanout(etcd, mode, k, args))
                print(json.dumps(rows[-1]), file=sys.stderr)
    res = {
        "settings": {"keys": args.keys, "rate": args.rate, "seconds": args.seconds, "watches": ks},
        "command": "./run bench --only fleet " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform()}",
        "fanout": rows,
    }
    _save(args.out, "fanout", res, markdown_fanout(res))
    return 0


def _save(out: str, stem: str, res: Dict[str, Any], md: str) -> None:
    """Write ``out/stem.json`` and ``out/stem.md``; print the table."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, stem + ".json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out, stem + ".md"), "w") as f:
        f.write(md)
    print(md)


def _run(
    args: argparse.Namespace, ks: List[int], modes: List[str], rows: List[Any], logdir: str, argv
) -> int:
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
            "idle_seconds": args.idle_seconds,
            "timeout": args.timeout,
            "mirrors_from": args.mirrors_from,
            "writers": ks,
            "modes": modes,
        },
        "command": "./run bench --only fleet " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform()}",
        "rows": rows,
    }
    _save(args.out, "fleet", res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
