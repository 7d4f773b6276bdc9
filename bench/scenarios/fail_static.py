"""Fail static figures: warm start, restart behind etcd, persist cost (a script, not a test).

    ./run bench --only fail_static --keys 1000000          # the issue 12 figures (~10 min on 2 cores)
    ./run bench --only fail_static --keys 20000 --events 2000 --steady 10   # a quick run

One run, one private loopback etcd, real ``shmkeyspace writer`` processes with
``--decoder json --state-dir``, keys seeded with ``load.seed`` (~110 B JSON):

1. **cold start**: spawn -> first full snapshot readable, loading from etcd
   (empty state dir); then the time until the first state file exists;
2. **live apply**: with that writer running, a burst of ``--events`` puts
   (transactions of 100, one client) -> the time from the first put to the
   last one published, and etcd's own ack time for the burst (``--repeat``
   bursts; the median is the figure);
3. **persist cost**: ``--steady`` seconds of 1k puts/s (transactions of 10
   every 10 ms) against the writer at the default ``--persist-interval`` (5 s),
   then the same against a writer that never persists during the window
   (``--persist-interval 1e6``): writer CPU seconds per minute (user+sys from
   /proc) of both, and the persist threads' own CPU as the writer counts it;
4. **restart behind**, ``--repeat`` times: SIGTERM (the writer persists on
   exit), segments unlinked (a reboot), ``--events`` puts while no writer
   runs, then a new writer: spawn -> the disk snapshot readable (warm start),
   spawn -> caught up with etcd (readers at etcd's revision and source
   "etcd"), and whether any full load happened (the writer's log). Medians
   are the figures; every sample is in the JSON.

The package's bytecode is compiled first (``compileall``), as ``pip install``
leaves it: where PYTHONDONTWRITEBYTECODE is set (this sandbox) every writer
would otherwise compile its modules at start, ~0.12 s more on a warm start.

Prints a markdown table; writes JSON to ``--out`` (default bench/results/fail_static.json).
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from bench.scenarios.load import PREFIX, key_of, seed, value_of  # noqa: E402
from shmkeyspace import Reader, state, writerlock  # noqa: E402
from shmkeyspace.children import writer_command  # noqa: E402
from shmkeyspace.embedded import EtcdServer  # noqa: E402
from shmkeyspace.etcd import connect  # noqa: E402

NAME = "bench-fail-static"
FULL_LOAD = "full load #"


_LIVE: List["WriterProc"] = []  # killed on the way out, whatever happens


class WriterProc:
    def __init__(self, endpoint: str, state_dir: str, log_path: str, *extra: str) -> None:
        _LIVE.append(self)
        self.log_path = log_path
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env = {k: v for k, v in env.items() if not k.startswith("SHMKEYSPACE_")}
        self.t_spawn = time.monotonic()
        self.wall_spawn = time.time()
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *writer_command(endpoint, PREFIX, NAME, python=sys.executable),
                    "--decoder",
                    "json",
                    "--state-dir",
                    state_dir,
                    "--log-level",
                    "debug",
                    # Pages of ~32 MB and the resume's sorted Range on a loaded 2-core
                    # machine can pass the default 10 s request timeout.
                    "--timeout",
                    "120",
                    *extra,
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait(self, pred, what: str, timeout: float = 1800.0) -> float:
        """Seconds from spawn until ``pred(reader_health)`` holds."""
        deadline = time.monotonic() + timeout
        r: Optional[Reader] = None
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"writer exited ({self.proc.returncode}) before {what}:\n{self.log()[-3000:]}"
                    )
                try:
                    if r is None:
                        r = Reader(NAME)
                    h = r.health()
                    if h.writer_pid == self.proc.pid and h.published_at >= self.wall_spawn and pred(h):
                        return time.monotonic() - self.t_spawn
                except Exception:
                    if r is not None:
                        r.close()
                        r = None
                time.sleep(0.005)
        finally:
            if r is not None:
                r.close()
        raise RuntimeError(f"no {what} in {timeout}s:\n{self.log()[-3000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(300)
        return self.proc.returncode


def etcd_revision(c: Any) -> int:
    return int(c.get_response(b"\0bench").header.revision)


def burst(endpoint: str, n: int, events: int, version: int) -> Dict[str, float]:
    """``events`` puts over existing keys in transactions of 100; etcd's ack time."""
    c = connect(endpoint)
    try:
        txns = []
        for start in range(0, events, 100):
            txns.append(
                [
                    c.transactions.put(key_of(j * 7919 % n), value_of(j * 7919 % n, version))
                    for j in range(start, min(events, start + 100))
                ]
            )
        t0 = time.monotonic()
        for ops in txns:
            c.transaction(compare=[], success=ops, failure=[])
        t1 = time.monotonic()
        return {"t_start": t0, "ack_s": t1 - t0, "last_revision": etcd_revision(c)}
    finally:
        c.close()


def steady(endpoint: str, n: int, seconds: float, rate: int = 1000) -> int:
    """Put ``rate`` keys/s for ``seconds`` (transactions of 10 every 10 ms); returns puts made."""
    c = connect(endpoint)
    made = 0
    try:
        t0 = time.monotonic()
        i = 0
        per = max(1, rate // 100)
        while time.monotonic() - t0 < seconds:
            ops = [c.transactions.put(key_of((i + k) * 104729 % n), value_of(i + k, 7)) for k in range(per)]
            c.transaction(compare=[], success=ops, failure=[])
            i += per
            made += per
            nxt = t0 + made / rate
            delay = nxt - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    finally:
        c.close()
    return made


def cpu_under_load(w: WriterProc, endpoint: str, n: int, seconds: float) -> Dict[str, float]:
    c0 = w.cpu_seconds()
    t0 = time.monotonic()
    made = steady(endpoint, n, seconds)
    dt = time.monotonic() - t0
    c1 = w.cpu_seconds()
    return {"cpu_s_per_min": (c1 - c0) / dt * 60, "puts": made, "seconds": dt, "puts_per_s": made / dt}


def last_persist_cpu(log: str) -> float:
    """The writer's own count of persist CPU (writing + capturing), from its last debug line."""
    import re

    found = re.findall(r"persist CPU so far ([\d.]+) s \(writing\) \+ ([\d.]+) s \(capturing\)", log)
    return float(found[-1][0]) + float(found[-1][1]) if found else 0.0


def run(keys: int, events: int, steady_s: float, out: str, repeat: int = 3) -> Dict[str, Any]:
    res: Dict[str, Any] = {"keys": keys, "events": events, "steady_seconds": steady_s, "repeat": repeat}
    tmp = tempfile.mkdtemp(prefix="shmks-failstatic-")
    try:
        return _run(keys, events, steady_s, out, res, tmp, repeat)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(
    keys: int, events: int, steady_s: float, out: str, res: Dict[str, Any], tmp: str, repeat: int
) -> Dict[str, Any]:
    d = os.path.join(tmp, "state")
    compileall.compile_dir(os.path.join(ROOT, "shmkeyspace"), quiet=1)
    logs = os.path.join(tmp, "writer.log")
    try:
        writerlock.unlink_all(NAME)
    except Exception:
        pass
    with EtcdServer(extra_args=["--quota-backend-bytes", str(8 << 30)]) as etcd:
        ep = etcd.endpoint
        res["seed_s"] = seed(ep, keys)
        c = connect(ep)
        rev0 = etcd_revision(c)
        # 1. cold start
        w = WriterProc(ep, d, logs)
        res["cold_start_s"] = w.wait(lambda h: h.revision >= rev0 and h.source == "etcd", "cold snapshot")
        t = time.monotonic()
        while state.load(d, NAME, PREFIX, "json")[0] is None:
            time.sleep(0.05)
        res["first_persist_after_publish_s"] = time.monotonic() - t
        res["state_file_bytes"] = os.path.getsize(state.path_for(d, NAME))
        # 2. live apply of a burst
        lives, acks = [], []
        for k in range(repeat):
            b = burst(ep, keys, events, 1 + k)
            lives.append(
                w.wait(lambda h, rev=b["last_revision"]: h.revision >= rev, "live burst")
                + w.t_spawn
                - b["t_start"]
            )
            acks.append(b["ack_s"])
        res["live_apply_samples"] = lives
        res["live_apply_s"] = statistics.median(lives)
        res["burst_ack_s"] = statistics.median(acks)
        # 3. persist cost at the default interval, then a writer that does not persist
        res["cpu_persisting"] = cpu_under_load(w, ep, keys, steady_s)
        res["cpu_persisting"]["persist_thread_cpu_s"] = last_persist_cpu(w.log())
        # 4. restart behind by `events`, `repeat` times
        warms, restarts, full_loads, resumed = [], [], 0, True
        for k in range(repeat):
            assert w.stop() == 0
            writerlock.unlink_all(NAME)
            b2 = burst(ep, keys, events, 10 + k)
            file_rev = state.read(d, NAME, PREFIX, "json").revision
            start_len = len(open(logs, errors="replace").read())
            w = WriterProc(ep, d, logs)
            warms.append(w.wait(lambda h, rev=file_rev: h.revision >= rev, "disk snapshot"))
            restarts.append(
                w.wait(
                    lambda h, rev=b2["last_revision"]: h.revision >= rev and h.source == "etcd", "catch-up"
                )
            )
            log2 = w.log()[start_len:]
            full_loads += log2.count(FULL_LOAD) + log2.count("loaded '")
            resumed = resumed and "no full load" in log2
        res["warm_start_samples"] = warms
        res["warm_start_s"] = statistics.median(warms)
        res["warm_start_source"] = "disk"
        res["restart_samples"] = restarts
        res["restart_caught_up_s"] = statistics.median(restarts)
        res["restart_burst_ack_s"] = b2["ack_s"]
        res["restart_full_loads"] = full_loads
        res["restart_resumed"] = resumed
        # 3b. baseline CPU: same load, nothing persisted during the window
        assert w.stop() == 0
        w3 = WriterProc(ep, d, logs, "--persist-interval", "1000000")
        w3.wait(lambda h: h.source == "etcd", "baseline writer")
        res["cpu_not_persisting"] = cpu_under_load(w3, ep, keys, steady_s)
        w3.stop()
        writerlock.unlink_all(NAME)  # writers keep their segments on exit; the bench does not
        c.close()
    res["persist_cpu_s_per_min"] = (
        res["cpu_persisting"]["cpu_s_per_min"] - res["cpu_not_persisting"]["cpu_s_per_min"]
    )
    res["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg": os.getloadavg(),
    }
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    res["log"] = os.path.splitext(out)[0] + ".writer.log"
    shutil.copyfile(logs, res["log"])
    shutil.rmtree(tmp, ignore_errors=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    return res


def _samples(xs: List[float]) -> str:
    return "median of " + ", ".join(f"{x:.2f}" for x in xs)


def table(r: Dict[str, Any]) -> str:
    cold, warm = r["cold_start_s"], r["warm_start_s"]
    rows = [
        ("keys / state file", f"{r['keys']:,} / {r['state_file_bytes'] / 2**20:.0f} MiB"),
        ("cold start (spawn -> full snapshot from etcd)", f"{cold:.2f} s"),
        (
            "warm start (spawn -> full snapshot from disk)",
            f"{warm:.2f} s = {warm / cold:.1%} of cold (target <= 1.5 s, <= 5%); "
            f"{_samples(r['warm_start_samples'])}",
        ),
        (
            f"live writer: {r['events']:,} puts applied (first put -> last published)",
            f"{r['live_apply_s']:.2f} s (etcd acked them in {r['burst_ack_s']:.2f} s); "
            f"{_samples(r['live_apply_samples'])}",
        ),
        (
            f"restart behind by {r['events']:,} events: spawn -> caught up",
            f"{r['restart_caught_up_s']:.2f} s = {r['restart_caught_up_s'] / r['live_apply_s']:.2f}x the live apply "
            f"(target <= 2x); full loads: {r['restart_full_loads']}; {_samples(r['restart_samples'])}",
        ),
        (
            "writer CPU under 1k puts/s, persisting every 5 s",
            f"{r['cpu_persisting']['cpu_s_per_min']:.2f} CPU s/min "
            f"({r['cpu_persisting']['puts_per_s']:.0f} puts/s)",
        ),
        (
            "same, not persisting",
            f"{r['cpu_not_persisting']['cpu_s_per_min']:.2f} CPU s/min "
            f"({r['cpu_not_persisting']['puts_per_s']:.0f} puts/s)",
        ),
        (
            "persist cost (difference; writer's own count)",
            f"{r['persist_cpu_s_per_min']:.2f} CPU s/min = {r['persist_cpu_s_per_min'] / 60:.1%} of a core "
            f"(target <= 5%); persist threads {r['cpu_persisting']['persist_thread_cpu_s'] / r['cpu_persisting']['seconds'] * 60:.2f} s/min",
        ),
    ]
    out = ["| what | figure |", "| --- | --- |"]
    out += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--events", type=int, default=10_000)
    p.add_argument("--steady", type=float, default=60.0, help="seconds of 1k puts/s per CPU measurement")
    p.add_argument(
        "--repeat", type=int, default=3, help="live bursts and restarts measured (medians reported)"
    )
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "fail_static.json"))
    a = p.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so etcd and the writers are stopped and temp dirs go.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        r = run(a.keys, a.events, a.steady, a.out, a.repeat)
    finally:
        for w in _LIVE:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait(10)
    print(table(r))
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "main"
    sys.exit(main())
