"""``shmkeyspace demo``: runs to completion, prints its table, and leaves nothing behind.

Both a complete ``--short`` run and one interrupted with Ctrl-C (SIGINT) must
stop every process they started (etcd, writer, readers, the mirror child),
unlink their shared memory and remove their temporary directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
from conftest import PYTHON

ROWS = [
    "keys",
    "revision",
    "seeding",
    "writer first snapshot",
    "snapshot size",
    "shm segment",
    "writer publications",
    "writer heap",
    "reader 1 lookups/s",
    "reader 2 lookups/s",
    "all readers lookups/s",
    "update->visible p50/p99/max",
    "reader memory PSS/USS",
    "in-process mirror RSS",
    "total time",
]


def table(stdout):
    """{row label: value} of the result table."""
    rows = {}
    for line in stdout.splitlines():
        for label in ROWS:
            if line.startswith(label + "  "):
                rows[label] = line[len(label) :].strip()
    return rows


def leftovers(demo_pid, tmpdir):
    """What a demo run with this pid and TMPDIR could have left behind."""
    shm = [f for f in os.listdir("/dev/shm") if f.startswith(f"shmks.demo-{demo_pid}")]
    files = os.listdir(tmpdir)
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if (str(tmpdir) in cmd or f"demo-{demo_pid}" in cmd) and p.status() != psutil.STATUS_ZOMBIE:
                procs.append((p.pid, cmd))
        except psutil.Error:
            pass
    return shm, files, procs


def children():
    return {p.pid for p in psutil.Process().children(recursive=True)}


def demo_env(python_env, tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {k: v for k, v in python_env.items() if not k.startswith("SHMKEYSPACE_")}
    env["TMPDIR"] = str(tmpdir)  # the demo's temp dirs (its own and etcd's) land here
    return env, tmpdir


def test_demo_short_runs_and_cleans_up(python_env, tmp_path):
    env, tmpdir = demo_env(python_env, tmp_path)
    before = children()
    proc = subprocess.Popen(
        [PYTHON, "-m", "shmkeyspace", "demo", "--short"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    rows = table(out)
    assert set(rows) == set(ROWS), out
    assert rows["keys"] == "5000"
    # one publication for the load, one per update (each update waits until visible)
    assert rows["writer publications"] == "6"
    assert int(rows["revision"]) > 5000 // 100
    assert "reader 3 lookups/s" not in out
    for label in ("reader 1 lookups/s", "reader 2 lookups/s"):
        assert float(rows[label].replace(",", "")) > 0
    p50, p99, worst = (float(x) for x in rows["update->visible p50/p99/max"].split(" ms")[0].split(" / "))
    assert 0 < p50 <= p99 <= worst
    assert err.count("seen by 2/2 readers") == 5, err
    assert "(0 misses" in out, "every sampled key exists: a miss is a wrong answer"

    shm, files, procs = leftovers(proc.pid, tmpdir)
    assert shm == [] and files == [] and procs == []
    assert children() - before == set()


def test_demo_interrupted_cleans_up(python_env, tmp_path):
    env, tmpdir = demo_env(python_env, tmp_path)
    before = children()
    proc = subprocess.Popen(
        [PYTHON, "-m", "shmkeyspace", "demo", "--short", "--seconds", "120"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        seen = []
        for line in proc.stderr:  # wait until everything is running: etcd, writer, readers
            seen.append(line)
            if "readers hammering" in line:
                break
            assert time.monotonic() < deadline, "".join(seen)
        else:
            raise AssertionError("demo ended early:\n" + "".join(seen))
        running = leftovers(proc.pid, tmpdir)[2]
        assert len(running) >= 4, running  # etcd, writer, 2 readers at least
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert "shmkeyspace demo results" not in out
    shm, files, procs = leftovers(proc.pid, tmpdir)
    assert shm == [] and files == [] and procs == []
    assert children() - before == set()
