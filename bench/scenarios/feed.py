"""Issue 14's targets: wake-up latency, idle waiter CPU, changes() cost — futex beside polling.

    ./run bench --only feed [--publications 400] [--idle 10]

* wake-up latency: a Publisher in this process publishes a small image every
  3-7 ms; 1 and then 8 waiter processes sit in ``Reader.wait_for_revision`` for the
  next revision and record ``time.time_ns()`` on return minus the record's
  ``publish_ns`` (stamped just before the seq store and the wake). The same run
  with the waiters forced to poll (``futex.AVAILABLE = False``) is the peer.
* idle waiter CPU: one waiter process waits ``--idle`` seconds for a revision
  that never comes; its CPU time (utime + stime from /proc) over that time.
* ``changes()``: a 100k-key snapshot published through Publisher + ChangeLog, then
  one publication changing 100 keys; the cost of ``Reader.changes(before)`` (and
  of 10 publications x 10 keys), beside ``Reader.get`` for scale.
* the writer's side: ``futex.wake`` with nobody waiting, per call.

Prints one JSON object and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from shmkeyspace import futex, publisher, segment  # noqa: E402
from shmkeyspace.builder import ImageBuilder  # noqa: E402
from shmkeyspace.feed import ChangeLog  # noqa: E402
from shmkeyspace.reader import Reader  # noqa: E402
from shmkeyspace.snapshot import pack_entry  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WAITER = r"""
import json, sys, time
from shmkeyspace import futex, segment, publisher
from shmkeyspace.reader import Reader
name, count, poll = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
if poll:
    futex.AVAILABLE = False
r = Reader(name)
ctrl = segment.ControlView(name)  # the record's publish_ns, without Reader.health's flock probe
rev = r.revision
print("ready", flush=True)
lat = []
while len(lat) < count:
    if not r.wait_for_revision(rev + 1, 30):
        break
    t = time.time_ns()
    s = ctrl.words[segment.OFF_SEQ // 8]
    rec = ctrl.record((s >> 1) & 1)
    lat.append((t - rec[6]) / 1e9)
    rev = rec[4]
print(json.dumps(lat), flush=True)
"""

IDLE = r"""
import os, sys, time
from shmkeyspace import futex
from shmkeyspace.reader import Reader
name, seconds, poll = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1"
if poll:
    futex.AVAILABLE = False
r = Reader(name)
print("ready", flush=True)
r.wait_for_revision(r.revision + 10**9, seconds)
print("done", flush=True)
"""


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(p / 100 * len(xs) + 0.5)) - 1))]


def _publish_small(pub, b, rev):
    b.reset([(b"/k", pack_entry(b"/k", rev, 1, rev, 1, 0))], rev)
    parts, n = b.parts()
    pub.publish(parts, n, rev, len(b))


def wake_latency(waiters: int, publications: int, poll: bool) -> dict:
    name = f"bench-feed-{uuid.uuid4().hex[:8]}"
    pub = publisher.Publisher(name)
    b = ImageBuilder()
    rev = 1
    _publish_small(pub, b, rev)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WAITER, name, str(publications), "1" if poll else "0"],
            env=_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(waiters)
    ]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        rnd = random.Random(1)
        for _ in range(publications):
            time.sleep(rnd.uniform(0.003, 0.007))
            rev += 1
            _publish_small(pub, b, rev)
        lat = []
        for p in procs:
            lat.extend(json.loads(p.stdout.readline()))
            p.wait(30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        pub.close(unlink=True)
    ms = [x * 1e3 for x in lat]
    return {
        "waiters": waiters,
        "mode": "poll" if poll else "futex",
        "samples": len(ms),
        "p50_ms": round(_pct(ms, 50), 3),
        "p99_ms": round(_pct(ms, 99), 3),
        "max_ms": round(max(ms), 3),
    }


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(seconds: float, poll: bool) -> dict:
    name = f"bench-feed-{uuid.uuid4().hex[:8]}"
    pub = publisher.Publisher(name)
    _publish_small(pub, ImageBuilder(), 1)
    p = subprocess.Popen(
        [sys.executable, "-c", IDLE, name, str(seconds), "1" if poll else "0"],
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout.readline().strip() == "ready"
        c0, t0 = _cpu_seconds(p.pid), time.monotonic()
        line = p.stdout.readline().strip()
        c1, t1 = _cpu_seconds(p.pid), time.monotonic()
        assert line == "done"
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
        pub.close(unlink=True)
    return {
        "mode": "poll" if poll else "futex",
        "seconds": round(t1 - t0, 2),
        "cpu_percent": round(100 * (c1 - c0) / (t1 - t0), 3),
    }


def changes_cost(n_keys: int = 100_000, repeats: int = 2000) -> dict:
    name = f"bench-feed-{uuid.uuid4().hex[:8]}"
    keys = [b"/svc/g%04d/%06d" % (i // 100, i) for i in range(n_keys)]
    pub = publisher.Publisher(name)
    b = ImageBuilder()
    log = ChangeLog()
    rev = 10
    b.reset(((k, pack_entry(k, {"v": 0}, 1, 1, 1, 0)) for k in keys), rev)
    log.record(rev, None)

    def publish():
        parts, n = b.parts()
        pub.publish(parts, n, rev, len(b), stable=b.stable_span(), feed=log.region())

    publish()
    rnd = random.Random(2)
    r = Reader(name)
    try:
        before = rev
        # one publication of 100 keys
        rev += 1
        ch = set(rnd.sample(keys, 100))
        b.apply({k: pack_entry(k, {"v": rev}, 1, rev, 2, 0) for k in ch}, rev)
        log.record(rev, ch)
        publish()
        one = _time(lambda: r.changes(before), repeats)
        assert len(r.changes(before)) == 100
        # ten publications of 10 keys
        before10 = rev
        for _ in range(10):
            rev += 1
            ch = set(rnd.sample(keys, 10))
            b.apply({k: pack_entry(k, {"v": rev}, 1, rev, 2, 0) for k in ch}, rev)
            log.record(rev, ch)
            publish()
        ten = _time(lambda: r.changes(before10), repeats)
        r0 = Reader(name, cache_size=0)
        get = _time(lambda: r0.get("/svc/g0001/000123"), repeats)
        prefixed = _time(lambda: r0.prefixed("/svc/g0001/"), repeats // 4)
        assert len(r0.prefixed("/svc/g0001/")) == 100
        r0.close()
        region = len(log.region())
    finally:
        r.close()
        pub.close(unlink=True)
    return {
        "keys": n_keys,
        "changes_100_keys_1_pub_us": round(one, 1),
        "changes_100_keys_10_pubs_us": round(ten, 1),
        "get_us": round(get, 2),
        "prefixed_100_us": round(prefixed, 1),
        "feed_region_bytes": region,
    }


def _time(fn, repeats: int) -> float:
    """Median per-call microseconds over 7 batches."""
    batches = []
    per = max(1, repeats // 7)
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(per):
            fn()
        batches.append((time.perf_counter() - t0) / per * 1e6)
    return statistics.median(batches)


def wake_cost() -> dict:
    name = f"bench-feed-{uuid.uuid4().hex[:8]}"
    pub = publisher.Publisher(name)
    try:
        _publish_small(pub, ImageBuilder(), 1)
        ctrl = segment.ControlView(name)
        addr = ctrl.seq_address()
        us = _time(lambda: futex.wake(addr), 200_000)
        ctrl.close()
    finally:
        pub.close(unlink=True)
    return {"futex_wake_no_waiters_us": round(us, 2)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--publications", type=int, default=400)
    ap.add_argument("--idle", type=float, default=10.0)
    args = ap.parse_args(argv)
    out = {"futex_available": futex.AVAILABLE, "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    out["wake"] = [wake_latency(n, args.publications, poll) for n in (1, 8) for poll in (False, True)]
    out["idle"] = [idle_cpu(args.idle, False), idle_cpu(args.idle, True)]
    out["changes"] = changes_cost()
    out["writer"] = wake_cost()
    out["loadavg_end"] = os.getloadavg()
    print(json.dumps(out, indent=1))
    print()
    print("| what | futex | polling (today) |")
    print("| --- | --- | --- |")
    for n in (1, 8):
        f = next(w for w in out["wake"] if w["waiters"] == n and w["mode"] == "futex")
        p = next(w for w in out["wake"] if w["waiters"] == n and w["mode"] == "poll")
        print(
            f"| wake-up p50 / p99, {n} waiter(s) (ms) | {f['p50_ms']} / {f['p99_ms']} | {p['p50_ms']} / {p['p99_ms']} |"
        )
    print(
        f"| idle waiter CPU over {args.idle:g} s (% of a core) | {out['idle'][0]['cpu_percent']} | {out['idle'][1]['cpu_percent']} |"
    )
    c = out["changes"]
    print(
        f"| changes() 100 keys at 100k keys, 1 / 10 publications (us) | {c['changes_100_keys_1_pub_us']} / {c['changes_100_keys_10_pubs_us']} | — |"
    )
    print(
        f"| peers in the same run: Reader.get (no cache) / prefixed() of 100 keys (us) | {c['get_us']} / {c['prefixed_100_us']} | — |"
    )
    print(
        f"| futex wake with nobody waiting, per publication (us) | {out['writer']['futex_wake_no_waiters_us']} | — |"
    )


if __name__ == "__main__":
    main()
